"""What ``ah-fleetctl`` and its leader agent say over the agent's unix socket.

Frames are ``ah_connectivity.framing`` frames (4-byte length + msgpack). A connection carries
one request from the client, then the agent's replies: ``paths`` → one :class:`PathsReply`;
``exec`` → :class:`LineReply` frames as output arrives, then one :class:`ExitReply` (or an
:class:`ErrorReply`); the client may send :class:`CancelRequest` meanwhile (closing the
connection cancels too). ``ping`` → :class:`PongReply`; ``shutdown`` → :class:`PongReply`,
then the agent exits.

The thin ``run``/``fence`` path (:mod:`ah_fleetctl.thin`) speaks :mod:`marshal` (these Structs as
plain dicts) instead of msgpack on the same socket and framing (the agent tells them apart
by the payload's first byte: a marshalled dict starts with ``{``, or ``0xfb``):
:class:`ThinRunRequest`, then the agent's :class:`ThinOutReply` frames, one
:class:`ThinStartedReply` just before the first remote command could start, and a final
:class:`ThinDoneReply` — or one :class:`ThinFallbackReply` (before anything started) when
the full CLI must handle the invocation. The client may send :class:`ThinCancelRequest`.
"""

from __future__ import annotations

from typing import Any, Literal, TypeAlias

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
    "ThinCancelRequest",
    "ThinDefaults",
    "ThinDoneReply",
    "ThinFallbackReply",
    "ThinIndexEntry",
    "ThinOutReply",
    "ThinReply",
    "ThinRunRequest",
    "ThinStartedReply",
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
    push_connections: int = 0
    """QUIC connections the agent made to the access point for session events so far (one
    for all its runs while the access point stays up)."""
    follower_fetches_in_runs: int = 0
    """Follower-list fetches that a request had to wait for (the list was too old)."""
    follower_fetches_ahead: int = 0
    """Follower-list fetches made in the background while the agent was in use, so that
    requests did not have to wait for one."""


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


# --------------------------------------------------------------------------- thin run (JSON)


class ThinDefaults(msgspec.Struct, frozen=True, rename="camel"):
    """The run settings that come from the invoking CLI's configuration (the agent's own
    configuration was resolved elsewhere, from ``/``)."""

    runs_base: str
    """The log directory: run directories go to ``<runs_base>/runs``, the session events'
    local copy to ``<runs_base>/sessions``."""
    timeout_s: float | None = None
    """Config ``timeouts.run`` (a ``--timeout`` flag wins)."""
    session: str | None = None
    """Config ``session`` (a ``--session`` flag wins)."""
    json: bool = False
    """``AH_JSON`` was set."""
    workspaces: dict[str, str] = {}
    """Config ``hosts.<name>.workspace`` overrides."""
    sync_ignores: list[str] | None = None
    """Config ``sync-ignores`` (the fence's ignores; the repo layer may replace them)."""
    sync_engine: str | None = None
    """Config ``sync-engine`` (``auto``, ``rsync`` or ``mutagen``)."""
    fence_timeout_s: float | None = None
    """Config ``timeouts.fence``, else 120 s (a ``--timeout`` flag of ``fence`` wins)."""
    cache_root: str | None = None
    """The user cache directory the fence keeps its stat cache and proofs in."""


class ThinIndexEntry(msgspec.Struct, frozen=True, rename="camel"):
    """One thin-index file (see :mod:`ah_fleetctl.thin`)."""

    version: int
    cwd: str
    env: dict[str, str]
    """The variables :func:`ah_fleetctl.thin.relevant_env` picks, as they were."""
    socket: str
    files: list[list[Any]]
    """Every configuration file the full CLI consulted, with its signature (or None: absent)."""
    repo_root: str | None
    defaults: ThinDefaults


class ThinRunRequest(msgspec.Struct, frozen=True, rename="camel", tag_field="op", tag="thinRun"):
    version: int
    args: list[str]
    """The arguments after the command name, exactly as typed."""
    cwd: str
    colour: bool
    defaults: ThinDefaults
    command: Literal["run", "fence"] = "run"
    path: str | None = None
    """The CLI's ``PATH``: the fence runs ``rsync``/``ssh``/``mutagen`` from it, so the
    agent serves a fence only when its own ``PATH`` is the same."""


class ThinCancelRequest(msgspec.Struct, frozen=True, tag_field="op", tag="cancel"):
    pass


class _ThinReply(msgspec.Struct, frozen=True, rename="camel", tag_field="op"):
    pass


class ThinOutReply(_ThinReply, frozen=True, tag="out"):
    fd: Literal[1, 2]
    text: str


class ThinStartedReply(_ThinReply, frozen=True, tag="started"):
    pass


class ThinFallbackReply(_ThinReply, frozen=True, tag="fallback"):
    reason: str


class ThinDoneReply(_ThinReply, frozen=True, tag="done"):
    code: int


ThinReply: TypeAlias = ThinOutReply | ThinStartedReply | ThinFallbackReply | ThinDoneReply
