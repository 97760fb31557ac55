"""Session metadata and the fence (proof that followers hold the leader's snapshot)."""

from __future__ import annotations

import enum
import re
from typing import Annotated

import msgspec

from .errors import DomainValidationError
from .hosts import FollowerStatus

__all__ = [
    "SESSION_ID_PATTERN",
    "FenceHostResult",
    "FenceHostState",
    "FenceMetadata",
    "SessionId",
    "SessionInfo",
    "validate_session_id",
]

NonNegativeInt = Annotated[int, msgspec.Meta(ge=0)]

SESSION_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$"
"""Session ids (``s-20260101T120000Z-3f9a1c``): a letter or digit, then up to 127 letters,
digits, ``_``, ``.``, ``-`` (safe in URL paths and file names)."""

SessionId = Annotated[str, msgspec.Meta(pattern=SESSION_ID_PATTERN, max_length=128)]


def validate_session_id(session_id: str) -> str:
    """Return ``session_id`` if it is a valid session id, else raise
    :class:`DomainValidationError` naming it and the expected form."""
    if not isinstance(session_id, str) or re.fullmatch(SESSION_ID_PATTERN, session_id) is None:
        raise DomainValidationError(
            f"invalid session id {session_id!r}: expected 1-128 characters, a letter or digit "
            "followed by letters, digits, '_', '.' or '-'",
            details={"value": str(session_id), "pattern": SESSION_ID_PATTERN},
        )
    return session_id


class SessionInfo(msgspec.Struct, frozen=True, rename="camel"):
    """``/api/v1/sessions/{id}/info``: fleet membership as the access point sees it."""

    id: str
    leader: str
    created_ms: int
    followers: list[FollowerStatus]
    endpoints: dict[str, str]
    """Named URLs of the session (``events``, ``info``, ...)."""
    last_event_ms: float | None = None
    """``tsMs`` of the session's latest event (None before the first one)."""
    last_seq: NonNegativeInt = 0
    """``seq`` of the session's latest event (0 before the first one)."""


class FenceHostState(enum.StrEnum):
    """Outcome of the fence on one follower."""

    CONSISTENT = "consistent"
    TIMEOUT = "timeout"
    ERROR = "error"


class FenceHostResult(msgspec.Struct, frozen=True, rename="camel"):
    state: FenceHostState
    took_ms: NonNegativeInt
    detail: str | None = None

    @property
    def consistent(self) -> bool:
        return self.state is FenceHostState.CONSISTENT


class FenceMetadata(msgspec.Struct, frozen=True, rename="camel"):
    """One completed fence: the snapshot and each follower's verdict."""

    snapshot_id: str
    hosts: dict[str, FenceHostResult]
    started_ms: int
    took_ms: NonNegativeInt

    def lagging_hosts(self) -> list[str]:
        """Hosts whose fence did not come back consistent (a run must skip them)."""
        return sorted(name for name, result in self.hosts.items() if not result.consistent)
