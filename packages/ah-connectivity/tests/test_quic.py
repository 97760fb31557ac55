"""The QUIC shells over real UDP sockets on 127.0.0.1 (port 0), with real mutual TLS.

Misbehaving peers are plain aioquic connections that write raw bytes, so every protocol
violation really crosses the wire.
"""

from __future__ import annotations

import asyncio
import errno
import random
import ssl
from collections import defaultdict
from collections.abc import Callable
from typing import Any, cast

import pytest
from aioquic.asyncio.client import connect
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.asyncio.server import serve
from aioquic.quic import events
from aioquic.quic.configuration import QuicConfiguration
from cryptography.hazmat.primitives import serialization

from ah_connectivity import (
    ALPN,
    Backoff,
    ControlClient,
    ControlServer,
    FleetCA,
    FrameDecoder,
    FrameError,
    Identity,
    RpcError,
    encode_frame,
    issue_server_cert,
)
from ah_domain_types import (
    ControlMessage,
    ExecRequest,
    ExecResult,
    FollowerHealth,
    FollowerInfo,
    Goodbye,
    Heartbeat,
    Hello,
    StreamError,
    StreamErrorCode,
    Welcome,
)

GARBAGE = b"\x00\x00\x00\x05\xc1\xc1\xc1\xc1\xc1"  # a 5-byte frame of invalid msgpack
OVERSIZED = b"\x00\x20\x00\x00" + b"\x00" * 64  # announces 2 MiB, over the 1 MiB limit
BAD_FRAMES = [
    pytest.param(GARBAGE, StreamErrorCode.MALFORMED_FRAME, id="garbage"),
    pytest.param(OVERSIZED, StreamErrorCode.FRAME_TOO_LARGE, id="oversized"),
]


async def echo_rpc(msg: ControlMessage) -> ControlMessage:
    if isinstance(msg, ExecRequest):
        return ExecResult(
            request_id=msg.request_id,
            exit_code=0,
            stdout=" ".join(msg.command),
            stderr="",
            took_ms=0,
        )
    return StreamError(
        code=StreamErrorCode.UNEXPECTED_MESSAGE, message=f"cannot serve {type(msg).__name__}"
    )


def make_server(
    fleet: Any, handler: Any, identity: Identity | None = None, **kw: Any
) -> ControlServer:
    # 1 s heartbeats (3 s to declare a follower gone): a loaded CI machine must not end the
    # connections of tests that are not about liveness. Liveness tests ask for 100 ms.
    params: dict[str, Any] = {"heartbeat_interval_ms": 1000, **kw}
    return ControlServer(
        identity=identity or fleet.server,
        ca=fleet.ca,
        trust_domain=fleet.trust_domain,
        handler=handler,
        **params,
    )


def make_client(
    fleet: Any,
    port: int,
    identity: Identity,
    info: FollowerInfo,
    on_rpc: Callable[[ControlMessage], Any] = echo_rpc,
    **kw: Any,
) -> ControlClient:
    params: dict[str, Any] = {
        "backoff": Backoff(base_s=0.05, cap_s=0.3, rng=random.Random(4)),
        "connect_timeout_s": 1.0,
        **kw,
    }
    return ControlClient(
        host="127.0.0.1",
        port=port,
        identity=identity,
        ca=fleet.ca.cert,
        trust_domain=fleet.trust_domain,
        info=info,
        on_rpc=on_rpc,
        **params,
    )


class RawPeer(QuicConnectionProtocol):
    """An aioquic connection that records everything and writes whatever the test says."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.received: dict[int, bytearray] = defaultdict(bytearray)
        self.new_streams: list[int] = []
        self.fin: set[int] = set()
        self.stopped: dict[int, int] = {}
        self.reset: dict[int, int] = {}
        self.terminated: events.ConnectionTerminated | None = None
        self._changed = asyncio.Event()

    def quic_event_received(self, event: events.QuicEvent) -> None:
        if isinstance(event, events.StreamDataReceived):
            if event.stream_id not in self.received:
                self.new_streams.append(event.stream_id)
            self.received[event.stream_id] += event.data
            if event.end_stream:
                self.fin.add(event.stream_id)
        elif isinstance(event, events.StopSendingReceived):
            self.stopped[event.stream_id] = event.error_code
        elif isinstance(event, events.StreamReset):
            self.reset[event.stream_id] = event.error_code
        elif isinstance(event, events.ConnectionTerminated):
            self.terminated = event
        self._changed.set()
        self._changed = asyncio.Event()

    def send(self, sid: int, data: bytes, end: bool = False) -> None:
        self._quic.send_stream_data(sid, data, end_stream=end)
        self.transmit()

    def open_stream(self) -> int:
        return self._quic.get_next_available_stream_id()

    def messages(self, sid: int) -> list[Any]:
        decoder = FrameDecoder[ControlMessage](ControlMessage)
        try:
            return decoder.feed(bytes(self.received.get(sid, b"")))
        except FrameError as exc:
            return exc.messages

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 5.0) -> None:
        async with asyncio.timeout(timeout):
            while not predicate():
                await self._changed.wait()


def pem(ca: FleetCA) -> bytes:
    return ca.cert.public_bytes(serialization.Encoding.PEM)


def raw_client_config(fleet: Any, identity: Identity) -> QuicConfiguration:
    config = QuicConfiguration(is_client=True, alpn_protocols=[ALPN], server_name="localhost")
    config.certificate, config.private_key = identity.cert, identity.key
    config.load_verify_locations(cadata=pem(fleet.ca))
    return config


async def raw_follower_hello(raw: RawPeer, info: FollowerInfo) -> None:
    raw.send(0, encode_frame(Hello(info=info, protocol_version=1)))
    await raw.wait_for(lambda: any(isinstance(m, Welcome) for m in raw.messages(0)))


def test_handshake_hello_welcome_heartbeat_ack(
    fleet: Any, handler: Any, follower_info: Any, run: Any
) -> None:
    async def body() -> None:
        async with make_server(fleet, handler, heartbeat_interval_ms=100) as server:
            port = await server.start()
            client = make_client(fleet, port, fleet.follower("web-1"), follower_info("web-1"))
            task = asyncio.create_task(client.run())
            welcome = await client.wait_connected(5)
            assert welcome == Welcome(
                follower="web-1", heartbeat_interval_ms=100, server_version="0.1.0"
            )
            await client.wait_for(lambda c: c.rtt_ms is not None, 5)
            await handler.wait_for(
                lambda: (
                    len([m for m in handler.of("message", "web-1") if isinstance(m, Heartbeat)])
                    >= 3
                )
            )
            conn = handler.conns["web-1"]
            assert conn.info == follower_info("web-1")
            assert conn.spiffe_id == "spiffe://test.fleet/ah/agent/web-1"
            assert conn.health() is FollowerHealth.HEALTHY and conn.connected
            assert server.follower("web-1") is conn
            assert isinstance(handler.of("message", "web-1")[0], Hello)
            assert handler.of("health", "web-1") == [FollowerHealth.HEALTHY]
            seqs = [m.seq for m in handler.of("message", "web-1") if isinstance(m, Heartbeat)]
            assert seqs == list(range(1, len(seqs) + 1))
            await client.stop("maintenance")
            await task
            await handler.wait_for(lambda: bool(handler.of("disconnected", "web-1")))
            assert handler.of("disconnected", "web-1") == [
                "follower 'web-1' said goodbye: maintenance"
            ]
            assert Goodbye(reason="maintenance") in handler.of("message", "web-1")
            assert handler.of("health", "web-1")[-1] is FollowerHealth.OFFLINE
            assert server.followers == {} and client.attempts == 1

    run(body())


def test_twenty_concurrent_rpcs(fleet: Any, handler: Any, follower_info: Any, run: Any) -> None:
    async def body() -> None:
        in_flight = 0
        peak = 0
        all_in = asyncio.Event()

        async def slow_echo(msg: ControlMessage) -> ControlMessage:
            nonlocal in_flight, peak
            in_flight += 1
            peak = max(peak, in_flight)
            if in_flight == 20:
                all_in.set()
            await all_in.wait()  # nobody answers until all 20 requests are being served
            in_flight -= 1
            return await echo_rpc(msg)

        async with make_server(fleet, handler) as server:
            port = await server.start()
            client = make_client(
                fleet, port, fleet.follower("web-1"), follower_info("web-1"), on_rpc=slow_echo
            )
            task = asyncio.create_task(client.run())
            await client.wait_connected(5)
            await handler.wait_for(lambda: "web-1" in handler.conns)
            conn = handler.conns["web-1"]
            replies = await asyncio.gather(
                *(
                    conn.open_rpc(
                        ExecRequest(request_id=str(i), command=["echo", str(i)]), timeout=5
                    )
                    for i in range(20)
                )
            )
            assert [(r.request_id, r.stdout) for r in replies] == [
                (str(i), f"echo {i}") for i in range(20)
            ]
            assert peak == 20
            refused = ExecResult(request_id="x", exit_code=0, stdout="", stderr="", took_ms=0)
            with pytest.raises(RpcError, match="cannot serve ExecResult") as info:
                await conn.open_rpc(refused, timeout=5)
            assert info.value.code == StreamErrorCode.UNEXPECTED_MESSAGE
            await client.stop()
            await task

    run(body())


def test_follower_certificate_from_another_ca_is_refused(
    fleet: Any, handler: Any, follower_info: Any, run: Any
) -> None:
    async def body() -> None:
        rogue_ca = FleetCA.generate(fleet.trust_domain)
        async with make_server(fleet, handler) as server:
            port = await server.start()
            rogue = make_client(
                fleet, port, fleet.follower("web-1", ca=rogue_ca), follower_info("web-1")
            )
            task = asyncio.create_task(rogue.run())
            await rogue.wait_for(lambda c: c.attempts >= 2 and c.last_error is not None, 10)
            assert "certificate not issued by this fleet CA" in (rogue.last_error or "")
            assert rogue.sessions == 0
            await rogue.stop()
            await task
            # The server keeps serving legitimate followers.
            good = make_client(fleet, port, fleet.follower("web-2"), follower_info("web-2"))
            good_task = asyncio.create_task(good.run())
            await good.wait_connected(5)
            await good.stop()
            await good_task
            assert [n for k, n, _ in handler.events if k == "connected"] == ["web-2"]

    run(body())


def test_hello_naming_another_follower_is_refused(
    fleet: Any, handler: Any, follower_info: Any, run: Any
) -> None:
    async def body() -> None:
        async with make_server(fleet, handler) as server:
            port = await server.start()
            # A valid certificate for web-1 that claims to be web-2 in its Hello.
            liar = make_client(fleet, port, fleet.follower("web-1"), follower_info("web-2"))
            task = asyncio.create_task(liar.run())
            await liar.wait_for(lambda c: c.last_error is not None, 10)
            assert "name mismatch: certificate names follower 'web-1', Hello names 'web-2'" in (
                liar.last_error or ""
            )
            assert liar.sessions == 0
            await liar.stop()
            await task
            assert handler.of("connected") == []

    run(body())


def test_client_refuses_a_server_without_the_serve_identity(
    fleet: Any, handler: Any, follower_info: Any, run: Any
) -> None:
    async def body() -> None:
        impostor = issue_server_cert(fleet.ca, spiffe_id="spiffe://test.fleet/ah/agent/impostor")
        async with make_server(fleet, handler, identity=impostor) as server:
            port = await server.start()
            client = make_client(fleet, port, fleet.follower("web-1"), follower_info("web-1"))
            task = asyncio.create_task(client.run())
            await client.wait_for(lambda c: c.last_error is not None, 10)
            assert (
                "expected spiffe://test.fleet/ah/serve, got spiffe://test.fleet/ah/agent/impostor"
                in (client.last_error or "")
            )
            assert client.sessions == 0
            await client.stop()
            await task
            assert handler.events == []  # not even a Hello went out

    run(body())


@pytest.mark.parametrize(("bad", "code"), BAD_FRAMES)
def test_bad_frame_on_the_control_stream_closes_only_that_stream(
    fleet: Any, handler: Any, follower_info: Any, run: Any, bad: bytes, code: int
) -> None:
    async def body() -> None:
        async with make_server(fleet, handler) as server:
            port = await server.start()
            good = make_client(fleet, port, fleet.follower("good"), follower_info("good"))
            good_task = asyncio.create_task(good.run())
            await good.wait_connected(5)
            ident = fleet.follower("bad")
            async with connect(
                "127.0.0.1",
                port,
                configuration=raw_client_config(fleet, ident),
                create_protocol=RawPeer,
            ) as proto:
                raw = cast(RawPeer, proto)
                await raw_follower_hello(raw, follower_info("bad"))
                await handler.wait_for(lambda: "bad" in handler.conns)
                raw.send(0, bad)
                await raw.wait_for(lambda: 0 in raw.stopped and 0 in raw.fin)
                assert raw.stopped[0] == code
                error = raw.messages(0)[-1]
                assert isinstance(error, StreamError) and error.code == code
                await handler.wait_for(lambda: bool(handler.of("disconnected", "bad")))
                # The connection itself survives.
                await asyncio.wait_for(raw.ping(), 5)
                assert raw.terminated is None
            # ... and the server keeps serving the other follower.
            beats = len(handler.of("message", "good"))
            await handler.wait_for(lambda: len(handler.of("message", "good")) >= beats + 2)
            reply = await handler.conns["good"].open_rpc(
                ExecRequest(request_id="1", command=["ok"]), timeout=5
            )
            assert isinstance(reply, ExecResult) and reply.stdout == "ok"
            assert good.sessions == 1
            await good.stop()
            await good_task

    run(body())


@pytest.mark.parametrize(("bad", "code"), BAD_FRAMES)
def test_bad_rpc_reply_closes_only_that_stream(
    fleet: Any, handler: Any, follower_info: Any, run: Any, bad: bytes, code: int
) -> None:
    async def body() -> None:
        async with make_server(fleet, handler) as server:
            port = await server.start()
            ident = fleet.follower("bad")
            async with connect(
                "127.0.0.1",
                port,
                configuration=raw_client_config(fleet, ident),
                create_protocol=RawPeer,
            ) as proto:
                raw = cast(RawPeer, proto)
                await raw_follower_hello(raw, follower_info("bad"))
                await handler.wait_for(lambda: "bad" in handler.conns)
                conn = handler.conns["bad"]
                rpc = asyncio.ensure_future(
                    conn.open_rpc(ExecRequest(request_id="1", command=["x"]), timeout=5)
                )
                await raw.wait_for(lambda: len(raw.new_streams) == 2)  # control + the RPC
                sid = raw.new_streams[1]
                assert (
                    raw.messages(sid) == [ExecRequest(request_id="1", command=["x"])]
                    and sid in raw.fin
                )
                raw.send(sid, bad)
                with pytest.raises(RpcError) as info:
                    await rpc
                assert info.value.code == code
                await raw.wait_for(lambda: sid in raw.stopped)
                assert raw.stopped[sid] == code
                # Same connection, next RPC: fine.
                rpc2 = asyncio.ensure_future(
                    conn.open_rpc(ExecRequest(request_id="2", command=["y"]), timeout=5)
                )
                await raw.wait_for(lambda: len(raw.new_streams) == 3)
                sid2 = raw.new_streams[2]
                answer = ExecResult(request_id="2", exit_code=0, stdout="y", stderr="", took_ms=1)
                raw.send(sid2, encode_frame(answer), end=True)
                assert await rpc2 == answer
                assert conn.connected and raw.terminated is None

    run(body())


@pytest.mark.parametrize(("bad", "code"), BAD_FRAMES)
def test_follower_survives_bad_frames_from_the_access_point(
    fleet: Any, follower_info: Any, run: Any, bad: bytes, code: int
) -> None:
    async def body() -> None:
        peers: list[RawPeer] = []
        arrived = asyncio.Event()

        def create(*args: Any, **kwargs: Any) -> RawPeer:
            peer = RawPeer(*args, **kwargs)
            peers.append(peer)
            arrived.set()
            return peer

        config = QuicConfiguration(is_client=False, alpn_protocols=[ALPN])
        config.certificate, config.private_key = fleet.server.cert, fleet.server.key
        raw_server = await serve("127.0.0.1", 0, configuration=config, create_protocol=create)
        try:
            assert raw_server._transport is not None
            port = raw_server._transport.get_extra_info("sockname")[1]
            # This access point never answers Goodbye: do not wait long for it on stop().
            client = make_client(
                fleet, port, fleet.follower("web-1"), follower_info("web-1"), goodbye_timeout_s=0.1
            )
            task = asyncio.create_task(client.run())
            await asyncio.wait_for(arrived.wait(), 5)
            ap = peers[0]
            await ap.wait_for(lambda: any(isinstance(m, Hello) for m in ap.messages(0)))
            ap.send(
                0,
                encode_frame(
                    Welcome(follower="web-1", heartbeat_interval_ms=60_000, server_version="raw")
                ),
            )
            await client.wait_connected(5)
            sid = ap.open_stream()
            ap.send(sid, bad)
            await ap.wait_for(lambda: sid in ap.stopped and sid in ap.fin)
            assert ap.stopped[sid] == code
            assert ap.messages(sid)[-1].code == code
            sid2 = ap.open_stream()
            ap.send(
                sid2, encode_frame(ExecRequest(request_id="r", command=["still", "here"])), end=True
            )
            await ap.wait_for(lambda: sid2 in ap.fin)
            assert ap.messages(sid2) == [
                ExecResult(request_id="r", exit_code=0, stdout="still here", stderr="", took_ms=0)
            ]
            assert client.connected and client.attempts == 1 and client.sessions == 1
            await client.stop()
            await task
        finally:
            raw_server.close()

    run(body())


def test_silent_follower_turns_unhealthy(
    fleet: Any, handler: Any, follower_info: Any, run: Any
) -> None:
    async def body() -> None:
        async with make_server(fleet, handler, heartbeat_interval_ms=100) as server:
            port = await server.start()
            ident = fleet.follower("quiet")
            async with connect(
                "127.0.0.1",
                port,
                configuration=raw_client_config(fleet, ident),
                create_protocol=RawPeer,
            ) as proto:
                raw = cast(RawPeer, proto)
                await raw_follower_hello(raw, follower_info("quiet"))
                await handler.wait_for(
                    lambda: FollowerHealth.UNHEALTHY in handler.of("health", "quiet"), 5
                )
                assert handler.conns["quiet"].health() is FollowerHealth.UNHEALTHY
                raw.send(0, encode_frame(Heartbeat(seq=1, sent_ms=0)))
                await handler.wait_for(
                    lambda: handler.of("health", "quiet")[-1] is FollowerHealth.HEALTHY, 5
                )
            await handler.wait_for(
                lambda: handler.of("health", "quiet")[-1] is FollowerHealth.OFFLINE, 5
            )
            assert handler.of("health", "quiet") == [
                FollowerHealth.HEALTHY,
                FollowerHealth.UNHEALTHY,
                FollowerHealth.HEALTHY,
                FollowerHealth.OFFLINE,
            ]

    run(body())


def test_client_reconnects_after_server_restart_on_the_same_port(
    fleet: Any, handler: Any, follower_info: Any, run: Any
) -> None:
    async def body() -> None:
        first = make_server(fleet, handler, heartbeat_interval_ms=100)
        port = await first.start()
        reasons: list[str] = []
        client = make_client(
            fleet,
            port,
            fleet.follower("web-1"),
            follower_info("web-1"),
            connect_timeout_s=0.5,
            on_disconnected=reasons.append,
        )
        task = asyncio.create_task(client.run())
        await client.wait_connected(5)
        await first.close("restarting")
        await client.wait_for(lambda c: bool(reasons), 5)
        assert reasons[0] == "access point said goodbye: restarting"
        # While the access point is down, attempts keep failing (and back off).
        await client.wait_for(lambda c: c.attempts >= 3, 10)
        assert client.sessions == 1 and client.backoff.attempts >= 2
        second_handler = type(handler)()
        second = make_server(fleet, second_handler, heartbeat_interval_ms=100)
        # The closed server's UDP socket goes away on a later loop turn: bind when it is free.
        async with asyncio.timeout(5):
            while True:
                try:
                    assert await second.start(port=port) == port
                    break
                except OSError as exc:
                    if exc.errno != errno.EADDRINUSE:
                        raise
                    await asyncio.sleep(0.01)  # retry the bind, bounded by the timeout above
        try:
            await client.wait_for(lambda c: c.connected and c.sessions == 2, 10)
            await second_handler.wait_for(lambda: "web-1" in second_handler.conns)
            reply = await second_handler.conns["web-1"].open_rpc(
                ExecRequest(request_id="1", command=["back"]), timeout=5
            )
            assert isinstance(reply, ExecResult) and reply.stdout == "back"
            assert client.backoff.attempts == 0  # reset by the successful session
            await client.stop()
            await task
        finally:
            await second.close()

    run(body(), timeout=30)


def test_server_requires_client_certificates(fleet: Any, handler: Any, run: Any) -> None:
    async def body() -> None:
        async with make_server(fleet, handler) as server:
            port = await server.start()
            config = QuicConfiguration(
                is_client=True, alpn_protocols=[ALPN], server_name="localhost"
            )
            config.load_verify_locations(cadata=pem(fleet.ca))
            config.verify_mode = ssl.CERT_REQUIRED
            async with connect(
                "127.0.0.1", port, configuration=config, create_protocol=RawPeer
            ) as proto:
                raw = cast(RawPeer, proto)
                await raw.wait_for(lambda: raw.terminated is not None, 5)
                assert raw.terminated is not None
                assert "presented no certificate" in raw.terminated.reason_phrase
            assert handler.events == []

    run(body())


def test_connection_without_hello_is_hung_up(fleet: Any, handler: Any, run: Any) -> None:
    async def body() -> None:
        async with make_server(
            fleet, handler, hello_timeout_ms=150, goodbye_timeout_s=0.1
        ) as server:
            port = await server.start()
            ident = fleet.follower("mute")
            async with connect(
                "127.0.0.1",
                port,
                configuration=raw_client_config(fleet, ident),
                create_protocol=RawPeer,
            ) as proto:
                raw = cast(RawPeer, proto)
                await raw.wait_for(lambda: raw.terminated is not None, 5)
                assert raw.terminated is not None
                assert "no Hello from 'mute' within 150 ms" in raw.terminated.reason_phrase
            assert handler.events == []

    run(body())
