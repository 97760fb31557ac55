"""Three real followers with different tags, seen through the access point's REST API."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ah_config import load_config


def test_followers_are_listed_with_tags_health_and_facts(local_fleet: Any) -> None:
    fleet = local_fleet
    fleet.wait_health({"lin-a": "healthy", "lin-b": "healthy", "lin-c": "healthy"})
    listed = {f["info"]["name"]: f for f in fleet.list_followers()}
    assert {"lin-a", "lin-b", "lin-c"} <= set(listed)
    now_ms = time.time() * 1000
    for name, role in (("lin-a", "a"), ("lin-b", "b"), ("lin-c", "c")):
        status, info = listed[name], listed[name]["info"]
        sshd = fleet.follower(name).sshd
        assert status["health"] == "healthy", status
        assert info["tags"] == {"role": role}
        assert info["os"] == "linux" and info["arch"]
        assert info["hostKeyFingerprint"] == sshd.host_key_fingerprint
        assert info["directAddress"] == f"127.0.0.1:{sshd.port}"
        assert info["workspace"] == str(fleet.follower(name).workspace)
        assert abs(status["lastHeartbeatMs"] - now_ms) < 60_000
        assert status["connectedSinceMs"] <= status["lastHeartbeatMs"]


def test_tag_filters_select_followers(local_fleet: Any) -> None:
    fleet = local_fleet

    def names(*tags: str) -> list[str]:
        return [f["info"]["name"] for f in fleet.list_followers(tags)]

    assert names("role=b") == ["lin-b"]
    assert names("os=linux", "role=c") == ["lin-c"]
    assert names("role=a", "role=b") == []
    assert {"lin-a", "lin-b", "lin-c"} <= set(names("os=linux"))
    status, problem = fleet.api("GET", "/followers?tag=novalue")
    assert status == 400 and problem["type"] == "urn:ah:problem:bad-tag"


def test_exec_mock_on_three_followers_gives_three_distinct_answers(local_fleet: Any) -> None:
    results = local_fleet.exec_mock(["lin-a", "lin-b", "lin-c"], ["make", "check", "-j 4"])
    assert list(results) == ["lin-a", "lin-b", "lin-c"]
    for name, result in results.items():
        assert result["state"] == "ok" and result["exitCode"] == 0, result
        assert result["stdout"] == f"mock exec on {name}: make check '-j 4'\n"
        assert result["error"] is None
    assert len({r["stdout"] for r in results.values()}) == 3


def test_env_points_ah_fleetctl_at_the_fleet(local_fleet: Any) -> None:
    config = load_config(env=local_fleet.env(), cwd=local_fleet.base_dir).typed
    assert config.remote_server == local_fleet.api_url
    assert config.token == local_fleet.user_token
    assert config.ca_file == str(local_fleet.ca_path)


def test_many_execs_in_flight_share_the_control_connections_and_lose_nothing(
    local_fleet: Any,
) -> None:
    """M3 concurrency: 24 exec requests at once, each fanned out to three followers over their
    one QUIC connection each; every answer belongs to its own request and none is lost."""
    hosts = ["lin-a", "lin-b", "lin-c"]
    with ThreadPoolExecutor(max_workers=24) as pool:
        futures = {n: pool.submit(local_fleet.exec_mock, hosts, ["job", str(n)]) for n in range(24)}
        answers = {n: f.result(timeout=60) for n, f in futures.items()}
    for n, results in answers.items():
        assert list(results) == hosts
        for name, result in results.items():
            assert result["state"] == "ok", result
            assert result["stdout"] == f"mock exec on {name}: job {n}\n"
