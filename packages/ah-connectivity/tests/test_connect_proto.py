"""The sans-I/O CONNECT parser and builders: examples plus hypothesis properties."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ah_connectivity.connect_proto import (
    DEFAULT_MAX_HEAD_SIZE,
    REASONS,
    ConnectProtocolError,
    ConnectRequest,
    ConnectRequestParser,
    ConnectResponseParser,
    ConnectTarget,
    build_request,
    build_response,
    parse_target,
)

follower_names = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,20}", fullmatch=True)
ports = st.integers(1, 65535)
hosts = st.one_of(
    st.from_regex(r"[a-z0-9]([a-z0-9.-]{0,20}[a-z0-9])?", fullmatch=True),
    st.ip_addresses(v=4).map(str),
    st.ip_addresses(v=6).map(str),
)
targets = st.builds(ConnectTarget, follower_names, ports) | st.builds(
    lambda f, p, h, hp: ConnectTarget(f, p, h, hp), follower_names, ports, hosts, ports
)
tokens = st.from_regex(r"[A-Za-z0-9_.-]{1,200}", fullmatch=True)


def split_randomly(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces, last = [], 0
    for point in points:
        pieces.append(data[last:point])
        last = point
    pieces.append(data[last:])
    return pieces


def feed_all(parser: ConnectRequestParser, pieces: list[bytes]) -> ConnectRequest | None:
    result = None
    for piece in pieces:
        result = parser.feed(piece)
    return result


def test_plain_and_relay_targets() -> None:
    assert parse_target("lin-a:22") == ConnectTarget("lin-a", 22)
    relay = parse_target("lin-a@ap2.example:8443:22")
    assert relay == ConnectTarget("lin-a", 22, "ap2.example", 8443)
    assert (
        relay.is_relay
        and relay.home == "ap2.example:8443"
        and relay.local == ConnectTarget("lin-a", 22)
    )
    v6 = parse_target("mac_1@[::1]:8443:2222")
    assert (v6.home_host, v6.home_port, v6.port, v6.home) == ("::1", 8443, 2222, "[::1]:8443")
    assert str(v6) == "mac_1@[::1]:8443:2222"


@pytest.mark.parametrize(
    "target",
    ["lin-a", "lin-a:", ":22", "lin-a:0", "lin-a:65536", "lin-a:2x", "-bad:22", "a b:22",
     "lin-a@:22", "lin-a@host:22", "lin-a@host:99999:22", "lin-a@[::1:8443:22", "lin-a@[zz]:1:22",
     "lin-a@ho st:1:22", "lin-a:22\n"],
)  # fmt: skip
def test_bad_targets_are_400(target: str) -> None:
    with pytest.raises(ConnectProtocolError) as info:
        parse_target(target)
    assert info.value.status == 400


def test_request_with_token_and_pipelined_bytes() -> None:
    parser = ConnectRequestParser()
    head = b"CONNECT lin-a:22 HTTP/1.1\r\nHost: lin-a:22\r\nProxy-Authorization: Bearer abc.def\r\n\r\n"
    request = parser.feed(head + b"SSH-2.0-x\r\n")
    assert request is not None
    assert request.target == ConnectTarget("lin-a", 22)
    assert request.token == "abc.def" and request.auth_problem is None
    assert request.header("HOST") == "lin-a:22"
    assert parser.remainder == b"SSH-2.0-x\r\n"
    assert parser.feed(b"more") is request and parser.remainder == b"SSH-2.0-x\r\nmore"


def test_bare_lf_and_non_bearer_schemes() -> None:
    request = ConnectRequestParser().feed(
        b"CONNECT lin-a:22 HTTP/1.0\nProxy-Authorization: Basic eDp5\n\n"
    )
    assert request is not None and request.version == "HTTP/1.0"
    assert request.token is None and "Basic" in (request.auth_problem or "")
    empty = ConnectRequestParser().feed(
        b"CONNECT lin-a:22 HTTP/1.1\r\nProxy-Authorization: Bearer   \r\n\r\n"
    )
    assert empty is not None and empty.token is None and empty.auth_problem


@pytest.mark.parametrize(
    ("head", "status"),
    [
        (b"GET / HTTP/1.1\r\n\r\n", 405),
        (b"connect lin-a:22 HTTP/1.1\r\n\r\n", 405),
        (b"CONNECT lin-a:22 HTTP/2.0\r\n\r\n", 400),
        (b"CONNECT lin-a:22\r\n\r\n", 400),
        (b"CONNECT  lin-a:22 HTTP/1.1\r\n\r\n", 400),
        (b"CONNECT lin-a:22 HTTP/1.1\r\nno colon\r\n\r\n", 400),
        (b"CONNECT lin-a:22 HTTP/1.1\r\nX: a\r\n folded\r\n\r\n", 400),
        (b"CONNECT lin-a:22 HTTP/1.1\r\nX: a\x01b\r\n\r\n", 400),
        (b"CONNECT lin-a:22 HTTP/1.1\r\nBad Name: a\r\n\r\n", 400),
        (b"CONNECT lin-a:22 HTTP/1.1\rX: a\r\n\r\n", 400),
        (
            b"CONNECT lin-a:22 HTTP/1.1\r\nProxy-Authorization: Bearer a\r\n"
            b"Proxy-Authorization: Bearer b\r\n\r\n",
            400,
        ),
        (b"CONNECT lin-a:22 HTTP/1.1\r\n" + b"X: y\r\n" * 101 + b"\r\n", 431),
        (b"\r\n\r\n", 400),
    ],
)
def test_bad_requests(head: bytes, status: int) -> None:
    with pytest.raises(ConnectProtocolError) as info:
        ConnectRequestParser().feed(head)
    assert info.value.status == status


def test_head_size_limit_is_431_even_without_an_end() -> None:
    parser = ConnectRequestParser(max_head_size=1024)
    parser.feed(b"CONNECT lin-a:22 HTTP/1.1\r\n")
    with pytest.raises(ConnectProtocolError) as info:
        for _ in range(100):
            parser.feed(b"X-Pad: " + b"a" * 100 + b"\r\n")
    assert info.value.status == 431
    # A head that ends but is too long is refused the same way.
    with pytest.raises(ConnectProtocolError) as info:
        ConnectRequestParser(max_head_size=64).feed(
            b"CONNECT lin-a:22 HTTP/1.1\r\nX: " + b"a" * 64 + b"\r\n\r\n"
        )
    assert info.value.status == 431


@pytest.mark.parametrize("status", sorted(s for s in REASONS if s != 200))
def test_error_responses_round_trip(status: int) -> None:
    raw = build_response(status, "why\r\nnot")
    response = ConnectResponseParser().feed(raw)
    assert response is not None
    assert (response.status, response.reason, response.text) == (
        status,
        REASONS[status],
        "why  not",
    )
    assert response.header("connection") == "close"
    assert (response.header("proxy-authenticate") is not None) == (status == 407)
    assert (response.header("allow") == "CONNECT") == (status == 405)


def test_200_leaves_tunnel_bytes() -> None:
    parser = ConnectResponseParser()
    response = parser.feed(build_response(200) + b"SSH-2.0-OpenSSH\r\n")
    assert response is not None and response.status == 200 and response.body == b""
    assert parser.remainder == b"SSH-2.0-OpenSSH\r\n"


@settings(max_examples=200, deadline=None)
@given(
    targets,
    st.one_of(st.none(), tokens),
    st.lists(st.integers(0, 10_000), max_size=8),
    st.binary(max_size=64),
)
def test_any_chunking_parses_the_same(
    target: ConnectTarget, token: str | None, cuts: list[int], tail: bytes
) -> None:
    raw = build_request(target, token) + tail
    whole = ConnectRequestParser()
    expected = whole.feed(raw)
    assert expected is not None
    assert parse_target(str(target)) == target
    assert expected.target == target and expected.token == token
    assert whole.remainder == tail
    chunked = ConnectRequestParser()
    assert feed_all(chunked, split_randomly(raw, cuts)) == expected
    assert chunked.remainder == tail


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2048), st.lists(st.integers(0, 4096), max_size=6))
def test_garbage_only_raises_protocol_errors(data: bytes, cuts: list[int]) -> None:
    parser = ConnectRequestParser(max_head_size=1024)
    try:
        feed_all(parser, split_randomly(data, cuts))
    except ConnectProtocolError as exc:
        assert exc.status in (400, 405, 431)


heads = st.lists(
    st.sampled_from(
        [b"CONNECT ", b"lin-a:22", b"@", b"[::1]", b":", b" HTTP/1.1", b"\r\n", b"\n", b"\r",
         b"Proxy-Authorization: ", b"Bearer ", b"x", b" ", b"\t", b"\x00", b"\xff", b"X-A: b"]
    ),
    max_size=40,
).map(b"".join)  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(heads, st.lists(st.integers(0, 512), max_size=6))
def test_near_miss_heads_only_raise_protocol_errors(data: bytes, cuts: list[int]) -> None:
    parser = ConnectRequestParser(max_head_size=256)
    try:
        result = feed_all(parser, split_randomly(data + b"\r\n\r\n", cuts))
    except ConnectProtocolError:
        return
    assert result is not None


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=1024), st.lists(st.integers(0, 2048), max_size=6))
def test_response_garbage_only_raises_protocol_errors(data: bytes, cuts: list[int]) -> None:
    parser = ConnectResponseParser(max_head_size=512)
    try:
        for piece in split_randomly(data, cuts):
            parser.feed(piece)
    except ConnectProtocolError as exc:
        assert exc.status == 502


@settings(max_examples=100, deadline=None)
@given(
    st.sampled_from(sorted(REASONS)),
    st.text(max_size=200),
    st.lists(st.integers(0, 4096), max_size=6),
)
def test_responses_parse_in_any_chunking(status: int, message: str, cuts: list[int]) -> None:
    raw = build_response(status, message)
    parser = ConnectResponseParser()
    response = None
    for piece in split_randomly(raw, cuts):
        response = parser.feed(piece) or response
    assert response is not None and response.status == status
    assert parser.remainder == b""


def test_default_head_limit() -> None:
    assert DEFAULT_MAX_HEAD_SIZE == 16 * 1024
