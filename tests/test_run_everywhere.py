"""``ah-fleetctl run`` end to end: a real access point, real followers, each with its own real
sshd, the real console script (``dataplane_fleet`` in conftest.py: lin-a/b/c + mac-d).

Followers share this machine, so what tells them apart is their workspace (each has its
own, and commands run in it) — ``pwd`` prints a different directory on each.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import signal
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ah_harness_local import wait_for

if TYPE_CHECKING:
    from conftest import CliResult, FleetCli

LINUX = ["lin-a", "lin-b", "lin-c"]


def hosts_of(result: CliResult) -> dict[str, dict[str, Any]]:
    return {h["host"]: h for h in result.json()["hosts"]}


def log_lines(host_result: dict[str, Any]) -> list[str]:
    """The command's stdout lines from a host's run log (``out | line``)."""
    text = Path(host_result["logPath"]).read_text()
    return [line[len("out | ") :] for line in text.splitlines() if line.startswith("out | ")]


def workspace(cli: FleetCli, name: str) -> Path:
    return Path(cli.fleet.follower(name).workspace)


def test_one_command_on_three_linux_followers_gives_three_distinct_results(
    dataplane_fleet: FleetCli,
) -> None:
    cli = dataplane_fleet
    result = cli("run", "--no-fence", "--json", "--tag", "os=linux", "--", "pwd")
    assert result.returncode == 0, result
    hosts = hosts_of(result)
    assert list(hosts) == LINUX
    assert {h["state"] for h in hosts.values()} == {"ok"}
    outputs = {name: log_lines(h) for name, h in hosts.items()}
    # Each ran in its own workspace: the leader's cwd mapped onto the follower.
    assert outputs == {name: [str(workspace(cli, name))] for name in LINUX}
    assert len({tuple(o) for o in outputs.values()}) == 3
    assert result.json()["summary"]["succeeded"] == 3
    # The run's session events (also pushed to the access point) have a local copy.
    session = result.json()["sessionId"]
    assert re.fullmatch(r"s-\d{8}T\d{6}Z-[0-9a-f]{6}", session), session
    copy = Path(cli.env["AH_HOME"]) / "logs" / "sessions" / f"{session}.events.jsonl"
    types = Counter(json.loads(line)["type"] for line in copy.read_text().splitlines())
    assert types == {"hostStarted": 3, "hostLog": 3, "hostExited": 3, "summary": 1}

    # Without --json: live `host | line` output, the summary, and where the logs are.
    plain = cli("run", "--no-fence", "--tag", "os=linux", "--", "pwd")
    assert plain.returncode == 0, plain
    for name in LINUX:
        assert f"{name} | {workspace(cli, name)}" in plain.stdout.splitlines()
    assert plain.stdout.splitlines()[-1] == "3 succeeded, 0 failed, 0 unreachable"
    run_dir = re.search(r"^logs: (\S+)$", plain.stderr, re.MULTILINE)
    assert run_dir is not None, plain
    assert sorted(p.name for p in Path(run_dir.group(1)).iterdir()) == [f"{n}.log" for n in LINUX]


def test_a_failing_host_fails_the_run_and_every_result_is_kept(dataplane_fleet: FleetCli) -> None:
    cli = dataplane_fleet
    marker = workspace(cli, "lin-b") / "only-on-lin-b"
    marker.write_text("x")
    try:
        result = cli(
            "run", "--no-fence", "--json", "--tag", "os=linux", "--", "test", "-e", marker.name
        )
    finally:
        marker.unlink()
    assert result.returncode == 1, result
    hosts = hosts_of(result)
    assert [(n, hosts[n]["state"], hosts[n]["exitCode"]) for n in LINUX] == [
        ("lin-a", "failed", 1),
        ("lin-b", "ok", 0),
        ("lin-c", "failed", 1),
    ]
    assert result.json()["summary"] == {
        "total": 3,
        "succeeded": 1,
        "failed": 2,
        "unreachable": 0,
        "timedOut": 0,
        "cancelled": 0,
        "idle": 0,
    }


def test_host_and_tag_select_the_subset_and_an_empty_selection_is_exit_7(
    dataplane_fleet: FleetCli,
) -> None:
    cli = dataplane_fleet
    by_host = cli("run", "--no-fence", "--json", "--host", "lin-c", "--host", "lin-a", "--", "pwd")
    assert by_host.returncode == 0, by_host
    assert sorted(hosts_of(by_host)) == ["lin-a", "lin-c"]

    by_tag = cli("run", "--no-fence", "--json", "--tag", "role=d", "--", "pwd")
    assert by_tag.returncode == 0, by_tag
    assert list(hosts_of(by_tag)) == ["mac-d"]
    assert log_lines(hosts_of(by_tag)["mac-d"]) == [str(workspace(cli, "mac-d"))]

    empty = cli("run", "--no-fence", "--tag", "role=nobody", "--", "pwd")
    assert empty.returncode == 7, empty
    assert "no follower matches --tag role=nobody" in empty.stderr
    assert empty.stdout == ""

    mismatch = cli("run", "--no-fence", "--json", "--host", "lin-a", "--tag", "role=b", "--", "pwd")
    assert mismatch.returncode == 7, mismatch
    assert mismatch.json()["error"]["message"] == (
        "host 'lin-a' does not match tag role=b (has role=a)"
    )


def test_options_end_at_the_command_with_or_without_double_dash(dataplane_fleet: FleetCli) -> None:
    cli = dataplane_fleet
    (workspace(cli, "lin-a") / "listed-file").write_text("x")
    try:
        with_dashes = cli("run", "--no-fence", "--json", "--host", "lin-a", "--", "ls", "-la")
        without = cli("run", "--no-fence", "--json", "--host", "lin-a", "ls", "-la")
    finally:
        (workspace(cli, "lin-a") / "listed-file").unlink()
    for result in (with_dashes, without):
        assert result.returncode == 0, result
        assert result.json()["commands"] == ["ls -la"]
        lines = log_lines(hosts_of(result)["lin-a"])
        assert lines[0].startswith("total "), lines  # `-la` reached ls, not ah-fleetctl
        assert any(line.endswith(" listed-file") and line.startswith("-") for line in lines)


def test_several_commands_run_once_per_os_and_one_at_a_time_per_host(
    dataplane_fleet: FleetCli,
) -> None:
    cli = dataplane_fleet
    commands = [
        f'echo "job {i} start $(date +%s%N) ${{ZSH_VERSION:+zsh}}${{BASH_VERSION:+bash}}"; '
        f'sleep 0.2; echo "job {i} end $(date +%s%N)"'
        for i in range(6)
    ]
    args = [arg for command in commands for arg in ("--command", command)]
    result = cli("run", "--no-fence", "--json", *args)
    assert result.returncode == 0, result
    document = result.json()
    assert document["summary"]["total"] == 12 and document["summary"]["succeeded"] == 12
    per_os = Counter((h["os"], h["command"]) for h in document["hosts"])
    assert per_os == Counter({(os_name, c): 1 for os_name in ("linux", "macos") for c in commands})
    jobs = Counter(h["host"] for h in document["hosts"])
    assert jobs == {"lin-a": 2, "lin-b": 2, "lin-c": 2, "mac-d": 6}  # round-robin per OS

    logs = {h["host"]: h for h in document["hosts"]}
    for host, entry in logs.items():
        spans: dict[str, dict[str, int]] = defaultdict(dict)
        shells = set()
        for line in log_lines(entry):
            fields = line.split()
            spans[fields[1]][fields[2]] = int(fields[3])
            if fields[2] == "start":
                shells.add(fields[4])
        assert len(spans) == jobs[host], (host, spans)
        ordered = sorted(spans.values(), key=lambda s: s["start"])
        for earlier, later in itertools.pairwise(ordered):
            assert earlier["end"] <= later["start"], f"two jobs at once on {host}: {ordered}"
        assert shells == ({"zsh"} if host == "mac-d" else {"bash"}), (host, shells)


def test_a_host_sharding_had_no_command_for_is_idle_not_failed(dataplane_fleet: FleetCli) -> None:
    # Two commands, three linux hosts and one macOS host: one linux host gets no job.
    cli = dataplane_fleet
    result = cli("run", "--no-fence", "--json", "--command", "echo one", "--command", "echo two")
    assert result.returncode == 0, result
    document = result.json()
    states = Counter(h["state"] for h in document["hosts"])
    assert states == {"ok": 4, "idle": 1}, document["hosts"]
    idle = next(h for h in document["hosts"] if h["state"] == "idle")
    assert idle["host"] in LINUX and idle["exitCode"] is None and idle["error"]
    assert document["summary"]["idle"] == 1 and document["summary"]["succeeded"] == 4

    failing = cli("run", "--no-fence", "--command", "echo one", "--command", "exit 3")
    assert failing.returncode == 1, failing  # idle never hides a failure
    assert "2 succeeded, 2 failed, 0 unreachable, 1 idle" in failing.stdout + failing.stderr


def test_a_follower_dying_mid_command_is_unreachable_and_the_others_finish(
    dataplane_fleet: FleetCli,
) -> None:
    cli = dataplane_fleet
    victim = cli.fleet.follower("lin-c")
    marker = workspace(cli, "lin-c") / "victim"
    marker.write_text("x")
    script = "echo started; if [ -e victim ]; then sleep 30; else sleep 1; fi"
    running = cli.popen(
        "run", "--no-fence", "--host", "lin-a", "--host", "lin-c", "--", "sh", "-c", script
    )
    try:
        running.stdout.wait_for(
            lambda lines: {"lin-a | started", "lin-c | started"} <= set(lines),
            timeout=30,
            what="both hosts to start",
        )
        started = time.monotonic()
        victim.kill_sshd()
        code, lines, stderr = running.wait(timeout=30)
        took = time.monotonic() - started
    finally:
        running.stop()
        marker.unlink()
        if not victim.sshd.is_running:
            victim.start_sshd()
    assert code == 1, (lines, stderr)
    assert took < 15, f"the run took {took:.1f}s after the kill"
    assert lines[-1] == "1 succeeded, 0 failed, 1 unreachable", lines
    report = [line for line in lines if line.startswith("lin-c ") and "unreachable" in line]
    assert report and "SSH connection to lin-c lost" in report[0], lines


def test_concurrent_runs_lose_no_output_lines(dataplane_fleet: FleetCli) -> None:
    cli = dataplane_fleet
    count = 2000
    runs = [
        cli.popen(
            "run", "--no-fence", "--tag", "os=linux", "--", "seq", "-f", f"p{k}-%g", "1", str(count)
        )
        for k in range(3)
    ]
    try:
        finished = [run.wait(timeout=90) for run in runs]
    finally:
        for run in runs:
            run.stop()
    for k, (code, lines, stderr) in enumerate(finished):
        assert code == 0, (k, stderr, lines[-5:])
        for host in LINUX:
            mine = [line for line in lines if line.startswith(f"{host} | ")]
            assert mine == [f"{host} | p{k}-{n}" for n in range(1, count + 1)], (
                f"run {k} on {host}: {len(mine)} lines"
            )
        assert lines[-1] == "3 succeeded, 0 failed, 0 unreachable"


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


def test_ctrl_c_stops_the_remote_commands_and_still_prints_the_summary(
    dataplane_fleet: FleetCli,
) -> None:
    cli = dataplane_fleet
    tag = f"3{os.getpid() % 1000}.25"  # a sleep only this test starts
    running = cli.popen(
        "run",
        "--no-fence",
        "--host",
        "lin-a",
        "--host",
        "lin-b",
        "--",
        "sh",
        "-c",
        f"echo started; sleep {tag}",
    )
    try:
        running.stdout.wait_for(
            lambda lines: {"lin-a | started", "lin-b | started"} <= set(lines),
            timeout=30,
            what="both hosts to start",
        )
        # "started" comes out just before the shell execs sleep.
        wait_for(lambda: len(_sleepers(tag)) == 2, 10, what="both remote sleeps")
        running.proc.send_signal(signal.SIGINT)
        code, lines, stderr = running.wait(timeout=30)
    finally:
        running.stop()
    assert code == 130, (lines, stderr)
    assert lines[-1] == "0 succeeded, 0 failed, 0 unreachable, 2 cancelled", lines
    wait_for(lambda: not _sleepers(tag), 10, what="the remote sleeps to be gone")


def test_without_no_fence_the_followers_get_the_leader_tree_first(
    dataplane_fleet: FleetCli, tmp_path: Path
) -> None:
    cli = dataplane_fleet
    leader = tmp_path / "tree"
    (leader / ".git").mkdir(parents=True)  # the repo root is what gets fenced
    (leader / "sub").mkdir()
    (leader / "sub" / "hello.txt").write_text(f"fenced {tmp_path.name}\n")
    result = cli(
        "run",
        "--json",
        "--tag",
        "role=a",
        "--tag",
        "os=linux",
        "--",
        "cat",
        "hello.txt",
        cwd=leader / "sub",
    )
    try:
        assert result.returncode == 0, result
        (host,) = hosts_of(result).values()
        assert log_lines(host) == [f"fenced {tmp_path.name}"]
    finally:
        for entry in workspace(cli, "lin-a").iterdir():
            if entry.is_dir():
                shutil.rmtree(entry)
            else:
                entry.unlink()


def test_a_timeout_stops_every_host_and_kills_the_remote_commands(
    dataplane_fleet: FleetCli,
) -> None:
    cli = dataplane_fleet
    tag = f"4{os.getpid() % 1000}.75"
    result = cli(
        "run", "--no-fence", "--json", "--timeout", "1s", "--tag", "os=linux", "--", "sleep", tag
    )
    assert result.returncode == 1, result
    hosts = hosts_of(result)
    assert {h["state"] for h in hosts.values()} == {"timeout"}, hosts
    assert all(h["error"] == "timed out after 1 s" for h in hosts.values()), hosts
    assert result.json()["summary"]["timedOut"] == 3
    wait_for(lambda: not _sleepers(tag), 10, what="the timed-out sleeps to be gone")
