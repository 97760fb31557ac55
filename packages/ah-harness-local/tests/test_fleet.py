"""`LocalFleet` through its factory fixture: a simulated cross-OS fleet, then full teardown."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ah_harness_local.fleet import FollowerSpec


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat[stat.rfind(")") + 2] not in ("Z", "X")


def test_cross_os_fleet_answers_per_exec_mode_and_tears_down(local_fleet_factory: Any) -> None:
    fleet = local_fleet_factory(
        [
            FollowerSpec("win-1", {"pool": "w"}, os="windows", exec_mode="noop"),
            FollowerSpec("mac-1", {"pool": "m"}, os="macos", exec_mode="real"),
        ]
    )
    assert fleet.startup_seconds is not None and fleet.startup_seconds > 0
    listed = {f["info"]["name"]: f["info"] for f in fleet.list_followers()}
    assert {n: i["os"] for n, i in listed.items()} == {"win-1": "windows", "mac-1": "macos"}
    assert [f["info"]["name"] for f in fleet.list_followers(["os=macos"])] == ["mac-1"]
    assert fleet.follower("win-1").settings().tags == {"pool": "w"}

    results = fleet.exec_mock(["win-1", "mac-1"], ["build.ps1"])
    assert (results["win-1"]["state"], results["win-1"]["stdout"]) == ("ok", "")
    assert results["mac-1"]["state"] == "failed"
    assert "run over SSH" in results["mac-1"]["error"]

    before = fleet.list_followers(["os=windows"])[0]["connectedSinceMs"]
    fleet.follower("win-1").restart()
    fleet.wait_health({"win-1": "healthy", "mac-1": "healthy"})
    assert fleet.list_followers(["os=windows"])[0]["connectedSinceMs"] > before

    pids = [p.pid for p in fleet.group.processes]
    assert len(pids) >= 5  # access point, 2 sshd, 2 followers (+ the restarted one)
    fleet.close()
    assert not any(_alive(pid) for pid in pids), "every fleet process is gone after close()"
