"""Sans-I/O data-plane path selection for one follower.

:class:`PathSelector` decides how the leader reaches one follower's sshd. It is fed events
with an explicit ``now`` (monotonic seconds chosen by the caller) and returns actions for the
I/O shell to carry out, in order — like ``h11.Connection``:

* ``start`` → :class:`TryMethod` for the first candidate (direct → connect → relay; a
  method is only tried when the caller passed a candidate for it: policy decides upstream).
  The shell dials, logs in, runs the liveness probe, and reports ``attempt_succeeded`` (with
  the probe's RTT), ``attempt_failed`` or ``attempt_timed_out``. Each failure moves on to the
  next candidate; the first success **fixes** the path (:class:`FixPath`, whose ``event``
  is ``connect.path.fixed``) and asks for a health probe (:class:`ScheduleProbe`).
* While fixed: ``probe_succeeded`` / ``probe_failed`` each schedule the next probe; after
  ``failures_to_degrade`` consecutive failures the path is :class:`Degraded` and is
  re-established — the last good candidate first, then the others in the usual order — and
  a success there is :class:`Restored` (not a second :class:`FixPath`).
* ``tick`` lets deadlines pass: an attempt past its deadline counts as timed out, and when
  the overall deadline passes (or every candidate failed) the selector gives up with a
  :class:`Diagnostic` (:class:`PathTimeout` / :class:`AllMethodsFailed`) whose
  ``best_reason`` is the most informative failure.

Events that do not fit the current state (a late result of an attempt that already timed
out, a probe result while no path is fixed, ...) are ignored: they return no action.
Every event first lets time pass, so a result reported after its deadline is stale.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable, Sequence

import msgspec

from ah_domain_types import (
    PathDegradedEvent,
    PathFixedEvent,
    PathRecord,
    PathRestoredEvent,
    TransportMethod,
)

__all__ = [
    "METHOD_ORDER",
    "AllMethodsFailed",
    "AttemptFailure",
    "Degraded",
    "Diagnostic",
    "FailureKind",
    "FixPath",
    "GiveUp",
    "PathAction",
    "PathCandidate",
    "PathPhase",
    "PathSelector",
    "PathTimeout",
    "Restored",
    "ScheduleProbe",
    "TryMethod",
]

METHOD_ORDER: tuple[TransportMethod, ...] = (
    TransportMethod.DIRECT,
    TransportMethod.CONNECT,
    TransportMethod.RELAY,
)


class FailureKind(enum.StrEnum):
    """Why an attempt or probe failed, from most to least informative.

    The values match ``ah_ssh_bridge.SshError.kind``, so ``FailureKind(exc.kind)`` works.
    """

    HOST_KEY = "host-key"
    """The sshd presented another host key than the follower reported."""
    AUTH = "auth"
    """SSH public-key login or the access point's bearer token was refused."""
    TLS = "tls"
    """TLS to the access point failed verification."""
    PROXY = "proxy"
    """The access point answered CONNECT with an error status (follower offline, forbidden)."""
    PROTOCOL = "protocol"
    """Something answered but did not speak SSH / HTTP as expected."""
    PROBE = "probe"
    """Logged in, but the liveness probe failed."""
    CONNECTION_LOST = "connection-lost"
    TIMEOUT = "timeout"
    REFUSED = "refused"
    UNREACHABLE = "unreachable"
    OTHER = "other"


# Higher is more informative: a refused login says more than a silent timeout, which says
# more than a refused TCP port.
_INFORMATIVENESS: dict[FailureKind, int] = {
    kind: len(FailureKind) - index for index, kind in enumerate(FailureKind)
}


class PathCandidate(msgspec.Struct, frozen=True, rename="camel"):
    """One way to reach the follower: ``target`` is what gets dialled (``host:port`` for
    direct, ``<follower>:22`` through CONNECT); ``relay`` names the relaying access point
    and is set exactly for the relay method."""

    method: TransportMethod
    target: str
    relay: str | None = None

    def __post_init__(self) -> None:
        if not self.target:
            raise ValueError(f"{self.method.value} candidate: empty target")
        if (self.method is TransportMethod.RELAY) != (self.relay is not None):
            raise ValueError(
                f"{self.method.value} candidate {self.target!r}: relay "
                + (
                    "must name the relaying access point"
                    if self.method is TransportMethod.RELAY
                    else f"must be unset (got {self.relay!r})"
                )
            )

    def describe(self) -> str:
        via = f" via {self.relay}" if self.relay else ""
        return f"{self.method.value} {self.target}{via}"


class AttemptFailure(msgspec.Struct, frozen=True, rename="camel"):
    """One failed attempt (``stage="attempt"``) or failed health probe (``"probe"``)."""

    method: TransportMethod
    target: str
    relay: str | None
    kind: FailureKind
    error: str
    started: float
    ended: float
    stage: str = "attempt"

    def describe(self) -> str:
        via = f" via {self.relay}" if self.relay else ""
        return f"{self.method.value} {self.target}{via}: {self.kind.value}: {self.error}"


class Diagnostic(msgspec.Struct, frozen=True, rename="camel"):
    """Why no path could be found for ``host`` in the last round of attempts."""

    host: str
    failures: tuple[AttemptFailure, ...]
    methods_tried: tuple[TransportMethod, ...]

    @property
    def best_reason(self) -> AttemptFailure | None:
        """The most informative failure (host-key and auth beat timeouts beat refused; the
        latest among equals)."""
        best: AttemptFailure | None = None
        for failure in self.failures:
            if best is None or _INFORMATIVENESS[failure.kind] >= _INFORMATIVENESS[best.kind]:
                best = failure
        return best

    @property
    def message(self) -> str:
        return self._summary()

    def _summary(self) -> str:
        if not self.failures:
            return f"{self.host}: no path candidates to try"
        tried = "; ".join(f.describe() for f in self.failures)
        best = self.best_reason
        assert best is not None
        return f"{self.host}: {best.describe()} (tried: {tried})"


class PathTimeout(Diagnostic, frozen=True):
    """The overall deadline passed before any method worked."""

    timeout_s: float = 0.0

    def _summary(self) -> str:
        methods = ", ".join(m.value for m in self.methods_tried) or "none"
        head = f"{self.host}: no working path within {self.timeout_s:g}s (methods tried: {methods})"
        best = self.best_reason
        return f"{head}; most informative failure: {best.describe()}" if best else head


class AllMethodsFailed(Diagnostic, frozen=True):
    """Every candidate was tried and failed before the overall deadline."""


class TryMethod(msgspec.Struct, frozen=True):
    """Dial ``candidate``, log in and probe; report the result before ``deadline``."""

    candidate: PathCandidate
    deadline: float
    reestablishing: bool = False


class FixPath(msgspec.Struct, frozen=True):
    """The first working path: record it and publish ``connect.path.fixed``."""

    host: str
    path: PathRecord

    def event(self, session_id: str, ts_ms: float) -> PathFixedEvent:
        return PathFixedEvent(host=self.host, path=self.path, session_id=session_id, ts_ms=ts_ms)


class ScheduleProbe(msgspec.Struct, frozen=True):
    """Run the health probe at ``at`` with ``timeout_s``; report probe_succeeded/failed."""

    at: float
    timeout_s: float


class Degraded(msgspec.Struct, frozen=True):
    """The fixed path failed its health probes: drop its transport and publish
    ``connect.path.degraded``; :class:`TryMethod` actions for re-establishing follow."""

    host: str
    path: PathRecord
    failures: int
    error: str

    def event(self, session_id: str, ts_ms: float) -> PathDegradedEvent:
        return PathDegradedEvent(
            host=self.host,
            path=self.path,
            failures=self.failures,
            error=self.error,
            session_id=session_id,
            ts_ms=ts_ms,
        )


class Restored(msgspec.Struct, frozen=True):
    """A path works again after degradation (``path`` may use another method than
    ``previous``): use it and publish ``connect.path.restored``."""

    host: str
    path: PathRecord
    previous: PathRecord

    def event(self, session_id: str, ts_ms: float) -> PathRestoredEvent:
        return PathRestoredEvent(host=self.host, path=self.path, session_id=session_id, ts_ms=ts_ms)


class GiveUp(msgspec.Struct, frozen=True):
    """No path: the follower is unreachable for now; ``diagnostic`` says why."""

    diagnostic: Diagnostic


PathAction = TryMethod | FixPath | ScheduleProbe | Degraded | Restored | GiveUp


class PathPhase(enum.Enum):
    IDLE = "idle"
    CONNECTING = "connecting"
    FIXED = "fixed"
    REESTABLISHING = "reestablishing"
    FAILED = "failed"


def _method_rank(method: TransportMethod) -> int:
    return METHOD_ORDER.index(method)


def _check_positive(**values: float) -> None:
    for name, value in values.items():
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")


class PathSelector:
    """Path selection for one follower (see the module docstring for the protocol)."""

    def __init__(
        self,
        host: str,
        candidates: Iterable[PathCandidate],
        *,
        per_method_timeout_s: float = 5.0,
        overall_timeout_s: float = 60.0,
        probe_interval_s: float = 30.0,
        probe_timeout_s: float = 1.0,
        failures_to_degrade: int = 3,
    ) -> None:
        _check_positive(
            per_method_timeout_s=per_method_timeout_s,
            overall_timeout_s=overall_timeout_s,
            probe_interval_s=probe_interval_s,
            probe_timeout_s=probe_timeout_s,
        )
        if failures_to_degrade < 1:
            raise ValueError(f"failures_to_degrade must be >= 1, got {failures_to_degrade}")
        self.host = host
        # Stable sort: several candidates of one method (e.g. relays) keep the caller's order.
        self.candidates: tuple[PathCandidate, ...] = tuple(
            sorted(candidates, key=lambda c: _method_rank(c.method))
        )
        self.per_method_timeout_s = per_method_timeout_s
        self.overall_timeout_s = overall_timeout_s
        self.probe_interval_s = probe_interval_s
        self.probe_timeout_s = probe_timeout_s
        self.failures_to_degrade = failures_to_degrade

        self._phase = PathPhase.IDLE
        self._now = -math.inf
        self._queue: list[PathCandidate] = []
        self._current: PathCandidate | None = None
        self._attempt_number = 0
        self._current_started = 0.0
        self._current_deadline = 0.0
        self._overall_deadline = math.inf
        self._round_started = 0.0
        self._round_failures: list[AttemptFailure] = []
        self._round_tried: list[TransportMethod] = []
        self._failures: list[AttemptFailure] = []
        self._path: PathRecord | None = None
        self._degraded_path: PathRecord | None = None
        self._last_good: PathCandidate | None = None
        self._probe_failures = 0
        self._next_probe_at: float | None = None
        self._rtt_estimate_ms: float | None = None

    # ------------------------------------------------------------------ state

    @property
    def phase(self) -> PathPhase:
        return self._phase

    @property
    def path(self) -> PathRecord | None:
        """The fixed path, while there is one."""
        return self._path

    @property
    def last_good(self) -> PathCandidate | None:
        return self._last_good

    @property
    def current_attempt(self) -> PathCandidate | None:
        """The candidate being tried right now, if any."""
        return self._current

    @property
    def failures(self) -> list[AttemptFailure]:
        """Every failure so far (attempts and probes), oldest first."""
        return list(self._failures)

    @property
    def next_probe_at(self) -> float | None:
        return self._next_probe_at

    @property
    def consecutive_probe_failures(self) -> int:
        return self._probe_failures

    @property
    def rtt_estimate_ms(self) -> float | None:
        """RTT of the path: the winning attempt's probe, smoothed with later probes."""
        return self._rtt_estimate_ms

    @property
    def overall_deadline(self) -> float | None:
        active = self._phase in (PathPhase.CONNECTING, PathPhase.REESTABLISHING)
        return self._overall_deadline if active else None

    # ------------------------------------------------------------------ events

    def start(self, now: float) -> list[PathAction]:
        """Begin selecting (again, after a give-up). Ignored while already selecting or
        fixed."""
        if self._phase not in (PathPhase.IDLE, PathPhase.FAILED):
            return self._advance(now)
        self._set_now(now)
        return self._begin_round(list(self.candidates), reestablishing=False)

    def attempt_succeeded(
        self, method: TransportMethod | PathCandidate, rtt_ms: float, now: float
    ) -> list[PathAction]:
        """The attempt logged in and passed the liveness probe, which took ``rtt_ms``."""
        if not (math.isfinite(rtt_ms) and rtt_ms >= 0):
            raise ValueError(f"rtt_ms must be a finite number >= 0, got {rtt_ms!r}")
        attempt = self._attempt_number
        actions = self._advance(now)
        candidate = self._matching_attempt(method, attempt)
        if candidate is None:
            return actions
        self._current = None
        path = PathRecord(
            method=candidate.method,
            target=candidate.target,
            relay=candidate.relay,
            rtt_estimate_ms=float(rtt_ms),
        )
        self._path = path
        self._last_good = candidate
        self._rtt_estimate_ms = float(rtt_ms)
        self._probe_failures = 0
        if self._phase is PathPhase.REESTABLISHING and self._degraded_path is not None:
            actions.append(Restored(self.host, path, self._degraded_path))
        else:
            actions.append(FixPath(self.host, path))
        self._phase = PathPhase.FIXED
        self._degraded_path = None
        return [*actions, self._schedule_probe()]

    def attempt_failed(
        self,
        method: TransportMethod | PathCandidate,
        error: str,
        now: float,
        *,
        kind: FailureKind = FailureKind.OTHER,
    ) -> list[PathAction]:
        """The attempt failed (``kind`` classifies ``error`` for the diagnostic)."""
        attempt = self._attempt_number
        actions = self._advance(now)
        candidate = self._matching_attempt(method, attempt)
        if candidate is None:
            return actions
        self._fail_current(kind, error)
        return [*actions, *self._next_attempt()]

    def attempt_timed_out(
        self, method: TransportMethod | PathCandidate, now: float
    ) -> list[PathAction]:
        """The shell gave up on the attempt (its own deadline passed)."""
        attempt = self._attempt_number
        actions = self._advance(now)
        candidate = self._matching_attempt(method, attempt)
        if candidate is None:
            return actions
        self._fail_current(FailureKind.TIMEOUT, self._timeout_text())
        return [*actions, *self._next_attempt()]

    def probe_succeeded(self, rtt_ms: float, now: float) -> list[PathAction]:
        if not (math.isfinite(rtt_ms) and rtt_ms >= 0):
            raise ValueError(f"rtt_ms must be a finite number >= 0, got {rtt_ms!r}")
        actions = self._advance(now)
        if self._phase is not PathPhase.FIXED:
            return actions
        self._probe_failures = 0
        previous = self._rtt_estimate_ms
        # Smooth like TCP's SRTT (RFC 6298, alpha = 1/8).
        self._rtt_estimate_ms = rtt_ms if previous is None else previous + (rtt_ms - previous) / 8
        return [*actions, self._schedule_probe()]

    def probe_failed(
        self, error: str, now: float, *, kind: FailureKind = FailureKind.PROBE
    ) -> list[PathAction]:
        actions = self._advance(now)
        if self._phase is not PathPhase.FIXED or self._path is None:
            return actions
        path = self._path
        self._probe_failures += 1
        probe_started = self._next_probe_at if self._next_probe_at is not None else self._now
        self._failures.append(
            AttemptFailure(
                method=path.method,
                target=path.target,
                relay=path.relay,
                kind=kind,
                error=error,
                started=min(probe_started, self._now),
                ended=self._now,
                stage="probe",
            )
        )
        if self._probe_failures < self.failures_to_degrade:
            return [*actions, self._schedule_probe()]
        failures = self._probe_failures
        self._degraded_path = path
        self._path = None
        self._next_probe_at = None
        self._probe_failures = 0
        last_good = self._last_good
        order = [c for c in self.candidates if c != last_good]
        if last_good is not None:
            order.insert(0, last_good)
        actions.append(Degraded(self.host, path, failures, error))
        return [*actions, *self._begin_round(order, reestablishing=True)]

    def tick(self, now: float) -> list[PathAction]:
        """Let time pass: attempts past their deadline time out, the overall deadline ends
        the search."""
        return self._advance(now)

    # ------------------------------------------------------------------ internals

    def _set_now(self, now: float) -> None:
        # A clock that steps back (or NaN) must not move deadlines; keep the latest time.
        if now > self._now:
            self._now = now

    def _timeout_text(self) -> str:
        return f"no result within {self._current_deadline - self._current_started:g}s"

    def _matching_attempt(
        self, method: TransportMethod | PathCandidate, attempt: int
    ) -> PathCandidate | None:
        """The running attempt if ``method`` names it and it is still the one that ran when
        the event arrived (letting time pass may have timed it out and started the next
        one, perhaps of the same method: the result belongs to the old one, so it is stale)."""
        current = self._current
        if current is None or self._phase not in (PathPhase.CONNECTING, PathPhase.REESTABLISHING):
            return None
        if attempt != self._attempt_number:
            return None
        if isinstance(method, PathCandidate):
            return current if method == current else None
        return current if method == current.method else None

    def _begin_round(
        self, order: Sequence[PathCandidate], *, reestablishing: bool
    ) -> list[PathAction]:
        self._phase = PathPhase.REESTABLISHING if reestablishing else PathPhase.CONNECTING
        self._queue = list(order)
        self._current = None
        self._round_started = self._now
        self._overall_deadline = self._now + self.overall_timeout_s
        self._round_failures = []
        self._round_tried = []
        return self._next_attempt()

    def _next_attempt(self) -> list[PathAction]:
        if self._now >= self._overall_deadline:
            return [self._give_up(timed_out=True)]
        if not self._queue:
            return [self._give_up(timed_out=False)]
        candidate = self._queue.pop(0)
        self._current = candidate
        self._attempt_number += 1
        self._current_started = self._now
        self._current_deadline = min(self._now + self.per_method_timeout_s, self._overall_deadline)
        if candidate.method not in self._round_tried:
            self._round_tried.append(candidate.method)
        return [
            TryMethod(
                candidate,
                self._current_deadline,
                reestablishing=self._phase is PathPhase.REESTABLISHING,
            )
        ]

    def _fail_current(self, kind: FailureKind, error: str) -> None:
        candidate = self._current
        assert candidate is not None
        failure = AttemptFailure(
            method=candidate.method,
            target=candidate.target,
            relay=candidate.relay,
            kind=kind,
            error=error,
            started=self._current_started,
            ended=self._now,
        )
        self._failures.append(failure)
        self._round_failures.append(failure)
        self._current = None

    def _give_up(self, *, timed_out: bool) -> GiveUp:
        self._phase = PathPhase.FAILED
        self._queue = []
        self._current = None
        self._degraded_path = None
        failures = tuple(self._round_failures)
        tried = tuple(self._round_tried)
        diagnostic: Diagnostic
        if timed_out:
            diagnostic = PathTimeout(self.host, failures, tried, timeout_s=self.overall_timeout_s)
        else:
            diagnostic = AllMethodsFailed(self.host, failures, tried)
        return GiveUp(diagnostic)

    def _schedule_probe(self) -> ScheduleProbe:
        self._next_probe_at = self._now + self.probe_interval_s
        return ScheduleProbe(self._next_probe_at, self.probe_timeout_s)

    def _advance(self, now: float) -> list[PathAction]:
        self._set_now(now)
        if self._phase not in (PathPhase.CONNECTING, PathPhase.REESTABLISHING):
            return []
        if self._now >= self._overall_deadline:
            if self._current is not None:
                self._fail_current(FailureKind.TIMEOUT, self._timeout_text())
            return [self._give_up(timed_out=True)]
        if self._current is not None and self._now >= self._current_deadline:
            self._fail_current(FailureKind.TIMEOUT, self._timeout_text())
            return self._next_attempt()
        return []
