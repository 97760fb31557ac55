"""Access-point QUIC costs that grow with the fleet: the server's connection-id map and ACKs.

* aioquic's server closes a connection by scanning its whole id map; `_ProtocolsByCid` removes
  the closed connection's ids through a reverse index. Whatever sequence of operations the
  server performs, the map must hold exactly what the plain dict with the scan would hold, and
  with real followers coming and going over UDP it must end up empty.
* A reply written while handling a request's packet must carry that packet's ACK instead of
  leaving it for a separate datagram a millisecond later (`_ack_with_next_packet`).
"""

from __future__ import annotations

import asyncio
import random
import ssl
from typing import Any, cast

from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.quic import events
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.tls import Epoch
from hypothesis import given
from hypothesis import strategies as st

from ah_connectivity import ALPN, Backoff, ControlClient, ControlServer
from ah_connectivity.quic import _ack_with_next_packet, _ProtocolsByCid
from ah_domain_types import ControlMessage, StreamError, StreamErrorCode

PROTOCOLS = [cast(QuicConnectionProtocol, object()) for _ in range(4)]
CIDS = [bytes([i]) * 8 for i in range(12)]

operation = st.one_of(
    st.tuples(st.just("set"), st.sampled_from(CIDS), st.sampled_from(range(len(PROTOCOLS)))),
    st.tuples(st.just("del"), st.sampled_from(CIDS), st.just(0)),
    st.tuples(st.just("terminate"), st.just(b""), st.sampled_from(range(len(PROTOCOLS)))),
    st.tuples(st.just("clear"), st.just(b""), st.just(0)),
)


@given(st.lists(operation, max_size=80))
def test_matches_the_scanning_map(operations: list[tuple[str, bytes, int]]) -> None:
    indexed = _ProtocolsByCid()
    plain: dict[bytes, Any] = {}
    for kind, cid, which in operations:
        protocol = PROTOCOLS[which]
        if kind == "set":
            indexed[cid] = protocol
            plain[cid] = protocol
        elif kind == "del":
            # QuicServer only retires ids it holds (it asserts so first).
            if cid in plain:
                del indexed[cid]
                del plain[cid]
        elif kind == "terminate":
            indexed.forget(protocol)
            for key, value in list(plain.items()):  # aioquic's QuicServer._connection_terminated
                if value is protocol:
                    del plain[key]
        else:
            indexed.clear()
            plain.clear()
        assert dict(indexed) == plain
    # The reverse index holds exactly the live ids, and nothing for a protocol without any.
    for protocol in PROTOCOLS:
        assert indexed._cids.get(protocol, set()) == {c for c, p in plain.items() if p is protocol}
    assert all(indexed._cids.values())


async def _no_rpc(msg: ControlMessage) -> ControlMessage:
    return StreamError(code=StreamErrorCode.UNEXPECTED_MESSAGE, message="no RPCs here")


def test_server_forgets_every_id_of_closed_connections(
    fleet: Any, handler: Any, follower_info: Any, run: Any
) -> None:
    async def body() -> None:
        server = ControlServer(
            identity=fleet.server,
            ca=fleet.ca,
            trust_domain=fleet.trust_domain,
            handler=handler,
            heartbeat_interval_ms=50,
        )
        async with server:
            port = await server.start()
            quic_server = server._quic_server
            assert quic_server is not None
            ids = quic_server._protocols
            assert isinstance(ids, _ProtocolsByCid)
            clients = [
                ControlClient(
                    host="127.0.0.1",
                    port=port,
                    identity=fleet.follower(f"web-{i}"),
                    ca=fleet.ca.cert,
                    trust_domain=fleet.trust_domain,
                    info=follower_info(f"web-{i}"),
                    on_rpc=_no_rpc,
                    backoff=Backoff(base_s=0.05, cap_s=0.3, rng=random.Random(i)),
                )
                for i in range(3)
            ]
            tasks = [asyncio.create_task(c.run()) for c in clients]
            for client in clients:
                await client.wait_connected(5)
                await client.wait_for(lambda c: c.rtt_ms is not None, 5)
            # Each connection is known by its original id plus every id it was issued.
            assert len({id(p) for p in ids.values()}) == 3
            assert len(ids) > 3
            for client in clients:
                await client.stop()
            await asyncio.gather(*tasks)
            await handler.wait_for(lambda: len(handler.of("disconnected")) == 3)
            async with asyncio.timeout(5):
                while ids:  # closes end after the draining period (3 PTOs)
                    await asyncio.sleep(0.02)
            assert ids._cids == {}

    run(body())


def _in_memory_pair(fleet: Any) -> tuple[QuicConnection, QuicConnection, float]:
    """A client and a server QuicConnection with a completed handshake, datagrams carried by
    hand on a fake clock."""
    server_config = QuicConfiguration(is_client=False, alpn_protocols=[ALPN])
    server_config.certificate, server_config.private_key = fleet.server.cert, fleet.server.key
    client_config = QuicConfiguration(is_client=True, alpn_protocols=[ALPN])
    client_config.verify_mode = ssl.CERT_NONE
    client = QuicConnection(configuration=client_config)
    server = QuicConnection(
        configuration=server_config,
        original_destination_connection_id=client.original_destination_connection_id,
    )
    now = 1.0
    client.connect(("127.0.0.1", 4433), now=now)
    for _ in range(20):  # to and fro until nothing moves, delayed ACKs included
        now += 0.05
        moved = _carry(client, server, now) + _carry(server, client, now)
        if not moved and _handshake_done(client):
            break
    assert _handshake_done(client)
    return client, server, now


def _carry(source: QuicConnection, target: QuicConnection, now: float) -> int:
    datagrams = source.datagrams_to_send(now=now)
    for data, _ in datagrams:
        target.receive_datagram(data, ("127.0.0.1", 4433), now=now)
    return len(datagrams)


def _handshake_done(conn: QuicConnection) -> bool:
    done = False
    while (event := conn.next_event()) is not None:
        done = done or isinstance(event, events.HandshakeCompleted)
    return done or conn._handshake_complete


def test_reply_carries_the_ack_of_the_request(fleet: Any) -> None:
    client, server, now = _in_memory_pair(fleet)
    client.send_stream_data(0, b"heartbeat")
    assert _carry(client, server, now) == 1
    space = server._spaces[Epoch.ONE_RTT]
    assert space.ack_at is not None  # the request is waiting to be acknowledged

    server.send_stream_data(0, b"ack")
    _ack_with_next_packet(server, now)
    sent = server.datagrams_to_send(now=now)

    assert len(sent) == 1  # one datagram: the reply with the ACK inside
    assert space.ack_at is None  # nothing left to acknowledge on its own
    assert server.get_timer() is None or server.get_timer() > now + 0.002


def test_ack_is_left_alone_when_none_is_pending(fleet: Any) -> None:
    _, server, now = _in_memory_pair(fleet)
    space = server._spaces[Epoch.ONE_RTT]
    assert space.ack_at is None
    _ack_with_next_packet(server, now)
    assert space.ack_at is None
    _ack_with_next_packet(QuicConnection(configuration=QuicConfiguration(is_client=True)), now)
