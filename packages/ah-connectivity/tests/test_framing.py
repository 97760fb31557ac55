from __future__ import annotations

import struct
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ah_connectivity import (
    DEFAULT_MAX_FRAME_SIZE,
    FrameDecoder,
    FrameError,
    FrameTooLarge,
    MalformedFrame,
    encode_frame,
)
from ah_domain_types import (
    Ack,
    ControlMessage,
    ExecRequest,
    ExecResult,
    Goodbye,
    Heartbeat,
    StreamError,
    StreamErrorCode,
)

ints = st.integers(min_value=0, max_value=2**40)
text = st.text(max_size=40)

messages: st.SearchStrategy[Any] = st.one_of(
    st.builds(Heartbeat, seq=ints, sent_ms=ints),
    st.builds(Ack, seq=ints, sent_ms=ints),
    st.builds(Goodbye, reason=text),
    st.builds(
        ExecRequest,
        request_id=text,
        command=st.lists(text, max_size=5),
        timeout_ms=st.none() | ints,
    ),
    st.builds(
        ExecResult,
        request_id=text,
        exit_code=st.integers(-255, 255),
        stdout=st.text(max_size=300),
        stderr=text,
        took_ms=ints,
    ),
    st.builds(StreamError, code=st.integers(0, 10), message=text),
)


def decoder(max_frame_size: int = DEFAULT_MAX_FRAME_SIZE) -> FrameDecoder[ControlMessage]:
    return FrameDecoder[ControlMessage](ControlMessage, max_frame_size)


def chunk(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces, last = [], 0
    for p in [*points, len(data)]:
        pieces.append(data[last:p])
        last = p
    return pieces


@settings(max_examples=150, deadline=None)
@given(st.lists(messages, max_size=12), st.lists(st.integers(0, 10_000), max_size=30))
def test_any_chunking_decodes_the_same_messages(msgs: list[Any], cuts: list[int]) -> None:
    stream = b"".join(encode_frame(m) for m in msgs)
    dec = decoder()
    out: list[Any] = []
    for piece in chunk(stream, cuts):
        out += dec.feed(piece)
    assert out == msgs
    assert dec.buffered == 0


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2_000), st.lists(st.integers(0, 5_000), max_size=10))
def test_garbage_only_ever_raises_frame_errors(garbage: bytes, cuts: list[int]) -> None:
    dec = decoder(max_frame_size=512)
    for piece in chunk(garbage, cuts):
        try:
            dec.feed(piece)
        except FrameError as exc:
            assert exc.code in (StreamErrorCode.MALFORMED_FRAME, StreamErrorCode.FRAME_TOO_LARGE)
            assert dec.buffered == 0
            break
        # Whatever is held back is at most one header plus one frame.
        assert dec.buffered <= 4 + 512


@settings(max_examples=100, deadline=None)
@given(st.integers(min_value=1025, max_value=2**32 - 1), st.binary(max_size=64))
def test_oversized_header_is_refused_before_buffering(length: int, tail: bytes) -> None:
    dec = decoder(max_frame_size=1024)
    header = struct.pack(">I", length)
    # Even split across calls, the refusal comes as soon as the 4th header byte arrives.
    assert dec.feed(header[:3]) == []
    with pytest.raises(FrameTooLarge) as info:
        dec.feed(header[3:] + tail)
    assert info.value.code == StreamErrorCode.FRAME_TOO_LARGE
    assert str(length) in str(info.value)
    assert dec.buffered == 0
    # The stream is dead from here on: the same error again, nothing buffered.
    with pytest.raises(FrameTooLarge):
        dec.feed(b"\x00" * 100)
    assert dec.buffered == 0


def test_messages_before_a_bad_frame_are_returned_with_the_error() -> None:
    good = encode_frame(Heartbeat(seq=1, sent_ms=5))
    bad = struct.pack(">I", 3) + b"\xc1\xc1\xc1"  # 0xc1 is never valid msgpack
    with pytest.raises(MalformedFrame) as info:
        decoder().feed(good + bad)
    assert info.value.messages == [Heartbeat(seq=1, sent_ms=5)]
    assert info.value.code == StreamErrorCode.MALFORMED_FRAME


def test_valid_msgpack_of_the_wrong_shape_is_malformed() -> None:
    payload = msgspec.msgpack.encode({"type": "heartbeat", "seq": "not a number", "sentMs": 1})
    with pytest.raises(MalformedFrame, match="seq"):
        decoder().feed(struct.pack(">I", len(payload)) + payload)
    unknown = msgspec.msgpack.encode({"type": "noSuchMessage"})
    with pytest.raises(MalformedFrame):
        decoder().feed(struct.pack(">I", len(unknown)) + unknown)


def test_empty_frame_is_malformed() -> None:
    with pytest.raises(MalformedFrame, match="empty"):
        decoder().feed(b"\x00\x00\x00\x00")


def test_wire_format_is_length_prefixed_camel_case_msgpack() -> None:
    frame = encode_frame(Heartbeat(seq=7, sent_ms=42))
    (length,) = struct.unpack(">I", frame[:4])
    assert length == len(frame) - 4
    assert msgspec.msgpack.decode(frame[4:]) == {"type": "heartbeat", "seq": 7, "sentMs": 42}


def test_encoder_refuses_what_the_peer_would_refuse() -> None:
    big = ExecResult(request_id="r", exit_code=0, stdout="x" * 2000, stderr="", took_ms=1)
    with pytest.raises(FrameTooLarge, match="1024-byte"):
        encode_frame(big, max_frame_size=1024)
    frame = encode_frame(big)
    assert decoder().feed(frame) == [big]
    with pytest.raises(FrameTooLarge):
        decoder(max_frame_size=1024).feed(frame)


def test_frame_exactly_at_the_limit_is_accepted() -> None:
    msg = Goodbye(reason="y" * 100)
    frame = encode_frame(msg)
    assert decoder(max_frame_size=len(frame) - 4).feed(frame) == [msg]
    with pytest.raises(FrameTooLarge):
        decoder(max_frame_size=len(frame) - 5).feed(frame)
