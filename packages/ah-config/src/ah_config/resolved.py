"""Merging layers into one configuration with provenance (pure: no file or env access)."""

from __future__ import annotations

import copy
import difflib
import enum
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Generic, TypeVar

import msgspec
import tomli_w

from .errors import ConfigError
from .keys import KeyPath, format_key, is_prefix, parse_key
from .schema import (
    ENFORCED_KEY,
    describe_type,
    schema_keys,
    shape_of,
    split_msgspec_error,
    type_at,
)

__all__ = [
    "REDACTED",
    "ConfigEntry",
    "Layer",
    "LayerInput",
    "LayerSource",
    "Origin",
    "OverrideAttempt",
    "ResolvedConfig",
    "UnknownConfigKeyError",
    "is_secret_key",
    "merge_layers",
]

S = TypeVar("S", bound=msgspec.Struct)

REDACTED = "***"
_SECRET_WORDS = ("token", "password", "secret", "private-key")


class Layer(enum.StrEnum):
    """Where a value came from, in precedence order (lowest first, ``DEFAULT`` aside)."""

    DEFAULT = "default"
    SYSTEM = "system"
    USER = "user"
    REPO = "repo"
    REPO_USER = "repo-user"
    STATE_DIR = "state-dir"
    """A daemon's own settings file in its state directory (daemons only; no repo layers)."""
    ENV = "env"
    CONFIG_FILE = "config-file"
    FLAG = "flag"


class OverrideAttempt(msgspec.Struct, frozen=True, rename="camel"):
    """A later layer tried to set a key the system layer enforces; it was ignored."""

    key: str
    layer: Layer
    source: str


class Origin(msgspec.Struct, frozen=True, rename="camel", omit_defaults=True):
    """Provenance of one leaf key: the layer and the file, ``AH_*`` variable or ``--flag``."""

    layer: Layer
    source: str
    enforced: bool = False
    """The system layer locks this key (``enforced = [...]``)."""
    overridden_attempts: tuple[OverrideAttempt, ...] = ()
    """Later layers that tried to change an enforced key."""

    def describe(self) -> str:
        """``env AH_TOKEN``, ``repo /r/.agents/config.toml``, ``default``..."""
        layer = f"{self.layer.value} (enforced)" if self.enforced else self.layer.value
        if self.layer is Layer.DEFAULT:
            return layer
        text = f"{layer} {self.source}"
        if self.overridden_attempts:
            tried = ", ".join(f"{a.layer.value} {a.source}" for a in self.overridden_attempts)
            text += f"; ignored: {tried}"
        return text


class LayerSource(msgspec.Struct, frozen=True, rename="camel"):
    """One layer the loader consulted (a file that may not exist, the environment...)."""

    layer: Layer
    source: str
    present: bool


class ConfigEntry(msgspec.Struct, frozen=True, rename="camel"):
    """One leaf of the resolved configuration."""

    key: str
    value: Any
    origin: Origin


class LayerInput(msgspec.Struct, frozen=True):
    """One layer ready to merge: TOML-shaped data plus where each leaf came from."""

    layer: Layer
    source: str
    data: Mapping[str, Any]
    leaf_sources: Mapping[KeyPath, str] = msgspec.field(default_factory=dict)
    """Per-leaf source when it differs from ``source`` (env variable, flag name)."""

    def source_of(self, path: KeyPath) -> str:
        exact = self.leaf_sources.get(path)
        if exact is not None:
            return exact
        under = [s for p, s in self.leaf_sources.items() if is_prefix(path, p) and path]
        return ", ".join(dict.fromkeys(under)) if under else self.source


class UnknownConfigKeyError(KeyError):
    """A dotted key the schema does not have; ``suggestions`` holds close matches."""

    def __init__(self, key: str, suggestions: Sequence[str]) -> None:
        self.key = key
        self.suggestions = tuple(suggestions)
        hint = f"; did you mean {', '.join(self.suggestions)}?" if self.suggestions else ""
        self.message = f"unknown configuration key {key!r}{hint}"
        super().__init__(self.message)

    def __str__(self) -> str:
        return self.message


def is_secret_key(path: KeyPath) -> bool:
    """Keys whose values are never displayed (tokens, passwords...)."""
    return bool(path) and any(word in path[-1].lower() for word in _SECRET_WORDS)


def _leaves(data: Mapping[str, Any], prefix: KeyPath = ()) -> Iterator[tuple[KeyPath, Any]]:
    for key, value in data.items():
        path = (*prefix, key)
        if isinstance(value, Mapping):
            yield from _leaves(value, path)
        else:
            yield path, value


class ResolvedConfig(Generic[S]):
    """The merged configuration: typed value, dotted-key access and per-key provenance."""

    __slots__ = (
        "_leaf_origins",
        "_raw",
        "layers",
        "overridden_attempts",
        "schema",
        "typed",
        "unknown_env",
    )

    def __init__(
        self,
        *,
        schema: type[S],
        typed: S,
        raw: dict[str, Any],
        origins: Mapping[KeyPath, Origin],
        layers: Sequence[LayerSource] = (),
        unknown_env: Sequence[str] = (),
        overridden_attempts: Sequence[OverrideAttempt] = (),
    ) -> None:
        self.schema = schema
        self.typed: S = typed
        """The merged configuration with defaults applied, as the schema type."""
        self._raw = raw
        self._leaf_origins = dict(origins)
        self.layers: tuple[LayerSource, ...] = tuple(layers)
        self.unknown_env: tuple[str, ...] = tuple(unknown_env)
        """``AH_*`` variables that look like configuration but match no key (ignored)."""
        self.overridden_attempts: tuple[OverrideAttempt, ...] = tuple(overridden_attempts)

    # ---------------------------------------------------------------- lookup

    def _path(self, key: str | KeyPath) -> KeyPath:
        try:
            path = parse_key(key) if isinstance(key, str) else tuple(key)
        except ValueError:
            raise UnknownConfigKeyError(str(key), self.suggest(str(key))) from None
        if type_at(self.schema, path) is None:
            raise UnknownConfigKeyError(format_key(path), self.suggest(format_key(path)))
        return path

    def suggest(self, key: str, limit: int = 3) -> list[str]:
        """Known keys close to ``key`` (for "did you mean" messages)."""
        candidates = [k for k in schema_keys(self.schema) if "*" not in k]
        candidates += [format_key(p) for p in self._leaf_origins]
        return difflib.get_close_matches(key, list(dict.fromkeys(candidates)), n=limit, cutoff=0.6)

    def is_key(self, key: str) -> bool:
        """Whether ``key`` names a key or table of the schema."""
        try:
            self._path(key)
        except UnknownConfigKeyError:
            return False
        return True

    def get(self, key: str) -> Any:
        """The typed value at ``key`` (a table gives its Struct); None when unset.

        Raises :class:`UnknownConfigKeyError` (a ``KeyError``) for keys the schema lacks.
        """
        path = self._path(key)
        node: Any = self.typed
        for segment in path:
            if node is None:
                return None
            if isinstance(node, msgspec.Struct):
                names = {f.encode_name: f.name for f in msgspec.structs.fields(type(node))}
                node = getattr(node, names[segment])
            elif isinstance(node, Mapping):
                node = node.get(segment)
            else:
                return None
        return node

    def origin(self, key: str) -> Origin | None:
        """Where the leaf ``key`` came from; None when no layer or default sets it."""
        return self._leaf_origins.get(self._path(key))

    def where(self, key: str, unset: str | None = None) -> str:
        """Where ``key`` came from, for a message (``repo /r/.agents/config.toml``, ``env
        AH_TOKEN``, ``default``); ``unset`` (default: the key) when nothing sets it."""
        origin = self.origin(key)
        if origin is not None:
            return origin.describe()
        return key if unset is None else unset

    def items(self) -> list[tuple[str, Any]]:
        """``(dotted key, value)`` for every set leaf, values as TOML-shaped builtins."""
        return [(e.key, e.value) for e in self.entries()]

    def entries(self, prefix: str | None = None, *, redact: bool = False) -> list[ConfigEntry]:
        """Every set leaf under ``prefix`` (all when None) with its value and origin."""
        base = self._path(prefix) if prefix else ()
        result: list[ConfigEntry] = []
        for path in sorted(self._leaf_origins):
            if not is_prefix(base, path):
                continue
            value = self._value_at(path)
            if redact and is_secret_key(path):
                value = REDACTED
            result.append(ConfigEntry(format_key(path), value, self._leaf_origins[path]))
        return result

    def _value_at(self, path: KeyPath) -> Any:
        node: Any = self._raw
        for segment in path:
            node = node[segment]
        return copy.deepcopy(node)

    def as_builtins(self) -> dict[str, Any]:
        """The merged configuration as TOML-shaped builtins (kebab keys)."""
        return copy.deepcopy(self._raw)

    def to_toml(self, *, redact: bool = True) -> str:
        """The merged configuration as a TOML document (secrets shown as ``***``)."""
        data = self.as_builtins()
        if redact:
            for path in self._leaf_origins:
                if is_secret_key(path):
                    node = data
                    for segment in path[:-1]:
                        node = node[segment]
                    node[path[-1]] = REDACTED
        return tomli_w.dumps(data)

    def __repr__(self) -> str:
        return f"ResolvedConfig({self.schema.__name__}, {len(self._leaf_origins)} keys)"


# --------------------------------------------------------------------------- merging


def _set_leaf(
    merged: dict[str, Any],
    origins: dict[KeyPath, Origin],
    path: KeyPath,
    value: Any,
    origin: Origin,
) -> None:
    node = merged
    for depth, segment in enumerate(path[:-1]):
        child = node.get(segment)
        if not isinstance(child, dict):
            origins.pop(path[: depth + 1], None)  # a scalar replaced by a table
            child = node[segment] = {}
        node = child
    old = node.get(path[-1])
    if isinstance(old, dict):
        for stale in [p for p in origins if is_prefix(path, p)]:
            del origins[stale]
    node[path[-1]] = copy.deepcopy(value)
    origins[path] = origin


def _is_set(merged: Mapping[str, Any], path: KeyPath) -> bool:
    """Whether ``path`` or an enclosing non-table value is already present."""
    node: Any = merged
    for segment in path:
        if not isinstance(node, Mapping):
            return True
        if segment not in node:
            return False
        node = node[segment]
    return True


def _enforced_paths(system: LayerInput | None, schema: type[msgspec.Struct]) -> list[KeyPath]:
    if system is None:
        return []
    listed = system.data.get(ENFORCED_KEY)
    if listed is None:
        return []
    paths: list[KeyPath] = []
    for text in listed:
        try:
            path = parse_key(text)
        except ValueError as exc:
            raise ConfigError(
                f"{system.source}: invalid entry {text!r} in '{ENFORCED_KEY}': {exc}",
                source=system.source,
                key=ENFORCED_KEY,
                expected="dotted configuration keys",
                layer=system.layer.value,
            ) from None
        if type_at(schema, path) is None or path == (ENFORCED_KEY,):
            raise ConfigError(
                f"{system.source}: '{ENFORCED_KEY}' lists {text!r}, which is not a "
                "configuration key",
                source=system.source,
                key=ENFORCED_KEY,
                expected="dotted configuration keys",
                layer=system.layer.value,
            )
        paths.append(path)
    return paths


def merge_layers(
    layers: Sequence[LayerInput],
    *,
    schema: type[S],
    defaults: Mapping[str, Any] | None = None,
    consulted: Sequence[LayerSource] = (),
    unknown_env: Sequence[str] = (),
) -> ResolvedConfig[S]:
    """Merge already-validated layers (lowest precedence first), then fill in defaults.

    Tables merge key by key; scalars and lists replace. Keys listed in the system layer's
    ``enforced`` keep the system value; later attempts are recorded, not applied.
    """
    system = next((layer for layer in layers if layer.layer is Layer.SYSTEM), None)
    enforced = _enforced_paths(system, schema)
    for layer in layers:
        if layer.layer is not Layer.SYSTEM and ENFORCED_KEY in layer.data:
            source = layer.source_of((ENFORCED_KEY,))
            raise ConfigError(
                f"{source}: '{ENFORCED_KEY}' is only honoured in the system configuration",
                source=source,
                key=ENFORCED_KEY,
                layer=layer.layer.value,
            )

    merged: dict[str, Any] = {}
    origins: dict[KeyPath, Origin] = {}
    attempts: list[tuple[KeyPath, OverrideAttempt]] = []
    for layer in layers:
        for path, value in _leaves(layer.data):
            source = layer.source_of(path)
            locked = layer.layer is not Layer.SYSTEM and any(is_prefix(e, path) for e in enforced)
            if locked:
                attempts.append((path, OverrideAttempt(format_key(path), layer.layer, source)))
                continue
            is_enforced = layer.layer is Layer.SYSTEM and any(is_prefix(e, path) for e in enforced)
            _set_leaf(merged, origins, path, value, Origin(layer.layer, source, is_enforced))

    for path, value in _leaves(defaults or {}):
        if not _is_set(merged, path):
            _set_leaf(merged, origins, path, value, Origin(Layer.DEFAULT, "default"))

    for path, attempt in attempts:
        owner = next((p for p in origins if is_prefix(p, path) or is_prefix(path, p)), None)
        if owner is not None:
            old = origins[owner]
            origins[owner] = msgspec.structs.replace(
                old, overridden_attempts=(*old.overridden_attempts, attempt)
            )

    typed = _convert_merged(merged, schema, origins)
    return ResolvedConfig(
        schema=schema,
        typed=typed,
        raw=merged,
        origins=origins,
        layers=consulted,
        unknown_env=unknown_env,
        overridden_attempts=[a for _, a in attempts],
    )


def _convert_merged(
    merged: dict[str, Any], schema: type[S], origins: Mapping[KeyPath, Origin]
) -> S:
    try:
        return msgspec.convert(merged, schema)
    except msgspec.ValidationError as exc:
        reason, at = split_msgspec_error(exc)
        head = at.split("[", 1)[0]
        path = tuple(s for s in head.split(".") if s)
        key = format_key(path) or "<top level>"
        involved = sorted(
            {o.describe() for p, o in origins.items() if is_prefix(path, p) or is_prefix(p, path)}
        )
        came_from = f" (set by {'; '.join(involved)})" if involved else ""
        raise ConfigError(
            f"the merged configuration is invalid at '{key}'{came_from}: {reason}",
            key=key,
            expected=describe_type(type_at(schema, path) or Any),
        ) from None


def shape_is_table(schema: type[msgspec.Struct], path: KeyPath) -> bool:
    """Whether ``path`` names a table (not a leaf) of the schema."""
    tp = type_at(schema, path)
    return tp is not None and shape_of(tp).kind in ("struct", "dict")
