"""CONNECT tunnels end to end, in-process but over real sockets: a QUIC control server and a
TLS CONNECT listener (the access point) on one event loop, ControlClients (followers) on
another, a real TCP echo server as the destination, and blocking TLS clients."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import ssl
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from ah_connectivity.connect_client import ConnectRefused
from ah_connectivity.data_channel import DATA_CHANNEL_MAGIC
from ah_connectivity.framing import encode_frame
from ah_connectivity.tls import client_context
from ah_connectivity.tunnel import TunnelPolicy
from ah_domain_types import DataChannelHello

EchoServer = Any  # conftest.EchoServer (fixtures only: conftest is not importable here)
TunnelFleet = Any  # conftest.TunnelFleet

METHODS = [pytest.param(("data",), id="data"), pytest.param(("quic",), id="quic")]


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def echo_roundtrip(sock: ssl.SSLSocket, payload: bytes) -> bytes:
    """Send `payload` from a helper thread, half-close, read everything back."""

    def send() -> None:
        view = memoryview(payload)
        for i in range(0, len(view), 1 << 20):
            sock.sendall(view[i : i + (1 << 20)])
        socket.socket.shutdown(sock, socket.SHUT_WR)

    sender = threading.Thread(target=send)
    sender.start()
    out = bytearray()
    buf = bytearray(1 << 18)
    while n := sock.recv_into(buf):
        out += buf[:n]
    sender.join()
    return bytes(out)


def refused(tf: TunnelFleet, target: str, token: str | None = "default") -> ConnectRefused:
    with pytest.raises(ConnectRefused) as info:
        tf.connect(target, token)
    return info.value


def wait_until(predicate: Any, timeout: float = 10.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    delay = 0.001
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


def reads_closed(sock: socket.socket, timeout: float = 10.0) -> bool:
    """True once the peer closed (EOF or reset); reads and drops anything before that."""
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
    except (ConnectionResetError, ConnectionAbortedError, ssl.SSLError):
        pass
    return True


@pytest.mark.parametrize("methods", METHODS)
def test_echo_large_payload(
    tunnel_fleet_factory: Any, echo_server: EchoServer, methods: Any
) -> None:
    tf = tunnel_fleet_factory(methods=methods)
    tf.add_follower("f1", TunnelPolicy.for_sshd("127.0.0.1", echo_server.port))
    # Pure-Python QUIC moves a few MB/s with 1200-byte datagrams: keep its share small.
    payload = os.urandom((16 if methods[0] == "data" else 2) << 20)
    with tf.connect("f1:22") as sock:
        back = echo_roundtrip(sock, payload)
    assert sha(back) == sha(payload)
    (record,) = tf.wait_records(1)
    assert (record.method, record.subject, record.follower, record.port) == (
        methods[0],
        "alice",
        "f1",
        22,
    )
    assert record.bytes_up == len(payload) and record.bytes_down == len(payload)
    assert record.outcome == "eof"


def test_data_channel_is_first_and_quic_is_the_fallback(
    tunnel_fleet_factory: Any, echo_server: EchoServer
) -> None:
    tf = tunnel_fleet_factory(methods=("data", "quic"))
    policy = TunnelPolicy.for_sshd("127.0.0.1", echo_server.port)
    tf.add_follower("fast", policy)
    # A follower that does not dial back (as if its data dial failed) still gets a tunnel.
    tf.add_follower(
        "slow", TunnelPolicy.for_sshd("127.0.0.1", echo_server.port, data_channel=False)
    )
    for name in ("fast", "slow"):
        with tf.connect(f"{name}:22") as sock:
            assert echo_roundtrip(sock, b"hello " + name.encode()) == b"hello " + name.encode()
    records = {r.follower: r.method for r in tf.wait_records(2)}
    assert records == {"fast": "data", "slow": "quic"}
    assert tf.broker.opened == {"data": 1, "quic": 1}


@pytest.mark.parametrize("methods", METHODS)
def test_port_not_allowed_is_refused_and_nothing_is_dialled(
    tunnel_fleet_factory: Any, echo_server: EchoServer, methods: Any
) -> None:
    tf = tunnel_fleet_factory(methods=methods)
    tf.add_follower("f1", TunnelPolicy.for_sshd("127.0.0.1", echo_server.port))
    bystander = socket.create_server(("127.0.0.1", 0))
    bystander.setblocking(False)
    with bystander:
        port = bystander.getsockname()[1]
        err = refused(tf, f"f1:{port}")
        assert err.status == 502
        assert "allow-list" in err.message
        with pytest.raises(BlockingIOError):
            bystander.accept()  # nobody connected to the destination
    assert echo_server.accepted == 0


def test_auth_failures(tunnel_fleet_factory: Any, echo_server: EchoServer) -> None:
    tf = tunnel_fleet_factory(methods=("data",))
    tf.add_follower("lin-a", TunnelPolicy.for_sshd("127.0.0.1", echo_server.port))
    no_token = refused(tf, "lin-a:22", token=None)
    assert no_token.status == 407
    expired = refused(tf, "lin-a:22", token=tf.token(ttl=60, now=time.time() - 3600))
    assert (expired.status, "expired" in expired.message) == (407, True)
    forged = refused(tf, "lin-a:22", token=tf.token()[:-4] + "AAAA")
    assert forged.status == 407
    no_scope = refused(tf, "lin-a:22", token=tf.token(scopes=("exec", "read-logs")))
    assert (no_scope.status, "ssh" in no_scope.message) == (403, True)
    other_hosts = refused(tf, "lin-a:22", token=tf.token(hosts="mac-*"))
    assert (other_hosts.status, "mac-*" in other_hosts.message) == (403, True)
    # The same requests with a good token work.
    with tf.connect("lin-a:22", token=tf.token(hosts="lin-*")) as sock:
        assert echo_roundtrip(sock, b"ok") == b"ok"
    assert echo_server.accepted == 1


def test_407_carries_proxy_authenticate(tunnel_fleet_factory: Any) -> None:
    tf = tunnel_fleet_factory(methods=("data",))
    context = client_context(tf.fleet.ca)
    with (
        socket.create_connection(("127.0.0.1", tf.port), timeout=10) as raw,
        context.wrap_socket(raw) as sock,
    ):
        sock.sendall(b"CONNECT f1:22 HTTP/1.1\r\nProxy-Authorization: Basic eDp5\r\n\r\n")
        answer = b""
        while chunk := sock.recv(4096):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 407 ")
    assert b'\r\nProxy-Authenticate: Bearer realm="ah-fleet"' in head
    assert b"Basic" in body


def test_unknown_follower_is_404(tunnel_fleet_factory: Any) -> None:
    tf = tunnel_fleet_factory(methods=("data",))
    err = refused(tf, "nobody:22")
    assert err.status == 404 and "nobody" in err.message


def test_known_but_disconnected_follower_is_502(tunnel_fleet_factory: Any) -> None:
    tf = tunnel_fleet_factory(methods=("data",))
    tf.known.add("gone")
    err = refused(tf, "gone:22")
    assert err.status == 502 and "not connected" in err.message


@pytest.mark.parametrize("methods", METHODS)
def test_unreachable_destination_is_502(tunnel_fleet_factory: Any, methods: Any) -> None:
    tf = tunnel_fleet_factory(methods=methods)
    closed = socket.create_server(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # allow-listed, but nothing listens there
    tf.add_follower("f1", TunnelPolicy.for_sshd("127.0.0.1", port))
    err = refused(tf, "f1:22")
    assert err.status == 502
    assert "cannot connect" in err.message


def test_unresponsive_follower_is_504_within_the_deadline(
    tunnel_fleet_factory: Any, echo_server: EchoServer
) -> None:
    tf = tunnel_fleet_factory(methods=("data", "quic"), tunnel_timeout_s=1.5)
    tf.add_follower("f1", TunnelPolicy.for_sshd("127.0.0.1", echo_server.port))
    # Freeze the follower's event loop (as if its process were stopped): its QUIC
    # connection stays up but nothing answers.
    release = threading.Event()
    tf.followers_loop.loop.call_soon_threadsafe(release.wait, 20)
    try:
        started = time.monotonic()
        err = refused(tf, "f1:22")
        took = time.monotonic() - started
        assert echo_server.accepted == 0
    finally:
        release.set()
    assert err.status == 504
    assert 1.0 <= took < 6.0, took


@pytest.mark.parametrize("methods", METHODS)
def test_twenty_tunnels_in_parallel(
    tunnel_fleet_factory: Any, echo_server: EchoServer, methods: Any
) -> None:
    tf = tunnel_fleet_factory(methods=methods)
    tf.add_follower("f1", TunnelPolicy.for_sshd("127.0.0.1", echo_server.port))
    size = (512 if methods[0] == "data" else 64) << 10

    def one(i: int) -> bool:
        payload = os.urandom(size)
        with tf.connect("f1:22") as sock:
            return sha(echo_roundtrip(sock, payload)) == sha(payload)

    with ThreadPoolExecutor(20) as pool:
        results = list(pool.map(one, range(20)))
    assert results == [True] * 20
    records = tf.wait_records(20)
    assert {r.method for r in records} == {methods[0]}
    assert len({r.tunnel_id for r in records}) == 20
    assert echo_server.accepted == 20


@pytest.mark.parametrize("methods", METHODS)
def test_client_eof_reaches_the_destination(
    tunnel_fleet_factory: Any, echo_server: EchoServer, methods: Any
) -> None:
    tf = tunnel_fleet_factory(methods=methods)
    tf.add_follower("f1", TunnelPolicy.for_sshd("127.0.0.1", echo_server.port))
    sock = tf.connect("f1:22")
    with sock:
        sock.sendall(b"last words")
        socket.socket.shutdown(sock, socket.SHUT_WR)
        # The echo server sees EOF only through the tunnel, answers and closes: we get the
        # echo and then EOF, and the whole tunnel winds down cleanly.
        got = b""
        while chunk := sock.recv(1024):
            got += chunk
    assert got == b"last words"
    wait_until(lambda: echo_server.closed == ["eof"], what="destination saw a clean EOF")
    (record,) = tf.wait_records(1)
    assert record.outcome == "eof"


@pytest.mark.parametrize("methods", METHODS)
def test_destination_eof_reaches_the_client(tunnel_fleet_factory: Any, methods: Any) -> None:
    tf = tunnel_fleet_factory(methods=methods)
    greeter = socket.create_server(("127.0.0.1", 0))
    tf.add_follower("f1", TunnelPolicy.for_sshd("127.0.0.1", greeter.getsockname()[1]))

    def greet() -> None:
        conn, _ = greeter.accept()
        conn.sendall(b"SSH-2.0-fake\r\n")
        conn.close()

    thread = threading.Thread(target=greet)
    thread.start()
    with greeter, tf.connect("f1:22") as sock:
        got = b""
        while chunk := sock.recv(1024):
            got += chunk
    thread.join()
    assert got == b"SSH-2.0-fake\r\n"


@pytest.mark.parametrize("methods", METHODS)
def test_client_reset_closes_the_destination(
    tunnel_fleet_factory: Any, echo_server: EchoServer, methods: Any
) -> None:
    tf = tunnel_fleet_factory(methods=methods)
    tf.add_follower("f1", TunnelPolicy.for_sshd("127.0.0.1", echo_server.port))
    sock = tf.connect("f1:22")
    sock.sendall(b"ping")
    assert sock.recv(4) == b"ping"
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()  # TCP RST
    wait_until(lambda: len(echo_server.closed) == 1, what="destination connection closed")
    (record,) = tf.wait_records(1)
    assert record.outcome == "reset"


@pytest.mark.parametrize("methods", METHODS)
def test_destination_reset_closes_the_client(
    tunnel_fleet_factory: Any, echo_server: EchoServer, methods: Any
) -> None:
    tf = tunnel_fleet_factory(methods=methods)
    tf.add_follower("f1", TunnelPolicy.for_sshd("127.0.0.1", echo_server.port))
    with tf.connect("f1:22") as sock:
        sock.sendall(b"ping")
        assert sock.recv(4) == b"ping"
        echo_server.reset_all()
        assert reads_closed(sock)
    (record,) = tf.wait_records(1)
    assert record.outcome == "reset"


def test_relay_through_another_access_point(
    tunnel_fleet_factory: Any, echo_server: EchoServer
) -> None:
    tf = tunnel_fleet_factory(methods=("data",))
    tf.add_follower("f1", TunnelPolicy.for_sshd("127.0.0.1", echo_server.port))
    relay = tf.add_relay_proxy()
    payload = os.urandom(2 << 20)
    target = f"f1@127.0.0.1:{tf.port}:22"
    with tf.connect(target, port=relay.port) as sock:
        assert sha(echo_roundtrip(sock, payload)) == sha(payload)
    records = tf.wait_records(2)
    by_method = {r.method: r for r in records}
    assert set(by_method) == {"relay", "data"}
    assert by_method["relay"].relay == f"127.0.0.1:{tf.port}"
    assert by_method["relay"].bytes_up == len(payload) == by_method["data"].bytes_up
    # The home access point's refusals come back with their status.
    assert refused(tf, f"nobody@127.0.0.1:{tf.port}:22").status == 404
    err = refused(tf, f"f1@127.0.0.1:{tf.port}:22", token=tf.token(hosts="x*"))
    assert err.status == 403


def test_relay_to_something_that_is_not_an_access_point(
    tunnel_fleet_factory: Any, echo_server: EchoServer
) -> None:
    tf = tunnel_fleet_factory(methods=("data",))
    relay = tf.add_relay_proxy()
    with pytest.raises(ConnectRefused) as info:
        tf.connect(f"f1@127.0.0.1:{echo_server.port}:22", port=relay.port, timeout=5)
    assert info.value.status == 502


def test_bogus_data_connections_are_rejected(
    tunnel_fleet_factory: Any, echo_server: EchoServer
) -> None:
    tf = tunnel_fleet_factory(methods=("data",))
    tf.add_follower("f1", TunnelPolicy.for_sshd("127.0.0.1", echo_server.port))
    hello = DATA_CHANNEL_MAGIC + encode_frame(DataChannelHello(tunnel_id="nope", nonce="x"))
    # Without a client certificate, and with a real follower certificate but no waiting
    # tunnel: the access point hangs up both times.
    for identity in (None, tf.fleet.follower("f1")):
        context = client_context(tf.fleet.ca, identity)
        with (
            socket.create_connection(("127.0.0.1", tf.port), timeout=10) as raw,
            context.wrap_socket(raw) as sock,
        ):
            sock.sendall(hello)
            assert reads_closed(sock)
    wait_until(lambda: tf.hub.rejected == 2, what="two rejected data connections")
    # Tunnels still work afterwards.
    with tf.connect("f1:22") as sock:
        assert echo_roundtrip(sock, b"still fine") == b"still fine"


def test_malformed_requests(tunnel_fleet_factory: Any) -> None:
    tf = tunnel_fleet_factory(methods=("data",))
    context = client_context(tf.fleet.ca)

    def ask(head: bytes) -> bytes:
        with (
            socket.create_connection(("127.0.0.1", tf.port), timeout=10) as raw,
            context.wrap_socket(raw) as sock,
        ):
            sock.sendall(head)
            answer = b""
            while chunk := sock.recv(4096):
                answer += chunk
            return answer.split(b"\r\n", 1)[0]

    assert ask(b"GET / HTTP/1.1\r\n\r\n") == b"HTTP/1.1 405 Method Not Allowed"
    assert ask(b"CONNECT f1 HTTP/1.1\r\n\r\n") == b"HTTP/1.1 400 Bad Request"
    big = b"CONNECT f1:22 HTTP/1.1\r\nX-Pad: " + b"a" * 20000 + b"\r\n\r\n"
    assert ask(big) == b"HTTP/1.1 431 Request Header Fields Too Large"


def test_quic_tunnel_backpressure_bounds_buffers(
    tunnel_fleet_factory: Any,
) -> None:
    """A destination that never reads: the writer must stall, with bounded buffers."""
    from ah_connectivity.quic import TUNNEL_SEND_HIGH_WATER, TUNNEL_WINDOW

    tf = tunnel_fleet_factory(methods=("quic",))
    hog = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []

    def accept() -> None:
        conn, _ = hog.accept()
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)
        held.append(conn)  # never read

    thread = threading.Thread(target=accept)
    thread.start()
    client = tf.add_follower("f1", TunnelPolicy.for_sshd("127.0.0.1", hog.getsockname()[1]))
    conn = tf.control.follower("f1")

    async def flood() -> tuple[int, int, Any]:
        _reader, writer = await conn.open_tunnel("127.0.0.1", 22)
        chunk = bytes(256 << 10)
        written = 0
        try:
            async with asyncio.timeout(1.0):
                while True:
                    writer.write(chunk)
                    written += len(chunk)
                    await writer.drain()
        except TimeoutError:
            pass
        stream = writer.tunnel._stream
        queued = writer.tunnel._proto._tunnel_send_buffered(stream)
        return written, queued, writer

    written, queued, writer = tf.ap.run(flood())
    thread.join()
    # The follower's side of the stream holds at most one window of unread bytes.
    follower_buffers = tf.followers_loop.call(
        lambda: [len(s.tunnel._buffer) for s in client._proto._streams.values() if s.tunnel]
    )
    tf.ap.call(writer.abort)
    for conn_sock in held:
        conn_sock.close()
    hog.close()
    assert queued <= TUNNEL_SEND_HIGH_WATER + (256 << 10)
    assert len(follower_buffers) == 1 and follower_buffers[0] <= TUNNEL_WINDOW
    # Stalled long before 2 s of unthrottled writing (which would be gigabytes).
    assert written < 64 << 20


def test_async_client(tunnel_fleet_factory: Any, echo_server: EchoServer) -> None:
    from ah_connectivity.connect_client import open_connect_tunnel_async

    tf = tunnel_fleet_factory(methods=("data",))
    tf.add_follower("f1", TunnelPolicy.for_sshd("127.0.0.1", echo_server.port))

    async def talk() -> tuple[bytes, int]:
        reader, writer = await open_connect_tunnel_async(
            "127.0.0.1", tf.port, ca_pem=tf.fleet.ca.cert_pem, token=tf.token(), target="f1:22"
        )
        writer.write(b"async hello")  # (asyncio's TLS transports cannot half-close)
        echoed = await reader.readexactly(len(b"async hello"))
        writer.close()
        try:
            await open_connect_tunnel_async(
                "127.0.0.1", tf.port, ca_pem=tf.fleet.ca.cert_pem, token=None, target="f1:22"
            )
        except ConnectRefused as exc:
            return echoed, exc.status
        return echoed, 0

    assert asyncio.run(talk()) == (b"async hello", 407)


def test_data_channel_checks_follower_and_nonce(tunnel_fleet_factory: Any) -> None:
    from ah_connectivity.data_channel import dial_data_channel

    tf = tunnel_fleet_factory(methods=("data",))
    td = tf.fleet.trust_domain
    pending = tf.ap.call(lambda: tf.hub.expect("f1", "t-1"))

    def dial(name: str, nonce: str) -> ssl.SSLSocket:
        context = client_context(tf.fleet.ca, tf.fleet.follower(name))
        return dial_data_channel(
            "127.0.0.1", tf.port, context=context, ca=tf.fleet.ca.cert, trust_domain=td,
            tunnel_id="t-1", nonce=nonce,
        )  # fmt: skip

    # Another follower with the right nonce, and the right follower with a wrong nonce.
    for name, nonce in (("f2", pending.nonce), ("f1", "guess")):
        with dial(name, nonce) as sock:
            assert reads_closed(sock)
    assert not pending.future.done()
    with dial("f1", pending.nonce) as sock:
        sock.sendall(b"first bytes")
        wait_until(pending.future.done, what="the data connection to be matched")
        server_side, initial = pending.future.result()
        with server_side:
            got = initial
            while len(got) < len(b"first bytes"):
                got += server_side.recv(64)
            assert got == b"first bytes"
    assert (tf.hub.accepted, tf.hub.rejected, tf.hub.waiting) == (1, 2, 0)


@pytest.mark.parametrize(
    ("dst", "port", "expected"),
    [
        ("127.0.0.1", 22, ("127.0.0.1", 2222)),
        ("localhost", 22, ("127.0.0.1", 2222)),
        ("::1", 22, ("127.0.0.1", 2222)),
        ("127.0.0.1", 2222, ("127.0.0.1", 2222)),
        ("127.0.0.1", 8080, ("127.0.0.1", 8080)),
        ("127.0.0.1", 25, None),
        ("10.0.0.5", 22, None),
        ("example.org", 8080, None),
    ],
)
def test_tunnel_policy(dst: str, port: int, expected: tuple[str, int] | None) -> None:
    policy = TunnelPolicy.for_sshd("127.0.0.1", 2222, extra=[("127.0.0.1", 8080)])
    assert policy.resolve(dst, port) == expected
    assert TunnelPolicy().resolve("127.0.0.1", 22) == ("127.0.0.1", 22)
    assert TunnelPolicy(ssh=None, allowed=frozenset()).resolve("127.0.0.1", 22) is None
