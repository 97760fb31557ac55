"""``ah-fleetctl run`` through the leader agent on the thin path (``ah_fleetctl.thin``).

A private fleet (three Linux followers, plus ``th-bad`` whose sshd presents a host key other
than the one it reported, so no path to it can be verified), the real console script, a
real leader agent started by the first ``run`` in a private runtime directory. The thin
path is recognised by what the process imported (``python -X importtime``): no click, no
msgspec, no paramiko.
"""

from __future__ import annotations

import json
import marshal
import os
import re
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ah_fleetctl.agent_proto import PongReply
from ah_harness_local import wait_for
from ah_harness_local.agent_fleet import (
    HEAVY_MODULES,
    AgentFleet,
    pid_alive,
)

GOOD = ["th-a", "th-b", "th-c"]


@pytest.fixture(scope="module")
def thin_fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentFleet]:
    from ah_harness_local.fleet import FollowerSpec, LocalFleet
    from ah_harness_local.sshd import _generate_key

    base = tmp_path_factory.mktemp("thin")
    other_key = base / "other-host-key"
    _generate_key(other_key, "not the sshd's host key")
    specs = [FollowerSpec(name) for name in GOOD] + [
        FollowerSpec("th-bad", run_args=("--ssh-host-key-file", f"{other_key}.pub"))
    ]
    with LocalFleet(specs, base_dir=base / "fleet", heartbeat_interval="1s") as fleet:
        work = base / "leader"
        work.mkdir()
        with AgentFleet.running(fleet, work, base / "home") as thin:
            yield thin


def _warm(thin: AgentFleet) -> None:
    """A full run through the agent (starting it if needed): records the thin index."""
    result, _ = thin.cli("run", "--no-fence", "--json", *_hosts(GOOD), "--", "true")
    assert result.returncode == 0, result


def _hosts(names: list[str]) -> list[str]:
    return [arg for name in names for arg in ("--host", name)]


def test_a_warm_run_takes_the_thin_path_and_prints_what_the_full_cli_prints(
    thin_fleet: AgentFleet,
) -> None:
    thin = thin_fleet
    _warm(thin)
    result, modules = thin.cli(
        "run", "--no-fence", *_hosts(GOOD), "--", "sh", "-c", "pwd; echo to-stderr >&2",
        importtime=True,
    )  # fmt: skip
    assert result.returncode == 0, result
    assert not HEAVY_MODULES & modules, f"the warm run imported {HEAVY_MODULES & modules}"
    lines = result.stdout.splitlines()
    for name in GOOD:
        assert f"{name} | {thin.workspace(name)}" in lines, result
        assert f"{name} | to-stderr" in lines, result
    assert lines[-1] == "3 succeeded, 0 failed, 0 unreachable", result
    run_dir = re.search(r"^logs: (\S+)$", result.stderr, re.MULTILINE)
    assert run_dir is not None, result
    logs = {p.name: p.read_text() for p in Path(run_dir.group(1)).iterdir()}
    assert sorted(logs) == [f"{n}.log" for n in GOOD]
    assert f"out | {thin.workspace('th-a')}\n" in logs["th-a.log"]
    assert "err | to-stderr\n" in logs["th-a.log"]

    # --json: one envelope, as from the full CLI.
    document, modules = thin.cli("run", "--no-fence", "--json", *_hosts(GOOD), "--", "true",
                                 importtime=True)  # fmt: skip
    assert document.returncode == 0, document
    assert not HEAVY_MODULES & modules
    envelope = document.json()
    assert [h["host"] for h in envelope["hosts"]] == GOOD
    assert envelope["summary"]["succeeded"] == 3
    assert re.fullmatch(r"s-\d{8}T\d{6}Z-[0-9a-f]{6}", envelope["sessionId"])


def test_a_failing_host_fails_the_thin_run_with_every_result_kept(thin_fleet: AgentFleet) -> None:
    thin = thin_fleet
    _warm(thin)
    marker = thin.workspace("th-b") / "only-on-th-b"
    marker.write_text("x")
    try:
        result, modules = thin.cli(
            "run", "--no-fence", "--json", *_hosts(GOOD), "--",
            "sh", "-c", "if [ -e only-on-th-b ]; then echo bad; exit 4; fi; echo fine",
            importtime=True,
        )  # fmt: skip
    finally:
        marker.unlink()
    assert not HEAVY_MODULES & modules
    assert result.returncode == 1, result
    hosts = {h["host"]: h for h in result.json()["hosts"]}
    assert {n: (h["state"], h["exitCode"]) for n, h in hosts.items()} == {
        "th-a": ("ok", 0),
        "th-b": ("failed", 4),
        "th-c": ("ok", 0),
    }
    assert result.json()["summary"]["failed"] == 1


def test_an_unreachable_host_is_reported_and_fails_the_thin_run(thin_fleet: AgentFleet) -> None:
    thin = thin_fleet
    _warm(thin)
    result, modules = thin.cli(
        "run", "--no-fence", *_hosts(["th-a", "th-bad"]), "--", "echo", "hi", importtime=True
    )
    assert not HEAVY_MODULES & modules
    assert result.returncode == 1, result
    lines = result.stdout.splitlines()
    assert "th-a   | hi" in lines, result
    assert re.search(r"^th-bad\s+unreachable\s+.*", result.stdout, re.MULTILINE), result
    assert lines[-1] == "1 succeeded, 0 failed, 1 unreachable", result


def test_selection_errors_and_usage_errors_are_reported_as_by_the_full_cli(
    thin_fleet: AgentFleet,
) -> None:
    thin = thin_fleet
    _warm(thin)
    unknown, modules = thin.cli("run", "--no-fence", "--host", "nope", "--", "true",
                                importtime=True)  # fmt: skip
    assert not HEAVY_MODULES & modules
    assert unknown.returncode == 7, unknown
    assert "Error: unknown host 'nope'" in unknown.stderr
    # A usage error is handed back to the full CLI (click's own message, exit 2).
    usage, modules = thin.cli("run", "--no-fence", "--timeout", "soon", "--", "true",
                              importtime=True)  # fmt: skip
    assert usage.returncode == 2, usage
    assert "Invalid value for '--timeout'" in usage.stderr
    assert "click" in modules
    # So is a configuration flag: it may point at another access point or agent.
    flagged, modules = thin.cli("run", "--no-fence", "--log-level", "warn", "--host", "th-a",
                                "--", "true", importtime=True)  # fmt: skip
    assert flagged.returncode == 0, flagged
    assert "click" in modules


def test_a_changed_config_file_misses_the_index_until_a_full_run_records_it_again(
    thin_fleet: AgentFleet,
) -> None:
    thin = thin_fleet
    _warm(thin)
    config = Path(thin.env["AH_HOME"]) / "config.toml"
    config.write_text(config.read_text() + "\n# touched by the test\n")
    full, modules = thin.cli("run", "--no-fence", "--host", "th-a", "--", "true",
                             importtime=True)  # fmt: skip
    assert full.returncode == 0, full
    assert "click" in modules, "a stale index entry was used"
    again, modules = thin.cli("run", "--no-fence", "--host", "th-a", "--", "true",
                              importtime=True)  # fmt: skip
    assert again.returncode == 0, again
    assert not HEAVY_MODULES & modules


def test_a_dead_agent_and_its_stale_socket_fall_back_to_the_full_cli(
    thin_fleet: AgentFleet,
) -> None:
    thin = thin_fleet
    _warm(thin)
    (pid,) = thin.agent_pids()
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not pid_alive(pid), 15.0, what="the agent to die")
    assert list(thin.agents.glob("*.sock")), "the stale socket should still be there"
    result, modules = thin.cli("run", "--no-fence", *_hosts(GOOD), "--", "echo", "again",
                               importtime=True)  # fmt: skip
    assert result.returncode == 0, result
    assert "click" in modules  # the full CLI ran...
    for name in GOOD:
        assert f"{name} | again" in result.stdout.splitlines()
    (new_pid,) = thin.agent_pids()  # ...and started a new agent
    assert new_pid != pid
    after, modules = thin.cli("run", "--no-fence", *_hosts(GOOD), "--", "true", importtime=True)
    assert after.returncode == 0 and not HEAVY_MODULES & modules, after


def test_the_agent_dying_mid_run_fails_the_thin_run_loudly(thin_fleet: AgentFleet) -> None:
    thin = thin_fleet
    _warm(thin)
    (pid,) = thin.agent_pids()
    running = thin.popen("run", "--no-fence", "--host", "th-a", "--", "sh", "-c",
                         "echo started; sleep 3")  # fmt: skip
    try:
        running.wait_for_lines(lambda lines: "th-a | started" in lines, "start")
        os.kill(pid, signal.SIGKILL)
        code, _, stderr = running.wait(timeout=30)
    finally:
        running.stop()
    assert code == 1, stderr
    assert "the leader agent at" in stderr and "went away during the run" in stderr, stderr
    _warm(thin)  # leaves a live agent for the next test


def test_ctrl_c_cancels_the_thin_run_and_still_prints_the_summary(thin_fleet: AgentFleet) -> None:
    thin = thin_fleet
    _warm(thin)
    tag = f"4{os.getpid() % 1000}.75"  # a sleep only this test starts
    running = thin.popen("run", "--no-fence", *_hosts(["th-a", "th-b"]), "--", "sh", "-c",
                         f"echo started; sleep {tag}")  # fmt: skip
    try:
        running.wait_for_lines(
            lambda lines: {"th-a | started", "th-b | started"} <= set(lines), "both starts"
        )
        wait_for(lambda: len(_sleepers(tag)) == 2, 10, what="both remote sleeps")
        running.proc.send_signal(signal.SIGINT)
        code, lines, stderr = running.wait(timeout=30)
    finally:
        running.stop()
    assert code == 130, (lines, stderr)
    assert lines[-1] == "0 succeeded, 0 failed, 0 unreachable, 2 cancelled", lines
    wait_for(lambda: not _sleepers(tag), 10, what="the remote sleeps to be gone")


def _sleepers(tag: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(b"sleep") and tag.encode() in argv:
            found.append(int(entry.name))
    return found


def test_the_thin_index_is_private_and_names_the_agent(thin_fleet: AgentFleet) -> None:
    thin = thin_fleet
    _warm(thin)
    index = thin.runtime / "agent-harbor" / "thin"
    assert (index.stat().st_mode & 0o777) == 0o700
    (entry_path,) = list(index.glob("*.marshal"))
    assert (entry_path.stat().st_mode & 0o077) == 0
    entry = marshal.loads(entry_path.read_bytes())
    assert entry["cwd"] == str(thin.work)
    assert Path(entry["socket"]).parent == thin.agents
    # Made readable by others, it is no longer trusted: the full CLI runs (and rewrites it).
    entry_path.chmod(0o644)
    result, modules = thin.cli("run", "--no-fence", "--host", "th-a", "--", "true",
                               importtime=True)  # fmt: skip
    assert result.returncode == 0, result
    assert "click" in modules
    assert (entry_path.stat().st_mode & 0o077) == 0


def test_the_session_events_of_thin_runs_reach_the_access_point(thin_fleet: AgentFleet) -> None:
    thin = thin_fleet
    _warm(thin)
    # Two runs: the second reuses the push endpoint the agent's first sink discovered.
    for word in ("one", "two"):
        result, modules = thin.cli("run", "--no-fence", "--json", *_hosts(GOOD), "--",
                                   "echo", word, importtime=True)  # fmt: skip
        assert result.returncode == 0 and not HEAVY_MODULES & modules, result
        session = result.json()["sessionId"]

        def events(session_id: str = session) -> list[dict[str, Any]]:
            listed, _ = thin.cli("--json", "session", "events", session_id)
            if listed.returncode != 0:
                return []
            return [json.loads(line) for line in listed.stdout.splitlines()]

        got = wait_for(
            lambda: (e := events()) and e[-1]["type"] == "summary" and e,
            30.0,
            interval=0.2,
            what=f"the events of session {session} at the access point",
        )
        types = sorted(e["type"] for e in got)
        assert types == sorted(["hostStarted"] * 3 + ["hostLog"] * 3 + ["hostExited"] * 3
                               + ["summary"]), got  # fmt: skip
        assert {e["line"] for e in got if e["type"] == "hostLog"} == {word}


def _ping(thin: AgentFleet) -> PongReply:
    """What the agent's ping reply says about it."""
    import asyncio

    from ah_fleetctl.agent import AgentClient

    (sock,) = list(thin.agents.glob("*.sock"))
    return asyncio.run(AgentClient(sock).ping())


def _push_connections(thin: AgentFleet) -> int:
    """The agent's count of QUIC connections made for session events (its ping says)."""
    return _ping(thin).push_connections


def test_runs_seconds_apart_find_the_follower_list_fresh(thin_fleet: AgentFleet) -> None:
    """A user or a coding agent types the next run a few seconds later: by then the list
    the last run used is too old (2 s), and the agent has fetched it again in the
    background, so the run does not wait for the access point."""
    thin = thin_fleet
    _warm(thin)
    seen = _ping(thin)
    # Long enough for the list to have gone stale twice over, had nobody refreshed it.
    wait_for(
        lambda: _ping(thin).follower_fetches_ahead >= seen.follower_fetches_ahead + 2,
        30.0,
        interval=0.2,
        what="two background fetches of the follower list",
    )
    before = _ping(thin)
    result = thin.thin("run", "--no-fence", "--json", *_hosts(GOOD), "--", "true")
    assert result.returncode == 0, result
    after = _ping(thin)
    assert after.follower_fetches_in_runs == before.follower_fetches_in_runs, (before, after)


def test_the_agent_s_thin_runs_push_their_events_over_one_connection(
    thin_fleet: AgentFleet,
) -> None:
    thin = thin_fleet
    _warm(thin)
    sessions: list[str] = []

    def run(word: str) -> None:
        result = thin.thin("run", "--no-fence", "--json", *_hosts(GOOD), "--", "echo", word)
        assert result.returncode == 0, result
        sessions.append(result.json()["sessionId"])

    def summary_arrived(session_id: str) -> list[dict[str, Any]] | None:
        listed, _ = thin.cli("--json", "session", "events", session_id)
        got = [json.loads(line) for line in listed.stdout.splitlines()]
        return got if listed.returncode == 0 and got and got[-1]["type"] == "summary" else None

    run("first")
    wait_for(
        lambda: summary_arrived(sessions[0]), 30.0, interval=0.2, what="the first run's events"
    )
    before = _push_connections(thin)
    assert before >= 1
    words = [f"run-{i}" for i in range(5)]
    for word in words:
        run(word)
    for session_id, word in zip(sessions[1:], words, strict=True):
        got = wait_for(
            lambda s=session_id: summary_arrived(s), 30.0, interval=0.2, what=f"events of {word}"
        )
        assert [e["seq"] for e in got] == list(range(1, len(got) + 1))
        assert {e["line"] for e in got if e["type"] == "hostLog"} == {word}
    assert _push_connections(thin) == before, "a run made a QUIC connection of its own"


def test_concurrent_thin_runs_over_the_same_transports_lose_no_output_lines(
    thin_fleet: AgentFleet,
) -> None:
    thin = thin_fleet
    _warm(thin)
    count = 1500
    runs = [
        thin.popen("run", "--no-fence", *_hosts(GOOD), "--", "seq", f"{i}000001", f"{i}{count:06d}")
        for i in (1, 2, 3)
    ]
    try:
        results = [run.wait(timeout=90) for run in runs]
    finally:
        for run in runs:
            run.stop()
    for i, (code, lines, stderr) in zip((1, 2, 3), results, strict=True):
        assert code == 0, stderr
        for name in GOOD:
            got = [line.split(" | ", 1)[1] for line in lines if line.startswith(f"{name} ")]
            first = i * 1_000_000 + 1
            assert got == [str(n) for n in range(first, first + count)], (
                f"run {i} on {name}: {len(got)} lines"
            )
        assert lines[-1] == "3 succeeded, 0 failed, 0 unreachable"


def test_a_warning_that_comes_after_a_thin_run_answered_is_shown_by_the_next_one(
    thin_fleet: AgentFleet, tmp_path: Path
) -> None:
    """A thin run answers before its session events are pushed; an access point that then
    refuses them says so to nobody on that run. The agent logs it and the next thin run's
    CLI shows it, once. (A run slower than the events' release delay, on a loaded machine,
    has them pushed before it answers: then it shows the refusal itself, and the next run
    shows nothing late.)"""
    fleet = thin_fleet.fleet
    # Lists followers (read-logs) but may not push session events (that needs exec).
    token = fleet.signer.issue_user("late-reader", scopes=["read-logs", "ssh"])
    with AgentFleet.running(
        fleet, thin_fleet.work, tmp_path / "home", extra_env={"AH_TOKEN": token}
    ) as late:

        def run() -> tuple[str, str]:
            result, modules = late.cli(
                "run", "--no-fence", "--json", *_hosts(GOOD), "--", "true", importtime=True
            )
            assert result.returncode == 0 and not HEAVY_MODULES & modules, result
            return result.stderr, result.json()["sessionId"]

        def refusal_logged(session: str) -> bool:
            return any(
                "after a run answered" in line and session in line and "refused" in line
                for line in late.agent_log().splitlines()
            )

        # The full CLI (it starts the agent and records the thin index) waits for its own
        # events: it reports the refusal itself.
        full, _ = late.cli("run", "--no-fence", *_hosts(GOOD), "--", "true")
        assert full.returncode == 0, full
        assert "refused the session events" in full.stderr, full
        came_late: str | None = None  # the last run whose refusal came after it answered
        late_runs = 0
        for _ in range(3):
            stderr, session = run()
            lines = stderr.splitlines()
            shown_late = [x for x in lines if x.startswith("warning: after an earlier run ")]
            if came_late is None:
                assert not shown_late, stderr
            else:  # the previous run's refusal, shown here and only here
                assert any("refused the session events" in x for x in shown_late), stderr
                assert all(came_late in x for x in shown_late), stderr
            if any("refused the session events" in x for x in lines if x not in shown_late):
                came_late = None  # pushed before this run answered: it showed the refusal
                continue
            wait_for(
                lambda s=session: refusal_logged(s), 30.0, what=f"the refusal of {session} logged"
            )
            came_late = session
            late_runs += 1
        print(f"{late_runs} of 3 thin runs had their refusal come after they answered")
