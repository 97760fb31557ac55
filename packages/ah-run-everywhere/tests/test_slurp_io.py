"""``slurp_io.slurp`` over real SSH transports to a real sshd (the "follower" workspace is a
local directory: sshd runs on this machine)."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest

from ah_domain_types import FilesetSpec, OsKind
from ah_harness_local import RunningSshd
from ah_harness_local.pytest_plugin import SshdFactory
from ah_run_everywhere import HostUnreachable
from ah_run_everywhere.slurp import SlurpEnvelope
from ah_run_everywhere.slurp_io import SlurpTarget, slurp
from ah_ssh_bridge import SshTransport

T = TypeVar("T")


def run_async(coro: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
    async def bounded() -> T:
        async with asyncio.timeout(timeout):
            return await coro

    return asyncio.run(bounded())


@pytest.fixture(scope="module")
def server(sshd_factory: SshdFactory) -> RunningSshd:
    return sshd_factory(name="slurp-io")


async def connect(sshd: RunningSshd, name: str) -> SshTransport:
    return await SshTransport.connect(
        sshd.listen,
        sshd.port,
        host=name,
        username=sshd.user,
        key_path=sshd.client_key_path,
        expected_fingerprint=sshd.host_key_fingerprint,
    )


def test_a_dead_transport_is_replaced_once_and_every_file_arrives_verified(
    server: RunningSshd, tmp_path: Path
) -> None:
    workspace = tmp_path / "ws"
    files = {f"out/f{i:02d}.bin": bytes([i]) * (1000 * i + 1) for i in range(12)}
    files["out/deep/er/name with spaces.txt"] = b"spaces\n"
    for relative, data in files.items():
        (workspace / relative).parent.mkdir(parents=True, exist_ok=True)
        (workspace / relative).write_bytes(data)
    spec = FilesetSpec(name="out", include=("out/**",), exclude=("*.tmp",))
    relinks: list[str] = []

    async def body() -> SlurpEnvelope:
        dead = await connect(server, "h1")
        await dead.close()  # the first use fails: a transient error, then one relink
        current = {"h1": dead}

        async def relink(name: str) -> SshTransport:
            relinks.append(name)
            current[name] = await connect(server, name)
            return current[name]

        def transport_for(name: str) -> SshTransport:
            if name not in current:
                raise HostUnreachable(name, "never linked")
            return current[name]

        try:
            return await slurp(
                [spec],
                [
                    SlurpTarget(name="h1", os=OsKind.LINUX, workspace=str(workspace)),
                    SlurpTarget(name="h2", os=OsKind.LINUX, workspace=str(workspace)),
                ],
                transport_for=transport_for,
                relink=relink,
                unreachable={"h2": "no path (test)"},
                dest=tmp_path / "dest",
                concurrency=3,
            )
        finally:
            for transport in current.values():
                await transport.close()

    envelope = run_async(body())
    assert relinks == ["h1"]
    assert envelope.unreachable == {"h2": "no path (test)"}
    assert envelope.exit_code == 1  # h2 never answered
    (fileset,) = envelope.filesets
    assert fileset.answered == ["h1"]
    assert [(h.host, h.state) for h in fileset.hosts] == [("h1", "ok"), ("h2", "unreachable")]
    dest = tmp_path / "dest"
    for relative, data in files.items():
        assert (dest / relative).read_bytes() == data, relative
    metadata = json.loads((dest / "out.slurp.json").read_text())
    assert {m["path"]: m["sha256"] for m in metadata} == {
        relative: hashlib.sha256(data).hexdigest() for relative, data in files.items()
    }
    assert not list(dest.glob(".ah-slurp-*"))
