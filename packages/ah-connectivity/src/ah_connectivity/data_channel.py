"""The bulk path for tunnel bytes: TLS TCP data connections the follower dials back.

Pure-Python QUIC moves a few tens of MB/s per stream; a TLS socket spliced by two threads
moves hundreds. So when the access point needs a tunnel it sends the follower a ``DialData``
RPC over the control connection, and the follower

1. checks the destination against its `TunnelPolicy` and connects to it (its sshd),
2. dials a TLS connection back to the access point's CONNECT port, presenting its follower
   certificate and checking the access point's ``…/ah/serve`` SPIFFE ID,
3. writes `DATA_CHANNEL_MAGIC` and a ``DataChannelHello{tunnelId, nonce}`` frame,
4. answers the RPC ``OpenTcpOk`` and splices the two sockets (`ah_connectivity.splice`).

The access point's listener recognises the magic (a CONNECT request starts with an HTTP
method instead) and hands the socket to `DataChannelHub.offer`, which checks that the client
certificate names the follower the tunnel was requested from and that the one-time nonce
matches, then resolves the waiting `expect`. The follower still only ever dials out.

Any failure before the hello is sent makes the follower answer
``OpenTcpErr(dataChannelFailed)``; the access point then falls back to a QUIC tunnel stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import secrets
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from cryptography import x509
from loguru import logger

from ah_connectivity.framing import FrameDecoder, FrameError, encode_frame
from ah_connectivity.pki import (
    SERVE_SPIFFE,
    FleetCA,
    FollowerSpiffeId,
    PeerVerificationError,
    follower_name_from_spiffe_id,
)
from ah_connectivity.splice import Splice, SpliceEnd, SpliceStats
from ah_connectivity.tls import tune_tcp, verify_tls_peer
from ah_connectivity.tls_socket import TlsSocket, wrap_tls
from ah_connectivity.tunnel import TunnelPolicy
from ah_domain_types import (
    ControlMessage,
    DataChannelHello,
    DialData,
    OpenTcpErr,
    OpenTcpOk,
    TunnelErrorCode,
)

__all__ = [
    "DATA_CHANNEL_MAGIC",
    "MAX_HELLO_SIZE",
    "DataChannelHub",
    "PendingDataChannel",
    "dial_data_channel",
    "serve_dial_data",
]

DATA_CHANNEL_MAGIC = b"AH-DATA/1\r\n"
"""First bytes of a data connection (no HTTP method looks like this)."""
MAX_HELLO_SIZE = 4096

_log = logger.bind(component="ah-connectivity.data-channel")


@dataclass(eq=False)
class PendingDataChannel:
    """A data connection the access point asked a follower to dial back."""

    follower: str
    tunnel_id: str
    nonce: str
    future: asyncio.Future[tuple[TlsSocket, bytes]]
    loop: asyncio.AbstractEventLoop
    created: float = field(default_factory=time.monotonic)


def _resolve(
    future: asyncio.Future[tuple[TlsSocket, bytes]], sock: TlsSocket, initial: bytes
) -> None:
    if future.done():
        # The opener gave up (timeout, fallback) between the match and now.
        with contextlib.suppress(OSError):
            sock.close()
        return
    future.set_result((sock, initial))


class DataChannelHub:
    """Access point side: matches dialled-back data connections with waiting tunnels.

    `expect` is called on the event loop; `offer` from the listener's connection threads.
    """

    def __init__(
        self,
        ca: FleetCA | x509.Certificate,
        trust_domain: str,
        *,
        data_host: str | None = None,
        data_port: int | None = None,
        hello_timeout_s: float = 10.0,
    ) -> None:
        self.ca = ca
        self.trust_domain = trust_domain
        self.data_host = data_host
        """Host followers dial back (None: the host they dialled for QUIC)."""
        self.data_port = data_port
        """Port followers dial back; `ConnectProxyServer.start` fills in its own if unset."""
        self.hello_timeout_s = hello_timeout_s
        self._pending: dict[str, PendingDataChannel] = {}
        self._lock = threading.Lock()
        self.accepted = 0
        self.rejected = 0

    def expect(self, follower: str, tunnel_id: str) -> PendingDataChannel:
        """Register a tunnel waiting for its data connection (call on the event loop)."""
        loop = asyncio.get_running_loop()
        pending = PendingDataChannel(
            follower=follower,
            tunnel_id=tunnel_id,
            nonce=secrets.token_urlsafe(32),
            future=loop.create_future(),
            loop=loop,
        )
        with self._lock:
            if tunnel_id in self._pending:
                raise ValueError(f"tunnel id {tunnel_id!r} is already waiting for a data channel")
            self._pending[tunnel_id] = pending
        return pending

    def cancel(self, pending: PendingDataChannel) -> None:
        """Stop waiting (call on the event loop); a connection arriving later is closed."""
        with self._lock:
            if self._pending.get(pending.tunnel_id) is pending:
                del self._pending[pending.tunnel_id]
        if not pending.future.done():
            pending.future.cancel()
        elif not pending.future.cancelled() and pending.future.exception() is None:
            # Matched, but nobody will use it.
            sock, _ = pending.future.result()
            with contextlib.suppress(OSError):
                sock.close()

    @property
    def waiting(self) -> int:
        with self._lock:
            return len(self._pending)

    def offer(self, sock: TlsSocket, initial: bytes, peer: str = "?") -> bool:
        """Take a data connection whose magic was already read (blocking; any thread).

        `initial` holds the bytes read after the magic. Returns whether it matched a waiting
        tunnel; otherwise the socket is closed.
        """
        try:
            return self._offer(sock, initial, peer)
        except BaseException:
            with contextlib.suppress(OSError):
                sock.close()
            raise

    def _reject(self, sock: TlsSocket, peer: str, message: str) -> bool:
        self.rejected += 1
        _log.warning("rejecting data connection from {}: {}", peer, message)
        with contextlib.suppress(OSError):
            sock.close()
        return False

    def _offer(self, sock: TlsSocket, initial: bytes, peer: str) -> bool:
        try:
            spiffe_id = verify_tls_peer(sock, self.ca, FollowerSpiffeId(self.trust_domain))
        except PeerVerificationError as exc:
            return self._reject(sock, peer, str(exc))
        name = follower_name_from_spiffe_id(self.trust_domain, spiffe_id)
        decoder = FrameDecoder[ControlMessage](ControlMessage, MAX_HELLO_SIZE)
        deadline = time.monotonic() + self.hello_timeout_s
        data = initial
        hello: ControlMessage | None = None
        try:
            while True:
                messages = decoder.feed(data, limit=1)
                if messages:
                    hello = messages[0]
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return self._reject(sock, peer, "no DataChannelHello in time")
                sock.settimeout(remaining)
                data = sock.recv(MAX_HELLO_SIZE)
                if not data:
                    return self._reject(sock, peer, "closed before its DataChannelHello")
        except FrameError as exc:
            return self._reject(sock, peer, f"bad DataChannelHello frame: {exc.message}")
        except (OSError, ssl.SSLError) as exc:
            return self._reject(sock, peer, f"reading its DataChannelHello failed: {exc}")
        if not isinstance(hello, DataChannelHello):
            return self._reject(
                sock, peer, f"expected DataChannelHello, got {type(hello).__name__}"
            )
        with self._lock:
            pending = self._pending.get(hello.tunnel_id)
            if pending is None:
                problem: str | None = f"no tunnel {hello.tunnel_id!r} is waiting for data"
            elif pending.follower != name:
                problem = (
                    f"tunnel {hello.tunnel_id!r} belongs to follower {pending.follower!r}, "
                    f"not {name!r}"
                )
            elif not hmac.compare_digest(pending.nonce.encode(), hello.nonce.encode()):
                problem = f"wrong nonce for tunnel {hello.tunnel_id!r}"
            else:
                problem = None
                del self._pending[hello.tunnel_id]
        if problem is not None or pending is None:
            return self._reject(sock, peer, problem or "no such tunnel")
        sock.settimeout(None)
        self.accepted += 1
        try:
            pending.loop.call_soon_threadsafe(_resolve, pending.future, sock, decoder.remainder)
        except RuntimeError:  # the event loop is gone
            return self._reject(sock, peer, "access point event loop closed")
        _log.debug("data connection for tunnel {} from follower {!r}", hello.tunnel_id, name)
        return True


def dial_data_channel(
    host: str,
    port: int,
    *,
    context: ssl.SSLContext,
    ca: FleetCA | x509.Certificate,
    trust_domain: str,
    tunnel_id: str,
    nonce: str,
    timeout: float = 10.0,
) -> TlsSocket:
    """Follower side: dial the access point's data port, check its identity, send the hello.

    `context` is a `tls.client_context(ca, follower_identity)`. Returns the blocking socket.
    """
    raw = socket.create_connection((host, port), timeout=timeout)
    try:
        tune_tcp(raw)
        sock = wrap_tls(context, raw)
    except BaseException:
        raw.close()
        raise
    try:
        verify_tls_peer(sock, ca, SERVE_SPIFFE(trust_domain))
        sock.sendall(
            DATA_CHANNEL_MAGIC + encode_frame(DataChannelHello(tunnel_id=tunnel_id, nonce=nonce))
        )
        sock.settimeout(None)
    except BaseException:
        sock.close()
        raise
    return sock


def serve_dial_data(
    request: DialData,
    policy: TunnelPolicy,
    *,
    default_host: str,
    context: ssl.SSLContext,
    ca: FleetCA | x509.Certificate,
    trust_domain: str,
    dial_timeout_s: float = 10.0,
    on_splice: Callable[[Splice], None] | None = None,
    on_done: Callable[[SpliceStats], None] | None = None,
) -> OpenTcpOk | OpenTcpErr:
    """Follower side, blocking: answer one ``DialData`` (see the module doc).

    On success the splice runs in background threads; `on_splice` gets it first (to track or
    abort it), `on_done` its statistics at the end.
    """
    tid = request.tunnel_id

    def refuse(code: TunnelErrorCode, message: str) -> OpenTcpErr:
        return OpenTcpErr(tunnel_id=tid, code=code, message=message)

    if not policy.data_channel:
        return refuse(TunnelErrorCode.DATA_CHANNEL_FAILED, "data channels are disabled here")
    target = policy.resolve(request.dst, request.port)
    if target is None:
        message = f"{request.dst}:{request.port} is not on this follower's tunnel allow-list"
        _log.warning("refusing tunnel {}: {}", tid, message)
        return refuse(TunnelErrorCode.REFUSED_NOT_ALLOWED, message)
    try:
        local = socket.create_connection(target, timeout=policy.connect_timeout_s)
    except TimeoutError:
        message = f"{target[0]}:{target[1]} did not accept within {policy.connect_timeout_s:g} s"
        _log.warning("tunnel {}: {}", tid, message)
        return refuse(TunnelErrorCode.TIMEOUT, message)
    except OSError as exc:
        message = f"cannot connect to {target[0]}:{target[1]}: {exc.strerror or exc}"
        _log.warning("tunnel {}: {}", tid, message)
        return refuse(TunnelErrorCode.UNREACHABLE, message)
    local.settimeout(None)
    tune_tcp(local)
    host = request.data_host or default_host
    try:
        data = dial_data_channel(
            host,
            request.data_port,
            context=context,
            ca=ca,
            trust_domain=trust_domain,
            tunnel_id=tid,
            nonce=request.nonce,
            timeout=dial_timeout_s,
        )
    except (OSError, ssl.SSLError, PeerVerificationError) as exc:
        local.close()
        message = f"cannot dial the access point's data port {host}:{request.data_port}: {exc}"
        _log.warning("tunnel {}: {}", tid, message)
        return refuse(TunnelErrorCode.DATA_CHANNEL_FAILED, message)
    splice = Splice(SpliceEnd(data, "access point"), SpliceEnd(local, f"{target[0]}:{target[1]}"))
    if on_splice is not None:
        on_splice(splice)
    splice.start(on_done)
    _log.info(
        "tunnel {} opened to {}:{} over a data connection to {}:{}",
        tid,
        target[0],
        target[1],
        host,
        request.data_port,
    )
    return OpenTcpOk(tunnel_id=tid)
