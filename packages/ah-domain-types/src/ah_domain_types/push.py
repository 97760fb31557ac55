"""Leader → access point event push: the messages of the ``ah-leader/1`` QUIC protocol.

A leader (``ah-fleetctl run``/``fence``) pushes the events of one session to its access point
over its own QUIC connection, authenticated by the user's token (leaders have no client
certificate). ``PushMessage`` is a union tagged by ``type``; frames are length-prefixed msgpack
like the control plane's (framing lives in ``ah-connectivity``).

One client-initiated bidirectional stream per pushed session::

    leader                                   access point
    PushHello{token, sessionId, producer} →
                                          ← PushWelcome{ackedLseq, lastSeq} | PushRefused
    PushBatch{firstLseq, events}          →
                                          ← PushAck{lastLseq, firstSeq, lastSeq}
    ...                                      (acks in batch order)

On a connection that negotiated ALPN ``ah-leader/2`` a batch may travel as ``PushBatchZ``
(the same events, msgpack then zlib: a run's hostStarted/hostExited events shrink ~7 times, from
four or five QUIC packets to one); it means exactly the ``PushBatch`` it expands to.

``lseq`` is the leader's own 1, 2, 3... numbering of the events it emitted in this session
(per ``producer``, a random id of one leader process). The access point persists the highest
``lseq`` it stored per (session, producer) and skips anything at or below it, so a leader that
reconnects (after a lost connection or an access-point restart) resends every unacknowledged
event and each one is stored exactly once. ``seq`` is the access point's per-session number.
"""

from __future__ import annotations

import enum
from typing import Annotated, TypeAlias

import msgspec

from .events import Event
from .sessions import SessionId

__all__ = [
    "PUSH_MESSAGE_TYPES",
    "PUSH_PROTOCOL_VERSION",
    "PushAck",
    "PushBatch",
    "PushBatchZ",
    "PushHello",
    "PushMessage",
    "PushRefusal",
    "PushRefused",
    "PushWelcome",
]

PUSH_PROTOCOL_VERSION = 1

NonNegativeInt = Annotated[int, msgspec.Meta(ge=0)]
PositiveInt = Annotated[int, msgspec.Meta(ge=1)]
ProducerId = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_-]{1,64}$")]


class PushRefusal(enum.StrEnum):
    """Why the access point refused a push stream (``PushRefused.code``)."""

    UNAUTHENTICATED = "unauthenticated"
    """The token is missing, malformed, forged, expired or for another audience."""
    FORBIDDEN = "forbidden"
    """The token lacks the ``exec`` scope."""
    INVALID = "invalid"
    """A message broke the protocol (wrong order, lseq gap, unknown version, bad event)."""
    INTERNAL = "internal"
    """The access point could not store the events (its log says why)."""
    SHUTTING_DOWN = "shuttingDown"


class _PushBase(msgspec.Struct, frozen=True, rename="camel", tag_field="type"):
    """Common configuration of every push message."""


class PushHello(_PushBase, frozen=True, tag="pushHello"):
    """First message on a push stream."""

    token: str
    """The user's bearer token (JWT, scope ``exec``)."""
    session_id: SessionId
    producer: ProducerId
    protocol_version: PositiveInt
    client_version: str = ""


class PushWelcome(_PushBase, frozen=True, tag="pushWelcome"):
    """The stream is accepted; resend everything after ``acked_lseq``."""

    session_id: SessionId
    producer: ProducerId
    acked_lseq: NonNegativeInt
    """Highest ``lseq`` of this producer already stored for this session (0: none)."""
    last_seq: NonNegativeInt
    """The session's current highest ``seq`` (0: no event yet)."""
    max_batch_events: PositiveInt
    """The most events one ``PushBatch`` may carry."""


class PushBatch(_PushBase, frozen=True, tag="pushBatch"):
    """Events numbered ``first_lseq``, ``first_lseq + 1``, ... in order.

    Their ``sessionId`` must be the stream's session (or empty), ``seq`` is ignored and
    ``tsMs`` replaced: the access point assigns both.
    """

    first_lseq: PositiveInt
    events: Annotated[list[Event], msgspec.Meta(min_length=1)]


class PushBatchZ(_PushBase, frozen=True, tag="pushBatchZ"):
    """A `PushBatch` compressed (``ah-leader/2`` connections only): ``data`` is zlib over the
    msgpack array of its ``count`` events. The access point refuses it (``invalid``) on an
    ``ah-leader/1`` connection, or when it does not expand to exactly ``count`` valid events
    within the frame size limit."""

    first_lseq: PositiveInt
    count: PositiveInt
    data: bytes


class PushAck(_PushBase, frozen=True, tag="pushAck"):
    """Every event up to ``last_lseq`` is stored; this batch's new events got the seqs
    ``first_seq`` .. ``last_seq`` (both 0 when the whole batch had been stored before)."""

    last_lseq: NonNegativeInt
    first_seq: NonNegativeInt
    last_seq: NonNegativeInt


class PushRefused(_PushBase, frozen=True, tag="pushRefused"):
    """Sent before the access point closes a push stream."""

    code: PushRefusal
    message: str


PushMessage: TypeAlias = PushHello | PushWelcome | PushBatch | PushBatchZ | PushAck | PushRefused

PUSH_MESSAGE_TYPES: tuple[str, ...] = (
    "pushHello",
    "pushWelcome",
    "pushBatch",
    "pushBatchZ",
    "pushAck",
    "pushRefused",
)
"""The ``type`` tags of :data:`PushMessage`, in declaration order."""
