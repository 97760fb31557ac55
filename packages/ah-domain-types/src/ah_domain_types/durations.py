"""Durations as written by humans (``500ms``, ``1m30s``, ``2h``) and as seconds."""

from __future__ import annotations

import math

from .errors import DurationError

__all__ = ["ACCEPTED_DURATION_FORMS", "format_duration", "parse_duration"]

ACCEPTED_DURATION_FORMS = (
    "a number of seconds (90, 1.5) or numbers with units h, m, s, ms in that order "
    "(2h, 1m30s, 1.5s, 500ms)"
)

# Unit -> seconds, in the only order they may appear.
_UNITS: tuple[tuple[str, float], ...] = (("h", 3600.0), ("m", 60.0), ("s", 1.0), ("ms", 0.001))
_DIGITS = "0123456789"


def _bad(value: object, why: str) -> DurationError:
    return DurationError(
        f"invalid duration {value!r}: {why}; expected {ACCEPTED_DURATION_FORMS}",
        details={"value": str(value)},
    )


def _read_number(text: str, pos: int, original: object) -> tuple[float, int]:
    """Read ``[0-9]+(\\.[0-9]+)?`` at ``pos``; return the value and the next position."""
    start = pos
    while pos < len(text) and text[pos] in _DIGITS:
        pos += 1
    if pos == start:
        raise _bad(original, f"expected a number at position {start}")
    if pos < len(text) and text[pos] == ".":
        pos += 1
        frac_start = pos
        while pos < len(text) and text[pos] in _DIGITS:
            pos += 1
        if pos == frac_start:
            raise _bad(original, "a decimal point must be followed by digits")
    return float(text[start:pos]), pos


def _read_unit(text: str, pos: int) -> tuple[str, int]:
    if text.startswith("ms", pos):
        return "ms", pos + 2
    if pos < len(text) and text[pos] in "hms":
        return text[pos], pos + 1
    return "", pos


def parse_duration(text: str | int | float) -> float:
    """Return the duration ``text`` in seconds.

    Numbers (and strings holding a plain number) are seconds. Otherwise each of the
    units ``h``, ``m``, ``s``, ``ms`` may appear at most once, largest first.
    Negative, non-finite and malformed values raise :class:`DurationError`.
    """
    if isinstance(text, bool):
        raise _bad(text, "a boolean is not a duration")
    if isinstance(text, int | float):
        seconds = float(text)
        if not math.isfinite(seconds) or seconds < 0:
            raise _bad(text, "must be a finite, non-negative number")
        return seconds
    if not isinstance(text, str):
        raise _bad(text, f"unsupported type {type(text).__name__}")
    body = text.strip()
    if not body:
        raise _bad(text, "empty")
    if body.startswith("-"):
        raise _bad(text, "must not be negative")
    number, pos = _read_number(body, 0, text)
    if pos == len(body):
        return number
    total = 0.0
    next_unit = 0  # index into _UNITS of the smallest unit still allowed
    while True:
        unit, pos = _read_unit(body, pos)
        if not unit:
            raise _bad(text, f"unknown unit at {body[pos:]!r}")
        index = next(i for i, (name, _) in enumerate(_UNITS) if name == unit)
        if index < next_unit:
            raise _bad(text, f"unit {unit!r} repeated or out of order")
        total += number * _UNITS[index][1]
        next_unit = index + 1
        if pos == len(body):
            return total
        number, pos = _read_number(body, pos, text)


def format_duration(seconds: float) -> str:
    """Render ``seconds`` (rounded to the millisecond) so that :func:`parse_duration`
    reads it back: ``90`` → ``"1m30s"``, ``0.5`` → ``"500ms"``, ``1.25`` → ``"1.25s"``."""
    if isinstance(seconds, bool) or not math.isfinite(seconds) or seconds < 0:
        raise _bad(seconds, "must be a finite, non-negative number")
    total_ms = round(seconds * 1000)
    hours, rest = divmod(total_ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    secs, millis = divmod(rest, 1000)
    parts: list[str] = []
    if hours:
        parts.append(f"{hours}h")
    if minutes:
        parts.append(f"{minutes}m")
    if secs and millis:
        parts.append(f"{secs}.{millis:03d}".rstrip("0") + "s")
    elif secs:
        parts.append(f"{secs}s")
    elif millis:
        parts.append(f"{millis}ms")
    return "".join(parts) or "0s"
