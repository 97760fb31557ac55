"""Host names, tags, addresses and follower validation."""

from __future__ import annotations

import re

import msgspec
import pytest

from ah_domain_types import (
    DomainValidationError,
    FenceHostResult,
    FenceHostState,
    FenceMetadata,
    FollowerInfo,
    HostNameError,
    OsKind,
    Resources,
    parse_host_port,
    validate_host_name,
)

GOOD = {
    "name": "mac-mini.lab_1",
    "os": "macos",
    "arch": "arm64",
    "tags": {"os.version": "14", "pool": "ci"},
    "resources": {"cpus": 8, "memoryMb": 16384},
    "hostKeyFingerprint": "SHA256:uNiVztksCsDhcc0u9e8BujQXVUpKZIDTMczCvj3tD2s",
    "directAddress": "192.168.1.20:22",
    "workspace": "/Users/ci/ws",
    "version": "0.1.0",
}


def test_decode_camel_case_follower() -> None:
    info = msgspec.convert(GOOD, FollowerInfo)
    assert info.os is OsKind.MACOS
    assert info.resources == Resources(cpus=8, memory_mb=16384)
    assert msgspec.to_builtins(info) == GOOD


@pytest.mark.parametrize("name", ["a", "A1", "a.b-c_d", "x" * 63])
def test_valid_host_names(name: str) -> None:
    assert validate_host_name(name) == name


@pytest.mark.parametrize("name", ["", "-a", ".a", "a b", "a/b", "x" * 64, "a\n", "é"])
def test_invalid_host_names(name: str) -> None:
    with pytest.raises(HostNameError, match=re.escape(f"invalid host name {name!r}")):
        validate_host_name(name)
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({**GOOD, "name": name}, FollowerInfo)


@pytest.mark.parametrize(
    ("field", "value", "fragment"),
    [
        ("tags", {"bad key": "x"}, "invalid tag key 'bad key'"),
        ("tags", {"pool": "a,b"}, "invalid value 'a,b' for tag 'pool'"),
        ("hostKeyFingerprint", "MD5:aa:bb", "invalid host-key fingerprint"),
        ("directAddress", "no-port", "invalid direct address"),
        ("os", "beos", "Invalid enum value 'beos'"),
    ],
)
def test_follower_field_validation(field: str, value: object, fragment: str) -> None:
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({**GOOD, field: value}, FollowerInfo)
    if field != "os":
        kwargs = msgspec.structs.asdict(msgspec.convert(GOOD, FollowerInfo))
        python_name = {
            "hostKeyFingerprint": "host_key_fingerprint",
            "directAddress": "direct_address",
        }.get(field, field)
        kwargs[python_name] = value
        with pytest.raises(DomainValidationError, match=fragment):
            FollowerInfo(**kwargs)


@pytest.mark.parametrize(
    ("text", "default", "expected"),
    [
        ("10.0.0.5:22", None, ("10.0.0.5", 22)),
        ("[::1]:2222", None, ("::1", 2222)),
        ("host", 22, ("host", 22)),
        ("[fe80::1]", 22, ("fe80::1", 22)),
        ("h:80", 22, ("h", 80)),
    ],
)
def test_parse_host_port(text: str, default: int | None, expected: tuple[str, int]) -> None:
    assert parse_host_port(text, default_port=default) == expected


@pytest.mark.parametrize("text", ["host", "host:", ":22", "host:0", "host:70000", "a b:22"])
def test_parse_host_port_rejects(text: str) -> None:
    with pytest.raises(DomainValidationError, match=re.escape(f"invalid address {text!r}")):
        parse_host_port(text)


def test_fence_lagging_hosts() -> None:
    fence = FenceMetadata(
        snapshot_id="snap",
        hosts={
            "b": FenceHostResult(FenceHostState.TIMEOUT, 120000),
            "a": FenceHostResult(FenceHostState.CONSISTENT, 10),
            "c": FenceHostResult(FenceHostState.ERROR, 5, "rsync exited 23"),
        },
        started_ms=0,
        took_ms=120000,
    )
    assert fence.lagging_hosts() == ["b", "c"]
