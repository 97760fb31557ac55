"""Dotted keys: formatting and parsing."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ah_config import format_key, parse_key


@given(st.lists(st.text(min_size=1), min_size=1, max_size=5))
def test_format_then_parse_round_trips(segments: list[str]) -> None:
    path = tuple(segments)
    assert parse_key(format_key(path)) == path


def test_bare_and_quoted_segments() -> None:
    assert format_key(("ssh", "identity-file")) == "ssh.identity-file"
    assert format_key(("hosts", "mac.local", "workspace")) == 'hosts."mac.local".workspace'
    assert parse_key('hosts."a b".user') == ("hosts", "a b", "user")


@pytest.mark.parametrize("text", ["", ".", "a.", ".a", "a..b", "a b", 'a."', 'a.""', "a.b!"])
def test_malformed_keys(text: str) -> None:
    with pytest.raises(ValueError, match="invalid configuration key"):
        parse_key(text)
