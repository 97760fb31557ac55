"""Updating the user configuration file (``ah-fleetctl login`` stores URL, token and CA)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import msgspec
import tomli_w

from ah_domain_types.config_schema import ConfigFile

from .errors import ConfigError
from .keys import KeyPath, format_key, parse_key
from .loader import read_config_file, toml_value
from .paths import ConfigPaths
from .resolved import Layer
from .schema import type_at, validate_layer

__all__ = ["write_user_config"]

_DIR_MODE = 0o700
_FILE_MODE = 0o600


def _apply(data: dict[str, Any], path: KeyPath, value: Any) -> None:
    if value is None:
        _remove(data, path)
        return
    node = data
    for segment in path[:-1]:
        child = node.get(segment)
        if not isinstance(child, dict):
            child = node[segment] = {}
        node = child
    node[path[-1]] = toml_value(value)


def _remove(data: dict[str, Any], path: KeyPath) -> None:
    """Delete ``path`` and any table it leaves empty."""
    trail: list[dict[str, Any]] = [data]
    for segment in path[:-1]:
        child = trail[-1].get(segment)
        if not isinstance(child, dict):
            return
        trail.append(child)
    trail[-1].pop(path[-1], None)
    for depth in range(len(path) - 1, 0, -1):
        if trail[depth]:
            break
        del trail[depth - 1][path[depth - 1]]


def _make_private_dirs(directory: Path) -> None:
    missing: list[Path] = []
    for candidate in (directory, *directory.parents):
        if candidate.exists():
            break
        missing.append(candidate)
    for candidate in reversed(missing):
        with contextlib.suppress(FileExistsError):  # a concurrent writer made it first
            candidate.mkdir(mode=_DIR_MODE)
            os.chmod(candidate, _DIR_MODE)  # mkdir's mode is filtered by the umask


def write_user_config(
    updates: Mapping[str, Any],
    env: Mapping[str, str] | None = None,
    *,
    platform: str | None = None,
    home: Path | None = None,
    schema: type[msgspec.Struct] = ConfigFile,
) -> Path:
    """Merge ``updates`` (dotted key → value; ``None`` deletes the key) into the user
    config file and return its path.

    The file is found like :meth:`ConfigPaths.for_platform` finds it (``AH_HOME``...).
    Missing directories are created with mode 0700 and the file is (re)written with mode
    0600 through a temporary file and an atomic rename. The result is validated against
    ``schema`` before anything is written; comments in an existing file are not kept.
    """
    env = os.environ if env is None else env
    target = Path(str(ConfigPaths.for_platform(platform, env, home).user))
    data = read_config_file(target, layer=Layer.USER) if target.exists() else {}
    for key, value in updates.items():
        path = parse_key(key)
        if type_at(schema, path) is None:
            raise ConfigError(
                f"{target}: cannot store unknown key {format_key(path)!r}",
                source=str(target),
                key=format_key(path),
                layer=Layer.USER.value,
            )
        _apply(data, path, value)
    validate_layer(data, schema, lambda _path: str(target), layer=Layer.USER.value)

    _make_private_dirs(target.parent)
    payload = tomli_w.dumps(data).encode("utf-8")
    temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, _FILE_MODE)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temporary, _FILE_MODE)
        os.replace(temporary, target)
    except BaseException:
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise
    return target
