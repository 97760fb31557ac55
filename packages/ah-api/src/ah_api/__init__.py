"""ah-api: the Agent Harbor fleet REST API (litestar), served over TLS by uvicorn.

The access point daemon implements :class:`FleetBackend` and an :class:`Authenticator`
(usually :class:`JwtAuthenticator`), builds the app with :func:`create_app` and serves it
with :class:`ApiServer`.
"""

from __future__ import annotations

from .app import (
    API_BASE_PATH,
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
from .problems import PROBLEM_MEDIA_TYPE, ApiProblem, ProblemType
from .server import ApiServer, ApiServerError
from .wire import (
    ExecApiRequest,
    ExecApiResponse,
    ExecState,
    FollowersResponse,
    HealthResponse,
    HostExec,
    Problem,
)

__all__ = [
    "API_BASE_PATH",
    "BEARER_SCHEME",
    "CA_FINGERPRINT_HEADER",
    "DOCS_PATH",
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
    "EnrollmentRefusal",
    "EnrollmentRefused",
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
    "create_app",
]
