"""Followers dying, leaving and coming back; the access point restarting under them.

Heartbeats every 200 ms: unhealthy after 3 missed (600 ms), disconnected after 6 (1.2 s).
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from ah_harness_local.fleet import FollowerSpec, LocalFleet

HEARTBEAT_S = 0.2


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFleet]:
    specs = [
        FollowerSpec("life-1", {"role": "x"}),
        FollowerSpec("life-2", {"role": "y"}, mock_exit_code=3),
        FollowerSpec("life-3", {"role": "z"}),
    ]
    with LocalFleet(specs, base_dir=tmp_path_factory.mktemp("lifecycle")) as running:
        yield running


ALL_HEALTHY = {"life-1": "healthy", "life-2": "healthy", "life-3": "healthy"}


def test_a_failing_follower_makes_its_host_failed(fleet: LocalFleet) -> None:
    results = fleet.exec_mock(["life-1", "life-2", "life-3"], ["pytest", "-q"])
    assert [r["state"] for r in results.values()] == ["ok", "failed", "ok"]
    assert results["life-2"]["exitCode"] == 3
    assert results["life-2"]["error"] == "exit code 3"
    assert results["life-2"]["stdout"] == "mock exec on life-2: pytest -q\n"


def test_a_stalled_follower_times_out_without_holding_up_the_others(fleet: LocalFleet) -> None:
    fleet.wait_health(ALL_HEALTHY)
    stalled = fleet.follower("life-1")
    stalled.pause()
    try:
        started = time.monotonic()
        results = fleet.exec_mock(["life-1", "life-3"], ["sleep", "1"], timeout_ms=400)
        took = time.monotonic() - started
    finally:
        stalled.resume()
    assert results["life-1"]["state"] == "timeout", results["life-1"]
    assert "within 0.4 s" in results["life-1"]["error"]
    assert results["life-3"]["state"] == "ok"
    assert took < 5.0
    fleet.wait_health(ALL_HEALTHY, timeout=20)


def test_a_killed_follower_turns_unhealthy_then_offline(fleet: LocalFleet) -> None:
    fleet.wait_health(ALL_HEALTHY)
    seen: list[str] = []
    killed = time.monotonic()
    fleet.follower("life-3").kill()

    def record(health: dict[str, str]) -> bool:
        state = health.get("life-3", "?")
        if not seen or seen[-1] != state:
            seen.append(state)
        return state == "offline"

    fleet.wait_until(record, timeout=10, what="life-3 offline")
    took = time.monotonic() - killed
    assert seen[-2:] == ["unhealthy", "offline"], seen
    assert took < 6 * HEARTBEAT_S + 2.0, f"offline only after {took:.2f}s"
    # An offline host is a result, not an error.
    result = fleet.exec_mock(["life-1", "life-3"], ["true"])
    assert result["life-1"]["state"] == "ok"
    assert result["life-3"]["state"] == "unreachable" and result["life-3"]["exitCode"] is None
    assert "not connected" in result["life-3"]["error"]
    assert "disconnecting silent follower 'life-3'" in fleet.access_point.stderr_text()

    fleet.follower("life-3").restart()
    fleet.wait_health(ALL_HEALTHY)


def test_sigterm_sends_goodbye_and_the_follower_is_offline_at_once(fleet: LocalFleet) -> None:
    fleet.wait_health(ALL_HEALTHY)
    follower = fleet.follower("life-1")
    stopped = time.monotonic()
    assert follower.terminate() == 0
    fleet.wait_health({"life-1": "offline"}, timeout=5)
    # Offline well before silence alone could have made it even unhealthy (3 intervals).
    assert time.monotonic() - stopped < 3 * HEARTBEAT_S + 1.0
    assert "follower 'life-1' said goodbye" in fleet.access_point.stderr_text()
    assert "saying goodbye" in follower.log_text()
    follower.restart()
    fleet.wait_health(ALL_HEALTHY)


def test_access_point_restart_followers_reconnect_by_themselves(fleet: LocalFleet) -> None:
    fleet.wait_health(ALL_HEALTHY)
    ports = (fleet.quic_port, fleet.api_port)
    paused = fleet.follower("life-2")
    paused.pause()  # cannot reconnect until resumed: shows the registry's offline entry
    try:
        assert fleet.restart_access_point() == 0
        assert (fleet.quic_port, fleet.api_port) == ports, "serve again on the same ports"
        listed = {f["info"]["name"]: f for f in fleet.list_followers()}
        assert set(ALL_HEALTHY) <= set(listed), "the registry survived the restart"
        assert listed["life-2"]["info"]["tags"] == {"role": "y"}
        fleet.wait_health({"life-1": "healthy", "life-3": "healthy"}, timeout=20)
        assert fleet.health()["life-2"] == "offline"
    finally:
        paused.resume()
    fleet.wait_health(ALL_HEALTHY, timeout=20)
    results = fleet.exec_mock(list(ALL_HEALTHY), ["echo", "back"])
    assert [r["state"] for r in results.values()] == ["ok", "failed", "ok"]
