"""The SSE parser: any chunking of a stream gives the same messages; line endings, comments,
ids, retry and multi-line data follow the event-stream rules."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from ah_fleetctl.sse import SseMessage, SseParser

field_text = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n\0"),
    max_size=20,
)
messages = st.lists(
    st.tuples(
        st.one_of(st.none(), st.from_regex(r"[A-Za-z.]{1,12}", fullmatch=True)),
        st.lists(field_text, min_size=1, max_size=3),
        st.one_of(st.none(), st.from_regex(r"[0-9]{1,6}", fullmatch=True)),
        st.booleans(),  # a comment before it
    ),
    max_size=12,
)
endings = st.sampled_from(["\n", "\r\n", "\r"])


def render(items: list[tuple[str | None, list[str], str | None, bool]], eol: str) -> bytes:
    out = []
    for event, data, event_id, comment in items:
        if comment:
            out.append(f": ka{eol}")
        if event_id is not None:
            out.append(f"id: {event_id}{eol}")
        if event is not None:
            out.append(f"event: {event}{eol}")
        out += [f"data: {line}{eol}" for line in data]
        out.append(eol)
    return "".join(out).encode()


def expected(items: list[tuple[str | None, list[str], str | None, bool]]) -> list[SseMessage]:
    last_id: str | None = None
    out = []
    for event, data, event_id, _ in items:
        if event_id is not None:
            last_id = event_id
        out.append(SseMessage(event or "message", "\n".join(data), last_id))
    return out


@settings(max_examples=300, deadline=None)
@given(items=messages, eol=endings, cuts=st.lists(st.integers(0, 10_000), max_size=30))
def test_any_chunking_yields_the_same_messages(
    items: list[tuple[str | None, list[str], str | None, bool]], eol: str, cuts: list[int]
) -> None:
    stream = render(items, eol)
    points = sorted({c % (len(stream) + 1) for c in cuts})
    chunks = [stream[a:b] for a, b in zip([0, *points], [*points, len(stream)], strict=True)]
    parser = SseParser()
    got: list[SseMessage] = []
    for chunk in chunks:
        got += parser.feed(chunk)
    assert got == expected(items)
    assert parser.comments == sum(1 for item in items if item[3])


def test_field_rules() -> None:
    parser = SseParser()
    got = parser.feed(
        b"\xef\xbb\xbfretry: 1500\n"
        b"retry: soon\n"
        b"id: 7\n"
        b"event: hostLog\n"
        b"data\n"
        b"data:no space\n"
        b"data:  two spaces\n"
        b"unknown: ignored\n"
        b"\n"
        b"id: bad\0id\n"
        b"event: lonely\n"
        b"\n"
        b"data: x\n"
        b"\n"
    )
    assert got == [
        SseMessage("hostLog", "\nno space\n two spaces", "7"),
        SseMessage("message", "x", "7"),
    ]
    assert parser.retry_ms == 1500
    assert parser.last_event_id == "7"
    # A message without a blank line after it is not dispatched (yet).
    assert parser.feed(b"data: pending") == []
    assert parser.feed(b"\n\n") == [SseMessage("message", "pending", "7")]
