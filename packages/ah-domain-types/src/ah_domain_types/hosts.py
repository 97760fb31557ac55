"""Followers: identity and facts reported over the control connection, and health."""

from __future__ import annotations

import enum
import re
from typing import Annotated

import msgspec

from .errors import DomainValidationError, HostNameError
from .patterns import (
    HOST_KEY_FINGERPRINT_PATTERN,
    HOST_NAME_PATTERN,
    HOST_PORT_PATTERN,
    TAG_KEY_PATTERN,
    TAG_VALUE_PATTERN,
    HostKeyFingerprint,
    HostName,
    HostPort,
    TagKey,
    TagValue,
    fullmatch,
)
from .transport import PathRecord

__all__ = [
    "IMPLICIT_TAG_KEYS",
    "FollowerHealth",
    "FollowerInfo",
    "FollowerStatus",
    "OsKind",
    "Resources",
    "parse_host_port",
    "validate_host_name",
    "validate_tags",
]

IMPLICIT_TAG_KEYS = ("os", "arch")
"""Tags every follower has without configuring them (see :meth:`FollowerInfo.effective_tags`)."""


class OsKind(enum.StrEnum):
    """Operating-system family of a follower."""

    LINUX = "linux"
    MACOS = "macos"
    WINDOWS = "windows"


class FollowerHealth(enum.StrEnum):
    """Follower health as the access point sees it."""

    HEALTHY = "healthy"
    UNHEALTHY = "unhealthy"
    OFFLINE = "offline"


_HOST_NAME = re.compile(HOST_NAME_PATTERN)


def validate_host_name(name: str) -> str:
    """Return ``name`` if it is a valid follower name, else raise :class:`HostNameError`."""
    # Compiled once: every run checks every host name (targets, log files).
    if not (isinstance(name, str) and _HOST_NAME.fullmatch(name)):
        raise HostNameError(
            f"invalid host name {name!r}: expected 1-63 characters, a letter or digit "
            "followed by letters, digits, '_', '.' or '-'",
            details={"value": str(name), "pattern": HOST_NAME_PATTERN},
        )
    return name


def validate_tags(tags: dict[str, str], *, owner: str = "follower") -> dict[str, str]:
    """Check every tag key and value; raise :class:`DomainValidationError` naming the bad one."""
    for key, value in tags.items():
        if not fullmatch(TAG_KEY_PATTERN, key):
            raise DomainValidationError(
                f"{owner}: invalid tag key {key!r}: expected a letter or digit followed by "
                "letters, digits, '_', '.' or '-'",
                details={"key": str(key)},
            )
        if not fullmatch(TAG_VALUE_PATTERN, value):
            raise DomainValidationError(
                f"{owner}: invalid value {value!r} for tag {key!r}: expected a non-empty "
                "value without whitespace or commas",
                details={"key": key, "value": str(value)},
            )
    return tags


def parse_host_port(text: str, *, default_port: int | None = None) -> tuple[str, int]:
    """Split ``host:port`` (``[v6]:port`` for IPv6 literals) into host and port.

    Without a port, ``default_port`` is used when given; otherwise it is an error.
    """
    candidate = text.strip()
    if default_port is not None and not fullmatch(HOST_PORT_PATTERN, candidate):
        is_v6_literal = candidate.startswith("[") and candidate.endswith("]")
        if is_v6_literal or ":" not in candidate:
            candidate = f"{candidate}:{default_port}"
    if not fullmatch(HOST_PORT_PATTERN, candidate):
        raise DomainValidationError(
            f"invalid address {text!r}: expected HOST:PORT (e.g. 10.0.0.5:22 or [::1]:22)",
            details={"value": str(text)},
        )
    host, _, port_text = candidate.rpartition(":")
    port = int(port_text)
    if not 0 < port < 65536:
        raise DomainValidationError(
            f"invalid address {text!r}: port {port} is outside 1-65535",
            details={"value": str(text)},
        )
    return host.removeprefix("[").removesuffix("]"), port


class Resources(msgspec.Struct, frozen=True, rename="camel"):
    """Capacity a follower reports."""

    cpus: Annotated[int, msgspec.Meta(ge=0)]
    memory_mb: Annotated[int, msgspec.Meta(ge=0)]


class FollowerInfo(msgspec.Struct, frozen=True, rename="camel"):
    """What a follower says about itself in ``Hello`` (and what enrollment recorded)."""

    name: HostName
    os: OsKind
    arch: str
    """Machine architecture as reported by the OS, e.g. ``x86_64``, ``arm64``."""
    tags: dict[TagKey, TagValue]
    resources: Resources
    host_key_fingerprint: HostKeyFingerprint
    """The sshd host-key fingerprint (``SHA256:...``) the leader pins end to end."""
    direct_address: HostPort | None
    """``host:port`` where the follower's sshd can be dialled directly, if anywhere."""
    workspace: str
    """Directory on the follower that receives the leader's tree."""
    version: str
    """Follower daemon version."""

    def __post_init__(self) -> None:
        validate_host_name(self.name)
        validate_tags(self.tags, owner=f"follower {self.name!r}")
        if not fullmatch(HOST_KEY_FINGERPRINT_PATTERN, self.host_key_fingerprint):
            raise DomainValidationError(
                f"follower {self.name!r}: invalid host-key fingerprint "
                f"{self.host_key_fingerprint!r}: expected SHA256:<base64>",
                details={"value": str(self.host_key_fingerprint)},
            )
        if self.direct_address is not None and not fullmatch(
            HOST_PORT_PATTERN, self.direct_address
        ):
            raise DomainValidationError(
                f"follower {self.name!r}: invalid direct address {self.direct_address!r}: "
                "expected HOST:PORT",
                details={"value": str(self.direct_address)},
            )

    def effective_tags(self) -> dict[str, str]:
        """Tags used for selection: ``os`` and ``arch`` from the reported facts, overridden
        by explicitly configured tags of the same key."""
        return {"os": self.os.value, "arch": self.arch, **self.tags}


class FollowerStatus(msgspec.Struct, frozen=True, rename="camel"):
    """A follower as the access point currently sees it."""

    info: FollowerInfo
    health: FollowerHealth
    last_heartbeat_ms: int | None
    """Wall-clock ms of the last heartbeat, None if never."""
    connected_since_ms: int | None
    path: PathRecord | None = None
    """The fixed data-plane path, once one is known."""

    @property
    def name(self) -> str:
        return self.info.name
