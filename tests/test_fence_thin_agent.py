"""Fenced ``ah-fleetctl run`` (the default) and ``ah-fleetctl fence`` through the leader agent
on the thin path (``ah_fleetctl.thin`` → ``ah_fleetctl.thin_fence``).

A private fleet (three Linux followers with real sshd, rsync and python3), a leader workspace
(a repo root: ``.git/``), the real console script and a real leader agent started by the
first fenced run in a private runtime directory. The thin path is recognised by what the
CLI process imported (``python -X importtime``: no click, no msgspec, no paramiko); the
fence's per-host plans (``full``/``apply``/``nothing``) are read from the agent's debug log.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ah_harness_local import CliResult, wait_for
from ah_harness_local.agent_fleet import CLI_TIMEOUT_S, HEAVY_MODULES, AgentFleet

NAMES = ["tf-a", "tf-b", "tf-c"]
FENCE_TIMEOUT = "8s"
NO_AGENT = {"AH_AGENT_ENABLED": "false"}


@pytest.fixture(scope="module")
def agent_fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentFleet]:
    from ah_harness_local.fleet import FollowerSpec, LocalFleet

    base = tmp_path_factory.mktemp("thinfence")
    with LocalFleet([FollowerSpec(n) for n in NAMES], base_dir=base / "fleet") as fleet:
        work = base / "leader"
        (work / ".git").mkdir(parents=True)
        (work / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
        for i in range(20):
            (work / "src" / f"m{i}.py").parent.mkdir(exist_ok=True)
            (work / "src" / f"m{i}.py").write_text(f"VALUE = {i}\n")
        extra_env = {
            "AH_TIMEOUTS_FENCE": FENCE_TIMEOUT,
            # The agent inherits it: its log shows each fence's per-host plan.
            "AH_LOG_LEVEL": "debug",
        }
        with AgentFleet.running(
            fleet, work, base / "home", extra_env=extra_env, importtime=True
        ) as af:
            yield af


def _until_thin(af: AgentFleet, *args: str, cwd: Path | None = None) -> tuple[int, CliResult]:
    """Run ``ah-fleetctl ARGS`` (full CLI at first) until it takes the thin path; returns
    how many full runs came first and the thin result. A full fenced run starts the agent
    meanwhile and records it once it answers, so a few runs at most."""
    for full in range(4):
        result, modules = af.cli(*args, cwd=cwd)
        assert result.returncode == 0, result
        if not HEAVY_MODULES & modules:
            return full, result
        wait_for(lambda: af.agent_pids(), 30.0, what="the leader agent the full run started")
    raise AssertionError(f"{args} never took the thin path")


def _warm(af: AgentFleet) -> None:
    _until_thin(af, "run", "--json", "--", "true")


def _hosts_of(result: CliResult) -> dict[str, dict[str, Any]]:
    return {h["host"]: h for h in result.json()["hosts"]}


def test_a_fenced_run_takes_the_thin_path_once_an_agent_runs_and_sees_leader_edits(
    agent_fleet: AgentFleet,
) -> None:
    af = agent_fleet
    af.stop_agents()
    first, modules = af.cli("run", "--", "cat", "src/m1.py")
    assert first.returncode == 0, first
    assert "click" in modules, "no agent ran yet: the full CLI fences"
    # ...and starts one meanwhile, recorded for the thin path: once it answers, the next
    # fenced run goes through it.
    wait_for(lambda: af.agent_pids(), 30.0, what="the leader agent the full run started")
    full_runs, _ = _until_thin(af, "run", "--", "true")
    assert full_runs == 0, "the full fenced run should have recorded the agent it started"

    (af.work / "src" / "m1.py").write_text("VALUE = 'edited on the leader'\n")
    (af.work / "src" / "new.txt").write_text("a new file\n")
    (af.work / "src" / "m2.py").unlink()
    result = af.thin(
        "run", "--", "sh", "-c", "cat src/m1.py src/new.txt; test -e src/m2.py || echo m2-gone"
    )
    assert result.returncode == 0, result
    lines = result.stdout.splitlines()
    for name in NAMES:
        assert f"{name} | VALUE = 'edited on the leader'" in lines, result
        assert f"{name} | a new file" in lines, result
        assert f"{name} | m2-gone" in lines, result
        assert (af.workspace(name) / "src" / "m1.py").read_text() == (
            "VALUE = 'edited on the leader'\n"
        )
    assert lines[-1] == "3 succeeded, 0 failed, 0 unreachable", result
    assert re.search(r"^logs: \S+$", result.stderr, re.MULTILINE), result

    # From a subdirectory (another index entry: a full run records it first) the same
    # workspace is fenced, and the command runs in the follower's copy of that directory.
    (af.work / "src" / "new.txt").write_text("edited again\n")
    _, in_src = _until_thin(af, "run", "--", "sh", "-c", "pwd; cat new.txt", cwd=af.work / "src")
    lines = in_src.stdout.splitlines()
    for name in NAMES:
        assert f"{name} | {af.workspace(name) / 'src'}" in lines, in_src
        assert f"{name} | edited again" in lines, in_src


def test_a_second_fenced_run_after_a_one_file_edit_sends_only_that_change(
    agent_fleet: AgentFleet,
) -> None:
    af = agent_fleet
    _warm(af)
    assert af.thin("run", "--", "true").returncode == 0  # every host proven at this tree
    before = len(af.agent_log())
    (af.work / "src" / "m3.py").write_text("VALUE = 'one change'\n")
    result = af.thin("run", "--", "cat", "src/m3.py")
    assert result.returncode == 0, result
    for name in NAMES:
        assert f"{name} | VALUE = 'one change'" in result.stdout.splitlines(), result
    log = af.agent_log()[before:]
    for name in NAMES:
        assert f"fence: {name}: apply (1 paths since its proven snapshot)" in log, log
    # Nothing changed since: nothing to send, and the digest still proves it.
    before = len(af.agent_log())
    assert af.thin("run", "--", "true").returncode == 0
    log = af.agent_log()[before:]
    for name in NAMES:
        assert f"fence: {name}: nothing (0 paths since its proven snapshot)" in log, log


def test_the_json_envelope_and_events_are_those_of_the_full_cli(agent_fleet: AgentFleet) -> None:
    af = agent_fleet
    _warm(af)
    (af.work / "src" / "m4.py").write_text("VALUE = 'for the envelope'\n")
    thin = af.thin("run", "--json", "--", "cat", "src/m4.py")
    full, modules = af.cli("run", "--json", "--", "cat", "src/m4.py", extra_env=NO_AGENT)
    assert "click" in modules
    assert thin.returncode == full.returncode == 0, (thin, full)
    a, b = thin.json(), full.json()

    def shape(envelope: dict[str, Any]) -> Any:
        return (
            sorted(envelope),
            envelope["commands"],
            envelope["summary"],
            [
                (sorted(h), h["host"], h["os"], h["state"], h["exitCode"], h["error"], h["command"])
                for h in envelope["hosts"]
            ],
        )

    assert shape(a) == shape(b)
    assert [h["host"] for h in a["hosts"]] == NAMES
    # The fence's events come first in the thin run's session, as in the full CLI's.
    session = a["sessionId"]

    def events() -> list[dict[str, Any]]:
        listed, _ = af.cli("--json", "session", "events", session)
        if listed.returncode != 0:
            return []
        return [json.loads(line) for line in listed.stdout.splitlines()]

    got = wait_for(
        lambda: (e := events()) and e[-1]["type"] == "summary" and e,
        30.0,
        interval=0.2,
        what=f"the events of session {session} at the access point",
    )
    types = [e["type"] for e in got]
    assert types[:2] == ["fenceStarted", "fenceResult"], types
    assert got[0]["snapshotId"] == got[1]["snapshotId"]
    assert {n: h["state"] for n, h in got[1]["hosts"].items()} == dict.fromkeys(NAMES, "consistent")
    assert sorted(types[2:]) == sorted(
        ["hostStarted"] * 3 + ["hostLog"] * 3 + ["hostExited"] * 3 + ["summary"]
    )

    # ``fence`` itself: the same document and table as the full command.
    thin_fence = af.thin("fence", "--json")
    full_fence, _ = af.cli("fence", "--json", extra_env=NO_AGENT)
    assert thin_fence.returncode == full_fence.returncode == 0, (thin_fence, full_fence)
    doc, full_doc = thin_fence.json(), full_fence.json()
    assert sorted(doc) == sorted(full_doc)
    assert doc["snapshotId"] == full_doc["snapshotId"]
    assert {n: h["state"] for n, h in doc["hosts"].items()} == {
        n: h["state"] for n, h in full_doc["hosts"].items()
    }
    table = af.thin("fence")
    assert table.returncode == 0, table
    assert re.search(
        rf"snapshot {doc['snapshotId']}: 3 of 3 hosts consistent \(rsync, ", table.stdout
    )


def test_a_stalled_follower_fails_the_thin_fenced_run_and_the_others_run(
    agent_fleet: AgentFleet,
) -> None:
    af = agent_fleet
    _warm(af)
    (af.work / "src" / "m5.py").write_text("VALUE = 'while tf-c is stalled'\n")
    stalled = af.fleet.follower("tf-c").sshd
    stalled.pause()
    try:
        result = af.thin("run", "--json", "--", "cat", "src/m5.py")
        fence = af.thin("fence")
    finally:
        stalled.resume()
    assert result.returncode == 1, result
    hosts = _hosts_of(result)
    assert {n: h["state"] for n, h in hosts.items()} == {
        "tf-a": "ok",
        "tf-b": "ok",
        "tf-c": "failed",
    }, result
    error = hosts["tf-c"]["error"]
    assert error.startswith("fence timeout (snapshot snap-"), error
    assert f"{FENCE_TIMEOUT} fence deadline" in error, error
    assert result.json()["summary"]["failed"] == 1
    for name in ("tf-a", "tf-b"):
        assert (af.workspace(name) / "src" / "m5.py").read_text() == (
            "VALUE = 'while tf-c is stalled'\n"
        )
    assert fence.returncode == 1, fence
    rows = {line.split()[0]: line.split()[1] for line in fence.stdout.splitlines()[1:4]}
    assert rows == {"tf-a": "consistent", "tf-b": "consistent", "tf-c": "timeout"}, fence
    assert "timed out (lagging): tf-c" in fence.stderr, fence
    # Resumed, it catches up on the next run.
    again = af.thin("run", "--json", "--", "cat", "src/m5.py")
    assert again.returncode == 0, again
    assert all(h["state"] == "ok" for h in _hosts_of(again).values()), again


def test_a_config_change_falls_back_to_the_full_cli_and_its_ignores_hold(
    agent_fleet: AgentFleet,
) -> None:
    af = agent_fleet
    _warm(af)
    (af.work / "dist").mkdir(exist_ok=True)
    (af.work / "dist" / "bundle.js").write_text("built\n")
    assert af.thin("run", "--", "test", "-f", "dist/bundle.js").returncode == 0
    # The repo's own config now ignores dist/: a configuration file appeared, so the
    # index misses and the full CLI fences (and records the new settings)...
    (af.work / ".agents").mkdir()
    try:
        (af.work / ".agents" / "config.toml").write_text('sync-ignores = ["dist"]\n')
        (af.work / "dist" / "later.js").write_text("not synced\n")
        full, modules = af.cli("run", "--", "true")
        assert full.returncode == 0, full
        assert "click" in modules, "a stale index entry was used"
        # ...and the thin runs after it fence with those ignores.
        (af.work / "dist" / "even-later.js").write_text("not synced either\n")
        result = af.thin("run", "--", "sh", "-c", "ls dist; cat .agents/config.toml")
        assert result.returncode == 0, result
        for name in NAMES:
            assert f"{name} | bundle.js" in result.stdout.splitlines(), result
            assert f'{name} | sync-ignores = ["dist"]' in result.stdout.splitlines(), result
            assert not (af.workspace(name) / "dist" / "later.js").exists()
            assert not (af.workspace(name) / "dist" / "even-later.js").exists()
        # Another PATH (where rsync, ssh and mutagen are found) is the full CLI's to fence
        # with, though the index matches: the agent declines before anything ran.
        other_path = {"PATH": f"{af.work / 'no-such-bin'}{os.pathsep}{af.env['PATH']}"}
        declined, modules = af.cli("run", "--", "true", extra_env=other_path)
        assert declined.returncode == 0 and "click" in modules, declined
        assert "the CLI's PATH is not the agent's" in af.agent_log()
        # A changed user config file misses the index too.
        config = Path(af.env["AH_HOME"]) / "config.toml"
        config.write_text(config.read_text() + "\n# touched by the test\n")
        touched, modules = af.cli("run", "--", "true")
        assert touched.returncode == 0 and "click" in modules, touched
    finally:
        shutil.rmtree(af.work / ".agents")
        shutil.rmtree(af.work / "dist")


def _wait_for_the_fence_snapshot(af: AgentFleet, log_from: int) -> None:
    wait_for(
        lambda: "fence: snapshot" in af.agent_log()[log_from:],
        30.0,
        what="the agent's fence to take its snapshot",
    )


def test_the_agent_dying_mid_fence_fails_the_run_loudly(agent_fleet: AgentFleet) -> None:
    af = agent_fleet
    _warm(af)
    (pid,) = af.agent_pids()
    (af.work / "src" / "m6.py").write_text("VALUE = 'never run'\n")
    before = len(af.agent_log())
    stalled = af.fleet.follower("tf-b").sshd
    stalled.pause()  # the fence waits for tf-b: the agent is killed while it does
    try:
        running = af.popen("run", "--", "cat", "src/m6.py")
        try:
            _wait_for_the_fence_snapshot(af, before)
            os.kill(pid, signal.SIGKILL)
            code, lines, stderr = running.wait(CLI_TIMEOUT_S)
        finally:
            running.stop()
    finally:
        stalled.resume()
    stdout = "\n".join(lines)
    assert code == 1, (stdout, stderr)
    assert "the leader agent at" in stderr and "went away during the run" in stderr, stderr
    assert "never run" not in stdout
    _warm(af)  # a new agent for whatever runs next


def test_an_interrupted_thin_fence_reports_every_host_cancelled(agent_fleet: AgentFleet) -> None:
    af = agent_fleet
    _warm(af)
    (af.work / "src" / "m7.py").write_text("VALUE = 'interrupted'\n")
    before = len(af.agent_log())
    stalled = af.fleet.follower("tf-a").sshd
    stalled.pause()
    try:
        running = af.popen("run", "--json", "--", "cat", "src/m7.py")
        try:
            _wait_for_the_fence_snapshot(af, before)
            running.proc.send_signal(signal.SIGINT)
            code, lines, stderr = running.wait(CLI_TIMEOUT_S)
        finally:
            running.stop()
    finally:
        stalled.resume()
    stdout = "\n".join(lines)
    assert code == 130, (stdout, stderr)
    envelope = json.loads(stdout)
    assert {h["host"]: (h["state"], h["error"]) for h in envelope["hosts"]} == dict.fromkeys(
        NAMES, ("cancelled", "interrupted (SIGINT)")
    ), envelope


def test_concurrent_thin_fenced_runs_of_one_workspace_take_turns_and_both_run(
    agent_fleet: AgentFleet,
) -> None:
    af = agent_fleet
    _warm(af)
    (af.work / "src" / "m8.py").write_text("VALUE = 'concurrent'\n")
    before = len(af.agent_log())
    runs = [af.popen("run", "--json", "--", "cat", "src/m8.py") for _ in range(3)]
    try:
        outputs = [running.wait(CLI_TIMEOUT_S) for running in runs]
    finally:
        for running in runs:
            running.stop()
    for code, lines, stderr in outputs:
        assert code == 0, (lines, stderr)
        envelope = json.loads("\n".join(lines))
        assert [(h["host"], h["state"]) for h in envelope["hosts"]] == [(n, "ok") for n in NAMES]
        for host in envelope["hosts"]:
            assert "out | VALUE = 'concurrent'\n" in Path(host["logPath"]).read_text()
    # The agent's fences of this workspace took turns: the first sent the edit, the two
    # after it found it proven there (fenced together, all three would have sent it).
    log = af.agent_log()[before:]
    for name in NAMES:
        assert log.count(f"fence: {name}: apply (1 paths since its proven snapshot)") == 1, log
        assert log.count(f"fence: {name}: nothing (0 paths since its proven snapshot)") == 2, log
