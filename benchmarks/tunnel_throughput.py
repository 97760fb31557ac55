"""Tunnel throughput through a CONNECT access point: data channel vs QUIC stream fallback.

Processes, as deployed: the access point (QUIC control server + TLS CONNECT listener) in one,
the follower (ControlClient) in another, a real sshd from ah_harness_local, and the client
(this process, or OpenSSH with a ProxyCommand).

* raw: bytes through the tunnel alone, client → access point → follower → a TCP sink;
* ssh: ``head -c N /dev/zero | ssh -o ProxyCommand=... 'cat > /dev/null'``.

    uv run python benchmarks/tunnel_throughput.py [--mb 200] [--quic-mb 32] [--methods data,quic]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import shlex
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from loguru import logger

from ah_connectivity import (
    ControlClient,
    ControlServer,
    FleetCA,
    Identity,
    TokenSigner,
    generate_private_key,
    issue_from_csr,
    issue_server_cert,
    make_csr,
    spiffe_id_for_follower,
)
from ah_connectivity.broker import TunnelBroker
from ah_connectivity.connect_client import open_connect_tunnel
from ah_connectivity.connect_server import ConnectProxyServer, token_authorizer
from ah_connectivity.data_channel import DataChannelHub
from ah_connectivity.tunnel import TunnelPolicy
from ah_domain_types import (
    ControlMessage,
    FollowerInfo,
    OsKind,
    Resources,
    StreamError,
    StreamErrorCode,
)

TD = "bench.fleet"
EXTRA_SSH_OPTIONS: list[str] = []
PROXY_PREFIX: list[str] = []
CHUNK = 256 * 1024


def _identity(cert_pem: bytes, key_pem: bytes) -> Identity:
    key: Any = serialization.load_pem_private_key(key_pem, None)
    return Identity(key=key, cert=x509.load_pem_x509_certificate(cert_pem))


class _Handler:
    def __getattr__(self, name: str) -> Any:
        return lambda *args: None


def access_point(
    ca_pem: bytes, ca_key_pem: bytes, methods: tuple[str, ...], out: Any, stop: Any
) -> None:
    logger.remove()
    key: Any = serialization.load_pem_private_key(ca_key_pem, None)
    ca = FleetCA(TD, key, x509.load_pem_x509_certificate(ca_pem))
    serve = issue_server_cert(ca)
    signer = TokenSigner.generate(TD)

    async def main() -> None:
        control = ControlServer(identity=serve, ca=ca, trust_domain=TD, handler=_Handler())
        quic_port = await control.start("127.0.0.1", 0)
        hub = DataChannelHub(ca, TD)
        broker = TunnelBroker(control.follower, data_hub=hub, methods=methods)  # type: ignore[arg-type]
        proxy = ConnectProxyServer(
            identity=serve,
            ca=ca,
            authorize=token_authorizer(signer.verifier()),
            open_tunnel=broker.open,
            data_hub=hub,
        )
        connect_port = await proxy.start("127.0.0.1", 0)
        out.put((quic_port, connect_port, signer.issue_user("bench", scopes=["ssh"])))
        await asyncio.get_running_loop().run_in_executor(None, stop.wait)
        await proxy.close()
        await control.close()

    asyncio.run(main())


def follower(
    ca_pem: bytes, cert_pem: bytes, key_pem: bytes, quic_port: int, ssh_port: int, sink_port: int,
    ready: Any, stop: Any,
) -> None:  # fmt: skip
    logger.remove()
    ca = x509.load_pem_x509_certificate(ca_pem)

    async def no_rpc(msg: ControlMessage) -> ControlMessage:
        return StreamError(code=StreamErrorCode.UNEXPECTED_MESSAGE, message="no")

    async def main() -> None:
        client = ControlClient(
            host="127.0.0.1",
            port=quic_port,
            identity=_identity(cert_pem, key_pem),
            ca=ca,
            trust_domain=TD,
            info=FollowerInfo(
                name="bench",
                os=OsKind.LINUX,
                arch="x86_64",
                tags={},
                resources=Resources(cpus=1, memory_mb=1),
                host_key_fingerprint="SHA256:x",
                direct_address=None,
                workspace="/tmp",
                version="0",
            ),
            on_rpc=no_rpc,
            tunnel_policy=TunnelPolicy.for_sshd(
                "127.0.0.1", ssh_port, extra=[("127.0.0.1", sink_port)]
            ),
        )
        task = asyncio.ensure_future(client.run())
        await client.wait_connected(10)
        ready.set()
        await asyncio.get_running_loop().run_in_executor(None, stop.wait)
        await client.stop()
        await task

    asyncio.run(main())


def sink_server() -> tuple[int, threading.Thread, list[int]]:
    listener = socket.create_server(("127.0.0.1", 0))
    got = [0]

    def run() -> None:
        while True:
            conn, _ = listener.accept()
            buf = bytearray(CHUNK)
            while n := conn.recv_into(buf):
                got[0] += n
            conn.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return int(listener.getsockname()[1]), thread, got


def raw_throughput(connect_port: int, ca_pem: bytes, token: str, sink_port: int, mb: int) -> float:
    sock = open_connect_tunnel(
        "127.0.0.1", connect_port, ca_pem=ca_pem, token=token, target=f"bench:{sink_port}"
    )
    payload = memoryview(bytes(CHUNK))
    start = time.monotonic()
    for _ in range(mb * 1024 * 1024 // CHUNK):
        sock.sendall(payload)
    socket.socket.shutdown(sock, socket.SHUT_WR)
    sock.recv(1)  # EOF comes back once the sink has read everything and closed
    seconds = time.monotonic() - start
    sock.close()
    return mb * 1.048576 / seconds


def ssh_throughput(
    sshd: Any, connect_port: int, tmp: Path, ca_pem: bytes, token: str, mb: int
) -> float:
    (tmp / "ca.pem").write_bytes(ca_pem)
    (tmp / "token").write_text(token)
    proxy = shlex.join(
        [*PROXY_PREFIX, sys.executable, "-m", "ah_connectivity.connect_client", "--access-point",
         f"127.0.0.1:{connect_port}", "--ca-file", str(tmp / "ca.pem"), "--token-file",
         str(tmp / "token"), "bench:22"]
    )  # fmt: skip
    ssh = sshd.ssh_command("cat > /dev/null", connect_timeout=20)
    cut = ssh.index("--")
    ssh[cut:cut] = ["-o", f"ProxyCommand={proxy}", *EXTRA_SSH_OPTIONS]
    warm = subprocess.run(
        [*ssh[:cut], "-o", f"ProxyCommand={proxy}", "--", sshd.destination, "true"]
    )
    assert warm.returncode == 0
    start = time.monotonic()
    shell = f"head -c {mb * 1024 * 1024} /dev/zero | {shlex.join(ssh)}"
    done = subprocess.run(shell, shell=True)
    seconds = time.monotonic() - start
    assert done.returncode == 0
    return mb * 1.048576 / seconds


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a live process (Linux /proc)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu(pids: dict[str, int]) -> dict[str, float]:
    return {name: cpu_seconds(pid) for name, pid in pids.items()}


def show(
    label: str, mb: int, rate: float, before: dict[str, float], after: dict[str, float]
) -> None:
    used = ", ".join(f"{k} {after[k] - before[k]:.2f}" for k in before)
    print(f"{label} {mb:4d} MB: {rate:7.1f} MB/s  (CPU s: {used})", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mb", type=int, default=200)
    parser.add_argument("--quic-mb", type=int, default=32)
    parser.add_argument("--methods", default="data,quic")
    parser.add_argument("--cipher", help="ssh -c CIPHER (e.g. aes128-gcm@openssh.com)")
    parser.add_argument("--time-proxy", action="store_true", help="report the ProxyCommand's CPU")
    args = parser.parse_args()
    if args.cipher:
        EXTRA_SSH_OPTIONS[:] = ["-c", args.cipher]
    if args.time_proxy:
        # (ssh percent-expands ProxyCommand: %% is a literal %)
        PROXY_PREFIX[:] = ["/usr/bin/time", "-f", "ProxyCommand CPU s: user %%U system %%S"]
    from ah_harness_local.sshd import start_sshd

    logger.remove()
    logger.add(sys.stderr, level="WARNING")
    ca = FleetCA.generate(TD)
    key = generate_private_key()
    cert = issue_from_csr(ca, make_csr(key, "bench"), spiffe_id_for_follower(TD, "bench"))
    key_pem = Identity(key=key, cert=cert).key_pem
    ca_key_pem = ca.key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    sink_port, _, _ = sink_server()
    with tempfile.TemporaryDirectory() as tmpdir, start_sshd(Path(tmpdir) / "sshd") as sshd:
        for method in args.methods.split(","):
            mb = args.mb if method == "data" else args.quic_mb
            out: Any = multiprocessing.Queue()
            stop: Any = multiprocessing.Event()
            ready: Any = multiprocessing.Event()
            ap = multiprocessing.Process(
                target=access_point, args=(ca.cert_pem, ca_key_pem, (method,), out, stop)
            )
            ap.start()
            quic_port, connect_port, token = out.get(timeout=30)
            fol = multiprocessing.Process(
                target=follower,
                args=(ca.cert_pem, cert.public_bytes(serialization.Encoding.PEM), key_pem,
                      quic_port, sshd.port, sink_port, ready, stop),
            )  # fmt: skip
            fol.start()
            assert ready.wait(30)
            pids = {"access point": ap.pid or 0, "follower": fol.pid or 0}
            try:
                before = cpu(pids)
                raw = raw_throughput(connect_port, ca.cert_pem, token, sink_port, mb)
                show(f"{method:4s} raw tunnel", mb, raw, before, cpu(pids))
                before = cpu(pids)
                ssh = ssh_throughput(sshd, connect_port, Path(tmpdir), ca.cert_pem, token, mb)
                show(f"{method:4s} ssh cat   ", mb, ssh, before, cpu(pids))
            finally:
                stop.set()
                fol.join(20)
                ap.join(20)
    print(f"load average: {os.getloadavg()}")


if __name__ == "__main__":
    main()
