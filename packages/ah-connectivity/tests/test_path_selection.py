"""PathSelector: the sans-I/O path selection state machine."""

from __future__ import annotations

from dataclasses import dataclass, field

import msgspec
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from ah_connectivity.path_selection import (
    METHOD_ORDER,
    AllMethodsFailed,
    Degraded,
    Diagnostic,
    FailureKind,
    FixPath,
    GiveUp,
    PathAction,
    PathCandidate,
    PathPhase,
    PathSelector,
    PathTimeout,
    Restored,
    ScheduleProbe,
    TryMethod,
)
from ah_domain_types import (
    PathFixedEvent,
    PathRecord,
    TransportMethod,
    decode_event_json,
    encode_event_json,
)

DIRECT = PathCandidate(TransportMethod.DIRECT, "10.0.0.5:22")
CONNECT = PathCandidate(TransportMethod.CONNECT, "f1:22")
RELAY = PathCandidate(TransportMethod.RELAY, "f1:22", relay="ap-2")


def only(actions: list[PathAction], kind: type[PathAction]) -> PathAction:
    matching = [a for a in actions if isinstance(a, kind)]
    assert len(matching) == 1, actions
    return matching[0]


def tried(actions: list[PathAction]) -> PathCandidate:
    action = only(actions, TryMethod)
    assert isinstance(action, TryMethod)
    return action.candidate


# --------------------------------------------------------------------------- examples


def test_first_success_fixes_the_path_and_schedules_a_probe() -> None:
    selector = PathSelector("f1", [RELAY, CONNECT, DIRECT])
    assert tried(selector.start(100.0)) == DIRECT
    assert tried(selector.attempt_failed(TransportMethod.DIRECT, "refused", 100.5,
                                         kind=FailureKind.REFUSED)) == CONNECT  # fmt: skip
    actions = selector.attempt_succeeded(TransportMethod.CONNECT, 12.5, 101.0)
    assert actions == [
        FixPath("f1", PathRecord(TransportMethod.CONNECT, "f1:22", None, 12.5)),
        ScheduleProbe(131.0, 1.0),
    ]
    assert selector.phase is PathPhase.FIXED
    assert selector.path == PathRecord(TransportMethod.CONNECT, "f1:22", None, 12.5)
    assert selector.rtt_estimate_ms == 12.5
    failure = selector.failures[0]
    assert (failure.method, failure.error, failure.started, failure.ended) == (
        TransportMethod.DIRECT, "refused", 100.0, 100.5,
    )  # fmt: skip


def test_without_a_direct_candidate_connect_comes_first() -> None:
    selector = PathSelector("f1", [RELAY, CONNECT])
    assert tried(selector.start(0)) == CONNECT


def test_fix_event_is_a_valid_connect_path_fixed_event() -> None:
    selector = PathSelector("f1", [CONNECT])
    selector.start(0)
    fix = only(selector.attempt_succeeded(CONNECT, 3.0, 1), FixPath)
    assert isinstance(fix, FixPath)
    event = fix.event("sess-1", 1234.0)
    assert isinstance(event, PathFixedEvent)
    assert b'"type":"connect.path.fixed"' in encode_event_json(event)
    assert decode_event_json(encode_event_json(event)) == event


def test_attempt_deadline_and_overall_timeout() -> None:
    selector = PathSelector("f1", [DIRECT, CONNECT, RELAY], per_method_timeout_s=5,
                            overall_timeout_s=8)  # fmt: skip
    first = only(selector.start(0), TryMethod)
    assert isinstance(first, TryMethod) and first.deadline == 5
    assert selector.tick(4.9) == []
    second = only(selector.tick(5), TryMethod)
    assert isinstance(second, TryMethod)
    assert second.candidate == CONNECT and second.deadline == 8  # capped by the overall deadline
    give_up = only(selector.tick(8), GiveUp)
    assert isinstance(give_up, GiveUp)
    diagnostic = give_up.diagnostic
    assert isinstance(diagnostic, PathTimeout)
    assert diagnostic.methods_tried == (TransportMethod.DIRECT, TransportMethod.CONNECT)
    assert "within 8s" in diagnostic.message and "direct, connect" in diagnostic.message
    assert [f.kind for f in diagnostic.failures] == [FailureKind.TIMEOUT, FailureKind.TIMEOUT]
    assert selector.phase is PathPhase.FAILED
    # A late success of the timed-out attempt is stale.
    assert selector.attempt_succeeded(CONNECT, 1.0, 9) == []
    assert selector.path is None


def test_a_result_arriving_after_its_deadline_is_stale() -> None:
    """Two relays: the first one's success comes in after its deadline, when the second is
    already being tried. It must neither fix the first nor count for the second."""
    ap3 = PathCandidate(TransportMethod.RELAY, "f1:22", relay="ap-3")
    selector = PathSelector("f1", [RELAY, ap3], per_method_timeout_s=5)
    selector.start(0)
    actions = selector.attempt_succeeded(TransportMethod.RELAY, 1.0, 5.5)
    assert actions == [TryMethod(ap3, 10.5)]
    assert selector.path is None and selector.current_attempt == ap3
    assert selector.failures[0].kind is FailureKind.TIMEOUT
    fix = selector.attempt_succeeded(TransportMethod.RELAY, 2.0, 6)[0]
    assert isinstance(fix, FixPath) and fix.path.relay == "ap-3"


def test_all_methods_failed_and_the_best_reason() -> None:
    selector = PathSelector("f1", [DIRECT, CONNECT, RELAY])
    selector.start(0)
    selector.attempt_failed(DIRECT, "connection refused", 1, kind=FailureKind.REFUSED)
    selector.attempt_failed(CONNECT, "host key mismatch: expected A got B", 2,
                            kind=FailureKind.HOST_KEY)  # fmt: skip
    actions = selector.attempt_timed_out(RELAY, 3)
    give_up = only(actions, GiveUp)
    assert isinstance(give_up, GiveUp)
    diagnostic = give_up.diagnostic
    assert isinstance(diagnostic, AllMethodsFailed)
    best = diagnostic.best_reason
    assert best is not None and best.kind is FailureKind.HOST_KEY and best.method == "connect"
    assert (
        "host key mismatch" in diagnostic.message and "relay f1:22 via ap-2" in diagnostic.message
    )


@pytest.mark.parametrize(
    ("kinds", "best"),
    [
        ((FailureKind.REFUSED, FailureKind.TIMEOUT), FailureKind.TIMEOUT),
        ((FailureKind.TIMEOUT, FailureKind.AUTH, FailureKind.REFUSED), FailureKind.AUTH),
        ((FailureKind.AUTH, FailureKind.HOST_KEY), FailureKind.HOST_KEY),
        ((FailureKind.UNREACHABLE, FailureKind.REFUSED), FailureKind.REFUSED),
        ((FailureKind.OTHER, FailureKind.UNREACHABLE), FailureKind.UNREACHABLE),
    ],
)
def test_best_reason_ranking(kinds: tuple[FailureKind, ...], best: FailureKind) -> None:
    selector = PathSelector("f1", [DIRECT, CONNECT, RELAY])
    selector.start(0)
    actions: list[PathAction] = []
    for n, kind in enumerate(kinds):
        current = selector.current_attempt
        assert current is not None
        actions = selector.attempt_failed(current, f"error {n}", n + 1, kind=kind)
    if len(kinds) < 3:
        current = selector.current_attempt
        assert current is not None
        actions = selector.attempt_failed(current, "whatever", 3.5, kind=FailureKind.OTHER)
    give_up = only(actions, GiveUp)
    assert isinstance(give_up, GiveUp)
    reason = give_up.diagnostic.best_reason
    assert reason is not None and reason.kind is best


def test_three_probe_failures_degrade_and_reestablish_from_the_last_good_method() -> None:
    selector = PathSelector("f1", [DIRECT, CONNECT, RELAY], probe_interval_s=30)
    selector.start(0)
    selector.attempt_failed(DIRECT, "refused", 1, kind=FailureKind.REFUSED)
    selector.attempt_succeeded(CONNECT, 10.0, 2)
    assert selector.probe_succeeded(20.0, 32) == [ScheduleProbe(62, 1.0)]
    assert selector.rtt_estimate_ms == pytest.approx(10 + (20 - 10) / 8)
    assert selector.probe_failed("timeout", 62) == [ScheduleProbe(92, 1.0)]
    assert selector.probe_failed("timeout", 92) == [ScheduleProbe(122, 1.0)]
    actions = selector.probe_failed("probe timed out", 122)
    degraded, retry = actions
    fixed = PathRecord(TransportMethod.CONNECT, "f1:22", None, 10.0)
    assert degraded == Degraded("f1", fixed, 3, "probe timed out")
    assert isinstance(retry, TryMethod) and retry.candidate == CONNECT and retry.reestablishing
    assert selector.path is None and selector.phase is PathPhase.REESTABLISHING
    event = degraded.event("s", 1.0) if isinstance(degraded, Degraded) else None
    assert event is not None and event.failures == 3 and event.path == fixed
    # The last good method fails; the others follow in the usual order.
    assert tried(selector.attempt_failed(CONNECT, "tunnel refused", 123,
                                         kind=FailureKind.PROXY)) == DIRECT  # fmt: skip
    assert tried(selector.attempt_failed(DIRECT, "refused", 124)) == RELAY
    restored = selector.attempt_succeeded(RELAY, 40.0, 125)
    new_path = PathRecord(TransportMethod.RELAY, "f1:22", "ap-2", 40.0)
    assert restored == [Restored("f1", new_path, fixed), ScheduleProbe(155, 1.0)]
    assert selector.last_good == RELAY
    probe_failures = [f for f in selector.failures if f.stage == "probe"]
    assert len(probe_failures) == 3


def test_a_successful_probe_resets_the_failure_count() -> None:
    selector = PathSelector("f1", [CONNECT], failures_to_degrade=2)
    selector.start(0)
    selector.attempt_succeeded(CONNECT, 1.0, 1)
    selector.probe_failed("x", 31)
    selector.probe_succeeded(1.0, 61)
    assert not any(isinstance(a, Degraded) for a in selector.probe_failed("x", 91))
    assert any(isinstance(a, Degraded) for a in selector.probe_failed("x", 121))


def test_giving_up_while_reestablishing_then_starting_over_fixes_again() -> None:
    selector = PathSelector("f1", [CONNECT], failures_to_degrade=1)
    selector.start(0)
    selector.attempt_succeeded(CONNECT, 1.0, 1)
    selector.probe_failed("gone", 31)
    give_up = only(selector.attempt_failed(CONNECT, "refused", 32), GiveUp)
    assert isinstance(give_up, GiveUp) and isinstance(give_up.diagnostic, AllMethodsFailed)
    assert selector.phase is PathPhase.FAILED
    assert tried(selector.start(40)) == CONNECT
    assert isinstance(selector.attempt_succeeded(CONNECT, 2.0, 41)[0], FixPath)


def test_no_candidates_gives_up_at_once() -> None:
    give_up = only(PathSelector("f1", []).start(0), GiveUp)
    assert isinstance(give_up, GiveUp)
    assert give_up.diagnostic.message == "f1: no path candidates to try"


def test_invalid_arguments_are_loud() -> None:
    with pytest.raises(ValueError, match="relay must name"):
        PathCandidate(TransportMethod.RELAY, "f1:22")
    with pytest.raises(ValueError, match="must be unset"):
        PathCandidate(TransportMethod.CONNECT, "f1:22", relay="ap")
    with pytest.raises(ValueError, match="overall_timeout_s"):
        PathSelector("f1", [CONNECT], overall_timeout_s=0)
    selector = PathSelector("f1", [CONNECT])
    selector.start(0)
    with pytest.raises(ValueError, match="rtt_ms"):
        selector.attempt_succeeded(CONNECT, -1.0, 1)


def test_diagnostic_serializes() -> None:
    selector = PathSelector("f1", [DIRECT], overall_timeout_s=1)
    selector.start(0)
    give_up = only(selector.tick(2), GiveUp)
    assert isinstance(give_up, GiveUp)
    data = msgspec.json.encode(give_up.diagnostic)
    assert msgspec.json.decode(data, type=PathTimeout) == give_up.diagnostic
    assert b'"methodsTried":["direct"]' in data


# --------------------------------------------------------------------------- properties

candidate_lists = st.lists(
    st.one_of(
        st.just(DIRECT),
        st.just(CONNECT),
        st.sampled_from(["ap-2", "ap-3"]).map(
            lambda ap: PathCandidate(TransportMethod.RELAY, "f1:22", relay=ap)
        ),
    ),
    max_size=4,
    unique=True,
)
kinds = st.sampled_from(list(FailureKind))
which = st.one_of(
    st.just("current"),
    st.just("current"),
    st.just("current"),
    st.sampled_from(list(TransportMethod)),
)
step = st.one_of(
    st.sampled_from([0.0, 0.1, 0.5, 1.0]),
    st.sampled_from([0.0, 0.1, 0.5, 1.0]),
    st.sampled_from([0.0, 0.1, 0.5, 1.0]),
    st.sampled_from([2.0, 6.0, 40.0, -1.0]),
)
event_names = st.sampled_from(
    ["succeed", "probe_fail", "succeed", "probe_fail", "fail", "probe_ok", "probe_fail",
     "timeout", "tick", "start", "succeed"]
)  # fmt: skip
events = st.lists(
    st.tuples(event_names, step, which, st.floats(0, 500), kinds),
    min_size=5,
    max_size=80,
).map(lambda seq: [("start", 0.0, "current", 0.0, FailureKind.OTHER), *seq])


@dataclass
class Observer:
    """Replays events into a selector and checks every returned action."""

    selector: PathSelector
    now: float = 1000.0
    clock: float = 1000.0
    """The latest time seen: the selector ignores a clock that steps back."""
    fixed: PathRecord | None = None
    round_start: float | None = None
    round_expected: list[PathCandidate] = field(default_factory=list)
    round_tried: list[PathCandidate] = field(default_factory=list)
    round_failed: int = 0
    last_try: TryMethod | None = None
    succeeded: tuple[PathCandidate, float] | None = None
    fixes: int = 0
    give_ups: int = 0

    def apply(self, event: tuple[str, float, str | TransportMethod, float, FailureKind]) -> None:
        name, dt, target_choice, rtt, kind = event
        self.now += dt
        self.clock = max(self.clock, self.now)
        s = self.selector
        current = s.current_attempt
        before_failures = len(s.failures)
        self.succeeded = None
        target = TransportMethod.DIRECT
        if isinstance(target_choice, TransportMethod):
            target = target_choice
        elif current is not None:
            target = current.method
        actions: list[PathAction]
        if name == "start":
            restartable = s.phase in (PathPhase.IDLE, PathPhase.FAILED)
            actions = s.start(self.now)
            if restartable:
                self.new_round(list(s.candidates))
        elif name == "tick":
            actions = s.tick(self.now)
        elif name == "succeed":
            actions = s.attempt_succeeded(target, rtt, self.now)
            if current is not None and current.method == target:
                self.succeeded = (current, rtt)
        elif name == "fail":
            actions = s.attempt_failed(target, "boom", self.now, kind=kind)
        elif name == "timeout":
            actions = s.attempt_timed_out(target, self.now)
        elif name == "probe_ok":
            actions = s.probe_succeeded(rtt, self.now)
        else:
            actions = s.probe_failed("probe failed", self.now, kind=kind)
        self.round_failed += sum(1 for f in s.failures[before_failures:] if f.stage == "attempt")
        for action in actions:
            self.check(action)
        self.check_state()

    def new_round(self, expected: list[PathCandidate]) -> None:
        self.round_start = self.clock
        self.round_expected = expected
        self.round_tried = []
        self.round_failed = 0

    def check(self, action: PathAction) -> None:
        s = self.selector
        if isinstance(action, TryMethod):
            assert self.round_start is not None
            # Attempts follow direct → connect → relay (or last good first, then the rest).
            self.round_tried.append(action.candidate)
            assert self.round_tried == self.round_expected[: len(self.round_tried)]
            assert action.deadline <= self.round_start + s.overall_timeout_s
            assert action.deadline <= self.clock + s.per_method_timeout_s
            assert action.reestablishing == (s.phase is PathPhase.REESTABLISHING)
            self.last_try = action
        elif isinstance(action, FixPath | Restored):
            # Never two fixed paths: the previous one was degraded (or there was none).
            assert self.fixed is None
            assert self.last_try is not None
            candidate = self.last_try.candidate
            assert (action.path.method, action.path.target, action.path.relay) == (
                candidate.method,
                candidate.target,
                candidate.relay,
            )
            # A fixed path always comes from a succeeded attempt, with its probe RTT.
            assert self.succeeded is not None
            assert self.succeeded[0] is candidate
            assert action.path.rtt_estimate_ms == self.succeeded[1]
            if isinstance(action, FixPath):
                self.fixes += 1
            self.fixed = action.path
        elif isinstance(action, Degraded):
            assert self.fixed is not None and action.path == self.fixed
            assert action.failures == s.failures_to_degrade
            self.fixed = None
            last_good = s.last_good
            assert last_good is not None
            self.now_round_after_degrade(last_good)
        elif isinstance(action, GiveUp):
            assert self.fixed is None
            assert self.round_start is not None
            self.give_ups += 1
            diagnostic: Diagnostic = action.diagnostic
            if isinstance(diagnostic, PathTimeout):
                assert self.clock >= self.round_start + s.overall_timeout_s
            else:
                assert isinstance(diagnostic, AllMethodsFailed)
                assert self.round_failed == len(self.round_expected)
                assert len(diagnostic.failures) == len(self.round_expected)
            assert set(diagnostic.methods_tried) == {c.method for c in self.round_tried}
            assert diagnostic.message.startswith("f1: ")
        elif isinstance(action, ScheduleProbe):
            assert self.fixed is not None
            assert action.at == self.clock + s.probe_interval_s

    def now_round_after_degrade(self, last_good: PathCandidate) -> None:
        rest = [c for c in self.selector.candidates if c != last_good]
        self.new_round([last_good, *rest])

    def check_state(self) -> None:
        s = self.selector
        assert (s.path is not None) == (s.phase is PathPhase.FIXED)
        assert s.path == self.fixed
        if s.phase in (PathPhase.CONNECTING, PathPhase.REESTABLISHING):
            assert s.current_attempt is not None
        else:
            assert s.current_attempt is None


@settings(max_examples=400, deadline=None)
@given(
    st.one_of(candidate_lists, candidate_lists.filter(bool), candidate_lists.filter(bool)), events
)
def test_random_event_sequences_keep_every_invariant(
    candidates: list[PathCandidate],
    sequence: list[tuple[str, float, str | TransportMethod, float, FailureKind]],
) -> None:
    observer = Observer(PathSelector("f1", candidates, per_method_timeout_s=5,
                                     overall_timeout_s=20, probe_interval_s=30))  # fmt: skip
    ranks = [METHOD_ORDER.index(c.method) for c in observer.selector.candidates]
    assert ranks == sorted(ranks)
    degraded = 0
    for item in sequence:
        observer.apply(item)
        degraded += observer.selector.phase is PathPhase.REESTABLISHING
    event(f"fixed={min(observer.fixes, 2)} gave-up={min(observer.give_ups, 2)}")
    event(f"reestablishing-seen={degraded > 0}")


@settings(max_examples=200, deadline=None)
@given(candidate_lists.filter(bool), st.data())
def test_succeeding_attempt_always_gets_fixed_in_order(
    candidates: list[PathCandidate], data: st.DataObject
) -> None:
    """Fail a random number of attempts, then succeed: the fixed path is the next candidate
    in direct → connect → relay order."""
    selector = PathSelector("f1", candidates)
    ordered = list(selector.candidates)
    failing = data.draw(st.integers(0, len(ordered) - 1))
    actions = selector.start(0)
    for n in range(failing):
        assert tried(actions) == ordered[n]
        actions = selector.attempt_failed(ordered[n], "no", n + 0.5, kind=FailureKind.REFUSED)
    assert tried(actions) == ordered[failing]
    fix = selector.attempt_succeeded(ordered[failing], 7.0, failing + 0.5)[0]
    assert isinstance(fix, FixPath)
    assert fix.path.method == ordered[failing].method
    assert fix.path.relay == ordered[failing].relay


@settings(max_examples=200, deadline=None)
@given(candidate_lists.filter(bool), st.data())
def test_reestablishing_starts_from_the_last_good_candidate(
    candidates: list[PathCandidate], data: st.DataObject
) -> None:
    selector = PathSelector("f1", candidates, failures_to_degrade=3)
    ordered = list(selector.candidates)
    winner = data.draw(st.integers(0, len(ordered) - 1))
    now = 0.0
    actions = selector.start(now)
    for n in range(winner):
        now += 1
        actions = selector.attempt_failed(ordered[n], "no", now)
    now += 1
    selector.attempt_succeeded(ordered[winner], 5.0, now)
    for _ in range(3):
        now += 30
        actions = selector.probe_failed("down", now)
    assert isinstance(actions[0], Degraded)
    expected = [ordered[winner], *(c for c in ordered if c != ordered[winner])]
    restore_at = data.draw(st.integers(0, len(expected)))  # == len: none works
    for n, candidate in enumerate(expected):
        assert tried(actions) == candidate
        now += 1
        if n == restore_at:
            restored = selector.attempt_succeeded(candidate, 9.0, now)[0]
            assert isinstance(restored, Restored)
            assert restored.path.method == candidate.method
            assert restored.previous.method == ordered[winner].method
            return
        actions = selector.attempt_failed(candidate, "still down", now)
    give_up = only(actions, GiveUp)
    assert isinstance(give_up, GiveUp)
    assert isinstance(give_up.diagnostic, AllMethodsFailed)
    assert len(give_up.diagnostic.failures) == len(expected)
