"""The access point's state directory: fleet CA, server identity, token key, settings, registry.

Layout of ``--state-dir``::

    fleet-ca.pem  fleet-ca.key (0600)   the fleet CA (ah_connectivity.FleetCA)
    server.pem    server.key (0600)     the access point's identity (spiffe://TD/ah/serve)
    token-signing.key (0600)            Ed25519 key signing enrollment and user tokens
    ap.toml                             settings written by `init` (trust domain, SANs)
    fleet.db (+ -wal, -shm)             the fleet registry (SQLite, see registry.py)
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import msgspec

from ah_connectivity import (
    CA_CERT_FILE,
    CA_KEY_FILE,
    SERVE_SPIFFE,
    FleetCA,
    Identity,
    TokenSigner,
    issue_server_cert,
)
from ah_domain_types import ExitCode, LogConfig

__all__ = [
    "DB_FILE",
    "IDENTITY_FILES",
    "SERVER_CERT_FILE",
    "SERVER_KEY_FILE",
    "SETTINGS_FILE",
    "STATE_FILES",
    "TOKEN_KEY_FILE",
    "ApSettings",
    "ApState",
    "StateError",
    "check_trust_domain",
    "init_state",
    "load_state",
    "server_sans",
]

SERVER_CERT_FILE = "server.pem"
SERVER_KEY_FILE = "server.key"
TOKEN_KEY_FILE = "token-signing.key"
SETTINGS_FILE = "ap.toml"
DB_FILE = "fleet.db"
# The session event store's file (``events_store.EVENTS_DB_FILE``; not imported, so that
# `init` does not load the API types). A new fleet identity starts a new history: events of
# the old fleet name followers and sessions that no longer exist.
_EVENTS_DB_FILE = "events.db"
IDENTITY_FILES = (
    CA_CERT_FILE,
    CA_KEY_FILE,
    SERVER_CERT_FILE,
    SERVER_KEY_FILE,
    TOKEN_KEY_FILE,
    SETTINGS_FILE,
)
"""What makes an access point this fleet's: a second access point (e.g. a relay) started from a
copy of these is the same fleet, with its own registry and event history."""
STATE_FILES = (
    *IDENTITY_FILES,
    DB_FILE,
    f"{DB_FILE}-wal",
    f"{DB_FILE}-shm",
    _EVENTS_DB_FILE,
    f"{_EVENTS_DB_FILE}-wal",
    f"{_EVENTS_DB_FILE}-shm",
)
DEFAULT_TRUST_DOMAIN = "ah.local"


class StateError(Exception):
    """The state directory is missing, incomplete, unreadable or must not be overwritten."""

    def __init__(self, message: str, exit_code: ExitCode = ExitCode.CONFIGURATION) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code

    def __str__(self) -> str:
        return self.message


class ApSettings(
    msgspec.Struct, frozen=True, rename="kebab", forbid_unknown_fields=True, omit_defaults=True
):
    """``ap.toml``. ``[log]`` may be added by hand; it configures the daemon's logging."""

    trust_domain: str
    server_sans: list[str]
    created_at: str
    log: LogConfig | None = None


@dataclass(frozen=True)
class ApState:
    """Everything loaded from a state directory."""

    state_dir: Path
    settings: ApSettings
    ca: FleetCA
    identity: Identity
    signer: TokenSigner

    @property
    def trust_domain(self) -> str:
        return self.settings.trust_domain

    @property
    def ca_path(self) -> Path:
        return self.state_dir / CA_CERT_FILE

    @property
    def server_cert_path(self) -> Path:
        return self.state_dir / SERVER_CERT_FILE

    @property
    def server_key_path(self) -> Path:
        return self.state_dir / SERVER_KEY_FILE

    @property
    def db_path(self) -> Path:
        return self.state_dir / DB_FILE


def check_trust_domain(trust_domain: str) -> str:
    """Return `trust_domain` or raise ValueError naming it and what is allowed."""
    SERVE_SPIFFE(trust_domain)  # validates
    return trust_domain


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def server_sans(extra: Sequence[str]) -> tuple[list[str], list[str]]:
    """(DNS names, IP addresses) for the server certificate: localhost, 127.0.0.1, ::1, this
    machine's host name, and every extra name or address."""
    dns: list[str] = ["localhost"]
    ips: list[str] = ["127.0.0.1", "::1"]
    hostname = socket.gethostname().strip()
    candidates = ([hostname] if hostname else []) + list(extra)
    for item in candidates:
        item = item.strip()
        if not item:
            continue
        target = ips if _is_ip(item) else dns
        if item not in target:
            target.append(item)
    return dns, ips


def init_state(
    state_dir: Path,
    *,
    trust_domain: str = DEFAULT_TRUST_DOMAIN,
    extra_sans: Sequence[str] = (),
    force: bool = False,
) -> ApState:
    """Create the fleet CA, the server identity, the token-signing key and ``ap.toml``.

    Refuses (StateError, exit 8) when `state_dir` already holds any of them, unless `force`:
    then they are replaced, and with them the fleet registry (every follower certificate was
    issued by the old CA, so every follower must enroll again) and the event history.
    """
    check_trust_domain(trust_domain)
    state_dir = Path(state_dir)
    existing = [name for name in STATE_FILES if (state_dir / name).exists()]
    if existing and not force:
        raise StateError(
            f"{state_dir} already holds an access point ({', '.join(existing)}); refusing to "
            "overwrite it. Pass --force to replace the fleet CA, keys, registry and event history (every "
            "enrolled follower will have to enroll again)."
        )
    if state_dir.exists() and not state_dir.is_dir():
        raise StateError(f"{state_dir} exists and is not a directory")
    for name in existing:
        (state_dir / name).unlink()
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    ca = FleetCA.create(trust_domain, state_dir)
    dns, ips = server_sans(extra_sans)
    identity = issue_server_cert(ca, dns_names=dns, ip_addresses=ips)
    identity.write(state_dir / SERVER_CERT_FILE, state_dir / SERVER_KEY_FILE)
    signer = TokenSigner.create(state_dir / TOKEN_KEY_FILE, trust_domain)
    settings = ApSettings(
        trust_domain=trust_domain,
        server_sans=[*dns, *ips],
        created_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    )
    _write_settings(state_dir / SETTINGS_FILE, settings)
    return ApState(state_dir, settings, ca, identity, signer)


def _write_settings(path: Path, settings: ApSettings) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        temporary.write_bytes(msgspec.toml.encode(settings))
        os.replace(temporary, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()


def _read_settings(path: Path) -> ApSettings:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise StateError(f"{path}: access point settings missing (run `init` first)") from None
    except OSError as exc:
        raise StateError(f"{path}: cannot read access point settings: {exc.strerror}") from None
    try:
        settings = msgspec.toml.decode(data, type=ApSettings)
        check_trust_domain(settings.trust_domain)
    except (msgspec.DecodeError, ValueError) as exc:
        raise StateError(f"{path}: invalid access point settings: {exc}") from None
    return settings


def load_state(state_dir: Path) -> ApState:
    """Load a state directory written by :func:`init_state`; StateError (exit 8) names the file
    at fault."""
    state_dir = Path(state_dir)
    if not state_dir.is_dir():
        raise StateError(
            f"state directory {state_dir} does not exist (run `ah-access-pointd init "
            f"--state-dir {state_dir}` first)"
        )
    settings = _read_settings(state_dir / SETTINGS_FILE)
    try:
        ca = FleetCA.load(state_dir)
        identity = Identity.load(state_dir / SERVER_CERT_FILE, state_dir / SERVER_KEY_FILE)
        signer = TokenSigner.load(state_dir / TOKEN_KEY_FILE, settings.trust_domain)
    except FileNotFoundError as exc:
        what = f"{exc.filename}: file missing" if exc.filename else str(exc)
        raise StateError(f"state directory {state_dir} is incomplete: {what}") from None
    except (OSError, ValueError) as exc:
        raise StateError(f"state directory {state_dir}: {exc}") from None
    if ca.trust_domain != settings.trust_domain:
        raise StateError(
            f"{state_dir / CA_CERT_FILE} is for trust domain {ca.trust_domain!r} but "
            f"{state_dir / SETTINGS_FILE} says {settings.trust_domain!r}"
        )
    return ApState(state_dir, settings, ca, identity, signer)
