"""The REST client of the access point: httpx over verified TLS, problems mapped to exit codes.

Every failure leaves this module as a :class:`ah_config.CliError` whose exit code is the
spec's: a refused token or a missing scope → 4 (auth), an unknown host → 7 (validation),
connection refused, timeouts and server failures → 5 (network). The message always names
the access point and carries the server's problem ``detail``.
"""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import httpx
import msgspec

from ah_api import (
    API_BASE_PATH,
    PROBLEM_MEDIA_TYPE,
    EndpointsResponse,
    EventsPage,
    ExecApiRequest,
    ExecApiResponse,
    FollowersResponse,
    Problem,
    ProblemType,
    PushEndpoint,
    SessionsResponse,
)
from ah_config import CliError
from ah_domain_types import ExitCode, SessionInfo

__all__ = [
    "ApiClient",
    "tls_context",
]

_READ_TIMEOUT_S = 30.0
_BODY_EXCERPT = 200

_T = TypeVar("_T")


def tls_context(ca_file: Path | None = None, *, ca_pem: str | None = None) -> ssl.SSLContext:
    """A client context that verifies the chain and the host name: against the pinned fleet
    CA (``ca_file`` or ``ca_pem``) when there is one, else against the system trust store."""
    if ca_pem is not None:
        return ssl.create_default_context(cadata=ca_pem)
    if ca_file is None:
        return ssl.create_default_context()
    try:
        return ssl.create_default_context(cafile=str(ca_file))
    except (OSError, ssl.SSLError) as exc:
        raise CliError(
            ExitCode.CONFIGURATION,
            f"cannot load the fleet CA file {ca_file} (config key ca-file): {exc}; "
            "run `ah-fleetctl login` again to fetch and pin it",
            kind="configuration",
            details={"key": "ca-file", "source": str(ca_file)},
        ) from None


def _causes(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _is_certificate_failure(exc: BaseException) -> bool:
    return any(
        isinstance(e, ssl.SSLCertVerificationError) or "CERTIFICATE_VERIFY_FAILED" in str(e)
        for e in _causes(exc)
    )


class ApiClient:
    """A synchronous client of one access point's ``/api/v1``; use it as a context manager."""

    def __init__(
        self,
        base_url: str,
        *,
        token: str | None,
        verify: ssl.SSLContext,
        ca_description: str,
        connect_timeout_s: float,
        read_timeout_s: float = _READ_TIMEOUT_S,
    ) -> None:
        """``ca_description`` says what ``verify`` trusts (for messages), e.g. the CA file."""
        self.base_url = base_url
        self.ca_description = ca_description
        self._connect_timeout_s = connect_timeout_s
        headers = {"Accept": "application/json"}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        self._http = httpx.Client(
            base_url=base_url,
            verify=verify,
            headers=headers,
            timeout=httpx.Timeout(read_timeout_s, connect=connect_timeout_s),
            follow_redirects=False,
            trust_env=False,
        )

    def __enter__(self) -> ApiClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # ------------------------------------------------------------------ endpoints

    def ca_pem(self) -> str:
        """``GET /api/v1/ca``: the fleet CA certificate as PEM text (no auth)."""
        return self._request("GET", "/ca", headers={"Accept": "text/plain"}).text

    def followers(self, tags: Sequence[str] = ()) -> FollowersResponse:
        """``GET /api/v1/followers`` (optionally filtered by ``KEY=VALUE`` tags)."""
        params = [("tag", t) for t in tags]
        response = self._request("GET", "/followers", params=params)
        return self._decode(response, FollowersResponse)

    def endpoints(self) -> EndpointsResponse:
        """``GET /api/v1/endpoints``: the access point's CONNECT port (data plane)."""
        return self._decode(self._request("GET", "/endpoints"), EndpointsResponse)

    def exec_mock(self, request: ExecApiRequest, *, wait_s: float | None = None) -> ExecApiResponse:
        """``POST /api/v1/exec``; ``wait_s`` is how long to wait for the answer (the command's
        timeout plus a margin) when it may exceed the usual read timeout."""
        timeout = None
        if wait_s is not None:
            timeout = httpx.Timeout(wait_s, connect=self._connect_timeout_s)
        response = self._request(
            "POST",
            "/exec",
            content=msgspec.json.encode(request),
            headers={"Content-Type": "application/json"},
            timeout=timeout,
        )
        return self._decode(response, ExecApiResponse)

    # ------------------------------------------------------------------ sessions

    def sessions(self) -> SessionsResponse:
        """``GET /api/v1/sessions``."""
        return self._decode(self._request("GET", "/sessions"), SessionsResponse)

    def session_info(self, session_id: str) -> SessionInfo:
        """``GET /api/v1/sessions/{id}/info``; an unknown session is exit 7."""
        response = self._request("GET", f"/sessions/{session_id}/info")
        return self._decode(response, SessionInfo)

    def session_events(
        self,
        session_id: str,
        *,
        since: int = 0,
        types: Sequence[str] = (),
        page: int = 1,
        per_page: int = 200,
    ) -> EventsPage:
        """One page of ``GET /api/v1/sessions/{id}/events`` (JSON history)."""
        params = [("since", str(since)), ("page", str(page)), ("perPage", str(per_page))]
        params += [("type", t) for t in types]
        response = self._request("GET", f"/sessions/{session_id}/events", params=params)
        return self._decode(response, EventsPage)

    def push_endpoint(self) -> PushEndpoint:
        """``GET /api/v1/push``: where this leader pushes session events."""
        return self._decode(self._request("GET", "/push"), PushEndpoint)

    @contextlib.contextmanager
    def event_stream(
        self,
        session_id: str,
        *,
        after: int,
        types: Sequence[str] = (),
        read_timeout_s: float = 60.0,
    ) -> Iterator[httpx.Response]:
        """The SSE stream of a session from just after seq ``after`` (``Last-Event-ID``).
        A refusal (401/403/404...) is a CliError; a network failure stays an
        ``httpx.TransportError`` so that followers can tell it apart and reconnect."""
        url = self._url(f"/sessions/{session_id}/events")
        headers = {"Accept": "text/event-stream", "Last-Event-ID": str(after)}
        with self._http.stream(
            "GET",
            f"{API_BASE_PATH}/sessions/{session_id}/events",
            params=[("type", t) for t in types],
            headers=headers,
            timeout=httpx.Timeout(read_timeout_s, connect=self._connect_timeout_s),
        ) as response:
            if not response.is_success:
                response.read()
                raise self._problem_error("GET", url, response)
            yield response

    def transport_error(self, exc: httpx.TransportError, url: str) -> CliError:
        """The CliError for a network failure on ``url`` (what `event_stream` leaves raw)."""
        return self._transport_error("GET", url, exc)

    # ------------------------------------------------------------------ plumbing

    def _url(self, path: str) -> str:
        return f"{self.base_url}{API_BASE_PATH}{path}"

    def _request(
        self,
        method: str,
        path: str,
        *,
        params: Sequence[tuple[str, str]] = (),
        content: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        timeout: httpx.Timeout | None = None,
    ) -> httpx.Response:
        url = self._url(path)
        extra: dict[str, Any] = {}
        if timeout is not None:
            extra["timeout"] = timeout
        try:
            response = self._http.request(
                method,
                f"{API_BASE_PATH}{path}",
                params=list(params),
                content=content,
                headers=dict(headers or {}),
                **extra,
            )
        except httpx.TimeoutException as exc:
            raise CliError(
                ExitCode.NETWORK,
                f"access point {self.base_url} did not answer {method} {url} in time "
                f"({type(exc).__name__})",
                kind="network",
                details={"url": url},
            ) from None
        except httpx.TransportError as exc:
            raise self._transport_error(method, url, exc) from None
        if response.is_success:
            return response
        raise self._problem_error(method, url, response)

    def _transport_error(self, method: str, url: str, exc: httpx.TransportError) -> CliError:
        if _is_certificate_failure(exc):
            return CliError(
                ExitCode.AUTH,
                f"TLS verification of access point {self.base_url} failed against "
                f"{self.ca_description}: {exc}; if the fleet CA changed, run "
                "`ah-fleetctl login` again",
                kind="tls",
                details={"url": url, "ca": self.ca_description},
            )
        reason = str(exc) or type(exc).__name__
        return CliError(
            ExitCode.NETWORK,
            f"cannot reach access point {self.base_url} ({method} {url}): {reason}",
            kind="network",
            details={"url": url},
        )

    def _problem_error(self, method: str, url: str, response: httpx.Response) -> CliError:
        status = response.status_code
        problem = _read_problem(response)
        detail = problem.detail if problem is not None else _excerpt(response)
        problem_type = problem.type if problem is not None else ""
        details = {"url": url, "status": str(status)}
        if problem_type:
            details["problemType"] = problem_type
        where = f"access point {self.base_url}"
        if status in (401, 407):
            return CliError(
                ExitCode.AUTH,
                f"{where} rejected the token ({status}): {detail}",
                kind="auth",
                details=details,
            )
        if status == 403:
            return CliError(
                ExitCode.AUTH,
                f"{where} refused {method} {url} (403 forbidden): {detail}",
                kind="forbidden",
                details=details,
            )
        if status == 404 and problem_type == ProblemType.UNKNOWN_HOST:
            return CliError(ExitCode.VALIDATION, detail, kind="unknownHost", details=details)
        if status == 404 and problem_type == ProblemType.UNKNOWN_SESSION:
            return CliError(ExitCode.VALIDATION, detail, kind="unknownSession", details=details)
        if status == 404:
            return CliError(
                ExitCode.CONFIGURATION,
                f"{where} has no {method} {url} (404: {detail}); is remote-server the access "
                "point's API URL?",
                kind="configuration",
                details=details,
            )
        if 400 <= status < 500:
            return CliError(
                ExitCode.VALIDATION,
                f"{where} rejected {method} {url} ({status}): {detail}",
                kind="validation",
                details=details,
            )
        return CliError(
            ExitCode.NETWORK,
            f"{where} failed to answer {method} {url} ({status}): {detail}",
            kind="network",
            details=details,
        )

    def _decode(self, response: httpx.Response, type_: type[_T]) -> _T:
        try:
            return msgspec.json.decode(response.content, type=type_)
        except msgspec.DecodeError as exc:
            raise CliError(
                ExitCode.NETWORK,
                f"access point {self.base_url} sent an unexpected answer to "
                f"{response.request.method} {response.request.url}: {exc}",
                kind="network",
                details={"url": str(response.request.url)},
            ) from None


def _read_problem(response: httpx.Response) -> Problem | None:
    media_type = response.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type not in (PROBLEM_MEDIA_TYPE, "application/json"):
        return None
    try:
        return msgspec.json.decode(response.content, type=Problem)
    except msgspec.DecodeError:
        return None


def _excerpt(response: httpx.Response) -> str:
    text = response.text.strip().replace("\n", " ")
    if not text:
        return response.reason_phrase or f"HTTP {response.status_code}"
    return text if len(text) <= _BODY_EXCERPT else text[:_BODY_EXCERPT] + "..."
