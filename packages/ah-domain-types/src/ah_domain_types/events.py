"""Session events: what the leader and access point publish on a session's SSE stream.

``Event`` is a union tagged by ``type``. Every event carries ``sessionId``, ``seq`` (the
per-session sequence number, 0 until the access point assigns one) and ``tsMs``
(wall-clock milliseconds).
"""

from __future__ import annotations

from typing import Annotated, Literal, TypeAlias

import msgspec

from .hosts import FollowerStatus
from .results import HostResult, RunSummary
from .sessions import FenceHostResult
from .transport import PathRecord, TransportMethod

__all__ = [
    "EVENT_CLASSES",
    "EVENT_TYPES",
    "Event",
    "FenceResultEvent",
    "FenceStartedEvent",
    "FollowersCatalogEvent",
    "HostExitedEvent",
    "HostLogEvent",
    "HostStartedEvent",
    "NoteEvent",
    "PathAttemptFailure",
    "PathDegradedEvent",
    "PathFailedEvent",
    "PathFixedEvent",
    "PathRestoredEvent",
    "SummaryEvent",
    "decode_event_json",
    "encode_event_json",
]


class _EventBase(msgspec.Struct, frozen=True, rename="camel", tag_field="type", kw_only=True):
    """Fields common to every event (keyword-only, so payload fields stay positional)."""

    session_id: str
    seq: Annotated[int, msgspec.Meta(ge=0)] = 0
    ts_ms: float


class FollowersCatalogEvent(_EventBase, frozen=True, tag="followersCatalog"):
    followers: list[FollowerStatus]


class FenceStartedEvent(_EventBase, frozen=True, tag="fenceStarted"):
    snapshot_id: str
    hosts: list[str]


class FenceResultEvent(_EventBase, frozen=True, tag="fenceResult"):
    snapshot_id: str
    hosts: dict[str, FenceHostResult]


class HostStartedEvent(_EventBase, frozen=True, tag="hostStarted"):
    host: str
    command: str


class HostLogEvent(_EventBase, frozen=True, tag="hostLog"):
    """One line of a host's output, without its line terminator."""

    host: str
    stream: Literal["stdout", "stderr"]
    line: str


class HostExitedEvent(_EventBase, frozen=True, tag="hostExited"):
    host: str
    result: HostResult


class SummaryEvent(_EventBase, frozen=True, tag="summary"):
    summary: RunSummary


class NoteEvent(_EventBase, frozen=True, tag="note"):
    message: str
    level: str = "info"


class PathFixedEvent(_EventBase, frozen=True, tag="connect.path.fixed"):
    host: str
    path: PathRecord


class PathDegradedEvent(_EventBase, frozen=True, tag="connect.path.degraded"):
    host: str
    path: PathRecord | None
    """The path that failed, if one had been fixed."""
    failures: Annotated[int, msgspec.Meta(ge=0)]
    error: str


class PathRestoredEvent(_EventBase, frozen=True, tag="connect.path.restored"):
    host: str
    path: PathRecord


class PathAttemptFailure(msgspec.Struct, frozen=True, rename="camel"):
    """One failed way of reaching a follower (an attempt or a health probe)."""

    method: TransportMethod
    target: str
    relay: str | None
    kind: str
    """``timeout``, ``refused``, ``proxy``, ``auth``, ``host-key``, ``tls``, ... (the
    ``ah_connectivity.path_selection.FailureKind`` values)."""
    error: str
    started_ms: float
    """Wall-clock milliseconds."""
    ended_ms: float
    stage: Literal["attempt", "probe"] = "attempt"


class PathFailedEvent(_EventBase, frozen=True, tag="connect.path.failed"):
    """No method reached the follower: every attempt with its reason, and the best one."""

    host: str
    reason: str
    """The most informative failure, in words (the diagnostic of the give-up)."""
    timed_out: bool
    """The overall deadline (``timeouts.overall``) passed, rather than every method failing."""
    methods_tried: list[TransportMethod]
    failures: list[PathAttemptFailure]


Event: TypeAlias = (
    FollowersCatalogEvent
    | FenceStartedEvent
    | FenceResultEvent
    | HostStartedEvent
    | HostLogEvent
    | HostExitedEvent
    | SummaryEvent
    | NoteEvent
    | PathFixedEvent
    | PathDegradedEvent
    | PathRestoredEvent
    | PathFailedEvent
)

EVENT_CLASSES: tuple[type[_EventBase], ...] = (
    FollowersCatalogEvent,
    FenceStartedEvent,
    FenceResultEvent,
    HostStartedEvent,
    HostLogEvent,
    HostExitedEvent,
    SummaryEvent,
    NoteEvent,
    PathFixedEvent,
    PathDegradedEvent,
    PathRestoredEvent,
    PathFailedEvent,
)

EVENT_TYPES: tuple[str, ...] = (
    "followersCatalog",
    "fenceStarted",
    "fenceResult",
    "hostStarted",
    "hostLog",
    "hostExited",
    "summary",
    "note",
    "connect.path.fixed",
    "connect.path.degraded",
    "connect.path.restored",
    "connect.path.failed",
)
"""The ``type`` tags of :data:`Event`, in the order of :data:`EVENT_CLASSES`."""

_JSON_ENCODER = msgspec.json.Encoder()
_JSON_DECODER: msgspec.json.Decoder[Event] = msgspec.json.Decoder(Event)


def encode_event_json(event: Event) -> bytes:
    return _JSON_ENCODER.encode(event)


def decode_event_json(data: bytes | str) -> Event:
    """Decode one event; raises :class:`msgspec.ValidationError` for unknown types."""
    return _JSON_DECODER.decode(data)
