"""The RUST_LOG-style directive parser and its lookup (pure code: examples + properties)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ah_logging import LEVELS, DirectiveError, Directives, parse_directives, parse_level

INFO, DEBUG, TRACE, WARN, ERROR = (LEVELS[n] for n in ("info", "debug", "trace", "warn", "error"))


@pytest.mark.parametrize(
    ("text", "module", "expected"),
    [
        ("debug", "anything.at.all", DEBUG),
        ("DEBUG", None, DEBUG),
        ("  Warning ", "x", WARN),
        ("ah_connectivity=debug,info", "ah_connectivity", DEBUG),
        ("ah_connectivity=debug,info", "ah_connectivity.quic.client", DEBUG),
        ("ah_connectivity=debug,info", "ah_connectivity_extra", INFO),
        ("ah_connectivity=debug,info", "paramiko", INFO),
        ("ah_connectivity::quic=trace,warn", "ah_connectivity.quic", TRACE),
        ("ah_connectivity::quic=trace,warn", "ah_connectivity.quicker", WARN),
        ("ah_connectivity::quic=trace,warn", "ah_connectivity", WARN),
        ("ah_connectivity=error,ah_connectivity.quic=trace", "ah_connectivity.quic.x", TRACE),
        ("ah_connectivity=error,ah_connectivity.quic=trace", "ah_connectivity.http", ERROR),
        ("a=debug, a = error", "a", ERROR),
        ("info,debug", "a", DEBUG),
        ("debug,", "a", DEBUG),
        ("paramiko=off", "paramiko.transport", LEVELS["off"]),
        ("x-y::z_1=trace", "x-y.z_1", TRACE),
    ],
)
def test_level_for_examples(text: str, module: str | None, expected: int) -> None:
    assert parse_directives(text).level_for(module) == expected


def test_without_a_bare_level_the_default_is_info() -> None:
    directives = parse_directives("ah_connectivity=trace")
    assert directives.default is None
    assert directives.level_for("other") == INFO
    assert directives.min_level == TRACE


@pytest.mark.parametrize(
    ("text", "bad_part", "fragment"),
    [
        ("verbose", "verbose", "not a level"),
        ("ah=loud,info", "ah=loud", "unknown log level 'loud'"),
        ("=debug", "=debug", "missing module"),
        ("a=b=debug", "a=b=debug", "more than one '='"),
        ("a..b=debug", "a..b=debug", "empty segment"),
        ("a:b=debug", "a:b=debug", "'a:b'"),
        ("::a=debug", "::a=debug", "empty segment"),
        ("a/foo=debug", "a/foo=debug", "'a/foo'"),
        ("info,ah_x", "ah_x", "nor a module=level pair"),
        ("", "", "no directive"),
        (" , ", " , ", "no directive"),
    ],
)
def test_errors_name_the_bad_part(text: str, bad_part: str, fragment: str) -> None:
    with pytest.raises(DirectiveError) as caught:
        parse_directives(text, source="RUST_LOG")
    assert caught.value.part == bad_part
    message = str(caught.value)
    assert message.startswith("RUST_LOG: ")
    assert repr(bad_part) in message
    assert fragment in message
    assert isinstance(caught.value, ValueError)


def test_parse_level_rejects_unknown_names() -> None:
    assert parse_level("Critical") == LEVELS["critical"]
    with pytest.raises(ValueError, match="'loud'"):
        parse_level("loud")


def test_overlay_keeps_underlying_modules_and_default_when_absent() -> None:
    base = parse_directives("aioquic=info,paramiko=error,warning")
    over = parse_directives("paramiko=debug")
    merged = base.overlay(over)
    assert merged.level_for("paramiko.transport") == DEBUG
    assert merged.level_for("aioquic") == INFO
    assert merged.level_for("ah_x") == WARN
    assert base.overlay(parse_directives("trace")).level_for("ah_x") == TRACE


def test_quiet_modules_respect_covering_directives() -> None:
    directives = parse_directives("uvicorn=debug,paramiko.transport=info,debug")
    quiet = directives.with_quiet_modules(["uvicorn.access", "paramiko", "httpx"], WARN)
    assert quiet.level_for("uvicorn.access") == DEBUG  # covered by the parent directive
    assert quiet.level_for("paramiko.transport") == INFO  # more specific than the floor
    assert quiet.level_for("paramiko.client") == WARN
    assert quiet.level_for("httpx") == WARN
    assert quiet.level_for("ah_x") == DEBUG
    # The floor never makes a quiet library chattier than the default.
    assert parse_directives("error").with_quiet_modules(["httpx"], WARN).level_for("httpx") == ERROR


# -- properties ------------------------------------------------------------------------

SEGMENTS = ["ah", "ah_connectivity", "quic", "client", "paramiko", "x-y", "Q1"]
LEVEL_NAMES = [name for name in LEVELS if name != "off"]


@dataclass(frozen=True)
class Item:
    module: tuple[str, ...] | None  # None: a bare level
    level: str


def _random_case(draw: st.DrawFn, word: str) -> str:
    flips = draw(st.lists(st.booleans(), min_size=len(word), max_size=len(word)))
    return "".join(c.upper() if flip else c for c, flip in zip(word, flips, strict=True))


@st.composite
def directive_lists(draw: st.DrawFn) -> tuple[str, list[Item]]:
    items = draw(
        st.lists(
            st.builds(
                Item,
                st.none() | st.lists(st.sampled_from(SEGMENTS), min_size=1, max_size=3).map(tuple),
                st.sampled_from(LEVEL_NAMES),
            ),
            min_size=1,
            max_size=6,
        )
    )
    rendered = []
    for item in items:
        level = _random_case(draw, item.level)
        pad = draw(st.sampled_from(["", " ", "  "]))
        if item.module is None:
            rendered.append(f"{pad}{level}{pad}")
        else:
            separator = draw(st.sampled_from(["::", "."]))
            rendered.append(f"{pad}{separator.join(item.module)}{pad}={pad}{level}")
    return ",".join(rendered), items


def _reference_level(items: list[Item], name: str) -> int:
    """The spec, written the slow way: longest segment-prefix wins, later items win ties."""
    parts = tuple(name.split("."))
    best: tuple[int, int] | None = None  # (prefix length, level)
    default = INFO
    for item in items:
        if item.module is None:
            default = LEVELS[item.level]
        elif parts[: len(item.module)] == item.module and (
            best is None or len(item.module) >= best[0]
        ):
            best = (len(item.module), LEVELS[item.level])
    return default if best is None else best[1]


@given(directive_lists(), st.lists(st.sampled_from(SEGMENTS), min_size=1, max_size=4))
def test_level_for_matches_reference(case: tuple[str, list[Item]], name_parts: list[str]) -> None:
    text, items = case
    name = ".".join(name_parts)
    assert parse_directives(text).level_for(name) == _reference_level(items, name)


@given(directive_lists())
def test_rendering_round_trips(case: tuple[str, list[Item]]) -> None:
    directives = parse_directives(case[0])
    assert parse_directives(str(directives)) == directives
    assert isinstance(directives, Directives)


@given(
    directive_lists(),
    st.text(alphabet="abcxyz!?/ ", min_size=1, max_size=8).filter(
        lambda word: word.strip() and word.strip().lower() not in LEVELS
    ),
    st.integers(min_value=0, max_value=6),
)
def test_any_bad_item_is_reported(case: tuple[str, list[Item]], bad: str, position: int) -> None:
    parts = case[0].split(",")
    parts.insert(min(position, len(parts)), bad)
    with pytest.raises(DirectiveError) as caught:
        parse_directives(",".join(parts))
    assert caught.value.part == bad.strip()
