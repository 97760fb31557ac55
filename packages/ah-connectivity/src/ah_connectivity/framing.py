"""Length-prefixed msgpack frames (sans-I/O).

A frame is a 4-byte big-endian payload length followed by that many bytes of msgpack
encoding one message of a msgspec type (normally the `ControlMessage` tagged union).
The decoder never buffers more than one header plus `max_frame_size` bytes: a header that
announces a bigger payload is refused before any of that payload is kept.
"""

from __future__ import annotations

import struct
from typing import Any, ClassVar, Generic, TypeVar

import msgspec

from ah_domain_types import StreamErrorCode

__all__ = [
    "DEFAULT_MAX_FRAME_SIZE",
    "HEADER_SIZE",
    "FrameDecoder",
    "FrameError",
    "FrameTooLarge",
    "MalformedFrame",
    "encode_frame",
]

HEADER_SIZE = 4
DEFAULT_MAX_FRAME_SIZE = 1 << 20
_HEADER = struct.Struct(">I")

T = TypeVar("T")

_encoder = msgspec.msgpack.Encoder()


class FrameError(Exception):
    """A frame that cannot be accepted; ``code`` is the `StreamErrorCode` to close the stream with.

    ``messages`` holds whatever complete messages were decoded before the bad frame in the
    same `FrameDecoder.feed` call, so the caller can still act on them.
    """

    code: ClassVar[StreamErrorCode]

    def __init__(self, message: str, messages: list[Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.messages: list[Any] = messages or []


class FrameTooLarge(FrameError):
    code = StreamErrorCode.FRAME_TOO_LARGE


class MalformedFrame(FrameError):
    code = StreamErrorCode.MALFORMED_FRAME


def encode_frame(msg: object, *, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE) -> bytes:
    """Encode one message as a frame; refuses (FrameTooLarge) what the peer would refuse."""
    payload = _encoder.encode(msg)
    if len(payload) > max_frame_size:
        raise FrameTooLarge(
            f"{type(msg).__name__} encodes to {len(payload)} bytes, over the {max_frame_size}-byte frame limit"
        )
    return _HEADER.pack(len(payload)) + payload


class FrameDecoder(Generic[T]):
    """Incremental frame decoder: feed bytes as they arrive, get whole messages back.

    After a `FrameError` the decoder is poisoned: the stream it serves is being closed, so
    every later `feed` raises the same error again instead of guessing at a resync point.
    """

    def __init__(self, type_: Any, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE) -> None:
        if max_frame_size <= 0:
            raise ValueError(f"max_frame_size must be positive, got {max_frame_size}")
        self._decoder: msgspec.msgpack.Decoder[Any] = msgspec.msgpack.Decoder(type_)
        self.max_frame_size = max_frame_size
        self._buffer = bytearray()
        self._expected: int | None = None  # payload length of the frame being read
        self._error: FrameError | None = None
        self.remainder = b""
        """Bytes left undecoded by the last `feed(..., limit=...)`."""

    @property
    def buffered(self) -> int:
        """Bytes held for an incomplete frame (never more than 4 + max_frame_size)."""
        return len(self._buffer)

    @property
    def failed(self) -> FrameError | None:
        return self._error

    def feed(self, data: bytes, *, limit: int | None = None) -> list[T]:
        """Decode every whole frame in `data` (plus what was buffered before).

        With `limit`, stop after that many messages: the bytes after the last decoded frame
        are not decoded but left in `remainder` (a tunnel stream switches to raw bytes right
        after its first frame).
        """
        if self._error is not None:
            raise self._error
        self.remainder = b""
        out: list[T] = []
        view = memoryview(data)
        pos = 0
        try:
            while True:
                if self._expected is None:
                    need = HEADER_SIZE - len(self._buffer)
                    take = view[pos : pos + need]
                    self._buffer += take
                    pos += len(take)
                    if len(self._buffer) < HEADER_SIZE:
                        break
                    (length,) = _HEADER.unpack(self._buffer)
                    self._buffer.clear()
                    if length > self.max_frame_size:
                        raise FrameTooLarge(
                            f"frame header announces {length} bytes, over the {self.max_frame_size}-byte limit"
                        )
                    self._expected = length
                need = self._expected - len(self._buffer)
                if not self._buffer and len(view) - pos >= need:
                    # The whole payload is in this chunk: decode without copying into the buffer.
                    payload: bytes | bytearray | memoryview = view[pos : pos + need]
                    pos += need
                else:
                    take = view[pos : pos + need]
                    self._buffer += take
                    pos += len(take)
                    if len(self._buffer) < self._expected:
                        break
                    payload = self._buffer
                self._expected = None
                out.append(self._decode(payload))
                self._buffer.clear()
                if limit is not None and len(out) >= limit:
                    self.remainder = bytes(view[pos:])
                    break
        except FrameError as exc:
            self._buffer.clear()
            self._expected = None
            exc.messages = out
            self._error = exc
            raise
        return out

    def _decode(self, payload: bytes | bytearray | memoryview) -> T:
        if len(payload) == 0:
            raise MalformedFrame("empty frame payload")
        try:
            msg: T = self._decoder.decode(payload)
        except msgspec.DecodeError as exc:
            raise MalformedFrame(
                f"undecodable frame payload ({len(payload)} bytes): {exc}"
            ) from exc
        except Exception as exc:
            # A Struct's own validation (__post_init__) may raise anything; to the stream it is
            # still just a bad frame.
            raise MalformedFrame(
                f"invalid frame payload ({len(payload)} bytes): {type(exc).__name__}: {exc}"
            ) from exc
        return msg
