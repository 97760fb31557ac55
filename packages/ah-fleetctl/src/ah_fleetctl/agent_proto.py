"""What ``ah-fleetctl`` and its leader agent say over the agent's unix socket.

Frames are ``ah_connectivity.framing`` frames (4-byte length + msgpack). A connection carries
one request from the client, then the agent's replies: ``paths`` → one :class:`PathsReply`;
``exec`` → :class:`LineReply` frames as output arrives, then one :class:`ExitReply` (or an
:class:`ErrorReply`); the client may send :class:`CancelRequest` meanwhile (closing the
connection cancels too). ``ping`` → :class:`PongReply`; ``shutdown`` → :class:`PongReply`,
then the agent exits.
"""

from __future__ import annotations

from typing import Literal, TypeAlias

import msgspec

from ah_domain_types import Event, PathAttemptFailure, TransportMethod

__all__ = [
    "AGENT_PROTOCOL_VERSION",
    "AgentReply",
    "AgentRequest",
    "CancelRequest",
    "ErrorReply",
    "ExecRequest",
    "ExitReply",
    "HostPath",
    "LineReply",
    "PathsReply",
    "PathsRequest",
    "PingRequest",
    "PongReply",
    "ShutdownRequest",
]

AGENT_PROTOCOL_VERSION = 1


class HostPath(msgspec.Struct, frozen=True, rename="camel"):
    """One follower's fixed path (``method`` None: none; ``error`` says why)."""

    host: str
    method: TransportMethod | None = None
    target: str | None = None
    relay: str | None = None
    rtt_estimate_ms: float | None = None
    host_key: str | None = None
    """The host public key line (``ssh-ed25519 AAAA...``) the transport verified."""
    error: str | None = None
    kind: str | None = None
    failures: list[PathAttemptFailure] = []


class _Request(msgspec.Struct, frozen=True, rename="camel", tag_field="op"):
    pass


class PingRequest(_Request, frozen=True, tag="ping"):
    version: int = AGENT_PROTOCOL_VERSION


class PathsRequest(_Request, frozen=True, tag="paths"):
    hosts: list[str]
    """Followers to report (a path is selected for those without one); empty: every one."""


class ExecRequest(_Request, frozen=True, tag="exec"):
    host: str
    command: str
    timeout_s: float | None = None


class CancelRequest(_Request, frozen=True, tag="cancel"):
    pass


class ShutdownRequest(_Request, frozen=True, tag="shutdown"):
    pass


AgentRequest: TypeAlias = PingRequest | PathsRequest | ExecRequest | CancelRequest | ShutdownRequest


class _Reply(msgspec.Struct, frozen=True, rename="camel", tag_field="op"):
    pass


class PongReply(_Reply, frozen=True, tag="pong"):
    pid: int
    access_point: str
    version: int = AGENT_PROTOCOL_VERSION


class PathsReply(_Reply, frozen=True, tag="paths"):
    paths: list[HostPath]
    events: list[Event] = []
    """Every path event the agent published so far for those followers, oldest first."""


class LineReply(_Reply, frozen=True, tag="line"):
    stream: Literal["stdout", "stderr"]
    line: str


class ExitReply(_Reply, frozen=True, tag="exit"):
    exit_code: int | None
    timed_out: bool
    cancelled: bool
    took_ms: float


class ErrorReply(_Reply, frozen=True, tag="error"):
    message: str
    kind: str
    unreachable: bool = False
    """The follower could not be reached (no path) — rather than a broken request."""


AgentReply: TypeAlias = PongReply | PathsReply | LineReply | ExitReply | ErrorReply
