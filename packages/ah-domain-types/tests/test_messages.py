"""Control-plane messages and session events: tags, codecs, rejection of unknown types."""

from __future__ import annotations

import re

import msgspec
import pytest

from ah_domain_types import (
    CONTROL_MESSAGE_TYPES,
    CONTROL_PROTOCOL_VERSION,
    EVENT_CLASSES,
    EVENT_TYPES,
    ControlMessage,
    ErrorBody,
    ErrorEnvelope,
    Event,
    ExecRequest,
    ExitCode,
    Heartbeat,
    NoteEvent,
    OpenTcpErr,
    PathFixedEvent,
    PathRecord,
    SelectorError,
    StreamErrorCode,
    TransportMethod,
    TunnelErrorCode,
    decode_control_message,
    decode_event_json,
    encode_control_message,
    encode_event_json,
)


def tag_of(cls: type[msgspec.Struct]) -> str:
    tag = msgspec.inspect.type_info(cls).tag  # type: ignore[attr-defined]
    assert isinstance(tag, str)
    return tag


def test_control_tags() -> None:
    assert CONTROL_PROTOCOL_VERSION == 1
    assert tuple(tag_of(c) for c in ControlMessage.__args__) == CONTROL_MESSAGE_TYPES
    assert CONTROL_MESSAGE_TYPES == (
        "hello",
        "welcome",
        "heartbeat",
        "ack",
        "goodbye",
        "execRequest",
        "execResult",
        "openTcp",
        "openTcpOk",
        "openTcpErr",
        "dialData",
        "dataChannelHello",
        "streamError",
    )


def test_event_tags() -> None:
    assert Event.__args__ == EVENT_CLASSES
    assert tuple(tag_of(c) for c in EVENT_CLASSES) == EVENT_TYPES
    assert EVENT_TYPES == (
        "followersCatalog",
        "fenceStarted",
        "fenceResult",
        "hostStarted",
        "hostLog",
        "hostExited",
        "summary",
        "note",
        "connect.path.fixed",
        "connect.path.degraded",
        "connect.path.restored",
        "connect.path.failed",
    )


def test_control_codec() -> None:
    msg = ExecRequest(request_id="r1", command=["uname", "-a"], timeout_ms=5000)
    data = encode_control_message(msg)
    assert msgspec.msgpack.decode(data) == {
        "type": "execRequest",
        "requestId": "r1",
        "command": ["uname", "-a"],
        "timeoutMs": 5000,
    }
    assert decode_control_message(data) == msg


@pytest.mark.parametrize(
    "payload",
    [
        {"type": "launchMissiles"},
        {"seq": 1, "sentMs": 2},
        {"type": "heartbeat", "seq": -1, "sentMs": 0},
    ],
)
def test_control_rejects_unknown_or_invalid(payload: dict[str, object]) -> None:
    with pytest.raises(msgspec.ValidationError):
        decode_control_message(msgspec.msgpack.encode(payload))


def test_control_rejects_garbage() -> None:
    with pytest.raises(msgspec.DecodeError):
        decode_control_message(b"\xc1")


def test_tunnel_error_codes_on_the_wire() -> None:
    err = OpenTcpErr(tunnel_id="t", code=TunnelErrorCode.REFUSED_NOT_ALLOWED, message="no")
    assert msgspec.json.decode(msgspec.json.encode(err))["code"] == "refusedNotAllowed"
    assert [int(c) for c in StreamErrorCode] == [1, 2, 3, 4]


def test_event_json_shape() -> None:
    path = PathRecord(TransportMethod.CONNECT, "f1:22", None, 1.5)
    event = PathFixedEvent("f1", path, session_id="s1", ts_ms=1700000000000.5)
    assert msgspec.json.decode(encode_event_json(event)) == {
        "type": "connect.path.fixed",
        "host": "f1",
        "path": {"method": "connect", "target": "f1:22", "relay": None, "rttEstimateMs": 1.5},
        "sessionId": "s1",
        "seq": 0,
        "tsMs": 1700000000000.5,
    }
    assert decode_event_json(encode_event_json(event)) == event
    renumbered = msgspec.structs.replace(event, seq=7)
    assert renumbered.seq == 7


def test_event_defaults_and_rejections() -> None:
    note = decode_event_json(b'{"type":"note","message":"hi","sessionId":"s","tsMs":1}')
    assert note == NoteEvent("hi", session_id="s", ts_ms=1.0)
    assert note.level == "info" and note.seq == 0
    with pytest.raises(
        msgspec.ValidationError, match=re.escape("Invalid value 'connect.path.lost' - at `$.type`")
    ):
        decode_event_json(b'{"type":"connect.path.lost","sessionId":"s","tsMs":1}')
    with pytest.raises(
        msgspec.ValidationError, match=re.escape("Invalid enum value 'stdin' - at `$.stream`")
    ):
        decode_event_json(
            b'{"type":"hostLog","host":"a","stream":"stdin","line":"","sessionId":"s","tsMs":1}'
        )


def test_heartbeat_is_frozen() -> None:
    beat = Heartbeat(seq=1, sent_ms=2)
    with pytest.raises(AttributeError):
        beat.seq = 3  # type: ignore[misc]


def test_error_envelope_from_domain_error() -> None:
    envelope = ErrorEnvelope.from_exception(SelectorError("bad --tag", details={"value": "os"}))
    assert msgspec.json.decode(msgspec.json.encode(envelope)) == {
        "error": {
            "kind": "selector",
            "message": "bad --tag",
            "exitCode": 7,
            "details": {"value": "os"},
        }
    }


def test_error_body_from_other_exception() -> None:
    body = ErrorBody.from_exception(ConnectionRefusedError("refused"), exit_code=ExitCode.NETWORK)
    assert (body.kind, body.message, body.exit_code, body.details) == (
        "ConnectionRefusedError",
        "refused",
        5,
        {},
    )


def test_exit_codes() -> None:
    assert {c.name: int(c) for c in ExitCode} == {
        "OK": 0,
        "HOSTS_FAILED": 1,
        "USAGE": 2,
        "AUTH": 4,
        "NETWORK": 5,
        "VALIDATION": 7,
        "CONFIGURATION": 8,
        "INTERACTION_NEEDED": 10,
    }
