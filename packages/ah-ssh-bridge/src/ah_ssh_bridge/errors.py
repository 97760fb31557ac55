"""Errors of the SSH bridge. Every message names the host it is about.

``kind`` is a short, stable classification that path selection ranks when it explains why a
follower could not be reached (the values match ``ah_connectivity.path_selection.FailureKind``).
"""

from __future__ import annotations

__all__ = [
    "HostKeyMismatch",
    "SshAuthError",
    "SshChannelError",
    "SshConnectError",
    "SshConnectionLost",
    "SshError",
    "SshKeyFileError",
]


class SshError(Exception):
    """Base of every error raised by ah-ssh-bridge."""

    kind: str = "other"

    def __init__(self, host: str, message: str, *, kind: str | None = None) -> None:
        super().__init__(message)
        self.host = host
        self.message = message
        if kind is not None:
            self.kind = kind

    def __str__(self) -> str:
        return self.message


class SshConnectError(SshError):
    """The TCP connection or the SSH handshake (banner, key exchange) failed.

    ``kind`` is ``refused``, ``timeout``, ``unreachable`` or ``protocol``.
    """

    kind = "protocol"


class HostKeyMismatch(SshError):
    """The server's host key is not the one the follower reported. Never trusted on first use."""

    kind = "host-key"

    def __init__(self, host: str, *, expected: str, actual: str, key_type: str) -> None:
        super().__init__(
            host,
            f"host key mismatch for {host}: expected {expected} (reported by the follower over "
            f"its authenticated control connection) but the server presented {key_type} "
            f"{actual}; refusing to connect (no trust on first use)",
        )
        self.expected = expected
        self.actual = actual
        self.key_type = key_type


class SshAuthError(SshError):
    """Public-key authentication failed (password authentication is never attempted)."""

    kind = "auth"


class SshKeyFileError(SshAuthError):
    """The client private key file is missing, unreadable, encrypted without a passphrase, or
    of an unsupported type."""


class SshConnectionLost(SshError):
    """The transport died (peer gone, socket closed, keepalive unanswered, or closed by us)."""

    kind = "connection-lost"


class SshChannelError(SshError):
    """The server refused a channel or a request on it (e.g. its MaxSessions limit)."""

    kind = "protocol"
