"""Data-plane transport methods and the path record fixed for each follower."""

from __future__ import annotations

import enum
from typing import Annotated

import msgspec

from .errors import UnknownTransportMethodError

__all__ = ["PathRecord", "TransportMethod", "parse_transport_method"]


class TransportMethod(enum.StrEnum):
    """How the leader reaches a follower's sshd, in the order they are tried."""

    DIRECT = "direct"
    """TCP straight to the follower's advertised SSH address."""
    CONNECT = "connect"
    """HTTP CONNECT on the follower's access point, bridged over its QUIC connection."""
    RELAY = "relay"
    """CONNECT via a reachable access point that relays to the follower's home one."""


def parse_transport_method(text: str) -> TransportMethod:
    """Parse a method name (case-insensitive); unknown names raise
    :class:`UnknownTransportMethodError` naming the accepted ones."""
    accepted = ", ".join(m.value for m in TransportMethod)
    if isinstance(text, str):
        try:
            return TransportMethod(text.strip().lower())
        except ValueError:
            pass
    raise UnknownTransportMethodError(
        f"unknown transport method {text!r}; expected one of: {accepted}",
        details={"value": str(text), "accepted": accepted},
    )


class PathRecord(msgspec.Struct, frozen=True, rename="camel"):
    """The path fixed for one follower after its first successful liveness probe."""

    method: TransportMethod
    target: str
    """What was dialled: ``host:port`` for direct, ``<follower>:22`` via CONNECT."""
    relay: str | None
    """The relaying access point when ``method`` is relay, else None."""
    rtt_estimate_ms: Annotated[float, msgspec.Meta(ge=0)]

    def describe(self) -> str:
        via = f" via {self.relay}" if self.relay else ""
        return f"{self.method.value} {self.target}{via} (rtt {self.rtt_estimate_ms:.1f} ms)"
