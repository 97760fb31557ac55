"""Session routes: list, info, events (JSON history or SSE), and where leaders push.

The access point implements :class:`SessionBackend` (its event store, live hub and fleet);
``create_app(..., sessions=backend)`` mounts these routes.

``GET /api/v1/sessions/{id}/events`` answers JSON (:class:`~ah_api.wire.EventsPage`) unless
the request's ``Accept`` names ``text/event-stream``: then it streams every event after the
client's position (``Last-Event-ID`` header, else ``?after=``, else ``?since=``, else the
start), history first, then live, each as ``id: <seq>\\nevent: <type>\\ndata: <json>``.
Filters: ``type`` (repeatable; both forms), ``since`` (seq >, exclusive), ``until`` (seq <=,
inclusive; JSON only), ``page``/``perPage`` (max 200)/``sort`` (JSON only).
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Collection, Sequence
from typing import Annotated, Any, Protocol, cast

import msgspec
from litestar import Request, Response, get
from litestar.datastructures import ResponseHeader
from litestar.handlers import HTTPRouteHandler
from litestar.openapi.datastructures import ResponseSpec
from litestar.openapi.spec import OpenAPIMediaType, OpenAPIResponse, OpenAPIType, Operation, Schema
from litestar.params import Parameter

from ah_domain_types import (
    EVENT_TYPES,
    SESSION_ID_PATTERN,
    SessionInfo,
    decode_event_json,
)

from .backend import SCOPE_EXEC, SCOPE_READ_LOGS, Principal
from .problems import PROBLEM_MEDIA_TYPE, ApiProblem, ProblemType
from .sse import EVENT_STREAM_MEDIA_TYPE, EventSource, EventStreamResponse, SsePump, SseSettings
from .wire import EventSort, EventsPage, Problem, PushEndpoint, SessionsResponse, SessionSummary

__all__ = [
    "LAST_SEQ_HEADER",
    "MAX_PER_PAGE",
    "SessionBackend",
    "session_routes",
]

MAX_PER_PAGE = 200
DEFAULT_PER_PAGE = 50
LAST_SEQ_HEADER = "X-AH-Last-Seq"
"""Response header of the events route: the session's highest seq when it answered."""

_SECURED: list[dict[str, list[str]]] = [{"bearerAuth": []}]


class SessionBackend(EventSource, Protocol):
    """Sessions and their events, as the access point stores them. Everything runs on the
    event loop and must be quick (SQLite on the loop is fine at this scale)."""

    def list_sessions(self) -> list[SessionSummary]:
        """Every session, newest first."""
        ...

    def get_session(self, session_id: str) -> SessionSummary | None: ...

    def count_events(
        self,
        session_id: str,
        *,
        after: int = 0,
        until: int | None = None,
        types: Collection[str] | None = None,
    ) -> int: ...

    def session_info(self, session_id: str, hosts_glob: str) -> SessionInfo | None:
        """Fleet membership of the session as the access point sees it, limited to followers
        whose names match ``hosts_glob``; None for an unknown session."""
        ...

    def push_endpoint(self) -> PushEndpoint | None:
        """Where leaders push events; None while the QUIC listener is not up."""
        ...


PrincipalFor = Callable[..., Principal]


def _problem_spec(description: str) -> ResponseSpec:
    return ResponseSpec(
        data_container=Problem,
        description=description,
        media_type=PROBLEM_MEDIA_TYPE,
        generate_examples=False,
    )


_BAD_REQUEST = _problem_spec("The request is malformed; detail names the parameter at fault.")
_UNAUTHORIZED = _problem_spec(
    "No bearer token, or it is malformed, forged, expired or for another audience."
)
_FORBIDDEN = _problem_spec("The token lacks the scope this route needs.")
_NOT_FOUND = _problem_spec("No such session on this access point.")


class _EventsOperation(Operation):
    """Documents the second media type of the events route: the SSE stream."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        ok = (self.responses or {}).get("200")
        if isinstance(ok, OpenAPIResponse):
            content = dict(ok.content or {})
            content[EVENT_STREAM_MEDIA_TYPE] = OpenAPIMediaType(
                schema=Schema(
                    type=OpenAPIType.STRING,
                    description=(
                        "Server-sent events, one per stored event: `id: <seq>`, `event: "
                        "<type>`, `data: <the event as JSON, the same object as an item of "
                        "EventsPage.events>`. Comment lines (`: ka`) keep an idle stream alive."
                    ),
                )
            )
            ok.content = content


def _check_session_id(session_id: str) -> str:
    if re.fullmatch(SESSION_ID_PATTERN, session_id) is None:
        raise ApiProblem(
            400,
            ProblemType.BAD_SESSION_ID,
            f"invalid session id {session_id!r}: expected a letter or digit followed by up to "
            "127 letters, digits, '_', '.' or '-'",
        )
    return session_id


def _check_types(types: Sequence[str] | None) -> frozenset[str] | None:
    if not types:
        return None
    unknown = sorted(set(types) - set(EVENT_TYPES))
    if unknown:
        raise ApiProblem(
            400,
            ProblemType.BAD_EVENT_TYPE,
            f"query parameter type: unknown event type(s) {', '.join(map(repr, unknown))}; "
            f"expected any of {', '.join(EVENT_TYPES)}",
        )
    return frozenset(types)


def _last_event_id(header: str | None) -> int | None:
    if header is None or not header.strip():
        return None
    text = header.strip()
    if not text.isdigit():
        raise ApiProblem(
            400,
            ProblemType.INVALID_REQUEST,
            f"header Last-Event-ID: {header!r} is not a sequence number (a non-negative integer)",
        )
    return int(text)


def _wants_event_stream(request: Request[Any, Any, Any]) -> bool:
    accept = request.headers.get("accept", "")
    return any(
        part.split(";")[0].strip().lower() == EVENT_STREAM_MEDIA_TYPE for part in accept.split(",")
    )


def session_routes(
    backend: SessionBackend, principal_for: PrincipalFor, settings: SseSettings
) -> list[HTTPRouteHandler]:
    """The route handlers, for the ``/api/v1`` router."""

    def known_session(session_id: str) -> SessionSummary:
        summary = backend.get_session(_check_session_id(session_id))
        if summary is None:
            raise ApiProblem(
                404, ProblemType.UNKNOWN_SESSION, f"no session {session_id!r} on this access point"
            )
        return summary

    @get(
        "/sessions",
        sync_to_thread=False,
        summary="List sessions",
        tags=["sessions"],
        security=_SECURED,
        responses={401: _UNAUTHORIZED, 403: _FORBIDDEN},
    )
    def sessions(request: Request[Any, Any, Any]) -> SessionsResponse:
        """Every session this access point holds events for, newest first. Needs scope
        ``read-logs``."""
        principal_for(request, any_of=(SCOPE_READ_LOGS,))
        return SessionsResponse(sessions=backend.list_sessions())

    @get(
        "/sessions/{session_id:str}/info",
        sync_to_thread=False,
        summary="Session info",
        tags=["sessions"],
        security=_SECURED,
        responses={400: _BAD_REQUEST, 401: _UNAUTHORIZED, 403: _FORBIDDEN, 404: _NOT_FOUND},
    )
    def session_info(request: Request[Any, Any, Any], session_id: str) -> SessionInfo:
        """The session's leader, its followers as the access point sees them (OS, tags,
        health, last heartbeat, and the data-plane path the session's latest
        ``connect.path.*`` event fixed), and its endpoints. Needs scope ``read-logs``."""
        principal = principal_for(request, any_of=(SCOPE_READ_LOGS,))
        known_session(session_id)
        info = backend.session_info(session_id, principal.hosts_glob)
        if info is None:
            raise ApiProblem(
                404, ProblemType.UNKNOWN_SESSION, f"no session {session_id!r} on this access point"
            )
        followers = [
            f for f in info.followers if fnmatch.fnmatchcase(f.info.name, principal.hosts_glob)
        ]
        if len(followers) != len(info.followers):
            info = msgspec.structs.replace(info, followers=followers)
        return info

    @get(
        "/sessions/{session_id:str}/events",
        summary="Session events (JSON history or SSE)",
        tags=["sessions"],
        security=_SECURED,
        operation_class=_EventsOperation,
        response_headers=[
            ResponseHeader(
                name=LAST_SEQ_HEADER,
                description="The session's highest seq when the request was answered.",
                documentation_only=True,
                required=True,
            ),
        ],
        responses={400: _BAD_REQUEST, 401: _UNAUTHORIZED, 403: _FORBIDDEN, 404: _NOT_FOUND},
    )
    async def session_events(
        request: Request[Any, Any, Any],
        session_id: str,
        type_: Annotated[
            list[str] | None,
            Parameter(
                query="type",
                description="Only events of this type (repeat for several): "
                + ", ".join(EVENT_TYPES),
            ),
        ] = None,
        since: Annotated[
            int | None,
            Parameter(ge=0, description="Only events with a seq above this (exclusive)."),
        ] = None,
        until: Annotated[
            int | None,
            Parameter(
                ge=0, description="JSON only: only events with a seq up to this (inclusive)."
            ),
        ] = None,
        page: Annotated[int, Parameter(ge=1, description="JSON only: 1-based page.")] = 1,
        per_page: Annotated[
            int,
            Parameter(
                query="perPage",
                ge=1,
                le=MAX_PER_PAGE,
                description=f"JSON only: events per page (at most {MAX_PER_PAGE}).",
            ),
        ] = DEFAULT_PER_PAGE,
        sort: Annotated[
            EventSort, Parameter(description="JSON only: by seq, ascending or descending.")
        ] = "asc",
        after: Annotated[
            int | None,
            Parameter(
                ge=0,
                description="SSE only: resume after this seq (the Last-Event-ID header wins).",
            ),
        ] = None,
        last_event_id: Annotated[
            str | None,
            Parameter(
                header="Last-Event-ID",
                description="SSE only: the id of the last event the client got; the stream "
                "resumes right after it.",
            ),
        ] = None,
    ) -> Response[EventsPage]:
        """The session's events. With ``Accept: text/event-stream``: every event after the
        client's position (``Last-Event-ID``, else ``after``, else ``since``), stored ones
        first, then live ones as they arrive, each exactly once; a session without events
        yet is followed until they come. Otherwise one JSON page of stored events. Needs
        scope ``read-logs``."""
        principal_for(request, any_of=(SCOPE_READ_LOGS,))
        _check_session_id(session_id)
        types = _check_types(type_)
        if _wants_event_stream(request):
            resume = _last_event_id(last_event_id)
            if resume is None:
                resume = after if after is not None else (since or 0)
            summary = backend.get_session(session_id)
            last_seq = summary.last_seq if summary is not None else 0
            pump = SsePump(backend, session_id, after=resume, types=types, settings=settings)
            stream = EventStreamResponse(pump, headers={LAST_SEQ_HEADER: str(last_seq)})
            # The annotation documents the JSON form; the stream is a Response too.
            return cast("Response[EventsPage]", stream)
        summary = known_session(session_id)
        lower = since or 0
        total = backend.count_events(session_id, after=lower, until=until, types=types)
        stored = backend.read_events(
            session_id,
            after=lower,
            until=until,
            types=types,
            limit=per_page,
            offset=(page - 1) * per_page,
            descending=sort == "desc",
        )
        body = EventsPage(
            session_id=session_id,
            events=[decode_event_json(e.data) for e in stored],
            page=page,
            per_page=per_page,
            total=total,
            sort=sort,
            last_seq=summary.last_seq,
        )
        return Response(body, headers={LAST_SEQ_HEADER: str(summary.last_seq)})

    @get(
        "/push",
        sync_to_thread=False,
        summary="Where leaders push session events",
        tags=["sessions"],
        security=_SECURED,
        responses={
            401: _UNAUTHORIZED,
            403: _FORBIDDEN,
            503: _problem_spec("The QUIC listener is not up yet."),
        },
    )
    def push_endpoint(request: Request[Any, Any, Any]) -> PushEndpoint:
        """The QUIC endpoint (ALPN ``ah-leader/1``) where ``ah-fleetctl run``/``fence`` push
        their events, authenticated by the same token. Needs scope ``exec``."""
        principal_for(request, any_of=(SCOPE_EXEC,))
        endpoint = backend.push_endpoint()
        if endpoint is None:
            raise ApiProblem(503, ProblemType.NOT_READY, "the QUIC listener is not up yet")
        return endpoint

    return [sessions, session_info, session_events, push_endpoint]
