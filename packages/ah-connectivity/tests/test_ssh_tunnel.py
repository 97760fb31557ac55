"""SSH through CONNECT tunnels to a real sshd (ah_harness_local): OpenSSH with a ProxyCommand
and paramiko over the socket `open_connect_tunnel` returns, for both tunnel paths."""

from __future__ import annotations

import hashlib
import os
import platform
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paramiko
import pytest

from ah_connectivity.tunnel import TunnelPolicy
from ah_harness_local.sshd import RunningSshd, start_sshd

METHODS = [pytest.param(("data",), id="data"), pytest.param(("quic",), id="quic")]


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningSshd]:
    with start_sshd(tmp_path_factory.mktemp("sshd")) as running:
        yield running


def proxy_command(tf: Any, tmp_path: Path, target: str) -> str:
    ca = tmp_path / "fleet-ca.pem"
    ca.write_bytes(tf.fleet.ca.cert_pem)
    token = tmp_path / "token"
    token.write_text(tf.token())
    token.chmod(0o600)
    return shlex.join(
        [
            sys.executable,
            "-m",
            "ah_connectivity.connect_client",
            "--access-point",
            f"127.0.0.1:{tf.port}",
            "--ca-file",
            str(ca),
            "--token-file",
            str(token),
            target,
        ]
    )


@pytest.mark.parametrize("methods", METHODS)
def test_openssh_runs_a_command_through_connect(
    tunnel_fleet_factory: Any, sshd: RunningSshd, tmp_path: Path, methods: Any
) -> None:
    tf = tunnel_fleet_factory(methods=methods)
    tf.add_follower("lin-a", TunnelPolicy.for_sshd("127.0.0.1", sshd.port))
    command = sshd.ssh_command("echo ok; uname -s", connect_timeout=20)
    # ssh_command ends with "--", destination, args; the ProxyCommand goes before them.
    cut = command.index("--")
    command[cut:cut] = ["-o", f"ProxyCommand={proxy_command(tf, tmp_path, 'lin-a:22')}"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["ok", platform.system()]
    (record,) = tf.wait_records(1)
    assert (record.method, record.follower, record.subject) == (methods[0], "lin-a", "alice")
    assert record.bytes_up > 0 and record.bytes_down > 0


def test_proxy_command_reports_refusals(
    tunnel_fleet_factory: Any, sshd: RunningSshd, tmp_path: Path
) -> None:
    tf = tunnel_fleet_factory(methods=("data",))
    done = subprocess.run(
        shlex.split(proxy_command(tf, tmp_path, "nobody:22")),
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 5, done.stderr
    assert "404" in done.stderr and "nobody" in done.stderr


@pytest.mark.parametrize("methods", METHODS)
def test_paramiko_over_the_tunnel_socket(
    tunnel_fleet_factory: Any, sshd: RunningSshd, methods: Any
) -> None:
    tf = tunnel_fleet_factory(methods=methods)
    tf.add_follower("lin-a", TunnelPolicy.for_sshd("127.0.0.1", sshd.port))
    sock = tf.connect("lin-a:22")
    transport = paramiko.Transport(sock)
    try:
        transport.start_client(timeout=20)
        key = transport.get_remote_server_key()
        assert f"{key.get_name()} {key.get_base64()}" == " ".join(sshd.host_public_key.split()[:2])
        transport.auth_publickey(
            sshd.user, paramiko.Ed25519Key.from_private_key_file(str(sshd.client_key_path))
        )
        channel = transport.open_session(timeout=20)
        channel.exec_command("echo ok")
        output = b""
        while chunk := channel.recv(4096):
            output += chunk
        assert channel.recv_exit_status() == 0
        assert output == b"ok\n"
    finally:
        transport.close()
    (record,) = tf.wait_records(1)
    assert record.method == methods[0]


@pytest.mark.parametrize("methods", METHODS)
def test_openssh_bulk_transfer_keeps_every_byte(
    tunnel_fleet_factory: Any, sshd: RunningSshd, tmp_path: Path, methods: Any
) -> None:
    """50 MB up and down through the ProxyCommand, the access point's splice and the
    follower's (the QUIC fallback moves a few MB/s: it gets 4 MB), checked by sha256 at the
    far end; ``sha256sum`` only answers once stdin's EOF crossed every hop."""
    tf = tunnel_fleet_factory(methods=methods)
    tf.add_follower("lin-a", TunnelPolicy.for_sshd("127.0.0.1", sshd.port))
    size = (50 if methods[0] == "data" else 4) << 20
    payload = tmp_path / "payload"
    payload.write_bytes(os.urandom(size))
    expected = hashlib.sha256(payload.read_bytes()).hexdigest()
    proxy = ["-o", f"ProxyCommand={proxy_command(tf, tmp_path, 'lin-a:22')}"]

    def ssh(remote: str) -> list[str]:
        command = sshd.ssh_command(remote, connect_timeout=20)
        cut = command.index("--")
        command[cut:cut] = proxy
        return command

    with payload.open("rb") as stdin:
        up = subprocess.run(ssh("sha256sum"), stdin=stdin, capture_output=True, timeout=300)
    assert up.returncode == 0, up.stderr
    assert up.stdout.split()[0].decode() == expected
    down = subprocess.run(ssh(f"cat {shlex.quote(str(payload))}"), capture_output=True, timeout=300)
    assert down.returncode == 0, down.stderr
    assert len(down.stdout) == size
    assert hashlib.sha256(down.stdout).hexdigest() == expected
    records = tf.wait_records(2)
    assert [r.method for r in records] == [methods[0]] * 2
    assert all(r.outcome == "eof" for r in records), records
    assert records[0].bytes_up > size and records[1].bytes_down > size
