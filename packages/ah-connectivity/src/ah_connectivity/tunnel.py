"""Tunnel vocabulary shared by the access point and the follower.

* `TunnelPolicy` — which destinations a follower opens tunnels to (its allow-list).
* `TunnelError` and subclasses — why an access point could not open a tunnel.
* `OpenedTunnel` — what the access point splices a CONNECT client with: always a blocking
  socket, whichever way the bytes travel behind it (a TLS data connection the follower
  dialled back, or a socketpair whose other end an asyncio task bridges onto a QUIC stream).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Literal

from ah_connectivity.splice import SpliceEnd
from ah_domain_types import TunnelErrorCode

__all__ = [
    "LOCAL_HOST_ALIASES",
    "SSH_PORT",
    "FollowerNotFound",
    "OpenedTunnel",
    "TunnelError",
    "TunnelMethod",
    "TunnelPolicy",
    "TunnelRefused",
    "TunnelTimeout",
    "TunnelUnavailable",
]

SSH_PORT = 22
LOCAL_HOST_ALIASES = frozenset({"127.0.0.1", "localhost", "::1", ""})
"""``dst`` values that mean "the follower itself"."""

TunnelMethod = Literal["data", "quic", "relay"]
"""How a tunnel's bytes travel: a dialled-back TLS data connection, a QUIC stream, or a
CONNECT to another access point."""


class TunnelError(Exception):
    """The access point could not open a tunnel."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class TunnelRefused(TunnelError):
    """The follower answered ``OpenTcpErr``: not allow-listed, unreachable, timed out..."""

    def __init__(self, code: TunnelErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class TunnelTimeout(TunnelError):
    """No answer from the follower in time."""


class TunnelUnavailable(TunnelError):
    """The follower is not connected, its connection broke, or it cannot tunnel."""


class FollowerNotFound(TunnelError):
    """No such follower in the fleet (CONNECT answers 404)."""


def _normalise_host(host: str) -> str:
    host = host.strip().lower()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return host


@dataclass(frozen=True)
class TunnelPolicy:
    """Where a follower opens tunnels to.

    ``allowed`` lists the exact ``(host, port)`` destinations. A request for port 22 on the
    follower itself (``dst`` one of `LOCAL_HOST_ALIASES`) goes to ``ssh`` — the follower's
    configured sshd, which in tests and on shared machines listens on another port — so a
    leader can always say ``CONNECT <follower>:22``. Everything else is refused (and logged
    by the follower).
    """

    allowed: frozenset[tuple[str, int]] = frozenset({("127.0.0.1", SSH_PORT)})
    ssh: tuple[str, int] | None = ("127.0.0.1", SSH_PORT)
    connect_timeout_s: float = 5.0
    """How long the follower waits for its destination to accept."""
    data_channel: bool = True
    """Answer ``DialData`` by dialling the access point back (else only QUIC streams)."""

    @classmethod
    def for_sshd(
        cls,
        host: str,
        port: int,
        *,
        extra: Iterable[tuple[str, int]] = (),
        connect_timeout_s: float = 5.0,
        data_channel: bool = True,
    ) -> TunnelPolicy:
        """Allow the sshd at `host:port` (also reachable as port 22) plus `extra`."""
        return cls(
            allowed=frozenset({(host, port), *extra}),
            ssh=(host, port),
            connect_timeout_s=connect_timeout_s,
            data_channel=data_channel,
        )

    def resolve(self, dst: str, port: int) -> tuple[str, int] | None:
        """The address to dial for a request of `dst:port`, or None when not allowed."""
        want = (_normalise_host(dst), port)
        for host, allowed_port in self.allowed:
            if (_normalise_host(host), allowed_port) == want:
                return host, allowed_port
        if port == SSH_PORT and want[0] in LOCAL_HOST_ALIASES and self.ssh is not None:
            return self.ssh
        return None


@dataclass
class OpenedTunnel:
    """A tunnel the access point can splice: `end.sock` leads to the follower's destination."""

    end: SpliceEnd
    method: TunnelMethod
    tunnel_id: str
    follower: str
    on_closed: list[Callable[[], None]] = field(default_factory=list)
    """Clean-ups to run once the splice is over (any thread)."""

    def closed(self) -> None:
        for callback in self.on_closed:
            callback()
        self.on_closed.clear()
