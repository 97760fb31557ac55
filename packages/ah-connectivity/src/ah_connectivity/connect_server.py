"""The access point's CONNECT listener: TLS, CONNECT, authorise, open a tunnel, splice.

Per connection (each in its own thread; the listener never blocks the event loop):

1. TLS handshake with the access point's serve certificate. Client certificates are
   requested but optional: leaders have none, followers dialling a data channel do.
2. First bytes: `DATA_CHANNEL_MAGIC` hands the socket to the `DataChannelHub`; anything else
   is parsed as a CONNECT head (`ConnectRequestParser`: 400 / 405 / 431, 408 when slow).
3. ``authorize(token, follower)`` → the subject (407 for a missing, malformed, forged or
   expired token; 403 for a token without the scope or whose host glob excludes the
   follower); ``knows_follower(name)`` (404); ``open_tunnel(name, port)`` (502 when refused,
   unreachable or not connected, 504 on timeout). The callbacks run on the event loop that
   called `ConnectProxyServer.start`.
4. ``200 Connection established``, then the client socket and the tunnel's socket are
   spliced by two threads until both directions end (`ah_connectivity.splice`).

``<follower>@<home-host>:<home-port>:<port>`` targets are relayed: after the same
authorisation this access point opens its own CONNECT ``<follower>:<port>`` to the home
access point (verified against the fleet CA as ``…/ah/serve``), forwarding the bearer
token, and splices the two. The home access point's refusals are passed on with their status.

Every tunnel ends with one log line naming who opened it, to which follower, how (``data``,
``quic`` or ``relay``), the bytes each way and how long it lasted; `on_tunnel_closed` gets
the same as a `TunnelRecord`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import inspect
import secrets
import selectors
import socket
import ssl
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
from cryptography import x509
from loguru import logger

from ah_connectivity.connect_client import ConnectRefused, open_connect_tunnel
from ah_connectivity.connect_proto import (
    DEFAULT_MAX_HEAD_SIZE,
    ConnectProtocolError,
    ConnectRequest,
    ConnectRequestParser,
    build_response,
)
from ah_connectivity.data_channel import DATA_CHANNEL_MAGIC, DataChannelHub
from ah_connectivity.pki import FleetCA, Identity, PeerVerificationError
from ah_connectivity.splice import DEFAULT_SPLICE_BUFFER, Splice, SpliceEnd, SpliceStats
from ah_connectivity.tls import server_context, tune_tcp
from ah_connectivity.tls_socket import TlsSocket, wrap_tls
from ah_connectivity.tokens import Scope, TokenError, TokenMissingScope, TokenVerifier
from ah_connectivity.tunnel import (
    FollowerNotFound,
    OpenedTunnel,
    TunnelError,
    TunnelRefused,
    TunnelTimeout,
)
from ah_domain_types import TunnelErrorCode

__all__ = [
    "AccessDenied",
    "Authorize",
    "ConnectProxyServer",
    "KnowsFollower",
    "OpenTunnel",
    "TunnelRecord",
    "token_authorizer",
]

_log = logger.bind(component="ah-connectivity.connect")
_DRAIN_LIMIT = 256 * 1024

Authorize = Callable[[str | None, str], "str | Awaitable[str]"]
"""``(bearer token or None, follower name) -> subject``. Raise `TokenError` (407;
`TokenMissingScope` → 403) or `AccessDenied` (403)."""
KnowsFollower = Callable[[str], "bool | Awaitable[bool]"]
"""Whether a follower of that name belongs to this access point's fleet (else 404)."""
OpenTunnel = Callable[[str, int], Awaitable[OpenedTunnel]]
"""``(follower, port) -> OpenedTunnel``; raise `TunnelError` subclasses (e.g.
`TunnelBroker.open`)."""


class AccessDenied(Exception):
    """The caller is authenticated but may not reach this follower (403)."""


def token_authorizer(verifier: TokenVerifier, scope: Scope = "ssh") -> Authorize:
    """An `Authorize` for user tokens: valid, carrying `scope`, host glob matching."""

    def authorize(token: str | None, follower: str) -> str:
        claims = verifier.verify_user(token, required_scope=scope)
        if not claims.allows_host(follower):
            raise AccessDenied(
                f"token for {claims.sub!r} does not allow host {follower!r} "
                f"(its host glob is {claims.hosts!r})"
            )
        return claims.sub

    return authorize


class TunnelRecord(msgspec.Struct, frozen=True, rename="camel"):
    """Who opened which tunnel, how, and what went through it."""

    tunnel_id: str
    subject: str
    follower: str
    port: int
    method: str
    relay: str | None
    client: str
    bytes_up: int
    """Client → follower."""
    bytes_down: int
    """Follower → client."""
    duration_s: float
    outcome: str
    reason: str


class _Reply(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class ConnectProxyServer:
    """TLS CONNECT listener of an access point (see the module doc)."""

    def __init__(
        self,
        *,
        identity: Identity,
        ca: FleetCA | x509.Certificate,
        authorize: Authorize,
        open_tunnel: OpenTunnel,
        knows_follower: KnowsFollower | None = None,
        data_hub: DataChannelHub | None = None,
        relay: bool = True,
        relay_authorize: Authorize | None = None,
        relay_ca: FleetCA | x509.Certificate | bytes | None = None,
        tunnel_timeout_s: float = 10.0,
        handshake_timeout_s: float = 10.0,
        head_timeout_s: float = 10.0,
        max_head_size: int = DEFAULT_MAX_HEAD_SIZE,
        max_connections: int = 1024,
        buffer_size: int = DEFAULT_SPLICE_BUFFER,
        on_tunnel_closed: Callable[[TunnelRecord], None] | None = None,
    ) -> None:
        self.identity = identity
        self.ca = ca
        self.authorize = authorize
        self.open_tunnel = open_tunnel
        self.knows_follower = knows_follower
        self.data_hub = data_hub
        self.relay = relay
        self.relay_authorize = relay_authorize
        self.relay_ca: FleetCA | x509.Certificate | bytes = relay_ca if relay_ca is not None else ca
        self.tunnel_timeout_s = tunnel_timeout_s
        self.handshake_timeout_s = handshake_timeout_s
        self.head_timeout_s = head_timeout_s
        self.max_head_size = max_head_size
        self.max_connections = max_connections
        self.buffer_size = buffer_size
        self.on_tunnel_closed = on_tunnel_closed
        self.host: str | None = None
        self.port: int | None = None
        self._context: ssl.SSLContext | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._listener: socket.socket | None = None
        self._wakeup: tuple[socket.socket, socket.socket] | None = None
        self._accept_thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._connections: set[socket.socket] = set()
        self._splices: set[Splice] = set()
        self._threads: set[threading.Thread] = set()
        self._closing = False
        self.tunnels_opened = 0

    # -- lifecycle ----------------------------------------------------------------------

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Listen on TCP `host`:`port` (0: any free port); return the bound port."""
        if self._listener is not None:
            raise RuntimeError("ConnectProxyServer already started")
        self._loop = asyncio.get_running_loop()
        self._context = server_context(self.identity, self.ca, client_certs=True)
        try:
            listener = socket.create_server((host, port), backlog=512)
        except OSError as exc:
            raise OSError(
                exc.errno, f"cannot listen for CONNECT on {host}:{port}/tcp: {exc.strerror}"
            ) from exc
        listener.setblocking(False)
        self._listener = listener
        self._wakeup = socket.socketpair()
        self.host = host
        self.port = int(listener.getsockname()[1])
        if self.data_hub is not None and self.data_hub.data_port is None:
            self.data_hub.data_port = self.port
        self._closing = False
        self._accept_thread = threading.Thread(
            target=self._accept_loop, name=f"connect-accept:{self.port}", daemon=True
        )
        self._accept_thread.start()
        _log.info("CONNECT listener on {}:{}/tcp (TLS)", host, self.port)
        return self.port

    async def close(self) -> None:
        """Stop listening, reset every tunnel, wait for the connection threads."""
        if self._listener is None:
            return
        self._closing = True
        if self._wakeup is not None:
            with contextlib.suppress(OSError):
                self._wakeup[1].send(b"x")
        if self._accept_thread is not None:
            await asyncio.to_thread(self._accept_thread.join, 5.0)
        with self._lock:
            splices = list(self._splices)
            connections = list(self._connections)
            threads = list(self._threads)
        for splice in splices:
            splice.abort("access point shutting down")
        for conn in connections:
            with contextlib.suppress(OSError):
                socket.socket.shutdown(conn, socket.SHUT_RDWR)

        def join_all() -> None:
            deadline = time.monotonic() + 5.0
            for thread in threads:
                thread.join(max(0.0, deadline - time.monotonic()))

        await asyncio.to_thread(join_all)
        self._listener.close()
        if self._wakeup is not None:
            for sock in self._wakeup:
                sock.close()
        self._listener = None
        self._wakeup = None
        _log.info("CONNECT listener on port {} closed", self.port)

    async def __aenter__(self) -> ConnectProxyServer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def active_tunnels(self) -> int:
        with self._lock:
            return sum(1 for s in self._splices if not s.done)

    @property
    def connections(self) -> int:
        with self._lock:
            return len(self._connections)

    # -- accepting ----------------------------------------------------------------------

    def _accept_loop(self) -> None:
        listener, wakeup = self._listener, self._wakeup
        assert listener is not None and wakeup is not None
        with selectors.DefaultSelector() as selector:
            selector.register(listener, selectors.EVENT_READ)
            selector.register(wakeup[0], selectors.EVENT_READ)
            while not self._closing:
                for key, _ in selector.select():
                    if key.fileobj is wakeup[0] or self._closing:
                        return
                    try:
                        conn, addr = listener.accept()
                    except (BlockingIOError, InterruptedError):
                        continue
                    except OSError as exc:
                        _log.warning("CONNECT accept failed: {}", exc)
                        continue
                    self._spawn(conn, addr)

    def _spawn(self, conn: socket.socket, addr: Any) -> None:
        conn.setblocking(True)
        peer = f"{addr[0]}:{addr[1]}"
        with self._lock:
            too_many = len(self._connections) >= self.max_connections
            if not too_many:
                self._connections.add(conn)
        if too_many:
            _log.warning(
                "CONNECT from {} turned away: {} connections open", peer, len(self._connections)
            )
            conn.close()
            return
        thread = threading.Thread(
            target=self._serve, args=(conn, peer), name=f"connect {peer}", daemon=True
        )
        with self._lock:
            self._threads.add(thread)
        thread.start()

    # -- one connection -----------------------------------------------------------------

    def _serve(self, conn: socket.socket, peer: str) -> None:
        try:
            self._serve_connection(conn, peer)
        except Exception:
            _log.exception("CONNECT connection from {} failed", peer)
        finally:
            with contextlib.suppress(OSError):
                conn.close()
            with self._lock:
                self._connections.discard(conn)
                self._threads.discard(threading.current_thread())

    def _respond(
        self, sock: socket.socket, peer: str, status: int, message: str, what: str
    ) -> None:
        _log.info("CONNECT {} from {} answered {}: {}", what, peer, status, message)
        with contextlib.suppress(OSError, ssl.SSLError):
            sock.settimeout(2.0)
            sock.sendall(build_response(status, message))
            # Closing with unread input would send an RST that can destroy the answer
            # before the client reads it: half-close, then drain briefly.
            socket.socket.shutdown(sock, socket.SHUT_WR)
            deadline = time.monotonic() + 1.0
            drained = 0
            while drained < _DRAIN_LIMIT and (left := deadline - time.monotonic()) > 0:
                sock.settimeout(left)
                chunk = sock.recv(65536)
                if not chunk:
                    break
                drained += len(chunk)

    def _serve_connection(self, conn: socket.socket, peer: str) -> None:
        assert self._context is not None
        tune_tcp(conn)
        conn.settimeout(self.handshake_timeout_s)
        try:
            tls = wrap_tls(self._context, conn, server_side=True)
        except (OSError, ssl.SSLError) as exc:
            _log.debug("TLS handshake with {} failed: {}", peer, exc)
            return
        with self._lock:
            self._connections.discard(conn)
            self._connections.add(tls)
        handed_over = False
        try:
            handed_over = self._serve_tls(tls, peer)
        finally:
            if not handed_over:
                with contextlib.suppress(OSError):
                    tls.close()
            with self._lock:
                self._connections.discard(tls)

    def _serve_tls(self, tls: TlsSocket, peer: str) -> bool:
        """Serve one TLS connection; True when a data channel took the socket over."""
        deadline = time.monotonic() + self.head_timeout_s
        parser = ConnectRequestParser(self.max_head_size)
        first = b""
        maybe_data = True
        request: ConnectRequest | None = None
        try:
            while request is None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError
                tls.settimeout(remaining)
                chunk = tls.recv(16384)
                if not chunk:
                    return False
                if maybe_data:
                    first += chunk
                    if first.startswith(DATA_CHANNEL_MAGIC):
                        return self._data_connection(tls, peer, first[len(DATA_CHANNEL_MAGIC) :])
                    if DATA_CHANNEL_MAGIC.startswith(first):
                        continue
                    maybe_data, chunk = False, first
                request = parser.feed(chunk)
        except ConnectProtocolError as exc:
            self._respond(tls, peer, exc.status, exc.message, "request")
            return False
        except TimeoutError:
            self._respond(tls, peer, 408, "no complete CONNECT request in time", "request")
            return False
        except (OSError, ssl.SSLError) as exc:
            _log.debug("CONNECT from {}: reading the request failed: {}", peer, exc)
            return False
        tls.settimeout(None)
        what = str(request.target)
        try:
            if request.target.is_relay:
                subject, opened = self._relay(request)
            else:
                subject, opened = self._open_local(request)
        except _Reply as reply:
            self._respond(tls, peer, reply.status, reply.message, what)
            return False
        try:
            tls.sendall(build_response(200))
        except (OSError, ssl.SSLError) as exc:
            _log.info("CONNECT {} from {}: client gone before 200: {}", what, peer, exc)
            if opened.end.sock is not None:
                with contextlib.suppress(OSError):
                    opened.end.sock.close()
            opened.closed()
            return False
        self._splice(tls, peer, request, subject, opened, parser.remainder)
        return False

    def _data_connection(self, tls: TlsSocket, peer: str, rest: bytes) -> bool:
        hub = self.data_hub
        if hub is None:
            _log.warning("data connection from {} but this listener has no data hub", peer)
            return False
        with self._lock:
            self._connections.discard(tls)  # the hub or the tunnel owns it now
        hub.offer(tls, rest, peer)
        return True

    def _call_in_loop(
        self,
        coro: Awaitable[Any],
        timeout: float,
        discard: Callable[[Any], None] | None = None,
    ) -> Any:
        """Run `coro` on the server's loop and wait; on timeout cancel it, and hand a result
        that arrives anyway to `discard`."""
        loop = self._loop
        assert loop is not None
        future: concurrent.futures.Future[Any] = asyncio.run_coroutine_threadsafe(
            _as_coroutine(coro), loop
        )
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            if not future.cancel() and discard is not None:

                def late(done: concurrent.futures.Future[Any]) -> None:
                    if not done.cancelled() and done.exception() is None:
                        discard(done.result())

                future.add_done_callback(late)
            raise TimeoutError from None

    async def _authorize(self, request: ConnectRequest, *, relay: bool) -> str:
        check = self.relay_authorize if relay and self.relay_authorize else self.authorize
        follower = request.target.follower
        try:
            result = check(request.token, follower)
            subject = await result if inspect.isawaitable(result) else result
        except TokenMissingScope as exc:
            raise _Reply(403, exc.message) from None
        except TokenError as exc:
            message = exc.message
            if request.token is None and request.auth_problem:
                message = request.auth_problem
            raise _Reply(407, f"{message} ({exc.reason})") from None
        except AccessDenied as exc:
            raise _Reply(403, str(exc)) from None
        return str(subject)

    async def _admit_local(self, request: ConnectRequest) -> tuple[str, OpenedTunnel]:
        subject = await self._authorize(request, relay=False)
        name, port = request.target.follower, request.target.port
        if self.knows_follower is not None:
            known = self.knows_follower(name)
            if inspect.isawaitable(known):
                known = await known
            if not known:
                raise _Reply(404, f"no follower named {name!r} in this fleet")
        try:
            async with asyncio.timeout(self.tunnel_timeout_s):
                opened = await self.open_tunnel(name, port)
        except TimeoutError:
            raise _Reply(
                504,
                f"follower {name!r} did not open a tunnel to port {port} within "
                f"{self.tunnel_timeout_s:g} s",
            ) from None
        except FollowerNotFound as exc:
            raise _Reply(404, exc.message) from None
        except TunnelTimeout as exc:
            raise _Reply(504, exc.message) from None
        except TunnelRefused as exc:
            status = 504 if exc.code is TunnelErrorCode.TIMEOUT else 502
            raise _Reply(status, exc.message) from None
        except TunnelError as exc:
            raise _Reply(502, exc.message) from None
        return subject, opened

    def _open_local(self, request: ConnectRequest) -> tuple[str, OpenedTunnel]:
        try:
            result: tuple[str, OpenedTunnel] = self._call_in_loop(
                self._admit_local(request), self.tunnel_timeout_s + 5.0, _discard_opened
            )
        except TimeoutError:
            raise _Reply(504, "the access point did not open the tunnel in time") from None
        except _Reply:
            raise
        except Exception as exc:
            _log.exception("opening a tunnel to {} failed", request.target)
            raise _Reply(502, f"{type(exc).__name__}: {exc}") from None
        return result

    def _relay(self, request: ConnectRequest) -> tuple[str, OpenedTunnel]:
        target = request.target
        if not self.relay:
            raise _Reply(403, "this access point does not relay to other access points")
        try:
            subject: str = self._call_in_loop(
                self._authorize(request, relay=True), self.tunnel_timeout_s
            )
        except TimeoutError:
            raise _Reply(504, "authorisation did not finish in time") from None
        assert target.home_host is not None and target.home_port is not None
        home = target.home or "?"
        try:
            upstream = open_connect_tunnel(
                target.home_host,
                target.home_port,
                ca_pem=self.relay_ca,
                token=request.token,
                target=target.local,
                timeout=self.tunnel_timeout_s,
            )
        except ConnectRefused as exc:
            raise _Reply(
                exc.status, f"home access point {home} answered {exc.status}: {exc.message}"
            ) from None
        except TimeoutError:
            raise _Reply(504, f"home access point {home} did not answer in time") from None
        except PeerVerificationError as exc:
            raise _Reply(502, f"home access point {home} is not in this fleet: {exc}") from None
        except (OSError, ssl.SSLError) as exc:
            raise _Reply(502, f"cannot reach home access point {home}: {exc}") from None
        opened = OpenedTunnel(
            end=SpliceEnd(upstream, f"home access point {home}"),
            method="relay",
            tunnel_id=secrets.token_hex(8),
            follower=target.follower,
        )
        return subject, opened

    def _splice(
        self,
        tls: TlsSocket,
        peer: str,
        request: ConnectRequest,
        subject: str,
        opened: OpenedTunnel,
        initial: bytes,
    ) -> None:
        target = request.target
        splice = Splice(
            SpliceEnd(tls, f"client {peer}", initial=initial),
            opened.end,
            buffer_size=self.buffer_size,
        )
        with self._lock:
            self._splices.add(splice)
            self._connections.discard(tls)
        self.tunnels_opened += 1
        _log.info(
            "tunnel {} opened: subject={} follower={} port={} method={}{} client={}",
            opened.tunnel_id,
            subject,
            target.follower,
            target.port,
            opened.method,
            f" relay={target.home}" if target.is_relay else "",
            peer,
        )
        stats = SpliceStats()
        try:
            if self._closing:
                splice.abort("access point shutting down")
            stats = splice.run()
        finally:
            with self._lock:
                self._splices.discard(splice)
            opened.closed()
        record = TunnelRecord(
            tunnel_id=opened.tunnel_id,
            subject=subject,
            follower=target.follower,
            port=target.port,
            method=opened.method,
            relay=target.home,
            client=peer,
            bytes_up=stats.a_to_b,
            bytes_down=stats.b_to_a,
            duration_s=round(stats.duration_s, 3),
            outcome=stats.outcome,
            reason=stats.reason,
        )
        _log.bind(tunnel=msgspec.to_builtins(record)).info(
            "tunnel {} closed: subject={} follower={} method={}{} up={} down={} "
            "duration={:.3f}s outcome={}{}",
            record.tunnel_id,
            subject,
            record.follower,
            record.method,
            f" relay={record.relay}" if record.relay else "",
            record.bytes_up,
            record.bytes_down,
            record.duration_s,
            record.outcome,
            f" ({record.reason})" if record.reason else "",
        )
        if self.on_tunnel_closed is not None:
            try:
                self.on_tunnel_closed(record)
            except Exception:
                _log.exception("on_tunnel_closed callback failed")


async def _as_coroutine(awaitable: Awaitable[Any]) -> Any:
    return await awaitable


def _discard_opened(result: Any) -> None:
    _subject, opened = result
    with contextlib.suppress(OSError):
        opened.end.sock.close()
    opened.closed()
