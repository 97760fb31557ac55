"""The leader's event push over QUIC (ALPN ``ah-leader/1``): the access point side and the
leader's client.

Transport decision: leaders push on the access point's existing QUIC port, selected by ALPN.
`ControlAndPushServer` is a `ControlServer` that also offers ``ah-leader/1``: a connection
that negotiates it never reaches the follower code (no client certificate is needed or
checked; the TLS handshake still asks for one, and an aioquic client without a certificate
answers with an empty one); a connection that negotiates ``ah-control/1`` is a follower
connection exactly as before, certificate and SPIFFE checks included. So an operator opens
one UDP port, and the follower path is unchanged.

On an ``ah-leader/1`` connection each client-initiated bidirectional stream is one push
session: ``PushHello`` (bearer token with scope ``exec``, session id, producer id) →
``PushWelcome`` / ``PushRefused``; then ``PushBatch`` → ``PushAck`` (see
`ah_domain_types.push` and the pure cores in `ah_connectivity.push_core`). Frames are the
control plane's: 4-byte length + msgpack. ``ah-leader/2`` is the same protocol where a
leader may send a batch compressed (``PushBatchZ``, see `push_core.compress_batch`): both
sides offer both versions, the access point picks v2 when the leader offers it, so a leader
and an access point of different releases still meet on v1. The access point keeps the
stream open until the leader finishes it; a stream that fails (bad frame, refused token,
storage error) gets a ``PushRefused`` and FIN, and the connection stays up. A connection
that has not sent a ``PushHello`` within ``push_hello_timeout_s`` is closed.

The leader verifies the access point like a follower does: chain against the fleet CA during
the handshake, then the SPIFFE ID ``spiffe://<td>/ah/serve``.

On the leader, `LeaderPushConnection` is one such connection carrying any number of sessions
(`LeaderPushSession`, one stream at a time each; the protocol of a session is the pure
`push_core.PushSession`), kept up between sessions and made again when lost;
`LeaderPushClient` is the one-session form of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import secrets
import socket
import ssl
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

import msgspec
from aioquic.asyncio.protocol import QuicConnectionProtocol, QuicStreamHandler
from aioquic.quic import events
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from loguru import logger

from ah_connectivity.backoff import Backoff
from ah_connectivity.framing import DEFAULT_MAX_FRAME_SIZE, FrameDecoder, FrameError, encode_frame
from ah_connectivity.pki import SERVE_SPIFFE, FleetCA, PeerVerificationError, verify_peer
from ah_connectivity.push_core import (
    COMPRESS_BATCHES_FROM,
    AckedRange,
    Authenticate,
    ClosePush,
    PushAction,
    PushProtocolError,
    PushReceiver,
    PushSender,
    PushSession,
    SendPush,
    StoreEvents,
    compress_batch,
    expand_batch,
)
from ah_connectivity.quic import (
    ConnectionCloseCode,
    ControlServer,
    _AccessPointConnection,
    _ack_with_next_packet,
    serve_quic,
)
from ah_domain_types import (
    PUSH_PROTOCOL_VERSION,
    Event,
    PushBatch,
    PushBatchZ,
    PushHello,
    PushMessage,
    PushRefusal,
    PushRefused,
    validate_session_id,
)

__all__ = [
    "LEADER_ALPN",
    "LEADER_ALPNS",
    "LEADER_ALPN_V2",
    "LEADER_MAX_BATCHES_IN_FLIGHT",
    "LEADER_MAX_BATCH_EVENTS",
    "ControlAndPushServer",
    "LeaderPushClient",
    "LeaderPushConnection",
    "LeaderPushSession",
    "PushConnectionStatus",
    "PushGrant",
    "PushIngest",
    "PushRefusedError",
    "PushStatus",
    "new_producer_id",
    "new_session_id",
]

LEADER_ALPN = "ah-leader/1"
LEADER_ALPN_V2 = "ah-leader/2"
"""``ah-leader/1`` plus `PushBatchZ` (compressed batches) from the leader. Both sides offer
both; the access point prefers v2, so old leaders and old access points still meet on v1."""
LEADER_ALPNS = (LEADER_ALPN_V2, LEADER_ALPN)

LEADER_MAX_BATCH_EVENTS = 1024
"""Events per batch the leader sends at most (the access point's default limit)."""
LEADER_MAX_BATCHES_IN_FLIGHT = 2
"""Batches the leader has unacknowledged at most: one being stored while the next one waits
at the access point, and whatever is emitted meanwhile gathers into the batch after (see
`PushSender`). An access point that falls behind thus gets fewer, larger batches instead of
a backlog of small ones, each costing a transaction and a write per SSE client."""
LEADER_LINGER_S = 0.002
"""How long an emitted event may wait for others to join its batch (unless a full batch is
ready sooner): a burst of events emitted within this time (a tick of output from many
hosts) becomes one batch, not one per event-loop turn of the leader."""

_log = logger.bind(component="ah-connectivity.leader_push")


def new_session_id(now: dt.datetime | None = None) -> str:
    """A fresh session id: ``s-<UTC time>-<6 hex>``, e.g. ``s-20260101T120000Z-3f9a1c``."""
    stamp = (now or dt.datetime.now(dt.UTC)).strftime("%Y%m%dT%H%M%SZ")
    return f"s-{stamp}-{secrets.token_hex(3)}"


def new_producer_id() -> str:
    """A random id naming one leader process's stream of events within a session."""
    return secrets.token_urlsafe(12)


def _ca_cert(ca: FleetCA | x509.Certificate | str | bytes) -> x509.Certificate:
    if isinstance(ca, FleetCA):
        return ca.cert
    if isinstance(ca, x509.Certificate):
        return ca
    data = ca.encode() if isinstance(ca, str) else ca
    return x509.load_pem_x509_certificate(data)


# ==========================================================================================
# Access point side
# ==========================================================================================


class PushRefusedError(Exception):
    """Raised by a `PushIngest` to refuse a push (the code goes into ``PushRefused``)."""

    def __init__(self, code: PushRefusal, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class PushGrant:
    """An authenticated push stream: who pushes what, and where the producer stands."""

    subject: str
    session_id: str
    producer: str
    acked_lseq: int
    """Highest lseq of this producer already stored in this session."""
    last_seq: int
    """The session's highest seq."""


class PushIngest(Protocol):
    """What the access point plugs into `ControlAndPushServer`. Both methods run on the event
    loop and must be quick (they are the push path's only work)."""

    def open_push(self, token: str, session_id: str, producer: str) -> PushGrant:
        """Check the token (scope ``exec``) and open (or create) the session; raise
        `PushRefusedError` to refuse."""
        ...

    def append_events(
        self, grant: PushGrant, first_lseq: int, events: Sequence[Event]
    ) -> tuple[int, int]:
        """Store ``events`` (lseqs ``first_lseq``.., never an lseq stored before) and return
        the (first, last) seq they got. Must persist the producer's last lseq with them."""
        ...


@dataclass(eq=False)
class _ServerPushStream:
    sid: int
    decoder: FrameDecoder[PushMessage]
    receiver: PushReceiver
    grant: PushGrant | None = None
    finished: bool = False


class _PushConnection:
    """The ``ah-leader/1`` side of one access-point QUIC connection."""

    def __init__(
        self,
        proto: _ControlOrPushConnection,
        server: ControlAndPushServer,
        *,
        compressed_batches: bool,
    ) -> None:
        self.proto = proto
        self.server = server
        self.compressed_batches = compressed_batches
        """``ah-leader/2`` was negotiated: `PushBatchZ` is allowed."""
        self.streams: dict[int, _ServerPushStream] = {}
        self.authenticated = False
        self._hello_timer: asyncio.TimerHandle | None = None
        self._refused_ids: set[int] = set()
        self._finished_ids: set[int] = set()
        """Streams we finished while the leader's side is still open."""
        # A leader streams batches of many packets: ACK them once per read burst.
        proto.coalesce_transmit = True

    @property
    def label(self) -> str:
        where = self.proto.peer_address
        return f"leader {where[0]}:{where[1]}" if where else "leader ?"

    def handle(self, event: events.QuicEvent) -> None:
        if isinstance(event, events.HandshakeCompleted):
            if self.server._closing:
                self.proto.close(
                    error_code=ConnectionCloseCode.SHUTDOWN,
                    reason_phrase="access point shutting down",
                )
                return
            self._hello_timer = self.proto._loop.call_later(
                self.server.push_hello_timeout_s, self._hello_timeout
            )
        elif isinstance(event, events.StreamDataReceived):
            self._on_data(event.stream_id, event.data, event.end_stream)
        elif isinstance(event, events.StreamReset):
            self._finished_ids.discard(event.stream_id)
            stream = self.streams.pop(event.stream_id, None)
            if stream is not None:
                _log.info(
                    "{}: push stream {} reset (code {})",
                    self.label,
                    event.stream_id,
                    event.error_code,
                )
        elif isinstance(event, events.ConnectionTerminated):
            if self._hello_timer is not None:
                self._hello_timer.cancel()
                self._hello_timer = None
            self.streams.clear()
            self._finished_ids.clear()

    def _hello_timeout(self) -> None:
        self._hello_timer = None
        if not self.authenticated and not self.proto.is_terminated:
            _log.warning(
                "{}: no pushHello within {:g} s; closing",
                self.label,
                self.server.push_hello_timeout_s,
            )
            self.proto.close(
                error_code=ConnectionCloseCode.PEER_REFUSED,
                reason_phrase="no pushHello in time",
            )

    def _on_data(self, sid: int, data: bytes, end: bool) -> None:
        stream = self.streams.get(sid)
        if stream is None:
            if sid in self._refused_ids:
                return
            if sid in self._finished_ids:
                # We finished (or refused) it; what the leader sent meanwhile is moot.
                if end:
                    self._finished_ids.discard(sid)
                return
            client_bidi = sid & 1 == 0 and sid & 2 == 0
            if not client_bidi:
                self._refused_ids.add(sid)
                with contextlib.suppress(ValueError):
                    self.proto._quic.stop_stream(sid, PUSH_STREAM_ERROR)
                return
            stream = _ServerPushStream(
                sid,
                FrameDecoder[PushMessage](PushMessage, self.server.max_frame_size),
                PushReceiver(max_batch_events=self.server.max_push_batch_events),
            )
            self.streams[sid] = stream
        if stream.finished:
            return
        if data:
            try:
                messages = stream.decoder.feed(data)
                error: FrameError | None = None
            except FrameError as exc:
                messages, error = exc.messages, exc
            for message in messages:
                if isinstance(message, PushBatchZ):
                    try:
                        message = self._expand(message)
                    except PushProtocolError as exc:
                        self._apply(stream, stream.receiver.refuse(PushRefusal.INVALID, str(exc)))
                        return
                self._apply(stream, stream.receiver.receive(message))
                if stream.finished:
                    return
            if error is not None:
                self._apply(
                    stream,
                    stream.receiver.refuse(PushRefusal.INVALID, f"bad frame: {error.message}"),
                )
                return
        if end:
            if stream.decoder.buffered:
                self._apply(
                    stream,
                    stream.receiver.refuse(PushRefusal.INVALID, "push stream ended inside a frame"),
                )
                return
            self._apply(stream, stream.receiver.peer_finished())

    def _expand(self, batch: PushBatchZ) -> PushBatch:
        if not self.compressed_batches:
            raise PushProtocolError(f"pushBatchZ needs {LEADER_ALPN_V2}; this is {LEADER_ALPN}")
        expanded = expand_batch(batch, max_size=self.server.max_frame_size)
        self.server.compressed_batches_received += 1
        return expanded

    def _apply(self, stream: _ServerPushStream, actions: list[PushAction]) -> None:
        queue = list(actions)
        while queue:
            action = queue.pop(0)
            if isinstance(action, SendPush):
                self._send(stream, action.message)
            elif isinstance(action, ClosePush):
                if action.error:
                    _log.warning(
                        "{}: push stream {} refused: {}", self.label, stream.sid, action.reason
                    )
                self._finish(stream)
            elif isinstance(action, Authenticate):
                queue[:0] = self._authenticate(stream, action)
            elif isinstance(action, StoreEvents):
                queue[:0] = self._store(stream, action)

    def _authenticate(self, stream: _ServerPushStream, action: Authenticate) -> list[PushAction]:
        hello = action.hello
        if self.server._closing:
            return stream.receiver.refuse(PushRefusal.SHUTTING_DOWN, "access point shutting down")
        try:
            grant = self.server.push_ingest.open_push(hello.token, hello.session_id, hello.producer)
        except PushRefusedError as exc:
            return stream.receiver.refuse(exc.code, exc.message)
        except Exception as exc:
            _log.exception("{}: opening push session {!r} failed", self.label, hello.session_id)
            return stream.receiver.refuse(
                PushRefusal.INTERNAL,
                f"cannot open session {hello.session_id!r}: {type(exc).__name__}",
            )
        stream.grant = grant
        # Said once per connection; a leader agent opens a stream per run on it.
        log = _log.debug if self.authenticated else _log.info
        self.authenticated = True
        if self._hello_timer is not None:
            self._hello_timer.cancel()
            self._hello_timer = None
        log(
            "{}: {!r} pushes session {!r} as producer {} (stored up to lseq {})",
            self.label,
            grant.subject,
            grant.session_id,
            grant.producer,
            grant.acked_lseq,
        )
        return stream.receiver.opened(grant.acked_lseq, grant.last_seq)

    def _store(self, stream: _ServerPushStream, action: StoreEvents) -> list[PushAction]:
        if not action.events:
            return stream.receiver.stored(0, 0)
        grant = stream.grant
        assert grant is not None
        try:
            first, last = self.server.push_ingest.append_events(
                grant, action.first_lseq, action.events
            )
        except PushRefusedError as exc:
            return stream.receiver.refuse(exc.code, exc.message)
        except Exception as exc:
            _log.exception(
                "{}: storing events of session {!r} failed", self.label, grant.session_id
            )
            return stream.receiver.refuse(
                PushRefusal.INTERNAL, f"cannot store events: {type(exc).__name__}: {exc}"
            )
        return stream.receiver.stored(first, last)

    def _send(self, stream: _ServerPushStream, message: PushMessage) -> None:
        if stream.finished or self.proto.is_terminated:
            return
        try:
            self.proto._quic.send_stream_data(stream.sid, encode_frame(message))
        except (RuntimeError, ValueError) as exc:
            _log.debug("{}: cannot write to push stream {}: {}", self.label, stream.sid, exc)
            return
        # The batch's packets are acknowledged in the packet that carries its PushAck.
        _ack_with_next_packet(self.proto._quic, self.proto._loop.time())
        self.proto._transmit_soon()

    def _finish(self, stream: _ServerPushStream) -> None:
        if stream.finished:
            return
        stream.finished = True
        self.streams.pop(stream.sid, None)
        if not stream.receiver.leader_finished:
            self._finished_ids.add(stream.sid)
        if not self.proto.is_terminated:
            with contextlib.suppress(RuntimeError, ValueError):
                self.proto._quic.send_stream_data(stream.sid, b"", end_stream=True)
            self.proto._transmit_soon()


PUSH_STREAM_ERROR = 0x1
"""STOP_SENDING code for streams a push connection does not accept."""


class _ControlOrPushConnection(_AccessPointConnection):
    """A follower connection, unless the client negotiated ``ah-leader/1``: then every event
    goes to a `_PushConnection` and none of the follower machinery runs."""

    def __init__(
        self,
        quic: QuicConnection,
        stream_handler: QuicStreamHandler | None = None,
        *,
        server: ControlAndPushServer,
    ) -> None:
        super().__init__(quic, stream_handler, server=server)
        self.push_server = server
        self.push: _PushConnection | None = None

    @property
    def label(self) -> str:
        if self.push is not None:
            return self.push.label
        return super().label

    def quic_event_received(self, event: events.QuicEvent) -> None:
        if (
            self.push is None
            and isinstance(event, events.ProtocolNegotiated)
            and event.alpn_protocol in LEADER_ALPNS
        ):
            self.push = _PushConnection(
                self, self.push_server, compressed_batches=event.alpn_protocol == LEADER_ALPN_V2
            )
        if self.push is None:
            super().quic_event_received(event)
            return
        try:
            self.push.handle(event)
        except Exception:
            _log.exception("{}: error handling {}", self.push.label, type(event).__name__)
        if isinstance(event, events.ConnectionTerminated):
            self.termination = event
            self.push_server._protocols.discard(self)
            self.dispose()


class ControlAndPushServer(ControlServer):
    """`ControlServer` that also accepts leaders pushing session events (``ah-leader/1``) on
    the same UDP port; every ControlServer argument is accepted as is."""

    def __init__(
        self,
        *,
        push_ingest: PushIngest,
        push_hello_timeout_s: float = 10.0,
        max_push_batch_events: int = 1024,
        **control_server_args: Any,
    ) -> None:
        super().__init__(**control_server_args)
        self.push_ingest = push_ingest
        self.push_hello_timeout_s = push_hello_timeout_s
        self.max_push_batch_events = max_push_batch_events
        self.compressed_batches_received = 0
        """`PushBatchZ` frames expanded so far (all connections)."""

    def _configuration(self) -> QuicConfiguration:
        config = super()._configuration()
        config.alpn_protocols = [*(config.alpn_protocols or []), *LEADER_ALPNS]
        return config

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Listen on UDP `host`:`port` (0: any free port); return the bound port."""
        if self._quic_server is not None:
            raise RuntimeError("ControlAndPushServer already started")

        def create_protocol(
            quic: QuicConnection, stream_handler: QuicStreamHandler | None = None
        ) -> _ControlOrPushConnection:
            return _ControlOrPushConnection(quic, stream_handler, server=self)

        try:
            self._quic_server = await serve_quic(
                host, port, configuration=self._configuration(), create_protocol=create_protocol
            )
        except OSError as exc:
            raise OSError(
                exc.errno, f"cannot listen for QUIC on {host}:{port}/udp: {exc.strerror}"
            ) from exc
        transport = cast(asyncio.DatagramTransport, self._quic_server._transport)
        _enlarge_receive_buffer(transport)
        _read_datagrams_in_batches(transport)
        self.host = host
        self.port = int(transport.get_extra_info("sockname")[1])
        _log.info(
            "QUIC server listening on {}:{}/udp (followers: {}, leaders: {})",
            host,
            self.port,
            "ah-control/1",
            LEADER_ALPN,
        )
        return self.port


UDP_RECEIVE_BUFFER = 4 * 1024 * 1024
"""Receive buffer asked for on QUIC sockets. The kernel default (~200 KiB, a few hundred
datagrams) overflows when the event loop is busy for a few tens of milliseconds at a few
thousand datagrams a second; every drop then halves QUIC's congestion window. Linux caps the
request at ``net.core.rmem_max``."""


def _enlarge_receive_buffer(transport: asyncio.BaseTransport) -> None:
    sock = transport.get_extra_info("socket")
    if sock is None:
        return
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, UDP_RECEIVE_BUFFER)
    except OSError as exc:
        _log.debug("cannot enlarge the UDP receive buffer: {}", exc)


DATAGRAM_READ_BATCH = 32


def _read_datagrams_in_batches(transport: asyncio.DatagramTransport) -> None:
    """Read up to `DATAGRAM_READ_BATCH` waiting datagrams per event-loop turn instead of one.

    asyncio's datagram transport reads a single datagram each time the socket is readable, so
    the rate at which QUIC packets are taken in is the rate of loop turns; when many SSE
    streams keep every turn busy, pushed events queue up in the socket buffer for hundreds of
    milliseconds while the process is mostly idle. This re-registers the socket's reader with
    one that drains the socket (bounded, so one busy peer cannot starve the rest of the loop).
    It relies on the selector transport's internals; with any other transport it does nothing.
    """
    sock = getattr(transport, "_sock", None)
    read_ready = getattr(transport, "_read_ready", None)
    fd = getattr(transport, "_sock_fd", None)
    loop = getattr(transport, "_loop", None)
    if (
        sock is None
        or read_ready is None
        or fd is None
        or not isinstance(loop, asyncio.AbstractEventLoop)
    ):
        return
    protocol = transport.get_protocol()
    max_size = int(getattr(transport, "max_size", 256 * 1024))

    def drain() -> None:
        read_ready()
        for _ in range(DATAGRAM_READ_BATCH - 1):
            if transport.is_closing():
                return
            try:
                data, addr = sock.recvfrom(max_size)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                protocol.error_received(exc)  # type: ignore[attr-defined]
                return
            protocol.datagram_received(data, addr)  # type: ignore[attr-defined]

    # The transport owns the fd, so the public add_reader refuses it: use the selector loop's
    # own (unchecked) registration, as the transport itself does.
    remove_reader = getattr(loop, "_remove_reader", None)
    add_reader = getattr(loop, "_add_reader", None)
    if remove_reader is None or add_reader is None:
        return
    remove_reader(fd)
    add_reader(fd, drain)


# ==========================================================================================
# Leader side
# ==========================================================================================


@dataclass
class PushStatus:
    """What the leader knows about one session's push, for callers that report it."""

    connected: bool = False
    """A stream carries the session and the access point welcomed it."""
    attempts: int = 0
    """Streams opened for this session (each starts with its PushHello)."""
    sessions: int = 0
    """Streams that got a PushWelcome."""
    last_error: str | None = None
    refused: PushRefused | None = None
    """Set when the access point refused the push for good (token, scope, protocol)."""
    acked_lseq: int = 0
    last_seq: int = 0
    history: list[str] = field(default_factory=list)
    """One line per change, oldest first (bounded)."""

    def note(self, line: str) -> None:
        self.history.append(line)
        del self.history[:-50]


@dataclass
class PushConnectionStatus:
    """What the leader knows about its QUIC connection to the access point."""

    connected: bool = False
    attempts: int = 0
    """Connection attempts so far."""
    connections: int = 0
    """Connections established (handshake done, access point verified)."""
    streams: int = 0
    """Push streams opened over all connections (one per session and connection)."""
    alpn: str | None = None
    """The protocol the last connection negotiated (``ah-leader/2`` or ``ah-leader/1``)."""
    compressed_batches: int = 0
    """Batches sent as `PushBatchZ` (``ah-leader/2`` only)."""
    last_error: str | None = None
    history: list[str] = field(default_factory=list)

    def note(self, line: str) -> None:
        self.history.append(line)
        del self.history[:-50]


class _PushClientProtocol(QuicConnectionProtocol):
    """The leader's QUIC connection: hands each stream's data to `LeaderPushConnection`."""

    def __init__(
        self,
        quic: QuicConnection,
        stream_handler: QuicStreamHandler | None = None,
        *,
        owner: LeaderPushConnection,
    ) -> None:
        super().__init__(quic, stream_handler)
        self.owner = owner
        self.compress_batches = False
        """The access point speaks ``ah-leader/2``: big batches go as `PushBatchZ`."""
        self.termination: events.ConnectionTerminated | None = None
        self.done: asyncio.Future[str] = self._loop.create_future()

    def end(self, reason: str) -> None:
        if not self.done.done():
            self.done.set_result(reason)

    def send(self, sid: int, message: PushMessage) -> bool:
        if self.termination is not None:
            return False
        frame = encode_frame(message)
        if (
            self.compress_batches
            and isinstance(message, PushBatch)
            and len(frame) >= COMPRESS_BATCHES_FROM
        ):
            # Gated on the frame already made, so the many small batches of a streamed log
            # are encoded once, as before compression existed.
            compressed = compress_batch(message, min_size=0)
            if isinstance(compressed, PushBatchZ):
                frame = encode_frame(compressed)
                self.owner.status.compressed_batches += 1
        try:
            self._quic.send_stream_data(sid, frame)
        except (RuntimeError, ValueError) as exc:
            self.end(f"cannot write to push stream {sid}: {exc}")
            return False
        # The access point's PushAcks are acknowledged in the packets of the next batch.
        _ack_with_next_packet(self._quic, self._loop.time())
        self._transmit_soon()
        return True

    def finish(self, sid: int) -> None:
        if self.termination is not None:
            return
        with contextlib.suppress(RuntimeError, ValueError):  # already finished
            self._quic.send_stream_data(sid, b"", end_stream=True)
        self._transmit_soon()

    def quic_event_received(self, event: events.QuicEvent) -> None:
        try:
            if isinstance(event, events.StreamDataReceived):
                self.owner._on_stream_data(event.stream_id, event.data, event.end_stream)
            elif isinstance(event, events.ProtocolNegotiated):
                self.compress_batches = event.alpn_protocol == LEADER_ALPN_V2
                self.owner.status.alpn = event.alpn_protocol
            elif isinstance(event, events.StreamReset):
                self.owner._on_stream_reset(event.stream_id, event.error_code)
            elif isinstance(event, events.ConnectionTerminated):
                self.termination = event
                self.end(
                    f"connection closed: {event.reason_phrase or 'no reason given'} "
                    f"(code {event.error_code:#x})"
                )
        except Exception:
            _log.exception("push client: error handling {}", type(event).__name__)


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


@dataclass(eq=False)
class _LeaderStream:
    sid: int
    session: LeaderPushSession
    decoder: FrameDecoder[PushMessage]
    answer_timer: asyncio.TimerHandle | None = None
    finished: bool = False
    """We finished our side (the session is closing and every event is sent)."""


class LeaderPushSession:
    """One session's events on a `LeaderPushConnection` (see
    `LeaderPushConnection.open_session`): `emit` never blocks (the event is queued), and the
    events reach the access point exactly once and in order while the session is open,
    across lost streams and connections. Use it on the connection's event loop."""

    def __init__(
        self,
        connection: LeaderPushConnection,
        core: PushSession,
        *,
        linger_s: float,
        on_ack: Callable[[AckedRange], None] | None,
        on_status: Callable[[PushStatus], None] | None,
        backoff: Backoff,
    ) -> None:
        self.connection = connection
        self.core = core
        self.session_id = core.hello.session_id
        self.producer = core.hello.producer
        self.linger_s = linger_s
        self.on_ack = on_ack
        self.on_status = on_status
        self.backoff = backoff
        self.status = PushStatus()
        self.closed = False
        """`finish` was called: the session left its connection."""
        self.closing = False
        """`close` was called: no more events; each stream is finished after its last
        batch."""
        self._stream: _LeaderStream | None = None
        self._pump_handle: asyncio.Handle | None = None
        self._retry_handle: asyncio.TimerHandle | None = None
        self._changed = asyncio.Event()

    @property
    def sender(self) -> PushSender:
        return self.core.sender

    @property
    def connected(self) -> bool:
        return self.status.connected

    @property
    def done(self) -> bool:
        """Refused for good, or finished: no stream will carry it again."""
        return self.closed or self.status.refused is not None

    def emit(self, event: Event) -> int:
        """Queue ``event`` (its ``seq``/``tsMs`` are assigned by the access point); returns
        its lseq. Sent ``linger_s`` later when the stream is open (at once when a full batch
        is waiting), together with every other event emitted until then (one batch, one
        ack), or when the batch window has room again (see
        `PushSender.max_in_flight_batches`).

        The event's session id travels as "" (the push stream's session, which the access
        point sets on every stored event): 14% fewer bytes and packets for a log line."""
        if event.session_id == self.session_id:
            event = msgspec.structs.replace(event, session_id="")
        sender = self.core.sender
        lseq = sender.emit(event)
        if not self.core.sending:
            return lseq
        handle = self._pump_handle
        if sender.unacked - sender.in_flight >= sender.max_batch_events:
            if handle is not None:
                handle.cancel()
                self._pump_handle = None
            self._pump()
        elif handle is None:
            loop = asyncio.get_running_loop()
            self._pump_handle = (
                loop.call_later(self.linger_s, self._scheduled_pump)
                if self.linger_s > 0
                else loop.call_soon(self._scheduled_pump)
            )
        return lseq

    async def wait_for(
        self, predicate: Callable[[LeaderPushSession], bool], timeout: float | None
    ) -> None:
        """Until ``predicate(self)`` holds (checked on every change); TimeoutError after
        ``timeout``."""
        async with asyncio.timeout(timeout):
            while not predicate(self):
                await self._changed.wait()

    async def flush(self, timeout: float) -> bool:
        """Wait until every emitted event is acknowledged (True), or the session was refused
        or finished or ``timeout`` passed (False)."""
        try:
            await self.wait_for(lambda s: s.sender.all_acked or s.done, timeout)
        except TimeoutError:
            return False
        return self.sender.all_acked

    async def close(self, timeout: float) -> bool:
        """No more events: the stream is finished right behind the last batch (so the access
        point answers the last ack and its own end together); `flush` (at most
        ``timeout``), then `finish`. True when every event got through."""
        self.closing = True
        if self._pump_handle is not None:
            self._pump_handle.cancel()
            self._pump_handle = None
        self._pump()
        delivered = await self.flush(timeout) if timeout > 0 else self.sender.all_acked
        self.finish()
        return delivered

    def finish(self) -> None:
        """End the session: its stream is finished and it leaves the connection (events not
        acknowledged by now are not sent any more). The connection stays up."""
        if self.closed:
            return
        self.closed = True
        self.connection._session_finished(self)
        self._notify()

    # -- internals -------------------------------------------------------------------------

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def _scheduled_pump(self) -> None:
        self._pump_handle = None
        self._pump()

    def _cancel_timers(self) -> None:
        for handle in (self._pump_handle, self._retry_handle):
            if handle is not None:
                handle.cancel()
        self._pump_handle = self._retry_handle = None

    def _pump(self) -> None:
        stream = self._stream
        if stream is None:
            return
        for batch in self.core.batches():
            if not self.connection._send(stream, batch):
                return
        if self.closing and not stream.finished and self.core.sending and self.sender.all_sent:
            self.connection._finish_sending(stream)

    def _set_connected(self, connected: bool, note: str) -> None:
        status = self.status
        if not connected:
            status.last_error = note
        if status.connected != connected:
            status.connected = connected
            status.note(("connected: " if connected else "disconnected: ") + note)
            if self.on_status is not None:
                try:
                    self.on_status(status)
                except Exception:
                    _log.exception("push on_status callback failed")
        self._notify()


class LeaderPushConnection:
    """The leader's one QUIC connection (``ah-leader/1``) to the access point, carrying any
    number of push sessions, one stream each (`open_session`).

    Await `run` on one event loop (it returns after `stop`): it connects when a session
    needs it, verifies the access point (fleet CA chain, SPIFFE ID ``/ah/serve``), opens a
    stream per open session (each starts with its ``PushHello``: after a reconnect, every
    session resumes after the ``ackedLseq`` of its new ``PushWelcome``), pings while idle
    and reconnects with backoff when the connection is lost. Between sessions the
    connection stays up, so a session opened later pays no handshake; a connection lost
    while no session is open is made again by the next one. A refusal ends only the session
    it was for (for good when the token, scope or protocol was refused, see
    `push_core.DEFINITIVE_REFUSALS`; otherwise its stream is opened again after a backoff).
    """

    def __init__(
        self,
        *,
        host: str,
        port: int,
        ca: FleetCA | x509.Certificate | str | bytes,
        trust_domain: str,
        backoff: Backoff | None = None,
        connect_timeout_s: float = 10.0,
        answer_timeout_s: float = 10.0,
        idle_timeout_s: float = 60.0,
        ping_interval_s: float = 15.0,
        server_name: str | None = None,
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
        alpn_protocols: Sequence[str] = LEADER_ALPNS,
    ) -> None:
        """``answer_timeout_s``: a stream whose ``PushHello`` gets no answer within this ends
        the connection (an access point that restarted while the connection was idle does
        not know it any more, and says nothing)."""
        self.host = host
        self.port = port
        self.ca_cert = _ca_cert(ca)
        self.trust_domain = trust_domain
        self.backoff = backoff or Backoff(base_s=0.2, cap_s=5.0)
        self.connect_timeout_s = connect_timeout_s
        self.answer_timeout_s = answer_timeout_s
        self.idle_timeout_s = idle_timeout_s
        self.ping_interval_s = ping_interval_s
        self.server_name = server_name
        self.max_frame_size = max_frame_size
        self.alpn_protocols = tuple(alpn_protocols)
        """Offered in this order (``ah-leader/2`` first: compressed batches when the access
        point speaks it)."""
        self.status = PushConnectionStatus()
        self._sessions: dict[LeaderPushSession, None] = {}
        """Open sessions (not finished, not refused), oldest first."""
        self._streams: dict[int, _LeaderStream] = {}
        self._proto: _PushClientProtocol | None = None
        self._wake = asyncio.Event()
        self._stopping = False
        self._running = False
        self._changed = asyncio.Event()

    # -- public ----------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self.status.connected

    @property
    def sessions(self) -> list[LeaderPushSession]:
        """The open sessions, oldest first."""
        return list(self._sessions)

    def open_session(
        self,
        *,
        token: str,
        session_id: str,
        producer: str | None = None,
        client_version: str = "",
        sender: PushSender | None = None,
        linger_s: float | None = None,
        on_ack: Callable[[AckedRange], None] | None = None,
        on_status: Callable[[PushStatus], None] | None = None,
        backoff: Backoff | None = None,
        events: Iterable[Event] = (),
        closing: bool = False,
    ) -> LeaderPushSession:
        """A new session on this connection (``token``: bearer token with scope ``exec``);
        its stream opens at once when connected, else when the connection is made.

        ``linger_s``: see `LEADER_LINGER_S` (the default); 0 sends on the next loop turn.
        ``backoff``: before a refused (not for good) stream of this session is opened
        again. ``events``: emitted before the stream opens (they go right behind its hello);
        ``closing``: no more will come (the stream is finished behind them, see
        `LeaderPushSession.close`)."""
        if self._stopping:
            raise RuntimeError("LeaderPushConnection is stopped")
        validate_session_id(session_id)
        hello = PushHello(
            token=token,
            session_id=session_id,
            producer=producer or new_producer_id(),
            protocol_version=PUSH_PROTOCOL_VERSION,
            client_version=client_version,
        )
        core = PushSession(
            hello,
            sender
            or PushSender(
                max_batch_events=LEADER_MAX_BATCH_EVENTS,
                max_in_flight_batches=LEADER_MAX_BATCHES_IN_FLIGHT,
            ),
        )
        session = LeaderPushSession(
            self,
            core,
            linger_s=LEADER_LINGER_S if linger_s is None else linger_s,
            on_ack=on_ack,
            on_status=on_status,
            backoff=backoff or Backoff(base_s=self.backoff.base_s, cap_s=self.backoff.cap_s),
        )
        for event in events:
            session.emit(event)
        session.closing = closing
        self._sessions[session] = None
        if self._proto is not None:
            self._start_stream(session)
        else:
            self._wake.set()
        return session

    async def run(self) -> None:
        """Keep the sessions connected until `stop()`."""
        if self._running:
            raise RuntimeError("LeaderPushConnection.run is already running")
        self._running = True
        try:
            while not self._stopping:
                if not self._sessions:
                    # Connected lazily: by the first session, and after a loss by the next.
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                self.status.attempts += 1
                try:
                    reason = await self._run_once()
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                self._connection_lost(reason)
                if self._stopping:
                    break
                self.status.last_error = reason
                if not self._sessions:
                    _log.info("push connection to {}:{} ended: {}", self.host, self.port, reason)
                    continue
                delay = self.backoff.next_delay()
                _log.info(
                    "push connection to {}:{} ended: {}; retrying in {:.2f} s",
                    self.host,
                    self.port,
                    reason,
                    delay,
                )
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        while not self._stopping:
                            await self._wake.wait()
                            self._wake.clear()
        finally:
            self._running = False
            self._notify()

    async def wait_for(
        self, predicate: Callable[[LeaderPushConnection], bool], timeout: float | None
    ) -> None:
        """Until ``predicate(self)`` holds (checked on every connection change);
        TimeoutError after ``timeout``."""
        async with asyncio.timeout(timeout):
            while not predicate(self):
                await self._changed.wait()

    async def stop(self, timeout: float = 5.0) -> None:
        """Finish every session's stream and close the connection; `run` returns."""
        self._stopping = True
        self._wake.set()
        for session in list(self._sessions):
            session.finish()
        proto = self._proto
        if proto is not None:
            proto.end("leader closing")
        if self._running:
            with contextlib.suppress(TimeoutError):
                await self.wait_for(lambda c: not c._running, timeout)

    # -- streams ---------------------------------------------------------------------------

    def _start_stream(self, session: LeaderPushSession) -> None:
        proto = self._proto
        if proto is None or session.done or session._stream is not None:
            return
        if session._retry_handle is not None:
            session._retry_handle.cancel()
            session._retry_handle = None
        hello = session.core.stream_opened()
        stream = _LeaderStream(
            proto._quic.get_next_available_stream_id(),
            session,
            FrameDecoder[PushMessage](PushMessage, self.max_frame_size),
        )
        self._streams[stream.sid] = stream
        session._stream = stream
        session.status.attempts += 1
        self.status.streams += 1
        if self._send(stream, hello):
            stream.answer_timer = proto._loop.call_later(
                self.answer_timeout_s, self._no_answer, stream
            )
            session._pump()  # the first stream's batches go right behind the hello

    def _send(self, stream: _LeaderStream, message: PushMessage) -> bool:
        proto = self._proto
        return proto is not None and proto.send(stream.sid, message)

    def _finish_sending(self, stream: _LeaderStream) -> None:
        stream.finished = True
        if self._proto is not None:
            self._proto.finish(stream.sid)

    def _no_answer(self, stream: _LeaderStream) -> None:
        stream.answer_timer = None
        proto = self._proto
        if proto is not None and self._streams.get(stream.sid) is stream:
            proto.end(
                f"no answer to the pushHello of session {stream.session.session_id} within "
                f"{self.answer_timeout_s:g} s"
            )

    def _on_stream_data(self, sid: int, data: bytes, end: bool) -> None:
        stream = self._streams.get(sid)
        if stream is None:
            return  # a stream that is over (its session finished or was refused)
        error: FrameError | None = None
        try:
            messages = stream.decoder.feed(data)
        except FrameError as exc:
            messages, error = exc.messages, exc
        for message in messages:
            self._on_message(stream, message)
            if self._streams.get(sid) is not stream:
                return
        if error is not None:
            self._end_stream(stream, f"bad frame from the access point: {error.message}")
        elif end:
            session = stream.session
            if stream.finished and session.sender.all_acked:
                # The normal end of a closing session: both sides are finished.
                self._streams.pop(sid, None)
                session._stream = None
                session.core.stream_ended()
                return
            self._end_stream(stream, "access point finished the push stream")

    def _on_stream_reset(self, sid: int, code: int) -> None:
        stream = self._streams.get(sid)
        if stream is not None:
            self._end_stream(stream, f"access point reset the push stream (code {code})")

    def _on_message(self, stream: _LeaderStream, message: PushMessage) -> None:
        session = stream.session
        try:
            update = session.core.receive(message)
        except PushProtocolError as exc:
            _log.error("push protocol error with {}:{}: {}", self.host, self.port, exc)
            self._end_stream(stream, f"protocol error: {exc}")
            return
        status = session.status
        status.acked_lseq = session.sender.acked_lseq
        status.last_seq = session.core.last_seq
        if update.welcome is not None:
            if stream.answer_timer is not None:
                stream.answer_timer.cancel()
                stream.answer_timer = None
            status.sessions += 1
            self.backoff.reset()
            session.backoff.reset()
            session._set_connected(
                True,
                f"{self.host}:{self.port} session {session.session_id} "
                f"(resending after lseq {update.welcome.acked_lseq})",
            )
            session._pump()
        elif update.acked is not None:
            if session.on_ack is not None and update.acked.count:
                session.on_ack(update.acked)
            session._notify()
            session._pump()
        elif update.refused is not None:
            refused = update.refused
            reason = f"refused ({refused.code.value}): {refused.message}"
            if session.core.refused is not None:
                status.refused = refused
                _log.error(
                    "access point {}:{} refused the event push of session {} ({}): {}",
                    self.host,
                    self.port,
                    session.session_id,
                    refused.code.value,
                    refused.message,
                )
                self._sessions.pop(session, None)
            self._end_stream(stream, reason)

    def _end_stream(self, stream: _LeaderStream, reason: str) -> None:
        """The stream is over (the connection stays): finish our side, and open a new one
        for its session after a backoff unless the session is done."""
        if self._streams.pop(stream.sid, None) is None:
            return
        if stream.answer_timer is not None:
            stream.answer_timer.cancel()
            stream.answer_timer = None
        session = stream.session
        session._stream = None
        session.core.stream_ended()
        session._cancel_timers()
        if self._proto is not None and not stream.finished:
            self._proto.finish(stream.sid)  # both sides finished: QUIC forgets the stream
        session._set_connected(False, reason)
        if not session.done and self._proto is not None:
            delay = session.backoff.next_delay()
            _log.info(
                "push stream of session {} ended: {}; opening another in {:.2f} s",
                session.session_id,
                reason,
                delay,
            )
            loop = self._proto._loop
            session._retry_handle = loop.call_later(delay, self._start_stream, session)

    def _session_finished(self, session: LeaderPushSession) -> None:
        self._sessions.pop(session, None)
        session._cancel_timers()
        stream = session._stream
        if stream is not None:
            self._streams.pop(stream.sid, None)
            if stream.answer_timer is not None:
                stream.answer_timer.cancel()
            session._stream = None
            if self._proto is not None and not stream.finished:
                self._proto.finish(stream.sid)
        session.core.stream_ended()
        if session.status.connected:  # not a loss: no on_status, no last_error
            session.status.connected = False
            session.status.note("finished")

    def _connection_lost(self, reason: str) -> None:
        for stream in list(self._streams.values()):
            if stream.answer_timer is not None:
                stream.answer_timer.cancel()
            session = stream.session
            session._stream = None
            session.core.stream_ended()
            session._cancel_timers()
            session._set_connected(False, reason)
        self._streams.clear()
        for session in self._sessions:  # those waiting for a retry: the new connection opens
            session._cancel_timers()  # a stream for every open session
            session.status.last_error = reason
        self._set_connected(False, reason)

    # -- the connection --------------------------------------------------------------------

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def _set_connected(self, connected: bool, note: str) -> None:
        if self.status.connected != connected:
            self.status.connected = connected
            self.status.note(("connected: " if connected else "disconnected: ") + note)
        self._notify()

    def _configuration(self) -> QuicConfiguration:
        config = QuicConfiguration(
            is_client=True,
            alpn_protocols=list(self.alpn_protocols),
            idle_timeout=self.idle_timeout_s,
        )
        config.verify_mode = ssl.CERT_REQUIRED
        config.load_verify_locations(cadata=self.ca_cert.public_bytes(serialization.Encoding.PEM))
        # The access point is identified by its SPIFFE ID (checked after the handshake),
        # whatever address it was dialled at.
        config.server_name = self.server_name
        return config

    async def _run_once(self) -> str:
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(self.host, self.port, type=socket.SOCK_DGRAM)
        if not infos:
            raise OSError(f"cannot resolve access point address {self.host}:{self.port}")
        family, _, _, _, addr = infos[0]
        local: tuple[str, int] = ("::", 0) if family == socket.AF_INET6 else ("0.0.0.0", 0)
        quic = QuicConnection(configuration=self._configuration())
        transport, proto = await loop.create_datagram_endpoint(
            lambda: _PushClientProtocol(quic, owner=self),
            local_addr=local,
            family=family,
        )
        ping_task: asyncio.Task[None] | None = None
        _enlarge_receive_buffer(transport)
        try:
            proto.connect(addr)
            try:
                async with asyncio.timeout(self.connect_timeout_s):
                    await proto.wait_connected()
            except TimeoutError:
                raise TimeoutError(
                    f"QUIC handshake with {self.host}:{self.port} did not complete within "
                    f"{self.connect_timeout_s:g} s"
                ) from None
            except ConnectionError:
                term = proto.termination
                raise ConnectionError(
                    f"QUIC handshake with {self.host}:{self.port} failed: "
                    f"{term.reason_phrase if term else 'connection closed'}"
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
                proto.close(error_code=ConnectionCloseCode.PEER_REFUSED, reason_phrase=str(exc))
                raise PeerVerificationError(
                    f"access point {self.host}:{self.port} refused: {exc}"
                ) from None
            self._proto = proto
            self.status.connections += 1
            self._set_connected(True, f"{self.host}:{self.port}")
            for session in list(self._sessions):
                self._start_stream(session)
            ping_task = asyncio.ensure_future(self._keepalive(proto))
            if not self._stopping:
                await proto.done
            if self._stopping and proto.termination is None:
                for sid in list(self._streams):
                    proto.finish(sid)
            return proto.done.result() if proto.done.done() else "stopped"
        finally:
            self._proto = None
            waiter = proto._connected_waiter
            if waiter is not None:
                # aioquic fails this future when the abandoned handshake is closed; nobody
                # awaits it any more.
                waiter.add_done_callback(_retrieve)
            if ping_task is not None:
                ping_task.cancel()
            if proto.termination is None:
                # close() transmits the CONNECTION_CLOSE at once, before the socket goes.
                proto.close(error_code=ConnectionCloseCode.NO_ERROR, reason_phrase="leader closing")
            transport.close()

    async def _keepalive(self, proto: _PushClientProtocol) -> None:
        """QUIC has no keep-alive of its own: a connection that is quiet for a while (a long
        build, or no run at all) pings so the idle timeout does not close it."""
        while True:
            await asyncio.sleep(self.ping_interval_s)
            if proto.termination is not None:
                return
            try:
                async with asyncio.timeout(self.ping_interval_s):
                    await proto.ping()
            except (TimeoutError, ConnectionError):
                proto.end(f"no answer to a ping within {self.ping_interval_s:g} s")
                return


class LeaderPushClient:
    """Pushes one session's events to the access point, reconnecting as needed: a
    `LeaderPushConnection` of its own carrying this one session.

    Everything runs on one event loop: call `emit` (never blocks: the event is queued) and
    await `run`, `flush` and `stop` there. Events are delivered exactly once and in order as
    long as the process lives (the access point skips resent events by lseq). A refusal of
    the token or scope ends `run` (see `status.refused`); network failures are retried with
    backoff forever.
    """

    def __init__(
        self,
        *,
        host: str,
        port: int,
        ca: FleetCA | x509.Certificate | str | bytes,
        trust_domain: str,
        token: str,
        session_id: str,
        producer: str | None = None,
        client_version: str = "",
        sender: PushSender | None = None,
        backoff: Backoff | None = None,
        connect_timeout_s: float = 10.0,
        idle_timeout_s: float = 60.0,
        ping_interval_s: float = 15.0,
        server_name: str | None = None,
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
        on_ack: Callable[[AckedRange], None] | None = None,
        on_status: Callable[[PushStatus], None] | None = None,
        linger_s: float | None = None,
    ) -> None:
        """``linger_s``: see `LEADER_LINGER_S` (the default); 0 sends on the next loop turn."""
        backoff = backoff or Backoff(base_s=0.2, cap_s=5.0)
        self.connection = LeaderPushConnection(
            host=host,
            port=port,
            ca=ca,
            trust_domain=trust_domain,
            backoff=backoff,
            connect_timeout_s=connect_timeout_s,
            idle_timeout_s=idle_timeout_s,
            ping_interval_s=ping_interval_s,
            server_name=server_name,
            max_frame_size=max_frame_size,
        )
        self.session = self.connection.open_session(
            token=token,
            session_id=session_id,
            producer=producer,
            client_version=client_version,
            sender=sender,
            linger_s=linger_s,
            on_ack=on_ack,
            on_status=on_status,
        )
        self.host = host
        self.port = port
        self.session_id = session_id
        self.producer = self.session.producer
        self._running = False

    @property
    def sender(self) -> PushSender:
        return self.session.sender

    @property
    def status(self) -> PushStatus:
        return self.session.status

    @property
    def connected(self) -> bool:
        return self.session.connected

    def emit(self, event: Event) -> int:
        """See `LeaderPushSession.emit`."""
        return self.session.emit(event)

    async def run(self) -> None:
        """Stay connected until `stop()` or a definitive refusal."""
        if self._running:
            raise RuntimeError("LeaderPushClient.run is already running")
        self._running = True
        connection = asyncio.ensure_future(self.connection.run())
        over = asyncio.ensure_future(self.session.wait_for(lambda s: s.done, None))
        try:
            await asyncio.wait({connection, over}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            over.cancel()
            await self.connection.stop()
            if not connection.done():
                connection.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await connection
            self._running = False
            self.session._notify()

    async def wait_for(self, predicate: Callable[[LeaderPushClient], bool], timeout: float) -> None:
        """Until ``predicate(self)`` holds (checked on every change); TimeoutError after
        ``timeout``."""
        await self.session.wait_for(lambda _: predicate(self), timeout)

    async def flush(self, timeout: float) -> bool:
        """Wait until every emitted event is acknowledged (True), or the push was refused or
        ``timeout`` passed (False)."""
        return await self.session.flush(timeout)

    async def stop(self, timeout: float = 5.0) -> None:
        """Finish the push stream and close; `run` returns."""
        self.session.finish()
        await self.connection.stop(timeout)
        if self._running:
            with contextlib.suppress(TimeoutError):
                await self.wait_for(lambda c: not c._running, timeout)
