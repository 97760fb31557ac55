"""The follower's state directory, written by ``enroll`` and read by ``run``.

Layout of ``--state-dir``::

    follower.key (0600)   the follower's private key (never leaves the machine)
    follower.pem          its certificate, spiffe://TD/ah/agent/<name>, issued by the fleet CA
    fleet-ca.pem          the fleet CA, pinned by the fingerprint the enrollment token carried
    follower.toml         name, tags, trust domain, API and QUIC addresses (FollowerSettings)
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

import msgspec
from cryptography import x509

from ah_connectivity import (
    CA_CERT_FILE,
    Identity,
    ca_fingerprint,
    load_ca_certificate,
    peer_spiffe_id,
    spiffe_id_for_follower,
)
from ah_domain_types import ExitCode, LogConfig, parse_host_port

__all__ = [
    "CERT_FILE",
    "KEY_FILE",
    "SETTINGS_FILE",
    "STATE_FILES",
    "FollowerSettings",
    "FollowerState",
    "FollowerStateError",
    "load_follower_state",
    "write_settings",
]

KEY_FILE = "follower.key"
CERT_FILE = "follower.pem"
SETTINGS_FILE = "follower.toml"
STATE_FILES = (KEY_FILE, CERT_FILE, CA_CERT_FILE, SETTINGS_FILE)


class FollowerStateError(Exception):
    """The state directory is missing, incomplete or inconsistent."""

    def __init__(self, message: str, exit_code: ExitCode = ExitCode.CONFIGURATION) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code

    def __str__(self) -> str:
        return self.message


class FollowerSettings(
    msgspec.Struct, frozen=True, rename="kebab", forbid_unknown_fields=True, omit_defaults=True
):
    """``follower.toml``. ``[log]`` may be added by hand; it configures the daemon's logging."""

    name: str
    trust_domain: str
    access_point: str
    """``host:port`` of the access point's REST API (where this follower enrolled)."""
    quic_address: str
    """``host:port`` of the access point's QUIC control server."""
    ca_fingerprint: str
    enrolled_at: str
    tags: dict[str, str] = msgspec.field(default_factory=dict)
    log: LogConfig | None = None


@dataclass(frozen=True)
class FollowerState:
    state_dir: Path
    settings: FollowerSettings
    identity: Identity
    ca_cert: x509.Certificate

    @property
    def name(self) -> str:
        return self.settings.name

    def quic_host_port(self) -> tuple[str, int]:
        return parse_host_port(self.settings.quic_address)


def write_settings(path: Path, settings: FollowerSettings) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        temporary.write_bytes(msgspec.toml.encode(settings))
        os.replace(temporary, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()


def load_follower_state(state_dir: Path) -> FollowerState:
    """Load and cross-check what ``enroll`` wrote; FollowerStateError (exit 8) names the file."""
    state_dir = Path(state_dir)
    if not state_dir.is_dir():
        raise FollowerStateError(
            f"state directory {state_dir} does not exist (run `ah-followerd enroll "
            f"--state-dir {state_dir} ...` first)"
        )
    missing = [name for name in STATE_FILES if not (state_dir / name).is_file()]
    if missing:
        raise FollowerStateError(
            f"state directory {state_dir} is not enrolled: missing {', '.join(missing)} "
            "(run `ah-followerd enroll` first)"
        )
    settings_path = state_dir / SETTINGS_FILE
    try:
        settings = msgspec.toml.decode(settings_path.read_bytes(), type=FollowerSettings)
        parse_host_port(settings.quic_address)
    except (msgspec.DecodeError, ValueError) as exc:
        raise FollowerStateError(f"{settings_path}: invalid follower settings: {exc}") from None
    try:
        identity = Identity.load(state_dir / CERT_FILE, state_dir / KEY_FILE)
        ca_cert = load_ca_certificate((state_dir / CA_CERT_FILE).read_bytes())
    except (OSError, ValueError) as exc:
        raise FollowerStateError(f"state directory {state_dir}: {exc}") from None
    found = ca_fingerprint(ca_cert)
    if found != settings.ca_fingerprint:
        raise FollowerStateError(
            f"{state_dir / CA_CERT_FILE} has fingerprint {found}, but {settings_path} pins "
            f"{settings.ca_fingerprint}"
        )
    expected = spiffe_id_for_follower(settings.trust_domain, settings.name)
    if identity.spiffe_id != expected:
        raise FollowerStateError(
            f"{state_dir / CERT_FILE} names {identity.spiffe_id or 'no SPIFFE ID'}, "
            f"expected {expected} (from {settings_path})"
        )
    if peer_spiffe_id(ca_cert) != f"spiffe://{settings.trust_domain}":
        raise FollowerStateError(
            f"{state_dir / CA_CERT_FILE} is not the CA of trust domain {settings.trust_domain!r}"
        )
    return FollowerState(state_dir, settings, identity, ca_cert)
