"""Redaction of tokens, passwords and key material before anything is logged.

Two layers:

* structured values — :func:`redact` deep-copies mappings and sequences and replaces the
  value of every *sensitive key* (see :func:`is_sensitive_key`) with ``"***"``;
* free text — :func:`redact_text` masks inline secrets: ``Bearer``/``Basic`` credentials,
  JWT-looking ``header.payload.signature`` triples, PEM private-key blocks and
  ``name=value`` / ``name: value`` / ``--name value`` pairs whose name is sensitive
  (query strings, reprs, JSON and command lines).

An unquoted inline value ends at whitespace or one of ``&,;)]}"'``; quote a value with
spaces if it must be masked as a whole.  Structured fields (``logger.bind(password=...)``)
are always masked whole.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

__all__ = ["MASK", "is_sensitive_key", "redact", "redact_text"]

MASK = "***"

# Substrings that make a key name sensitive wherever they appear (case-insensitive).
_SENSITIVE_WORDS = (
    "token",
    "password",
    "passwd",
    "passphrase",
    "secret",
    "authorization",
    "private_key",
    "private-key",
    "privatekey",
    "api_key",
    "api-key",
    "apikey",
    "jwt",
    "credential",
    "cookie",
)
# ``*_key``, ``*-key`` and camelCase ``*Key`` hold key material too, unless public.
_KEY_SUFFIX = re.compile(r"(?:[_-][Kk][Ee][Yy]|[a-z0-9]Key|^[Kk]ey[_-]?[Mm]aterial)$")
_PUBLIC_MARKERS = ("public", "pubkey", "fingerprint")


def is_sensitive_key(name: object) -> bool:
    """Whether a field with this name holds a secret (its value is then masked)."""
    text = str(name)
    lowered = text.lower()
    if any(word in lowered for word in _SENSITIVE_WORDS):
        return True
    if any(marker in lowered for marker in _PUBLIC_MARKERS):
        return False
    return bool(_KEY_SUFFIX.search(text))


_PEM_PRIVATE_KEY = re.compile(
    r"(-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----)(.*?)(-----END [A-Z0-9 ]*PRIVATE KEY-----|\Z)",
    re.DOTALL,
)
# "basic" is an English word, so only "Basic <base64>" counts as credentials.
_AUTH_SCHEME = re.compile(
    r"""\b((?i:bearer))(\s+)([^\s"',;&)\]}]+)|\b(Basic)(\s+)([A-Za-z0-9+/]{8,}={0,2})(?![^\s"',;&)\]}])"""
)
_B64URL = r"[A-Za-z0-9_-]"
# A JWT header is base64url JSON, so it starts with "eyJ" ('{"'); other triples count only
# when every part is long enough that it cannot be a host or module name.
_JWT = re.compile(
    rf"(?<![A-Za-z0-9_.-])(?:eyJ{_B64URL}*\.{_B64URL}+\.{_B64URL}*"
    rf"|{_B64URL}{{16,}}\.{_B64URL}{{16,}}\.{_B64URL}{{16,}})(?![A-Za-z0-9_-])"
)
# "name=value", "name: value", '"name": "value"' and "--name value"; whether the name is
# sensitive is decided in Python (is_sensitive_key), and the value is scanned by hand so
# that a non-sensitive pair never swallows a sensitive one that follows it.
_PAIR = re.compile(
    r"""(?<![A-Za-z0-9_.])(?P<name>[A-Za-z_][\w.-]*)["']?\s*[=:]\s*"""
    r"""|(?<![^\s"'=(\[,])--(?P<flag>[A-Za-z][\w.-]*)\s+"""
)
_URL_PASSWORD = re.compile(r"(?<=://)([^/\s:@]+):([^/\s@]+)@")
_BARE_STOP = frozenset(" \t\r\n\f\v\"',;&)]}")
_NOT_A_BARE_START = _BARE_STOP | frozenset("{[(")
_SCHEMES = frozenset({"bearer", "basic"})


def _mask_pem(match: re.Match[str]) -> str:
    return f"{match.group(1)}{MASK}{match.group(3)}"


def _mask_scheme(match: re.Match[str]) -> str:
    if match.group(1) is not None:
        return f"{match.group(1)}{match.group(2)}{MASK}"
    return f"{match.group(4)}{match.group(5)}{MASK}"


def _value_span(text: str, start: int) -> tuple[int, int, int] | None:
    """(secret start, secret end, resume scanning at) for the value at ``start``."""
    if start >= len(text):
        return None
    first = text[start]
    if first in "\"'":
        index = start + 1
        while index < len(text):
            char = text[index]
            if char == "\\":
                index += 2
                continue
            if char == first:
                return start + 1, index, index + 1
            index += 1
        return start + 1, len(text), len(text)  # unterminated: mask to the end
    if first in _NOT_A_BARE_START or first.isspace():
        return None  # a nested structure: its own keys are looked at separately
    end = start
    while end < len(text) and text[end] not in _BARE_STOP and not text[end].isspace():
        end += 1
    value = text[start:end]
    if value.lower() in _SCHEMES or value == MASK:
        return None  # "Authorization: Bearer x": the scheme rule masks x
    return start, end, end


def _mask_pairs(text: str) -> str:
    pieces: list[str] = []
    copied_up_to = 0
    search_from = 0
    while True:
        match = _PAIR.search(text, search_from)
        if match is None:
            break
        name = match.group("name") or match.group("flag")
        span = _value_span(text, match.end()) if is_sensitive_key(name) else None
        if span is None:
            search_from = match.end("name") if match.group("name") else match.end("flag")
            continue
        secret_start, secret_end, resume = span
        pieces.append(text[copied_up_to:secret_start])
        pieces.append(MASK)
        copied_up_to = secret_end
        search_from = resume
    pieces.append(text[copied_up_to:])
    return "".join(pieces)


def redact_text(text: str) -> str:
    """``text`` with inline secrets replaced by ``***``."""
    if not text:
        return text
    if "PRIVATE KEY" in text:
        text = _PEM_PRIVATE_KEY.sub(_mask_pem, text)
    text = _AUTH_SCHEME.sub(_mask_scheme, text)
    text = _JWT.sub(MASK, text)
    if "://" in text:
        text = _URL_PASSWORD.sub(rf"\1:{MASK}@", text)
    return _mask_pairs(text)


def redact(value: Any) -> Any:
    """A deep copy of ``value`` with secrets masked.

    Mappings (returned as ``dict``), lists, tuples, sets and dataclass instances are
    copied; values under sensitive keys become ``"***"`` (``None`` stays ``None``: there
    is nothing to hide); strings (and UTF-8 bytes) go through :func:`redact_text`.
    Other objects are returned as they are; sinks render them with ``str`` and then
    :func:`redact_text`.
    """
    return _redact(value, set())


def _redact(value: Any, active: set[int]) -> Any:
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, bytes | bytearray):
        try:
            decoded = bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            return value
        masked = redact_text(decoded)
        return value if masked == decoded else masked.encode("utf-8")
    if value is None or isinstance(value, bool | int | float):
        return value
    is_dataclass_instance = dataclasses.is_dataclass(value) and not isinstance(value, type)
    if not isinstance(value, Mapping | list | tuple | set | frozenset) and not (
        is_dataclass_instance
    ):
        return value
    marker = id(value)
    if marker in active:
        return "<cycle>"
    active.add(marker)
    try:
        if is_dataclass_instance:
            fields = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
            return _redact_mapping(fields, active)
        if isinstance(value, Mapping):
            return _redact_mapping(value, active)
        if isinstance(value, list):
            return [_redact(item, active) for item in value]
        if isinstance(value, tuple):
            if hasattr(value, "_fields"):  # namedtuple: keep the field names visible
                return _redact_mapping(dict(zip(value._fields, value, strict=True)), active)
            return tuple(_redact(item, active) for item in value)
        return type(value)(_redact(item, active) for item in value)
    finally:
        active.discard(marker)


def _redact_mapping(mapping: Mapping[Any, Any], active: set[int]) -> dict[Any, Any]:
    copied: dict[Any, Any] = {}
    for key, item in mapping.items():
        if item is not None and is_sensitive_key(key):
            copied[key] = MASK
        else:
            copied[key] = _redact(item, active)
    return copied
