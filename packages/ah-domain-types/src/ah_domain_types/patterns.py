"""Regular expressions and constrained string types shared by several modules.

The patterns are written in the common subset of Python ``re`` and ECMA-262 so that
the generated JSON Schema means the same thing in every validator. Python-side checks
use :func:`re.fullmatch`, which (unlike ``re.search`` with ``$``) does not let a
trailing newline through.
"""

from __future__ import annotations

import re
from typing import Annotated

import msgspec

__all__ = [
    "DURATION_PATTERN",
    "FILESET_NAME_PATTERN",
    "HOST_KEY_FINGERPRINT_PATTERN",
    "HOST_NAME_PATTERN",
    "HOST_PORT_PATTERN",
    "TAG_KEY_PATTERN",
    "TAG_SELECTOR_PATTERN",
    "TAG_VALUE_PATTERN",
    "DurationText",
    "FilesetName",
    "HostKeyFingerprint",
    "HostName",
    "HostPort",
    "TagKey",
    "TagSelectorText",
    "TagValue",
    "fullmatch",
]

HOST_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$"
"""Follower names: a letter or digit, then up to 62 letters, digits, ``_``, ``.``, ``-``."""

TAG_KEY_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
"""Tag keys: a letter or digit, then letters, digits, ``_``, ``.``, ``-``."""

TAG_VALUE_PATTERN = r"^[^\s,]+$"
"""Tag values: non-empty, no whitespace, no commas."""

TAG_SELECTOR_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*=[^\s,]+$"
"""A ``KEY=VALUE`` tag selector as written on the command line or in config."""

FILESET_NAME_PATTERN = r"^[A-Za-z0-9_-]+$"
"""Fileset names: letters, digits, ``_`` and ``-``."""

_NUMBER = r"[0-9]+(?:\.[0-9]+)?"
DURATION_PATTERN = (
    rf"^(?=[0-9])(?:{_NUMBER}h)?(?:{_NUMBER}m)?(?:{_NUMBER}s)?(?:{_NUMBER}ms)?$"
    rf"|^{_NUMBER}$"
)
"""A duration: units h, m, s, ms in that order, each at most once (``1m30s``,
``500ms``, ``1.5s``), or a plain number of seconds (``90``)."""

HOST_KEY_FINGERPRINT_PATTERN = r"^SHA256:[A-Za-z0-9+/]+={0,2}$"
"""An OpenSSH SHA256 host-key fingerprint, e.g. ``SHA256:uNiVztksCsDhcc0u9e8BujQXVUpKZIDTMczCvj3tD2s``."""

HOST_PORT_PATTERN = r"^(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):[0-9]{1,5}$"
"""``host:port`` with an optional bracketed IPv6 literal (``[::1]:22``)."""

HostName = Annotated[str, msgspec.Meta(pattern=HOST_NAME_PATTERN, max_length=63)]
TagKey = Annotated[str, msgspec.Meta(pattern=TAG_KEY_PATTERN)]
TagValue = Annotated[str, msgspec.Meta(pattern=TAG_VALUE_PATTERN)]
TagSelectorText = Annotated[str, msgspec.Meta(pattern=TAG_SELECTOR_PATTERN)]
FilesetName = Annotated[str, msgspec.Meta(pattern=FILESET_NAME_PATTERN)]
DurationText = Annotated[str, msgspec.Meta(pattern=DURATION_PATTERN)]
HostKeyFingerprint = Annotated[str, msgspec.Meta(pattern=HOST_KEY_FINGERPRINT_PATTERN)]
HostPort = Annotated[str, msgspec.Meta(pattern=HOST_PORT_PATTERN)]


def fullmatch(pattern: str, value: object) -> bool:
    """True when ``value`` is a string matched entirely by ``pattern``."""
    return isinstance(value, str) and re.fullmatch(pattern, value) is not None
