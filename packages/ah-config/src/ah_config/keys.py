"""Dotted configuration keys (``ssh.identity-file``, ``hosts."mac.local".workspace``).

A key is a tuple of segments internally. Segments made of ``A-Z a-z 0-9 _ -`` are written
bare; any other segment (a host name with a dot, say) is written as a TOML basic string,
exactly as TOML itself would spell the key.
"""

from __future__ import annotations

import json
import re

__all__ = ["KeyPath", "format_key", "is_prefix", "parse_key"]

KeyPath = tuple[str, ...]
"""A configuration key as its segments: ``("ssh", "identity-file")``."""

_BARE_SEGMENT = re.compile(r"[A-Za-z0-9_-]+")


def format_key(path: KeyPath) -> str:
    """``("hosts", "a.b", "workspace")`` → ``hosts."a.b".workspace``."""
    return ".".join(
        segment if _BARE_SEGMENT.fullmatch(segment) else json.dumps(segment, ensure_ascii=False)
        for segment in path
    )


def parse_key(text: str) -> KeyPath:
    """The inverse of :func:`format_key`; raises ``ValueError`` naming the fault."""
    segments: list[str] = []
    pos = 0
    while True:
        if pos < len(text) and text[pos] == '"':
            decoder = json.JSONDecoder()
            try:
                segment, end = decoder.raw_decode(text, pos)
            except json.JSONDecodeError as exc:
                raise ValueError(
                    f"invalid configuration key {text!r}: bad quoted segment at {pos}"
                ) from exc
            if not isinstance(segment, str) or not segment:
                raise ValueError(f"invalid configuration key {text!r}: empty quoted segment")
            segments.append(segment)
            pos = end
        else:
            match = _BARE_SEGMENT.match(text, pos)
            if match is None:
                raise ValueError(
                    f"invalid configuration key {text!r}: expected a segment of letters, "
                    f"digits, '-' or '_' (or a quoted segment) at position {pos}"
                )
            segments.append(match.group())
            pos = match.end()
        if pos == len(text):
            return tuple(segments)
        if text[pos] != ".":
            raise ValueError(f"invalid configuration key {text!r}: expected '.' at position {pos}")
        pos += 1


def is_prefix(prefix: KeyPath, path: KeyPath) -> bool:
    """Whether ``prefix`` is ``path`` or one of its enclosing tables."""
    return path[: len(prefix)] == prefix
