"""Session routes over real HTTPS: JSON history and SSE, checked against the served OpenAPI
document; resumption with Last-Event-ID; keep-alives; a slow client cut off alone."""

from __future__ import annotations

import json
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from ah_connectivity.tokens import TokenSigner
from ah_domain_types import (
    FenceStartedEvent,
    HostLogEvent,
    HostStartedEvent,
    NoteEvent,
)

SESSIONS = "/api/v1/sessions"
INFO = "/api/v1/sessions/{session_id}/info"
EVENTS = "/api/v1/sessions/{session_id}/events"
PUSH = "/api/v1/push"
SSE_HEADERS = {"Accept": "text/event-stream"}


def token(signer: TokenSigner, *scopes: str, **kwargs: Any) -> str:
    return signer.issue_user("alice", scopes=scopes, **kwargs)


def notes(count: int, prefix: str = "n") -> list[NoteEvent]:
    return [NoteEvent(session_id="", ts_ms=0.0, message=f"{prefix}{i}") for i in range(count)]


@dataclass
class SseMessage:
    id: int | None
    event: str | None
    data: Any


def sse_messages(lines: Iterator[str], comments: list[str] | None = None) -> Iterator[SseMessage]:
    """A minimal SSE reader for the tests (the CLI has the real parser)."""
    event_id: int | None = None
    event: str | None = None
    data: list[str] = []
    for line in lines:
        if line == "":
            if data:
                yield SseMessage(event_id, event, json.loads("\n".join(data)))
            event_id, event, data = None, None, []
        elif line.startswith(":"):
            if comments is not None:
                comments.append(line)
        else:
            field, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if field == "id":
                event_id = int(value)
            elif field == "event":
                event = value
            elif field == "data":
                data.append(value)


def read_sse(
    client: httpx.Client,
    session_id: str,
    until_seq: int,
    *,
    headers: dict[str, str] | None = None,
    params: dict[str, Any] | None = None,
    stop_after: int | None = None,
    comments: list[str] | None = None,
    timeout: float = 20.0,
) -> list[SseMessage]:
    """Events of one SSE connection until one with ``id >= until_seq`` (or ``stop_after``
    events): then the connection is closed by the client."""
    got: list[SseMessage] = []
    deadline = time.monotonic() + timeout
    with client.stream(
        "GET",
        f"{SESSIONS}/{session_id}/events",
        headers={**SSE_HEADERS, **(headers or {})},
        params=params,
        timeout=httpx.Timeout(timeout),
    ) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        for message in sse_messages(response.iter_lines(), comments):
            got.append(message)
            assert time.monotonic() < deadline, f"no event {until_seq} within {timeout} s"
            if (message.id or 0) >= until_seq or (stop_after and len(got) >= stop_after):
                break
    return got


def test_openapi_documents_the_session_routes(
    sessions_api: Any, scheck: Any, sessions_openapi: dict[str, Any]
) -> None:
    paths = sessions_openapi["paths"]
    for path in (SESSIONS, INFO, EVENTS, PUSH):
        assert set(paths[path]) == {"get"}, path
        operation = paths[path]["get"]
        assert operation["security"] == [{"bearerAuth": []}], path
        for status in ("401", "403"):
            content = operation["responses"][status]["content"]
            assert "application/problem+json" in content, (path, status)
    events = paths[EVENTS]["get"]
    ok = events["responses"]["200"]
    assert set(ok["content"]) == {"application/json", "text/event-stream"}
    assert ok["headers"]["X-AH-Last-Seq"]["required"] is True
    params = {p["name"]: p for p in events["parameters"]}
    assert {"type", "since", "until", "page", "perPage", "sort", "after", "Last-Event-ID"} <= set(
        params
    )
    assert params["Last-Event-ID"]["in"] == "header"
    assert params["perPage"]["schema"]["maximum"] == 200
    assert "404" in events["responses"] and "400" in events["responses"]
    # The events of a page are the Event union (every type documented).
    item = scheck.event_item_schema()
    assert "oneOf" in item or "anyOf" in item or "$ref" in item


def test_sessions_list_info_and_push_endpoint(
    sessions_api: Any, scheck: Any, signer: TokenSigner
) -> None:
    sessions_api.append(
        "s-info-1", [FenceStartedEvent(session_id="", ts_ms=0, snapshot_id="abc", hosts=["lin-a"])]
    )
    with sessions_api.client(token(signer, "read-logs")) as client:
        listed = scheck.json(client.get(SESSIONS), SESSIONS, status=200)
        assert "s-info-1" in [s["id"] for s in listed["sessions"]]
        info = scheck.json(client.get(f"{SESSIONS}/s-info-1/info"), INFO, status=200)
        assert info["id"] == "s-info-1" and info["leader"] == "alice" and info["lastSeq"] == 1
        missing = scheck.json(client.get(f"{SESSIONS}/s-nope/info"), INFO, status=404)
        assert missing["type"] == "urn:ah:problem:unknown-session"
        bad = scheck.json(client.get(f"{SESSIONS}/-bad-/info"), INFO, status=400)
        assert bad["type"] == "urn:ah:problem:bad-session-id"
        # Pushing needs exec.
        refused = scheck.json(client.get(PUSH), PUSH, status=403)
        assert refused["type"] == "urn:ah:problem:missing-scope"
    with sessions_api.client(token(signer, "exec", hosts="lin-*")) as client:
        endpoint = scheck.json(client.get(PUSH), PUSH, status=200)
        assert endpoint["alpn"] == "ah-leader/1" and endpoint["port"] == 4433
    with sessions_api.client(token(signer, "read-logs", hosts="lin-*")) as client:
        info = scheck.json(client.get(f"{SESSIONS}/s-info-1/info"), INFO, status=200)
        assert sorted(f["info"]["name"] for f in info["followers"]) == ["lin-a", "lin-b"]


def test_events_history_pages_filters_and_sorts(
    sessions_api: Any, scheck: Any, signer: TokenSigner
) -> None:
    session = "s-history"
    mixed = []
    for i in range(30):
        mixed.append(NoteEvent(session_id="", ts_ms=0, message=f"note {i}"))
        if i % 3 == 0:
            mixed.append(HostStartedEvent(session_id="", ts_ms=0, host="lin-a", command=f"c{i}"))
    seqs = sessions_api.append(session, mixed)
    assert seqs == list(range(1, 41))
    url = f"{SESSIONS}/{session}/events"
    with sessions_api.client(token(signer, "read-logs")) as client:
        first = scheck.json(client.get(url, params={"perPage": 15}), EVENTS, status=200)
        assert [e["seq"] for e in first["events"]] == list(range(1, 16))
        assert (first["total"], first["page"], first["perPage"], first["lastSeq"]) == (
            40,
            1,
            15,
            40,
        )
        third = scheck.json(client.get(url, params={"perPage": 15, "page": 3}), EVENTS, status=200)
        assert [e["seq"] for e in third["events"]] == list(range(31, 41))
        desc = scheck.json(
            client.get(url, params={"sort": "desc", "perPage": 3}), EVENTS, status=200
        )
        assert [e["seq"] for e in desc["events"]] == [40, 39, 38]
        window = scheck.json(client.get(url, params={"since": 10, "until": 12}), EVENTS, status=200)
        assert [e["seq"] for e in window["events"]] == [11, 12] and window["total"] == 2
        starts = scheck.json(
            client.get(url, params={"type": "hostStarted", "perPage": 200}), EVENTS, status=200
        )
        assert {e["type"] for e in starts["events"]} == {"hostStarted"} and starts["total"] == 10
        both = scheck.json(
            client.get(url, params=[("type", "hostStarted"), ("type", "note")]), EVENTS, status=200
        )
        assert both["total"] == 40
        timestamps = [e["tsMs"] for e in first["events"]]
        assert timestamps == sorted(timestamps)
        response = client.get(url, params={"perPage": 201})
        too_many = scheck.json(response, EVENTS, status=400)
        assert "perPage" in too_many["detail"] or "per_page" in too_many["detail"]
        bad_type = scheck.json(client.get(url, params={"type": "nope"}), EVENTS, status=400)
        assert (
            bad_type["type"] == "urn:ah:problem:bad-event-type" and "'nope'" in bad_type["detail"]
        )
        unknown = scheck.json(client.get(f"{SESSIONS}/s-unknown/events"), EVENTS, status=404)
        assert unknown["type"] == "urn:ah:problem:unknown-session"


@pytest.mark.parametrize(
    ("case", "status", "problem_type"),
    [
        ("valid", 200, None),
        ("missing", 401, "urn:ah:problem:token-missing"),
        ("expired", 401, "urn:ah:problem:token-expired"),
        ("forged", 401, "urn:ah:problem:token-forged"),
        ("wrong-audience", 401, "urn:ah:problem:token-wrong-audience"),
        ("no-read-logs", 403, "urn:ah:problem:missing-scope"),
    ],
)
def test_session_routes_authenticate_every_request(
    sessions_api: Any,
    scheck: Any,
    signer: TokenSigner,
    case: str,
    status: int,
    problem_type: str | None,
) -> None:
    sessions_api.append("s-auth", notes(2))
    bearer = {
        "valid": token(signer, "read-logs"),
        "missing": None,
        "expired": token(signer, "read-logs", ttl=60, now=time.time() - 3600),
        "forged": token(TokenSigner.generate(sessions_api.trust_domain), "read-logs"),
        "wrong-audience": token(TokenSigner(signer.key, "other.fleet"), "read-logs"),
        "no-read-logs": token(signer, "exec", "ssh"),
    }[case]
    with sessions_api.client(bearer) as client:
        for path, url in (
            (SESSIONS, SESSIONS),
            (INFO, f"{SESSIONS}/s-auth/info"),
            (EVENTS, f"{SESSIONS}/s-auth/events"),
        ):
            body = scheck.json(client.get(url), path, status=status)
            if problem_type is not None:
                assert body["type"] == problem_type, (path, body)
        # The SSE form is refused the same way, before any stream starts.
        with client.stream("GET", f"{SESSIONS}/s-auth/events", headers=SSE_HEADERS) as sse:
            assert sse.status_code == status
            if problem_type is None:
                assert sse.headers["content-type"].startswith("text/event-stream")
                assert sse.headers["x-ah-last-seq"].isdigit()
            else:
                sse.read()
                assert scheck.json(sse, EVENTS, status=status)["type"] == problem_type


def test_sse_replays_history_then_follows_live_with_types_and_resumption(
    sessions_api: Any, scheck: Any, signer: TokenSigner
) -> None:
    session = "s-sse-1"
    sessions_api.append(session, notes(20))
    with sessions_api.client(token(signer, "read-logs")) as client:
        # Live events arrive while the client is connected.
        feeder = threading.Thread(
            target=lambda: [sessions_api.append(session, notes(5, f"live{k}-")) for k in range(6)]
        )
        feeder.start()
        try:
            got = read_sse(client, session, until_seq=50)
        finally:
            feeder.join()
        assert [m.id for m in got] == list(range(1, 51))
        for message in got:
            scheck.event(message.data)
            assert message.event == message.data["type"] == "note"
            assert message.data["seq"] == message.id and message.data["sessionId"] == session
        stamps = [m.data["tsMs"] for m in got]
        assert stamps == sorted(stamps)
        # Resume: the header wins over ?after=; ?after= alone works too.
        resumed = read_sse(
            client, session, until_seq=50, headers={"Last-Event-ID": "45"}, params={"after": 3}
        )
        assert [m.id for m in resumed] == [46, 47, 48, 49, 50]
        after = read_sse(client, session, until_seq=50, params={"after": 47})
        assert [m.id for m in after] == [48, 49, 50]
        bad = client.get(
            f"{SESSIONS}/{session}/events", headers={**SSE_HEADERS, "Last-Event-ID": "x1"}
        )
        assert scheck.json(bad, EVENTS, status=400)["type"] == "urn:ah:problem:invalid-request"

        # A type filter applies to history and live alike; ids stay the seqs.
        sessions_api.append(
            session, [HostStartedEvent(session_id="", ts_ms=0, host="lin-a", command="make")]
        )
        starts = read_sse(client, session, until_seq=51, params={"type": "hostStarted"})
        assert [(m.id, m.event) for m in starts] == [(51, "hostStarted")]


def test_sse_waits_for_a_session_without_events_and_sends_keepalives(
    sessions_api: Any, signer: TokenSigner
) -> None:
    session = "s-later"
    comments: list[str] = []
    result: list[list[SseMessage]] = []
    with sessions_api.client(token(signer, "read-logs")) as client:
        reader = threading.Thread(
            target=lambda: result.append(read_sse(client, session, until_seq=3, comments=comments))
        )
        reader.start()
        # Keep-alives every 0.2 s while nothing happens (wait for two, with a deadline).
        deadline = time.monotonic() + 10
        while comments.count(": ka") < 2:
            assert time.monotonic() < deadline, f"no keep-alives: {comments}"
            time.sleep(0.02)
        sessions_api.append(session, notes(3))
        reader.join(20)
    assert not reader.is_alive()
    assert [m.id for m in result[0]] == [1, 2, 3]


def test_sse_disconnect_mid_stream_and_resume_gives_every_event_once(
    sessions_api: Any, signer: TokenSigner
) -> None:
    session = "s-resume"
    sessions_api.append(session, notes(30))
    total = 30 + 10 * 7
    with sessions_api.client(token(signer, "read-logs")) as client:
        feeder = threading.Thread(
            target=lambda: [sessions_api.append(session, notes(7, f"b{k}-")) for k in range(10)]
        )
        feeder.start()
        try:
            first = read_sse(client, session, until_seq=total, stop_after=37)
            last_id = first[-1].id
            assert last_id == 37
            second = read_sse(
                client, session, until_seq=total, headers={"Last-Event-ID": str(last_id)}
            )
        finally:
            feeder.join()
    ids = [m.id for m in first + second]
    assert ids == list(range(1, total + 1)), "union of both connections == stored events"
    stored = [e.seq for e in sessions_api.sessions.events[session]]
    assert ids == stored


def _raw_sse_request(sessions_api: Any, bearer: str, session: str) -> ssl.SSLSocket:
    """A client that sends the request and then does not read: tiny receive buffer."""
    raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    raw.connect(("127.0.0.1", sessions_api.port))
    tls = sessions_api.tls.client_context().wrap_socket(raw, server_hostname="localhost")
    request = (
        f"GET {SESSIONS}/{session}/events HTTP/1.1\r\nHost: localhost\r\n"
        f"Authorization: Bearer {bearer}\r\nAccept: text/event-stream\r\n\r\n"
    )
    tls.sendall(request.encode())
    return tls


def _drain(tls: ssl.SSLSocket, timeout: float) -> bytes:
    """Everything the server sent until it closed the connection (or ended the response)."""
    tls.settimeout(timeout)
    chunks = []
    while True:
        try:
            chunk = tls.recv(65536)
        except (ConnectionResetError, ssl.SSLError):
            break
        if not chunk:
            break
        chunks.append(chunk)
        if b"\r\n0\r\n\r\n" in b"".join(chunks[-2:]):
            break  # the chunked response ended cleanly
    return b"".join(chunks)


def test_slow_client_is_cut_off_alone_and_resumes_without_loss(
    sessions_api: Any, signer: TokenSigner
) -> None:
    session = "s-slow"
    bearer = token(signer, "read-logs")
    hub = sessions_api.sessions.hub
    overflows_before = hub.overflows
    big = "x" * 2000
    fast_got: list[SseMessage] = []
    appended = [0]

    def append_batch() -> None:
        batch = [
            HostLogEvent(session_id="", ts_ms=0, host="lin-a", stream="stdout", line=big)
            for _ in range(10)
        ]
        appended[0] = sessions_api.append(session, batch)[-1]

    append_batch()
    slow = _raw_sse_request(sessions_api, bearer, session)
    try:
        with sessions_api.client(bearer) as client:
            final: list[int] = []
            comments: list[str] = []

            def fast_reader() -> None:
                with client.stream(
                    "GET", f"{SESSIONS}/{session}/events", headers=SSE_HEADERS,
                    timeout=httpx.Timeout(60),
                ) as response:  # fmt: skip
                    lines = response.iter_lines()

                    def watched() -> Iterator[str]:
                        for line in lines:
                            yield line
                            # Checked on every line, keep-alives included (every 0.2 s).
                            if final and fast_got and (fast_got[-1].id or 0) >= final[0]:
                                return

                    for message in sse_messages(watched(), comments):
                        fast_got.append(message)

            reader = threading.Thread(target=fast_reader)
            reader.start()
            # Publish until the non-reading client overflowed its 40-event queue and was cut
            # off (its subscription is gone; the fast client's remains).
            deadline = time.monotonic() + 60

            def subscribers() -> int:
                async def count() -> int:
                    return int(hub.subscriber_count(session))

                return int(sessions_api.loop_thread.run(count()))

            while not fast_got or subscribers() != 1 or hub.overflows == overflows_before:
                assert time.monotonic() < deadline, (
                    f"the slow client was not cut off ({subscribers()} subscribers, "
                    f"{hub.overflows - overflows_before} overflows)"
                )
                append_batch()
            for _ in range(3):  # life goes on for the others
                append_batch()
            final.append(appended[0])
            reader.join(60)
            assert not reader.is_alive()
    finally:
        received = _drain(slow, timeout=30)
        slow.close()
    # The fast client got everything, in order, once.
    assert [m.id for m in fast_got] == list(range(1, appended[0] + 1))
    # The slow one was disconnected: what it got before is a prefix, in order.
    body = received.split(b"\r\n\r\n", 1)[1]
    slow_ids = [int(line[4:]) for line in body.split(b"\n") if line.startswith(b"id: ")]
    assert slow_ids == list(range(1, len(slow_ids) + 1))
    assert slow_ids[-1] < appended[0]
    # It resumes with Last-Event-ID and gets exactly the rest.
    with sessions_api.client(bearer) as client:
        rest = read_sse(
            client, session, until_seq=appended[0], headers={"Last-Event-ID": str(slow_ids[-1])}
        )
    assert slow_ids + [m.id for m in rest] == list(range(1, appended[0] + 1))
