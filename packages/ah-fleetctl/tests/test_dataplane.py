"""The data plane against a real sshd: linking, host-key pinning, unreachable reasons, the
generated OpenSSH config (used by a real ``ssh``), workspaces and path mapping."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest

from ah_domain_types import (
    FollowerHealth,
    FollowerInfo,
    FollowerStatus,
    OsKind,
    PathPolicyConfig,
    Resources,
)
from ah_fleetctl.dataplane import (
    DirectConnector,
    FleetLinks,
    leader_workspace,
    ssh_alias,
    stop_control_masters,
)
from ah_harness_local import RunningSshd, free_tcp_port
from ah_harness_local.pytest_plugin import SshdFactory

T = TypeVar("T")
OTHER_FINGERPRINT = "SHA256:uNiVztksCsDhcc0u9e8BujQXVUpKZIDTMczCvj3tD2s"


def run_async(coro: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
    async def bounded() -> T:
        async with asyncio.timeout(timeout):
            return await coro

    return asyncio.run(bounded())


def follower(
    name: str,
    *,
    address: str | None,
    fingerprint: str,
    workspace: str = "/srv/ws",
    os: OsKind = OsKind.LINUX,
    tags: dict[str, str] | None = None,
) -> FollowerStatus:
    info = FollowerInfo(
        name=name,
        os=os,
        arch="x86_64",
        tags=tags or {},
        resources=Resources(cpus=1, memory_mb=1024),
        host_key_fingerprint=fingerprint,
        direct_address=address,
        workspace=workspace,
        version="0.1.0",
    )
    return FollowerStatus(
        info=info, health=FollowerHealth.HEALTHY, last_heartbeat_ms=None, connected_since_ms=None
    )


@pytest.fixture(scope="module")
def server(sshd_factory: SshdFactory) -> RunningSshd:
    return sshd_factory(name="dataplane")


def test_links_pin_host_keys_and_name_every_unreachable_follower(
    server: RunningSshd, tmp_path: Path
) -> None:
    address = f"{server.listen}:{server.port}"
    good = follower("good", address=address, fingerprint=server.host_key_fingerprint)
    followers = [
        good,
        follower("impostor", address=address, fingerprint=OTHER_FINGERPRINT),
        follower(
            "closed",
            address=f"127.0.0.1:{free_tcp_port()}",
            fingerprint=server.host_key_fingerprint,
        ),
        follower("hidden", address=None, fingerprint=server.host_key_fingerprint),
        follower("blocked", address=address, fingerprint=server.host_key_fingerprint),
    ]
    connector = DirectConnector(
        server.user,
        server.client_key_path,
        policy=PathPolicyConfig(direct_hosts=["good", "impostor", "closed", "hidden"]),
    )
    config = tmp_path / "ssh" / "config"

    async def body() -> tuple[FleetLinks, list[str], str]:
        async with await FleetLinks.open(followers, connector, connect_timeout=10) as links:
            probe = await links.transport("good").capture("echo linked")
            links.ssh_config(config)
            old = links.transport("good")
            await old.close()
            fresh = await links.relink("good")
            assert fresh is not old and fresh.is_active
            return links, probe.stdout, links.host_keys["good"]

    links, out, host_key = run_async(body())
    assert out == ["linked"]
    assert links.linked == []  # closed
    assert links.names == [f.info.name for f in followers]
    kinds = {name: error.kind for name, error in links.unreachable.items()}
    assert kinds == {
        "impostor": "host-key",
        "closed": "refused",
        "hidden": "no-address",
        "blocked": "policy",
    }
    assert "expected " + OTHER_FINGERPRINT in links.unreachable["impostor"].reason
    assert "refused" in links.unreachable["closed"].reason
    assert host_key == " ".join(server.host_public_key.split()[:2])

    # The generated config: only linked hosts, the verified key, and it works with ssh.
    text = config.read_text()
    assert f"Host {ssh_alias('good')}\n" in text and "impostor" not in text
    for line in ("StrictHostKeyChecking yes", "BatchMode yes", "ControlMaster auto"):
        assert f"  {line}\n" in text
    known = config.with_name("config.known_hosts").read_text()
    assert known == f"[{server.listen}]:{server.port} {host_key}\n"
    ssh = shutil.which("ssh")
    assert ssh is not None
    try:
        result = subprocess.run(
            [ssh, "-F", str(config), "ah-good", "echo", "over-openssh"],
            capture_output=True,
            text=True,
            timeout=30,
            stdin=subprocess.DEVNULL,
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout == "over-openssh\n"
        check = [ssh, "-F", str(config), "-O", "check", "ah-good"]
        assert subprocess.run(check, capture_output=True, timeout=10).returncode == 0
    finally:
        stop_control_masters(config, ["good"])
    assert subprocess.run(check, capture_output=True, timeout=10).returncode != 0


def test_leader_workspace_is_the_repo_root_else_the_directory(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    (repo / ".git").mkdir(parents=True)
    (repo / "src" / "pkg").mkdir(parents=True)
    assert leader_workspace(repo / "src" / "pkg") == repo
    plain = tmp_path / "plain" / "dir"
    plain.mkdir(parents=True)
    assert leader_workspace(plain) == plain
    agents = tmp_path / "agents"
    (agents / ".agents").mkdir(parents=True)
    (agents / "x").mkdir()
    assert leader_workspace(agents / "x") == agents


def test_working_directories_map_into_each_followers_workspace(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    (repo / ".git").mkdir(parents=True)
    sub = repo / "src" / "app"
    sub.mkdir(parents=True)
    followers = [
        follower("lin", address=None, fingerprint=OTHER_FINGERPRINT, workspace="/srv/ws"),
        follower(
            "win", address=None, fingerprint=OTHER_FINGERPRINT, workspace="C:/ws", os=OsKind.WINDOWS
        ),
        follower("mac", address=None, fingerprint=OTHER_FINGERPRINT, workspace="/Users/ci/ws"),
    ]
    links = FleetLinks(
        followers,
        DirectConnector("u", tmp_path / "key"),
        leader_root=sub,
        workspaces={"mac": "/Volumes/build/ws"},
    )
    assert links.leader_root == repo
    cwds = {t.name: t.cwd for t in links.target_hosts(sub)}
    assert cwds == {
        "lin": "/srv/ws/src/app",
        "win": "C:\\ws\\src\\app",
        "mac": "/Volumes/build/ws/src/app",
    }
