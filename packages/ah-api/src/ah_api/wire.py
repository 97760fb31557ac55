"""JSON bodies of the REST API (camelCase on the wire, frozen)."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from ah_domain_types import HOST_NAME_PATTERN, Event, FollowerStatus

API_BASE_PATH = "/api/v1"
"""Every REST route lives under this prefix."""

__all__ = [
    "EndpointsResponse",
    "EventSort",
    "EventsPage",
    "ExecApiRequest",
    "ExecApiResponse",
    "ExecState",
    "FollowersResponse",
    "HealthResponse",
    "HostExec",
    "Problem",
    "PushEndpoint",
    "SessionSummary",
    "SessionsResponse",
]

HostName = Annotated[str, msgspec.Meta(pattern=HOST_NAME_PATTERN, max_length=63)]

ExecState = Literal["ok", "failed", "unreachable", "timeout"]
"""How one host's command ended: ``ok`` (exit 0), ``failed`` (ran, non-zero exit or error),
``unreachable`` (never ran), ``timeout`` (did not finish in time)."""


class ExecApiRequest(msgspec.Struct, frozen=True, rename="camel"):
    """``POST /api/v1/exec``: run ``command`` (argv) on every named host (mock exec mode)."""

    hosts: Annotated[list[HostName], msgspec.Meta(min_length=1)]
    command: Annotated[list[str], msgspec.Meta(min_length=1)]
    timeout_ms: Annotated[int, msgspec.Meta(ge=1)] | None = None


class HostExec(msgspec.Struct, frozen=True, rename="camel"):
    """The outcome of the command on one host."""

    host: str
    state: ExecState
    exit_code: int | None
    stdout: str
    stderr: str
    took_ms: Annotated[int, msgspec.Meta(ge=0)]
    error: str | None = None
    """Why the host did not run or finish the command (``None`` when it did)."""


class ExecApiResponse(msgspec.Struct, frozen=True, rename="camel"):
    """One :class:`HostExec` per requested host, in request order."""

    hosts: list[HostExec]


class FollowersResponse(msgspec.Struct, frozen=True, rename="camel"):
    """``GET /api/v1/followers``: followers as the access point sees them, sorted by name."""

    followers: list[FollowerStatus]


class EndpointsResponse(msgspec.Struct, frozen=True, rename="camel"):
    """``GET /api/v1/endpoints``: where this access point's other listeners are.

    A leader reaches the CONNECT listener on the host it reached the API on (or
    ``connectHost`` when set) at ``connectPort``; None means that listener is not served.
    """

    connect_port: Annotated[int, msgspec.Meta(ge=1, le=65535)] | None
    quic_port: Annotated[int, msgspec.Meta(ge=1, le=65535)] | None
    trust_domain: str
    connect_host: str | None = None


class HealthResponse(msgspec.Struct, frozen=True, rename="camel"):
    """``GET /api/v1/healthz`` and ``/readyz``."""

    status: Literal["ok", "ready"]
    version: str


class Problem(msgspec.Struct, frozen=True, rename="camel", omit_defaults=True):
    """An RFC 9457 problem document, served as ``application/problem+json``.

    ``type`` is a ``urn:ah:problem:<slug>`` URN that clients may branch on; ``detail``
    names the host / tag / token fault in words.
    """

    type: str
    title: str
    status: Annotated[int, msgspec.Meta(ge=400, le=599)]
    detail: str
    instance: str | None = None
    """The request path that produced the problem."""


class SessionSummary(msgspec.Struct, frozen=True, rename="camel"):
    """One session as ``GET /api/v1/sessions`` lists it."""

    id: str
    leader: str
    """Subject of the token that opened the session."""
    created_ms: int
    last_event_ms: float | None
    """``tsMs`` of the latest event (None before the first one)."""
    last_seq: Annotated[int, msgspec.Meta(ge=0)]
    """``seq`` of the latest event: also the number of events (0 before the first one)."""


class SessionsResponse(msgspec.Struct, frozen=True, rename="camel"):
    """``GET /api/v1/sessions``: every session, newest first."""

    sessions: list[SessionSummary]


EventSort = Literal["asc", "desc"]


class EventsPage(msgspec.Struct, frozen=True, rename="camel"):
    """``GET /api/v1/sessions/{id}/events`` as JSON: one page of the session's stored events
    matching the filters, ordered by ``seq``."""

    session_id: str
    events: list[Event]
    page: Annotated[int, msgspec.Meta(ge=1)]
    per_page: Annotated[int, msgspec.Meta(ge=1, le=200)]
    total: Annotated[int, msgspec.Meta(ge=0)]
    """Events matching the filters, over all pages."""
    sort: EventSort
    last_seq: Annotated[int, msgspec.Meta(ge=0)]
    """The session's highest ``seq`` (to follow it live from there: ``?after=lastSeq``)."""


class PushEndpoint(msgspec.Struct, frozen=True, rename="camel"):
    """``GET /api/v1/push``: where a leader pushes its session events (QUIC, ALPN
    ``alpn``, on the access point's QUIC port). Dial the host you reach the API at, unless
    it cannot carry UDP; ``host`` is what the access point advertises to followers."""

    host: str
    port: Annotated[int, msgspec.Meta(ge=1, le=65535)]
    alpn: str
    trust_domain: str
    """The access point presents ``spiffe://<trustDomain>/ah/serve``."""
