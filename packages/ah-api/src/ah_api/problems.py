"""Problem types the API answers with, and the exception handlers raise to produce them."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from http import HTTPStatus

from .wire import Problem

__all__ = [
    "PROBLEM_MEDIA_TYPE",
    "ApiProblem",
    "ProblemType",
]

PROBLEM_MEDIA_TYPE = "application/problem+json"


class ProblemType(enum.StrEnum):
    """The ``type`` URNs of every problem the API produces; clients branch on these."""

    # Authentication (401) and authorisation (403) of user tokens.
    TOKEN_MISSING = "urn:ah:problem:token-missing"
    TOKEN_MALFORMED = "urn:ah:problem:token-malformed"
    TOKEN_FORGED = "urn:ah:problem:token-forged"
    TOKEN_EXPIRED = "urn:ah:problem:token-expired"
    TOKEN_WRONG_AUDIENCE = "urn:ah:problem:token-wrong-audience"
    MISSING_SCOPE = "urn:ah:problem:missing-scope"
    HOST_FORBIDDEN = "urn:ah:problem:host-forbidden"
    # Enrollment refusals.
    ENROLL_MALFORMED = "urn:ah:problem:enroll-malformed"
    ENROLL_FORGED = "urn:ah:problem:enroll-forged"
    ENROLL_EXPIRED = "urn:ah:problem:enroll-expired"
    ENROLL_REUSED = "urn:ah:problem:enroll-reused"
    ENROLL_WRONG_NAME = "urn:ah:problem:enroll-wrong-name"
    ENROLL_UNKNOWN = "urn:ah:problem:enroll-unknown"
    # Requests that name things that do not exist or are malformed.
    UNKNOWN_HOST = "urn:ah:problem:unknown-host"
    UNKNOWN_SESSION = "urn:ah:problem:unknown-session"
    BAD_SESSION_ID = "urn:ah:problem:bad-session-id"
    BAD_EVENT_TYPE = "urn:ah:problem:bad-event-type"
    BAD_TAG = "urn:ah:problem:bad-tag"
    INVALID_REQUEST = "urn:ah:problem:invalid-request"
    # Generic HTTP-level problems.
    NOT_FOUND = "urn:ah:problem:not-found"
    METHOD_NOT_ALLOWED = "urn:ah:problem:method-not-allowed"
    NOT_READY = "urn:ah:problem:not-ready"
    INTERNAL = "urn:ah:problem:internal"
    HTTP = "urn:ah:problem:http"
    """Any other HTTP error status (the status code says which)."""


class ApiProblem(Exception):
    """Raised inside a handler to answer with a problem document."""

    def __init__(
        self,
        status: int,
        problem_type: ProblemType,
        detail: str,
        *,
        title: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.problem_type = problem_type
        self.detail = detail
        self.title = title or _status_phrase(status)
        self.headers: dict[str, str] = dict(headers or {})

    def to_problem(self, instance: str | None) -> Problem:
        return Problem(
            type=self.problem_type.value,
            title=self.title,
            status=self.status,
            detail=self.detail,
            instance=instance,
        )


def _status_phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return f"HTTP {status}"
