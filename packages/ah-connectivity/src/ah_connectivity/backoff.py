"""Exponential backoff with full jitter (pure)."""

from __future__ import annotations

import random

__all__ = ["Backoff"]


class Backoff:
    """Delay before reconnect attempt n: uniform in [0, min(cap, base * factor**n)].

    Full jitter keeps a fleet of followers that lost the same access point from reconnecting in
    lock-step. `reset` after a connection that worked.
    """

    def __init__(
        self,
        base_s: float = 0.2,
        cap_s: float = 10.0,
        factor: float = 2.0,
        rng: random.Random | None = None,
    ) -> None:
        if base_s <= 0 or cap_s < base_s or factor < 1:
            raise ValueError(
                f"invalid backoff base_s={base_s} cap_s={cap_s} factor={factor}: "
                "expected 0 < base_s <= cap_s and factor >= 1"
            )
        self.base_s = base_s
        self.cap_s = cap_s
        self.factor = factor
        self._rng = rng or random.Random()
        self._attempt = 0

    @property
    def attempts(self) -> int:
        """Delays handed out since the last reset."""
        return self._attempt

    def ceiling(self, attempt: int | None = None) -> float:
        """The upper bound of the delay for `attempt` (default: the next one)."""
        n = self._attempt if attempt is None else attempt
        bound = self.base_s
        # Multiply step by step so huge attempt counts cannot overflow a float power.
        for _ in range(n):
            bound *= self.factor
            if bound >= self.cap_s:
                return self.cap_s
        return min(bound, self.cap_s)

    def next_delay(self) -> float:
        upper = self.ceiling()
        self._attempt += 1
        return self._rng.uniform(0.0, upper)

    def reset(self) -> None:
        self._attempt = 0
