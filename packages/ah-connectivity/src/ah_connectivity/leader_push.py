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
control plane's: 4-byte length + msgpack. The access point keeps the stream open until the
leader finishes it; a stream that fails (bad frame, refused token, storage error) gets a
``PushRefused`` and FIN, and the connection stays up. A connection that has not sent a
``PushHello`` within ``push_hello_timeout_s`` is closed.

The leader verifies the access point like a follower does: chain against the fleet CA during
the handshake, then the SPIFFE ID ``spiffe://<td>/ah/serve``.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import secrets
import socket
import ssl
from collections.abc import Callable, Sequence
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
    AckedRange,
    Authenticate,
    ClosePush,
    PushAction,
    PushProtocolError,
    PushReceiver,
    PushSender,
    SendPush,
    StoreEvents,
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
    PushAck,
    PushHello,
    PushMessage,
    PushRefusal,
    PushRefused,
    PushWelcome,
    validate_session_id,
)

__all__ = [
    "LEADER_ALPN",
    "LEADER_MAX_BATCHES_IN_FLIGHT",
    "LEADER_MAX_BATCH_EVENTS",
    "ControlAndPushServer",
    "LeaderPushClient",
    "PushGrant",
    "PushIngest",
    "PushRefusedError",
    "PushStatus",
    "new_producer_id",
    "new_session_id",
]

LEADER_ALPN = "ah-leader/1"

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

    def __init__(self, proto: _ControlOrPushConnection, server: ControlAndPushServer) -> None:
        self.proto = proto
        self.server = server
        self.streams: dict[int, _ServerPushStream] = {}
        self.authenticated = False
        self._hello_timer: asyncio.TimerHandle | None = None
        self._refused_ids: set[int] = set()
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
            stream = self.streams.pop(event.stream_id, None)
            if stream is not None:
                _log.info(
                    "{}: push stream {} reset (code {})", self.label, event.stream_id, event.error_code
                )
        elif isinstance(event, events.ConnectionTerminated):
            if self._hello_timer is not None:
                self._hello_timer.cancel()
                self._hello_timer = None
            self.streams.clear()

    def _hello_timeout(self) -> None:
        self._hello_timer = None
        if not self.authenticated and not self.proto.is_terminated:
            _log.warning("{}: no pushHello within {:g} s; closing", self.label, self.server.push_hello_timeout_s)
            self.proto.close(
                error_code=ConnectionCloseCode.PEER_REFUSED,
                reason_phrase="no pushHello in time",
            )

    def _on_data(self, sid: int, data: bytes, end: bool) -> None:
        stream = self.streams.get(sid)
        if stream is None:
            if sid in self._refused_ids:
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
                    stream.receiver.refuse(
                        PushRefusal.INVALID, "push stream ended inside a frame"
                    ),
                )
                return
            self._apply(stream, stream.receiver.peer_finished())

    def _apply(self, stream: _ServerPushStream, actions: list[PushAction]) -> None:
        queue = list(actions)
        while queue:
            action = queue.pop(0)
            if isinstance(action, SendPush):
                self._send(stream, action.message)
            elif isinstance(action, ClosePush):
                if action.error:
                    _log.warning("{}: push stream {} refused: {}", self.label, stream.sid, action.reason)
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
                PushRefusal.INTERNAL, f"cannot open session {hello.session_id!r}: {type(exc).__name__}"
            )
        stream.grant = grant
        self.authenticated = True
        if self._hello_timer is not None:
            self._hello_timer.cancel()
            self._hello_timer = None
        _log.info(
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
            _log.exception("{}: storing events of session {!r} failed", self.label, grant.session_id)
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
            and event.alpn_protocol == LEADER_ALPN
        ):
            self.push = _PushConnection(self, self.push_server)
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

    def _configuration(self) -> QuicConfiguration:
        config = super()._configuration()
        config.alpn_protocols = [*(config.alpn_protocols or []), LEADER_ALPN]
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
    if sock is None or read_ready is None or fd is None or not isinstance(loop, asyncio.AbstractEventLoop):
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
    """What the leader's client knows about its push, for callers that report it."""

    connected: bool = False
    attempts: int = 0
    """Connection attempts so far."""
    sessions: int = 0
    """Connections that got a PushWelcome."""
    last_error: str | None = None
    refused: PushRefused | None = None
    """Set when the access point refused the push for good (token, scope, protocol)."""
    acked_lseq: int = 0
    last_seq: int = 0
    history: list[str] = field(default_factory=list)
    """One line per connection change, oldest first (bounded)."""

    def note(self, line: str) -> None:
        self.history.append(line)
        del self.history[:-50]


class _PushClientProtocol(QuicConnectionProtocol):
    def __init__(
        self,
        quic: QuicConnection,
        stream_handler: QuicStreamHandler | None = None,
        *,
        on_message: Callable[[PushMessage], None],
        on_stream_end: Callable[[str], None],
        max_frame_size: int,
    ) -> None:
        super().__init__(quic, stream_handler)
        self.on_message = on_message
        self.on_stream_end = on_stream_end
        self.stream_id: int | None = None
        self.decoder = FrameDecoder[PushMessage](PushMessage, max_frame_size)
        self.termination: events.ConnectionTerminated | None = None
        self.done: asyncio.Future[str] = self._loop.create_future()

    def end(self, reason: str) -> None:
        if not self.done.done():
            self.done.set_result(reason)

    def send(self, message: PushMessage, *, end: bool = False) -> None:
        if self.stream_id is None or self.termination is not None:
            return
        try:
            self._quic.send_stream_data(self.stream_id, encode_frame(message), end_stream=end)
        except (RuntimeError, ValueError) as exc:
            self.end(f"cannot write to the push stream: {exc}")
            return
        # The access point's PushAcks are acknowledged in the packets of the next batch.
        _ack_with_next_packet(self._quic, self._loop.time())
        self._transmit_soon()

    def finish(self) -> None:
        if self.stream_id is None or self.termination is not None:
            return
        with contextlib.suppress(RuntimeError, ValueError):
            self._quic.send_stream_data(self.stream_id, b"", end_stream=True)
        self._transmit_soon()

    def quic_event_received(self, event: events.QuicEvent) -> None:
        try:
            if isinstance(event, events.StreamDataReceived) and event.stream_id == self.stream_id:
                try:
                    messages = self.decoder.feed(event.data)
                except FrameError as exc:
                    for message in exc.messages:
                        self.on_message(message)
                    self.end(f"bad frame from the access point: {exc.message}")
                    return
                for message in messages:
                    self.on_message(message)
                if event.end_stream:
                    self.on_stream_end("access point finished the push stream")
            elif isinstance(event, events.StreamReset) and event.stream_id == self.stream_id:
                self.on_stream_end(f"access point reset the push stream (code {event.error_code})")
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


class LeaderPushClient:
    """Pushes one session's events to the access point, reconnecting as needed.

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
        validate_session_id(session_id)
        self.host = host
        self.port = port
        self.ca_cert = _ca_cert(ca)
        self.trust_domain = trust_domain
        self.token = token
        self.session_id = session_id
        self.producer = producer or new_producer_id()
        self.client_version = client_version
        self.sender = sender or PushSender(
            max_batch_events=LEADER_MAX_BATCH_EVENTS,
            max_in_flight_batches=LEADER_MAX_BATCHES_IN_FLIGHT,
        )
        self.backoff = backoff or Backoff(base_s=0.2, cap_s=5.0)
        self.connect_timeout_s = connect_timeout_s
        self.idle_timeout_s = idle_timeout_s
        self.ping_interval_s = ping_interval_s
        self.server_name = server_name
        self.max_frame_size = max_frame_size
        self.on_ack = on_ack
        self.on_status = on_status
        self.linger_s = LEADER_LINGER_S if linger_s is None else linger_s
        self.status = PushStatus()
        self._proto: _PushClientProtocol | None = None
        self._pump_handle: asyncio.Handle | None = None
        self._stopping = asyncio.Event()
        self._changed = asyncio.Event()
        self._running = False

    # -- public ----------------------------------------------------------------------------

    def emit(self, event: Event) -> int:
        """Queue ``event`` (its ``seq``/``tsMs`` are assigned by the access point); returns
        its lseq. Sent ``linger_s`` later when connected (at once when a full batch is
        waiting), together with every other event emitted until then (one batch, one ack),
        or when the batch window has room again (see `PushSender.max_in_flight_batches`).

        The event's session id travels as "" (the push stream's session, which the access
        point sets on every stored event): 14% fewer bytes and packets for a log line."""
        if event.session_id == self.session_id:
            event = msgspec.structs.replace(event, session_id="")
        sender = self.sender
        lseq = sender.emit(event)
        if self._proto is None:
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

    def _scheduled_pump(self) -> None:
        self._pump_handle = None
        self._pump()

    @property
    def connected(self) -> bool:
        return self.status.connected

    async def run(self) -> None:
        """Stay connected until `stop()` or a definitive refusal."""
        if self._running:
            raise RuntimeError("LeaderPushClient.run is already running")
        self._running = True
        try:
            while not self._stopping.is_set() and self.status.refused is None:
                self.status.attempts += 1
                try:
                    reason = await self._run_once()
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                self.sender.on_disconnect()
                self._set_connected(False, reason)
                if self._stopping.is_set() or self.status.refused is not None:
                    break
                self.status.last_error = reason
                delay = self.backoff.next_delay()
                _log.info(
                    "push connection to {}:{} ended: {}; retrying in {:.2f} s",
                    self.host,
                    self.port,
                    reason,
                    delay,
                )
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await self._stopping.wait()
        finally:
            self._running = False
            self._notify()

    async def wait_for(self, predicate: Callable[[LeaderPushClient], bool], timeout: float) -> None:
        """Until ``predicate(self)`` holds (checked on every change); TimeoutError after
        ``timeout``."""
        async with asyncio.timeout(timeout):
            while not predicate(self):
                await self._changed.wait()

    async def flush(self, timeout: float) -> bool:
        """Wait until every emitted event is acknowledged (True), or the push was refused or
        ``timeout`` passed (False)."""
        try:
            await self.wait_for(
                lambda c: c.sender.all_acked or c.status.refused is not None, timeout
            )
        except TimeoutError:
            return False
        return self.sender.all_acked

    async def stop(self, timeout: float = 5.0) -> None:
        """Finish the push stream and close; `run` returns."""
        self._stopping.set()
        proto = self._proto
        if proto is not None:
            proto.end("leader closing")
        if self._running:
            with contextlib.suppress(TimeoutError):
                await self.wait_for(lambda c: not c._running, timeout)

    # -- internals -------------------------------------------------------------------------

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def _set_connected(self, connected: bool, note: str) -> None:
        if self.status.connected != connected:
            self.status.connected = connected
            self.status.note(("connected: " if connected else "disconnected: ") + note)
            if self.on_status is not None:
                try:
                    self.on_status(self.status)
                except Exception:
                    _log.exception("push on_status callback failed")
        self._notify()

    def _pump(self) -> None:
        proto = self._proto
        if proto is None or not self.sender.connected:
            return
        while True:
            batch = self.sender.next_batch()
            if batch is None:
                return
            proto.send(batch)

    def _on_message(self, message: PushMessage) -> None:
        proto = self._proto
        try:
            if isinstance(message, PushWelcome):
                self.sender.on_welcome(message)
                self.status.sessions += 1
                self.status.acked_lseq = self.sender.acked_lseq
                self.status.last_seq = message.last_seq
                self.backoff.reset()
                self._set_connected(
                    True,
                    f"{self.host}:{self.port} session {self.session_id} "
                    f"(resending after lseq {message.acked_lseq})",
                )
                self._pump()
            elif isinstance(message, PushAck):
                acked = self.sender.on_ack(message)
                self.status.acked_lseq = self.sender.acked_lseq
                if message.last_seq:
                    self.status.last_seq = message.last_seq
                if self.on_ack is not None and acked.count:
                    self.on_ack(acked)
                self._notify()
                self._pump()
            elif isinstance(message, PushRefused):
                if message.code in (
                    PushRefusal.UNAUTHENTICATED,
                    PushRefusal.FORBIDDEN,
                    PushRefusal.INVALID,
                ):
                    self.status.refused = message
                    _log.error(
                        "access point {}:{} refused the event push ({}): {}",
                        self.host,
                        self.port,
                        message.code.value,
                        message.message,
                    )
                if proto is not None:
                    proto.end(f"refused ({message.code.value}): {message.message}")
            else:
                raise PushProtocolError(f"unexpected {type(message).__name__} from the access point")
        except PushProtocolError as exc:
            _log.error("push protocol error with {}:{}: {}", self.host, self.port, exc)
            if proto is not None:
                proto.end(f"protocol error: {exc}")

    def _on_stream_end(self, reason: str) -> None:
        if self._proto is not None:
            self._proto.end(reason)

    def _configuration(self) -> QuicConfiguration:
        config = QuicConfiguration(
            is_client=True, alpn_protocols=[LEADER_ALPN], idle_timeout=self.idle_timeout_s
        )
        config.verify_mode = ssl.CERT_REQUIRED
        config.load_verify_locations(
            cadata=self.ca_cert.public_bytes(serialization.Encoding.PEM)
        )
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
            lambda: _PushClientProtocol(
                quic,
                on_message=self._on_message,
                on_stream_end=self._on_stream_end,
                max_frame_size=self.max_frame_size,
            ),
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
            proto.stream_id = quic.get_next_available_stream_id()
            self._proto = proto
            proto.send(
                PushHello(
                    token=self.token,
                    session_id=self.session_id,
                    producer=self.producer,
                    protocol_version=PUSH_PROTOCOL_VERSION,
                    client_version=self.client_version,
                )
            )
            ping_task = asyncio.ensure_future(self._keepalive(proto))
            stop_wait = asyncio.ensure_future(self._stopping.wait())
            try:
                waiters: set[asyncio.Future[Any]] = {proto.done, stop_wait}
                await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            finally:
                stop_wait.cancel()
            if self._stopping.is_set() and proto.termination is None:
                proto.finish()
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
                proto.close(
                    error_code=ConnectionCloseCode.NO_ERROR, reason_phrase="leader closing"
                )
            transport.close()

    async def _keepalive(self, proto: _PushClientProtocol) -> None:
        """QUIC has no keep-alive of its own: a leader that is quiet for a while (a long
        build) pings so the idle timeout does not close the connection under it."""
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
