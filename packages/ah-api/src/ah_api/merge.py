"""Replay-then-live merge for one event-stream client (sans-I/O).

An SSE client that resumes after ``Last-Event-ID: N`` must get every later event exactly
once. Its server side subscribes to live events *first*, then reads history from the store
in pages after a cursor, then switches to live. Events committed after the subscription can
show up both in a history page and among the live arrivals; events committed before it only in
history. `ReplayLiveMerge` turns any interleaving of the two into one gap-free, duplicate-free,
ascending sequence:

* history pages are taken in order, each item only if its seq is above the last one emitted;
* live arrivals are held back until history is exhausted (a page shorter than asked for),
  then released, dropping every seq at or below the last one emitted;
* once live, arrivals pass through with the same rule.

The subscription's completeness is the shell's contract: every event committed after the
subscription is offered to `arrived` (a subscriber that loses live events must be
disconnected and resume from its last id).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Generic, TypeVar

__all__ = ["ReplayLiveMerge"]

T = TypeVar("T")


class ReplayLiveMerge(Generic[T]):
    """Feeds: `history` (store pages in seq order), `arrived` (live events in seq order).
    Each returns the items to send now, ascending, none twice, none at or below ``after``."""

    def __init__(self, after: int = 0) -> None:
        if after < 0:
            raise ValueError(f"after must be >= 0, got {after}")
        self._last = after
        self._live = False
        self._held: list[tuple[int, T]] = []

    @property
    def cursor(self) -> int:
        """The seq the next history page must start after (the last one emitted)."""
        return self._last

    @property
    def live(self) -> bool:
        """History is exhausted: only live arrivals matter now."""
        return self._live

    @property
    def held(self) -> int:
        """Live arrivals waiting for history to be exhausted."""
        return len(self._held)

    def history(self, page: Iterable[tuple[int, T]], *, exhausted: bool) -> list[T]:
        """One page read from the store after `cursor`; ``exhausted`` when the store had no
        more (the page was shorter than requested)."""
        out = self._take(page)
        if exhausted and not self._live:
            self._live = True
            held, self._held = self._held, []
            out += self._take(held)
        elif self._held:
            # History now covers what was held up to here; keep only what is still ahead.
            last = self._last
            self._held = [(seq, item) for seq, item in self._held if seq > last]
        return out

    def arrived(self, items: Iterable[tuple[int, T]]) -> list[T]:
        """Live events, as they were published."""
        if self._live:
            return self._take(items)
        last = self._last
        self._held += [(seq, item) for seq, item in items if seq > last]
        return []

    def arrived_sorted(self, items: Sequence[T], seq: Callable[[T], int]) -> list[T]:
        """`arrived` for items already in ascending seq order (``seq(item)`` gives it): when
        live and all of them are new, they pass without looking at each one."""
        if not items:
            return []
        if self._live and seq(items[0]) > self._last:
            self._last = seq(items[-1])
            return list(items)
        return self.arrived((seq(item), item) for item in items)

    def pass_through(self, first: int, last: int) -> bool:
        """Live events ``first`` .. ``last`` (ascending, as published): when live and all of
        them are new, take them all (True) without looking at each one; otherwise nothing
        happened (False) and they must go through `arrived`."""
        if self._live and first > self._last:
            self._last = last
            return True
        return False

    def restart_history(self) -> None:
        """The shell lost live arrivals while still replaying (it reset the subscription):
        nothing held is needed, history reads will cover it."""
        if self._live:
            raise RuntimeError("live arrivals were lost after the switch to live")
        self._held = []

    def _take(self, items: Iterable[tuple[int, T]]) -> list[T]:
        out: list[T] = []
        last = self._last
        for seq, item in items:
            if seq > last:
                out.append(item)
                last = seq
        self._last = last
        return out
