"""Durations: the accepted forms, the error messages, and agreement with the schema pattern."""

from __future__ import annotations

import math
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ah_domain_types import (
    DURATION_PATTERN,
    DurationError,
    ExitCode,
    format_duration,
    parse_duration,
)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("500ms", 0.5),
        ("5s", 5.0),
        ("1m30s", 90.0),
        ("2h", 7200.0),
        ("1.5s", 1.5),
        ("1h2m3s4ms", 3723.004),
        ("90", 90.0),
        ("0.25", 0.25),
        (" 5s ", 5.0),
        (7, 7.0),
        (2.5, 2.5),
        (0, 0.0),
    ],
)
def test_parse_accepts(text: str | float, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "text",
    ["", "5x", "s", "1.s", ".5s", "5 s", "1s1m", "5s5s", "-1", "-1s", "1d", True, -3, math.inf],
)
def test_parse_rejects_naming_value_and_forms(text: str | float) -> None:
    with pytest.raises(DurationError) as info:
        parse_duration(text)
    message = str(info.value)
    assert f"invalid duration {text!r}" in message
    assert "expected a number of seconds" in message and "1m30s" in message
    assert info.value.exit_code == ExitCode.VALIDATION


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (0.5, "500ms"),
        (1.5, "1.5s"),
        (1.25, "1.25s"),
        (90, "1m30s"),
        (7200, "2h"),
        (3723.004, "1h2m3.004s"),
        (60.5, "1m500ms"),
    ],
)
def test_format(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


def test_format_rejects_negative() -> None:
    with pytest.raises(DurationError):
        format_duration(-1)


@settings(max_examples=50, deadline=None)
@given(st.integers(min_value=0, max_value=10**9))
def test_format_parse_roundtrip_ms(millis: int) -> None:
    assert round(parse_duration(format_duration(millis / 1000)) * 1000) == millis


@settings(max_examples=100, deadline=None)
@given(st.text(alphabet="0123456789.hms", max_size=8))
def test_schema_pattern_agrees_with_parser(text: str) -> None:
    """The config schema's DURATION_PATTERN accepts exactly what parse_duration accepts."""
    try:
        parse_duration(text)
        parsed = True
    except DurationError:
        parsed = False
    assert parsed == (re.fullmatch(DURATION_PATTERN, text) is not None), text
