"""The real daemon's QUIC control plane, driven by in-process clients over real UDP.

Followers are enrolled through the daemon's own REST API; misbehaving peers are plain aioquic
connections writing raw bytes, so every violation really crosses the wire.
"""

from __future__ import annotations

import asyncio
import json
import random
import urllib.request
from collections import defaultdict
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar, cast

import pytest
from aioquic.asyncio.client import connect
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.quic import events
from aioquic.quic.configuration import QuicConfiguration
from cryptography import x509

from ah_connectivity import (
    ALPN,
    Backoff,
    ControlClient,
    FleetCA,
    FrameDecoder,
    FrameError,
    Identity,
    encode_frame,
    generate_private_key,
    issue_from_csr,
    make_csr,
    spiffe_id_for_follower,
)
from ah_domain_types import (
    ControlMessage,
    ExecRequest,
    ExecResult,
    FollowerInfo,
    Hello,
    OsKind,
    Resources,
    StreamError,
    StreamErrorCode,
    Welcome,
)
from ah_harness_local import wait_for

T = TypeVar("T")

GARBAGE = b"\x00\x00\x00\x05\xc1\xc1\xc1\xc1\xc1"  # a 5-byte frame of invalid msgpack
OVERSIZED = b"\x00\x20\x00\x00" + b"\x00" * 64  # announces 2 MiB, over the 1 MiB limit


def run(coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
    async def bounded() -> T:
        async with asyncio.timeout(timeout):
            return await coro

    return asyncio.run(bounded())


def info(name: str) -> FollowerInfo:
    return FollowerInfo(
        name=name,
        os=OsKind.LINUX,
        arch="x86_64",
        tags={"kind": "in-process"},
        resources=Resources(cpus=1, memory_mb=64),
        host_key_fingerprint="SHA256:aW4tcHJvY2Vzcw",
        direct_address=None,
        workspace="/nowhere",
        version="0.1.0",
    )


def enroll(ap: Any, name: str) -> Identity:
    """Enroll `name` through POST /api/v1/enroll with a fresh token; its new identity."""
    key = generate_private_key()
    token = ap.state.signer.issue_enroll(name, ca_fingerprint=ap.state.ca.fingerprint)
    body = {"token": token, "name": name, "csrPem": make_csr(key, name).decode(), "tags": {}}
    request = urllib.request.Request(
        f"{ap.api_url}/api/v1/enroll",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, context=ap.ssl_context(), timeout=10) as response:
        answer = json.loads(response.read())
    assert answer["accessPointQuic"] == f"127.0.0.1:{ap.quic_port}"
    return Identity(key=key, cert=x509.load_pem_x509_certificate(answer["certificatePem"].encode()))


def api(ap: Any, method: str, path: str, body: object = None) -> Any:
    request = urllib.request.Request(
        f"{ap.api_url}/api/v1{path}",
        data=None if body is None else json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {ap.user_token()}", "Content-Type": "application/json"},
        method=method,
    )
    with urllib.request.urlopen(request, context=ap.ssl_context(), timeout=10) as response:
        return json.loads(response.read())


async def answer_exec(msg: ControlMessage) -> ControlMessage:
    assert isinstance(msg, ExecRequest)
    return ExecResult(
        request_id=msg.request_id, exit_code=0, stdout="in-process " + " ".join(msg.command),
        stderr="", took_ms=0,
    )  # fmt: skip


def client(ap: Any, identity: Identity, hello: FollowerInfo) -> ControlClient:
    return ControlClient(
        host="127.0.0.1",
        port=ap.quic_port,
        identity=identity,
        ca=ap.state.ca.cert,
        trust_domain=ap.state.trust_domain,
        info=hello,
        on_rpc=answer_exec,
        backoff=Backoff(base_s=0.05, cap_s=0.2, rng=random.Random(7)),
        connect_timeout_s=2.0,
    )


async def await_in_thread(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    await asyncio.to_thread(wait_for, predicate, timeout, 0.05, what)


def test_foreign_ca_wrong_name_and_unenrolled_certificates_are_refused(serving_ap: Any) -> None:
    ap = serving_ap
    good_identity = enroll(ap, "cp-good")
    alpha_identity = enroll(ap, "cp-alpha")
    foreign_ca = FleetCA.generate(ap.state.trust_domain)  # same trust domain, other CA
    foreign_key = generate_private_key()
    foreign = Identity(
        key=foreign_key,
        cert=issue_from_csr(
            foreign_ca,
            make_csr(foreign_key, "cp-good"),
            spiffe_id_for_follower(ap.state.trust_domain, "cp-good"),
        ),
    )
    ghost_key = generate_private_key()  # a real CA certificate for a name never enrolled
    ghost = Identity(
        key=ghost_key,
        cert=issue_from_csr(
            ap.state.ca,
            make_csr(ghost_key, "cp-ghost"),
            spiffe_id_for_follower(ap.state.trust_domain, "cp-ghost"),
        ),
    )

    async def body() -> None:
        good = client(ap, good_identity, info("cp-good"))
        rogues = {
            "foreign": client(ap, foreign, info("cp-good")),
            "wrong-name": client(ap, alpha_identity, info("cp-beta")),
            "ghost": client(ap, ghost, info("cp-ghost")),
        }
        tasks = [asyncio.create_task(c.run()) for c in [good, *rogues.values()]]
        try:
            await good.wait_connected(10)
            for rogue in rogues.values():
                await rogue.wait_for(lambda c: c.attempts >= 2 and c.last_error is not None, 15)
            assert [r.sessions for r in rogues.values()] == [0, 0, 0]
            assert "certificate not issued by this fleet CA" in (rogues["foreign"].last_error or "")
            assert "name mismatch" in (rogues["wrong-name"].last_error or "")
            assert "is not enrolled" in (rogues["ghost"].last_error or "")
            listed = {
                f["info"]["name"]: f["health"] for f in api(ap, "GET", "/followers")["followers"]
            }
            assert listed.get("cp-good") == "healthy"
            assert "cp-beta" not in listed and "cp-ghost" not in listed
            assert good.sessions == 1, "refusing others must not disturb a connected follower"
        finally:
            for c in [good, *rogues.values()]:
                await c.stop()
            await asyncio.gather(*tasks, return_exceptions=True)

    run(body())
    log = ap.process.stderr_text()
    assert "not issued by this fleet CA" in log
    assert "certificate names follower 'cp-alpha', Hello names 'cp-beta'" in log
    assert "'cp-ghost' presented a valid certificate but is not enrolled" in log
    wait_for(lambda: "follower 'cp-good' said goodbye" in ap.process.stderr_text(), 10,
             what="the access point to log the goodbye")  # fmt: skip


class RawPeer(QuicConnectionProtocol):
    """An aioquic connection that records what arrives and writes whatever the test says."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.received: dict[int, bytearray] = defaultdict(bytearray)
        self.fin: set[int] = set()
        self.stopped: dict[int, int] = {}
        self.terminated: events.ConnectionTerminated | None = None
        self._changed = asyncio.Event()

    def quic_event_received(self, event: events.QuicEvent) -> None:
        if isinstance(event, events.StreamDataReceived):
            self.received[event.stream_id] += event.data
            if event.end_stream:
                self.fin.add(event.stream_id)
        elif isinstance(event, events.StopSendingReceived):
            self.stopped[event.stream_id] = event.error_code
        elif isinstance(event, events.ConnectionTerminated):
            self.terminated = event
        self._changed.set()
        self._changed = asyncio.Event()

    def send(self, sid: int, data: bytes) -> None:
        self._quic.send_stream_data(sid, data)
        self.transmit()

    def messages(self, sid: int) -> list[Any]:
        decoder = FrameDecoder[ControlMessage](ControlMessage)
        try:
            return decoder.feed(bytes(self.received.get(sid, b"")))
        except FrameError as exc:
            return exc.messages

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        async with asyncio.timeout(timeout):
            while not predicate():
                await self._changed.wait()


@pytest.mark.parametrize(
    ("bad", "code"),
    [
        pytest.param(GARBAGE, StreamErrorCode.MALFORMED_FRAME, id="garbage"),
        pytest.param(OVERSIZED, StreamErrorCode.FRAME_TOO_LARGE, id="oversized"),
    ],
)
def test_a_bad_frame_closes_only_that_stream(serving_ap: Any, bad: bytes, code: int) -> None:
    ap = serving_ap
    suffix = StreamErrorCode(code).name.lower().replace("_", "-")
    good_name, raw_name = f"ok-{suffix}", f"raw-{suffix}"
    good_identity, raw_identity = enroll(ap, good_name), enroll(ap, raw_name)

    async def body() -> None:
        good = client(ap, good_identity, info(good_name))
        good_task = asyncio.create_task(good.run())
        try:
            await good.wait_connected(10)
            config = QuicConfiguration(is_client=True, alpn_protocols=[ALPN])
            config.certificate, config.private_key = raw_identity.cert, raw_identity.key
            config.load_verify_locations(cadata=ap.state.ca.cert_pem)
            config.server_name = "localhost"
            async with connect(
                "127.0.0.1", ap.quic_port, configuration=config, create_protocol=RawPeer
            ) as proto:
                raw = cast(RawPeer, proto)
                raw.send(0, encode_frame(Hello(info=info(raw_name), protocol_version=1)))
                await raw.wait_for(lambda: any(isinstance(m, Welcome) for m in raw.messages(0)))
                raw.send(0, bad)
                await raw.wait_for(lambda: 0 in raw.stopped and 0 in raw.fin)
                assert raw.stopped[0] == code
                error = raw.messages(0)[-1]
                assert isinstance(error, StreamError) and error.code == code
                # The daemon answers on: this connection is still up ...
                await asyncio.wait_for(raw.ping(), 5)
                assert raw.terminated is None
                # ... it saw the raw follower go offline ...
                await await_in_thread(
                    lambda: (
                        {
                            f["info"]["name"]: f["health"]
                            for f in api(ap, "GET", "/followers")["followers"]
                        }.get(raw_name)
                        == "offline"
                    ),
                    10,
                    f"{raw_name} offline",
                )
                # ... and it still serves the other follower, RPCs included.
                answer = await asyncio.to_thread(
                    api, ap, "POST", "/exec", {"hosts": [good_name], "command": ["still", "here"]}
                )
                [result] = answer["hosts"]
                assert result["state"] == "ok"
                assert result["stdout"] == "in-process still here"
                assert good.sessions == 1
        finally:
            await good.stop()
            await good_task

    run(body())
    assert ap.process.is_running
