"""A fenced run on three real followers, read back from the access point: its session event
timeline is in a possible order (`ah_harness_local.timeline`), for a passing and a failing host."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from ah_harness_local.timeline import assert_run_timeline

if TYPE_CHECKING:
    from conftest import FleetCli

LINUX = ["lin-a", "lin-b", "lin-c"]


def test_a_fenced_three_follower_run_has_an_ordered_timeline_on_the_access_point(
    dataplane_fleet: FleetCli,
) -> None:
    cli = dataplane_fleet
    # lin-b fails (its workspace path names it): its exit and the summary must say so, in order.
    script = 'echo "in $PWD"; case "$PWD" in */lin-b/*) exit 3;; esac'
    result = cli("run", "--json", "--tag", "os=linux", "--", "sh", "-c", script)
    assert result.returncode == 1, result
    session = result.json()["sessionId"]
    read = cli("--json", "session", "events", session)
    assert read.returncode == 0, read
    events = [json.loads(line) for line in read.stdout.splitlines()]
    assert_run_timeline(events, LINUX)
    exits = {e["host"]: e["result"] for e in events if e["type"] == "hostExited"}
    assert {h: (r["state"], r["exitCode"]) for h, r in exits.items()} == {
        "lin-a": ("ok", 0), "lin-b": ("failed", 3), "lin-c": ("ok", 0),
    }  # fmt: skip
    logs = [e for e in events if e["type"] == "hostLog"]
    assert sorted(e["host"] for e in logs) == LINUX
    assert all(e["line"].startswith("in ") and f"/{e['host']}/" in e["line"] for e in logs), logs
