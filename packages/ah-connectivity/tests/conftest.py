"""Shared fixtures: an in-memory fleet PKI, follower infos, a recording server handler."""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pytest

from ah_connectivity import (
    Backoff,
    ControlClient,
    ControlServer,
    FleetCA,
    FollowerConnection,
    Identity,
    TokenSigner,
    generate_private_key,
    issue_from_csr,
    issue_server_cert,
    make_csr,
    spiffe_id_for_follower,
)
from ah_connectivity.broker import BrokerMethod, TunnelBroker
from ah_connectivity.connect_client import open_connect_tunnel
from ah_connectivity.connect_server import ConnectProxyServer, TunnelRecord, token_authorizer
from ah_connectivity.data_channel import DataChannelHub
from ah_connectivity.tunnel import FollowerNotFound, OpenedTunnel, TunnelPolicy
from ah_domain_types import (
    ControlMessage,
    FollowerHealth,
    FollowerInfo,
    OsKind,
    Resources,
    StreamError,
    StreamErrorCode,
)

TRUST_DOMAIN = "test.fleet"

T = TypeVar("T")


def _run(coro: Coroutine[Any, Any, T], timeout: float = 20.0) -> T:
    """Run one async test body with an overall deadline."""

    async def bounded() -> T:
        async with asyncio.timeout(timeout):
            return await coro

    return asyncio.run(bounded())


@pytest.fixture(scope="session")
def run() -> Callable[..., Any]:
    return _run


def make_follower_info(name: str) -> FollowerInfo:
    return FollowerInfo(
        name=name,
        os=OsKind.LINUX,
        arch="x86_64",
        tags={"role": "test"},
        resources=Resources(cpus=2, memory_mb=1024),
        host_key_fingerprint="SHA256:dGVzdGtleQ",
        direct_address=None,
        workspace="/tmp/ws",
        version="0.1.0",
    )


@dataclass
class Fleet:
    ca: FleetCA
    server: Identity
    trust_domain: str = TRUST_DOMAIN

    def follower(self, name: str, ca: FleetCA | None = None) -> Identity:
        """A follower identity issued the way enrollment does it (CSR → certificate)."""
        issuer = ca or self.ca
        key = generate_private_key()
        cert = issue_from_csr(
            issuer, make_csr(key, name), spiffe_id_for_follower(issuer.trust_domain, name)
        )
        return Identity(key=key, cert=cert)


@pytest.fixture(scope="session")
def follower_info() -> Callable[[str], FollowerInfo]:
    return make_follower_info


@pytest.fixture(scope="session")
def fleet() -> Fleet:
    ca = FleetCA.generate(TRUST_DOMAIN)
    return Fleet(ca=ca, server=issue_server_cert(ca))


@dataclass
class RecordingHandler:
    """A ControlServerHandler that records every callback and lets tests wait on them."""

    events: list[tuple[str, str, Any]] = field(default_factory=list)
    conns: dict[str, FollowerConnection] = field(default_factory=dict)
    _changed: asyncio.Event | None = None

    def _record(self, kind: str, name: str, value: Any) -> None:
        self.events.append((kind, name, value))
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    def on_follower_connected(self, name: str, conn: FollowerConnection) -> None:
        self.conns[name] = conn
        self._record("connected", name, conn)

    def on_control_message(self, name: str, conn: FollowerConnection, msg: ControlMessage) -> None:
        self._record("message", name, msg)

    def on_follower_health(
        self, name: str, conn: FollowerConnection, health: FollowerHealth
    ) -> None:
        self._record("health", name, health)

    def on_follower_disconnected(self, name: str, conn: FollowerConnection, reason: str) -> None:
        self._record("disconnected", name, reason)

    def of(self, kind: str, name: str | None = None) -> list[Any]:
        return [v for k, n, v in self.events if k == kind and (name is None or n == name)]

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 5.0) -> None:
        async with asyncio.timeout(timeout):
            while not predicate():
                if self._changed is None:
                    self._changed = asyncio.Event()
                await self._changed.wait()


@pytest.fixture
def handler() -> RecordingHandler:
    return RecordingHandler()


# ==========================================================================================
# Tunnels: an access point (QUIC control server + CONNECT listener) on one event-loop
# thread, followers on another, real sockets everywhere; the test body is plain blocking code.
# ==========================================================================================


class LoopThread:
    """An asyncio event loop running in a daemon thread."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 20.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, fn: Callable[[], T], timeout: float = 20.0) -> T:
        async def call() -> T:
            return fn()

        return self.run(call(), timeout)

    def close(self) -> None:
        async def drain() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        with contextlib.suppress(Exception):
            self.run(drain(), 10.0)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10.0)
        self.loop.close()


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
    """Poll `predicate` (for state owned by other threads) until true, or fail."""
    deadline = time.monotonic() + timeout
    delay = 0.001
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what or predicate}")
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


class EchoServer:
    """A real TCP echo server on 127.0.0.1 (port 0), one thread per connection."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self.accepted = 0
        self.closed: list[str] = []
        """How each connection ended: "eof" (clean) or "reset"."""
        self._conns: list[socket.socket] = []
        self._resetting = False
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with self._lock:
                self.accepted += 1
                self._conns.append(conn)
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    def _echo(self, conn: socket.socket) -> None:
        buf = bytearray(256 * 1024)
        how = "eof"
        try:
            while n := conn.recv_into(buf):
                conn.sendall(memoryview(buf)[:n])
            if self._resetting:
                return  # close() below sends the RST (SO_LINGER 0)
            conn.shutdown(socket.SHUT_WR)
        except OSError:
            how = "reset"
        finally:
            conn.close()
            with self._lock:
                self.closed.append(how)

    def reset_all(self) -> None:
        """Close every open connection with a TCP RST (and no FIN before it)."""
        self._resetting = True
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                socket.socket.shutdown(conn, socket.SHUT_RD)  # wakes the echo thread

    def close(self) -> None:
        self.listener.close()
        self.reset_all()


@pytest.fixture
def echo_server() -> Iterator[EchoServer]:
    server = EchoServer()
    yield server
    server.close()


@dataclass
class TunnelFleet:
    """One access point and its followers, each side on its own event loop."""

    fleet: Fleet
    ap: LoopThread
    followers_loop: LoopThread
    control: ControlServer
    hub: DataChannelHub
    broker: TunnelBroker
    proxy: ConnectProxyServer
    signer: TokenSigner
    known: set[str]
    records: list[TunnelRecord] = field(default_factory=list)
    clients: dict[str, ControlClient] = field(default_factory=dict)
    extra_proxies: list[ConnectProxyServer] = field(default_factory=list)
    run_tasks: list[asyncio.Future[None]] = field(default_factory=list)

    @property
    def port(self) -> int:
        assert self.proxy.port is not None
        return self.proxy.port

    def token(
        self,
        subject: str = "alice",
        scopes: tuple[str, ...] = ("ssh",),
        hosts: str = "*",
        ttl: float = 3600,
        now: float | None = None,
    ) -> str:
        return self.signer.issue_user(subject, scopes=scopes, hosts=hosts, ttl=ttl, now=now)

    def add_follower(self, name: str, policy: TunnelPolicy | None) -> ControlClient:
        client = ControlClient(
            host="127.0.0.1",
            port=self.control.port or 0,
            identity=self.fleet.follower(name),
            ca=self.fleet.ca.cert,
            trust_domain=self.fleet.trust_domain,
            info=make_follower_info(name),
            on_rpc=_no_rpc,
            backoff=Backoff(base_s=0.05, cap_s=0.3, rng=random.Random(7)),
            connect_timeout_s=2.0,
            tunnel_policy=policy,
        )
        self.known.add(name)
        self.clients[name] = client

        async def start() -> None:
            self.run_tasks.append(asyncio.ensure_future(client.run()))
            await client.wait_connected(10.0)

        self.followers_loop.run(start())
        wait_until(lambda: self.control.follower(name) is not None, what=f"{name} registered")
        return client

    def connect(
        self,
        target: str,
        token: str | None = "default",
        *,
        port: int | None = None,
        timeout: float = 10.0,
    ) -> ssl.SSLSocket:
        return open_connect_tunnel(
            "127.0.0.1",
            port or self.port,
            ca_pem=self.fleet.ca.cert_pem,
            token=self.token() if token == "default" else token,
            target=target,
            timeout=timeout,
        )

    def wait_records(self, count: int, timeout: float = 10.0) -> list[TunnelRecord]:
        wait_until(lambda: len(self.records) >= count, timeout, f"{count} tunnel records")
        return list(self.records)

    def add_relay_proxy(self) -> ConnectProxyServer:
        """A second access point's CONNECT listener (no followers) that relays."""
        ca = self.fleet.ca
        other = issue_server_cert(ca)
        verifier = self.signer.verifier()

        async def no_tunnels(name: str, port: int) -> OpenedTunnel:
            raise FollowerNotFound(f"{name} is not a follower of the relay access point")

        proxy = ConnectProxyServer(
            identity=other,
            ca=ca.cert,
            authorize=token_authorizer(verifier),
            open_tunnel=no_tunnels,
            knows_follower=lambda name: False,
            on_tunnel_closed=self.records.append,
        )
        self.ap.run(proxy.start("127.0.0.1", 0))
        self.extra_proxies.append(proxy)
        return proxy


async def _no_rpc(msg: ControlMessage) -> ControlMessage:
    return StreamError(code=StreamErrorCode.UNEXPECTED_MESSAGE, message="no RPCs here")


def start_tunnel_fleet(
    fleet: Fleet,
    methods: Sequence[BrokerMethod] = ("data", "quic"),
    tunnel_timeout_s: float = 8.0,
) -> TunnelFleet:
    ap = LoopThread("test-access-point")
    followers_loop = LoopThread("test-followers")
    signer = TokenSigner.generate(fleet.trust_domain)
    control = ControlServer(
        identity=fleet.server,
        ca=fleet.ca,
        trust_domain=fleet.trust_domain,
        handler=RecordingHandler(),
        heartbeat_interval_ms=1000,
    )
    ap.run(control.start("127.0.0.1", 0))
    hub = DataChannelHub(fleet.ca, fleet.trust_domain)
    broker = TunnelBroker(
        control.follower, data_hub=hub, methods=methods, timeout_s=tunnel_timeout_s
    )
    known: set[str] = set()
    records: list[TunnelRecord] = []
    proxy = ConnectProxyServer(
        identity=fleet.server,
        ca=fleet.ca,
        authorize=token_authorizer(signer.verifier()),
        open_tunnel=broker.open,
        knows_follower=known.__contains__,
        data_hub=hub,
        tunnel_timeout_s=tunnel_timeout_s,
        on_tunnel_closed=records.append,
    )
    ap.run(proxy.start("127.0.0.1", 0))
    return TunnelFleet(
        fleet=fleet,
        ap=ap,
        followers_loop=followers_loop,
        control=control,
        hub=hub,
        broker=broker,
        proxy=proxy,
        signer=signer,
        known=known,
        records=records,
    )


def stop_tunnel_fleet(tf: TunnelFleet) -> None:
    for client in tf.clients.values():
        with contextlib.suppress(Exception):
            tf.followers_loop.run(client.stop("test over"), 15.0)
    for proxy in [tf.proxy, *tf.extra_proxies]:
        with contextlib.suppress(Exception):
            tf.ap.run(proxy.close(), 15.0)
    with contextlib.suppress(Exception):
        tf.ap.run(tf.broker.close(), 10.0)
    with contextlib.suppress(Exception):
        tf.ap.run(tf.control.close(), 10.0)
    tf.followers_loop.close()
    tf.ap.close()


@pytest.fixture
def tunnel_fleet_factory(fleet: Fleet) -> Iterator[Callable[..., TunnelFleet]]:
    started: list[TunnelFleet] = []

    def factory(**kw: Any) -> TunnelFleet:
        tf = start_tunnel_fleet(fleet, **kw)
        started.append(tf)
        return tf

    yield factory
    for tf in started:
        stop_tunnel_fleet(tf)
