"""A real ApiServer (uvicorn, TLS, 127.0.0.1:0) over an in-memory fleet, and helpers that
check every response against the server's own OpenAPI document."""

from __future__ import annotations

import asyncio
import ssl
import threading
import time
from collections.abc import Collection, Coroutine, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import httpx
import jsonschema
import msgspec
import pytest
from cryptography.hazmat.primitives import serialization
from litestar import Litestar

from ah_api import (
    ApiServer,
    EnrollmentRefusal,
    EnrollmentRefused,
    EventHub,
    HostExec,
    JwtAuthenticator,
    PushEndpoint,
    SessionSummary,
    SseSettings,
    StoredEvent,
    Subscription,
    create_app,
)
from ah_connectivity.pki import (
    FleetCA,
    issue_from_csr,
    issue_server_cert,
    spiffe_id_for_follower,
)
from ah_connectivity.tokens import (
    InMemoryUsedTokenStore,
    TokenError,
    TokenSigner,
    user_audience,
)
from ah_domain_types import (
    EVENT_CLASSES,
    EVENT_TYPES,
    EnrollRequest,
    EnrollResponse,
    Event,
    FollowerHealth,
    FollowerInfo,
    FollowerStatus,
    OsKind,
    Resources,
    SessionInfo,
    encode_event_json,
)

TRUST_DOMAIN = "api-test.fleet"
API_VERSION = "0.1.0-test"
QUIC_ADDRESS = "127.0.0.1:4433"

_T = TypeVar("_T")

_REFUSALS: dict[str, EnrollmentRefusal] = {
    "malformed": "malformed",
    "forged": "forged",
    "expired": "expired",
    "reused": "reused",
    "wrong-name": "wrong-name",
}


def make_follower(
    name: str, os: OsKind, arch: str, tags: dict[str, str], health: FollowerHealth
) -> FollowerStatus:
    info = FollowerInfo(
        name=name,
        os=os,
        arch=arch,
        tags=tags,
        resources=Resources(cpus=4, memory_mb=8192),
        host_key_fingerprint="SHA256:uNiVztksCsDhcc0u9e8BujQXVUpKZIDTMczCvj3tD2s",
        direct_address=None,
        workspace=f"/srv/{name}/ws",
        version="0.1.0",
    )
    return FollowerStatus(
        info=info, health=health, last_heartbeat_ms=1_700_000_000_000, connected_since_ms=None
    )


@dataclass
class InMemoryFleet:
    """A test double of the access point's fleet state (implements ``FleetBackend``)."""

    ca: FleetCA
    verifier_signer: TokenSigner
    followers: list[FollowerStatus] = field(default_factory=list)
    ready: bool = True
    exec_calls: list[tuple[list[str], list[str], int | None]] = field(default_factory=list)
    exec_failure: Exception | None = None
    used_tokens: InMemoryUsedTokenStore = field(default_factory=InMemoryUsedTokenStore)

    def list_followers(self) -> list[FollowerStatus]:
        return list(self.followers)

    async def exec_mock(
        self, hosts: list[str], command: list[str], timeout_ms: int | None
    ) -> list[HostExec]:
        self.exec_calls.append((hosts, command, timeout_ms))
        if self.exec_failure is not None:
            raise self.exec_failure
        health = {f.info.name: f.health for f in self.followers}
        results: list[HostExec] = []
        for host in hosts:
            if health[host] is FollowerHealth.OFFLINE:
                results.append(
                    HostExec(
                        host=host,
                        state="unreachable",
                        exit_code=None,
                        stdout="",
                        stderr="",
                        took_ms=0,
                        error=f"{host} is offline",
                    )
                )
            else:
                results.append(
                    HostExec(
                        host=host,
                        state="ok",
                        exit_code=0,
                        stdout=f"{host}: {' '.join(command)}\n",
                        stderr="",
                        took_ms=3,
                    )
                )
        return results

    async def enroll(self, req: EnrollRequest) -> EnrollResponse:
        verifier = self.verifier_signer.verifier()
        try:
            claims = verifier.verify_enroll(req.token, req.name, self.used_tokens)
        except TokenError as exc:
            reason = _REFUSALS.get(exc.reason, "unknown")
            raise EnrollmentRefused(reason, str(exc)) from None
        cert = issue_from_csr(
            self.ca, req.csr_pem, spiffe_id_for_follower(self.ca.trust_domain, claims.name)
        )
        return EnrollResponse(
            name=claims.name,
            certificate_pem=cert.public_bytes(serialization.Encoding.PEM).decode(),
            ca_pem=self.ca_pem(),
            trust_domain=self.ca.trust_domain,
            access_point_quic=QUIC_ADDRESS,
        )

    def ca_pem(self) -> str:
        return self.ca.cert_pem.decode()

    def ca_fingerprint(self) -> str:
        return self.ca.fingerprint

    def is_ready(self) -> bool:
        return self.ready


class LoopThread:
    """An asyncio loop in a daemon thread, so sync tests can drive the async server."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, _T], timeout: float = 30.0) -> _T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


@dataclass(frozen=True)
class TlsMaterial:
    ca: FleetCA
    certfile: Path
    keyfile: Path

    def client_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cadata=self.ca.cert_pem.decode())


@pytest.fixture(scope="session")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TlsMaterial:
    directory = tmp_path_factory.mktemp("api-tls")
    ca = FleetCA.generate(TRUST_DOMAIN)
    identity = issue_server_cert(ca)
    certfile, keyfile = directory / "api.pem", directory / "api.key"
    identity.write(certfile, keyfile)
    return TlsMaterial(ca=ca, certfile=certfile, keyfile=keyfile)


@pytest.fixture(scope="session")
def signer() -> TokenSigner:
    return TokenSigner.generate(TRUST_DOMAIN)


@pytest.fixture(scope="session")
def loop_thread() -> Iterator[LoopThread]:
    runner = LoopThread()
    yield runner
    runner.close()


@dataclass
class RunningApi:
    version: ClassVar[str] = API_VERSION
    trust_domain: ClassVar[str] = TRUST_DOMAIN
    base_url: str
    port: int
    fleet: InMemoryFleet
    tls: TlsMaterial
    server: ApiServer
    app: Litestar

    def client(self, token: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
        return httpx.Client(
            base_url=self.base_url,
            verify=self.tls.client_context(),
            headers=headers,
            timeout=10.0,
        )


def default_followers() -> list[FollowerStatus]:
    return [
        make_follower("lin-b", OsKind.LINUX, "x86_64", {"pool": "ci"}, FollowerHealth.HEALTHY),
        make_follower("lin-a", OsKind.LINUX, "arm64", {"pool": "ci"}, FollowerHealth.HEALTHY),
        make_follower("mac-1", OsKind.MACOS, "arm64", {"pool": "dev"}, FollowerHealth.OFFLINE),
        make_follower("win-1", OsKind.WINDOWS, "x86_64", {}, FollowerHealth.UNHEALTHY),
    ]


@pytest.fixture(scope="module")
def _server(tls: TlsMaterial, signer: TokenSigner, loop_thread: LoopThread) -> Iterator[RunningApi]:
    fleet = InMemoryFleet(ca=tls.ca, verifier_signer=signer)
    authenticator = JwtAuthenticator(signer.verifier(), user_audience(TRUST_DOMAIN))
    app = create_app(fleet, authenticator, version=API_VERSION)
    server = ApiServer(app, certfile=tls.certfile, keyfile=tls.keyfile)
    port = loop_thread.run(server.start("127.0.0.1", 0))
    try:
        yield RunningApi(f"https://127.0.0.1:{port}", port, fleet, tls, server, app)
    finally:
        loop_thread.run(server.stop())


@pytest.fixture
def api(_server: RunningApi) -> RunningApi:
    """The module's server with its fleet reset to the default four followers."""
    fleet = _server.fleet
    fleet.followers = default_followers()
    fleet.ready = True
    fleet.exec_calls.clear()
    fleet.exec_failure = None
    return _server


@pytest.fixture(scope="module")
def openapi(_server: RunningApi) -> dict[str, Any]:
    with _server.client() as client:
        response = client.get("/api/v1/openapi.json")
    assert response.status_code == 200, response.text
    document: dict[str, Any] = response.json()
    return document


class ApiChecker:
    """Checks responses against the server's own OpenAPI document."""

    def __init__(self, openapi: dict[str, Any]) -> None:
        self.openapi = openapi

    def schema_for(self, method: str, path: str, status: int, media_type: str) -> dict[str, Any]:
        """The documented schema of one response, made self-contained for jsonschema."""
        operation = self.openapi["paths"][path][method.lower()]
        responses = operation["responses"]
        assert str(status) in responses, (
            f"{method} {path} answered {status}, which its OpenAPI responses do not document "
            f"(documented: {sorted(responses)})"
        )
        content = responses[str(status)]["content"]
        assert media_type in content, (
            f"{method} {path} {status} answered {media_type}; documented: {sorted(content)}"
        )
        return {**content[media_type]["schema"], "components": self.openapi["components"]}

    def json(self, response: httpx.Response, path: str, *, status: int) -> Any:
        """Assert ``status`` and validate the body against the route's documented schema,
        and that every response header it documents as required is there."""
        assert response.status_code == status, (response.status_code, response.text)
        media_type = response.headers["content-type"].split(";")[0].strip()
        body = response.json()
        schema = self.schema_for(response.request.method, path, status, media_type)
        jsonschema.Draft202012Validator(schema).validate(body)
        self.required_headers(response, path, status)
        if status >= 400:
            assert media_type == "application/problem+json"
            assert body["status"] == status
            assert body["type"].startswith("urn:ah:problem:")
        return body

    def required_headers(self, response: httpx.Response, path: str, status: int) -> None:
        operation = self.openapi["paths"][path][response.request.method.lower()]
        documented = operation["responses"][str(status)].get("headers", {})
        for name, header in documented.items():
            if header.get("required"):
                assert name.lower() in response.headers, (
                    f"{response.request.method} {path} {status} lacks the required header {name}"
                )

    def event_item_schema(self) -> dict[str, Any]:
        """The schema of one event as the events route documents it (an EventsPage item)."""
        page = self.openapi["components"]["schemas"]["EventsPage"]
        return {**page["properties"]["events"]["items"], "components": self.openapi["components"]}

    def event(self, data: Any) -> None:
        """Validate one SSE ``data:`` payload against the documented event schema."""
        jsonschema.Draft202012Validator(self.event_item_schema()).validate(data)

    def problem(self, response: httpx.Response, status: int) -> Any:
        """For answers no route documents (unknown route, 405, 500): a problem document."""
        assert response.status_code == status, (response.status_code, response.text)
        assert response.headers["content-type"].split(";")[0] == "application/problem+json"
        body = response.json()
        schema = {"$ref": "#/components/schemas/Problem", "components": self.openapi["components"]}
        jsonschema.Draft202012Validator(schema).validate(body)
        assert body["status"] == status
        assert body["type"].startswith("urn:ah:problem:")
        return body


@pytest.fixture(scope="module")
def check(openapi: dict[str, Any]) -> ApiChecker:
    return ApiChecker(openapi)


# --------------------------------------------------------------------------- sessions

EVENT_TYPE_OF: dict[type, str] = dict(zip(EVENT_CLASSES, EVENT_TYPES, strict=True))


@dataclass
class InMemorySessions:
    """A test double of the access point's event store + live hub (implements
    ``SessionBackend``); the hub and the SSE machinery are the real ones. Call ``append`` on
    the server's event loop (``loop_thread.run``)."""

    followers: list[FollowerStatus]
    hub: EventHub = field(default_factory=EventHub)
    summaries: dict[str, SessionSummary] = field(default_factory=dict)
    events: dict[str, list[StoredEvent]] = field(default_factory=dict)

    async def append(
        self, session_id: str, events: Sequence[Event], leader: str = "alice"
    ) -> list[int]:
        stored = self.events.setdefault(session_id, [])
        summary = self.summaries.get(session_id)
        if summary is None:
            summary = SessionSummary(
                id=session_id, leader=leader, created_ms=int(time.time() * 1000),
                last_event_ms=None, last_seq=0,
            )  # fmt: skip
        fresh: list[StoredEvent] = []
        ts = summary.last_event_ms or 0.0
        for event in events:
            seq = len(stored) + 1
            ts = max(ts, time.time() * 1000)
            final = msgspec.structs.replace(event, session_id=session_id, seq=seq, ts_ms=ts)
            item = StoredEvent(seq, EVENT_TYPE_OF[type(final)], ts, encode_event_json(final))
            stored.append(item)
            fresh.append(item)
        self.summaries[session_id] = msgspec.structs.replace(
            summary, last_event_ms=ts, last_seq=len(stored)
        )
        self.hub.publish(session_id, fresh)
        return [e.seq for e in fresh]

    def _select(
        self, session_id: str, after: int, until: int | None, types: Collection[str] | None
    ) -> list[StoredEvent]:
        return [
            e
            for e in self.events.get(session_id, [])
            if e.seq > after
            and (until is None or e.seq <= until)
            and (not types or e.type in types)
        ]

    def read_events(
        self,
        session_id: str,
        *,
        after: int = 0,
        until: int | None = None,
        types: Collection[str] | None = None,
        limit: int,
        offset: int = 0,
        descending: bool = False,
    ) -> list[StoredEvent]:
        chosen = self._select(session_id, after, until, types)
        if descending:
            chosen.reverse()
        return chosen[offset : offset + limit]

    def count_events(
        self,
        session_id: str,
        *,
        after: int = 0,
        until: int | None = None,
        types: Collection[str] | None = None,
    ) -> int:
        return len(self._select(session_id, after, until, types))

    def subscribe(self, session_id: str, max_queue: int) -> Subscription:
        return self.hub.subscribe(session_id, max_queue)

    def list_sessions(self) -> list[SessionSummary]:
        return sorted(self.summaries.values(), key=lambda s: s.created_ms, reverse=True)

    def get_session(self, session_id: str) -> SessionSummary | None:
        return self.summaries.get(session_id)

    def session_info(self, session_id: str, hosts_glob: str) -> SessionInfo | None:
        summary = self.summaries.get(session_id)
        if summary is None:
            return None
        return SessionInfo(
            id=session_id,
            leader=summary.leader,
            created_ms=summary.created_ms,
            followers=list(self.followers),
            endpoints={"events": f"/api/v1/sessions/{session_id}/events"},
            last_event_ms=summary.last_event_ms,
            last_seq=summary.last_seq,
        )

    def push_endpoint(self) -> PushEndpoint | None:
        return PushEndpoint(
            host="127.0.0.1", port=4433, alpn="ah-leader/1", trust_domain=TRUST_DOMAIN
        )


SSE_TEST_SETTINGS = SseSettings(keepalive_s=0.2, queue_size=40, history_page=7, retry_ms=50)


@dataclass
class RunningSessionsApi(RunningApi):
    sessions: InMemorySessions = field(default_factory=lambda: InMemorySessions([]))
    loop_thread: LoopThread | None = None

    def append(self, session_id: str, events: Sequence[Event]) -> list[int]:
        assert self.loop_thread is not None
        return self.loop_thread.run(self.sessions.append(session_id, events))


@pytest.fixture(scope="module")
def sessions_api(
    tls: TlsMaterial, signer: TokenSigner, loop_thread: LoopThread
) -> Iterator[RunningSessionsApi]:
    """A real server with the session routes over an in-memory store (small SSE limits:
    keep-alive every 0.2 s, 40 queued events, history pages of 7)."""
    fleet = InMemoryFleet(ca=tls.ca, verifier_signer=signer, followers=default_followers())
    sessions = InMemorySessions(default_followers())
    authenticator = JwtAuthenticator(signer.verifier(), user_audience(TRUST_DOMAIN))
    app = create_app(
        fleet, authenticator, version=API_VERSION, sessions=sessions, sse=SSE_TEST_SETTINGS
    )
    server = ApiServer(app, certfile=tls.certfile, keyfile=tls.keyfile)
    port = loop_thread.run(server.start("127.0.0.1", 0))
    try:
        yield RunningSessionsApi(
            f"https://127.0.0.1:{port}", port, fleet, tls, server, app, sessions, loop_thread
        )
    finally:
        loop_thread.run(server.stop())


@pytest.fixture(scope="module")
def sessions_openapi(sessions_api: RunningSessionsApi) -> dict[str, Any]:
    with sessions_api.client() as client:
        response = client.get("/api/v1/openapi.json")
    assert response.status_code == 200, response.text
    document: dict[str, Any] = response.json()
    return document


@pytest.fixture(scope="module")
def scheck(sessions_openapi: dict[str, Any]) -> ApiChecker:
    """An ApiChecker over the document of the server that serves the session routes."""
    return ApiChecker(sessions_openapi)
