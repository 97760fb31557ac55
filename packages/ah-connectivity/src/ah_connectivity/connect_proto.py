"""HTTP CONNECT for the access point's tunnel listener, as pure code (no I/O).

A leader opens a tunnel to a follower's sshd with::

    CONNECT <follower>:<port> HTTP/1.1
    Proxy-Authorization: Bearer <jwt>

or, to reach a follower of another access point through this one (relay)::

    CONNECT <follower>@<home-ap-host>:<home-ap-port>:<port> HTTP/1.1

`ConnectRequestParser` takes the request head in whatever pieces the socket delivers and
returns a `ConnectRequest` once the blank line arrives; bytes after the head (a client that
did not wait for the 200) stay in ``remainder``. Anything it cannot accept raises
`ConnectProtocolError` carrying the status to answer with (400, 405, 431). `build_response`
renders the answers (200, and the errors with a short text body), `build_request` and
`ConnectResponseParser` are the client's half.
"""

from __future__ import annotations

import re
from typing import ClassVar

import msgspec

from ah_domain_types import HOST_NAME_PATTERN

__all__ = [
    "DEFAULT_MAX_HEAD_SIZE",
    "MAX_HEADERS",
    "REASONS",
    "ConnectProtocolError",
    "ConnectRequest",
    "ConnectRequestParser",
    "ConnectResponse",
    "ConnectResponseParser",
    "ConnectTarget",
    "build_request",
    "build_response",
    "parse_target",
]

DEFAULT_MAX_HEAD_SIZE = 16 * 1024
MAX_HEADERS = 100
MAX_BODY_SIZE = 64 * 1024
"""Largest error body a client accepts (ours are a line or two)."""

REASONS: dict[int, str] = {
    200: "Connection established",
    400: "Bad Request",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    407: "Proxy Authentication Required",
    408: "Request Timeout",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}

_FOLLOWER_RE = re.compile(HOST_NAME_PATTERN)
# RFC 9110 token characters (method and header names).
_TOKEN_RE = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_HOST_RE = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?$")
_IPV6_RE = re.compile(r"^[0-9A-Fa-f:.]{2,45}$")
_PORT_RE = re.compile(r"^[0-9]{1,5}$")
_LENGTH_RE = re.compile(r"^[0-9]{1,9}$")
_VERSION_RE = re.compile(r"^HTTP/1\.[01]$")
_STATUS_LINE_RE = re.compile(r"^HTTP/1\.[01] ([0-9]{3})(?: (.*))?$")
# Field values: visible ASCII, Latin-1 obs-text, spaces and tabs; no other controls.
_FIELD_VALUE_RE = re.compile(r"^[\t\x20-\x7e\x80-\xff]*$")


class ConnectProtocolError(Exception):
    """The peer's CONNECT head cannot be accepted; ``status`` is the HTTP status to answer."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class ConnectTarget(msgspec.Struct, frozen=True):
    """Where a CONNECT wants to go: ``port`` on ``follower``, through ``home_host:home_port``
    (the follower's own access point) when relayed."""

    follower: str
    port: int
    home_host: str | None = None
    home_port: int | None = None

    @property
    def is_relay(self) -> bool:
        return self.home_host is not None

    @property
    def home(self) -> str | None:
        """``host:port`` of the home access point (IPv6 hosts bracketed), or None."""
        if self.home_host is None:
            return None
        host = f"[{self.home_host}]" if ":" in self.home_host else self.home_host
        return f"{host}:{self.home_port}"

    @property
    def local(self) -> ConnectTarget:
        """The same target as the home access point must see it (no relay part)."""
        return ConnectTarget(self.follower, self.port)

    def __str__(self) -> str:
        home = self.home
        return f"{self.follower}@{home}:{self.port}" if home else f"{self.follower}:{self.port}"


def _parse_port(text: str, what: str, target: str) -> int:
    if not _PORT_RE.fullmatch(text) or not 1 <= int(text) <= 65535:
        raise ConnectProtocolError(
            400, f"CONNECT target {target!r}: {what} {text!r} is not a port number (1-65535)"
        )
    return int(text)


def parse_target(target: str) -> ConnectTarget:
    """Parse ``<follower>:<port>`` or ``<follower>@<home-host>:<home-port>:<port>``."""
    rest, sep, port_text = target.rpartition(":")
    if not sep or not rest:
        raise ConnectProtocolError(
            400,
            f"CONNECT target {target!r} must be <follower>:<port> or "
            "<follower>@<home-access-point>:<port>:<port>",
        )
    port = _parse_port(port_text, "port", target)
    follower, at, home = rest.partition("@")
    if not _FOLLOWER_RE.fullmatch(follower):
        raise ConnectProtocolError(
            400, f"CONNECT target {target!r}: {follower!r} is not a follower name"
        )
    if not at:
        return ConnectTarget(follower, port)
    if home.startswith("["):
        host, bracket, after = home[1:].partition("]")
        if not bracket or not after.startswith(":") or not _IPV6_RE.fullmatch(host):
            raise ConnectProtocolError(
                400, f"CONNECT target {target!r}: home access point {home!r} is not [ipv6]:port"
            )
        home_port_text = after[1:]
    else:
        host, colon, home_port_text = home.rpartition(":")
        if not colon or not _HOST_RE.fullmatch(host):
            raise ConnectProtocolError(
                400, f"CONNECT target {target!r}: home access point {home!r} is not host:port"
            )
    home_port = _parse_port(home_port_text, "home access point port", target)
    return ConnectTarget(follower, port, host, home_port)


class ConnectRequest(msgspec.Struct, frozen=True):
    """A parsed CONNECT head."""

    target: ConnectTarget
    version: str
    headers: tuple[tuple[str, str], ...]
    """Header fields in order, names as sent."""
    token: str | None
    """The bearer credential of ``Proxy-Authorization``, or None."""
    auth_problem: str | None = None
    """Why ``token`` is None although a ``Proxy-Authorization`` header was sent."""

    def header(self, name: str) -> str | None:
        lower = name.lower()
        for key, value in self.headers:
            if key.lower() == lower:
                return value
        return None


def _split_head(buffer: bytearray, start: int) -> int:
    """Index just past the blank line ending the head, or -1 (search from `start`)."""
    crlf = buffer.find(b"\r\n\r\n", start)
    lf = buffer.find(b"\n\n", start)
    ends = [i + 4 for i in (crlf,) if i >= 0] + [i + 2 for i in (lf,) if i >= 0]
    return min(ends) if ends else -1


def _head_lines(head: bytes) -> list[str]:
    text = head.decode("latin-1")
    lines = text.split("\n")
    out = []
    for line in lines:
        if line.endswith("\r"):
            line = line[:-1]
        if "\r" in line:
            raise ConnectProtocolError(400, "bare CR inside the request head")
        out.append(line)
    while out and out[-1] == "":
        out.pop()
    return out


def _parse_headers(lines: list[str]) -> tuple[tuple[str, str], ...]:
    if len(lines) > MAX_HEADERS:
        raise ConnectProtocolError(431, f"more than {MAX_HEADERS} header fields")
    headers: list[tuple[str, str]] = []
    for line in lines:
        if line[:1] in (" ", "\t"):
            raise ConnectProtocolError(400, "obsolete line folding in header fields")
        name, colon, value = line.partition(":")
        if not colon or not _TOKEN_RE.fullmatch(name):
            raise ConnectProtocolError(400, f"malformed header field {line[:80]!r}")
        value = value.strip(" \t")
        if not _FIELD_VALUE_RE.fullmatch(value):
            raise ConnectProtocolError(400, f"control character in header field {name!r}")
        headers.append((name, value))
    return tuple(headers)


def _bearer(headers: tuple[tuple[str, str], ...]) -> tuple[str | None, str | None]:
    values = [v for k, v in headers if k.lower() == "proxy-authorization"]
    if not values:
        return None, None
    if len(values) > 1:
        raise ConnectProtocolError(400, "more than one Proxy-Authorization header")
    scheme, _, credential = values[0].partition(" ")
    if scheme.lower() != "bearer":
        return None, f"Proxy-Authorization uses scheme {scheme[:20]!r}; expected Bearer"
    credential = credential.strip()
    if not credential:
        return None, "Proxy-Authorization: Bearer carries no token"
    return credential, None


class _HeadBuffer:
    """Accumulates a message head up to a size limit."""

    too_large_status: ClassVar[int] = 431

    def __init__(self, max_head_size: int) -> None:
        if max_head_size < 16:
            raise ValueError(f"max_head_size must be at least 16 bytes, got {max_head_size}")
        self.max_head_size = max_head_size
        self._buffer = bytearray()
        self.remainder = b""

    def _take_head(self, data: bytes) -> bytes | None:
        start = max(0, len(self._buffer) - 3)
        self._buffer += data
        end = _split_head(self._buffer, start)
        if end < 0:
            if len(self._buffer) > self.max_head_size:
                raise ConnectProtocolError(
                    self.too_large_status,
                    f"head is larger than {self.max_head_size} bytes without ending",
                )
            return None
        if end > self.max_head_size:
            raise ConnectProtocolError(
                self.too_large_status, f"head is larger than {self.max_head_size} bytes"
            )
        head = bytes(self._buffer[:end])
        self.remainder = bytes(self._buffer[end:])
        self._buffer.clear()
        return head


class ConnectRequestParser(_HeadBuffer):
    """Incremental CONNECT request-head parser (one request per connection)."""

    def __init__(self, max_head_size: int = DEFAULT_MAX_HEAD_SIZE) -> None:
        super().__init__(max_head_size)
        self.request: ConnectRequest | None = None

    def feed(self, data: bytes) -> ConnectRequest | None:
        """Add bytes; return the request once its head is complete (then the same one again,
        with later bytes appended to ``remainder``)."""
        if self.request is not None:
            self.remainder += data
            return self.request
        head = self._take_head(data)
        if head is None:
            return None
        self.request = self._parse(head)
        return self.request

    def _parse(self, head: bytes) -> ConnectRequest:
        lines = _head_lines(head)
        # RFC 9112 lets a server skip empty lines before the request line.
        while lines and lines[0] == "":
            lines.pop(0)
        if not lines:
            raise ConnectProtocolError(400, "empty request head")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not _TOKEN_RE.fullmatch(parts[0]) or not parts[1]:
            raise ConnectProtocolError(400, f"malformed request line {lines[0][:80]!r}")
        method, target_text, version = parts
        if not _VERSION_RE.fullmatch(version):
            raise ConnectProtocolError(400, f"unsupported protocol version {version[:20]!r}")
        if method != "CONNECT":
            raise ConnectProtocolError(
                405, f"method {method[:20]!r} not allowed: this listener only accepts CONNECT"
            )
        target = parse_target(target_text)
        headers = _parse_headers(lines[1:])
        token, problem = _bearer(headers)
        return ConnectRequest(target, version, headers, token, problem)


def build_response(
    status: int, message: str = "", *, headers: tuple[tuple[str, str], ...] = ()
) -> bytes:
    """One response head (plus a short text body for errors)."""
    reason = REASONS.get(status, "Error")
    lines = [f"HTTP/1.1 {status} {reason}"]
    if status == 407:
        lines.append('Proxy-Authenticate: Bearer realm="ah-fleet"')
    if status == 405:
        lines.append("Allow: CONNECT")
    lines += [f"{k}: {v}" for k, v in headers]
    body = b""
    if not 200 <= status < 300:
        text = (message or reason)[:1024]
        body = (text.replace("\r", " ").replace("\n", " ") + "\n").encode("utf-8", "replace")
        lines += [
            "Content-Type: text/plain; charset=utf-8",
            f"Content-Length: {len(body)}",
            "Connection: close",
        ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1", "replace") + body


def build_request(target: ConnectTarget | str, token: str | None) -> bytes:
    """The CONNECT head a client sends for `target` with a bearer `token`."""
    text = str(target)
    lines = [f"CONNECT {text} HTTP/1.1", f"Host: {text}"]
    if token is not None:
        if any(c in token for c in "\r\n"):
            raise ValueError("token contains a line break")
        lines.append(f"Proxy-Authorization: Bearer {token}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


class ConnectResponse(msgspec.Struct, frozen=True):
    status: int
    reason: str
    headers: tuple[tuple[str, str], ...]
    body: bytes = b""

    def header(self, name: str) -> str | None:
        lower = name.lower()
        for key, value in self.headers:
            if key.lower() == lower:
                return value
        return None

    @property
    def text(self) -> str:
        """The body as text, or the reason phrase when there is none."""
        body = self.body.decode("utf-8", "replace").strip()
        return body or self.reason


class ConnectResponseParser(_HeadBuffer):
    """Incremental parser of the proxy's answer (client side).

    A 2xx head completes the response; tunnel bytes that followed it stay in ``remainder``.
    Any other status waits for its ``Content-Length`` body (at most `MAX_BODY_SIZE`).
    """

    too_large_status = 502

    def __init__(self, max_head_size: int = DEFAULT_MAX_HEAD_SIZE) -> None:
        super().__init__(max_head_size)
        self.response: ConnectResponse | None = None
        self._head: ConnectResponse | None = None
        self._body_len = 0

    @property
    def wants_body(self) -> bool:
        return self._head is not None and self.response is None

    def feed(self, data: bytes) -> ConnectResponse | None:
        if self.response is not None:
            self.remainder += data
            return self.response
        if self._head is None:
            head = self._take_head(data)
            if head is None:
                return None
            self._head = self._parse(head)
            data, self.remainder = self.remainder, b""
            if 200 <= self._head.status < 300:
                self.remainder = data
                self.response = self._head
                return self.response
        self._buffer += data
        if len(self._buffer) >= self._body_len:
            body = bytes(self._buffer[: self._body_len])
            self.remainder = bytes(self._buffer[self._body_len :])
            self._buffer.clear()
            self.response = ConnectResponse(
                self._head.status, self._head.reason, self._head.headers, body
            )
        return self.response

    def _parse(self, head: bytes) -> ConnectResponse:
        lines = _head_lines(head)
        if not lines:
            raise ConnectProtocolError(502, "empty response head from the proxy")
        match = _STATUS_LINE_RE.fullmatch(lines[0])
        if match is None:
            raise ConnectProtocolError(502, f"malformed status line {lines[0][:80]!r}")
        headers = _parse_headers(lines[1:])
        status = int(match.group(1))
        response = ConnectResponse(status, match.group(2) or "", headers)
        length_text = response.header("content-length")
        if not 200 <= status < 300 and length_text is not None:
            if not _LENGTH_RE.fullmatch(length_text) or int(length_text) > MAX_BODY_SIZE:
                raise ConnectProtocolError(502, f"bad Content-Length {length_text[:20]!r}")
            self._body_len = int(length_text)
        return response
