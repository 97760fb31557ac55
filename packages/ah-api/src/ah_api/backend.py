"""What the API needs from the process serving it (the access point daemon implements these)."""

from __future__ import annotations

from typing import Literal, Protocol, runtime_checkable

import msgspec

from ah_connectivity.tokens import TokenError, TokenVerifier
from ah_domain_types import EnrollRequest, EnrollResponse, FollowerStatus

from .wire import HostExec

__all__ = [
    "SCOPE_EXEC",
    "SCOPE_READ_LOGS",
    "SCOPE_SSH",
    "AuthFailed",
    "AuthFailureReason",
    "Authenticator",
    "EnrollmentRefusal",
    "EnrollmentRefused",
    "FleetBackend",
    "JwtAuthenticator",
    "Principal",
]

SCOPE_EXEC = "exec"
SCOPE_SSH = "ssh"
SCOPE_READ_LOGS = "read-logs"

EnrollmentRefusal = Literal["malformed", "forged", "expired", "reused", "wrong-name", "unknown"]
AuthFailureReason = Literal[
    "missing", "malformed", "forged", "expired", "wrong-audience", "missing-scope"
]


class EnrollmentRefused(Exception):
    """The access point will not enroll this follower; ``reason`` says why, for the status code."""

    def __init__(self, reason: EnrollmentRefusal, message: str) -> None:
        super().__init__(message)
        self.reason: EnrollmentRefusal = reason
        self.message = message

    def __str__(self) -> str:
        return self.message


@runtime_checkable
class FleetBackend(Protocol):
    """The fleet state and actions behind the REST API."""

    def list_followers(self) -> list[FollowerStatus]:
        """Every enrolled follower, connected or not."""
        ...

    async def exec_mock(
        self, hosts: list[str], command: list[str], timeout_ms: int | None
    ) -> list[HostExec]:
        """Run ``command`` on each host (all known, all allowed) and return one result per host,
        in the order of ``hosts``. A host that cannot run it is a result, not an exception."""
        ...

    async def enroll(self, req: EnrollRequest) -> EnrollResponse:
        """Check the one-time token and sign the CSR; raise :class:`EnrollmentRefused`."""
        ...

    def ca_pem(self) -> str:
        """The fleet CA certificate, PEM."""
        ...

    def ca_fingerprint(self) -> str:
        """``sha256:<hex>`` of the fleet CA certificate (DER)."""
        ...

    def is_ready(self) -> bool:
        """True once every listener of the daemon accepts connections."""
        ...


class Principal(msgspec.Struct, frozen=True):
    """Who a request acts for, from a verified user token."""

    subject: str
    scopes: frozenset[str]
    hosts_glob: str
    """``fnmatch`` glob (case-sensitive) of the follower names the token may address."""


class AuthFailed(Exception):
    """A request's bearer token was refused: 401 (who are you?) or 403 (not allowed)."""

    def __init__(self, status: Literal[401, 403], reason: AuthFailureReason, message: str) -> None:
        super().__init__(message)
        self.status: Literal[401, 403] = status
        self.reason: AuthFailureReason = reason
        self.message = message

    def __str__(self) -> str:
        return self.message


class Authenticator(Protocol):
    """Turns the ``Authorization: Bearer`` token of a request into a :class:`Principal`."""

    def authenticate(self, bearer: str | None, required_scope: str | None) -> Principal:
        """``bearer`` is the token without the ``Bearer`` prefix, None when absent.

        Raises :class:`AuthFailed` (401 for a missing/bad token, 403 for a missing scope).
        """
        ...


_REASONS_401: dict[str, AuthFailureReason] = {
    "missing": "missing",
    "malformed": "malformed",
    "forged": "forged",
    "expired": "expired",
    "wrong-audience": "wrong-audience",
}


class JwtAuthenticator:
    """:class:`Authenticator` over ``ah_connectivity``'s JWT :class:`TokenVerifier` for one
    audience (``ah_connectivity.tokens.user_audience(trust_domain)``)."""

    def __init__(self, verifier: TokenVerifier, audience: str) -> None:
        self._verifier = verifier
        self._audience = audience

    def authenticate(self, bearer: str | None, required_scope: str | None) -> Principal:
        if bearer is None or not bearer.strip():
            raise AuthFailed(401, "missing", "no bearer token: send 'Authorization: Bearer <jwt>'")
        try:
            claims = self._verifier.verify_user(bearer, self._audience)
        except TokenError as exc:
            reason = _REASONS_401.get(exc.reason)
            if reason is None:
                # Reasons that only apply to enrollment tokens still mean "not a usable token".
                raise AuthFailed(401, "malformed", f"token refused ({exc.reason}): {exc}") from None
            raise AuthFailed(401, reason, str(exc)) from None
        scopes = frozenset(claims.scopes)
        if required_scope is not None and required_scope not in scopes:
            have = ", ".join(sorted(scopes)) or "none"
            raise AuthFailed(
                403,
                "missing-scope",
                f"token of {claims.sub!r} lacks scope {required_scope!r} (has: {have})",
            )
        return Principal(subject=claims.sub, scopes=scopes, hosts_glob=claims.hosts)
