"""The leader agent keeps warnings that came after a thin run's CLI was gone, for the next
thin run (``LeaderAgent.keep_late_warning`` / ``take_late_warnings``); the end-to-end case,
a real access point refusing a run's session events, is in tests/test_run_thin_agent.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

from ah_fleetctl.agent import _MAX_LATE_WARNINGS, LeaderAgent


def _agent(tmp_path: Path) -> LeaderAgent:
    # Keeping and taking warnings touches neither the configuration nor the network.
    return LeaderAgent(cast(Any, None), tmp_path / "agent.sock", idle_s=60.0)


def test_warnings_are_shown_once_in_order_and_without_a_doubled_prefix(tmp_path: Path) -> None:
    agent = _agent(tmp_path)
    agent.keep_late_warning("warning: the access point refused the session events (403)\n")
    agent.keep_late_warning("3 of 5 events of session s-1 did not reach the access point")
    assert agent.take_late_warnings() == [
        "warning: after an earlier run answered: the access point refused the session "
        "events (403)\n",
        "warning: after an earlier run answered: 3 of 5 events of session s-1 did not reach "
        "the access point\n",
    ]
    assert agent.take_late_warnings() == []


def test_beyond_the_bound_the_oldest_are_counted_and_the_log_named(tmp_path: Path) -> None:
    agent = _agent(tmp_path)
    extra = 7
    for i in range(_MAX_LATE_WARNINGS + extra):
        agent.keep_late_warning(f"warning: number {i}")
    lines = agent.take_late_warnings()
    assert len(lines) == _MAX_LATE_WARNINGS + 1
    assert lines[0].endswith(f"number {extra}\n") and lines[-2].endswith(
        f"number {_MAX_LATE_WARNINGS + extra - 1}\n"
    )
    assert lines[-1] == (
        f"warning: {extra} more such warning(s) are only in the agent's log "
        f"{tmp_path / 'agent.log'}\n"
    )
    assert agent.take_late_warnings() == []
