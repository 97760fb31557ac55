"""Session metadata and the fence (proof that followers hold the leader's snapshot)."""

from __future__ import annotations

import enum
from typing import Annotated

import msgspec

from .hosts import FollowerStatus

__all__ = ["FenceHostResult", "FenceHostState", "FenceMetadata", "SessionInfo"]

NonNegativeInt = Annotated[int, msgspec.Meta(ge=0)]


class SessionInfo(msgspec.Struct, frozen=True, rename="camel"):
    """``/api/v1/sessions/{id}/info``: fleet membership as the access point sees it."""

    id: str
    leader: str
    created_ms: int
    followers: list[FollowerStatus]
    endpoints: dict[str, str]
    """Named URLs of the session (``events``, ``info``, ...)."""


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
