"""The litestar application: routes under ``/api/v1``, problem+json errors, OpenAPI."""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Callable, Sequence
from typing import Annotated, Any

import msgspec
from litestar import Litestar, MediaType, Request, Response, Router, get, post
from litestar.datastructures import ResponseHeader
from litestar.enums import RequestEncodingType
from litestar.exceptions import HTTPException, ValidationException
from litestar.openapi.config import OpenAPIConfig
from litestar.openapi.datastructures import ResponseSpec
from litestar.openapi.plugins import SwaggerRenderPlugin
from litestar.openapi.spec import Components, SecurityScheme
from litestar.params import Body, Parameter
from litestar.static_files import create_static_files_router
from litestar.types import ExceptionHandlersMap

from ah_domain_types import EnrollRequest, EnrollResponse, SelectorError, TagSelector

from .backend import (
    SCOPE_EXEC,
    SCOPE_READ_LOGS,
    SCOPE_SSH,
    Authenticator,
    AuthFailed,
    EnrollmentRefusal,
    EnrollmentRefused,
    FleetBackend,
    Principal,
)
from .problems import PROBLEM_MEDIA_TYPE, ApiProblem, ProblemType
from .sessions import SessionBackend, session_routes
from .sse import SseSettings
from .wire import (
    EndpointsResponse,
    ExecApiRequest,
    ExecApiResponse,
    FollowersResponse,
    HealthResponse,
    Problem,
)

__all__ = [
    "API_BASE_PATH",
    "BEARER_SCHEME",
    "CA_FINGERPRINT_HEADER",
    "DOCS_PATH",
    "OPENAPI_PATH",
    "create_app",
]

from .wire import API_BASE_PATH

OPENAPI_PATH = f"{API_BASE_PATH}/openapi.json"
DOCS_PATH = f"{API_BASE_PATH}/docs"
DOCS_ASSETS_PATH = f"{DOCS_PATH}/assets"
"""Swagger UI's scripts and stylesheet, served from the ``swagger-ui-bundle`` wheel: the docs
page works on machines without internet access (litestar would load them from a CDN)."""
CA_FINGERPRINT_HEADER = "X-AH-CA-Fingerprint"
BEARER_SCHEME = "bearerAuth"
"""Name of the bearer-token security scheme in the OpenAPI document."""

_log = logging.getLogger("ah_api")

_JSON_BODY = Body(media_type=RequestEncodingType.JSON)
_SECURED: list[dict[str, list[str]]] = [{BEARER_SCHEME: []}]
_WWW_AUTHENTICATE = 'Bearer realm="ah-api"'

_TOKEN_PROBLEMS: dict[str, ProblemType] = {
    "missing": ProblemType.TOKEN_MISSING,
    "malformed": ProblemType.TOKEN_MALFORMED,
    "forged": ProblemType.TOKEN_FORGED,
    "expired": ProblemType.TOKEN_EXPIRED,
    "wrong-audience": ProblemType.TOKEN_WRONG_AUDIENCE,
    "missing-scope": ProblemType.MISSING_SCOPE,
}

_ENROLL_REFUSALS: dict[EnrollmentRefusal, tuple[int, ProblemType]] = {
    "malformed": (401, ProblemType.ENROLL_MALFORMED),
    "forged": (401, ProblemType.ENROLL_FORGED),
    "expired": (401, ProblemType.ENROLL_EXPIRED),
    "unknown": (401, ProblemType.ENROLL_UNKNOWN),
    "wrong-name": (403, ProblemType.ENROLL_WRONG_NAME),
    "reused": (409, ProblemType.ENROLL_REUSED),
}


def _problem_spec(description: str) -> ResponseSpec:
    return ResponseSpec(
        data_container=Problem,
        description=description,
        media_type=PROBLEM_MEDIA_TYPE,
        generate_examples=False,
    )


_BAD_REQUEST = _problem_spec("The request is malformed; detail names the field or value at fault.")
_UNAUTHORIZED = _problem_spec(
    "No bearer token, or it is malformed, forged, expired or for another audience."
)
_FORBIDDEN = _problem_spec("The token lacks the scope, or a host is outside its hosts glob.")


def _problem_response(
    status: int,
    problem_type: ProblemType,
    detail: str,
    request: Request[Any, Any, Any],
    *,
    title: str | None = None,
    headers: dict[str, str] | None = None,
) -> Response[Problem]:
    problem = ApiProblem(status, problem_type, detail, title=title, headers=headers)
    return _api_problem_response(request, problem)


def _api_problem_response(request: Request[Any, Any, Any], exc: ApiProblem) -> Response[Problem]:
    return Response(
        exc.to_problem(instance=request.url.path),
        status_code=exc.status,
        media_type=PROBLEM_MEDIA_TYPE,
        headers=exc.headers,
    )


def _validation_detail(exc: ValidationException) -> str:
    parts = [str(exc.detail)]
    extra = exc.extra
    items: Sequence[Any] = extra if isinstance(extra, list) else [extra] if extra else []
    for item in items:
        if isinstance(item, dict):
            message = item.get("message")
            key = item.get("key")
            source = item.get("source")
            where = f" ({source} {key})" if key and source else f" ({key})" if key else ""
            if message:
                parts.append(f"{message}{where}")
        elif item:
            parts.append(str(item))
    return "; ".join(parts)


def _http_exception_response(
    request: Request[Any, Any, Any], exc: HTTPException
) -> Response[Problem]:
    status = exc.status_code
    headers = dict(exc.headers or {})
    if status == 404:
        return _problem_response(
            404,
            ProblemType.NOT_FOUND,
            f"no such resource: {request.method} {request.url.path}",
            request,
            headers=headers,
        )
    if status == 405:
        allowed = headers.get("allow") or headers.get("Allow")
        suffix = f"; allowed: {allowed}" if allowed else ""
        return _problem_response(
            405,
            ProblemType.METHOD_NOT_ALLOWED,
            f"method {request.method} is not allowed on {request.url.path}{suffix}",
            request,
            headers=headers,
        )
    if status == 400:
        detail = _validation_detail(exc) if isinstance(exc, ValidationException) else exc.detail
        return _problem_response(
            400, ProblemType.INVALID_REQUEST, str(detail), request, headers=headers
        )
    if status >= 500:
        _log.error("HTTP %s while serving %s %s: %s", status, request.method, request.url.path, exc)
        return _problem_response(
            status, ProblemType.INTERNAL, "the server failed to answer the request", request
        )
    return _problem_response(status, ProblemType.HTTP, str(exc.detail), request, headers=headers)


def _internal_error_response(request: Request[Any, Any, Any], exc: Exception) -> Response[Problem]:
    # The traceback goes to the log, never into the response.
    _log.error(
        "unhandled %s while serving %s %s",
        type(exc).__name__,
        request.method,
        request.url.path,
        exc_info=exc,
    )
    return _problem_response(
        500,
        ProblemType.INTERNAL,
        f"internal error while serving {request.method} {request.url.path}; see the server log",
        request,
    )


def _bearer_token(request: Request[Any, Any, Any]) -> str | None:
    header = request.headers.get("authorization")
    if header is None:
        return None
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiProblem(
            401,
            ProblemType.TOKEN_MALFORMED,
            "the Authorization header must be 'Bearer <jwt>'",
            headers={"WWW-Authenticate": _WWW_AUTHENTICATE},
        )
    return token.strip()


def _auth_problem(exc: AuthFailed) -> ApiProblem:
    problem_type = _TOKEN_PROBLEMS.get(exc.reason, ProblemType.TOKEN_MALFORMED)
    headers = {}
    if exc.status == 401:
        headers["WWW-Authenticate"] = f'{_WWW_AUTHENTICATE}, error="invalid_token"'
    return ApiProblem(exc.status, problem_type, exc.message, headers=headers)


def _host_allowed(principal: Principal, host: str) -> bool:
    return fnmatch.fnmatchcase(host, principal.hosts_glob)


def create_app(
    backend: FleetBackend,
    authenticator: Authenticator,
    *,
    version: str,
    title: str = "Agent Harbor fleet API",
    sessions: SessionBackend | None = None,
    sse: SseSettings | None = None,
    endpoints: Callable[[], EndpointsResponse] | None = None,
) -> Litestar:
    """The REST API over ``backend``; every request needing a token goes through
    ``authenticator``. ``version`` is reported by ``healthz``/``readyz`` and the OpenAPI info.
    With ``sessions``, the session routes (list, info, events as JSON or SSE, push endpoint)
    are mounted too (``sse`` tunes their event streams). ``endpoints`` answers
    ``GET /endpoints`` (the CONNECT port leaders use; without it the route says none)."""

    def principal_for(request: Request[Any, Any, Any], *, any_of: Sequence[str]) -> Principal:
        bearer = _bearer_token(request)
        required = any_of[0] if len(any_of) == 1 else None
        try:
            principal = authenticator.authenticate(bearer, required)
        except AuthFailed as exc:
            raise _auth_problem(exc) from None
        if not principal.scopes.intersection(any_of):
            wanted = " or ".join(repr(s) for s in any_of)
            have = ", ".join(sorted(principal.scopes)) or "none"
            raise ApiProblem(
                403,
                ProblemType.MISSING_SCOPE,
                f"token of {principal.subject!r} lacks scope {wanted} (has: {have})",
            )
        return principal

    @get("/healthz", sync_to_thread=False, summary="Liveness", tags=["health"])
    def healthz() -> HealthResponse:
        """Always 200 while the process serves HTTP."""
        return HealthResponse(status="ok", version=version)

    @get(
        "/readyz",
        sync_to_thread=False,
        summary="Readiness",
        tags=["health"],
        responses={503: _problem_spec("Not every listener of the access point is up yet.")},
    )
    def readyz() -> HealthResponse:
        """200 once every listener accepts connections, else 503."""
        if not backend.is_ready():
            raise ApiProblem(
                503, ProblemType.NOT_READY, "the access point is starting: not every listener is up"
            )
        return HealthResponse(status="ready", version=version)

    @get(
        "/ca",
        sync_to_thread=False,
        media_type=MediaType.TEXT,
        summary="Fleet CA certificate (PEM)",
        response_headers=[
            ResponseHeader(
                name=CA_FINGERPRINT_HEADER,
                description="sha256:<hex> of the CA certificate (DER); informational, "
                "clients must compute and compare it themselves.",
                documentation_only=True,
            )
        ],
        tags=["enrollment"],
    )
    def ca() -> Response[str]:
        """The fleet CA; clients compute its sha256 fingerprint themselves and compare it with
        the one they were given out of band (the header is informational only)."""
        return Response(backend.ca_pem(), headers={CA_FINGERPRINT_HEADER: backend.ca_fingerprint()})

    @post(
        "/enroll",
        status_code=200,
        summary="Enroll a follower",
        tags=["enrollment"],
        responses={
            400: _BAD_REQUEST,
            401: _problem_spec("The enrollment token is malformed, forged, expired or unknown."),
            403: _problem_spec("The enrollment token was issued for another follower name."),
            409: _problem_spec("The one-time enrollment token was already used."),
        },
    )
    async def enroll(data: Annotated[EnrollRequest, _JSON_BODY]) -> EnrollResponse:
        """Exchange a one-time enrollment token and a CSR for a follower certificate."""
        try:
            return await backend.enroll(data)
        except EnrollmentRefused as exc:
            status, problem_type = _ENROLL_REFUSALS.get(
                exc.reason, (401, ProblemType.ENROLL_UNKNOWN)
            )
            raise ApiProblem(
                status, problem_type, f"enrollment of {data.name!r} refused: {exc.message}"
            ) from None

    @get(
        "/followers",
        sync_to_thread=False,
        summary="List followers",
        tags=["fleet"],
        security=_SECURED,
        responses={400: _BAD_REQUEST, 401: _UNAUTHORIZED, 403: _FORBIDDEN},
    )
    def followers(
        request: Request[Any, Any, Any],
        tag: Annotated[
            list[str] | None,
            Parameter(
                description="KEY=VALUE tag filter (e.g. os=linux); repeat to AND several.",
            ),
        ] = None,
    ) -> FollowersResponse:
        """Followers as the access point sees them (only those the token's hosts glob covers),
        filtered by every ``tag`` given. Needs scope ``read-logs`` or ``exec``."""
        principal = principal_for(request, any_of=(SCOPE_READ_LOGS, SCOPE_EXEC))
        selectors: list[TagSelector] = []
        for text in tag or ():
            try:
                selectors.append(TagSelector.parse(text))
            except (SelectorError, msgspec.ValidationError) as exc:
                raise ApiProblem(400, ProblemType.BAD_TAG, f"query parameter tag: {exc}") from None
        chosen = [
            f
            for f in backend.list_followers()
            if _host_allowed(principal, f.info.name) and all(s.matches(f.info) for s in selectors)
        ]
        chosen.sort(key=lambda f: f.info.name)
        return FollowersResponse(followers=chosen)

    @get(
        "/endpoints",
        sync_to_thread=False,
        summary="Listener endpoints (CONNECT port)",
        tags=["fleet"],
        security=_SECURED,
        responses={401: _UNAUTHORIZED, 403: _FORBIDDEN},
    )
    def endpoints_(request: Request[Any, Any, Any]) -> EndpointsResponse:
        """Where the access point's CONNECT (and QUIC) listeners are, for leaders choosing a
        data-plane path. Needs a token with scope ``ssh``, ``exec`` or ``read-logs``."""
        principal_for(request, any_of=(SCOPE_SSH, SCOPE_EXEC, SCOPE_READ_LOGS))
        if endpoints is None:
            return EndpointsResponse(connect_port=None, quic_port=None, trust_domain="")
        return endpoints()

    @post(
        "/exec",
        status_code=200,
        summary="Run a command on followers (mock exec mode)",
        tags=["fleet"],
        security=_SECURED,
        responses={
            400: _BAD_REQUEST,
            401: _UNAUTHORIZED,
            403: _FORBIDDEN,
            404: _problem_spec("A requested host is not an enrolled follower."),
        },
    )
    async def exec_(
        request: Request[Any, Any, Any], data: Annotated[ExecApiRequest, _JSON_BODY]
    ) -> ExecApiResponse:
        """Run ``command`` on every host; needs scope ``exec`` and every host inside the token's
        hosts glob. A host that fails or never answers is a result, not an error."""
        principal = principal_for(request, any_of=(SCOPE_EXEC,))
        seen: set[str] = set()
        for host in data.hosts:
            if host in seen:
                raise ApiProblem(400, ProblemType.INVALID_REQUEST, f"host {host!r} listed twice")
            seen.add(host)
        for host in data.hosts:
            if not _host_allowed(principal, host):
                raise ApiProblem(
                    403,
                    ProblemType.HOST_FORBIDDEN,
                    f"host {host!r} is outside the hosts allowed to {principal.subject!r} "
                    f"(glob {principal.hosts_glob!r})",
                )
        known = {f.info.name for f in backend.list_followers()}
        for host in data.hosts:
            if host not in known:
                raise ApiProblem(
                    404, ProblemType.UNKNOWN_HOST, f"host {host!r} is not an enrolled follower"
                )
        results = await backend.exec_mock(list(data.hosts), list(data.command), data.timeout_ms)
        return ExecApiResponse(hosts=results)

    openapi_cache: list[bytes] = []

    @get(
        "/openapi.json",
        sync_to_thread=False,
        include_in_schema=False,
        media_type="application/vnd.oai.openapi+json",
    )
    def openapi_json(request: Request[Any, Any, Any]) -> bytes:
        if not openapi_cache:
            openapi_cache.append(msgspec.json.encode(request.app.openapi_schema.to_schema()))
        return openapi_cache[0]

    def docs_not_found_as_problem(response: Response[Any]) -> Response[Any]:
        # litestar's docs router answers unknown sub-paths with an HTML 404; keep errors uniform.
        if response.status_code == 404:
            return Response(
                Problem(
                    type=ProblemType.NOT_FOUND.value,
                    title="Not Found",
                    status=404,
                    detail=f"no such documentation page under {DOCS_PATH}",
                ),
                status_code=404,
                media_type=PROBLEM_MEDIA_TYPE,
            )
        return response

    docs_router = Router(
        DOCS_PATH,
        route_handlers=[],
        include_in_schema=False,
        after_request=docs_not_found_as_problem,
    )
    openapi_config = OpenAPIConfig(
        title=title,
        version=version,
        description=(
            "REST API of an Agent Harbor fleet access point. Errors are "
            "application/problem+json documents whose `type` is a `urn:ah:problem:*` URN."
        ),
        components=Components(
            security_schemes={
                BEARER_SCHEME: SecurityScheme(
                    type="http",
                    scheme="bearer",
                    bearer_format="JWT",
                    description="A user token from `ah-access-pointd token user`.",
                )
            }
        ),
        render_plugins=[
            SwaggerRenderPlugin(
                path="/",
                js_url=f"{DOCS_ASSETS_PATH}/swagger-ui-bundle.js",
                css_url=f"{DOCS_ASSETS_PATH}/swagger-ui.css",
                standalone_preset_js_url=f"{DOCS_ASSETS_PATH}/swagger-ui-standalone-preset.js",
            )
        ],
        openapi_router=docs_router,
    )
    exception_handlers: ExceptionHandlersMap = {
        ApiProblem: _api_problem_response,
        HTTPException: _http_exception_response,
        Exception: _internal_error_response,
        500: _internal_error_response,
    }
    # -- session events (issue 7) --------------------------------------------------------
    session_handlers = (
        session_routes(sessions, principal_for, sse or SseSettings())
        if sessions is not None
        else []
    )
    # -------------------------------------------------------------------------------------
    api = Router(
        API_BASE_PATH,
        route_handlers=[
            healthz,
            readyz,
            ca,
            enroll,
            followers,
            endpoints_,
            exec_,
            openapi_json,
            *session_handlers,
        ],
    )
    from swagger_ui_bundle import swagger_ui_path  # type: ignore[import-untyped]  # a path only

    docs_assets = create_static_files_router(
        DOCS_ASSETS_PATH, directories=[swagger_ui_path], include_in_schema=False
    )
    return Litestar(
        route_handlers=[api, docs_assets],
        openapi_config=openapi_config,
        exception_handlers=exception_handlers,
        logging_config=None,
        debug=False,
    )
