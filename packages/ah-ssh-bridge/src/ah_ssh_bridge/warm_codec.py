"""The warm executor's frame codec: pure, sans-I/O, standard library only.

Shared, as one source, by the leader (``ah_ssh_bridge.warm`` imports it) and the follower,
where it is shipped inline with ``warm_server.py`` and runs on the follower's own ``python3``
(3.6 or later: annotations that use newer syntax are strings, never evaluated).

Wire format: the server first writes :data:`MAGIC` (anything the login shell printed before
the server started, e.g. a chatty profile, comes before it and is skipped), then both sides
exchange frames::

    kind: u8 | id: u32 big-endian | length: u32 big-endian | payload (length bytes)

``id`` names one command (0 is the server itself). Control payloads are UTF-8 JSON objects;
output and stdin payloads are raw bytes. A frame longer than :data:`MAX_PAYLOAD` or of an
unknown kind is garbage: the decoder raises :class:`FrameError` (and keeps raising it), it
never waits for more bytes that can only make things worse.
"""

# ruff: noqa: UP037  (quoted annotations keep this file importable on Python 3.6)

import json
import struct

MAGIC = b"\x00ah-warm-exec/1\n"
"""First bytes the server writes; the version is part of it."""

HEADER = struct.Struct(">BII")
MAX_PAYLOAD = 1 << 24
"""16 MiB: far above any chunk either side writes (64 KiB), far below a memory problem."""
MAX_PREAMBLE = 1 << 16
"""How much login-shell chatter may precede :data:`MAGIC` before the stream is garbage."""

# leader -> server
START = 1
"""Start command ``id``: JSON ``{"argv": [...]}`` or ``{"script": "...", "shell": "bash"}``,
plus optional ``"cwd"``, ``"env"`` (object), ``"pathPrepend"`` (list) and ``"stdin"`` (bool:
a pipe follows as STDIN frames; otherwise the command's stdin is ``/dev/null``)."""
STDIN = 2
"""Bytes for command ``id``'s stdin."""
STDIN_CLOSE = 3
"""End of command ``id``'s stdin."""
SIGNAL = 4
"""Stop command ``id``: JSON ``{"grace": seconds}``: SIGTERM to its process group now,
SIGKILL after ``grace`` if anything of the group is left."""

# server -> leader
HELLO = 16
"""id 0, JSON ``{"version": 1, "pid": n, "python": "3.x.y", "shell": "bash", "spawn":
"posix_spawn"}`` (``spawn``: how it starts commands, ``posix_spawn`` or ``popen``; for
diagnostics and tests, the leader needs none of it but the version)."""
STDOUT = 17
STDERR = 18
EXITED = 19
"""JSON ``{"code": n}`` or ``{"signal": n}``; sent after all of the command's output."""
ERROR = 20
"""UTF-8 message: command ``id`` could not be handled (or, with id 0, the server failed)."""
STALE = 21
"""Command ``id`` was not started: a login file changed since the server started (UTF-8
message naming it). The server takes no further commands and exits once its running ones
end; the leader starts a fresh server and sends the command there."""

KINDS = frozenset((START, STDIN, STDIN_CLOSE, SIGNAL, HELLO, STDOUT, STDERR, EXITED, ERROR, STALE))
KIND_NAMES = {
    START: "start",
    STDIN: "stdin",
    STDIN_CLOSE: "stdin-close",
    SIGNAL: "signal",
    HELLO: "hello",
    STDOUT: "stdout",
    STDERR: "stderr",
    EXITED: "exited",
    ERROR: "error",
    STALE: "stale",
}
MAX_ID = 0xFFFFFFFF


class FrameError(ValueError):
    """The byte stream is not a valid frame stream (the message says where and why)."""


class Frame:
    """One decoded frame."""

    __slots__ = ("id", "kind", "payload")

    def __init__(self, kind: int, id: int, payload: bytes) -> None:
        self.kind = kind
        self.id = id
        self.payload = payload

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Frame):
            return NotImplemented
        return (self.kind, self.id, self.payload) == (other.kind, other.id, other.payload)

    def __hash__(self) -> int:
        return hash((self.kind, self.id, self.payload))

    def __repr__(self) -> str:
        name = KIND_NAMES.get(self.kind, str(self.kind))
        return f"Frame({name}, id={self.id}, {len(self.payload)} bytes)"

    def json(self) -> "dict[str, object]":
        """The payload as a JSON object; :class:`FrameError` if it is not one."""
        try:
            value = json.loads(self.payload.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise FrameError(f"{self!r}: payload is not UTF-8 JSON: {exc}") from None
        if not isinstance(value, dict):
            raise FrameError(f"{self!r}: payload is not a JSON object")
        return value


def encode(kind: int, id: int, payload: bytes = b"") -> bytes:
    """One frame as bytes; ValueError for an unknown kind, a bad id or an oversized payload."""
    if kind not in KINDS:
        raise ValueError(f"unknown frame kind {kind}")
    if not 0 <= id <= MAX_ID:
        raise ValueError(f"frame id {id} is outside 0..{MAX_ID}")
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(
            f"frame payload of {len(payload)} bytes exceeds the limit of {MAX_PAYLOAD}"
        )
    return HEADER.pack(kind, id, len(payload)) + bytes(payload)


def encode_json(kind: int, id: int, value: "dict[str, object]") -> bytes:
    """A frame whose payload is ``value`` as compact JSON."""
    # ASCII JSON: lone surrogates (undecodable bytes in a file name) survive as JSON escapes.
    text = json.dumps(value, separators=(",", ":"))
    return encode(kind, id, text.encode("ascii"))


class Decoder:
    """Turns a byte stream into frames, fed in chunks of any size.

    With ``expect_magic`` the stream must first contain :data:`MAGIC`; bytes before it (at
    most :data:`MAX_PREAMBLE`) are returned by :meth:`preamble` and otherwise ignored.
    """

    def __init__(self, expect_magic: bool = False) -> None:
        self._buffer = bytearray()
        self._magic_seen = not expect_magic
        self._preamble = bytearray()
        self._error: "FrameError | None" = None

    @property
    def magic_seen(self) -> bool:
        return self._magic_seen

    @property
    def buffered(self) -> int:
        """Bytes received but not yet part of a whole frame."""
        return len(self._buffer)

    def preamble(self) -> bytes:
        """What came before :data:`MAGIC` (login-shell output), for error messages."""
        return bytes(self._preamble)

    def feed(self, data: bytes) -> "list[Frame]":
        """Every frame completed by ``data``, in order. Raises :class:`FrameError` on garbage
        (also on every later call: a broken stream stays broken)."""
        if self._error is not None:
            raise self._error
        self._buffer += data
        if not self._magic_seen:
            at = self._buffer.find(MAGIC)
            if at < 0:
                # Keep a possible start of MAGIC at the end; the rest is preamble.
                keep = len(MAGIC) - 1
                if len(self._buffer) > keep:
                    self._preamble += self._buffer[:-keep]
                    del self._buffer[:-keep]
                if len(self._preamble) > MAX_PREAMBLE:
                    self._error = FrameError(
                        f"no warm-executor greeting within the first {MAX_PREAMBLE} bytes (the login shell "
                        f"printed: {bytes(self._preamble[:200])!r})"
                    )
                    raise self._error
                return []
            self._preamble += self._buffer[:at]
            del self._buffer[: at + len(MAGIC)]
            self._magic_seen = True
        frames: "list[Frame]" = []
        buffer = self._buffer
        offset = 0
        size = HEADER.size
        while len(buffer) - offset >= size:
            kind, id, length = HEADER.unpack_from(buffer, offset)
            if kind not in KINDS:
                self._error = FrameError(
                    f"unknown frame kind {kind} (id {id}, length {length}) at stream offset +{offset}"
                )
                raise self._error
            if length > MAX_PAYLOAD:
                self._error = FrameError(
                    f"frame {KIND_NAMES[kind]} id {id} announces {length} payload bytes, more than the limit {MAX_PAYLOAD}"
                )
                raise self._error
            end = offset + size + length
            if len(buffer) < end:
                break
            frames.append(Frame(kind, id, bytes(buffer[offset + size : end])))
            offset = end
        if offset:
            del buffer[:offset]
        return frames
