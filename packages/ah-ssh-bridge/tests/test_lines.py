"""LineSplitter: any chunking of any bytes gives the lines a whole-buffer decode gives."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ah_ssh_bridge import LineSplitter


def reference_lines(data: bytes) -> list[str]:
    text = data.decode("utf-8", errors="replace")
    lines = text.split("\n")
    last = lines.pop()
    complete = [line[:-1] if line.endswith("\r") else line for line in lines]
    return [*complete, last] if last else complete


def feed_in_chunks(data: bytes, cuts: list[int], splitter: LineSplitter) -> list[str]:
    positions = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    out: list[str] = []
    for start, end in itertools.pairwise(positions):
        out.extend(splitter.feed(data[start:end]))
    out.extend(splitter.finish())
    return out


text_bytes = st.one_of(
    st.binary(max_size=300),
    st.text(alphabet=st.sampled_from("ab\n\r é€😀\x00"), max_size=120).map(str.encode),
)


@given(text_bytes, st.lists(st.integers(min_value=0), max_size=20))
def test_chunking_never_changes_the_lines(data: bytes, cuts: list[int]) -> None:
    assert feed_in_chunks(data, cuts, LineSplitter()) == reference_lines(data)


@given(text_bytes, st.lists(st.integers(min_value=0), max_size=20), st.integers(1, 8))
def test_long_lines_come_out_in_pieces_that_join_back(
    data: bytes, cuts: list[int], limit: int
) -> None:
    pieces = feed_in_chunks(data, cuts, LineSplitter(max_line_chars=limit))
    assert all(len(piece) <= limit for piece in pieces if "\r" not in piece)
    assert "".join(pieces).replace("\r", "") == "".join(reference_lines(data)).replace("\r", "")


def test_multibyte_character_split_across_chunks() -> None:
    splitter = LineSplitter()
    encoded = "é€😀\n".encode()
    lines: list[str] = []
    for byte in encoded:
        lines.extend(splitter.feed(bytes([byte])))
    assert lines == ["é€😀"]
    assert splitter.finish() == []


def test_feed_after_finish_is_an_error() -> None:
    splitter = LineSplitter()
    assert splitter.finish() == []
    with pytest.raises(ValueError, match="after finish"):
        splitter.feed(b"x")
