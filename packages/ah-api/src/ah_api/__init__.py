"""ah-api: the Agent Harbor fleet REST API (litestar), served over TLS by uvicorn.

The access point daemon implements :class:`FleetBackend` and an :class:`Authenticator`
(usually :class:`JwtAuthenticator`), builds the app with :func:`create_app` and serves it
with :class:`ApiServer`.
"""

from __future__ import annotations

# Importing the app pulls in litestar, uvicorn and aioquic (about a second of start-up). The
# wire types and problems are all a client needs, so everything else loads on first use.
import importlib
from typing import TYPE_CHECKING, Any

from .merge import ReplayLiveMerge
from .problems import PROBLEM_MEDIA_TYPE, ApiProblem, ProblemType
from .wire import (
    API_BASE_PATH,
    EndpointsResponse,
    EventSort,
    EventsPage,
    ExecApiRequest,
    ExecApiResponse,
    ExecState,
    FollowersResponse,
    HealthResponse,
    HostExec,
    Problem,
    PushEndpoint,
    SessionsResponse,
    SessionSummary,
)

if TYPE_CHECKING:
    from .app import (
        BEARER_SCHEME,
        CA_FINGERPRINT_HEADER,
        DOCS_PATH,
        OPENAPI_PATH,
        create_app,
    )
    from .backend import (
        SCOPE_EXEC,
        SCOPE_READ_LOGS,
        SCOPE_SSH,
        Authenticator,
        AuthFailed,
        AuthFailureReason,
        EnrollmentRefusal,
        EnrollmentRefused,
        FleetBackend,
        JwtAuthenticator,
        Principal,
    )
    from .server import ApiServer, ApiServerError
    from .sessions import LAST_SEQ_HEADER, MAX_PER_PAGE, SessionBackend, session_routes
    from .sse import (
        EVENT_STREAM_MEDIA_TYPE,
        EventHub,
        EventStreamResponse,
        SsePump,
        SseSettings,
        StoredEvent,
        Subscription,
    )

_LAZY = {
    **dict.fromkeys(
        [
            "BEARER_SCHEME",
            "CA_FINGERPRINT_HEADER",
            "DOCS_PATH",
            "OPENAPI_PATH",
            "create_app",
        ],
        ".app",
    ),
    **dict.fromkeys(
        [
            "SCOPE_EXEC",
            "SCOPE_READ_LOGS",
            "SCOPE_SSH",
            "Authenticator",
            "AuthFailed",
            "AuthFailureReason",
            "EnrollmentRefusal",
            "EnrollmentRefused",
            "FleetBackend",
            "JwtAuthenticator",
            "Principal",
        ],
        ".backend",
    ),
    **dict.fromkeys(["ApiServer", "ApiServerError"], ".server"),
    **dict.fromkeys(
        ["LAST_SEQ_HEADER", "MAX_PER_PAGE", "SessionBackend", "session_routes"], ".sessions"
    ),
    **dict.fromkeys(
        [
            "EVENT_STREAM_MEDIA_TYPE",
            "EventHub",
            "EventStreamResponse",
            "SsePump",
            "SseSettings",
            "StoredEvent",
            "Subscription",
        ],
        ".sse",
    ),
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'ah_api' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


__all__ = [
    "API_BASE_PATH",
    "BEARER_SCHEME",
    "CA_FINGERPRINT_HEADER",
    "DOCS_PATH",
    "EVENT_STREAM_MEDIA_TYPE",
    "LAST_SEQ_HEADER",
    "MAX_PER_PAGE",
    "OPENAPI_PATH",
    "PROBLEM_MEDIA_TYPE",
    "SCOPE_EXEC",
    "SCOPE_READ_LOGS",
    "SCOPE_SSH",
    "ApiProblem",
    "ApiServer",
    "ApiServerError",
    "AuthFailed",
    "AuthFailureReason",
    "Authenticator",
    "EndpointsResponse",
    "EnrollmentRefusal",
    "EnrollmentRefused",
    "EventHub",
    "EventSort",
    "EventStreamResponse",
    "EventsPage",
    "ExecApiRequest",
    "ExecApiResponse",
    "ExecState",
    "FleetBackend",
    "FollowersResponse",
    "HealthResponse",
    "HostExec",
    "JwtAuthenticator",
    "Principal",
    "Problem",
    "ProblemType",
    "PushEndpoint",
    "ReplayLiveMerge",
    "SessionBackend",
    "SessionSummary",
    "SessionsResponse",
    "SsePump",
    "SseSettings",
    "StoredEvent",
    "Subscription",
    "create_app",
    "session_routes",
]
