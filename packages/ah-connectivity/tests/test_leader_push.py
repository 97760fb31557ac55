"""The leader's event push over real QUIC (UDP on 127.0.0.1, port 0, real TLS), sharing the
port with the follower control plane."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import re
import ssl
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec
import pytest
from aioquic.asyncio.client import connect
from aioquic.quic.configuration import QuicConfiguration
from hypothesis import given
from hypothesis import strategies as st

from ah_connectivity import Backoff, ControlClient, TokenError, TokenSigner
from ah_connectivity.framing import FrameDecoder, encode_frame
from ah_connectivity.leader_push import (
    LEADER_ALPN,
    LEADER_ALPN_V2,
    LEADER_ALPNS,
    ControlAndPushServer,
    LeaderPushClient,
    LeaderPushConnection,
    PushGrant,
    PushRefusedError,
    new_session_id,
)
from ah_connectivity.push_core import PushSender
from ah_domain_types import (
    PUSH_PROTOCOL_VERSION,
    SESSION_ID_PATTERN,
    Event,
    NoteEvent,
    PushBatchZ,
    PushHello,
    PushMessage,
    PushRefusal,
    PushRefused,
    StreamError,
)

TRUST_DOMAIN = "test.fleet"


@dataclass
class MemoryIngest:
    """A `PushIngest` keeping events in memory (the access point's SQLite store is tested
    with the daemon); tokens are verified for real."""

    signer: TokenSigner
    events: dict[str, list[tuple[int, str, str]]] = field(default_factory=dict)
    """session → [(seq, producer, message)]"""
    producers: dict[tuple[str, str], int] = field(default_factory=dict)
    fail_next_append: bool = False
    wire_session_ids: set[str] = field(default_factory=set)
    """The session ids the events carried on the wire."""

    def open_push(self, token: str, session_id: str, producer: str) -> PushGrant:
        try:
            claims = self.signer.verifier().verify_user(token, required_scope="exec")
        except TokenError as exc:
            code = (
                PushRefusal.FORBIDDEN
                if exc.reason == "missing-scope"
                else PushRefusal.UNAUTHENTICATED
            )
            raise PushRefusedError(code, str(exc)) from None
        stored = self.events.setdefault(session_id, [])
        return PushGrant(
            subject=claims.sub,
            session_id=session_id,
            producer=producer,
            acked_lseq=self.producers.get((session_id, producer), 0),
            last_seq=len(stored),
        )

    def append_events(
        self, grant: PushGrant, first_lseq: int, events: Sequence[Event]
    ) -> tuple[int, int]:
        if self.fail_next_append:
            self.fail_next_append = False
            raise OSError("disk full")
        key = (grant.session_id, grant.producer)
        assert first_lseq == self.producers.get(key, 0) + 1
        stored = self.events[grant.session_id]
        first = len(stored) + 1
        for event in events:
            assert isinstance(event, NoteEvent)
            self.wire_session_ids.add(event.session_id)
            stored.append((len(stored) + 1, grant.producer, event.message))
        self.producers[key] = first_lseq + len(events) - 1
        return first, len(stored)

    def messages(self, session_id: str) -> list[str]:
        return [m for _, _, m in self.events.get(session_id, [])]


def notes(start: int, stop: int) -> list[NoteEvent]:
    return [NoteEvent(session_id="", ts_ms=0.0, message=f"n{i}") for i in range(start, stop)]


@pytest.fixture
def signer() -> TokenSigner:
    return TokenSigner.generate(TRUST_DOMAIN)


def make_server(
    fleet: Any,
    handler: Any,
    ingest: MemoryIngest,
    cls: type[ControlAndPushServer] = ControlAndPushServer,
    **kw: Any,
) -> ControlAndPushServer:
    return cls(
        push_ingest=ingest,
        identity=fleet.server,
        ca=fleet.ca,
        trust_domain=fleet.trust_domain,
        handler=handler,
        heartbeat_interval_ms=100,
        **kw,
    )


def make_client(fleet: Any, port: int, token: str, session_id: str, **kw: Any) -> LeaderPushClient:
    return LeaderPushClient(
        host="127.0.0.1",
        port=port,
        ca=fleet.ca.cert_pem,
        trust_domain=fleet.trust_domain,
        token=token,
        session_id=session_id,
        backoff=Backoff(base_s=0.02, cap_s=0.2),
        connect_timeout_s=5.0,
        **kw,
    )


async def start_when_free(server: ControlAndPushServer, port: int, timeout: float = 5.0) -> None:
    """Bind ``port`` again; the closed server's UDP socket goes away on a later loop turn."""
    async with asyncio.timeout(timeout):
        while True:
            try:
                await server.start("127.0.0.1", port)
                return
            except OSError:
                await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def running(client: LeaderPushClient | LeaderPushConnection) -> Any:
    task = asyncio.ensure_future(client.run())
    try:
        yield task
    finally:
        await client.stop()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def test_push_and_follower_share_the_port(
    run: Callable[..., Any], fleet: Any, handler: Any, follower_info: Any, signer: TokenSigner
) -> None:
    ingest = MemoryIngest(signer)
    session = new_session_id()
    acked: list[tuple[int, int]] = []

    async def body() -> None:
        async with make_server(fleet, handler, ingest) as server:
            port = await server.start()
            follower = ControlClient(
                host="127.0.0.1",
                port=port,
                identity=fleet.follower("lin-1"),
                ca=fleet.ca,
                trust_domain=fleet.trust_domain,
                info=follower_info("lin-1"),
                on_rpc=lambda msg: asyncio.sleep(0, StreamError(code=1, message="no")),
            )
            follower_task = asyncio.ensure_future(follower.run())
            token = signer.issue_user("alice", scopes=["exec"])
            client = make_client(
                fleet,
                port,
                token,
                session,
                on_ack=lambda r: acked.append((r.first_seq, r.last_seq)),
            )
            async with running(client):
                for event in notes(0, 1500):
                    # Half as the sink makes them (with the session id), half without.
                    if len(event.message) % 2:
                        event = msgspec.structs.replace(event, session_id=session)
                    client.emit(event)
                assert await client.flush(20.0)
                await follower.wait_connected(10.0)
                assert server.follower("lin-1") is not None
                assert client.status.connected and client.status.sessions == 1
            await follower.stop()
            await follower_task

    run(body())
    assert ingest.messages(session) == [f"n{i}" for i in range(1500)]
    assert ingest.wire_session_ids == {""}, "the stream's session id is not repeated per event"
    # The acks cover seqs 1..1500 once each, in order.
    covered = [seq for first, last in acked for seq in range(first, last + 1)]
    assert covered == list(range(1, 1501))


@pytest.mark.parametrize(
    ("scopes", "good_key", "code"),
    [
        (["read-logs"], True, PushRefusal.FORBIDDEN),
        (["exec"], False, PushRefusal.UNAUTHENTICATED),
    ],
)
def test_a_refused_token_ends_the_push(
    run: Callable[..., Any],
    fleet: Any,
    handler: Any,
    signer: TokenSigner,
    scopes: list[str],
    good_key: bool,
    code: PushRefusal,
) -> None:
    ingest = MemoryIngest(signer)
    issuer = signer if good_key else TokenSigner.generate(TRUST_DOMAIN)

    async def body() -> None:
        async with make_server(fleet, handler, ingest) as server:
            port = await server.start()
            client = make_client(fleet, port, issuer.issue_user("mallory", scopes=scopes), "s-x")
            client.emit(notes(0, 1)[0])
            # run() returns by itself: a refused token is not retried.
            await asyncio.wait_for(client.run(), 10.0)
            assert client.status.refused is not None
            assert client.status.refused.code is code
            assert not await client.flush(0.1)

    run(body())
    assert ingest.messages("s-x") == []


def test_reconnect_after_the_access_point_restarts_stores_each_event_once(
    run: Callable[..., Any], fleet: Any, handler: Any, signer: TokenSigner
) -> None:
    ingest = MemoryIngest(signer)  # survives the "restart", as the SQLite store does
    session = new_session_id()

    async def body() -> None:
        first = make_server(fleet, handler, ingest)
        port = await first.start()
        client = make_client(fleet, port, signer.issue_user("alice", scopes=["exec"]), session)
        async with running(client):
            for event in notes(0, 400):
                client.emit(event)
            await client.wait_for(lambda c: c.sender.acked_lseq >= 100, 10.0)
            await first.close("restart")
            # Emitted while the access point is down: queued, never blocking.
            for event in notes(400, 800):
                client.emit(event)
            second = make_server(fleet, handler, ingest)
            await start_when_free(second, port)
            try:
                assert await client.flush(20.0), client.status
                assert client.status.sessions >= 2
            finally:
                await second.close()

    run(body())
    assert ingest.messages(session) == [f"n{i}" for i in range(800)]


def test_events_linger_for_their_batch_and_a_full_batch_goes_at_once(
    run: Callable[..., Any], fleet: Any, handler: Any, signer: TokenSigner
) -> None:
    ingest = MemoryIngest(signer)
    session = new_session_id()

    async def body() -> None:
        async with make_server(fleet, handler, ingest) as server:
            port = await server.start()
            client = make_client(
                fleet,
                port,
                signer.issue_user("alice", scopes=["exec"]),
                session,
                sender=PushSender(max_batch_events=10, max_in_flight_batches=2),
                linger_s=3600.0,
            )
            async with running(client):
                await client.wait_for(lambda c: c.connected, 10.0)
                for event in notes(0, 3):
                    client.emit(event)
                # Three events wait for others to join their batch (the linger is an hour)...
                assert not await client.flush(0.5)
                assert client.sender.in_flight == 0 and ingest.messages(session) == []
                for event in notes(3, 10):
                    client.emit(event)
                # ...and the tenth fills the batch: it leaves at once.
                assert await client.flush(10.0), client.status

    run(body())
    assert ingest.messages(session) == [f"n{i}" for i in range(10)]


def test_a_storage_failure_refuses_the_stream_and_the_leader_retries(
    run: Callable[..., Any], fleet: Any, handler: Any, signer: TokenSigner
) -> None:
    ingest = MemoryIngest(signer, fail_next_append=True)

    async def body() -> None:
        async with make_server(fleet, handler, ingest) as server:
            port = await server.start()
            client = make_client(fleet, port, signer.issue_user("a", scopes=["exec"]), "s-retry")
            async with running(client):
                for event in notes(0, 10):
                    client.emit(event)
                assert await client.flush(10.0)
                assert client.status.sessions == 2, client.status.history

    run(body())
    assert ingest.messages("s-retry") == [f"n{i}" for i in range(10)]


def test_a_silent_leader_connection_is_closed(
    run: Callable[..., Any], fleet: Any, handler: Any, signer: TokenSigner
) -> None:
    async def body() -> None:
        server = make_server(fleet, handler, MemoryIngest(signer), push_hello_timeout_s=0.2)
        async with server:
            port = await server.start()
            config = QuicConfiguration(is_client=True, alpn_protocols=[LEADER_ALPN])
            config.verify_mode = ssl.CERT_NONE
            async with connect("127.0.0.1", port, configuration=config) as proto:
                await asyncio.wait_for(proto.wait_closed(), 5.0)
                assert proto._quic._close_event is not None
                assert proto._quic._close_event.reason_phrase == "no pushHello in time"

    run(body())


def test_a_client_without_certificate_is_still_refused_on_the_control_alpn(
    run: Callable[..., Any], fleet: Any, handler: Any, signer: TokenSigner
) -> None:
    async def body() -> None:
        async with make_server(fleet, handler, MemoryIngest(signer)) as server:
            port = await server.start()
            config = QuicConfiguration(is_client=True, alpn_protocols=["ah-control/1"])
            config.verify_mode = ssl.CERT_NONE
            async with connect("127.0.0.1", port, configuration=config) as proto:
                await asyncio.wait_for(proto.wait_closed(), 5.0)
                assert proto._quic._close_event is not None
                assert "no certificate" in proto._quic._close_event.reason_phrase

    run(body())


@given(st.datetimes(timezones=st.just(dt.UTC)))
def test_new_session_ids_are_valid_and_carry_the_time(now: dt.datetime) -> None:
    session_id = new_session_id(now)
    assert re.fullmatch(SESSION_ID_PATTERN, session_id)
    assert session_id.startswith(f"s-{now.strftime('%Y%m%dT%H%M%SZ')}-")


# --------------------------------------------------------------------------- shared connection


def make_connection(fleet: Any, port: int, **kw: Any) -> LeaderPushConnection:
    return LeaderPushConnection(
        host="127.0.0.1",
        port=port,
        ca=fleet.ca.cert_pem,
        trust_domain=fleet.trust_domain,
        backoff=Backoff(base_s=0.02, cap_s=0.2),
        connect_timeout_s=5.0,
        **kw,
    )


class _AccessPointBeforeV2(ControlAndPushServer):
    """An access point of the release before ``ah-leader/2``: it offers only v1."""

    def _configuration(self) -> QuicConfiguration:
        config = super()._configuration()
        config.alpn_protocols = [p for p in config.alpn_protocols or [] if p != LEADER_ALPN_V2]
        return config


@pytest.mark.parametrize(
    ("offered", "old_access_point"),
    [(LEADER_ALPNS, False), ((LEADER_ALPN,), False), (LEADER_ALPNS, True)],
    ids=["v2-compressed", "v1-leader", "v1-access-point"],
)
def test_sessions_share_one_connection_and_each_arrives_once_in_order(
    run: Callable[..., Any],
    fleet: Any,
    handler: Any,
    signer: TokenSigner,
    offered: tuple[str, ...],
    old_access_point: bool,
) -> None:
    """Also across versions: a leader that offers ``ah-leader/2`` to an access point that
    speaks it sends its bigger batches compressed; an older leader (only ``ah-leader/1``)
    or an older access point meet on v1 and nothing is compressed."""
    ingest = MemoryIngest(signer)
    token = signer.issue_user("alice", scopes=["exec"])
    names = [new_session_id() + f"{i}" for i in range(4)]
    compressed: list[int] = []

    server_type = _AccessPointBeforeV2 if old_access_point else ControlAndPushServer
    expected_alpn = LEADER_ALPN if old_access_point else offered[0]

    async def body() -> None:
        async with make_server(fleet, handler, ingest, server_type) as server:
            port = await server.start()
            connection = make_connection(fleet, port, alpn_protocols=offered)
            async with running(connection):
                # Four concurrent sessions, their events interleaved.
                sessions = [connection.open_session(token=token, session_id=n) for n in names]
                for i in range(300):
                    for session in sessions:
                        session.emit(notes(i, i + 1)[0])
                for session in sessions:
                    assert await session.flush(20.0), session.status
                    assert await session.close(1.0)
                assert connection.sessions == []
                # Then sessions one after the other, the connection idle in between.
                for n in range(3):
                    later = connection.open_session(token=token, session_id=f"s-later-{n}")
                    for event in notes(0, 20):
                        later.emit(event)
                    assert await later.close(20.0), later.status
                assert connection.connected
                assert connection.status.connections == 1, connection.status.history
                assert connection.status.streams == 7
                assert connection.status.alpn == expected_alpn
                compressed[:] = [
                    connection.status.compressed_batches,
                    server.compressed_batches_received,
                ]

    run(body())
    if expected_alpn == LEADER_ALPN_V2:
        assert compressed[0] > 0 and compressed[0] == compressed[1]
    else:
        assert compressed == [0, 0]
    for name in names:
        assert ingest.messages(name) == [f"n{i}" for i in range(300)]
    for n in range(3):
        assert ingest.messages(f"s-later-{n}") == [f"n{i}" for i in range(20)]


def test_a_refused_session_ends_alone_and_the_connection_stays_up(
    run: Callable[..., Any], fleet: Any, handler: Any, signer: TokenSigner
) -> None:
    ingest = MemoryIngest(signer)
    good = signer.issue_user("alice", scopes=["exec"])
    reader = signer.issue_user("reader", scopes=["read-logs"])

    async def body() -> None:
        async with make_server(fleet, handler, ingest) as server:
            port = await server.start()
            connection = make_connection(fleet, port)
            async with running(connection):
                first = connection.open_session(token=good, session_id="s-good-1")
                refused = connection.open_session(token=reader, session_id="s-refused")
                for event in notes(0, 50):
                    first.emit(event)
                    refused.emit(event)
                await refused.wait_for(lambda s: s.done, 10.0)
                assert refused.status.refused is not None
                assert refused.status.refused.code is PushRefusal.FORBIDDEN
                assert not await refused.flush(0.1)
                assert await first.flush(10.0), first.status
                # A session opened after the refusal still gets through, on the same
                # connection.
                second = connection.open_session(token=good, session_id="s-good-2")
                for event in notes(0, 50):
                    second.emit(event)
                assert await second.flush(10.0), second.status
                assert connection.connected and connection.status.connections == 1
                assert first.status.sessions == second.status.sessions == 1
                assert refused not in connection.sessions

    run(body())
    expected = [f"n{i}" for i in range(50)]
    assert ingest.messages("s-good-1") == ingest.messages("s-good-2") == expected
    assert ingest.messages("s-refused") == []


def test_a_storage_failure_refuses_one_stream_and_only_that_session_retries(
    run: Callable[..., Any], fleet: Any, handler: Any, signer: TokenSigner
) -> None:
    ingest = MemoryIngest(signer)
    token = signer.issue_user("alice", scopes=["exec"])

    async def body() -> None:
        async with make_server(fleet, handler, ingest) as server:
            port = await server.start()
            connection = make_connection(fleet, port)
            async with running(connection):
                other = connection.open_session(token=token, session_id="s-other")
                other.emit(notes(0, 1)[0])
                assert await other.flush(10.0)
                ingest.fail_next_append = True
                failing = connection.open_session(token=token, session_id="s-failing")
                for event in notes(0, 10):
                    failing.emit(event)
                assert await failing.flush(10.0), failing.status
                for event in notes(1, 10):
                    other.emit(event)
                assert await other.flush(10.0)
                assert failing.status.sessions == 2, failing.status.history
                assert other.status.sessions == 1, other.status.history
                assert connection.status.connections == 1

    run(body())
    expected = [f"n{i}" for i in range(10)]
    assert ingest.messages("s-failing") == ingest.messages("s-other") == expected


class _Blackhole:
    """A datagram transport of a process that died: sends nothing."""

    def sendto(self, data: bytes, addr: Any = None) -> None:
        pass

    def close(self) -> None:
        pass

    def is_closing(self) -> bool:
        return True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


@pytest.mark.parametrize("silent", [False, True], ids=["shutdown", "crash"])
def test_every_open_session_resumes_after_the_access_point_restarts(
    run: Callable[..., Any], fleet: Any, handler: Any, signer: TokenSigner, silent: bool
) -> None:
    """``silent``: the first access point vanishes without closing its connections (as a
    crash): the leader only learns it when the new one does not answer its pushHello."""
    ingest = MemoryIngest(signer)  # survives the "restart", as the SQLite store does
    token = signer.issue_user("alice", scopes=["exec"])
    names = ["s-restart-a", "s-restart-b", "s-restart-c"]

    async def body() -> None:
        first = make_server(fleet, handler, ingest)
        port = await first.start()
        connection = make_connection(fleet, port, answer_timeout_s=0.5)
        async with running(connection):
            sessions = [connection.open_session(token=token, session_id=n) for n in names]
            for session in sessions:
                for event in notes(0, 200):
                    session.emit(event)
            for session in sessions:
                await session.wait_for(lambda s: s.sender.acked_lseq >= 50, 10.0)
            if silent:
                quic_server = first._quic_server
                assert quic_server is not None
                # Gone, without a CONNECTION_CLOSE: the port is free, and what the old
                # connections still want to send goes nowhere.
                quic_server._transport.close()
                for proto in set(quic_server._protocols.values()):
                    proto._transport = _Blackhole()
            else:
                await first.close("restart")
            # Emitted while the access point is down: queued, never blocking.
            for session in sessions:
                for event in notes(200, 400):
                    session.emit(event)
            second = make_server(fleet, handler, ingest)
            await start_when_free(second, port)
            try:
                if silent:
                    # Idle sessions: only a new one tells the leader that the peer is gone.
                    late = connection.open_session(token=token, session_id="s-restart-late")
                    late.emit(notes(0, 1)[0])
                    sessions.append(late)
                for session in sessions:
                    assert await session.flush(20.0), (session.status, connection.status)
                for session in sessions[:3]:
                    assert session.status.sessions == 2, session.status.history
                if silent:  # its first stream went unanswered; its second was welcomed
                    assert sessions[3].status.attempts == 2, sessions[3].status.history
                    assert sessions[3].status.sessions == 1
                assert connection.status.connections == 2, connection.status.history
            finally:
                await second.close()
                if silent:
                    with contextlib.suppress(Exception):
                        await first.close("test over")

    run(body())
    for name in names:
        assert ingest.messages(name) == [f"n{i}" for i in range(400)]
    if silent:
        assert ingest.messages("s-restart-late") == ["n0"]


async def _raw_push(port: int, alpn: str, frames: list[PushMessage]) -> list[PushMessage]:
    """Send ``frames`` on one push stream as a hand-made leader would; what comes back until
    the access point ends the stream."""
    config = QuicConfiguration(is_client=True, alpn_protocols=[alpn])
    config.verify_mode = ssl.CERT_NONE
    async with connect("127.0.0.1", port, configuration=config) as proto:
        reader, writer = await proto.create_stream()
        writer.write(b"".join(encode_frame(frame) for frame in frames))
        decoder = FrameDecoder[PushMessage](PushMessage)
        answers: list[PushMessage] = []
        async with asyncio.timeout(10.0):
            while chunk := await reader.read(65536):
                answers += decoder.feed(chunk)
        return answers


@pytest.mark.parametrize(
    ("alpn", "data", "error"),
    [
        (
            LEADER_ALPN,
            zlib.compress(msgspec.msgpack.encode(notes(0, 1))),
            "pushBatchZ needs ah-leader/2",
        ),
        (LEADER_ALPN_V2, zlib.compress(bytes(8 << 20), 9), "expands beyond 1048576 bytes"),
        (LEADER_ALPN_V2, b"\x78garbage", "not zlib"),
    ],
    ids=["on-v1", "bomb", "garbage"],
)
def test_a_compressed_batch_the_access_point_cannot_take_is_refused_by_name(
    run: Callable[..., Any],
    fleet: Any,
    handler: Any,
    signer: TokenSigner,
    alpn: str,
    data: bytes,
    error: str,
) -> None:
    ingest = MemoryIngest(signer)
    hello = PushHello(
        token=signer.issue_user("alice", scopes=["exec"]),
        session_id="s-raw-1",
        producer="raw",
        protocol_version=PUSH_PROTOCOL_VERSION,
    )

    async def body() -> list[PushMessage]:
        async with make_server(fleet, handler, ingest) as server:
            port = await server.start()
            batch = PushBatchZ(first_lseq=1, count=1, data=data)
            return await _raw_push(port, alpn, [hello, batch])

    answers = run(body())
    assert [type(a).__name__ for a in answers] == ["PushWelcome", "PushRefused"]
    refused = answers[-1]
    assert isinstance(refused, PushRefused) and refused.code is PushRefusal.INVALID
    assert error in refused.message
    assert ingest.messages("s-raw-1") == []
