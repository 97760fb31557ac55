"""The ProxyCommand process (``python -m ah_connectivity.connect_client``) and the splice it
runs: bytes intact both ways, EOF carried as a half-close in each direction, a reset ends it
with a failure — all through a real access point and a follower's data connection."""

from __future__ import annotations

import hashlib
import os
import socket
import ssl
import struct
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from ah_connectivity import splice as splice_module
from ah_connectivity.splice import Splice, SpliceEnd
from ah_connectivity.tls import client_context, server_context
from ah_connectivity.tls_socket import TlsSocket, wrap_tls
from ah_connectivity.tunnel import TunnelPolicy
from ah_harness_local import wait_for

EchoServer = Any  # conftest.EchoServer (fixtures only: conftest is not importable here)


def proxy_argv(tf: Any, tmp_path: Path, target: str) -> list[str]:
    ca = tmp_path / "fleet-ca.pem"
    ca.write_bytes(tf.fleet.ca.cert_pem)
    token = tmp_path / "token"
    token.write_text(tf.token())
    token.chmod(0o600)
    return [
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


def test_proxy_carries_bulk_and_half_closes_both_ways(
    tunnel_fleet_factory: Any, echo_server: EchoServer, tmp_path: Path
) -> None:
    tf = tunnel_fleet_factory(methods=("data",))
    tf.add_follower("f1", TunnelPolicy.for_sshd("127.0.0.1", echo_server.port))
    payload = os.urandom(24 << 20)
    proc = subprocess.Popen(
        proxy_argv(tf, tmp_path, "f1:22"),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdin is not None and proc.stdout is not None

    def feed() -> None:
        assert proc.stdin is not None
        proc.stdin.write(payload)
        proc.stdin.close()  # EOF → the proxy half-closes → the echo server sees EOF

    feeder = threading.Thread(target=feed)
    feeder.start()
    echoed = proc.stdout.read()  # the echo server's EOF comes back as stdout's EOF
    feeder.join()
    assert proc.wait(60) == 0, proc.stderr.read() if proc.stderr else ""
    assert hashlib.sha256(echoed).hexdigest() == hashlib.sha256(payload).hexdigest()
    assert echo_server.closed == ["eof"]
    (record,) = tf.wait_records(1)
    assert (record.bytes_up, record.bytes_down, record.outcome) == (
        len(payload),
        len(payload),
        "eof",
    )


def test_proxy_delivers_the_far_end_eof_while_stdin_stays_open(
    tunnel_fleet_factory: Any, tmp_path: Path
) -> None:
    """The destination says something and closes; ssh has not closed the proxy's stdin. The
    proxy still passes the bytes and the EOF on and exits cleanly."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.sendall(b"SSH-2.0-goodbye\r\n")
            conn.shutdown(socket.SHUT_WR)
            while conn.recv(65536):
                pass

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    tf = tunnel_fleet_factory(methods=("data",))
    tf.add_follower("f1", TunnelPolicy.for_sshd("127.0.0.1", port))
    proc = subprocess.Popen(
        proxy_argv(tf, tmp_path, "f1:22"),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.read() == b"SSH-2.0-goodbye\r\n"
        assert proc.wait(30) == 0, proc.stderr.read() if proc.stderr else ""
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        listener.close()


def test_proxy_fails_loudly_when_the_tunnel_is_reset(
    tunnel_fleet_factory: Any, echo_server: EchoServer, tmp_path: Path
) -> None:
    tf = tunnel_fleet_factory(methods=("data",))
    tf.add_follower("f1", TunnelPolicy.for_sshd("127.0.0.1", echo_server.port))
    proc = subprocess.Popen(
        proxy_argv(tf, tmp_path, "f1:22"),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(b"ping")
        proc.stdin.flush()
        assert proc.stdout.read(4) == b"ping"
        echo_server.reset_all()
        code = proc.wait(30)  # stdin is still open: only the reset ends it
        stderr = proc.stderr.read().decode() if proc.stderr else ""
        assert code == 5, stderr
        assert "tunnel to f1:22 broke" in stderr
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    (record,) = tf.wait_records(1)
    assert record.outcome == "reset"


# ------------------------------------------------------------------------ splice and TLS


def tls_pair(fleet: Any) -> tuple[TlsSocket, TlsSocket]:
    """A connected client/server pair of TlsSockets over loopback TCP."""
    listener = socket.create_server(("127.0.0.1", 0))
    server_ctx = server_context(fleet.server, fleet.ca, client_certs=False)
    accepted: list[TlsSocket] = []

    def accept() -> None:
        conn, _ = listener.accept()
        conn.settimeout(10)
        accepted.append(wrap_tls(server_ctx, conn, server_side=True))

    thread = threading.Thread(target=accept)
    thread.start()
    raw = socket.create_connection(listener.getsockname(), timeout=10)
    client = wrap_tls(client_context(fleet.ca), raw)
    thread.join(10)
    listener.close()
    (server,) = accepted
    return client, server


@pytest.fixture(params=["poll", "selectors"])
def readiness(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each splice test with both ways the loop waits: ``select.poll`` (Linux) and the
    ``selectors`` adapter macOS and Windows use, which would otherwise go untested here."""
    if request.param == "selectors":
        monkeypatch.setattr(splice_module, "_poller", splice_module._SelectorPoller)
    elif sys.platform != "linux":
        # Not a missing feature: the splice uses select.poll only on Linux (Windows has no
        # poll at all); elsewhere the "selectors" case is the loop that runs there.
        pytest.skip("select.poll is the Linux loop")
    return str(request.param)


def test_tls_socket_reads_and_writes_from_two_threads_through_a_splice(
    fleet: Any, readiness: str
) -> None:
    """A TlsSocket written by one thread while another reads it, echoed by a splice that
    drives the other TlsSocket through its BIOs: every byte back, EOF after them."""
    client, server = tls_pair(fleet)
    assert client.version() == server.version() is not None
    mine, theirs = socket.socketpair()
    splice = Splice(SpliceEnd(server, "tls"), SpliceEnd(theirs, "pair"))
    splice.start()

    def echo() -> None:  # the socketpair end echoes until EOF, then half-closes
        while data := mine.recv(1 << 20):
            mine.sendall(data)
        mine.shutdown(socket.SHUT_WR)

    echoer = threading.Thread(target=echo)
    echoer.start()
    payload = os.urandom(12 << 20)

    def send() -> None:
        view = memoryview(payload)
        for i in range(0, len(view), 300_000):
            client.sendall(view[i : i + 300_000])
        client.shutdown(socket.SHUT_WR)

    sender = threading.Thread(target=send)
    sender.start()
    got = bytearray()
    buf = bytearray(1 << 16)
    client.settimeout(30)
    while n := client.recv_into(buf):
        got += buf[:n]
    sender.join()
    echoer.join()
    assert splice.wait(10)
    assert hashlib.sha256(got).hexdigest() == hashlib.sha256(payload).hexdigest()
    assert (splice.stats.a_to_b, splice.stats.b_to_a, splice.stats.outcome) == (
        len(payload),
        len(payload),
        "eof",
    )
    client.close()
    mine.close()


def test_splice_reset_on_one_end_resets_the_other(fleet: Any, readiness: str) -> None:
    client, server = tls_pair(fleet)
    listener = socket.create_server(("127.0.0.1", 0))
    mine = socket.create_connection(listener.getsockname())
    theirs, _ = listener.accept()
    listener.close()
    splice = Splice(SpliceEnd(server, "tls"), SpliceEnd(theirs, "tcp"))
    splice.start()
    client.sendall(b"hello")
    assert mine.recv(5) == b"hello"
    mine.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    mine.close()  # RST
    client.settimeout(10)
    with pytest.raises((ConnectionResetError, ssl.SSLError)):
        while client.recv(1024):
            pass
    wait_for(lambda: splice.done, 10.0, what="the splice to end")
    assert splice.stats.outcome == "reset"
    assert "tcp" in splice.stats.reason
    client.close()


def test_splice_refuses_an_ssl_socket(fleet: Any) -> None:
    sock = ssl.create_default_context().wrap_socket(
        socket.socket(), server_hostname="x", do_handshake_on_connect=False
    )
    with sock, pytest.raises(TypeError, match="TlsSocket"):
        SpliceEnd(sock, "tls")


def test_a_truncated_tls_record_before_eof_reads_as_eof(fleet: Any, readiness: str) -> None:
    """The peer sends a record, then half a record and a FIN: the splice delivers the first,
    then EOF (no spinning on "want read" forever), and ends once the other side closes."""
    client, server = tls_pair(fleet)
    mine, theirs = socket.socketpair()
    splice = Splice(SpliceEnd(server, "tls"), SpliceEnd(theirs, "pair"))
    splice.start()
    client.sendall(b"hi")
    socket.socket.sendall(client, b"\x17\x03\x03\x00\x40abc")  # a record header and 3 of 64
    client.shutdown(socket.SHUT_WR)
    mine.settimeout(10)
    got = b""
    while chunk := mine.recv(1024):
        got += chunk
    assert got == b"hi"
    mine.shutdown(socket.SHUT_WR)
    assert splice.wait(10)
    assert splice.stats.outcome == "eof"
    client.close()
    mine.close()
