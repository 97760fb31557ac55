"""Walking a msgspec Struct schema: key lookup, per-layer validation, ``AH_*`` mapping.

Everything here is generic over the schema type; the loader passes
``ah_domain_types.config_schema.ConfigFile`` by default and tests pass small Structs.
Shapes are read from the Python annotations (``msgspec.structs.fields``):

- a Struct field is a *table* whose keys are the fields' encoded (kebab) names;
- ``dict[K, V]`` is a table of any keys (``hosts.<name>``), validated key by key;
- anything else (scalars, lists, lists of tables, unions) is a *leaf*: a value that a
  later layer replaces as a whole.
"""

from __future__ import annotations

import enum
import functools
import re
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any, Literal

import msgspec

from .errors import ConfigError
from .keys import KeyPath, format_key

__all__ = [
    "ENFORCED_KEY",
    "EnvLeaf",
    "Shape",
    "convert_env_text",
    "describe_type",
    "describe_value",
    "env_leaves",
    "env_var_name",
    "leaf_error",
    "schema_keys",
    "shape_of",
    "split_msgspec_error",
    "struct_to_raw",
    "type_at",
    "validate_layer",
]

ENFORCED_KEY = "enforced"
"""Top-level key that, in the system layer only, lists keys later layers may not change."""

_MSGSPEC_AT = re.compile(r"^(?P<reason>.*?)(?: - at `\$(?P<at>[^`]*)`)?$", re.DOTALL)
_MSGSPEC_EXPECTED_ONLY = re.compile(r"^Expected (.*?)(?:, got `[^`]*`)?$")
_BOOL_WORDS = {
    "1": True,
    "true": True,
    "yes": True,
    "on": True,
    "0": False,
    "false": False,
    "no": False,
    "off": False,
}


class Shape(msgspec.Struct, frozen=True):
    """How a type behaves in the layered merge."""

    kind: Literal["struct", "dict", "list", "leaf"]
    struct: type[msgspec.Struct] | None = None
    key_type: Any = None
    value_type: Any = None


def _strip_annotated(tp: Any) -> Any:
    while typing.get_origin(tp) is typing.Annotated:
        tp = typing.get_args(tp)[0]
    return tp


def _union_members(tp: Any) -> tuple[Any, ...] | None:
    origin = typing.get_origin(tp)
    if origin is typing.Union or origin is types.UnionType:
        return typing.get_args(tp)
    return None


def _non_none(tp: Any) -> Any:
    """``X | None`` → ``X``; other unions and types unchanged (Annotated stripped)."""
    tp = _strip_annotated(tp)
    members = _union_members(tp)
    if members is None:
        return tp
    rest = [m for m in members if m is not type(None)]
    if len(rest) == 1:
        return _strip_annotated(rest[0])
    return tp


def shape_of(tp: Any) -> Shape:
    """Classify ``tp`` (after removing ``None`` and ``Annotated``)."""
    base = _non_none(tp)
    if isinstance(base, type) and issubclass(base, msgspec.Struct):
        return Shape("struct", struct=base)
    origin = typing.get_origin(base)
    if origin is dict or origin is Mapping:
        args = typing.get_args(base)
        key_type, value_type = args if len(args) == 2 else (str, Any)
        return Shape("dict", key_type=key_type, value_type=value_type)
    if origin in (list, tuple, set, frozenset):
        args = typing.get_args(base)
        return Shape("list", value_type=args[0] if args else Any)
    return Shape("leaf")


@functools.cache
def _fields(struct: type[msgspec.Struct]) -> dict[str, msgspec.structs.FieldInfo]:
    return {f.encode_name: f for f in msgspec.structs.fields(struct)}


def type_at(schema: type[msgspec.Struct], path: KeyPath) -> Any | None:
    """The annotation of the value at ``path``, or None if the schema has no such key."""
    tp: Any = schema
    for segment in path:
        shape = shape_of(tp)
        if shape.kind == "struct":
            assert shape.struct is not None
            field = _fields(shape.struct).get(segment)
            if field is None:
                return None
            tp = field.type
        elif shape.kind == "dict":
            tp = shape.value_type
        else:
            return None
    return tp


def schema_keys(schema: type[msgspec.Struct]) -> list[str]:
    """Every static dotted key of the schema (tables too); ``*`` stands for a dict key."""
    keys: list[str] = []

    def walk(tp: Any, path: KeyPath) -> None:
        shape = shape_of(tp)
        if shape.kind == "struct":
            assert shape.struct is not None
            for name, field in _fields(shape.struct).items():
                keys.append(format_key((*path, name)))
                walk(field.type, (*path, name))
        elif shape.kind == "dict":
            walk(shape.value_type, (*path, "*"))

    walk(schema, ())
    return keys


# --------------------------------------------------------------------------- descriptions


def describe_type(tp: Any) -> str:
    """A short human description of what a value of type ``tp`` must be."""
    if tp is Any:
        return "any value"
    if typing.get_origin(tp) is typing.Annotated:
        base, *metas = typing.get_args(tp)
        text = describe_type(base)
        for meta in metas:
            if isinstance(meta, msgspec.Meta):
                text += _describe_meta(meta)
        return text
    members = _union_members(tp)
    if members is not None:
        parts = [describe_type(m) for m in members if m is not type(None)]
        return " or ".join(dict.fromkeys(parts))
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(v) for v in typing.get_args(tp))
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return "one of " + ", ".join(repr(m.value) for m in tp)
    shape = shape_of(tp)
    if shape.kind == "struct":
        return "a table"
    if shape.kind == "dict":
        return f"a table of {describe_type(shape.value_type)}"
    if shape.kind == "list":
        return f"an array, each item {describe_type(shape.value_type)}"
    names = {str: "a string", int: "an integer", float: "a number", bool: "a boolean"}
    if isinstance(tp, type) and tp in names:
        return names[tp]
    return getattr(tp, "__name__", str(tp))


def _describe_meta(meta: msgspec.Meta) -> str:
    parts: list[str] = []
    for attr, label in (
        ("ge", ">="),
        ("gt", ">"),
        ("le", "<="),
        ("lt", "<"),
        ("min_length", "min length"),
        ("max_length", "max length"),
    ):
        value = getattr(meta, attr)
        if value is not None:
            parts.append(f"{label} {value}")
    if meta.pattern is not None:
        parts.append(f"matching /{meta.pattern}/")
    return f" ({', '.join(parts)})" if parts else ""


def describe_value(value: object) -> str:
    """What a raw (TOML-shaped) value is, for error messages: ``string 'x'``."""
    kinds: tuple[tuple[type | tuple[type, ...], str], ...] = (
        (bool, "boolean"),
        (int, "integer"),
        (float, "number"),
        (str, "string"),
        ((list, tuple), "array"),
        (dict, "table"),
    )
    for kind, label in kinds:
        if isinstance(value, kind):
            if isinstance(value, dict | list | tuple):
                return label
            return f"{label} {value!r}"
    return f"{type(value).__name__} {value!r}"


# --------------------------------------------------------------------------- validation

SourceFor = Callable[[KeyPath], str]


def split_msgspec_error(exc: msgspec.ValidationError) -> tuple[str, str]:
    match = _MSGSPEC_AT.match(str(exc))
    assert match is not None  # the pattern matches any text
    return match.group("reason"), match.group("at") or ""


def _suffix_key(path: KeyPath, at: str) -> str:
    """Join a key path with a msgspec location suffix such as ``[0].name``."""
    base = format_key(path)
    if not at:
        return base
    if not base:
        return at.lstrip(".")
    return base + at


_AT_TOKEN = re.compile(r"\.(?P<key>[^.\[]+)|\[(?P<index>\d+|\.\.\.)\]")


def _inner(value: object, tp: Any, at: str) -> tuple[object, Any]:
    """Follow a msgspec location suffix (``[0].name``) into ``value`` and its type.

    Returns ``(value, type)``; either becomes ``None``/``Any`` where it cannot be followed.
    """
    inner_value: object = value
    inner_type: Any = tp
    for match in _AT_TOKEN.finditer(at):
        shape = shape_of(inner_type) if inner_type is not Any else Shape("leaf")
        key, index = match.group("key"), match.group("index")
        if key is not None:
            if shape.kind == "struct" and shape.struct is not None:
                field = _fields(shape.struct).get(key)
                inner_type = field.type if field is not None else Any
            elif shape.kind == "dict":
                inner_type = shape.value_type
            else:
                inner_type = Any
            inner_value = inner_value.get(key) if isinstance(inner_value, dict) else None
        else:
            inner_type = shape.value_type if shape.kind in ("list", "dict") else Any
            if index is not None and index.isdigit() and isinstance(inner_value, list):
                position = int(index)
                inner_value = inner_value[position] if position < len(inner_value) else None
            else:
                inner_value = None
    return inner_value, inner_type


def leaf_error(
    exc: msgspec.ValidationError,
    *,
    value: object,
    tp: Any,
    path: KeyPath,
    source: str,
    layer: str | None,
) -> ConfigError:
    """Turn a msgspec error for ``value`` at ``path`` into a ConfigError naming everything."""
    reason, at = split_msgspec_error(exc)
    key = _suffix_key(path, at)
    inner_value, inner_type = _inner(value, tp, at)
    if inner_type is Any:
        expected_match = _MSGSPEC_EXPECTED_ONLY.match(reason)
        expected = expected_match.group(1).replace("`", "") if expected_match else reason
    else:
        expected = describe_type(inner_type)
    if reason.startswith("Expected"):
        message = f"{source}: '{key}' must be {expected}, got {describe_value(inner_value)}"
    else:
        message = f"{source}: invalid value for '{key}': {reason}; expected {expected}"
    return ConfigError(message, source=source, key=key, expected=expected, layer=layer)


def validate_layer(
    raw: Mapping[str, Any],
    schema: type[msgspec.Struct],
    source_for: SourceFor,
    *,
    layer: str | None = None,
) -> None:
    """Check one layer (partial configuration) against ``schema``.

    Raises :class:`ConfigError` naming the source, the dotted key and the expected type for
    the first unknown key or invalid value. Required fields of tables are not demanded here
    (a later layer may supply them); arrays of tables are checked entry by entry.
    """
    _validate_table(raw, schema, (), source_for, layer)
    try:
        # Catches what the key-by-key walk cannot: cross-field checks in __post_init__.
        msgspec.convert(raw, schema)
    except msgspec.ValidationError as exc:
        reason, at = split_msgspec_error(exc)
        if reason.startswith("Object missing required field"):
            return  # partial tables are fine in a single layer
        path = _path_from_at(at)
        source = source_for(path)
        key = format_key(path) or "<top level>"
        raise ConfigError(
            f"{source}: invalid value for '{key}': {reason}",
            source=source,
            key=key,
            expected=describe_type(type_at(schema, path) or Any),
            layer=layer,
        ) from None


def _path_from_at(at: str) -> KeyPath:
    """``.path-policy.direct-tags[0]`` → ``("path-policy", "direct-tags")`` (the table part)."""
    head = at.split("[", 1)[0]
    return tuple(s for s in head.split(".") if s)


def _validate_table(
    raw: Mapping[str, Any],
    struct: type[msgspec.Struct],
    path: KeyPath,
    source_for: SourceFor,
    layer: str | None,
) -> None:
    fields = _fields(struct)
    for key, value in raw.items():
        sub = (*path, key)
        field = fields.get(key)
        if field is None:
            source = source_for(sub)
            where = f"[{format_key(path)}]" if path else "the top level"
            known = ", ".join(fields)
            raise ConfigError(
                f"{source}: unknown key '{format_key(sub)}' (keys allowed in {where}: {known})",
                source=source,
                key=format_key(sub),
                expected=f"one of {known}",
                layer=layer,
            )
        _validate_value(value, field.type, sub, source_for, layer)


def _validate_value(
    value: object, tp: Any, path: KeyPath, source_for: SourceFor, layer: str | None
) -> None:
    shape = shape_of(tp)
    if shape.kind == "struct" and isinstance(value, dict):
        assert shape.struct is not None
        _validate_table(value, shape.struct, path, source_for, layer)
        return
    if shape.kind == "dict" and isinstance(value, dict):
        for key, item in value.items():
            sub = (*path, key)
            try:
                msgspec.convert(key, shape.key_type)
            except msgspec.ValidationError:
                source = source_for(sub)
                raise ConfigError(
                    f"{source}: '{format_key(sub)}': invalid name {key!r} in "
                    f"[{format_key(path)}]; expected {describe_type(shape.key_type)}",
                    source=source,
                    key=format_key(sub),
                    expected=describe_type(shape.key_type),
                    layer=layer,
                ) from None
            _validate_value(item, shape.value_type, sub, source_for, layer)
        return
    try:
        msgspec.convert(value, tp)
    except msgspec.ValidationError as exc:
        raise leaf_error(
            exc, value=value, tp=tp, path=path, source=source_for(path), layer=layer
        ) from None


# --------------------------------------------------------------------------- environment


class EnvLeaf(msgspec.Struct, frozen=True):
    """A schema key settable from the environment."""

    path: KeyPath
    annotation: Any


def env_var_name(path: KeyPath, prefix: str = "AH_") -> str:
    """``("ssh", "identity-file")`` → ``AH_SSH_IDENTITY_FILE``."""
    return prefix + "_".join(path).upper().replace("-", "_").replace(".", "_")


def env_leaves(schema: type[msgspec.Struct], prefix: str = "AH_") -> dict[str, EnvLeaf]:
    """Every leaf key reachable through nested tables, by its ``AH_*`` variable name.

    Keys under tables of any name (``hosts.<name>``) and the ``enforced`` list are not
    mappable. Two keys that normalise to the same variable name are a schema bug.
    """
    result: dict[str, EnvLeaf] = {}

    def walk(struct: type[msgspec.Struct], path: KeyPath) -> None:
        for name, field in _fields(struct).items():
            sub = (*path, name)
            if sub == (ENFORCED_KEY,):
                continue
            shape = shape_of(field.type)
            if shape.kind == "struct":
                assert shape.struct is not None
                walk(shape.struct, sub)
                continue
            if shape.kind == "dict":
                continue
            if shape.kind == "list" and shape_of(shape.value_type).kind in ("struct", "dict"):
                continue
            var = env_var_name(sub, prefix)
            if var in result:
                raise ValueError(
                    f"schema keys {format_key(result[var].path)!r} and {format_key(sub)!r} "
                    f"both map to {var}"
                )
            result[var] = EnvLeaf(sub, field.type)

    walk(schema, ())
    return result


def _candidates(text: str) -> list[object]:
    """Readings of an environment string, most specific first."""
    stripped = text.strip()
    readings: list[object] = []
    for number_type in (int, float):
        try:
            readings.append(number_type(stripped))
        except ValueError:
            continue
    word = _BOOL_WORDS.get(stripped.lower())
    if word is not None:
        readings.append(word)
    readings.append(text)
    return readings


def _convert_scalar(text: str, tp: Any) -> object:
    for candidate in _candidates(text):
        try:
            msgspec.convert(candidate, tp)
        except msgspec.ValidationError:
            continue
        return candidate
    raise ValueError(describe_type(tp))


def convert_env_text(text: str, annotation: Any) -> object:
    """Read an environment string as a raw (TOML-shaped) value of ``annotation``.

    Booleans accept 1/0/true/false/yes/no/on/off, numbers their usual spelling, arrays
    are comma-separated (blank items dropped). Raises ``ValueError`` carrying the
    description of what was expected.
    """
    shape = shape_of(annotation)
    if shape.kind == "list":
        items = [item.strip() for item in text.split(",") if item.strip()]
        try:
            value: object = [_convert_scalar(item, shape.value_type) for item in items]
            msgspec.convert(value, annotation)
        except (ValueError, msgspec.ValidationError):
            raise ValueError(
                f"{describe_type(annotation)}, written as comma-separated items"
            ) from None
        return value
    return _convert_scalar(text, annotation)


# --------------------------------------------------------------------------- defaults


def struct_to_raw(value: msgspec.Struct) -> dict[str, Any]:
    """A Struct as TOML-shaped builtins with kebab keys, leaving out ``None`` fields.

    Walks fields explicitly: ``msgspec.to_builtins`` would drop values equal to the field
    default on ``omit_defaults`` Structs.
    """
    raw: dict[str, Any] = {}
    for field in msgspec.structs.fields(type(value)):
        item = getattr(value, field.name)
        if item is None:
            continue
        raw[field.encode_name] = _to_raw(item)
    return raw


def _to_raw(item: object) -> Any:
    if isinstance(item, msgspec.Struct):
        return struct_to_raw(item)
    if isinstance(item, dict):
        return {str(k): _to_raw(v) for k, v in item.items() if v is not None}
    if isinstance(item, list | tuple | set | frozenset):
        return [_to_raw(v) for v in item]
    return msgspec.to_builtins(item)
