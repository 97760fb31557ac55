"""The data plane as the leader's commands use it: one SSH transport per selected follower.

Everything that reaches a follower's sshd goes through here, so ``run``, ``slurp`` and the
fence share one path per follower and one set of rules:

* :class:`HostConnector` — ``await connect(follower) -> SshTransport``: dial the follower,
  verify its host key against the fingerprint it reported over its authenticated control
  connection (``info.host_key_fingerprint``; never trust on first use) and log in with the
  leader's key. Failures are :class:`FollowerUnreachable` (a
  :class:`ah_run_everywhere.HostUnreachable`) with a ``kind`` and a reason naming the host.
  ``openssh_options(follower)`` gives the matching OpenSSH client options, so plain
  ``ssh``/``rsync``/``mutagen`` use the same path.
* :class:`DirectConnector` — TCP to the follower's advertised ``info.direct_address``,
  subject to ``[path-policy]``. The CONNECT / relay connectors of path selection plug in
  at :func:`make_connector`.
* :class:`FleetLinks` — the transports of a selection, opened in parallel under the
  per-host connect deadline (config ``timeouts.connect``). A follower that cannot be
  reached is recorded in :attr:`FleetLinks.unreachable` — never dropped.
  :meth:`FleetLinks.ssh_config` writes an OpenSSH client config (one ``Host ah-<name>``
  per linked follower) whose ``known_hosts`` holds exactly the keys the transports
  verified.
* :func:`leader_workspace` and :meth:`FleetLinks.path_mapping`: the leader's tree (the repo
  root) maps onto each follower's workspace (``info.workspace``, or config
  ``hosts.<name>.workspace``), in the follower's path flavour.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import msgspec
from loguru import logger

from ah_config import CliError
from ah_domain_types import (
    ExitCode,
    FollowerStatus,
    OsKind,
    PathPolicyConfig,
    TransportMethod,
    parse_host_port,
)
from ah_run_everywhere import HostUnreachable, PathMapping, TargetHost
from ah_ssh_bridge import (
    HostKeyMismatch,
    SshAuthError,
    SshConnectError,
    SshError,
    SshOptions,
    SshTransport,
)

from .thin import repo_root_of

if TYPE_CHECKING:
    from .context import FleetContext
    from .fencing import DigestSessions

__all__ = [
    "SSH_ALIAS_PREFIX",
    "DirectConnector",
    "FleetLinks",
    "FollowerUnreachable",
    "HostConnector",
    "SshLogin",
    "control_dir",
    "direct_refusal",
    "leader_os",
    "leader_workspace",
    "make_connector",
    "make_direct_connector",
    "open_links",
    "ssh_alias",
    "ssh_login",
    "stop_control_masters",
    "workspace_overrides",
]

SSH_ALIAS_PREFIX = "ah-"
"""``Host ah-<follower>`` in the generated OpenSSH config."""

_DEFAULT_IDENTITIES = ("id_ed25519", "id_ecdsa", "id_rsa")
_CONFIG_LAYERS_WITH_FILES = frozenset({"system", "user", "repo", "repo-user", "config-file"})
_UNSAFE_CONFIG_VALUE = re.compile(r'["\n\r\x00]')


def ssh_alias(name: str) -> str:
    """The OpenSSH ``Host`` alias of follower ``name`` (``ah-<name>``)."""
    return f"{SSH_ALIAS_PREFIX}{name}"


class FollowerUnreachable(HostUnreachable):
    """No SSH transport to a follower: ``reason`` says why and names the host.

    ``kind`` classifies it: ``no-address``, ``policy``, ``refused``, ``timeout``,
    ``unreachable``, ``protocol``, ``host-key``, ``auth``, ``connection-lost``, ``other``
    (the SSH ones are ``ah_ssh_bridge`` error kinds)."""

    def __init__(self, host: str, reason: str, *, kind: str = "other") -> None:
        super().__init__(host, reason)
        self.kind = kind


class SshLogin(msgspec.Struct, frozen=True):
    """Who the leader logs in as: a user and one private key (public-key auth only)."""

    user: str
    identity_file: Path
    users: dict[str, str] = {}
    """Per-follower user overrides (config ``hosts.<name>.ssh-user``)."""

    def user_for(self, name: str) -> str:
        return self.users.get(name, self.user)


class HostConnector(Protocol):
    """Opens the leader's SSH transport to one follower."""

    async def connect(self, follower: FollowerStatus) -> SshTransport:
        """An authenticated transport whose host key matched ``info.host_key_fingerprint``.

        Raises:
            FollowerUnreachable: with ``kind`` and a reason naming the follower.
        """
        ...

    def openssh_options(self, follower: FollowerStatus) -> dict[str, str]:
        """OpenSSH client options reaching the same sshd the same way (``HostName``,
        ``Port``, ``User``, ``IdentityFile``, or a ``ProxyCommand``...); used for the
        ``Host ah-<name>`` block of :meth:`FleetLinks.ssh_config`."""
        ...


def direct_refusal(follower: FollowerStatus, policy: PathPolicyConfig | None) -> str | None:
    """Why ``[path-policy]`` forbids dialling ``follower`` directly, or None when allowed."""
    if policy is None:
        return None
    name = follower.info.name
    if policy.allow_direct is False:
        return f"direct connections are disabled (path-policy.allow-direct = false) for {name}"
    if policy.methods is not None and TransportMethod.DIRECT not in policy.methods:
        listed = ", ".join(m.value for m in policy.methods)
        return f"path-policy.methods ({listed}) does not include direct, so {name} is not dialled"
    allowed_hosts = policy.direct_hosts
    selectors = policy.direct_tag_selectors()
    if allowed_hosts is None and not selectors:
        return None
    if allowed_hosts is not None and name in allowed_hosts:
        return None
    if any(s.matches(follower.info) for s in selectors):
        return None
    return (
        f"{name} is not in path-policy.direct-hosts and matches none of "
        "path-policy.direct-tags, so it may not be dialled directly"
    )


class DirectConnector:
    """TCP to the follower's advertised ``info.direct_address`` (the ``direct`` method)."""

    def __init__(
        self,
        user: str,
        identity_file: Path | str,
        options: SshOptions | None = None,
        *,
        users: Mapping[str, str] | None = None,
        policy: PathPolicyConfig | None = None,
    ) -> None:
        self.login = SshLogin(user=user, identity_file=Path(identity_file), users=dict(users or {}))
        self.options = options or SshOptions()
        self.policy = policy

    def _address(self, follower: FollowerStatus) -> tuple[str, int]:
        info = follower.info
        refusal = direct_refusal(follower, self.policy)
        if refusal is not None:
            raise FollowerUnreachable(info.name, refusal, kind="policy")
        if info.direct_address is None:
            raise FollowerUnreachable(
                info.name,
                f"{info.name} advertises no direct SSH address and no other path "
                "(connect, relay) is available to this leader",
                kind="no-address",
            )
        return parse_host_port(info.direct_address, default_port=22)

    def options_for(self, follower: FollowerStatus) -> SshOptions:
        """Windows followers run PowerShell: no POSIX process-group control there."""
        if follower.info.os is OsKind.WINDOWS and self.options.process_control:
            return msgspec.structs.replace(self.options, process_control=False)
        return self.options

    async def connect(self, follower: FollowerStatus) -> SshTransport:
        name = follower.info.name
        address, port = self._address(follower)
        try:
            return await SshTransport.connect(
                address,
                port,
                host=name,
                username=self.login.user_for(name),
                key_path=self.login.identity_file,
                expected_fingerprint=follower.info.host_key_fingerprint,
                options=self.options_for(follower),
            )
        except HostKeyMismatch as exc:
            raise FollowerUnreachable(name, str(exc), kind=exc.kind) from exc
        except (SshConnectError, SshAuthError) as exc:
            raise FollowerUnreachable(
                name, f"direct {address}:{port}: {exc}", kind=exc.kind
            ) from exc
        except SshError as exc:
            raise FollowerUnreachable(
                name, f"direct {address}:{port}: {exc}", kind=exc.kind
            ) from exc
        except OSError as exc:
            raise FollowerUnreachable(
                name, f"direct {address}:{port}: {exc}", kind="unreachable"
            ) from exc

    def openssh_options(self, follower: FollowerStatus) -> dict[str, str]:
        address, port = self._address(follower)
        return {
            "HostName": address,
            "Port": str(port),
            "User": self.login.user_for(follower.info.name),
            "IdentityFile": str(self.login.identity_file),
        }


# --------------------------------------------------------------------------- configuration


def _config_relative(app: FleetContext, key: str, value: str) -> Path:
    """``value`` as a path; relative paths from a config file are relative to that file."""
    path = Path(value).expanduser()
    origin = app.config.origin(key)
    if (
        not path.is_absolute()
        and origin is not None
        and origin.layer.value in (_CONFIG_LAYERS_WITH_FILES)
    ):
        path = Path(origin.source).parent / path
    return path


def ssh_login(app: FleetContext) -> SshLogin:
    """The login from config: ``ssh.user`` (default: the local user name),
    ``ssh.identity-file`` (default: the first of ``~/.ssh/id_ed25519``, ``id_ecdsa``,
    ``id_rsa`` that exists; none is a configuration error, exit 8), and per-host
    ``hosts.<name>.ssh-user``."""
    cfg = app.config.typed
    ssh = cfg.ssh
    user = (ssh.user if ssh is not None else None) or getpass.getuser()
    configured = ssh.identity_file if ssh is not None else None
    if configured:
        identity = _config_relative(app, "ssh.identity-file", configured)
        if not identity.is_file():
            raise CliError(
                ExitCode.CONFIGURATION,
                f"{app.config.where('ssh.identity-file')}: SSH identity file {identity} does not exist (expected the "
                "private key the followers authorize for the leader)",
                kind="configuration",
                details={"key": "ssh.identity-file", "value": str(identity)},
            )
    else:
        home = Path(os.environ.get("HOME") or Path.home())
        candidates = [home / ".ssh" / n for n in _DEFAULT_IDENTITIES]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise CliError(
                ExitCode.CONFIGURATION,
                "no SSH identity for the followers: set ssh.identity-file (or "
                f"AH_SSH_IDENTITY_FILE); none of {', '.join(map(str, candidates))} exists",
                kind="configuration",
                details={"key": "ssh.identity-file"},
            )
        identity = found
    users = {
        name: override.ssh_user for name, override in (cfg.hosts or {}).items() if override.ssh_user
    }
    return SshLogin(user=user, identity_file=identity, users=users)


def make_connector(app: FleetContext) -> HostConnector:
    """The connector this invocation uses: path selection (direct → connect → relay under
    ``[path-policy]``, :class:`ah_fleetctl.paths.PathConnector`)."""
    from .paths import make_path_connector

    return make_path_connector(app)


def make_direct_connector(app: FleetContext) -> HostConnector:
    """:class:`DirectConnector` under ``[path-policy]`` (direct TCP only)."""
    login = ssh_login(app)
    options = SshOptions(connect_timeout_s=app.connect_timeout_s())
    return DirectConnector(
        login.user,
        login.identity_file,
        options,
        users=login.users,
        policy=app.config.typed.path_policy,
    )


def workspace_overrides(app: FleetContext) -> dict[str, str]:
    """Config ``hosts.<name>.workspace`` values, by follower name."""
    return {
        name: override.workspace
        for name, override in (app.config.typed.hosts or {}).items()
        if override.workspace
    }


# --------------------------------------------------------------------------- workspaces


def leader_workspace(cwd: Path | str | None = None) -> Path:
    """The leader's tree: the nearest ancestor of ``cwd`` (itself included) holding
    ``.agents/`` or ``.git``, else ``cwd`` itself (absolute, symlinks resolved)."""
    # ah_config.find_repo_root's rule on plain strings (the leader agent asks per run).
    start = os.path.realpath(cwd if cwd is not None else os.getcwd())
    return Path(repo_root_of(start) or start)


def leader_os() -> OsKind:
    """This machine's OS family (the leader side of every :class:`PathMapping`)."""
    if sys.platform == "win32":
        return OsKind.WINDOWS
    if sys.platform == "darwin":
        return OsKind.MACOS
    return OsKind.LINUX


# --------------------------------------------------------------------------- OpenSSH config


def control_dir() -> Path:
    """A private (0700, owned by us) directory for OpenSSH ControlMaster sockets.

    Short on purpose: a Unix socket path holds at most ~104 bytes, and ``%C`` adds 40.
    ``$XDG_RUNTIME_DIR/agent-harbor/cm`` when that exists, else ``<tmp>/ah-<uid>/cm``.
    """
    runtime = os.environ.get("XDG_RUNTIME_DIR", "")
    if runtime and Path(runtime).is_absolute() and Path(runtime).is_dir():
        base = Path(runtime) / "agent-harbor"
    else:
        base = Path(tempfile.gettempdir()) / f"ah-{os.getuid() if hasattr(os, 'getuid') else 0}"
    directory = base / "cm"
    for path in (base, directory):
        with contextlib.suppress(FileExistsError):
            path.mkdir(mode=0o700)
        info = path.lstat()
        if path.is_symlink() or not path.is_dir():
            raise CliError(
                ExitCode.CONFIGURATION,
                f"control socket directory {path} is not a directory (a symlink?); remove it",
                kind="configuration",
            )
        if hasattr(os, "getuid") and info.st_uid != os.getuid():
            raise CliError(
                ExitCode.CONFIGURATION,
                f"control socket directory {path} belongs to uid {info.st_uid}, not to us; "
                "refusing to put SSH control sockets there",
                kind="configuration",
            )
        if info.st_mode & 0o077:
            os.chmod(path, 0o700)
    return directory


def _config_value(key: str, value: str) -> str:
    if _UNSAFE_CONFIG_VALUE.search(value):
        raise ValueError(f"OpenSSH option {key} value {value!r} has a quote or newline")
    return f'"{value}"' if any(c.isspace() for c in value) or not value else value


def _known_hosts_name(options: Mapping[str, str]) -> str:
    alias = options.get("HostKeyAlias")
    if alias:
        return alias
    host = options["HostName"]
    port = int(options.get("Port", "22"))
    return host if port == 22 else f"[{host}]:{port}"


def stop_control_masters(config_path: Path, names: Iterable[str], timeout: float = 10.0) -> None:
    """``ssh -F config -O exit ah-<name>`` for each follower: ends the ControlPersist
    masters a generated config may have started (nothing happens where none runs)."""
    ssh = shutil.which("ssh")
    if ssh is None:
        return
    for name in names:
        with contextlib.suppress(subprocess.TimeoutExpired, OSError):
            subprocess.run(
                [ssh, "-F", str(config_path), "-O", "exit", ssh_alias(name)],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=timeout,
                check=False,
            )


# --------------------------------------------------------------------------- links


class FleetLinks:
    """The SSH transports of one selection (``followers`` in selection order).

    Build with :meth:`open`; close with :meth:`close` or ``async with``. ``transports``
    holds the linked followers, ``unreachable`` the others with the reason — together
    always every selected follower.
    """

    def __init__(
        self,
        followers: Sequence[FollowerStatus],
        connector: HostConnector,
        *,
        connect_timeout: float = 5.0,
        leader_root: Path | str | None = None,
        workspaces: Mapping[str, str] | None = None,
    ) -> None:
        self.followers: dict[str, FollowerStatus] = {f.info.name: f for f in followers}
        self.connector = connector
        self.connect_timeout = connect_timeout
        self.leader_root = leader_workspace(leader_root)
        self._workspaces = dict(workspaces or {})
        self.transports: dict[str, SshTransport] = {}
        self.unreachable: dict[str, FollowerUnreachable] = {}
        self.host_keys: dict[str, str] = {}
        """Follower → the host public key line its transport verified."""
        self._locks: dict[str, asyncio.Lock] = {}
        self.digest_sessions: DigestSessions | None = None
        """Warm fence digest sessions over these links, when a caller that fences again and
        again keeps them (:func:`ah_fleetctl.fencing.keep_digest_sessions`); closed with
        the links."""

    @classmethod
    async def open(
        cls,
        followers: Sequence[FollowerStatus],
        connector: HostConnector,
        *,
        connect_timeout: float = 5.0,
        leader_root: Path | str | None = None,
        workspaces: Mapping[str, str] | None = None,
    ) -> FleetLinks:
        """Connect to every follower in parallel; each gets ``connect_timeout`` seconds."""
        links = cls(
            followers,
            connector,
            connect_timeout=connect_timeout,
            leader_root=leader_root,
            workspaces=workspaces,
        )
        await links.connect()
        return links

    async def connect(self) -> None:
        """Link every follower not linked yet, in parallel (each under the connect
        deadline); on cancellation the transports opened so far are closed."""
        try:
            await asyncio.gather(
                *(self._link(name) for name in self.followers if name not in self.transports)
            )
        except BaseException:
            await self.close()
            raise

    # -- state ------------------------------------------------------------------------------

    @property
    def names(self) -> list[str]:
        """Every selected follower, in selection order."""
        return list(self.followers)

    @property
    def linked(self) -> list[str]:
        """Selected followers with an active transport, in selection order."""
        return [n for n in self.followers if n in self.transports]

    def os_of(self, name: str) -> OsKind:
        return self.followers[name].info.os

    def transport(self, name: str) -> SshTransport:
        """``name``'s transport; :class:`FollowerUnreachable` when it has none."""
        found = self.transports.get(name)
        if found is not None:
            return found
        failure = self.unreachable.get(name)
        if failure is not None:
            raise failure
        raise FollowerUnreachable(name, f"{name} is not part of this selection")

    # -- linking ----------------------------------------------------------------------------

    async def _link(self, name: str) -> None:
        follower = self.followers[name]
        # A connector that tries several methods (path selection) bounds its own attempts by
        # timeouts.connect each and needs up to its overall deadline in total.
        deadline = max(self.connect_timeout, getattr(self.connector, "overall_timeout_s", 0.0))
        try:
            async with asyncio.timeout(deadline):
                transport = await self.connector.connect(follower)
        except FollowerUnreachable as exc:
            self._fail(name, exc)
            return
        except TimeoutError:
            self._fail(
                name,
                FollowerUnreachable(
                    name,
                    f"{name}: no SSH session within {deadline:g}s (timeouts.connect)",
                    kind="timeout",
                ),
            )
            return
        except HostUnreachable as exc:
            self._fail(name, FollowerUnreachable(name, exc.reason))
            return
        self.transports[name] = transport
        self.unreachable.pop(name, None)
        self.host_keys[name] = transport.host_public_key
        logger.debug("data plane: linked {} ({})", name, transport.host_key_fingerprint)

    def _fail(self, name: str, error: FollowerUnreachable) -> None:
        self.unreachable[name] = error
        logger.info("data plane: {} unreachable: {}", name, error.reason)

    async def relink(self, name: str) -> SshTransport:
        """A fresh transport to ``name`` after its old one died (one attempt).

        Raises :class:`FollowerUnreachable` when that fails too."""
        lock = self._locks.setdefault(name, asyncio.Lock())
        async with lock:
            current = self.transports.get(name)
            if current is not None and current.is_active:
                return current
            if current is not None:
                del self.transports[name]
                with contextlib.suppress(Exception):
                    await current.close()
            await self._link(name)
            return self.transport(name)

    async def close(self) -> None:
        """Close every transport and the digest sessions kept (idempotent)."""
        if self.digest_sessions is not None:
            sessions, self.digest_sessions = self.digest_sessions, None
            with contextlib.suppress(Exception):
                await sessions.close()
        transports = list(self.transports.values())
        self.transports.clear()
        for transport in transports:
            with contextlib.suppress(Exception):
                await transport.close()

    async def __aenter__(self) -> FleetLinks:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # -- workspaces -------------------------------------------------------------------------

    def workspace(self, name: str) -> str:
        """The follower's copy of the leader tree (config override, else what it reported)."""
        return self._workspaces.get(name) or self.followers[name].info.workspace

    def path_mapping(self, name: str) -> PathMapping:
        """Leader tree → ``name``'s workspace, in the follower's path flavour."""
        return PathMapping(
            str(self.leader_root), self.workspace(name), self.os_of(name), leader_os()
        )

    def target_hosts(self, leader_cwd: Path | str | None = None) -> list[TargetHost]:
        """Every selected follower as a run target, working directory mapped from
        ``leader_cwd`` (default: the current directory) into its workspace."""
        cwd = os.path.realpath(leader_cwd if leader_cwd is not None else os.getcwd())
        root = str(self.leader_root)
        return [
            TargetHost(
                name=name,
                os=self.os_of(name),
                cwd=_follower_cwd(root, self.workspace(name), self.os_of(name), cwd),
            )
            for name in self.followers
        ]

    # -- OpenSSH ----------------------------------------------------------------------------

    def ssh_config(self, path: Path | str) -> Path:
        """Write an OpenSSH client config with one ``Host ah-<name>`` per linked follower
        and return its path; ``<path>.known_hosts`` beside it holds the host keys the
        transports verified (``StrictHostKeyChecking yes``: no other key is accepted).
        Connections share a ControlMaster per follower (``ControlPersist 10m``); end them
        with :func:`stop_control_masters`."""
        config = Path(path)
        config.parent.mkdir(parents=True, exist_ok=True)
        known_hosts = config.with_name(config.name + ".known_hosts")
        sockets = control_dir()
        blocks: list[str] = [
            "# Generated by ah-fleetctl: the leader's SSH paths to its followers.",
            "# Host keys below were verified against the fingerprints the followers",
            "# reported over their authenticated control connections.",
        ]
        known: list[str] = []
        for name in self.linked:
            follower = self.followers[name]
            options = self.connector.openssh_options(follower)
            known.append(f"{_known_hosts_name(options)} {self.host_keys[name]}")
            settings = {
                **options,
                "IdentitiesOnly": "yes",
                "IdentityAgent": "none",
                "PasswordAuthentication": "no",
                "KbdInteractiveAuthentication": "no",
                "BatchMode": "yes",
                "StrictHostKeyChecking": "yes",
                "UserKnownHostsFile": str(known_hosts),
                "GlobalKnownHostsFile": "/dev/null",
                "UpdateHostKeys": "no",
                "CheckHostIP": "no",
                "ConnectTimeout": str(max(1, round(self.connect_timeout))),
                "ServerAliveInterval": "15",
                "ServerAliveCountMax": "2",
                "ControlMaster": "auto",
                "ControlPath": str(sockets / "%C"),
                "ControlPersist": "10m",
                "LogLevel": "ERROR",
            }
            blocks.append(f"\nHost {ssh_alias(name)}")
            blocks.extend(f"  {key} {_config_value(key, value)}" for key, value in settings.items())
        _write_private(known_hosts, "".join(f"{line}\n" for line in known))
        _write_private(config, "\n".join(blocks) + "\n")
        return config


_MAPPED_KEPT = 4096
_mapped: dict[tuple[str, str, OsKind, str], str] = {}


def _follower_cwd(leader_root: str, workspace: str, follower_os: OsKind, cwd: str) -> str:
    """``cwd`` mapped into ``workspace`` (:class:`PathMapping`, a lexical function of its
    arguments: kept, since the leader agent maps the same directories run after run;
    errors are not kept)."""
    key = (leader_root, workspace, follower_os, cwd)
    found = _mapped.get(key)
    if found is None:
        found = PathMapping(leader_root, workspace, follower_os, leader_os()).to_follower(cwd)
        if len(_mapped) >= _MAPPED_KEPT:
            _mapped.clear()
        _mapped[key] = found
    return found


def _write_private(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.replace(temporary, path)


async def open_links(
    app: FleetContext,
    followers: Sequence[FollowerStatus],
    *,
    connector: HostConnector | None = None,
    leader_root: Path | str | None = None,
) -> FleetLinks:
    """:meth:`FleetLinks.open` with this invocation's connector (:func:`make_connector`),
    connect deadline (``timeouts.connect``) and workspace overrides (``hosts.<name>.
    workspace``). What ``run``, ``slurp`` and the fence call."""
    return await FleetLinks.open(
        followers,
        connector if connector is not None else make_connector(app),
        connect_timeout=app.connect_timeout_s(),
        leader_root=leader_root,
        workspaces=workspace_overrides(app),
    )
