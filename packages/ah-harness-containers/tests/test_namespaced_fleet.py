"""A fleet whose followers live in their own network namespaces: commands run inside them,
over the direct path and through CONNECT, and a follower cut off the network mid-run fails
alone, loudly, and comes back once the network does."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ah_harness_containers import FollowerSpec, NamespacedFleet
from ah_harness_local import wait_for
from ah_harness_local.agent_fleet import AgentFleet

CLI = [sys.executable, "-m", "ah_fleetctl"]
CLI_TIMEOUT_S = 120.0
NAMES = ("nf-1", "nf-2", "nf-3")
NO_DIRECT = {"AH_PATH_POLICY_ALLOW_DIRECT": "false"}


class Lab:
    def __init__(self, fleet: NamespacedFleet, env: dict[str, str], work: Path) -> None:
        self.fleet = fleet
        self.env = env
        self.work = work

    def cli(
        self, *args: str, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*CLI, *args],
            env={**self.env, **(env or {})},
            cwd=self.work,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=CLI_TIMEOUT_S,
            check=False,
        )


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    base = tmp_path_factory.mktemp("netns")
    specs = [FollowerSpec(name) for name in NAMES]
    with NamespacedFleet(specs, base_dir=base / "fleet", heartbeat_interval="500ms") as fleet:
        work = base / "leader"
        work.mkdir()
        runtime = Path(tempfile.mkdtemp(prefix="ahn-", dir="/tmp"))  # short socket paths
        env = {**fleet.env(), "NO_COLOR": "1", "XDG_RUNTIME_DIR": str(runtime)}
        try:
            yield Lab(fleet, env, work)
        finally:
            shutil.rmtree(runtime, ignore_errors=True)


def _envelope(result: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert result.stdout.strip(), result.stderr
    document: dict[str, Any] = json.loads(result.stdout)
    return document


def _hosts(envelope: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {h["host"]: h for h in envelope["hosts"]}


def _log(host: dict[str, Any]) -> str:
    return Path(host["logPath"]).read_text(errors="replace")


@pytest.mark.parametrize("path", ["direct", "connect"])
def test_each_follower_runs_the_command_in_its_own_network_namespace(lab: Lab, path: str) -> None:
    env = NO_DIRECT if path == "connect" else {}
    paths = lab.cli("paths", "--json", env=env)
    assert paths.returncode == 0, paths.stderr
    methods = {p["host"]: p["method"] for p in json.loads(paths.stdout)["paths"]}
    assert methods == dict.fromkeys(NAMES, path)

    result = lab.cli(
        "run",
        "--no-fence",
        "--json",
        "--",
        "ip",
        "-4",
        "-o",
        "addr",
        "show",
        "dev",
        "eth0",
        env=env,
    )
    assert result.returncode == 0, result.stderr
    hosts = _hosts(_envelope(result))
    assert set(hosts) == set(NAMES)
    for name, host in hosts.items():
        assert host["state"] == "ok", host
        log = _log(host)
        own = lab.fleet.address(name)
        assert f"inet {own}/" in log, (name, log)
        others = [lab.fleet.address(n) for n in NAMES if n != name]
        assert not any(f"inet {o}/" in log for o in others), (name, log)


def test_a_follower_cut_off_mid_run_fails_alone_and_returns_when_the_network_does(
    lab: Lab,
) -> None:
    fleet = lab.fleet
    victim = "nf-2"
    started = fleet.follower(victim).workspace / "started"
    started.unlink(missing_ok=True)
    run = subprocess.Popen(
        [*CLI, "run", "--no-fence", "--json", "--timeout", "60s", "--",
         "sh", "-c", "touch started; sleep 5; echo done-$((6 * 7))"],
        env={**lab.env, **NO_DIRECT},
        cwd=lab.work,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        wait_for(started.exists, 60.0, what=f"the command to start on {victim}")
        fleet.partition(victim)
        cut_at = time.monotonic()
        stdout, stderr = run.communicate(timeout=CLI_TIMEOUT_S)
        took = time.monotonic() - cut_at
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
        fleet.heal(victim)

    assert run.returncode not in (0, None), (run.returncode, stderr)
    envelope = json.loads(stdout)
    hosts = _hosts(envelope)
    for name in ("nf-1", "nf-3"):
        assert hosts[name]["state"] == "ok", hosts[name]
        assert "done-42" in _log(hosts[name])
    cut = hosts[victim]
    assert cut["state"] == "unreachable", cut
    assert cut["exitCode"] is None, cut
    # Found by the liveness check (a ping once the command ran 1 s unheard, the connect
    # timeout to answer), long before the run's 60 s timeout or the keepalive's 45 s.
    assert "no answer to a liveness check" in cut["error"], cut
    assert "done-42" not in _log(cut)
    assert envelope["summary"]["succeeded"] == 2
    assert took < 30.0, took

    # Back on the network: the follower reconnects to the access point, and a new run
    # reaches it again.
    fleet.wait_health(dict.fromkeys(NAMES, "healthy"), timeout=60.0)
    again = lab.cli("run", "--no-fence", "--json", "--", "echo", "back", env=NO_DIRECT)
    assert again.returncode == 0, again.stderr
    assert {h["host"]: h["state"] for h in _envelope(again)["hosts"]} == dict.fromkeys(NAMES, "ok")


def test_a_follower_restarted_with_a_new_enrollment_gets_a_path_fixed_again(lab: Lab) -> None:
    fleet = lab.fleet
    name = "nf-3"
    first = lab.cli("paths", "--json", "--host", name, env=NO_DIRECT)
    assert first.returncode == 0, first.stderr

    follower = fleet.follower(name)
    assert follower.terminate() == 0
    fleet.wait_health({name: "offline"}, timeout=30.0)
    down = lab.cli("run", "--no-fence", "--json", "--host", name, "--", "true", env=NO_DIRECT)
    assert down.returncode != 0
    assert _hosts(_envelope(down))[name]["state"] == "unreachable", down.stdout

    began = time.monotonic()
    follower.enroll(force=True)  # a new identity from a fresh one-time token
    follower.start()
    follower.wait_ready(timeout=30.0)
    fleet.wait_health({name: "healthy"}, timeout=30.0)
    again = lab.cli("paths", "--json", "--host", name, env=NO_DIRECT)
    assert again.returncode == 0, again.stderr
    document = json.loads(again.stdout)
    assert [p["method"] for p in document["paths"]] == ["connect"]
    fixed = [e for e in document["events"] if e["type"] == "connect.path.fixed"]
    assert [e["host"] for e in fixed] == [name]
    run = lab.cli(
        "run", "--no-fence", "--json", "--host", name, "--", "echo", "again", env=NO_DIRECT
    )
    assert run.returncode == 0, run.stderr
    assert "again" in _log(_hosts(_envelope(run))[name])
    assert time.monotonic() - began < 60.0


def test_a_restarted_sshd_keeps_its_host_key_and_the_pinned_leader_gets_back_in(lab: Lab) -> None:
    fleet = lab.fleet
    name = "nf-1"
    follower = fleet.follower(name)
    key_before = follower.sshd.host_public_key
    follower.kill_sshd()
    gone = lab.cli("run", "--no-fence", "--json", "--host", name, "--", "true")
    assert gone.returncode != 0
    assert _hosts(_envelope(gone))[name]["state"] == "unreachable", gone.stdout

    follower.start_sshd()  # same directory, port 22 of the same address, same host key
    assert follower.sshd.host_public_key == key_before
    back = lab.cli("run", "--no-fence", "--json", "--host", name, "--", "echo", "same-key")
    assert back.returncode == 0, back.stderr
    assert "same-key" in _log(_hosts(_envelope(back))[name])


def test_a_warm_agent_finds_a_follower_cut_off_between_runs_within_seconds(
    lab: Lab, tmp_path: Path
) -> None:
    fleet = lab.fleet
    victim = "nf-1"
    with AgentFleet.running(fleet, lab.work, tmp_path / "home", extra_env=NO_DIRECT) as agent:
        for _ in range(2):  # the agent holds a warm transport to every follower
            warm, _ = agent.cli("run", "--no-fence", "--json", "--", "true")
            assert warm.returncode == 0, warm
        try:
            fleet.partition(victim)
            began = time.monotonic()
            cut, _ = agent.cli("run", "--no-fence", "--json", "--", "echo", "hi")
            took = time.monotonic() - began
        finally:
            fleet.heal(victim)
        assert cut.returncode != 0, cut
        hosts = _hosts(json.loads(cut.stdout))
        assert {n: h["state"] for n, h in hosts.items()} == {
            "nf-1": "unreachable", "nf-2": "ok", "nf-3": "ok",
        }  # fmt: skip
        assert "no answer to a liveness check" in hosts[victim]["error"], hosts[victim]
        # The command had gone out on the idle transport; the check (after 1 s quiet, 5 s to
        # answer) finds the silence. The keepalive alone took 15 + 30 s.
        assert took < 25.0, took

        fleet.wait_health(dict.fromkeys(NAMES, "healthy"), timeout=60.0)
        again, _ = agent.cli("run", "--no-fence", "--json", "--", "echo", "back")
        assert again.returncode == 0, again
