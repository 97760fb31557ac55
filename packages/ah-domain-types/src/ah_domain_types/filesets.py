"""Fileset descriptors for ``slurp``: which files to fetch back from followers, and where.

A fileset arrives as ``--fileset-data`` (URL-encoded), ``--fileset-file`` (TOML or
JSON) or a ``[[fileset]]`` table in config; all of them go through
:meth:`FilesetSpec.from_mapping` so the same rules and messages apply.
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Mapping
from typing import Annotated, Any
from urllib.parse import parse_qsl, urlencode

import msgspec

from .errors import FilesetError
from .patterns import FILESET_NAME_PATTERN, FilesetName, fullmatch

__all__ = [
    "FILESET_KEYS",
    "REQUIRED_WORD_PATTERN",
    "FilesetSpec",
    "parse_required",
    "validate_fileset_name",
]

FILESET_KEYS = ("name", "include", "exclude", "required", "dest")

REQUIRED_WORD_PATTERN = r"^(?:[Yy][Ee][Ss]|[Nn][Oo]|[Tt][Rr][Uu][Ee]|[Ff][Aa][Ll][Ss][Ee]|1|0)$"
"""Accepted spellings of ``required`` as a string (case-insensitive)."""

_TRUE = frozenset({"yes", "true", "1"})
_FALSE = frozenset({"no", "false", "0"})
_REQUIRED_FORMS = "yes|no|true|false|1|0 (any case) or a boolean"

Glob = Annotated[str, msgspec.Meta(min_length=1)]


def validate_fileset_name(name: object) -> str:
    if not fullmatch(FILESET_NAME_PATTERN, name):
        raise FilesetError(
            f"invalid fileset name {name!r}: expected letters, digits, '_' or '-' only",
            details={"name": str(name)},
        )
    assert isinstance(name, str)
    return name


def parse_required(value: object, *, fileset: str = "?") -> bool:
    """Interpret ``required``: a bool, 0/1, or yes/no/true/false/1/0 in any case."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        word = value.strip().lower()
        if word in _TRUE:
            return True
        if word in _FALSE:
            return False
    raise FilesetError(
        f"fileset {fileset!r}: invalid required value {value!r}; expected {_REQUIRED_FORMS}",
        details={"fileset": fileset, "value": str(value)},
    )


def _globs(value: object, *, key: str, fileset: str) -> tuple[str, ...]:
    items: list[object]
    if isinstance(value, str):
        items = [value]
    elif isinstance(value, list | tuple):
        items = list(value)
    else:
        raise FilesetError(
            f"fileset {fileset!r}: {key} must be a glob or a list of globs, "
            f"got {type(value).__name__}",
            details={"fileset": fileset, "key": key},
        )
    for item in items:
        if not isinstance(item, str) or not item:
            raise FilesetError(
                f"fileset {fileset!r}: {key} entries must be non-empty glob strings, got {item!r}",
                details={"fileset": fileset, "key": key},
            )
    return tuple(str(i) for i in items)


class FilesetSpec(msgspec.Struct, frozen=True, rename="camel"):
    """Files to fetch from each follower into ``dest/<name>/<host>/``."""

    name: FilesetName
    include: Annotated[tuple[Glob, ...], msgspec.Meta(min_length=1)]
    exclude: tuple[Glob, ...] = ()
    required: bool = False
    """When true, a host without any matching file fails the slurp."""
    dest: Annotated[str, msgspec.Meta(min_length=1)] = "."

    def __post_init__(self) -> None:
        validate_fileset_name(self.name)
        if not self.include:
            raise FilesetError(
                f"fileset {self.name!r}: at least one include glob is required",
                details={"fileset": self.name},
            )
        _globs(self.include, key="include", fileset=self.name)
        _globs(self.exclude, key="exclude", fileset=self.name)
        if not isinstance(self.required, bool):
            raise FilesetError(
                f"fileset {self.name!r}: required must be a boolean, got {self.required!r}",
                details={"fileset": self.name},
            )
        if not isinstance(self.dest, str) or not self.dest:
            raise FilesetError(
                f"fileset {self.name!r}: dest must be a non-empty path, got {self.dest!r}",
                details={"fileset": self.name},
            )

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> FilesetSpec:
        """Build from a plain mapping with keys name, include, exclude, required, dest.

        ``include``/``exclude`` may be one glob or a list; ``required`` takes the forms of
        :func:`parse_required`. Unknown keys are an error naming them.
        """
        if not isinstance(data, Mapping):
            raise FilesetError(
                f"a fileset must be a table/object, got {type(data).__name__}",
            )
        raw_name = data.get("name")
        label = raw_name if isinstance(raw_name, str) else "?"
        unknown = sorted(str(k) for k in data if k not in FILESET_KEYS)
        if unknown:
            raise FilesetError(
                f"fileset {label!r}: unknown key{'s' if len(unknown) > 1 else ''} "
                f"{', '.join(repr(k) for k in unknown)}; expected: {', '.join(FILESET_KEYS)}",
                details={"fileset": label, "unknown": ",".join(unknown)},
            )
        if raw_name is None:
            raise FilesetError("fileset: missing 'name'", details={"fileset": "?"})
        name = validate_fileset_name(raw_name)
        if "include" not in data:
            raise FilesetError(
                f"fileset {name!r}: at least one include glob is required",
                details={"fileset": name},
            )
        dest = data.get("dest", ".")
        if not isinstance(dest, str) or not dest:
            raise FilesetError(
                f"fileset {name!r}: dest must be a non-empty path, got {dest!r}",
                details={"fileset": name},
            )
        return cls(
            name=name,
            include=_globs(data["include"], key="include", fileset=name),
            exclude=_globs(data.get("exclude", ()), key="exclude", fileset=name),
            required=parse_required(data.get("required", False), fileset=name),
            dest=dest,
        )

    @classmethod
    def from_urlencoded(cls, text: str) -> FilesetSpec:
        """Parse ``name=logs&include=*.log&include=out/**&exclude=tmp&required=yes&dest=out``.

        ``include`` and ``exclude`` repeat; the other keys may appear once.
        """
        try:
            pairs = parse_qsl(text, keep_blank_values=True, strict_parsing=True)
        except ValueError as exc:
            raise FilesetError(
                f"invalid fileset data {text!r}: {exc}; expected "
                "name=NAME&include=GLOB[&include=GLOB...][&exclude=GLOB...]"
                "[&required=yes|no][&dest=DIR]",
                details={"value": text},
            ) from None
        data: dict[str, Any] = {}
        for key, value in pairs:
            if key in ("include", "exclude"):
                data.setdefault(key, []).append(value)
            elif key in data:
                raise FilesetError(
                    f"invalid fileset data {text!r}: {key!r} given more than once",
                    details={"value": text, "key": key},
                )
            else:
                data[key] = value
        return cls.from_mapping(data)

    @classmethod
    def from_toml(cls, text_or_table: str | Mapping[str, Any]) -> FilesetSpec:
        """Parse one fileset from a TOML document (or an already-parsed table)."""
        if isinstance(text_or_table, str):
            try:
                table: Mapping[str, Any] = tomllib.loads(text_or_table)
            except tomllib.TOMLDecodeError as exc:
                raise FilesetError(f"invalid fileset TOML: {exc}") from None
        else:
            table = text_or_table
        return cls.from_mapping(table)

    @classmethod
    def from_json(cls, data: bytes | str) -> FilesetSpec:
        """Parse one fileset from a JSON object."""
        try:
            parsed = json.loads(data)
        except ValueError as exc:
            raise FilesetError(f"invalid fileset JSON: {exc}") from None
        if not isinstance(parsed, dict):
            raise FilesetError(
                f"invalid fileset JSON: expected an object, got {type(parsed).__name__}"
            )
        return cls.from_mapping(parsed)

    def to_mapping(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "include": list(self.include),
            "exclude": list(self.exclude),
            "required": self.required,
            "dest": self.dest,
        }

    def to_urlencoded(self) -> str:
        """The ``--fileset-data`` form; :meth:`from_urlencoded` reads it back."""
        pairs = [("name", self.name)]
        pairs += [("include", g) for g in self.include]
        pairs += [("exclude", g) for g in self.exclude]
        pairs += [("required", "yes" if self.required else "no"), ("dest", self.dest)]
        return urlencode(pairs)
