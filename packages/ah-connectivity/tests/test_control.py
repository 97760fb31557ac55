from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ah_connectivity import (
    NO_ERROR,
    AccessPointControl,
    AccessPointPhase,
    Backoff,
    CloseStream,
    FollowerAccepted,
    FollowerControl,
    FollowerPhase,
    MarkHealth,
    Reconnect,
    RttSample,
    SendMessage,
    SessionClosed,
    SessionEstablished,
)
from ah_domain_types import (
    Ack,
    ExecRequest,
    FollowerHealth,
    FollowerInfo,
    Goodbye,
    Heartbeat,
    Hello,
    StreamError,
    StreamErrorCode,
    Welcome,
)

INTERVAL = 100


def sent(actions: list[Any]) -> list[Any]:
    return [a.message for a in actions if isinstance(a, SendMessage)]


# ---------------------------------------------------------------------------------------
# AccessPointControl
# ---------------------------------------------------------------------------------------


def ap_events(make_info: Callable[[str], FollowerInfo]) -> st.SearchStrategy[Any]:
    hello = st.builds(
        lambda name, version: ("recv", Hello(info=make_info(name), protocol_version=version)),
        st.sampled_from(["alpha", "alpha", "beta"]),
        st.sampled_from([1, 1, 1, 2]),
    )
    other = st.one_of(
        st.builds(
            lambda s, t: ("recv", Heartbeat(seq=s, sent_ms=t)),
            st.integers(0, 50),
            st.integers(0, 10**6),
        ),
        st.builds(lambda s: ("recv", Ack(seq=s, sent_ms=0)), st.integers(0, 50)),
        st.just(("recv", Goodbye(reason="bye"))),
        st.just(("recv", ExecRequest(request_id="x", command=["ls"]))),
        st.just(("recv", Welcome(follower="alpha", heartbeat_interval_ms=5, server_version="x"))),
        st.just(("recv", StreamError(code=3, message="peer gave up"))),
    )
    return st.one_of(
        hello,
        other,
        st.tuples(st.just("tick"), st.integers(0, 5 * INTERVAL)),
        st.just(("lost", None)),
        st.just(("error", None)),
        st.just(("shutdown", None)),
    )


@pytest.fixture(scope="module")
def ap_event_strategy(follower_info: Callable[[str], FollowerInfo]) -> st.SearchStrategy[Any]:
    return st.lists(ap_events(follower_info), max_size=40)


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_access_point_invariants_under_random_events(
    data: st.DataObject, ap_event_strategy: st.SearchStrategy[Any]
) -> None:
    events = data.draw(ap_event_strategy)
    now = 1_000
    sm = AccessPointControl(
        "alpha", now, heartbeat_interval_ms=INTERVAL, hello_timeout_ms=10 * INTERVAL
    )
    reported: list[FollowerHealth] = []
    accepted = 0
    for kind, value in events:
        phase_before = sm.phase
        if kind == "recv":
            actions: list[Any] = sm.receive(value, now)
        elif kind == "tick":
            now += value
            actions = sm.tick(now)
        elif kind == "lost":
            actions = sm.connection_lost("gone", now)
        elif kind == "error":
            actions = sm.protocol_error(StreamErrorCode.MALFORMED_FRAME, "bad frame", now)
        else:
            actions = sm.shutdown("restart", now)

        if phase_before is AccessPointPhase.CLOSED:
            assert actions == []  # nothing ever happens after close
            continue
        for action in actions:
            if isinstance(action, SendMessage) and isinstance(action.message, Ack):
                # No Ack without the Heartbeat it answers.
                assert kind == "recv" and isinstance(value, Heartbeat)
                assert (action.message.seq, action.message.sent_ms) == (value.seq, value.sent_ms)
            if isinstance(action, FollowerAccepted):
                accepted += 1
                assert isinstance(value, Hello) and value.info.name == "alpha"
            if isinstance(action, MarkHealth):
                assert not reported or reported[-1] is not action.health, "health reported twice"
                assert action.health is sm.health(now)
                reported.append(action.health)
        if (
            kind == "recv"
            and isinstance(value, Hello)
            and phase_before is AccessPointPhase.AWAITING_HELLO
            and value.info.name != "alpha"
        ):
            # A name mismatch is always refused.
            assert sm.phase is AccessPointPhase.CLOSED
            closes = [a for a in actions if isinstance(a, CloseStream)]
            assert closes and closes[0].code == StreamErrorCode.UNEXPECTED_MESSAGE
            assert "name mismatch" in closes[0].reason
            errors = [m for m in sent(actions) if isinstance(m, StreamError)]
            assert errors and "name mismatch" in errors[0].message
        if sm.phase is AccessPointPhase.CLOSED:
            assert sm.health(now) is FollowerHealth.OFFLINE
            assert any(isinstance(a, SessionClosed) for a in actions)
        elif sm.phase is AccessPointPhase.CONNECTED:
            assert sm.last_heartbeat_ms is not None
            expected = (
                FollowerHealth.HEALTHY
                if now - sm.last_heartbeat_ms <= 3 * INTERVAL
                else FollowerHealth.UNHEALTHY
            )
            assert sm.health(now) is expected
    assert accepted <= 1
    if reported and sm.phase is AccessPointPhase.CLOSED:
        assert reported[-1] is FollowerHealth.OFFLINE


def test_access_point_happy_path_and_health(follower_info: Callable[[str], FollowerInfo]) -> None:
    sm = AccessPointControl("alpha", 0, heartbeat_interval_ms=INTERVAL, server_version="9.9")
    assert sm.health(0) is FollowerHealth.OFFLINE
    actions = sm.receive(Hello(info=follower_info("alpha"), protocol_version=1), 10)
    assert sent(actions) == [
        Welcome(follower="alpha", heartbeat_interval_ms=INTERVAL, server_version="9.9")
    ]
    assert FollowerAccepted(follower_info("alpha")) in actions
    assert MarkHealth(FollowerHealth.HEALTHY) in actions
    assert sent(sm.receive(Heartbeat(seq=1, sent_ms=77), 50)) == [Ack(seq=1, sent_ms=77)]
    assert sm.tick(50 + 3 * INTERVAL) == []  # exactly 3 intervals: still healthy
    assert sm.tick(51 + 3 * INTERVAL) == [MarkHealth(FollowerHealth.UNHEALTHY)]
    assert sm.tick(10_000) == []
    back = sm.receive(Heartbeat(seq=2, sent_ms=1), 10_001)
    assert MarkHealth(FollowerHealth.HEALTHY) in back
    bye = sm.receive(Goodbye(reason="maintenance"), 10_002)
    assert CloseStream(NO_ERROR, "follower 'alpha' said goodbye: maintenance") in bye
    assert SessionClosed(graceful=True, reason="follower 'alpha' said goodbye: maintenance") in bye
    assert sm.health(10_003) is FollowerHealth.OFFLINE


def test_access_point_refuses_non_hello_first_and_silence() -> None:
    sm = AccessPointControl("alpha", 0)
    actions = sm.receive(Heartbeat(seq=1, sent_ms=0), 1)
    assert sent(actions)[0] == StreamError(
        code=StreamErrorCode.UNEXPECTED_MESSAGE,
        message="expected Hello as the first control message from 'alpha', got Heartbeat",
    )
    silent = AccessPointControl("alpha", 0, hello_timeout_ms=500)
    assert silent.next_timer_ms() == 500
    assert silent.tick(499) == []
    assert any(isinstance(a, CloseStream) for a in silent.tick(500))


def test_access_point_refuses_other_protocol_versions(
    follower_info: Callable[[str], FollowerInfo],
) -> None:
    sm = AccessPointControl("alpha", 0)
    actions = sm.receive(Hello(info=follower_info("alpha"), protocol_version=99), 1)
    assert "speaks control protocol 99" in sent(actions)[0].message
    assert not any(isinstance(a, FollowerAccepted) for a in actions)


# ---------------------------------------------------------------------------------------
# FollowerControl
# ---------------------------------------------------------------------------------------


follower_events = st.one_of(
    st.tuples(st.just("tick"), st.integers(0, 4 * INTERVAL)),
    st.tuples(st.just("ack"), st.integers(-2, 3)),  # relative to the last heartbeat seq
    st.just(("welcome", "alpha")),
    st.just(("welcome", "beta")),
    st.just(("recv", Goodbye(reason="restart"))),
    st.just(("recv", StreamError(code=1, message="bad"))),
    st.just(("recv", Heartbeat(seq=1, sent_ms=0))),
    st.just(("lost", None)),
    st.just(("error", None)),
    st.just(("shutdown", None)),
)


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_follower_invariants_under_random_events(
    data: st.DataObject, follower_info: Callable[[str], FollowerInfo]
) -> None:
    events = data.draw(st.lists(follower_events, max_size=40))
    sm = FollowerControl(follower_info("alpha"))
    now = 0
    first = sm.start(now)
    assert sent(first) == [Hello(info=follower_info("alpha"), protocol_version=1)]
    heartbeats: dict[int, int] = {}
    reconnects = 0
    last_ack = 0
    for kind, value in events:
        phase_before = sm.phase
        if kind == "tick":
            now += value
            actions: list[Any] = sm.tick(now)
        elif kind == "ack":
            seq = max(sm.last_heartbeat_seq + value, 0)
            actions = sm.receive(Ack(seq=seq, sent_ms=0), now)
        elif kind == "welcome":
            actions = sm.receive(
                Welcome(follower=value, heartbeat_interval_ms=INTERVAL, server_version="1"), now
            )
        elif kind == "recv":
            actions = sm.receive(value, now)
        elif kind == "lost":
            actions = sm.connection_lost("gone")
        elif kind == "error":
            actions = sm.protocol_error(StreamErrorCode.MALFORMED_FRAME, "bad frame")
        else:
            actions = sm.shutdown("bye")

        if phase_before is FollowerPhase.CLOSED:
            assert actions == []
            continue
        for action in actions:
            if isinstance(action, SendMessage) and isinstance(action.message, Heartbeat):
                assert phase_before is FollowerPhase.CONNECTED
                assert action.message.seq == len(heartbeats) + 1  # 1, 2, 3, ... no gaps
                heartbeats[action.message.seq] = now
            if isinstance(action, RttSample):
                assert action.seq in heartbeats and action.rtt_ms == now - heartbeats[action.seq]
                last_ack = now
            if isinstance(action, SessionEstablished):
                assert action.welcome.follower == "alpha"
                last_ack = now
            if isinstance(action, Reconnect):
                reconnects += 1
        if (
            kind == "tick"
            and phase_before is FollowerPhase.CONNECTED
            and now - last_ack >= 3 * INTERVAL
        ):
            assert any(isinstance(a, Reconnect) for a in actions), (
                "missed acks must force a reconnect"
            )
        if kind == "shutdown" and phase_before is not FollowerPhase.IDLE:
            assert isinstance(sent(actions)[0], Goodbye)
            assert not any(isinstance(a, Reconnect) for a in actions)
    assert reconnects <= 1


def test_follower_heartbeat_cadence_rtt_and_reconnect(
    follower_info: Callable[[str], FollowerInfo],
) -> None:
    sm = FollowerControl(follower_info("alpha"))
    sm.start(0)
    assert sm.next_timer_ms() == 10_000  # welcome timeout
    assert sm.receive(
        Welcome(follower="alpha", heartbeat_interval_ms=INTERVAL, server_version="1"), 5
    ) == [
        SessionEstablished(
            Welcome(follower="alpha", heartbeat_interval_ms=INTERVAL, server_version="1")
        )
    ]
    assert sent(sm.tick(5)) == [Heartbeat(seq=1, sent_ms=5)]
    assert sm.receive(Ack(seq=1, sent_ms=5), 12) == [RttSample(seq=1, rtt_ms=7)]
    assert sm.tick(104) == []  # not due yet
    assert sm.next_timer_ms() == 105
    assert sent(sm.tick(105)) == [Heartbeat(seq=2, sent_ms=105)]
    assert sent(sm.tick(205)) == [Heartbeat(seq=3, sent_ms=205)]
    # The last Ack was at 12: at 12 + 3 intervals the follower gives up.
    actions = sm.tick(312)
    assert any(isinstance(a, Reconnect) for a in actions)
    assert sm.phase is FollowerPhase.CLOSED


def test_follower_refuses_an_ack_for_a_heartbeat_never_sent(
    follower_info: Callable[[str], FollowerInfo],
) -> None:
    sm = FollowerControl(follower_info("alpha"))
    sm.start(0)
    sm.receive(Welcome(follower="alpha", heartbeat_interval_ms=INTERVAL, server_version="1"), 0)
    actions = sm.receive(Ack(seq=5, sent_ms=0), 1)
    assert sent(actions)[0].code == StreamErrorCode.UNEXPECTED_MESSAGE
    assert any(isinstance(a, Reconnect) for a in actions)


def test_follower_and_access_point_talk_to_each_other(
    follower_info: Callable[[str], FollowerInfo],
) -> None:
    """Both machines wired back to back on a simulated clock, with lossy phases."""
    fol = FollowerControl(follower_info("alpha"))
    ap = AccessPointControl("alpha", 0, heartbeat_interval_ms=INTERVAL)
    health: list[FollowerHealth] = []

    def deliver_to_ap(actions: list[Any], now: int, drop: bool = False) -> None:
        for msg in sent(actions):
            if drop:
                continue
            replies = ap.receive(msg, now)
            health.extend(a.health for a in replies if isinstance(a, MarkHealth))
            for reply in sent(replies):
                fol.receive(reply, now + 1)

    deliver_to_ap(fol.start(0), 0)
    assert fol.phase is FollowerPhase.CONNECTED and ap.phase is AccessPointPhase.CONNECTED
    for now in range(1, 1000, 10):
        deliver_to_ap(fol.tick(now), now)
        health.extend(a.health for a in ap.tick(now) if isinstance(a, MarkHealth))
    assert fol.rtt_ms == 1 and health == [FollowerHealth.HEALTHY]
    # Heartbeats lost on the way: the access point marks the follower unhealthy, and the
    # follower, missing its acks, decides to reconnect.
    reconnect_at = None
    for now in range(1000, 2000, 10):
        actions = fol.tick(now)
        if any(isinstance(a, Reconnect) for a in actions):
            reconnect_at = now
            break
        deliver_to_ap(actions, now, drop=True)
        health.extend(a.health for a in ap.tick(now) if isinstance(a, MarkHealth))
    assert (
        reconnect_at is not None and 1000 + 2 * INTERVAL <= reconnect_at <= 1000 + 3 * INTERVAL + 10
    )
    # Suppose the connection lingers: the access point soon sees the silence too.
    for now in range(reconnect_at, reconnect_at + 2 * INTERVAL, 10):
        health.extend(a.health for a in ap.tick(now) if isinstance(a, MarkHealth))
    assert health == [FollowerHealth.HEALTHY, FollowerHealth.UNHEALTHY]
    ap_actions = ap.connection_lost("gone", reconnect_at + 2 * INTERVAL)
    assert MarkHealth(FollowerHealth.OFFLINE) in ap_actions


# ---------------------------------------------------------------------------------------
# Backoff
# ---------------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(
    base=st.floats(0.01, 2.0),
    cap_factor=st.floats(1.0, 100.0),
    seed=st.integers(0, 2**32),
    n=st.integers(1, 80),
)
def test_backoff_stays_within_full_jitter_bounds(
    base: float, cap_factor: float, seed: int, n: int
) -> None:
    cap = base * cap_factor
    backoff = Backoff(base_s=base, cap_s=cap, rng=random.Random(seed))
    for attempt in range(n):
        delay = backoff.next_delay()
        assert 0.0 <= delay <= min(cap, base * 2.0**attempt) + 1e-9
    assert backoff.attempts == n
    backoff.reset()
    assert backoff.attempts == 0
    assert backoff.next_delay() <= base


def test_backoff_is_reproducible_with_a_seed_and_grows_to_the_cap() -> None:
    a = [Backoff(rng=random.Random(7)).next_delay() for _ in range(3)]
    b = [Backoff(rng=random.Random(7)).next_delay() for _ in range(3)]
    assert a == b
    backoff = Backoff(rng=random.Random(1))
    assert [backoff.ceiling(i) for i in range(8)] == [0.2, 0.4, 0.8, 1.6, 3.2, 6.4, 10.0, 10.0]
    assert backoff.ceiling(10_000) == 10.0  # no float overflow
    delays = [backoff.next_delay() for _ in range(200)]
    assert max(delays) <= 10.0 and max(delays[10:]) > 5.0  # jitter spreads over the whole range
    with pytest.raises(ValueError, match="base_s"):
        Backoff(base_s=0)
