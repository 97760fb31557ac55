"""Turn a byte stream into text lines (pure, no I/O)."""

from __future__ import annotations

import codecs

__all__ = ["DEFAULT_MAX_LINE_CHARS", "LineSplitter"]

DEFAULT_MAX_LINE_CHARS = 1 << 20
"""A line longer than this is handed out in pieces, so binary output cannot exhaust memory."""


_utf8_decoder = codecs.getincrementaldecoder("utf-8")


class LineSplitter:
    """Incremental UTF-8 decoder and line splitter.

    Bytes go in, complete lines come out without their terminator (``\\n``, or ``\\r\\n``).
    A multi-byte character split across chunks is decoded whole; invalid bytes become U+FFFD.
    :meth:`finish` returns the final partial line (if any) at end of stream.
    """

    def __init__(self, max_line_chars: int = DEFAULT_MAX_LINE_CHARS) -> None:
        if max_line_chars < 1:
            raise ValueError(f"max_line_chars must be >= 1, got {max_line_chars}")
        self.max_line_chars = max_line_chars
        self._decoder: codecs.IncrementalDecoder | None = None
        """Made on the first bytes (most commands of a fan-out print nothing at all)."""
        self._pending: list[str] = []
        self._pending_chars = 0
        self._finished = False

    def feed(self, data: bytes) -> list[str]:
        if self._finished:
            raise ValueError("LineSplitter.feed after finish")
        if self._decoder is None:
            self._decoder = _utf8_decoder(errors="replace")
        return self._split(self._decoder.decode(data))

    def finish(self) -> list[str]:
        """Flush the decoder and return the last, unterminated line (if there is one)."""
        if self._finished:
            return []
        self._finished = True
        lines = (
            self._split(self._decoder.decode(b"", final=True)) if self._decoder is not None else []
        )
        if self._pending_chars:
            lines.append(self._take_pending(""))
        return lines

    def _split(self, text: str) -> list[str]:
        if not text:
            return []
        lines: list[str] = []
        pieces = text.split("\n")
        limit = self.max_line_chars
        for complete in pieces[:-1]:
            line = self._take_pending(complete)
            if line.endswith("\r"):
                line = line[:-1]
            if len(line) <= limit:
                lines.append(line)
            else:
                lines.extend(line[i : i + limit] for i in range(0, len(line), limit))
        tail = pieces[-1]
        if tail:
            self._pending.append(tail)
            self._pending_chars += len(tail)
            while self._pending_chars > self.max_line_chars:
                joined = "".join(self._pending)
                lines.append(joined[: self.max_line_chars])
                rest = joined[self.max_line_chars :]
                self._pending = [rest] if rest else []
                self._pending_chars = len(rest)
        return lines

    def _take_pending(self, end: str) -> str:
        if not self._pending:
            return end
        self._pending.append(end)
        line = "".join(self._pending)
        self._pending = []
        self._pending_chars = 0
        return line
