"""The TOML configuration file, one layer of it (system, user, repo, ...).

Keys are kebab-case. Every field is optional so that each layer may be partial;
``None`` means "not set in this layer". Unknown keys are rejected. :data:`DEFAULTS`
holds the documented defaults, applied after the layers are merged.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from .durations import parse_duration
from .errors import SelectorError
from .filesets import REQUIRED_WORD_PATTERN, FilesetSpec, Glob, parse_required
from .patterns import (
    DurationText,
    FilesetName,
    HostName,
    TagSelectorText,
)
from .selectors import TagSelector
from .transport import TransportMethod

__all__ = [
    "DEFAULTS",
    "AgentConfig",
    "ConcurrencyConfig",
    "ConfigFile",
    "FilesetConfig",
    "HostOverrideConfig",
    "LogConfig",
    "PathPolicyConfig",
    "SshConfig",
    "TimeoutsConfig",
    "default_config",
]

Duration = DurationText | Annotated[float, msgspec.Meta(ge=0)]
"""A duration string (``"5s"``, ``"1m30s"``) or a number of seconds."""

RequiredFlag = (
    bool
    | Annotated[str, msgspec.Meta(pattern=REQUIRED_WORD_PATTERN)]
    | Annotated[int, msgspec.Meta(ge=0, le=1)]
)
"""``required`` of a fileset: a boolean, 0/1, or yes/no/true/false/1/0 in any case."""

EnforcedKey = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*$")]
"""A dotted config key such as ``path-policy.allow-direct``."""


class _ConfigSection(
    msgspec.Struct, frozen=True, rename="kebab", forbid_unknown_fields=True, omit_defaults=True
):
    """Common configuration of config tables."""


class SshConfig(_ConfigSection, frozen=True):
    """``[ssh]``: how the leader logs in to followers."""

    user: str | None = None
    identity_file: str | None = None


class FilesetConfig(_ConfigSection, frozen=True):
    """One ``[[fileset]]`` table; the same rules as :class:`FilesetSpec`."""

    name: FilesetName
    include: Annotated[list[Glob], msgspec.Meta(min_length=1)]
    exclude: list[Glob] | None = None
    required: RequiredFlag | None = None
    dest: Annotated[str, msgspec.Meta(min_length=1)] | None = None

    def __post_init__(self) -> None:
        self.to_spec()  # FilesetError is a ValueError: msgspec reports it as a ValidationError

    def to_spec(self) -> FilesetSpec:
        return FilesetSpec(
            name=self.name,
            include=tuple(self.include),
            exclude=tuple(self.exclude or ()),
            required=parse_required(
                False if self.required is None else self.required, fileset=self.name
            ),
            dest=self.dest if self.dest is not None else ".",
        )


class TimeoutsConfig(_ConfigSection, frozen=True):
    """``[timeouts]``: durations such as ``"5s"`` or numbers of seconds."""

    connect: Duration | None = None
    overall: Duration | None = None
    fence: Duration | None = None
    run: Duration | None = None

    def seconds(self, name: Literal["connect", "overall", "fence", "run"]) -> float | None:
        """The named timeout in seconds, or None when unset."""
        value: str | float | None = getattr(self, name)
        return None if value is None else parse_duration(value)


class ConcurrencyConfig(_ConfigSection, frozen=True):
    """``[concurrency]``."""

    transfer: Annotated[int, msgspec.Meta(ge=1)] | None = None
    """Maximum parallel file transfers (slurp)."""


class PathPolicyConfig(_ConfigSection, frozen=True):
    """``[path-policy]``: which data-plane methods the leader may use, and for whom."""

    allow_direct: bool | None = None
    direct_hosts: list[HostName] | None = None
    """Hosts for which direct connections are allowed (all, when unset)."""
    direct_tags: list[TagSelectorText] | None = None
    """``KEY=VALUE`` selectors; followers matching any may be dialled directly."""
    methods: Annotated[list[TransportMethod], msgspec.Meta(min_length=1)] | None = None
    """Methods to try, in order."""
    relays: list[Annotated[str, msgspec.Meta(min_length=1)]] | None = None
    """Access point URLs (``https://host:port``) that may relay to a follower's home access
    point when the leader cannot reach that one itself (the ``relay`` method)."""
    probe_interval: Duration | None = None
    """Health probe of a fixed path this often (default 30 s)."""
    probe_timeout: Duration | None = None
    """Each health probe's timeout (default 1 s)."""
    probe_failures: Annotated[int, msgspec.Meta(ge=1)] | None = None
    """Consecutive failed health probes that degrade a path (default 3)."""

    def __post_init__(self) -> None:
        for text in self.direct_tags or ():
            try:
                TagSelector.parse(text)
            except SelectorError as exc:
                raise ValueError(f"direct-tags: {exc}") from None

    def direct_tag_selectors(self) -> tuple[TagSelector, ...]:
        return tuple(TagSelector.parse(t) for t in self.direct_tags or ())


class AgentConfig(_ConfigSection, frozen=True):
    """``[agent]``: the leader agent that keeps paths and SSH transports open between
    ``ah-fleetctl`` invocations (the ControlMaster equivalent)."""

    enabled: bool | None = None
    """Use (and start on first use) the agent; false bypasses it like ``--no-agent``."""
    idle: Duration | None = None
    """The agent exits after this long without a request (default 10 minutes)."""


class LogConfig(_ConfigSection, frozen=True):
    """``[log]``: the config side of ``--log-level/--log-format/--log-file/--log-dir``."""

    level: str | None = None
    format: Literal["text", "json"] | None = None
    file: str | None = None
    dir: str | None = None


class HostOverrideConfig(_ConfigSection, frozen=True):
    """``[hosts.<name>]``: per-follower overrides."""

    workspace: str | None = None
    """Directory on the follower that mirrors the leader's working tree."""
    ssh_user: str | None = None


class ConfigFile(_ConfigSection, frozen=True):
    """One configuration layer (a TOML file, or the environment mapped onto it)."""

    remote_server: str | None = None
    """Access point URL."""
    token: str | None = None
    ca_file: str | None = None
    """Pinned fleet CA certificate (PEM)."""
    sync_ignores: list[str] | None = None
    sync_engine: Literal["auto", "rsync", "mutagen"] | None = None
    """How the fence syncs: ``auto`` (Mutagen when its binary is on PATH, else rsync over
    the fleet's SSH paths), or always ``rsync``, or always ``mutagen`` (an error when it is
    not installed)."""
    ssh: SshConfig | None = None
    fileset: list[FilesetConfig] | None = None
    timeouts: TimeoutsConfig | None = None
    concurrency: ConcurrencyConfig | None = None
    path_policy: PathPolicyConfig | None = None
    agent: AgentConfig | None = None
    log: LogConfig | None = None
    hosts: dict[HostName, HostOverrideConfig] | None = None
    enforced: list[EnforcedKey] | None = None
    """Keys later layers may not override (meaningful in the system layer only)."""
    session: str | None = None

    def filesets(self) -> list[FilesetSpec]:
        return [f.to_spec() for f in self.fileset or ()]


def default_config() -> ConfigFile:
    """A fresh copy of the documented defaults."""
    return ConfigFile(
        sync_ignores=["node_modules", ".venv", "target", "build"],
        sync_engine="auto",
        timeouts=TimeoutsConfig(connect="5s", overall="60s", fence="120s"),
        concurrency=ConcurrencyConfig(transfer=16),
        agent=AgentConfig(enabled=True, idle="10m"),
        path_policy=PathPolicyConfig(
            allow_direct=True,
            methods=[TransportMethod.DIRECT, TransportMethod.CONNECT, TransportMethod.RELAY],
            probe_interval="30s",
            probe_timeout="1s",
            probe_failures=3,
        ),
        # No [log] defaults here: they differ per binary kind (CLI text to stderr, daemon
        # JSON-lines files) and ah-logging applies them after the merge.
    )


DEFAULTS: ConfigFile = default_config()
"""The documented defaults (do not mutate; use :func:`default_config` for a copy)."""
