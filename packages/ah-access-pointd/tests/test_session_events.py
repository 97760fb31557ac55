"""Session events end to end on the real daemon (``ah-access-pointd serve`` subprocess): a
leader pushes over QUIC (``ah-leader/1`` on the QUIC port, token auth), clients read JSON
history and SSE over HTTPS; the daemon restarts in between."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest

from ah_connectivity import Backoff
from ah_connectivity.leader_push import LeaderPushClient, LeaderPushConnection, new_session_id
from ah_domain_types import (
    Event,
    FenceHostResult,
    FenceHostState,
    FenceResultEvent,
    FenceStartedEvent,
    HostExitedEvent,
    HostResult,
    HostStartedEvent,
    HostState,
    NoteEvent,
    OsKind,
    PathFixedEvent,
    PathRecord,
    PushRefusal,
    RunSummary,
    SummaryEvent,
    TransportMethod,
)

T = TypeVar("T")
SERVE_ARGS = ["--sse-keepalive", "200ms"]


def run(coro: Coroutine[Any, Any, T], timeout: float = 90.0) -> T:
    async def bounded() -> T:
        async with asyncio.timeout(timeout):
            return await coro

    return asyncio.run(bounded())


def notes(start: int, stop: int) -> list[NoteEvent]:
    return [NoteEvent(session_id="", ts_ms=0.0, message=f"n{i}") for i in range(start, stop)]


def leader(ap: Any, session_id: str, token: str | None = None) -> LeaderPushClient:
    return LeaderPushClient(
        host="127.0.0.1",
        port=ap.quic_port,
        ca=ap.state.ca.cert_pem,
        trust_domain=ap.state.trust_domain,
        token=token or ap.user_token(),
        session_id=session_id,
        backoff=Backoff(base_s=0.05, cap_s=0.5),
    )


def http(ap: Any, token: str | None = None) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=ap.api_url,
        verify=ap.ssl_context(),
        headers={"Authorization": f"Bearer {token or ap.user_token()}"},
        timeout=httpx.Timeout(30.0),
    )


async def sse(
    client: httpx.AsyncClient, session_id: str, last_event_id: int | None = None
) -> AsyncIterator[dict[str, Any]]:
    """The events of one SSE connection (``data`` decoded, checked against ``id``/``event``)."""
    headers = {"Accept": "text/event-stream"}
    if last_event_id is not None:
        headers["Last-Event-ID"] = str(last_event_id)
    async with client.stream(
        "GET", f"/api/v1/sessions/{session_id}/events", headers=headers
    ) as response:
        assert response.status_code == 200, await response.aread()
        fields: dict[str, str] = {}
        async for line in response.aiter_lines():
            if line == "":
                if "data" in fields:
                    event = json.loads(fields["data"])
                    assert int(fields["id"]) == event["seq"]
                    assert fields["event"] == event["type"]
                    yield event
                fields = {}
            elif not line.startswith(":"):
                name, _, value = line.partition(": ")
                fields[name] = value


async def history(client: httpx.AsyncClient, session_id: str) -> list[dict[str, Any]]:
    """Every stored event, through the JSON pages."""
    events: list[dict[str, Any]] = []
    page = 1
    while True:
        response = await client.get(
            f"/api/v1/sessions/{session_id}/events", params={"page": page, "perPage": 200}
        )
        assert response.status_code == 200, response.text
        body = response.json()
        events += body["events"]
        if len(events) >= body["total"]:
            assert int(response.headers["x-ah-last-seq"]) == body["lastSeq"]
            return events
        page += 1


@pytest.fixture
def fresh_ap(tmp_path: Path, cli: Any, start_ap: Any) -> Any:
    state_dir = tmp_path / "ap"
    assert cli("init", "--state-dir", str(state_dir)).returncode == 0
    return start_ap(state_dir, SERVE_ARGS, name=f"serve-{tmp_path.name}")


def test_history_survives_a_restart_and_seqs_continue(
    tmp_path: Path, cli: Any, start_ap: Any
) -> None:
    state_dir = tmp_path / "ap"
    assert cli("init", "--state-dir", str(state_dir)).returncode == 0
    first = start_ap(state_dir, SERVE_ARGS, name="serve-a")
    session = new_session_id()
    client = leader(first, session)
    second: list[Any] = []

    async def body() -> None:
        task = asyncio.ensure_future(client.run())
        try:
            for event in notes(0, 120):
                client.emit(event)
            assert await client.flush(30.0), client.status
            async with http(first) as api:
                before = await history(api, session)
            assert [e["seq"] for e in before] == list(range(1, 121))
            # Restart the daemon on the same ports; the same leader goes on by itself.
            assert await asyncio.to_thread(first.process.terminate, 10) == 0
            for event in notes(120, 200):
                client.emit(event)  # queued while the access point is down
            ports = ["--quic-port", str(first.quic_port), "--api-port", str(first.ready["apiPort"])]
            second.append(
                await asyncio.to_thread(start_ap, state_dir, [*SERVE_ARGS, *ports], "serve-b")
            )
            assert await client.flush(30.0), client.status
            assert client.status.sessions >= 2
        finally:
            await client.stop()
            await task
        async with http(second[0]) as api:
            after = await history(api, session)
            listed = (await api.get("/api/v1/sessions")).json()["sessions"]
        assert [e["seq"] for e in after] == list(range(1, 201))
        assert [e["message"] for e in after] == [f"n{i}" for i in range(200)]
        assert after[:120] == before, "history from before the restart is unchanged"
        stamps = [e["tsMs"] for e in after]
        assert stamps == sorted(stamps)
        assert [(s["id"], s["lastSeq"], s["leader"]) for s in listed] == [(session, 200, "tester")]

    run(body())


def test_sse_reconnect_with_last_event_id_gets_the_rest_exactly_once(fresh_ap: Any) -> None:
    ap = fresh_ap
    session = new_session_id()
    client = leader(ap, session)
    total = 600

    async def pusher() -> None:
        for start in range(0, total, 50):
            for event in notes(start, start + 50):
                client.emit(event)
            target = start + 50
            await client.wait_for(lambda c, target=target: c.sender.acked_lseq >= target, 30.0)

    async def body() -> None:
        task = asyncio.ensure_future(client.run())
        try:
            for event in notes(-1, 0):  # the session exists before anyone follows it
                client.emit(event)
            assert await client.flush(30.0)
            push = asyncio.ensure_future(pusher())
            async with http(ap) as api:
                first: list[dict[str, Any]] = []
                async for event in sse(api, session):
                    first.append(event)
                    if len(first) == 150:
                        break  # the client goes away mid-stream
                second: list[dict[str, Any]] = []
                async for event in sse(api, session, last_event_id=first[-1]["seq"]):
                    second.append(event)
                    if event["seq"] == total + 1:
                        break
                await push
                stored = await history(api, session)
        finally:
            await client.stop()
            await task
        union = [e["seq"] for e in first + second]
        assert union == [e["seq"] for e in stored] == list(range(1, total + 2))
        assert first + second == stored

    run(body())


def _realistic_events() -> list[Event]:
    hosts = ["lin-a", "lin-b", "win-1"]
    paths = [
        PathRecord(
            method=TransportMethod.DIRECT, target="10.0.0.5:22", relay=None, rtt_estimate_ms=0.8
        ),
        PathRecord(
            method=TransportMethod.CONNECT, target="lin-b:22", relay=None, rtt_estimate_ms=4.2
        ),
        PathRecord(
            method=TransportMethod.RELAY, target="win-1:22", relay="ap-2", rtt_estimate_ms=31.0
        ),
    ]
    events: list[Event] = [
        PathFixedEvent(session_id="", ts_ms=0, host=host, path=path)
        for host, path in zip(hosts, paths, strict=True)
    ]
    events.append(FenceStartedEvent(session_id="", ts_ms=0, snapshot_id="snap-1", hosts=hosts))
    events.append(
        FenceResultEvent(
            session_id="",
            ts_ms=0,
            snapshot_id="snap-1",
            hosts={h: FenceHostResult(state=FenceHostState.CONSISTENT, took_ms=120) for h in hosts},
        )
    )
    results = []
    for host in hosts:
        events.append(HostStartedEvent(session_id="", ts_ms=0, host=host, command="make test"))
        result = HostResult(
            host=host,
            os=OsKind.WINDOWS if host.startswith("win") else OsKind.LINUX,
            state=HostState.OK,
            exit_code=0,
            took_ms=900,
            log_path=None,
            command="make test",
        )
        results.append(result)
        events.append(HostExitedEvent(session_id="", ts_ms=0, host=host, result=result))
    events.append(SummaryEvent(session_id="", ts_ms=0, summary=RunSummary.from_results(results)))
    return events


def test_a_realistic_run_arrives_in_order_on_a_stream_opened_first(fresh_ap: Any) -> None:
    ap = fresh_ap
    session = new_session_id()
    client = leader(ap, session)
    pushed = _realistic_events()

    async def body() -> None:
        async with http(ap) as api:
            got: list[dict[str, Any]] = []

            async def follow() -> None:
                # Opened before the session exists: it waits for the events.
                async for event in sse(api, session):
                    got.append(event)
                    if event["type"] == "summary":
                        return

            follower = asyncio.ensure_future(follow())
            task = asyncio.ensure_future(client.run())
            try:
                for event in pushed:
                    client.emit(event)
                assert await client.flush(30.0)
                await follower
            finally:
                await client.stop()
                await task
            info = (await api.get(f"/api/v1/sessions/{session}/info")).json()
        assert [e["type"] for e in got] == [
            "connect.path.fixed", "connect.path.fixed", "connect.path.fixed",
            "fenceStarted", "fenceResult",
            "hostStarted", "hostExited", "hostStarted", "hostExited", "hostStarted", "hostExited",
            "summary",
        ]  # fmt: skip
        seqs = [e["seq"] for e in got]
        assert seqs == list(range(1, len(pushed) + 1))
        stamps = [e["tsMs"] for e in got]
        assert stamps == sorted(stamps)
        assert all(e["sessionId"] == session for e in got)
        assert got[-1]["summary"]["succeeded"] == 3
        assert info["leader"] == "tester" and info["lastSeq"] == len(pushed)
        assert info["endpoints"]["events"] == f"/api/v1/sessions/{session}/events"
        assert info["endpoints"]["push"].startswith(f"quic://127.0.0.1:{ap.quic_port}")

    run(body())


def test_push_and_read_are_authorised_by_scope(fresh_ap: Any) -> None:
    ap = fresh_ap
    signer = ap.state.signer
    read_only = signer.issue_user("reader", scopes=["read-logs"])
    exec_only = signer.issue_user("runner", scopes=["exec"])

    async def body() -> None:
        refused = leader(ap, "s-auth", token=read_only)
        refused.emit(notes(0, 1)[0])
        await asyncio.wait_for(refused.run(), 20)
        assert refused.status.refused is not None
        assert refused.status.refused.code is PushRefusal.FORBIDDEN
        async with http(ap, exec_only) as api:
            endpoint = await api.get("/api/v1/push")
            assert endpoint.status_code == 200
            assert endpoint.json()["port"] == ap.quic_port
            forbidden = await api.get("/api/v1/sessions")
            assert forbidden.status_code == 403
            assert forbidden.json()["type"] == "urn:ah:problem:missing-scope"
        async with httpx.AsyncClient(base_url=ap.api_url, verify=ap.ssl_context()) as anonymous:
            missing = await anonymous.get(
                "/api/v1/sessions/s-auth/events", headers={"Accept": "text/event-stream"}
            )
            assert missing.status_code == 401
            assert missing.headers["content-type"].startswith("application/problem+json")
        async with http(ap, read_only) as api:
            assert (await api.get("/api/v1/sessions")).json() == {"sessions": []}

    run(body())


def test_sessions_on_one_connection_survive_a_restart_each_stored_once_in_order(
    tmp_path: Path, cli: Any, start_ap: Any
) -> None:
    state_dir = tmp_path / "ap"
    assert cli("init", "--state-dir", str(state_dir)).returncode == 0
    first = start_ap(state_dir, SERVE_ARGS, name="serve-one")
    names = [new_session_id() + f"{i}" for i in range(3)]
    reader = first.state.signer.issue_user("reader", scopes=["read-logs"])
    connection = LeaderPushConnection(
        host="127.0.0.1",
        port=first.quic_port,
        ca=first.state.ca.cert_pem,
        trust_domain=first.state.trust_domain,
        backoff=Backoff(base_s=0.05, cap_s=0.5),
    )
    second: list[Any] = []

    async def body() -> None:
        task = asyncio.ensure_future(connection.run())
        try:
            sessions = [
                connection.open_session(token=first.user_token(), session_id=n) for n in names
            ]
            refused = connection.open_session(token=reader, session_id="s-not-allowed")
            refused.emit(notes(0, 1)[0])
            for i in range(150):
                for session in sessions:
                    session.emit(notes(i, i + 1)[0])
            for session in sessions:
                assert await session.flush(30.0), session.status
            await refused.wait_for(lambda s: s.done, 30.0)
            assert refused.status.refused is not None
            assert connection.status.connections == 1
            # Restart the daemon on the same ports while every session is open.
            assert await asyncio.to_thread(first.process.terminate, 10) == 0
            for i in range(150, 300):
                for session in sessions:
                    session.emit(notes(i, i + 1)[0])  # queued while the access point is down
            ports = ["--quic-port", str(first.quic_port), "--api-port", str(first.ready["apiPort"])]
            second.append(
                await asyncio.to_thread(start_ap, state_dir, [*SERVE_ARGS, *ports], "serve-two")
            )
            for session in sessions:
                assert await session.close(30.0), session.status
                assert session.status.sessions == 2, session.status.history
            assert connection.status.connections == 2, connection.status.history
        finally:
            await connection.stop()
            await task
        async with http(second[0]) as api:
            for name in names:
                stored = await history(api, name)
                assert [e["seq"] for e in stored] == list(range(1, 301))
                assert [e["message"] for e in stored] == [f"n{i}" for i in range(300)]
            missing = await api.get("/api/v1/sessions/s-not-allowed/events")
            assert missing.status_code == 404, missing.text  # refused: never created

    run(body())
