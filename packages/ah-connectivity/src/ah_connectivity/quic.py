"""aioquic shells around the control-plane state machines (real UDP, mutual TLS).

Stream layout on one follower's QUIC connection (ALPN ``ah-control/1``):

* stream 0, the first client-initiated bidirectional stream: the **control** stream, driven
  by `FollowerControl` (follower) and `AccessPointControl` (access point);
* one new server-initiated bidirectional stream per **RPC**: one request frame (+FIN) from
  the access point, one reply frame (+FIN) from the follower;
* one new server-initiated bidirectional stream per **tunnel**: ``OpenTcp`` from the access
  point, ``OpenTcpOk`` / ``OpenTcpErr`` from the follower, then raw bytes both ways until
  FIN (EOF) or RESET_STREAM (reset). Tunnel streams have a fixed receive window that only
  moves as the application consumes bytes, so a slow reader slows the sender down instead of
  growing a buffer.

``DialData`` is an RPC the follower's `ControlClient` answers itself: it dials a TLS data
connection back to the access point (`ah_connectivity.data_channel`).

Every stream carries length-prefixed msgpack frames (`ah_connectivity.framing`). A malformed
or oversized frame closes only that stream: a `StreamError` frame (when the stream can still
send), FIN, and STOP_SENDING with the `StreamErrorCode`; the connection and daemon live on.

Identity: the server requests a client certificate and, once the handshake completes, checks
it against the fleet CA and requires ``spiffe://<td>/ah/agent/<name>``; the client checks the
server's chain during the handshake and then requires ``spiffe://<td>/ah/serve``.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import secrets
import socket
import ssl
import struct
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, TypeVar, cast

from aioquic.asyncio.protocol import QuicConnectionProtocol, QuicStreamHandler
from aioquic.asyncio.server import QuicServer
from aioquic.quic import events
from aioquic.quic.configuration import SMALLEST_MAX_DATAGRAM_SIZE, QuicConfiguration
from aioquic.quic.connection import MAX_STREAM_DATA_FRAME_CAPACITY, QuicConnection
from aioquic.quic.packet import QuicFrameType
from aioquic.quic.packet_builder import QuicPacketBuilder
from aioquic.quic.recovery import QuicPacketSpace
from aioquic.quic.stream import QuicStream
from aioquic.tls import Epoch
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from loguru import logger

from ah_connectivity.backoff import Backoff
from ah_connectivity.control import (
    AccessPointAction,
    AccessPointControl,
    AccessPointPhase,
    CloseStream,
    FollowerAccepted,
    FollowerAction,
    FollowerControl,
    MarkHealth,
    Reconnect,
    RttSample,
    SendMessage,
    SessionClosed,
    SessionEstablished,
)
from ah_connectivity.data_channel import serve_dial_data
from ah_connectivity.framing import (
    DEFAULT_MAX_FRAME_SIZE,
    FrameDecoder,
    FrameError,
    FrameTooLarge,
    encode_frame,
)
from ah_connectivity.pki import (
    SERVE_SPIFFE,
    FleetCA,
    FollowerSpiffeId,
    Identity,
    PeerVerificationError,
    follower_name_from_spiffe_id,
    verify_peer,
)
from ah_connectivity.splice import Splice
from ah_connectivity.tls import client_context, tune_tcp
from ah_connectivity.tunnel import (
    TunnelPolicy,
    TunnelRefused,
    TunnelTimeout,
    TunnelUnavailable,
)
from ah_domain_types import (
    ControlMessage,
    DialData,
    FollowerHealth,
    FollowerInfo,
    OpenTcp,
    OpenTcpErr,
    OpenTcpOk,
    StreamError,
    StreamErrorCode,
    TunnelErrorCode,
    Welcome,
)

__all__ = [
    "ALPN",
    "CONTROL_STREAM_ID",
    "ConnectionCloseCode",
    "ControlClient",
    "ControlServer",
    "ControlServerHandler",
    "FollowerConnection",
    "QuicTunnel",
    "QuicTunnelReader",
    "QuicTunnelWriter",
    "RpcConnectionLost",
    "RpcError",
    "RpcHandler",
    "RpcTimeout",
    "bridge_tunnel",
]

ALPN = "ah-control/1"
CONTROL_STREAM_ID = 0

_log = logger.bind(component="ah-connectivity.quic")

RpcHandler = Callable[[ControlMessage], Awaitable[ControlMessage]]
"""Follower side: answers one RPC request (e.g. ExecRequest → ExecResult)."""

TUNNEL_WINDOW = 4 * 1024 * 1024
"""Receive window of a tunnel stream: bytes the peer may send beyond what was consumed."""
TUNNEL_SEND_HIGH_WATER = 2 * 1024 * 1024
"""`QuicTunnel.drain` waits while more than this is queued (unsent or unacknowledged)."""
TUNNEL_SEND_LOW_WATER = 512 * 1024
TUNNEL_CHUNK = 256 * 1024
_LINGER_RST = struct.pack("ii", 1, 0)

_T = TypeVar("_T")


class ConnectionCloseCode(enum.IntEnum):
    """Application error codes for closing a whole QUIC connection."""

    NO_ERROR = 0
    PEER_REFUSED = 0x100
    """The peer's certificate or SPIFFE ID was not acceptable."""
    SUPERSEDED = 0x101
    """A newer connection from the same follower replaced this one."""
    SHUTDOWN = 0x102
    """The access point or follower is shutting down."""
    INTERNAL = 0x103


class RpcError(Exception):
    """An RPC failed; ``code`` is the StreamErrorCode (or the peer's reset code)."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class RpcTimeout(RpcError):
    pass


class RpcConnectionLost(RpcError):
    pass


UDP_SOCKET_BUFFER = 4 * 1024 * 1024


def _enlarge_udp_buffers(sock: socket.socket | None) -> None:
    """Bigger UDP socket buffers (up to the kernel's cap): with the defaults a burst of
    tunnel packets overflows them, and every drop halves the congestion window."""
    if sock is None:
        return
    for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, option, UDP_SOCKET_BUFFER)


def _client_initiated(sid: int) -> bool:
    return sid & 1 == 0


def _bidirectional(sid: int) -> bool:
    return sid & 2 == 0


StreamKind = Literal["control", "rpc-out", "rpc-in", "tunnel-out", "tunnel-in", "refused"]


@dataclass(eq=False)
class _Stream:
    sid: int
    kind: StreamKind
    decoder: FrameDecoder[ControlMessage]
    future: asyncio.Future[ControlMessage] | None = None
    task: asyncio.Task[None] | None = None
    request_seen: bool = False
    failed: bool = False
    local_finished: bool = False
    peer_finished: bool = False
    peer_done: asyncio.Event = field(default_factory=asyncio.Event)
    raw_after_first: bool = False
    """The stream may turn into a raw tunnel after its first frame (decode only that one)."""
    messages_seen: int = 0
    tunnel: QuicTunnel | None = None
    """Set once the stream carries raw tunnel bytes."""


def _ca_cert(ca: FleetCA | x509.Certificate) -> x509.Certificate:
    return ca.cert if isinstance(ca, FleetCA) else ca


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


class _TunnelFlowConnection(QuicConnection):
    """A QuicConnection whose tunnel streams get consumption-based receive windows.

    aioquic doubles a stream's receive window whenever the peer has sent half of it, however
    little the application has read, so a fast sender could fill memory behind a slow
    reader. For streams registered in ``tunnel_credit`` (``{stream id: [consumed, window]}``)
    the window is instead ``consumed + window``: the sender stalls when the reader does.
    """

    def tunnel_credit(self) -> dict[int, list[int]]:
        credit: dict[int, list[int]] | None = self.__dict__.get("_ah_tunnel_credit")
        if credit is None:
            credit = self.__dict__["_ah_tunnel_credit"] = {}
        return credit

    def _write_stream_limits(
        self, builder: QuicPacketBuilder, space: QuicPacketSpace, stream: QuicStream
    ) -> None:
        sid = stream.stream_id
        credit = self.tunnel_credit().get(sid) if sid is not None else None
        if sid is None or credit is None or not stream.max_stream_data_local:
            super()._write_stream_limits(builder, space, stream)
            return
        consumed, window = credit
        target = consumed + window
        # Raise in steps of a quarter window, not one frame per packet.
        if target - stream.max_stream_data_local >= window // 4:
            stream.max_stream_data_local = target
        if stream.max_stream_data_local_sent != stream.max_stream_data_local:
            buf = builder.start_frame(
                QuicFrameType.MAX_STREAM_DATA,
                capacity=MAX_STREAM_DATA_FRAME_CAPACITY,
                handler=self._on_max_stream_data_delivery,
                handler_args=(stream,),
            )
            buf.push_uint_var(sid)
            buf.push_uint_var(stream.max_stream_data_local)
            stream.max_stream_data_local_sent = stream.max_stream_data_local


DEFAULT_TUNNEL_POLICY = TunnelPolicy()


class _ClientCertRequestingConnection(_TunnelFlowConnection):
    """A server-side QuicConnection that asks the client for its certificate.

    aioquic only sends a TLS CertificateRequest when its (test-only) context flag is set, and
    QuicServer constructs plain QuicConnection objects; `ControlServer` switches each new
    connection to this class before it has seen any packet.
    """

    def _initialize(self, peer_cid: bytes) -> None:
        super()._initialize(peer_cid)
        self.tls._request_client_certificate = True


class _ProtocolsByCid(dict[bytes, QuicConnectionProtocol]):
    """`QuicServer`'s connection-id → protocol map, with the reverse index aioquic lacks.

    When a connection ends, aioquic's server scans its whole map for the ids of that
    connection: O(every id of every connection, ~9 per connection) per close, so a wave of
    closes (an access point restart, a reconnect storm, handshakes timing out under load) is
    quadratic, and the scan ran on the event loop that should be answering heartbeats. Here a
    close removes exactly its own ids. Only the operations `QuicServer` uses are indexed.
    """

    def __init__(self) -> None:
        super().__init__()
        self._cids: dict[QuicConnectionProtocol, set[bytes]] = {}

    def __setitem__(self, cid: bytes, protocol: QuicConnectionProtocol) -> None:
        previous = self.get(cid)
        if previous is not None and previous is not protocol:
            self._unindex(previous, cid)
        super().__setitem__(cid, protocol)
        self._cids.setdefault(protocol, set()).add(cid)

    def __delitem__(self, cid: bytes) -> None:
        protocol = self[cid]
        super().__delitem__(cid)
        self._unindex(protocol, cid)

    def _unindex(self, protocol: QuicConnectionProtocol, cid: bytes) -> None:
        cids = self._cids.get(protocol)
        if cids is not None:
            cids.discard(cid)
            if not cids:
                del self._cids[protocol]

    def clear(self) -> None:
        super().clear()
        self._cids.clear()

    def forget(self, protocol: QuicConnectionProtocol) -> None:
        """Remove every id that maps to `protocol`."""
        for cid in self._cids.pop(protocol, ()):
            super().__delitem__(cid)


class _IndexedQuicServer(QuicServer):
    """`QuicServer` whose connection close costs O(its own ids), see `_ProtocolsByCid`."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._protocols = _ProtocolsByCid()

    def _connection_terminated(self, protocol: QuicConnectionProtocol) -> None:
        protocols = self._protocols
        if isinstance(protocols, _ProtocolsByCid):
            protocols.forget(protocol)
        else:  # pragma: no cover - only if aioquic replaced the map itself
            super()._connection_terminated(protocol)


async def serve_quic(
    host: str,
    port: int,
    *,
    configuration: QuicConfiguration,
    create_protocol: Callable[..., QuicConnectionProtocol],
) -> QuicServer:
    """`aioquic.asyncio.serve` with `_IndexedQuicServer`: listen on UDP `host`:`port`."""
    loop = asyncio.get_running_loop()
    _, server = await loop.create_datagram_endpoint(
        lambda: _IndexedQuicServer(configuration=configuration, create_protocol=create_protocol),
        local_addr=(host, port),
    )
    return server


def _ack_with_next_packet(quic: QuicConnection, now: float) -> None:
    """Let a pending ACK ride in the packet about to carry our stream data.

    aioquic delays every ACK by its 1 ms granularity, so a reply written while handling the
    request's packet (an Ack for a Heartbeat, an RPC answer) never carries that packet's ACK:
    the ACK follows alone a millisecond later, doubling the datagrams (and the wake-ups) on
    the access point per heartbeat. Acknowledging earlier than the delay allows is always
    permitted (RFC 9000 section 13.2.1); without aioquic's packet spaces this does nothing.
    """
    spaces = getattr(quic, "_spaces", None)
    space = spaces.get(Epoch.ONE_RTT) if isinstance(spaces, dict) else None
    if space is not None and space.ack_at is not None and space.ack_at > now:
        space.ack_at = now


class _FramedConnection(QuicConnectionProtocol):
    """Shared stream bookkeeping: framing, per-stream failure, timers for the state machine."""

    role = "peer"

    def __init__(
        self,
        quic: QuicConnection,
        stream_handler: QuicStreamHandler | None = None,
        *,
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
    ) -> None:
        super().__init__(quic, stream_handler)
        self.max_frame_size = max_frame_size
        self.termination: events.ConnectionTerminated | None = None
        self.peer_address: tuple[str, int] | None = None
        self._streams: dict[int, _Stream] = {}
        # Peer-initiated streams we finished with; late data for them must not look like a
        # new stream. (Stream ids cannot be compared with a high-water mark: packets reorder.)
        self._peer_done: set[int] = set()
        self._sm_timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._disposed = False
        self._draining: set[QuicTunnel] = set()
        """Tunnels whose writer waits for the send buffer to shrink."""
        self.coalesce_transmit = False
        """Transmit once after the datagrams read in one go instead of after each one (see
        `datagram_received`)."""

    # -- helpers -----------------------------------------------------------------------

    @property
    def label(self) -> str:
        return (
            f"{self.role} {self.peer_address[0]}:{self.peer_address[1]}"
            if self.peer_address
            else self.role
        )

    def now_ms(self) -> int:
        return int(self._loop.time() * 1000)

    @property
    def is_terminated(self) -> bool:
        return self.termination is not None

    def _new_stream(self, sid: int, kind: StreamKind) -> _Stream:
        stream = _Stream(
            sid, kind, FrameDecoder[ControlMessage](ControlMessage, self.max_frame_size)
        )
        self._streams[sid] = stream
        return stream

    def _forget(self, stream: _Stream) -> None:
        if self._streams.get(stream.sid) is not stream:
            return
        del self._streams[stream.sid]
        if stream.tunnel is not None:
            self._draining.discard(stream.tunnel)
            quic = self._quic
            if isinstance(quic, _TunnelFlowConnection):
                quic.tunnel_credit().pop(stream.sid, None)
        if _client_initiated(stream.sid) != self._quic.configuration.is_client:
            self._peer_done.add(stream.sid)
            if len(self._peer_done) > 256:
                # aioquic drops data for streams it has discarded, so only streams it still
                # tracks need remembering; that keeps the set within the peer's stream limit.
                live = self._quic._streams
                self._peer_done = {sid for sid in self._peer_done if sid in live}

    def _maybe_forget(self, stream: _Stream) -> None:
        if stream.local_finished and (stream.peer_finished or stream.failed):
            self._forget(stream)

    def _write(self, sid: int, data: bytes, end: bool) -> bool:
        if self.is_terminated:
            return False
        try:
            self._quic.send_stream_data(sid, data, end_stream=end)
        except (RuntimeError, ValueError) as exc:
            # The stream was reset by the peer (STOP_SENDING) or already finished.
            _log.debug("{}: cannot write to stream {}: {}", self.label, sid, exc)
            return False
        _ack_with_next_packet(self._quic, self._loop.time())
        self._transmit_soon()
        return True

    def send_message(self, stream: _Stream, msg: ControlMessage, *, end: bool = False) -> None:
        if stream.local_finished:
            return
        try:
            frame = encode_frame(msg, max_frame_size=self.max_frame_size)
        except FrameTooLarge as exc:
            _log.error("{}: not sending on stream {}: {}", self.label, stream.sid, exc.message)
            frame = encode_frame(
                StreamError(code=StreamErrorCode.FRAME_TOO_LARGE, message=exc.message)
            )
            end = True
        self._write(stream.sid, frame, end)
        if end:
            stream.local_finished = True
            self._maybe_forget(stream)

    def finish(self, stream: _Stream, code: int = 0) -> None:
        """FIN our side; with a non-zero code also ask the peer to stop sending."""
        if not stream.local_finished:
            stream.local_finished = True
            self._write(stream.sid, b"", True)
        if code and not stream.peer_finished and not self.is_terminated:
            with contextlib.suppress(ValueError):
                self._quic.stop_stream(stream.sid, code)
            self._transmit_soon()
        self._maybe_forget(stream)

    def fail_stream(self, stream: _Stream, code: int, message: str) -> None:
        """Close one stream because of a protocol error; the connection stays up."""
        if stream.failed:
            return
        _log.warning(
            "{}: closing stream {} ({}) with code {} ({}): {}",
            self.label,
            stream.sid,
            stream.kind,
            int(code),
            _code_name(code),
            message,
        )
        stream.failed = True
        if not stream.local_finished:
            self.send_message(stream, StreamError(code=int(code), message=message), end=True)
        self.finish(stream, int(code))
        if stream.future is not None and not stream.future.done():
            stream.future.set_exception(RpcError(int(code), message))
        if stream.task is not None:
            stream.task.cancel()
        stream.peer_done.set()
        self._forget(stream)

    def spawn(self, coro: Awaitable[None]) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def next_timer_ms(self) -> int | None:
        return None

    def on_timer(self, now_ms: int) -> None:
        pass

    def rearm_timer(self) -> None:
        if self._sm_timer is not None:
            self._sm_timer.cancel()
            self._sm_timer = None
        if self._disposed or self.is_terminated:
            return
        at = self.next_timer_ms()
        if at is None:
            return
        # +1 ms: now_ms truncates, so firing "on time" could otherwise find nothing due yet.
        delay = max(0.0, (at - self.now_ms()) / 1000) + 0.001
        self._sm_timer = self._loop.call_later(delay, self._fire_timer)

    def _fire_timer(self) -> None:
        self._sm_timer = None
        try:
            self.on_timer(self.now_ms())
        except Exception:
            _log.exception("{}: control timer failed", self.label)
        self.rearm_timer()

    def dispose(self) -> None:
        """Stop every timer and task; the UDP transport is closed by the owner."""
        self._disposed = True
        if self._sm_timer is not None:
            self._sm_timer.cancel()
            self._sm_timer = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for task in list(self._tasks):
            task.cancel()

    # -- aioquic events ----------------------------------------------------------------

    def datagram_received(self, data: bytes | str, addr: Any) -> None:
        if self.peer_address is None:
            self.peer_address = (str(addr[0]), int(addr[1]))
        if self._disposed:
            return
        if self.coalesce_transmit:
            # aioquic transmits after every datagram; when a peer streams many packets, the
            # server socket is drained several datagrams per loop turn, and one transmit
            # after them all (ACKs, replies) does the same work once instead of per packet.
            self._quic.receive_datagram(cast(bytes, data), addr, now=self._loop.time())
            self._process_events()
            self._transmit_soon()
        else:
            super().datagram_received(data, addr)
        if self._draining:
            # Acknowledgements free send buffers: let blocked tunnel writers go on.
            for tunnel in list(self._draining):
                tunnel._progress()

    # -- tunnel plumbing ----------------------------------------------------------------

    def _tunnel_register(self, stream: _Stream, window: int) -> None:
        quic = self._quic
        if isinstance(quic, _TunnelFlowConnection):
            quic.tunnel_credit()[stream.sid] = [0, window]

    def _tunnel_consumed(self, stream: _Stream, count: int) -> None:
        quic = self._quic
        if not isinstance(quic, _TunnelFlowConnection):
            return
        credit = quic.tunnel_credit().get(stream.sid)
        if credit is None:
            return
        credit[0] += count
        qs = quic._streams.get(stream.sid)
        if qs is not None and credit[0] + credit[1] - qs.max_stream_data_local >= credit[1] // 4:
            self._transmit_soon()

    def _tunnel_send_buffered(self, stream: _Stream) -> int:
        qs = self._quic._streams.get(stream.sid)
        return 0 if qs is None else len(qs.sender._buffer)

    def transmit(self) -> None:
        if self._disposed:
            return
        super().transmit()

    def quic_event_received(self, event: events.QuicEvent) -> None:
        # The base class would build asyncio StreamReaders; we frame streams ourselves.
        try:
            if isinstance(event, events.HandshakeCompleted):
                self.on_handshake(event)
            elif isinstance(event, events.StreamDataReceived):
                self._on_stream_data(event.stream_id, event.data, event.end_stream)
            elif isinstance(event, events.StreamReset):
                self._on_reset(event.stream_id, event.error_code)
            elif isinstance(event, events.StopSendingReceived):
                stream = self._streams.get(event.stream_id)
                if stream is not None:
                    # aioquic already reset our sending side with the peer's code.
                    stream.local_finished = True
                    if stream.tunnel is not None:
                        stream.tunnel._stopped(event.error_code)
                    self.on_stop_sending(stream, event.error_code)
            elif isinstance(event, events.ConnectionTerminated):
                self.termination = event
                for stream in list(self._streams.values()):
                    stream.peer_done.set()
                    if stream.tunnel is not None:
                        stream.tunnel._lost(
                            f"connection closed: {event.reason_phrase or 'no reason'}"
                        )
                    if stream.future is not None and not stream.future.done():
                        stream.future.set_exception(
                            RpcConnectionLost(
                                StreamErrorCode.INTERNAL,
                                f"connection closed: {event.reason_phrase or 'no reason'} (code {event.error_code})",
                            )
                        )
                self.on_terminated(event)
                self.dispose()
        except Exception:
            # A bug in a handler must not leave aioquic half-way through its event queue.
            _log.exception("{}: error handling {}", self.label, type(event).__name__)

    def _on_stream_data(self, sid: int, data: bytes, end: bool) -> None:
        stream = self._streams.get(sid)
        if stream is None:
            local = _client_initiated(sid) == self._quic.configuration.is_client
            if not _bidirectional(sid):
                if not local:  # the protocol never uses unidirectional streams
                    with contextlib.suppress(ValueError):
                        self._quic.stop_stream(sid, StreamErrorCode.UNEXPECTED_MESSAGE)
                    self._transmit_soon()
                return
            if local or sid in self._peer_done:
                return  # data for a stream we already closed and forgot
            accepted = self.accept_stream(sid)
            if accepted is None:
                return
            stream = accepted
        if stream.failed:
            return
        if stream.tunnel is not None:
            self._tunnel_data(stream, data, end)
            return
        if data:
            error: FrameError | None = None
            first_only = stream.raw_after_first and stream.messages_seen == 0
            try:
                messages = stream.decoder.feed(data, limit=1 if first_only else None)
            except FrameError as exc:
                messages, error = exc.messages, exc
            rest = stream.decoder.remainder if first_only else b""
            for msg in messages:
                stream.messages_seen += 1
                self.on_message(stream, msg)
                if stream.failed or self._streams.get(sid) is not stream:
                    return
            if error is not None:
                self.on_stream_error(stream, error.code, error.message)
                return
            if stream.tunnel is not None:
                # The first frame opened a tunnel: whatever followed it is raw bytes.
                self._tunnel_data(stream, rest, end)
                return
            if rest:
                self._on_stream_data(sid, rest, end)
                return
        if end:
            stream.peer_finished = True
            stream.peer_done.set()
            if stream.decoder.buffered:
                self.on_stream_error(
                    stream,
                    StreamErrorCode.MALFORMED_FRAME,
                    f"stream ended inside a frame ({stream.decoder.buffered} bytes pending)",
                )
                return
            self.on_peer_finished(stream)
            self._maybe_forget(stream)

    def _tunnel_data(self, stream: _Stream, data: bytes, end: bool) -> None:
        tunnel = stream.tunnel
        assert tunnel is not None
        if data:
            tunnel._feed(data)
        if end:
            stream.peer_finished = True
            stream.peer_done.set()
            tunnel._feed_eof()
            self._maybe_forget(stream)

    def _on_reset(self, sid: int, code: int) -> None:
        stream = self._streams.get(sid)
        if stream is None:
            return
        stream.peer_finished = True
        stream.peer_done.set()
        if stream.tunnel is not None:
            stream.tunnel._peer_reset(code)
        self.on_peer_reset(stream, code)
        self._maybe_forget(stream)

    # -- hooks -------------------------------------------------------------------------

    def on_handshake(self, event: events.HandshakeCompleted) -> None:
        pass

    def accept_stream(self, sid: int) -> _Stream | None:
        return None

    def on_message(self, stream: _Stream, msg: ControlMessage) -> None:
        pass

    def on_stream_error(self, stream: _Stream, code: int, message: str) -> None:
        self.fail_stream(stream, code, message)

    def on_peer_finished(self, stream: _Stream) -> None:
        pass

    def on_peer_reset(self, stream: _Stream, code: int) -> None:
        pass

    def on_stop_sending(self, stream: _Stream, code: int) -> None:
        pass

    def on_terminated(self, event: events.ConnectionTerminated) -> None:
        pass

    # -- RPC ----------------------------------------------------------------------------

    def _rpc_out_message(self, stream: _Stream, msg: ControlMessage) -> None:
        if stream.future is not None and not stream.future.done():
            stream.future.set_result(msg)
        # One reply per RPC: anything after it is ignored with the forgotten stream.
        self._forget(stream)


def _code_name(code: int) -> str:
    try:
        return StreamErrorCode(code).name
    except ValueError:
        return "NO_ERROR" if code == 0 else "UNKNOWN"


# ==========================================================================================
# Tunnel streams
# ==========================================================================================


class QuicTunnel:
    """One tunnel stream in raw mode (after OpenTcp / OpenTcpOk). Event-loop only.

    Reading consumes the stream's receive window (see `_TunnelFlowConnection`); writing
    queues into aioquic and `drain` waits while more than `TUNNEL_SEND_HIGH_WATER` bytes are
    unsent or unacknowledged. EOF is a FIN, `abort` a RESET_STREAM plus STOP_SENDING.
    """

    def __init__(
        self,
        proto: _FramedConnection,
        stream: _Stream,
        tunnel_id: str,
        *,
        window: int = TUNNEL_WINDOW,
        high_water: int = TUNNEL_SEND_HIGH_WATER,
        low_water: int = TUNNEL_SEND_LOW_WATER,
    ) -> None:
        self._proto = proto
        self._stream = stream
        self.tunnel_id = tunnel_id
        self.high_water = high_water
        self.low_water = low_water
        self._buffer = bytearray()
        self._eof = False
        self._read_error: BaseException | None = None
        self._write_error: BaseException | None = None
        self._write_closed = False
        self._aborted = False
        self._read_waiter: asyncio.Future[None] | None = None
        self._drain_waiter: asyncio.Future[None] | None = None
        self.bytes_received = 0
        self.bytes_sent = 0
        stream.tunnel = self
        proto._tunnel_register(stream, window)
        self.reader = QuicTunnelReader(self)
        self.writer = QuicTunnelWriter(self)

    def __repr__(self) -> str:
        return f"QuicTunnel({self.tunnel_id!r}, stream {self._stream.sid}, {self._proto.label})"

    @property
    def stream_id(self) -> int:
        return self._stream.sid

    @property
    def broken(self) -> bool:
        """Reset or aborted by either side, or the connection is gone."""
        return self._aborted or self._read_error is not None

    # -- events from the connection ---------------------------------------------------

    def _wake_reader(self) -> None:
        waiter = self._read_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _wake_writer(self) -> None:
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _feed(self, data: bytes) -> None:
        self._buffer += data
        self.bytes_received += len(data)
        self._wake_reader()

    def _feed_eof(self) -> None:
        self._eof = True
        self._wake_reader()

    def _peer_reset(self, code: int) -> None:
        if self._read_error is None:
            self._read_error = ConnectionResetError(
                f"tunnel {self.tunnel_id} was reset by {self._proto.label} (code {code})"
            )
        self._wake_reader()

    def _stopped(self, code: int) -> None:
        if self._write_error is None:
            self._write_error = BrokenPipeError(
                f"{self._proto.label} stopped reading tunnel {self.tunnel_id} (code {code})"
            )
        self._proto._draining.discard(self)
        self._wake_writer()

    def _lost(self, reason: str) -> None:
        error = ConnectionAbortedError(f"tunnel {self.tunnel_id}: {reason}")
        if self._read_error is None and not self._eof:
            self._read_error = error
        if self._write_error is None:
            self._write_error = error
        self._wake_reader()
        self._wake_writer()

    def _progress(self) -> None:
        if (
            self._write_error is not None
            or self._proto._tunnel_send_buffered(self._stream) <= self.low_water
        ):
            self._proto._draining.discard(self)
            self._wake_writer()

    # -- reading ------------------------------------------------------------------------

    async def read(self, n: int = -1) -> bytes:
        """Up to `n` bytes (all buffered if negative); b"" at EOF; ConnectionError on reset."""
        while not self._buffer:
            if self._read_error is not None:
                raise self._read_error
            if self._eof:
                return b""
            self._read_waiter = self._proto._loop.create_future()
            try:
                await self._read_waiter
            finally:
                self._read_waiter = None
        if n < 0 or n >= len(self._buffer):
            data = bytes(self._buffer)
            self._buffer.clear()
        else:
            data = bytes(self._buffer[:n])
            del self._buffer[:n]
        self._proto._tunnel_consumed(self._stream, len(data))
        return data

    def at_eof(self) -> bool:
        return self._eof and not self._buffer

    # -- writing ------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if self._write_error is not None:
            raise self._write_error
        if self._write_closed:
            raise BrokenPipeError(f"tunnel {self.tunnel_id}: write after write_eof")
        if not data:
            return
        if not self._proto._write(self._stream.sid, bytes(data), False):
            self._write_error = BrokenPipeError(
                f"tunnel {self.tunnel_id}: stream {self._stream.sid} no longer writable"
            )
            raise self._write_error
        self.bytes_sent += len(data)

    async def drain(self) -> None:
        while True:
            if self._write_error is not None:
                raise self._write_error
            if self._proto._tunnel_send_buffered(self._stream) <= self.high_water:
                return
            self._drain_waiter = self._proto._loop.create_future()
            self._proto._draining.add(self)
            try:
                await self._drain_waiter
            finally:
                self._drain_waiter = None
                self._proto._draining.discard(self)

    def write_eof(self) -> None:
        """Send FIN (idempotent)."""
        if self._write_closed or self._aborted:
            return
        self._write_closed = True
        stream = self._stream
        if not stream.local_finished:
            stream.local_finished = True
            self._proto._write(stream.sid, b"", True)
        self._proto._maybe_forget(stream)

    def abort(self, code: int = StreamErrorCode.INTERNAL) -> None:
        """Reset both directions of the stream now (idempotent)."""
        if self._aborted:
            return
        self._aborted = True
        proto, stream = self._proto, self._stream
        error = ConnectionAbortedError(f"tunnel {self.tunnel_id} aborted")
        if self._read_error is None:
            self._read_error = error
        if self._write_error is None:
            self._write_error = error
        if not proto.is_terminated and not proto._disposed:
            with contextlib.suppress(ValueError, RuntimeError):
                if not stream.local_finished:
                    proto._quic.reset_stream(stream.sid, code)
            with contextlib.suppress(ValueError, RuntimeError):
                if not stream.peer_finished:
                    proto._quic.stop_stream(stream.sid, code)
            proto._transmit_soon()
        stream.local_finished = True
        stream.failed = True
        stream.peer_done.set()
        proto._forget(stream)
        self._wake_reader()
        self._wake_writer()


class QuicTunnelReader:
    """The receiving half of a `QuicTunnel`, shaped like `asyncio.StreamReader`."""

    def __init__(self, tunnel: QuicTunnel) -> None:
        self.tunnel = tunnel

    async def read(self, n: int = -1) -> bytes:
        return await self.tunnel.read(n)

    async def readexactly(self, n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            chunk = await self.tunnel.read(n - len(out))
            if not chunk:
                raise asyncio.IncompleteReadError(bytes(out), n)
            out += chunk
        return bytes(out)

    def at_eof(self) -> bool:
        return self.tunnel.at_eof()


class QuicTunnelWriter:
    """The sending half of a `QuicTunnel`, shaped like `asyncio.StreamWriter`."""

    def __init__(self, tunnel: QuicTunnel) -> None:
        self.tunnel = tunnel

    def write(self, data: bytes) -> None:
        self.tunnel.write(data)

    async def drain(self) -> None:
        await self.tunnel.drain()

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.tunnel.write_eof()

    def close(self) -> None:
        """FIN our side; an unread peer side is reset (nobody will read it)."""
        self.tunnel.write_eof()
        if not self.tunnel._eof:
            self.tunnel.abort()

    def abort(self) -> None:
        self.tunnel.abort()

    def is_closing(self) -> bool:
        return self.tunnel._write_closed or self.tunnel._aborted

    async def wait_closed(self) -> None:
        await self.tunnel._stream.peer_done.wait()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "tunnel_id":
            return self.tunnel.tunnel_id
        if name == "peername":
            return self.tunnel._proto.peer_address
        return default


def _reset_socket_writer(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
    writer.transport.abort()


async def bridge_tunnel(
    tunnel: QuicTunnel,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    *,
    reset_socket: Callable[[], None] | None = None,
    chunk: int = TUNNEL_CHUNK,
) -> tuple[int, int]:
    """Pump between a tunnel stream and a socket's asyncio streams until both directions end.

    EOF travels as EOF (FIN ↔ write_eof). A reset or error on either side resets both: the
    tunnel is aborted and `reset_socket()` runs (default: close the socket with a TCP RST).
    Returns (bytes tunnel→socket, bytes socket→tunnel).
    """
    counts = [0, 0]

    async def tunnel_to_socket() -> None:
        while data := await tunnel.read(chunk):
            writer.write(data)
            counts[0] += len(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()

    async def socket_to_tunnel() -> None:
        while data := await reader.read(chunk):
            tunnel.write(data)
            counts[1] += len(data)
            await tunnel.drain()
        tunnel.write_eof()

    tasks = [
        asyncio.ensure_future(tunnel_to_socket()),
        asyncio.ensure_future(socket_to_tunnel()),
    ]
    failed = True
    try:
        pending: set[asyncio.Future[None]] = set(tasks)
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_EXCEPTION)
            if any(not t.cancelled() and t.exception() is not None for t in done):
                break
        else:
            failed = False
    finally:
        for task in tasks:
            task.cancel()
        if failed:
            tunnel.abort()
            if reset_socket is not None:
                reset_socket()
            else:
                _reset_socket_writer(writer)
        else:
            writer.close()
        for task in tasks:
            if task.done() and not task.cancelled():
                task.exception()  # mark retrieved
    return counts[0], counts[1]


async def _in_thread(fn: Callable[[], _T], name: str) -> _T:
    """Run blocking `fn` in a new daemon thread (the default executor is small and tunnels
    may block it for a connect timeout each)."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[_T] = loop.create_future()

    def deliver(ok: bool, value: Any) -> None:
        if future.done():
            return
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)

    def main() -> None:
        try:
            result: Any = fn()
            ok = True
        except BaseException as exc:
            result, ok = exc, False
        with contextlib.suppress(RuntimeError):  # the loop is closed
            loop.call_soon_threadsafe(deliver, ok, result)

    threading.Thread(target=main, name=name, daemon=True).start()
    return await future


# ==========================================================================================
# Access point side
# ==========================================================================================


class ControlServerHandler(Protocol):
    """What the access point plugs into `ControlServer`.

    All methods are called on the event loop and must not block (spawn tasks for slow work).
    `conn` identifies the connection: a follower that reconnects gets a new one, and the old
    one is reported disconnected first.
    """

    def on_follower_connected(self, name: str, conn: FollowerConnection) -> None: ...

    def on_control_message(self, name: str, conn: FollowerConnection, msg: ControlMessage) -> None:
        """Every control message accepted from a connected follower (Hello, Heartbeat, Goodbye...)."""
        ...

    def on_follower_health(
        self, name: str, conn: FollowerConnection, health: FollowerHealth
    ) -> None: ...

    def on_follower_disconnected(
        self, name: str, conn: FollowerConnection, reason: str
    ) -> None: ...


class FollowerConnection:
    """The access point's handle on one authenticated follower connection."""

    def __init__(self, proto: _AccessPointConnection, name: str, spiffe_id: str) -> None:
        self._proto = proto
        self.name = name
        self.spiffe_id = spiffe_id
        self.info: FollowerInfo | None = None
        """The Hello's FollowerInfo, once accepted."""
        self.last_health: FollowerHealth = FollowerHealth.OFFLINE
        self._disconnect_reported = False

    def __repr__(self) -> str:
        return f"FollowerConnection({self.name!r}, {self._proto.label}, {self.last_health.value})"

    @property
    def peer_address(self) -> tuple[str, int] | None:
        return self._proto.peer_address

    @property
    def connected(self) -> bool:
        """Hello accepted and the control session still open."""
        sm = self._proto.control
        return (
            sm is not None
            and sm.phase is AccessPointPhase.CONNECTED
            and not self._proto.is_terminated
        )

    def health(self, now_ms: int | None = None) -> FollowerHealth:
        sm = self._proto.control
        if sm is None or self._proto.is_terminated:
            return FollowerHealth.OFFLINE
        return sm.health(self._proto.now_ms() if now_ms is None else now_ms)

    @property
    def last_heartbeat_ms(self) -> int | None:
        """Event-loop milliseconds of the last Heartbeat (or Hello)."""
        sm = self._proto.control
        return sm.last_heartbeat_ms if sm is not None else None

    @property
    def smoothed_rtt_ms(self) -> float:
        """aioquic's smoothed RTT estimate for this connection."""
        return float(self._proto._quic._loss._rtt_smoothed) * 1000

    async def open_rpc(self, request: ControlMessage, timeout: float = 30.0) -> ControlMessage:
        """Send `request` on a new bidirectional stream and return the follower's reply.

        Raises RpcError (the follower answered StreamError or broke the stream), RpcTimeout,
        RpcConnectionLost, or FrameTooLarge (request over the frame limit) .
        """
        proto = self._proto
        if not self.connected:
            raise RpcConnectionLost(
                StreamErrorCode.INTERNAL, f"follower {self.name!r} is not connected"
            )
        frame = encode_frame(request, max_frame_size=proto.max_frame_size)
        sid = proto._quic.get_next_available_stream_id()
        stream = proto._new_stream(sid, "rpc-out")
        stream.future = proto._loop.create_future()
        proto._write(sid, frame, True)
        stream.local_finished = True
        try:
            async with asyncio.timeout(timeout):
                reply = await stream.future
        except TimeoutError:
            message = (
                f"no reply from {self.name!r} within {timeout:g} s to {type(request).__name__}"
            )
            if not stream.failed and not proto.is_terminated:
                _log.warning("{}: resetting RPC stream {}: {}", proto.label, sid, message)
                with contextlib.suppress(ValueError):
                    proto._quic.reset_stream(sid, StreamErrorCode.INTERNAL)
                    proto._quic.stop_stream(sid, StreamErrorCode.INTERNAL)
                proto._transmit_soon()
            proto._forget(stream)
            raise RpcTimeout(StreamErrorCode.INTERNAL, message) from None
        finally:
            if stream.future.done() and not stream.future.cancelled():
                stream.future.exception()  # mark retrieved
        if isinstance(reply, StreamError):
            raise RpcError(
                reply.code,
                f"follower {self.name!r} refused {type(request).__name__}: {reply.message}",
            )
        return reply

    async def open_tunnel(
        self, dst: str, port: int, timeout: float = 10.0, *, tunnel_id: str | None = None
    ) -> tuple[QuicTunnelReader, QuicTunnelWriter]:
        """Open a tunnel stream to `dst:port` on the follower's side.

        Sends ``OpenTcp`` on a new bidirectional stream and waits for the answer; after
        ``OpenTcpOk`` the stream carries raw bytes both ways. Raises `TunnelRefused` (the
        follower's ``OpenTcpErr``: not allow-listed, unreachable, timeout), `TunnelTimeout`,
        or `TunnelUnavailable` (not connected, connection lost, no tunnel support).
        """
        proto = self._proto
        if not self.connected:
            raise TunnelUnavailable(f"follower {self.name!r} is not connected")
        tunnel_id = tunnel_id or secrets.token_hex(8)
        frame = encode_frame(
            OpenTcp(dst=dst, port=port, tunnel_id=tunnel_id), max_frame_size=proto.max_frame_size
        )
        sid = proto._quic.get_next_available_stream_id()
        stream = proto._new_stream(sid, "tunnel-out")
        stream.raw_after_first = True
        stream.future = proto._loop.create_future()
        proto._write(sid, frame, False)

        def give_up() -> None:
            if not stream.failed and not proto.is_terminated and not proto._disposed:
                with contextlib.suppress(ValueError, RuntimeError):
                    proto._quic.reset_stream(sid, StreamErrorCode.INTERNAL)
                    proto._quic.stop_stream(sid, StreamErrorCode.INTERNAL)
                proto._transmit_soon()
            if stream.tunnel is not None:
                stream.tunnel.abort()
            proto._forget(stream)

        try:
            async with asyncio.timeout(timeout):
                reply = await stream.future
        except TimeoutError:
            give_up()
            message = (
                f"follower {self.name!r} did not answer OpenTcp {dst}:{port} within {timeout:g} s"
            )
            _log.warning("{}: {}", proto.label, message)
            raise TunnelTimeout(message) from None
        except RpcError as exc:
            give_up()
            raise TunnelUnavailable(
                f"tunnel {tunnel_id} to follower {self.name!r} failed: {exc.message}"
            ) from None
        except BaseException:
            give_up()
            raise
        tunnel = stream.tunnel
        if isinstance(reply, OpenTcpOk) and tunnel is not None:
            return tunnel.reader, tunnel.writer
        proto.finish(stream)
        with contextlib.suppress(ValueError):
            if not stream.peer_finished and not proto.is_terminated:
                proto._quic.stop_stream(sid, StreamErrorCode.INTERNAL)
        proto._forget(stream)
        if isinstance(reply, OpenTcpErr):
            raise TunnelRefused(
                reply.code,
                f"follower {self.name!r} refused a tunnel to {dst}:{port}: {reply.message}",
            )
        if isinstance(reply, StreamError):
            raise TunnelUnavailable(
                f"follower {self.name!r} cannot open tunnels: {reply.message} (code {reply.code})"
            )
        raise TunnelUnavailable(
            f"follower {self.name!r} answered OpenTcp with {type(reply).__name__}"
        )

    def close(
        self, reason: str = "closed by the access point", code: int = ConnectionCloseCode.NO_ERROR
    ) -> None:
        """Close the QUIC connection now (the follower will reconnect)."""
        self._proto.close(error_code=int(code), reason_phrase=reason)

    async def wait_closed(self) -> None:
        await self._proto.wait_closed()


class _AccessPointConnection(_FramedConnection):
    role = "follower"

    def __init__(
        self,
        quic: QuicConnection,
        stream_handler: QuicStreamHandler | None = None,
        *,
        server: ControlServer,
    ) -> None:
        quic.__class__ = _ClientCertRequestingConnection
        super().__init__(quic, stream_handler, max_frame_size=server.max_frame_size)
        self.server = server
        self.control: AccessPointControl | None = None
        self.follower: FollowerConnection | None = None
        self._control_stream: _Stream | None = None
        self._refused = False
        server._protocols.add(self)

    @property
    def label(self) -> str:
        where = f"{self.peer_address[0]}:{self.peer_address[1]}" if self.peer_address else "?"
        return f"follower {self.follower.name!r} ({where})" if self.follower else f"client {where}"

    def refuse(self, message: str) -> None:
        if self._refused:
            return
        self._refused = True
        _log.warning("refusing QUIC connection from {}: {}", self.label, message)
        self.close(error_code=ConnectionCloseCode.PEER_REFUSED, reason_phrase=message)

    def on_handshake(self, event: events.HandshakeCompleted) -> None:
        if self.server._closing:
            self._refused = True
            self.close(
                error_code=ConnectionCloseCode.SHUTDOWN, reason_phrase="access point shutting down"
            )
            return
        tls = self._quic.tls
        leaf = tls._peer_certificate
        if leaf is None:
            self.refuse("client presented no certificate")
            return
        try:
            spiffe_id = verify_peer(
                [leaf, *tls._peer_certificate_chain],
                self.server.ca_cert,
                FollowerSpiffeId(self.server.trust_domain),
            )
        except PeerVerificationError as exc:
            self.refuse(str(exc))
            return
        name = follower_name_from_spiffe_id(self.server.trust_domain, spiffe_id)
        assert name is not None  # FollowerSpiffeId accepted it
        self.follower = FollowerConnection(self, name, spiffe_id)
        srv = self.server
        self.control = AccessPointControl(
            name,
            self.now_ms(),
            heartbeat_interval_ms=srv.heartbeat_interval_ms,
            server_version=srv.server_version,
            unhealthy_after_intervals=srv.unhealthy_after_intervals,
            hello_timeout_ms=srv.hello_timeout_ms,
        )
        # Debug: the handler reports the accepted follower (the access point's fleet logs it
        # with its facts); at info, 500 followers reconnecting meant thousands of redacted
        # lines (~0.15 ms each) on the loop that must also finish their handshakes.
        _log.debug("{}: authenticated as {}", self.label, spiffe_id)
        self.rearm_timer()

    def accept_stream(self, sid: int) -> _Stream | None:
        if self.control is None:
            # No stream before the peer is verified (stream data cannot precede the handshake
            # without 0-RTT, which we never enable); treat it as hostile.
            self.refuse(f"stream {sid} data before the client was authenticated")
            return None
        if sid == CONTROL_STREAM_ID:
            self._control_stream = self._new_stream(sid, "control")
            return self._control_stream
        stream = self._new_stream(sid, "refused")
        self.fail_stream(
            stream,
            StreamErrorCode.UNEXPECTED_MESSAGE,
            f"followers may only open the control stream ({CONTROL_STREAM_ID}), not stream {sid}",
        )
        return None

    def on_message(self, stream: _Stream, msg: ControlMessage) -> None:
        if stream.kind == "rpc-out":
            self._rpc_out_message(stream, msg)
            return
        if stream.kind == "tunnel-out":
            future = stream.future
            if future is None or future.done():
                return
            if isinstance(msg, OpenTcpOk):
                QuicTunnel(self, stream, msg.tunnel_id)
            future.set_result(msg)
            return
        sm, follower = self.control, self.follower
        if sm is None or follower is None:
            return
        was_connected = sm.phase is AccessPointPhase.CONNECTED
        actions = sm.receive(msg, self.now_ms())
        if was_connected:
            self.server._call("on_control_message", follower.name, follower, msg)
        self.apply(actions)
        if not was_connected and sm.phase is AccessPointPhase.CONNECTED:
            self.server._call("on_control_message", follower.name, follower, msg)

    def on_stream_error(self, stream: _Stream, code: int, message: str) -> None:
        if stream.kind == "control" and self.control is not None:
            _log.warning("{}: bad frame on the control stream: {}", self.label, message)
            self.apply(self.control.protocol_error(code, message, self.now_ms()))
            return
        self.fail_stream(stream, code, message)

    def on_peer_finished(self, stream: _Stream) -> None:
        if stream.kind == "control" and self.control is not None:
            self.apply(
                self.control.connection_lost("follower closed its control stream", self.now_ms())
            )
        elif (
            stream.kind in ("rpc-out", "tunnel-out")
            and stream.future is not None
            and not stream.future.done()
        ):
            stream.future.set_exception(
                RpcError(
                    StreamErrorCode.MALFORMED_FRAME, "follower ended the stream without a reply"
                )
            )
            self._forget(stream)

    def on_peer_reset(self, stream: _Stream, code: int) -> None:
        if stream.kind == "control" and self.control is not None:
            self.apply(
                self.control.connection_lost(
                    f"follower reset its control stream (code {code})", self.now_ms()
                )
            )
        elif stream.future is not None and not stream.future.done():
            stream.future.set_exception(
                RpcError(code, f"follower reset the RPC stream (code {code})")
            )
            self._forget(stream)

    def on_stop_sending(self, stream: _Stream, code: int) -> None:
        if stream.kind == "control" and self.control is not None:
            # A StreamError frame explaining the stop usually rides in the same datagram
            # after the STOP_SENDING frame: let it be processed first.
            self._loop.call_soon(self._control_stopped, code)

    def _control_stopped(self, code: int) -> None:
        if self.control is not None and not self._disposed:
            self.apply(
                self.control.connection_lost(
                    f"follower stopped its control stream (code {code})", self.now_ms()
                )
            )

    def on_terminated(self, event: events.ConnectionTerminated) -> None:
        if self.control is not None:
            reason = f"connection closed: {event.reason_phrase or 'no reason given'} (code {event.error_code})"
            self.apply(self.control.connection_lost(reason, self.now_ms()))
        self.server._protocols.discard(self)

    def _hang_up(self, reason: str) -> None:
        if not self.is_terminated and not self._disposed:
            self.close(error_code=ConnectionCloseCode.PEER_REFUSED, reason_phrase=reason)

    def next_timer_ms(self) -> int | None:
        return self.control.next_timer_ms() if self.control is not None else None

    def on_timer(self, now_ms: int) -> None:
        if self.control is not None:
            self.apply(self.control.tick(now_ms), rearm=False)

    def apply(self, actions: list[AccessPointAction], *, rearm: bool = True) -> None:
        follower = self.follower
        assert follower is not None
        for action in actions:
            if isinstance(action, SendMessage):
                if self._control_stream is not None:
                    self.send_message(self._control_stream, action.message)
            elif isinstance(action, CloseStream):
                if self._control_stream is not None:
                    self.finish(self._control_stream, action.code)
                    self._control_stream.failed = action.code != 0
                    self._forget(self._control_stream)
            elif isinstance(action, MarkHealth):
                follower.last_health = action.health
                if follower.info is not None:
                    self.server._call("on_follower_health", follower.name, follower, action.health)
            elif isinstance(action, FollowerAccepted):
                follower.info = action.info
                self.server._accepted(follower)
            elif isinstance(action, SessionClosed):
                if action.graceful:
                    _log.info("{}: control session ended: {}", self.label, action.reason)
                else:
                    _log.warning("{}: control session ended: {}", self.label, action.reason)
                self.server._gone(follower, action.reason)
                if follower.info is None:
                    # Never got past Hello (timeout, wrong name, bad frame): nothing will ever
                    # happen on this connection. Give the StreamError a moment to arrive, then
                    # hang up so a silent or hostile peer cannot hold it open.
                    self._loop.call_later(
                        self.server.goodbye_timeout_s, self._hang_up, action.reason
                    )
        if rearm:
            self.rearm_timer()


class ControlServer:
    """The access point's QUIC listener for follower control connections."""

    def __init__(
        self,
        *,
        identity: Identity,
        ca: FleetCA | x509.Certificate,
        trust_domain: str,
        handler: ControlServerHandler,
        heartbeat_interval_ms: int = 5_000,
        unhealthy_after_intervals: int = 3,
        hello_timeout_ms: int = 10_000,
        server_version: str = "0.1.0",
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
        idle_timeout_s: float = 60.0,
        goodbye_timeout_s: float = 1.0,
        max_datagram_size: int = SMALLEST_MAX_DATAGRAM_SIZE,
    ) -> None:
        """`max_datagram_size`: UDP payload limit for what this side sends. The default (1200)
        crosses any path; raise it only where larger datagrams are known to pass (loopback,
        jumbo-frame LANs) — pure-Python QUIC's throughput grows with it."""
        self.identity = identity
        self.ca_cert = _ca_cert(ca)
        self.trust_domain = trust_domain
        self.handler = handler
        self.heartbeat_interval_ms = heartbeat_interval_ms
        self.unhealthy_after_intervals = unhealthy_after_intervals
        self.hello_timeout_ms = hello_timeout_ms
        self.server_version = server_version
        self.max_frame_size = max_frame_size
        self.idle_timeout_s = idle_timeout_s
        self.goodbye_timeout_s = goodbye_timeout_s
        self.max_datagram_size = max_datagram_size
        self._quic_server: QuicServer | None = None
        self._protocols: set[_AccessPointConnection] = set()
        self._followers: dict[str, FollowerConnection] = {}
        self.port: int | None = None
        self.host: str | None = None
        self._closing = False

    def _configuration(self) -> QuicConfiguration:
        config = QuicConfiguration(
            is_client=False,
            alpn_protocols=[ALPN],
            idle_timeout=self.idle_timeout_s,
            max_datagram_size=self.max_datagram_size,
        )
        config.certificate = self.identity.cert
        config.private_key = self.identity.key
        config.verify_mode = ssl.CERT_REQUIRED
        config.load_verify_locations(cadata=_pem(self.ca_cert))
        return config

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Listen on UDP `host`:`port` (0: any free port); return the bound port."""
        if self._quic_server is not None:
            raise RuntimeError("ControlServer already started")

        def create_protocol(
            quic: QuicConnection, stream_handler: QuicStreamHandler | None = None
        ) -> _AccessPointConnection:
            return _AccessPointConnection(quic, stream_handler, server=self)

        try:
            self._quic_server = await serve_quic(
                host, port, configuration=self._configuration(), create_protocol=create_protocol
            )
        except OSError as exc:
            raise OSError(
                exc.errno, f"cannot listen for QUIC on {host}:{port}/udp: {exc.strerror}"
            ) from exc
        transport = cast(asyncio.DatagramTransport, self._quic_server._transport)
        self.host = host
        self.port = int(transport.get_extra_info("sockname")[1])
        _enlarge_udp_buffers(transport.get_extra_info("socket"))
        _log.info("QUIC control server listening on {}:{}/udp", host, self.port)
        return self.port

    @property
    def followers(self) -> dict[str, FollowerConnection]:
        """Currently connected followers by name (Hello accepted, session open)."""
        return dict(self._followers)

    def follower(self, name: str) -> FollowerConnection | None:
        return self._followers.get(name)

    def _call(self, method: str, *args: Any) -> None:
        try:
            getattr(self.handler, method)(*args)
        except Exception:
            _log.exception("control server handler {} failed", method)

    def _accepted(self, conn: FollowerConnection) -> None:
        old = self._followers.get(conn.name)
        if old is not None and old is not conn:
            _log.info("follower {!r} reconnected; closing its previous connection", conn.name)
            self._gone(old, "superseded by a newer connection from the same follower")
            old.close("superseded by a newer connection", ConnectionCloseCode.SUPERSEDED)
        self._followers[conn.name] = conn
        _log.debug("follower {!r} connected from {}", conn.name, conn.peer_address)
        self._call("on_follower_connected", conn.name, conn)

    def _gone(self, conn: FollowerConnection, reason: str) -> None:
        if conn.info is None or conn._disconnect_reported:
            return
        conn._disconnect_reported = True
        conn.last_health = FollowerHealth.OFFLINE
        if self._followers.get(conn.name) is conn:
            del self._followers[conn.name]
        self._call("on_follower_disconnected", conn.name, conn, reason)

    async def close(self, reason: str = "access point shutting down") -> None:
        """Say Goodbye to every follower, give them `goodbye_timeout_s` to finish, stop listening."""
        if self._quic_server is None:
            return
        self._closing = True  # new handshakes are turned away from here on
        waits: list[Awaitable[Any]] = []
        for proto in list(self._protocols):
            if proto.control is not None and proto.follower is not None and not proto.is_terminated:
                proto.apply(proto.control.shutdown(reason, proto.now_ms()))
                waits.append(proto.wait_closed())
        if waits:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.goodbye_timeout_s):
                    await asyncio.gather(*waits, return_exceptions=True)
        for proto in list(self._protocols):
            proto.close(error_code=ConnectionCloseCode.SHUTDOWN, reason_phrase=reason)
        self._quic_server.close()
        for proto in list(self._protocols):
            proto.dispose()
        self._protocols.clear()
        self._quic_server = None
        self._closing = False
        _log.info("QUIC control server on port {} closed: {}", self.port, reason)

    async def __aenter__(self) -> ControlServer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


# ==========================================================================================
# Follower side
# ==========================================================================================


class _FollowerConnectionProtocol(_FramedConnection):
    role = "access point"

    def __init__(
        self,
        quic: QuicConnection,
        stream_handler: QuicStreamHandler | None = None,
        *,
        client: ControlClient,
        control: FollowerControl,
    ) -> None:
        super().__init__(quic, stream_handler, max_frame_size=client.max_frame_size)
        self.client = client
        self.control = control
        self.session_done: asyncio.Future[str] = self._loop.create_future()
        self.control_stream: _Stream | None = None

    def _end_session(self, reason: str) -> None:
        if not self.session_done.done():
            self.session_done.set_result(reason)

    def start_session(self) -> None:
        sid = self._quic.get_next_available_stream_id()
        self.control_stream = self._new_stream(sid, "control")
        self.apply(self.control.start(self.now_ms()))

    def accept_stream(self, sid: int) -> _Stream | None:
        # Only server-initiated bidirectional streams reach here: each one is an RPC or a
        # tunnel (the first frame tells).
        stream = self._new_stream(sid, "rpc-in")
        stream.raw_after_first = self.client.tunnel_policy is not None
        return stream

    def on_message(self, stream: _Stream, msg: ControlMessage) -> None:
        if stream.kind == "control":
            self.apply(self.control.receive(msg, self.now_ms()))
            return
        if stream.kind != "rpc-in":
            return
        if stream.request_seen:
            self.fail_stream(
                stream,
                StreamErrorCode.UNEXPECTED_MESSAGE,
                f"second message {type(msg).__name__} on RPC stream {stream.sid}; one request per stream",
            )
            return
        stream.request_seen = True
        policy = self.client.tunnel_policy
        if isinstance(msg, OpenTcp) and policy is not None:
            stream.kind = "tunnel-in"
            tunnel = QuicTunnel(self, stream, msg.tunnel_id)
            stream.task = self.spawn(self._serve_tunnel(stream, tunnel, msg, policy))
        elif isinstance(msg, DialData) and policy is not None:
            stream.task = self.spawn(self._serve_dial_data(stream, msg, policy))
        else:
            stream.task = self.spawn(self._serve_rpc(stream, msg))

    def _refuse_tunnel(
        self, stream: _Stream, tunnel: QuicTunnel, code: TunnelErrorCode, message: str
    ) -> None:
        if not tunnel.broken and not self.is_terminated:
            frame = encode_frame(OpenTcpErr(tunnel_id=tunnel.tunnel_id, code=code, message=message))
            self._write(stream.sid, frame, True)
            stream.local_finished = True
        # Nothing will read what the access point might still send.
        tunnel.abort(0)

    async def _serve_tunnel(
        self, stream: _Stream, tunnel: QuicTunnel, request: OpenTcp, policy: TunnelPolicy
    ) -> None:
        tid = request.tunnel_id
        target = policy.resolve(request.dst, request.port)
        if target is None:
            message = f"{request.dst}:{request.port} is not on this follower's tunnel allow-list"
            _log.warning("refusing tunnel {} from {}: {}", tid, self.label, message)
            self._refuse_tunnel(stream, tunnel, TunnelErrorCode.REFUSED_NOT_ALLOWED, message)
            return
        host, port = target
        try:
            async with asyncio.timeout(policy.connect_timeout_s):
                reader, writer = await asyncio.open_connection(host, port)
        except TimeoutError:
            message = f"{host}:{port} did not accept within {policy.connect_timeout_s:g} s"
            _log.warning("tunnel {}: {}", tid, message)
            self._refuse_tunnel(stream, tunnel, TunnelErrorCode.TIMEOUT, message)
            return
        except OSError as exc:
            message = f"cannot connect to {host}:{port}: {exc.strerror or exc}"
            _log.warning("tunnel {}: {}", tid, message)
            self._refuse_tunnel(stream, tunnel, TunnelErrorCode.UNREACHABLE, message)
            return
        if tunnel.broken or self.is_terminated:
            _reset_socket_writer(writer)
            return
        sock = writer.get_extra_info("socket")
        if sock is not None:
            tune_tcp(sock)
        self._write(stream.sid, encode_frame(OpenTcpOk(tunnel_id=tid)), False)
        _log.info("tunnel {} opened to {}:{} over QUIC stream {}", tid, host, port, stream.sid)
        loop = self._loop
        started = loop.time()
        try:
            down, up = await bridge_tunnel(tunnel, reader, writer)
        except asyncio.CancelledError:
            _log.info("tunnel {} to {}:{} reset", tid, host, port)
            raise
        _log.info(
            "tunnel {} to {}:{} closed: {} bytes in, {} bytes out, {:.3f} s",
            tid,
            host,
            port,
            down,
            up,
            loop.time() - started,
        )

    async def _serve_dial_data(
        self, stream: _Stream, request: DialData, policy: TunnelPolicy
    ) -> None:
        client = self.client
        try:
            context = client.data_channel_context()
            reply: ControlMessage = await _in_thread(
                lambda: serve_dial_data(
                    request,
                    policy,
                    default_host=client.host,
                    context=context,
                    ca=client.ca_cert,
                    trust_domain=client.trust_domain,
                    dial_timeout_s=client.data_dial_timeout_s,
                    on_splice=client._track_splice,
                ),
                f"dial-data {request.tunnel_id}",
            )
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            _log.exception("DialData {} failed", request.tunnel_id)
            reply = OpenTcpErr(
                tunnel_id=request.tunnel_id,
                code=TunnelErrorCode.DATA_CHANNEL_FAILED,
                message=f"{type(exc).__name__}: {exc}",
            )
        if stream.failed or self.is_terminated:
            return
        self.send_message(stream, reply, end=True)

    async def _serve_rpc(self, stream: _Stream, request: ControlMessage) -> None:
        try:
            reply = await self.client.on_rpc(request)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            _log.exception(
                "RPC handler failed for {} on stream {}", type(request).__name__, stream.sid
            )
            reply = StreamError(
                code=StreamErrorCode.INTERNAL, message=f"{type(exc).__name__}: {exc}"
            )
        if stream.failed or self.is_terminated:
            return
        self.send_message(stream, reply, end=True)

    def on_stream_error(self, stream: _Stream, code: int, message: str) -> None:
        if stream.kind == "control":
            _log.warning("{}: bad frame on the control stream: {}", self.label, message)
            self.apply(self.control.protocol_error(code, message))
            return
        self.fail_stream(stream, code, message)

    def on_peer_finished(self, stream: _Stream) -> None:
        if stream.kind == "control":
            self.apply(self.control.connection_lost("access point closed the control stream"))
        elif stream.kind == "rpc-in" and not stream.request_seen:
            self.fail_stream(
                stream, StreamErrorCode.MALFORMED_FRAME, "RPC stream ended without a request"
            )

    def on_peer_reset(self, stream: _Stream, code: int) -> None:
        if stream.kind == "control":
            self.apply(
                self.control.connection_lost(f"access point reset the control stream (code {code})")
            )
        elif stream.task is not None:
            stream.task.cancel()
            self._forget(stream)

    def on_stop_sending(self, stream: _Stream, code: int) -> None:
        if stream.kind == "control":
            # A StreamError frame explaining the stop usually rides in the same datagram
            # after the STOP_SENDING frame: let it be processed first.
            self._loop.call_soon(self._control_stopped, code)
        elif stream.task is not None:
            stream.task.cancel()
            self._forget(stream)

    def _control_stopped(self, code: int) -> None:
        if not self._disposed:
            self.apply(
                self.control.connection_lost(
                    f"access point stopped the control stream (code {code})"
                )
            )

    def on_terminated(self, event: events.ConnectionTerminated) -> None:
        reason = f"access point closed the connection: {event.reason_phrase or 'no reason given'} (code {event.error_code:#x})"
        self.apply(self.control.connection_lost(reason))
        self._end_session(reason)

    def next_timer_ms(self) -> int | None:
        return self.control.next_timer_ms()

    def on_timer(self, now_ms: int) -> None:
        self.apply(self.control.tick(now_ms), rearm=False)

    def apply(self, actions: list[FollowerAction], *, rearm: bool = True) -> None:
        for action in actions:
            if isinstance(action, SendMessage):
                if self.control_stream is not None:
                    self.send_message(self.control_stream, action.message)
            elif isinstance(action, CloseStream):
                if self.control_stream is not None:
                    self.finish(self.control_stream, action.code)
            elif isinstance(action, Reconnect):
                self._end_session(action.reason)
            elif isinstance(action, SessionEstablished):
                self.client._established(action.welcome)
            elif isinstance(action, RttSample):
                self.client._rtt(action.rtt_ms)
        if rearm:
            self.rearm_timer()


class ControlClient:
    """The follower's control connection: dial, authenticate, heartbeat, serve RPCs, redial.

    `run()` keeps a connection up until `stop()`; failures and closes are retried forever with
    `Backoff` (reset after every connection that got a Welcome).
    """

    def __init__(
        self,
        *,
        host: str,
        port: int,
        identity: Identity,
        ca: FleetCA | x509.Certificate,
        trust_domain: str,
        info: FollowerInfo | Callable[[], FollowerInfo],
        on_rpc: RpcHandler,
        backoff: Backoff | None = None,
        missed_ack_intervals: int = 3,
        welcome_timeout_ms: int = 10_000,
        connect_timeout_s: float = 10.0,
        idle_timeout_s: float = 60.0,
        goodbye_timeout_s: float = 1.0,
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
        server_name: str | None = None,
        on_connected: Callable[[Welcome], None] | None = None,
        on_disconnected: Callable[[str], None] | None = None,
        tunnel_policy: TunnelPolicy | None = DEFAULT_TUNNEL_POLICY,
        data_dial_timeout_s: float = 10.0,
        max_datagram_size: int = SMALLEST_MAX_DATAGRAM_SIZE,
    ) -> None:
        """`tunnel_policy` says which destinations the access point may open tunnels to
        (default: 127.0.0.1:22 only); None turns tunnel handling off, and ``OpenTcp`` /
        ``DialData`` then reach `on_rpc` like any other request."""
        self.host = host
        self.port = port
        self.identity = identity
        self.ca_cert = _ca_cert(ca)
        self.trust_domain = trust_domain
        self._info = info
        self.on_rpc = on_rpc
        self.backoff = backoff or Backoff()
        self.missed_ack_intervals = missed_ack_intervals
        self.welcome_timeout_ms = welcome_timeout_ms
        self.connect_timeout_s = connect_timeout_s
        self.idle_timeout_s = idle_timeout_s
        self.goodbye_timeout_s = goodbye_timeout_s
        self.max_frame_size = max_frame_size
        self.server_name = server_name
        self.on_connected = on_connected
        self.on_disconnected = on_disconnected
        self.tunnel_policy = tunnel_policy
        self.data_dial_timeout_s = data_dial_timeout_s
        self.max_datagram_size = max_datagram_size
        self._data_context: ssl.SSLContext | None = None
        self._splices: set[Splice] = set()
        self._splices_lock = threading.Lock()

        self.attempts = 0
        """Connection attempts so far."""
        self.sessions = 0
        """Connections that reached Welcome."""
        self.welcome: Welcome | None = None
        self.rtt_ms: int | None = None
        self.last_error: str | None = None
        """Why the last connection attempt or session ended."""
        self._proto: _FollowerConnectionProtocol | None = None
        self._stopping = asyncio.Event()
        self._changed = asyncio.Event()
        self._running = False
        self._stop_reason = "follower shutting down"

    @property
    def connected(self) -> bool:
        proto = self._proto
        return proto is not None and self.welcome is not None and not proto.session_done.done()

    def data_channel_context(self) -> ssl.SSLContext:
        """The TLS client context for data connections (follower certificate, fleet CA)."""
        if self._data_context is None:
            self._data_context = client_context(self.ca_cert, self.identity)
        return self._data_context

    def _track_splice(self, splice: Splice) -> None:
        with self._splices_lock:
            self._splices = {s for s in self._splices if not s.done}
            self._splices.add(splice)

    @property
    def active_data_tunnels(self) -> int:
        """Data-channel tunnels still splicing (they outlive a QUIC reconnect)."""
        with self._splices_lock:
            return sum(1 for s in self._splices if not s.done)

    def abort_data_tunnels(self, reason: str = "follower shutting down") -> None:
        with self._splices_lock:
            splices, self._splices = self._splices, set()
        for splice in splices:
            splice.abort(reason)

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def _established(self, welcome: Welcome) -> None:
        self.welcome = welcome
        self.sessions += 1
        self.backoff.reset()
        _log.info(
            "connected to access point {}:{} as {!r} (heartbeat every {} ms)",
            self.host,
            self.port,
            welcome.follower,
            welcome.heartbeat_interval_ms,
        )
        self._notify()
        if self.on_connected is not None:
            try:
                self.on_connected(welcome)
            except Exception:
                _log.exception("on_connected callback failed")

    def _rtt(self, rtt_ms: int) -> None:
        self.rtt_ms = rtt_ms
        self._notify()

    async def wait_for(self, predicate: Callable[[ControlClient], bool], timeout: float) -> None:
        """Wait until `predicate(self)` holds (checked on every state change); TimeoutError after `timeout`."""
        async with asyncio.timeout(timeout):
            while not predicate(self):
                await self._changed.wait()

    async def wait_connected(self, timeout: float) -> Welcome:
        await self.wait_for(lambda c: c.connected, timeout)
        assert self.welcome is not None
        return self.welcome

    def _configuration(self) -> QuicConfiguration:
        config = QuicConfiguration(
            is_client=True,
            alpn_protocols=[ALPN],
            idle_timeout=self.idle_timeout_s,
            max_datagram_size=self.max_datagram_size,
        )
        config.certificate = self.identity.cert
        config.private_key = self.identity.key
        config.verify_mode = ssl.CERT_REQUIRED
        config.load_verify_locations(cadata=_pem(self.ca_cert))
        # No host-name check by default: the access point is identified by its SPIFFE ID,
        # checked right after the handshake, whatever address it was dialled at.
        config.server_name = self.server_name
        return config

    async def run(self) -> None:
        """Stay connected until `stop()`."""
        if self._running:
            raise RuntimeError("ControlClient.run is already running")
        self._running = True
        try:
            while not self._stopping.is_set():
                self.attempts += 1
                try:
                    reason = await self._run_once()
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                if self._stopping.is_set():
                    break
                self.last_error = reason
                delay = self.backoff.next_delay()
                _log.warning(
                    "control connection to {}:{} ended: {}; retrying in {:.2f} s",
                    self.host,
                    self.port,
                    reason,
                    delay,
                )
                self._notify()
                if self.on_disconnected is not None:
                    try:
                        self.on_disconnected(reason)
                    except Exception:
                        _log.exception("on_disconnected callback failed")
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await self._stopping.wait()
        finally:
            self._running = False
            self._notify()

    async def _run_once(self) -> str:
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(self.host, self.port, type=socket.SOCK_DGRAM)
        if not infos:
            raise OSError(f"cannot resolve access point address {self.host}:{self.port}")
        family, _, _, _, addr = infos[0]
        local: tuple[str, int] = ("::", 0) if family == socket.AF_INET6 else ("0.0.0.0", 0)
        info = self._info() if callable(self._info) else self._info
        control = FollowerControl(
            info,
            missed_ack_intervals=self.missed_ack_intervals,
            welcome_timeout_ms=self.welcome_timeout_ms,
        )
        quic = _TunnelFlowConnection(configuration=self._configuration())
        transport, protocol = await loop.create_datagram_endpoint(
            lambda: _FollowerConnectionProtocol(quic, client=self, control=control),
            local_addr=local,
            family=family,
        )
        proto = protocol
        _enlarge_udp_buffers(transport.get_extra_info("socket"))
        self.welcome = None
        try:
            proto.connect(addr)
            try:
                async with asyncio.timeout(self.connect_timeout_s):
                    await proto.wait_connected()
            except TimeoutError:
                raise TimeoutError(
                    f"QUIC handshake with {self.host}:{self.port} did not complete within {self.connect_timeout_s:g} s"
                ) from None
            except ConnectionError:
                term = proto.termination
                raise ConnectionError(
                    f"QUIC handshake with {self.host}:{self.port} failed: "
                    f"{term.reason_phrase if term else 'connection closed'}"
                    + (f" (code {term.error_code:#x})" if term else "")
                ) from None
            leaf = quic.tls._peer_certificate
            try:
                if leaf is None:
                    raise PeerVerificationError("access point presented no certificate")
                verify_peer(
                    [leaf, *quic.tls._peer_certificate_chain],
                    self.ca_cert,
                    SERVE_SPIFFE(self.trust_domain),
                )
            except PeerVerificationError as exc:
                message = f"access point {self.host}:{self.port} refused: {exc}"
                _log.error("{}", message)
                proto.close(error_code=ConnectionCloseCode.PEER_REFUSED, reason_phrase=str(exc))
                raise PeerVerificationError(message) from None
            self._proto = proto
            proto.start_session()
            stop_wait = asyncio.ensure_future(self._stopping.wait())
            try:
                waiters: set[asyncio.Future[Any]] = {proto.session_done, stop_wait}
                await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            finally:
                stop_wait.cancel()
            if proto.session_done.done():
                return proto.session_done.result()
            # stop(): Goodbye, then wait for the access point to finish its side.
            proto.apply(control.shutdown(self._stop_reason))
            stream = proto.control_stream
            if stream is not None and not proto.is_terminated:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.goodbye_timeout_s):
                        await stream.peer_done.wait()
            return "stopped"
        finally:
            self._proto = None
            self.welcome = None
            if not proto.is_terminated:
                proto.close(
                    error_code=ConnectionCloseCode.NO_ERROR,
                    reason_phrase="follower closing connection",
                )
            proto.dispose()
            transport.close()
            self._notify()

    async def stop(self, reason: str = "follower shutting down") -> None:
        """Send Goodbye (when connected), close, abort data tunnels, make `run()` return."""
        _log.info("stopping control client: {}", reason)
        self._stop_reason = reason
        self._stopping.set()
        try:
            if self._running:
                await self.wait_for(lambda c: not c._running, self.goodbye_timeout_s + 5.0)
        finally:
            self.abort_data_tunnels(reason)
