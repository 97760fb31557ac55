"""`ReplayLiveMerge`: any interleaving of history reads and live arrivals yields every event
after the client's position exactly once, in order."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ah_api import ReplayLiveMerge


@dataclass
class World:
    """A store being appended to, one subscriber, and a history reader with page size
    ``page``. Live events published after the subscription queue up for the client."""

    after: int
    page: int
    committed: int
    """Events 1..committed are in the store (committed before the client subscribed too)."""
    live_queue: list[int] = field(default_factory=list)
    merge: ReplayLiveMerge[int] = field(init=False)
    out: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.merge = ReplayLiveMerge(self.after)

    def commit(self, count: int) -> None:
        for _ in range(count):
            self.committed += 1
            self.live_queue.append(self.committed)  # published right after the commit

    def read_history(self) -> None:
        cursor = self.merge.cursor
        page = list(range(cursor + 1, min(self.committed, cursor + self.page) + 1))
        self.out += self.merge.history(
            ((seq, seq) for seq in page), exhausted=len(page) < self.page
        )

    def deliver(self, count: int) -> None:
        batch, self.live_queue = self.live_queue[:count], self.live_queue[count:]
        if count % 3 == 1:
            self.out += self.merge.arrived((seq, seq) for seq in batch)
        elif count % 3 == 2 or not batch:  # the shell's fast path for published batches
            self.out += self.merge.arrived_sorted(batch, lambda seq: seq)
        elif self.merge.pass_through(batch[0], batch[-1]):  # ...and its shared frames
            self.out += batch
        else:
            self.out += self.merge.arrived_sorted(batch, lambda seq: seq)


steps = st.lists(
    st.one_of(
        st.tuples(st.just("commit"), st.integers(1, 6)),
        st.tuples(st.just("read"), st.just(0)),
        st.tuples(st.just("deliver"), st.integers(1, 8)),
    ),
    max_size=80,
)


@settings(max_examples=500, deadline=None)
@given(
    before=st.integers(0, 30),
    after_fraction=st.floats(0, 1.2),
    page=st.integers(1, 9),
    steps=steps,
)
def test_any_interleaving_yields_each_seq_once_in_order(
    before: int, after_fraction: float, page: int, steps: list[tuple[str, int]]
) -> None:
    after = int(before * after_fraction)
    world = World(after=after, page=page, committed=before)
    for step, arg in steps:
        if step == "commit":
            world.commit(arg)
        elif step == "read":
            if not world.merge.live:  # the shell stops reading once live
                world.read_history()
        else:
            world.deliver(arg)
        # Never a duplicate, never out of order, never at or below the start.
        assert world.out == sorted(set(world.out))
        assert all(seq > after for seq in world.out)
        # Whatever went out is gap-free from the start.
        assert world.out == list(range(after + 1, after + 1 + len(world.out)))
    # Then the shell finishes its replay and delivers everything live.
    while not world.merge.live:
        world.read_history()
    world.deliver(len(world.live_queue))
    assert world.out == list(range(after + 1, world.committed + 1))


@settings(max_examples=200, deadline=None)
@given(
    committed=st.integers(0, 40),
    page=st.integers(1, 9),
    lost_at=st.integers(0, 10),
    late=st.integers(0, 10),
)
def test_losing_live_events_while_replaying_is_covered_by_history(
    committed: int, page: int, lost_at: int, late: int
) -> None:
    world = World(after=0, page=page, committed=committed)
    world.commit(lost_at)
    world.deliver(lost_at)  # held while replaying...
    world.live_queue.clear()  # ...then the subscription overflowed: the shell resets it
    world.merge.restart_history()
    assert world.merge.held == 0
    world.commit(late)
    while not world.merge.live:
        world.read_history()
    world.deliver(len(world.live_queue))
    assert world.out == list(range(1, world.committed + 1))


def test_restarting_history_after_going_live_is_refused() -> None:
    merge: ReplayLiveMerge[int] = ReplayLiveMerge(0)
    assert merge.history([], exhausted=True) == []
    assert merge.live
    with pytest.raises(RuntimeError, match="after the switch to live"):
        merge.restart_history()
    with pytest.raises(ValueError, match="after must be >= 0"):
        ReplayLiveMerge(-1)
