"""Transport methods: known names accepted, unknown ones rejected everywhere."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from ah_domain_types import (
    ConfigFile,
    ExitCode,
    PathRecord,
    TransportMethod,
    UnknownTransportMethodError,
    parse_transport_method,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("direct", TransportMethod.DIRECT),
        ("connect", TransportMethod.CONNECT),
        ("relay", TransportMethod.RELAY),
        (" Relay ", TransportMethod.RELAY),
    ],
)
def test_parse_known(text: str, expected: TransportMethod) -> None:
    assert parse_transport_method(text) is expected


@pytest.mark.parametrize("text", ["ssh", "", "direct,connect", "quic"])
def test_parse_unknown_names_accepted_ones(text: str) -> None:
    with pytest.raises(UnknownTransportMethodError) as info:
        parse_transport_method(text)
    message = str(info.value)
    assert repr(text) in message
    assert "expected one of: direct, connect, relay" in message
    assert info.value.exit_code == ExitCode.VALIDATION


def test_wire_values() -> None:
    assert [m.value for m in TransportMethod] == ["direct", "connect", "relay"]


def test_decode_known_method() -> None:
    record = msgspec.json.decode(
        b'{"method":"relay","target":"f1:22","relay":"ap2","rttEstimateMs":3.5}', type=PathRecord
    )
    assert record == PathRecord(TransportMethod.RELAY, "f1:22", "ap2", 3.5)


@pytest.mark.parametrize("codec", [msgspec.json, msgspec.msgpack])
def test_decode_unknown_method_fails(codec: Any) -> None:
    data = codec.encode({"method": "ssh", "target": "f1:22", "relay": None, "rttEstimateMs": 1})
    with pytest.raises(msgspec.ValidationError, match=r"Invalid enum value 'ssh' - at `\$.method`"):
        codec.decode(data, type=PathRecord)


def test_config_rejects_unknown_method() -> None:
    with pytest.raises(msgspec.ValidationError, match="Invalid enum value 'carrier-pigeon'"):
        msgspec.convert({"path-policy": {"methods": ["direct", "carrier-pigeon"]}}, ConfigFile)


def test_path_describe() -> None:
    record = PathRecord(TransportMethod.RELAY, "f1:22", "ap2", 3.25)
    assert record.describe() == "relay f1:22 via ap2 (rtt 3.2 ms)"
