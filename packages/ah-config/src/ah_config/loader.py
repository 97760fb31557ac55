"""Reading every layer (files, ``AH_*`` environment, ``--config``, flags) and merging them."""

from __future__ import annotations

import enum
import os
import re
import tomllib
from collections.abc import Collection, Mapping
from pathlib import Path, PurePath
from typing import Any, TypeVar, overload

import msgspec

from ah_domain_types.config_schema import DEFAULTS, ConfigFile, LogConfig

from .errors import ConfigError
from .keys import KeyPath, format_key, parse_key
from .paths import ConfigPaths, find_repo_root, repo_config_paths
from .resolved import (
    REDACTED,
    Layer,
    LayerInput,
    LayerSource,
    ResolvedConfig,
    is_secret_key,
    merge_layers,
)
from .schema import convert_env_text, env_leaves, struct_to_raw, type_at, validate_layer

__all__ = [
    "DEFAULT_ENV_ALIASES",
    "ENV_PREFIX",
    "NON_CONFIG_ENV_VARS",
    "StateLayer",
    "daemon_log_config",
    "environment_layer",
    "flag_layer",
    "load_config",
    "read_config_file",
    "toml_value",
]

S = TypeVar("S", bound=msgspec.Struct)

ENV_PREFIX = "AH_"

NON_CONFIG_ENV_VARS: frozenset[str] = frozenset(
    {
        "AH_HOME",  # moves the user config file
        "AH_SYSTEM_CONFIG",  # moves the system config file
        "AH_JSON",  # same as --json
        "AH_NON_INTERACTIVE",  # same as --non-interactive
        "AH_DEBUG",  # tracebacks for unexpected errors
    }
)
"""``AH_*`` variables that are not configuration keys and must not be reported as unknown."""

DEFAULT_ENV_ALIASES: Mapping[str, str] = {"AH_ACCESS_POINT": "remote-server"}
"""Extra spellings: variable → dotted key. The canonical variable wins when both are set."""


class StateLayer(msgspec.Struct, frozen=True):
    """A daemon's own settings, as a configuration layer: TOML-shaped ``data`` (only the keys
    that belong to the layered configuration) read from ``source`` (the file's path)."""

    source: str
    data: Mapping[str, Any]


_TOML_POSITION = re.compile(r"\s*\(at line (?P<line>\d+), column (?P<column>\d+)\)$")
_TOML_AT_END = re.compile(r"\s*\(at end of document\)$")


def read_config_file(path: Path, *, layer: Layer | None = None) -> dict[str, Any]:
    """Parse one TOML file; every failure is a :class:`ConfigError` naming the file.

    Syntax errors carry the 1-based line and column where parsing stopped.
    """
    layer_name = layer.value if layer is not None else None
    try:
        data = path.read_bytes()
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ConfigError(
            f"{path}: cannot read configuration file: {reason}",
            source=str(path),
            layer=layer_name,
        ) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise ConfigError(
            f"{path}: invalid TOML at line {line}, column {column}: not UTF-8 text",
            source=str(path),
            line=line,
            column=column,
            expected="UTF-8 encoded TOML",
            layer=layer_name,
        ) from None
    text = text.removeprefix("\ufeff")  # editors on Windows like to add a BOM
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        reason = str(exc)
        match = _TOML_POSITION.search(reason)
        if match is not None:
            line, column = int(match.group("line")), int(match.group("column"))
            reason = reason[: match.start()]
        else:
            # tomllib only omits the position at the end of the document.
            line = text.count("\n") + 1
            column = len(text) - (text.rfind("\n") + 1) + 1
            reason = _TOML_AT_END.sub("", reason)
        raise ConfigError(
            f"{path}: invalid TOML at line {line}, column {column}: {reason}",
            source=str(path),
            line=line,
            column=column,
            expected="valid TOML",
            layer=layer_name,
        ) from None


def _set_path(data: dict[str, Any], path: KeyPath, value: Any) -> None:
    node = data
    for segment in path[:-1]:
        node = node.setdefault(segment, {})
    node[path[-1]] = value


def environment_layer(
    env: Mapping[str, str],
    schema: type[msgspec.Struct],
    *,
    prefix: str = ENV_PREFIX,
    aliases: Mapping[str, str] = DEFAULT_ENV_ALIASES,
    allowlist: Collection[str] = NON_CONFIG_ENV_VARS,
) -> tuple[LayerInput, tuple[str, ...]]:
    """The ``AH_*`` layer, and the ``AH_*`` names that match no key (ignored).

    Names come from the schema: ``AH_`` + the dotted key upper-cased with dashes and dots
    as underscores (``AH_SSH_IDENTITY_FILE`` → ``ssh.identity-file``). Empty values count
    as unset. A value that does not fit the key's type is a ConfigError naming the variable.
    """
    leaves = env_leaves(schema, prefix)
    by_path = {leaf.path: leaf for leaf in leaves.values()}
    found: list[tuple[bool, str, KeyPath, Any]] = []
    unknown: list[str] = []
    for var in sorted(env):
        if not var.startswith(prefix):
            continue
        leaf = leaves.get(var)
        is_alias = False
        if leaf is None and var in aliases:
            leaf = by_path.get(parse_key(aliases[var]))
            is_alias = True
        if leaf is None:
            if var not in allowlist:
                unknown.append(var)
            continue
        text = env[var]
        if text == "":
            continue
        try:
            value = convert_env_text(text, leaf.annotation)
        except ValueError as exc:
            shown = REDACTED if is_secret_key(leaf.path) else repr(text)
            key = format_key(leaf.path)
            raise ConfigError(
                f"{var}: invalid value {shown} for '{key}': expected {exc}",
                source=var,
                key=key,
                expected=str(exc),
                layer=Layer.ENV.value,
            ) from None
        found.append((is_alias, var, leaf.path, value))

    data: dict[str, Any] = {}
    sources: dict[KeyPath, str] = {}
    # Aliases first so that the canonical variable overrides them.
    for _, var, path, value in sorted(found, key=lambda item: not item[0]):
        _set_path(data, path, value)
        sources[path] = var
    layer = LayerInput(Layer.ENV, "environment", data, sources)
    validate_layer(data, schema, layer.source_of, layer=Layer.ENV.value)
    return layer, tuple(unknown)


def toml_value(value: Any) -> Any:
    """Click values as TOML-shaped builtins (paths as strings, tuples as arrays)."""
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, list | tuple | set | frozenset):
        return [toml_value(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): toml_value(v) for k, v in value.items()}
    return value


def flag_layer(
    flag_values: Mapping[str, Any],
    schema: type[msgspec.Struct],
    flag_sources: Mapping[str, str] | None = None,
) -> LayerInput:
    """The command-line layer: dotted key → value; ``None`` means the flag was not given.

    A key the schema lacks is a programming error (``ValueError``); a value the schema
    rejects is a ConfigError naming the flag.
    """
    data: dict[str, Any] = {}
    sources: dict[KeyPath, str] = {}
    for key, value in flag_values.items():
        if value is None:
            continue
        path = parse_key(key)
        if type_at(schema, path) is None:
            raise ValueError(f"flag key {key!r} is not a key of {schema.__name__}")
        _set_path(data, path, toml_value(value))
        sources[path] = (flag_sources or {}).get(key) or "--" + "-".join(path)
    layer = LayerInput(Layer.FLAG, "command line", data, sources)
    validate_layer(data, schema, layer.source_of, layer=Layer.FLAG.value)
    return layer


def _default_instance(schema: type[msgspec.Struct]) -> msgspec.Struct | None:
    if schema is ConfigFile:
        return DEFAULTS
    try:
        return schema()
    except TypeError:  # the schema has required fields: no defaults
        return None


@overload
def load_config(
    *,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    config_file: Path | None = None,
    flag_values: Mapping[str, Any] | None = None,
    flag_sources: Mapping[str, str] | None = None,
    platform: str | None = None,
    home: Path | None = None,
    schema: None = None,
    defaults: ConfigFile | None = None,
    env_aliases: Mapping[str, str] = ...,
    env_allowlist: Collection[str] = ...,
    repo: bool = ...,
    state_layer: StateLayer | None = ...,
) -> ResolvedConfig[ConfigFile]: ...


@overload
def load_config(
    *,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    config_file: Path | None = None,
    flag_values: Mapping[str, Any] | None = None,
    flag_sources: Mapping[str, str] | None = None,
    platform: str | None = None,
    home: Path | None = None,
    schema: type[S],
    defaults: S | None = None,
    env_aliases: Mapping[str, str] = ...,
    env_allowlist: Collection[str] = ...,
    repo: bool = ...,
    state_layer: StateLayer | None = ...,
) -> ResolvedConfig[S]: ...


def load_config(
    *,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    config_file: Path | None = None,
    flag_values: Mapping[str, Any] | None = None,
    flag_sources: Mapping[str, str] | None = None,
    platform: str | None = None,
    home: Path | None = None,
    schema: type[msgspec.Struct] | None = None,
    defaults: msgspec.Struct | None = None,
    env_aliases: Mapping[str, str] = DEFAULT_ENV_ALIASES,
    env_allowlist: Collection[str] = NON_CONFIG_ENV_VARS,
    repo: bool = True,
    state_layer: StateLayer | None = None,
) -> ResolvedConfig[Any]:
    """Load and merge every layer, lowest precedence first:

    system, user, repo (``<repo>/.agents/config.toml``), repo-user
    (``<repo>/.agents/config.user.toml``), environment (``AH_*``), ``config_file``
    (``--config``), ``flag_values`` (only flags the user typed; dotted key → value).
    Defaults (``defaults``; :data:`DEFAULTS` for :class:`ConfigFile`, otherwise the
    schema's own field defaults) fill only keys no layer set.

    ``cwd`` (default: the process's) locates the repo; ``env`` (default ``os.environ``)
    supplies ``AH_*``, ``HOME``, ``XDG_CONFIG_HOME``...; ``platform`` (default
    ``sys.platform``) picks the file locations. Each layer is validated on its own, so an
    error names the file (or variable, or flag) at fault.

    Daemons pass ``repo=False`` (their working directory is no workspace, so no repo
    layers) and their own settings file as ``state_layer``, which sits between the user
    layer and the environment: flags > ``AH_*`` > the state directory's file > user > system.
    """
    schema_type: type[msgspec.Struct] = schema if schema is not None else ConfigFile
    env = os.environ if env is None else env
    cwd = Path.cwd() if cwd is None else cwd
    default_value = defaults if defaults is not None else _default_instance(schema_type)
    defaults_raw = struct_to_raw(default_value) if default_value is not None else {}

    paths = ConfigPaths.for_platform(platform, env, home)
    layers: list[LayerInput] = []
    consulted: list[LayerSource] = []

    def add_file(layer: Layer, location: PurePath, *, required: bool) -> None:
        path = Path(str(location))
        present = path.exists()
        consulted.append(LayerSource(layer, str(path), present))
        if not present:
            if required:
                raise ConfigError(
                    f"{path}: configuration file not found",
                    source=str(path),
                    expected="an existing TOML file",
                    layer=layer.value,
                )
            return
        raw = read_config_file(path, layer=layer)
        entry = LayerInput(layer, str(path), raw)
        validate_layer(raw, schema_type, entry.source_of, layer=layer.value)
        layers.append(entry)

    add_file(Layer.SYSTEM, paths.system, required=False)
    add_file(Layer.USER, paths.user, required=False)
    repo_root = find_repo_root(cwd) if repo else None
    if repo_root is not None:
        repo_file, repo_user_file = repo_config_paths(repo_root)
        add_file(Layer.REPO, repo_file, required=False)
        add_file(Layer.REPO_USER, repo_user_file, required=False)

    if state_layer is not None:
        consulted.append(LayerSource(Layer.STATE_DIR, state_layer.source, bool(state_layer.data)))
        if state_layer.data:
            entry = LayerInput(Layer.STATE_DIR, state_layer.source, state_layer.data)
            validate_layer(
                state_layer.data, schema_type, entry.source_of, layer=Layer.STATE_DIR.value
            )
            layers.append(entry)

    env_input, unknown_env = environment_layer(
        env, schema_type, aliases=env_aliases, allowlist=env_allowlist
    )
    consulted.append(LayerSource(Layer.ENV, env_input.source, bool(env_input.data)))
    layers.append(env_input)

    if config_file is not None:
        explicit = config_file if config_file.is_absolute() else cwd / config_file
        add_file(Layer.CONFIG_FILE, explicit, required=True)

    if flag_values:
        flags = flag_layer(flag_values, schema_type, flag_sources)
        consulted.append(LayerSource(Layer.FLAG, flags.source, bool(flags.data)))
        layers.append(flags)

    return merge_layers(
        layers,
        schema=schema_type,
        defaults=defaults_raw,
        consulted=consulted,
        unknown_env=unknown_env,
    )


def daemon_log_config(
    state_log: LogConfig | None = None,
    state_source: str | None = None,
    *,
    env: Mapping[str, str] | None = None,
    platform: str | None = None,
    home: Path | None = None,
) -> LogConfig | None:
    """The ``[log]`` settings of a daemon: the system and user files, then the daemon's own
    state-directory file (``state_log``, read from ``state_source``), then ``AH_LOG_*``.
    The log flags win over all of them (:func:`ah_logging.configure_logging_from_click`).

    The whole of each layer is validated, as for ``ah-fleetctl``: a malformed user file is a
    :class:`ConfigError` naming it, not a silently ignored one.
    """
    state = None
    if state_log is not None:
        state = StateLayer(state_source or "state directory", {"log": struct_to_raw(state_log)})
    resolved = load_config(
        env=env, platform=platform, home=home, repo=False, state_layer=state, cwd=Path("/")
    )
    return resolved.typed.log
