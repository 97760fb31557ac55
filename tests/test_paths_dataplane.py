"""Data-plane paths end to end (issue 4): a real access point with its CONNECT listener, real
followers each with a real sshd, a second access point that relays, the real
``ah-fleetctl``; path selection driven in-process where a test needs its events.

One fleet per module: ``pa-1`` and ``pa-2`` (honest), ``pa-bad`` (advertises the
fingerprint of another host key, as a tampered follower would).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import pytest

from ah_connectivity.path_selection import FailureKind
from ah_domain_types import (
    FollowerStatus,
    PathDegradedEvent,
    PathFailedEvent,
    PathFixedEvent,
    PathPolicyConfig,
    PathRestoredEvent,
    TransportMethod,
)
from ah_fleetctl.dataplane import SshLogin
from ah_fleetctl.paths import (
    AccessPointEndpoint,
    PathConnector,
    PathDialer,
    PathSettings,
    PathUnreachable,
)
from ah_harness_local import wait_for
from ah_harness_local.fleet import FollowerSpec, LocalFleet
from ah_harness_local.sshd import _generate_key
from ah_ssh_bridge import SshOptions, fingerprint_of_key_blob

CLI = [sys.executable, "-m", "ah_fleetctl"]
CLI_TIMEOUT_S = 90.0


@dataclass
class PathsFleet:
    fleet: LocalFleet
    env: dict[str, str]
    work: Path
    relay_api: str
    relay_connect_port: int
    wrong_fingerprint: str

    def cli(
        self, *args: str, env: dict[str, str] | None = None, timeout: float = CLI_TIMEOUT_S
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*CLI, *args],
            env={**self.env, **(env or {})},
            cwd=self.work,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def config(self, name: str, text: str) -> Path:
        path = self.work.parent / f"{name}.toml"
        path.write_text(text)
        return path

    def followers(self) -> dict[str, FollowerStatus]:
        raw = self.fleet.list_followers()
        statuses = msgspec.convert(raw, list[FollowerStatus], from_attributes=False)
        return {f.info.name: f for f in statuses}


@pytest.fixture(scope="module")
def paths_fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PathsFleet]:
    base = tmp_path_factory.mktemp("paths")
    other_key = base / "other-host-key"
    _generate_key(other_key, "not the sshd's host key")
    specs = [
        FollowerSpec("pa-1"),
        FollowerSpec("pa-2"),
        FollowerSpec("pa-bad", run_args=("--ssh-host-key-file", f"{other_key}.pub")),
    ]
    with LocalFleet(specs, base_dir=base / "fleet", heartbeat_interval="1s") as fleet:
        relay = fleet.start_relay_access_point()
        work = base / "leader"
        work.mkdir()
        (base / "home").mkdir()
        # Short: ControlMaster socket paths must fit a sockaddr_un.
        runtime = Path(tempfile.mkdtemp(prefix="ahp-", dir="/tmp"))
        env = {
            **fleet.env(),
            "NO_COLOR": "1",
            "HOME": str(base / "home"),
            # Private runtime dir (agent sockets, ControlMaster sockets) per test run.
            "XDG_RUNTIME_DIR": str(runtime),
        }
        env.pop("RUST_LOG", None)
        blob = (Path(f"{other_key}.pub").read_text().split()[1]).encode()
        import base64

        yield PathsFleet(
            fleet=fleet,
            env=env,
            work=work,
            relay_api=f"https://127.0.0.1:{relay['apiPort']}",
            relay_connect_port=int(relay["connectPort"]),
            wrong_fingerprint=fingerprint_of_key_blob(base64.b64decode(blob)),
        )
        _stop_agents(runtime / "agent-harbor" / "agents")
        shutil.rmtree(runtime, ignore_errors=True)


def _paths(result: subprocess.CompletedProcess[str]) -> dict[str, dict[str, Any]]:
    document = json.loads(result.stdout)
    return {p["host"]: p for p in document["paths"]}


def _tunnels_opened(fleet: LocalFleet, follower: str) -> int:
    assert fleet.access_point is not None
    text = fleet.access_point.log_text()
    return sum(
        1 for line in text.splitlines() if "opened" in line and f"follower={follower} " in line
    )


# --------------------------------------------------------------------------- selection


def test_direct_and_connect_paths_are_fixed_and_used(paths_fleet: PathsFleet) -> None:
    pf = paths_fleet
    direct = pf.cli("paths", "--json", "--host", "pa-1", "--host", "pa-2")
    assert direct.returncode == 0, direct.stderr
    paths = _paths(direct)
    followers = pf.followers()
    for name in ("pa-1", "pa-2"):
        assert paths[name]["method"] == "direct"
        assert paths[name]["target"] == followers[name].info.direct_address
        assert paths[name]["relay"] is None
        assert paths[name]["rttEstimateMs"] > 0
    fixed = [e for e in json.loads(direct.stdout)["events"] if e["type"] == "connect.path.fixed"]
    assert sorted(e["host"] for e in fixed) == ["pa-1", "pa-2"]

    before = _tunnels_opened(pf.fleet, "pa-1")
    no_direct = {"AH_PATH_POLICY_ALLOW_DIRECT": "false"}
    connect = pf.cli("paths", "--json", "--host", "pa-1", env=no_direct)
    assert connect.returncode == 0, connect.stderr
    assert _paths(connect)["pa-1"]["method"] == "connect"
    assert _paths(connect)["pa-1"]["target"] == "pa-1:22"

    # The run goes through the tunnel too (the access point logs who opened it).
    run = pf.cli(
        "run", "--no-fence", "--json", "--host", "pa-1", "--", "echo", "via-connect", env=no_direct
    )
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["hosts"][0]["state"] == "ok"
    wait_for(
        lambda: _tunnels_opened(pf.fleet, "pa-1") >= before + 2,
        10.0,
        what="the access point logging the CONNECT tunnels to pa-1",
    )
    assert "subject=harness" in pf.fleet.access_point.log_text()  # type: ignore[union-attr]


def test_relay_through_a_second_access_point(paths_fleet: PathsFleet) -> None:
    pf = paths_fleet
    config = pf.config(
        "relay",
        "[path-policy]\n"
        "# the home access point counts as unreachable: only relays may be used\n"
        'methods = ["relay"]\n'
        f'relays = ["{pf.relay_api}"]\n',
    )
    result = pf.cli("--config", str(config), "paths", "--json", "--host", "pa-2")
    assert result.returncode == 0, result.stderr
    path = _paths(result)["pa-2"]
    assert path["method"] == "relay"
    assert path["relay"] == f"127.0.0.1:{pf.relay_connect_port}"
    assert path["target"] == f"pa-2@127.0.0.1:{pf.fleet.connect_port}:22"
    run = pf.cli(
        "--config",
        str(config),
        "run",
        "--no-fence",
        "--json",
        "--host",
        "pa-2",
        "--",
        "echo",
        "relayed",
    )
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["summary"]["succeeded"] == 1


def test_host_key_mismatch_names_both_fingerprints(paths_fleet: PathsFleet) -> None:
    pf = paths_fleet
    result = pf.cli("paths", "--json", "--host", "pa-bad")
    assert result.returncode == 5, result.stderr
    path = _paths(result)["pa-bad"]
    assert path["method"] is None
    assert path["kind"] == "host-key"
    real = pf.fleet.follower("pa-bad").sshd.host_key_path
    blob = Path(f"{real}.pub").read_text().split()[1]
    import base64

    actual = fingerprint_of_key_blob(base64.b64decode(blob))
    assert pf.wrong_fingerprint in path["error"]
    assert actual in path["error"]
    # Every method met the same key: each failure says host-key.
    assert {f["kind"] for f in path["failures"]} == {"host-key"}
    assert {f["method"] for f in path["failures"]} == {"direct", "connect"}


# --------------------------------------------------------------------------- in-process


def _connector(
    pf: PathsFleet,
    settings: PathSettings,
    policy: PathPolicyConfig,
    events: list[Any],
) -> PathConnector:
    fleet = pf.fleet
    dialer = PathDialer(
        login=SshLogin(user=fleet.ssh_user, identity_file=fleet.leader_key),
        options=SshOptions(connect_timeout_s=settings.per_method_timeout_s),
        home=AccessPointEndpoint(
            url=fleet.api_url, host="127.0.0.1", connect_port=fleet.connect_port
        ),
        ca_pem=fleet.ca_path.read_bytes(),
        token=fleet.user_token,
    )
    return PathConnector(dialer, settings, policy, emit=events.append)


def test_paused_follower_degrades_then_restores(paths_fleet: PathsFleet) -> None:
    pf = paths_fleet
    follower = pf.followers()["pa-1"]
    handle = pf.fleet.follower("pa-1")
    events: list[Any] = []
    settings = PathSettings(
        per_method_timeout_s=5.0,
        overall_timeout_s=20.0,
        probe_interval_s=0.2,
        probe_timeout_s=0.5,
        failures_to_degrade=3,
    )

    async def scenario() -> None:
        connector = _connector(pf, settings, PathPolicyConfig(allow_direct=False), events)
        try:
            transport = await connector.connect(follower)
            assert (await transport.capture("echo before")).stdout == ["before"]
            handle.pause()  # the follower daemon (its tunnel end) stops answering
            try:
                await _until(lambda: any(isinstance(e, PathDegradedEvent) for e in events), 15)
            finally:
                handle.resume()
            await _until(lambda: any(isinstance(e, PathRestoredEvent) for e in events), 30)
            # The next command works without anyone doing anything.
            again = await connector.connect(follower)
            assert (await again.capture("echo after")).stdout == ["after"]
        finally:
            await connector.close()

    asyncio.run(scenario())
    kinds = [type(e) for e in events if not isinstance(e, PathFailedEvent)]
    assert kinds[:3] == [PathFixedEvent, PathDegradedEvent, PathRestoredEvent], events
    degraded = next(e for e in events if isinstance(e, PathDegradedEvent))
    assert degraded.failures == 3
    assert degraded.path is not None and degraded.path.method is TransportMethod.CONNECT
    restored = next(e for e in events if isinstance(e, PathRestoredEvent))
    assert restored.path.method is TransportMethod.CONNECT
    assert degraded.ts_ms <= restored.ts_ms


async def _until(predicate: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"condition not met within {timeout}s"
        await asyncio.sleep(0.02)


def test_blackholed_path_times_out_with_the_defined_error_and_event(
    paths_fleet: PathsFleet,
) -> None:
    pf = paths_fleet
    follower = pf.followers()["pa-2"]
    # A listener that accepts TCP (the kernel does) but never says a word: SSH waits forever.
    with socket.create_server(("127.0.0.1", 0)) as silent:
        address = f"127.0.0.1:{silent.getsockname()[1]}"
        blackholed = msgspec.structs.replace(
            follower, info=msgspec.structs.replace(follower.info, direct_address=address)
        )
        events: list[Any] = []
        settings = PathSettings(per_method_timeout_s=0.5, overall_timeout_s=10.0)
        policy = PathPolicyConfig(methods=[TransportMethod.DIRECT])

        async def scenario() -> PathUnreachable:
            connector = _connector(pf, settings, policy, events)
            try:
                started = time.monotonic()
                with pytest.raises(PathUnreachable) as caught:
                    await connector.connect(blackholed)
                assert time.monotonic() - started < 5.0
                return caught.value
            finally:
                await connector.close()

        error = asyncio.run(scenario())
    assert error.kind == FailureKind.TIMEOUT.value
    assert error.host == "pa-2"
    assert f"direct {address}" in error.reason and "timeout" in error.reason
    (failed,) = [e for e in events if isinstance(e, PathFailedEvent)]
    assert failed.host == "pa-2"
    assert failed.methods_tried == [TransportMethod.DIRECT]
    (failure,) = failed.failures
    assert (failure.method, failure.target, failure.kind) == (
        TransportMethod.DIRECT,
        address,
        "timeout",
    )
    assert 400 <= failure.ended_ms - failure.started_ms < 3000
    assert "no result within 0.5s" in failure.error
    assert failed.reason == error.reason


# --------------------------------------------------------------------------- OpenSSH


def test_plain_ssh_reaches_a_follower_by_name_through_connect(paths_fleet: PathsFleet) -> None:
    pf = paths_fleet
    ssh = shutil.which("ssh")
    assert ssh is not None, "OpenSSH client missing"
    no_direct = {"AH_PATH_POLICY_ALLOW_DIRECT": "false"}
    generated = pf.cli("ssh-config", "--host", "pa-1", "--control-persist", "5s", env=no_direct)
    assert generated.returncode == 0, generated.stderr
    config = pf.work.parent / "ssh_config"
    config.write_text(generated.stdout)
    assert "Host pa-1\n" in generated.stdout
    assert "proxy %h %p" in generated.stdout and "StrictHostKeyChecking yes" in generated.stdout
    env = {**pf.env, **no_direct}
    before = _tunnels_opened(pf.fleet, "pa-1")
    try:
        done = subprocess.run(
            [ssh, "-F", str(config), "pa-1", "echo", "plain-ssh-$((6*7))"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            stdin=subprocess.DEVNULL,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == "plain-ssh-42"
        wait_for(
            lambda: _tunnels_opened(pf.fleet, "pa-1") > before,
            10.0,
            what="the ssh session's CONNECT tunnel in the access point log",
        )
    finally:
        subprocess.run(
            [ssh, "-F", str(config), "-O", "exit", "pa-1"],
            env=env,
            capture_output=True,
            timeout=30,
            stdin=subprocess.DEVNULL,
            check=False,
        )


# --------------------------------------------------------------------------- agent


def test_leader_agent_keeps_paths_and_runs_commands(paths_fleet: PathsFleet) -> None:
    pf = paths_fleet
    env = {
        "AH_AGENT_ENABLED": "true",
        "AH_AGENT_IDLE": "60s",
        "AH_PATH_POLICY_ALLOW_DIRECT": "false",
    }
    agents = Path(pf.env["XDG_RUNTIME_DIR"]) / "agent-harbor" / "agents"
    try:
        first = pf.cli("paths", "--json", "--host", "pa-1", "--host", "pa-2", env=env)
        assert first.returncode == 0, first.stderr
        (sock,) = list(agents.glob("*.sock"))
        assert (agents.stat().st_mode & 0o777) == 0o700
        assert {p["method"] for p in _paths(first).values()} == {"connect"}
        fixed_first = [e for e in json.loads(first.stdout)["events"]]
        opened = _tunnels_opened(pf.fleet, "pa-2")

        run = pf.cli(
            "run",
            "--no-fence",
            "--json",
            "--host",
            "pa-1",
            "--host",
            "pa-2",
            "--",
            "echo",
            "from-agent",
            env=env,
        )
        assert run.returncode == 0, run.stderr
        assert json.loads(run.stdout)["summary"]["succeeded"] == 2
        # The run reused the agent's transports: no new tunnel, the same fixed events.
        second = pf.cli("paths", "--json", "--host", "pa-1", "--host", "pa-2", env=env)
        assert json.loads(second.stdout)["events"] == fixed_first
        assert _tunnels_opened(pf.fleet, "pa-2") == opened

        bypass = pf.cli("paths", "--json", "--no-agent", "--host", "pa-1", env=env)
        assert bypass.returncode == 0, bypass.stderr
        assert list(agents.glob("*.sock")) == [sock]
    finally:
        _stop_agents(agents)


def _stop_agents(agents: Path) -> None:
    from ah_fleetctl.agent import AgentClient

    for sock in agents.glob("*.sock") if agents.is_dir() else []:

        async def stop(path: Path = sock) -> int | None:
            client = AgentClient(path)
            with contextlib.suppress(OSError):
                pid = (await client.ping()).pid
                await client.shutdown()
                return pid
            return None

        pid = asyncio.run(stop())
        if pid is not None:
            wait_for(lambda p=pid: not _alive(p), 15.0, what=f"leader agent {pid} to exit")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
