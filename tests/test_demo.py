"""``ah-fleetctl demo`` with real fleets: Ctrl-C tears everything down; ``--keep`` leaves a fleet
that a sourced env file points ``ah-fleetctl`` at, and ``--down`` stops it. (The README's
three-follower demo run is ``test_readme_quickstart.py``; the command line and the missing-program
exit are ``packages/ah-fleetctl/tests/test_demo_cli.py``.)"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from ah_harness_local import wait_for

DEMO = [sys.executable, "-m", "ah_fleetctl", "demo"]
_DIR = re.compile(r"^demo: starting an access point and \d+ followers? in (\S+)$", re.MULTILINE)


def _environment(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AH_") and k != "RUST_LOG"}
    env.update(HOME=str(home), NO_COLOR="1", PYTHONUNBUFFERED="1")
    return env


def _processes_mentioning(text: str) -> dict[int, str]:
    """pid -> command line of every live (non-zombie) process whose argv mentions `text` or
    whose working directory lies under it (a remote command the follower's shell exec'd keeps
    only its own argv, e.g. ``sleep 600``, but runs in the follower's workspace)."""
    found: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        try:
            cwd = os.readlink(entry / "cwd")
        except OSError:
            cwd = ""
        if (text in argv or cwd.startswith(text)) and stat[stat.rfind(")") + 2] not in "ZX":
            found[int(entry.name)] = argv
    return found


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2] not in "ZX"


def test_ctrl_c_during_the_run_stops_every_process_and_removes_the_directory(
    tmp_path: Path,
) -> None:
    (tmp_path / "work").mkdir()
    err_path = tmp_path / "demo.stderr"
    with err_path.open("w") as err:
        proc = subprocess.Popen(
            [*DEMO, "--followers", "1", "--", "sleep", "600"],
            cwd=tmp_path / "work",
            env=_environment(tmp_path),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            start_new_session=True,  # its own group, as a terminal's foreground job
        )
    try:
        directory = wait_for(
            lambda: (m := _DIR.search(err_path.read_text())) and Path(m.group(1)),
            60,
            what="the demo to name its directory",
        )
        wait_for(
            lambda: "1 follower connected" in err_path.read_text() or proc.poll() is not None,
            120,
            what="the follower to connect",
        )
        assert proc.poll() is None, err_path.read_text()
        # The remote command is running in the follower's workspace: the run is under way.
        workspace = str(directory / "followers" / "demo-1" / "workspace")
        wait_for(
            lambda: any("sleep" in a for a in _processes_mentioning(workspace).values()),
            120,
            what=f"the remote sleep in {workspace}",
        )
        fleet_processes = _processes_mentioning(str(directory))
        assert len(fleet_processes) >= 4, fleet_processes  # access point, sshd, follower, shell
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C at a terminal does
        out, _ = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    stderr = err_path.read_text()
    assert proc.returncode == 130, (out, stderr)
    # The run saw the interrupt: the remote command was cancelled and the summary printed.
    assert "demo-1  cancelled" in out and "1 cancelled" in out, (out, stderr)
    assert "demo: interrupted: stopping the fleet" in stderr
    left = [pid for pid in fleet_processes if _alive(pid)]
    assert left == [], {pid: fleet_processes[pid] for pid in left}
    assert _processes_mentioning(str(directory)) == {}
    assert not directory.exists()


@pytest.mark.parametrize("phase", ["sshd_config", "ah_followerd"], ids=["sshd-up", "enrolling"])
def test_ctrl_c_while_the_fleet_comes_up_stops_what_was_started(tmp_path: Path, phase: str) -> None:
    (tmp_path / "work").mkdir()
    err_path = tmp_path / "demo.stderr"
    with err_path.open("w") as err:
        proc = subprocess.Popen(
            [*DEMO, "--followers", "2"],
            cwd=tmp_path / "work",
            env=_environment(tmp_path),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
            start_new_session=True,
        )
    try:
        directory = wait_for(
            lambda: (m := _DIR.search(err_path.read_text())) and Path(m.group(1)),
            60,
            what="the demo to name its directory",
        )
        # Part of the fleet is up: an sshd, or (later) a follower enrolling or starting.
        wait_for(
            lambda: (
                any(phase in argv for argv in _processes_mentioning(str(directory)).values())
                or proc.poll() is not None
            ),
            60,
            what=f"a process of {directory} with {phase} in its command line",
        )
        assert proc.poll() is None, err_path.read_text()
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(90)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    stderr = err_path.read_text()
    assert proc.returncode == 130, stderr
    assert "connected in" not in stderr, "the interrupt came too late to test the bring-up"
    # Processes started by threads still at work when the interrupt came are stopped too.
    assert _processes_mentioning(str(directory)) == {}, stderr
    assert not directory.exists(), stderr


def test_keep_leaves_a_fleet_the_env_file_points_at_and_down_removes_it(tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    (work / "a.txt").write_text("from the leader\n")
    env_file = tmp_path / "env" / "fleet.env"
    env_file.parent.mkdir()
    env = _environment(tmp_path)
    # A failing command: the demo's exit code is the run's, and --keep keeps the fleet anyway.
    kept = subprocess.run(
        [*DEMO, "--followers", "2", "--keep", "--env-file", str(env_file), "--", "cat", "b.txt"],
        cwd=work,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert kept.returncode == 1, kept
    assert "0 succeeded, 2 failed, 0 unreachable" in kept.stdout, kept
    assert f"ah-fleetctl demo --down --env-file {env_file}" in kept.stderr, kept
    match = _DIR.search(kept.stderr)
    assert match, kept.stderr
    directory = Path(match.group(1))
    state = json.loads((directory / "demo.json").read_text())
    pids = [p["pgid"] for p in state["processes"]]
    assert len(pids) == 5 and all(_alive(pid) for pid in pids), state  # ap, 2 sshd, 2 followers
    assert oct(env_file.stat().st_mode & 0o777) == "0o600"

    # Sourced, the env file points every ah-fleetctl command at the kept fleet, even from a
    # repository whose own config names another access point.
    (work / ".agents").mkdir()
    (work / ".agents" / "config.toml").write_text('remote-server = "https://192.0.2.1:9"\n')
    (work / "b.txt").write_text("now it exists\n")
    script = (
        f". {shlex.quote(str(env_file))} && {shlex.join([sys.executable, '-m', 'ah_fleetctl'])}"
    )
    listed = subprocess.run(
        ["sh", "-c", f"{script} fleet list --json"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert listed.returncode == 0, listed
    followers = {f["info"]["name"]: f["health"] for f in json.loads(listed.stdout)["followers"]}
    assert followers == {"demo-1": "healthy", "demo-2": "healthy"}
    ran = subprocess.run(
        ["sh", "-c", f"{script} run -- cat b.txt"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert ran.returncode == 0, ran
    assert sorted(ln for ln in ran.stdout.splitlines() if "now it exists" in ln) == [
        "demo-1 | now it exists",
        "demo-2 | now it exists",
    ], ran

    stopped = subprocess.run(
        [*DEMO, "--down", "--env-file", str(env_file)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert stopped.returncode == 0, stopped
    assert f"removed {directory}" in stopped.stdout, stopped
    assert not any(_alive(pid) for pid in pids)
    assert _processes_mentioning(str(directory)) == {}
    assert not directory.exists() and not env_file.exists()
    again = subprocess.run(
        [*DEMO, "--down", "--env-file", str(env_file)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert again.returncode == 7 and "cannot read" in again.stderr, again


def test_a_failing_command_fails_the_demo_and_still_tears_down(tmp_path: Path) -> None:
    done = subprocess.run(
        [*DEMO, "--followers", "1", "--", "sh", "-c", "echo about to fail; exit 4"],
        cwd=tmp_path,
        env=_environment(tmp_path),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert done.returncode == 1, done
    assert "demo-1 | about to fail" in done.stdout.splitlines(), done
    assert done.stdout.splitlines()[-1] == "0 succeeded, 1 failed, 0 unreachable", done
    match = _DIR.search(done.stderr)
    assert match, done.stderr
    assert "demo: run exit 1" in done.stderr
    assert _processes_mentioning(match.group(1)) == {}
    assert not Path(match.group(1)).exists()
