"""A server-sent events parser (sans-I/O), per the HTML living standard's event-stream rules.

Feed it bytes as they arrive, in chunks of any size; it returns each complete message
(dispatched on a blank line). Lines end with CRLF, LF or CR; a leading BOM is dropped;
``:`` lines are comments (counted, for keep-alives); ``id`` with a NUL is ignored; ``retry``
takes digits only; a message without ``data`` is not dispatched, but its ``id`` still becomes
the last event id.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["SseMessage", "SseParser"]


@dataclass(frozen=True)
class SseMessage:
    event: str
    """``message`` when the stream named no type."""
    data: str
    id: str | None
    """The last event id in effect when this message was dispatched."""


class SseParser:
    def __init__(self) -> None:
        self._buffer = bytearray()
        self._pending_cr = False
        self._started = False
        self._event = ""
        self._data: list[str] = []
        self.last_event_id: str | None = None
        self.retry_ms: int | None = None
        self.comments = 0
        """Comment lines seen (keep-alives)."""

    def feed(self, chunk: bytes) -> list[SseMessage]:
        out: list[SseMessage] = []
        data = bytes(chunk)
        if self._pending_cr:
            # A CR ended the last chunk: an LF right after it belongs to the same line end.
            self._pending_cr = False
            if data.startswith(b"\n"):
                data = data[1:]
        buffer = self._buffer
        buffer += data
        start = 0
        length = len(buffer)
        while start < length:
            cr = buffer.find(b"\r", start)
            lf = buffer.find(b"\n", start)
            if cr == -1 and lf == -1:
                break
            if cr == -1 or (lf != -1 and lf < cr):
                end, after = lf, lf + 1
            elif cr + 1 < length:
                end, after = cr, cr + 2 if buffer[cr + 1 : cr + 2] == b"\n" else cr + 1
            else:
                end, after = cr, cr + 1
                self._pending_cr = True
            self._line(bytes(buffer[start:end]).decode("utf-8", errors="replace"), out)
            start = after
        del buffer[:start]
        return out

    def _line(self, line: str, out: list[SseMessage]) -> None:
        if not self._started:
            self._started = True
            line = line.removeprefix("\ufeff")
        if line == "":
            if self._data:
                out.append(
                    SseMessage(self._event or "message", "\n".join(self._data), self.last_event_id)
                )
            self._event, self._data = "", []
            return
        if line.startswith(":"):
            self.comments += 1
            return
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if name == "event":
            self._event = value
        elif name == "data":
            self._data.append(value)
        elif name == "id":
            if "\0" not in value:
                self.last_event_id = value
        elif name == "retry" and value.isascii() and value.isdigit():
            self.retry_ms = int(value)
