"""Selector rules: --host/--tag precedence, --all conflicts, unknown hosts, empty selection."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ah_domain_types import (
    DomainValidationError,
    EmptySelectionError,
    ExitCode,
    FollowerInfo,
    OsKind,
    Resources,
    Selector,
    SelectorError,
    TagSelector,
)


def follower(
    name: str, os: OsKind = OsKind.LINUX, tags: dict[str, str] | None = None
) -> FollowerInfo:
    return FollowerInfo(
        name=name,
        os=os,
        arch="x86_64",
        tags=tags or {},
        resources=Resources(cpus=2, memory_mb=2048),
        host_key_fingerprint="SHA256:AAAAbbbbCCCCdddd",
        direct_address=None,
        workspace="/srv/ws",
        version="0.1.0",
    )


FLEET = [
    follower("lin-1", OsKind.LINUX, {"gpu": "yes"}),
    follower("mac-1", OsKind.MACOS),
    follower("lin-2", OsKind.LINUX),
    follower("win-1", OsKind.WINDOWS, {"gpu": "yes"}),
]


def names(followers: list[FollowerInfo]) -> list[str]:
    return [f.name for f in followers]


# ---- TagSelector.parse ---------------------------------------------------------------


def test_tag_parse_splits_at_first_equals() -> None:
    tag = TagSelector.parse("build=a=b")
    assert (tag.key, tag.value) == ("build", "a=b")
    assert str(tag) == "build=a=b"


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("os", "missing '='"),
        ("=linux", "empty key"),
        ("os=", "empty value"),
        ("-os=linux", "key '-os' must start with a letter or digit"),
        ("o s=linux", "key 'o s'"),
        ("os=lin ux", "value 'lin ux' must be non-empty without whitespace or commas"),
        ("os=a,b", "value 'a,b'"),
    ],
)
def test_tag_parse_rejects(text: str, reason: str) -> None:
    with pytest.raises(SelectorError) as info:
        TagSelector.parse(text)
    message = str(info.value)
    assert repr(text) in message
    assert reason in message
    assert "expected KEY=VALUE" in message
    assert info.value.exit_code == ExitCode.VALIDATION


def test_tag_selector_decode_validates() -> None:
    with pytest.raises(msgspec.ValidationError):
        msgspec.json.decode(b'{"key":"os","value":"a b"}', type=TagSelector)


# ---- Selector.from_cli ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("hosts", "tags"), [(["lin-1"], []), ([], ["os=linux"]), (["lin-1"], ["os=linux"])]
)
def test_all_conflicts_with_host_and_tag(hosts: list[str], tags: list[str]) -> None:
    with pytest.raises(SelectorError, match="--all cannot be combined with --host or --tag"):
        Selector.from_cli(hosts, tags, all_=True)


def test_from_cli_rejects_bad_host_name() -> None:
    with pytest.raises(SelectorError, match=r"--host: invalid host name 'bad host'"):
        Selector.from_cli(["bad host"], [], all_=False)


def test_from_cli_deduplicates_in_order() -> None:
    sel = Selector.from_cli(["b", "a", "b"], ["os=linux", "os=linux"], all_=False)
    assert sel.hosts == ("b", "a")
    assert sel.tags == (TagSelector("os", "linux"),)
    assert sel.describe() == "--host b --host a --tag os=linux"


# ---- Selector.resolve ------------------------------------------------------------------


@pytest.mark.parametrize("sel", [Selector(), Selector(all=True)])
def test_nothing_selected_or_all_means_every_follower(sel: Selector) -> None:
    assert sel.resolve(FLEET) == FLEET


def test_tags_filter_and_keep_fleet_order() -> None:
    sel = Selector.from_cli([], ["os=linux"], all_=False)
    assert names(sel.resolve(FLEET)) == ["lin-1", "lin-2"]


def test_tags_and_together() -> None:
    sel = Selector.from_cli([], ["gpu=yes", "os=linux"], all_=False)
    assert names(sel.resolve(FLEET)) == ["lin-1"]


def test_hosts_select_in_fleet_order() -> None:
    sel = Selector.from_cli(["win-1", "lin-1"], [], all_=False)
    assert names(sel.resolve(FLEET)) == ["lin-1", "win-1"]


def test_unknown_host_is_named_with_known_ones() -> None:
    sel = Selector.from_cli(["lin-1", "nope", "gone"], [], all_=False)
    with pytest.raises(SelectorError) as info:
        sel.resolve(FLEET)
    message = str(info.value)
    assert "unknown hosts 'nope', 'gone'" in message
    assert "known followers: lin-1, mac-1, lin-2, win-1" in message


def test_host_and_tag_mismatch_names_host_and_tag() -> None:
    sel = Selector.from_cli(["lin-1", "mac-1"], ["os=linux"], all_=False)
    with pytest.raises(SelectorError) as info:
        sel.resolve(FLEET)
    assert str(info.value) == "host 'mac-1' does not match tag os=linux (has os=macos)"


def test_host_missing_tag_key_says_so() -> None:
    sel = Selector.from_cli(["lin-2"], ["gpu=yes"], all_=False)
    with pytest.raises(
        SelectorError, match=r"host 'lin-2' does not match tag gpu=yes \(has no tag gpu\)"
    ):
        sel.resolve(FLEET)


def test_host_and_tag_both_match() -> None:
    sel = Selector.from_cli(["win-1", "lin-1"], ["gpu=yes"], all_=False)
    assert names(sel.resolve(FLEET)) == ["lin-1", "win-1"]


def test_unknown_host_reported_before_tag_mismatch() -> None:
    sel = Selector.from_cli(["mac-1", "ghost"], ["os=linux"], all_=False)
    with pytest.raises(SelectorError, match="unknown host 'ghost'"):
        sel.resolve(FLEET)


def test_empty_selection_is_its_own_error() -> None:
    sel = Selector.from_cli([], ["os=windows", "gpu=no"], all_=False)
    with pytest.raises(EmptySelectionError) as info:
        sel.resolve(FLEET)
    assert (
        str(info.value) == "no follower matches --tag os=windows --tag gpu=no; 4 followers enrolled"
    )
    assert isinstance(info.value, DomainValidationError)
    assert info.value.exit_code == ExitCode.VALIDATION


def test_empty_fleet_is_an_empty_selection() -> None:
    with pytest.raises(EmptySelectionError, match="no followers enrolled"):
        Selector().resolve([])


def test_explicit_tag_overrides_implicit_os() -> None:
    odd = follower("odd", OsKind.LINUX, {"os": "custom"})
    assert Selector.from_cli([], ["os=custom"], all_=False).resolve([odd]) == [odd]
    assert odd.effective_tags()["arch"] == "x86_64"


@settings(max_examples=50, deadline=None)
@given(
    picks=st.lists(st.sampled_from([f.name for f in FLEET]), max_size=4),
    tag=st.sampled_from(["os=linux", "os=macos", "gpu=yes", "arch=x86_64"]),
)
def test_resolve_agrees_with_matches(picks: list[str], tag: str) -> None:
    sel = Selector.from_cli(picks, [tag], all_=False)
    expected = [f for f in FLEET if (not picks or f.name in picks) and sel.tags[0].matches(f)]
    try:
        got = sel.resolve(FLEET)
    except EmptySelectionError:
        assert expected == []
    except SelectorError:
        # Only a named host failing the tag may raise.
        assert any(not sel.tags[0].matches(f) for f in FLEET if f.name in picks)
    else:
        assert got == expected
        assert all(sel.matches(f) for f in got)
