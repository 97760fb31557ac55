"""The warm executor's frame codec (pure): round trips, any chunking, garbage."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ah_ssh_bridge.warm_codec import (
    HEADER,
    KINDS,
    MAGIC,
    MAX_PAYLOAD,
    MAX_PREAMBLE,
    START,
    STDOUT,
    Decoder,
    Frame,
    FrameError,
    encode,
    encode_json,
)

frames = st.builds(
    Frame,
    st.sampled_from(sorted(KINDS)),
    st.integers(min_value=0, max_value=0xFFFFFFFF),
    st.binary(max_size=300),
)


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces = []
    last = 0
    for point in [*points, len(data)]:
        pieces.append(data[last:point])
        last = point
    return pieces


@given(st.lists(frames, max_size=20), st.lists(st.integers(min_value=0), max_size=30))
def test_round_trip_under_any_chunking(sent: list[Frame], cuts: list[int]) -> None:
    stream = b"".join(encode(f.kind, f.id, f.payload) for f in sent)
    decoder = Decoder()
    got: list[Frame] = []
    for piece in split_at(stream, cuts):
        got += decoder.feed(piece)
    assert got == sent
    assert decoder.buffered == 0


@given(
    st.binary(max_size=500).filter(lambda b: MAGIC not in b and b"\x00" not in b),
    st.lists(frames, max_size=5),
    st.lists(st.integers(min_value=0), max_size=10),
)
def test_login_shell_chatter_before_the_greeting_is_skipped(
    chatter: bytes, sent: list[Frame], cuts: list[int]
) -> None:
    stream = chatter + MAGIC + b"".join(encode(f.kind, f.id, f.payload) for f in sent)
    decoder = Decoder(expect_magic=True)
    got: list[Frame] = []
    for piece in split_at(stream, cuts):
        got += decoder.feed(piece)
    assert got == sent
    assert decoder.magic_seen
    assert decoder.preamble() == chatter


@settings(max_examples=300)
@given(st.binary(max_size=400), st.lists(st.integers(min_value=0), max_size=10))
def test_garbage_gives_frames_or_a_frame_error_and_always_returns(
    garbage: bytes, cuts: list[int]
) -> None:
    """Arbitrary bytes never hang the decoder: every feed returns (frames, or FrameError,
    and once broken it stays broken)."""
    decoder = Decoder()
    broken = False
    for piece in split_at(garbage, cuts):
        try:
            for frame in decoder.feed(piece):
                assert frame.kind in KINDS
                assert len(frame.payload) <= MAX_PAYLOAD
        except FrameError:
            broken = True
            with pytest.raises(FrameError):
                decoder.feed(b"")
            break
    if not broken:
        # Whatever is left is the start of one frame, less than its announced size.
        assert decoder.buffered < HEADER.size + MAX_PAYLOAD


def test_specific_errors_name_the_problem() -> None:
    with pytest.raises(FrameError, match="unknown frame kind 99"):
        Decoder().feed(struct.pack(">BII", 99, 7, 0))
    with pytest.raises(FrameError, match="more than the limit"):
        Decoder().feed(struct.pack(">BII", STDOUT, 1, MAX_PAYLOAD + 1))
    chatty = Decoder(expect_magic=True)
    with pytest.raises(FrameError, match="no warm-executor greeting"):
        chatty.feed(b"motd line\n" * (MAX_PREAMBLE // 10 + 20))
    with pytest.raises(FrameError, match="not UTF-8 JSON"):
        Frame(START, 1, b"\xff{").json()
    with pytest.raises(FrameError, match="not a JSON object"):
        Frame(START, 1, b"[1]").json()
    with pytest.raises(ValueError, match="unknown frame kind"):
        encode(0, 1)
    with pytest.raises(ValueError, match="outside"):
        encode(START, -1)


@given(
    st.dictionaries(
        st.text(max_size=10),
        st.one_of(st.text(max_size=20), st.integers(), st.lists(st.text(max_size=5))),
        max_size=5,
    )
)
def test_json_frames_round_trip(value: dict[str, object]) -> None:
    (frame,) = Decoder().feed(encode_json(START, 5, value))
    assert frame.json() == value
