"""Byte pumps between two ends: sockets, TLS sockets, or a pair of pipe descriptors.

One thread per splice runs a non-blocking loop over both directions (`selectors`). Per
direction it reads as much as is there into a reusable buffer (256 KB by default), then
writes it out; only when neither direction can move does it wait for readiness. TLS ends
are `ah_connectivity.tls_socket.TlsSocket`\\ s driven through their memory BIOs: one
``recv`` brings in up to 256 KB of ciphertext (many records), the records are decrypted into
the buffer, and what the other side's `SSLObject` encrypts leaves in one ``send``. So the
per-byte cost is the cipher and a few large system calls; the per-chunk Python work is a
handful of calls, with the interpreter lock released inside each system call and inside
OpenSSL. A `TlsSocket`'s TLS state is only ever touched by the splice thread: nothing reads
and writes one OpenSSL object from two threads (which `ssl.SSLSocket` would do under two
blocking pump threads).

Closing semantics:

* EOF from one end → once everything read before it was delivered, a half-close (TCP FIN,
  or closing the write descriptor of a pipe end) towards the other; the other direction
  goes on. The splice ends when both directions are done — or, for an end marked
  ``eof_ends_splice``, as soon as that end's EOF was delivered — then both ends are closed.
* A read or write error (reset, broken pipe, a bad TLS record) on either end, or
  `Splice.abort` → both ends are aborted: SO_LINGER 0 so the close sends a TCP RST, and
  the end's ``on_abort`` hook runs (e.g. it resets the QUIC stream behind a socketpair).

TLS ends half-close at the TCP level with no close_notify; peers read the unannounced TCP EOF
as EOF (``OP_IGNORE_UNEXPECTED_EOF``, see `ah_connectivity.tls`); SSH inside the tunnel has
its own integrity check against truncation.
"""

from __future__ import annotations

import contextlib
import os
import select
import selectors
import socket
import ssl
import struct
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, Protocol, cast

from loguru import logger

from ah_connectivity.tls_socket import RAW_READ_SIZE, TlsSocket

__all__ = [
    "DEFAULT_SPLICE_BUFFER",
    "Splice",
    "SpliceEnd",
    "SpliceStats",
]

DEFAULT_SPLICE_BUFFER = 256 * 1024

_log = logger.bind(component="ah-connectivity.splice")
_LINGER_RST = struct.pack("ii", 1, 0)
_HIGH_WATER = 1024 * 1024
"""Stop reading a direction's source while this much is queued for its destination."""

SpliceOutcome = Literal["eof", "reset", "aborted"]
_WOULD_BLOCK = -1
_IN = select.POLLIN if hasattr(select, "POLLIN") else 1
_OUT = select.POLLOUT if hasattr(select, "POLLOUT") else 4
_READY_IN = _IN | getattr(select, "POLLHUP", 0) | getattr(select, "POLLERR", 0)
"""Poll bits after which a read will not block: data, EOF, or the error it reports."""
_READY_OUT = _OUT | getattr(select, "POLLHUP", 0) | getattr(select, "POLLERR", 0)


@dataclass
class SpliceEnd:
    """One side of a splice: a connected socket, or a pair of pipe descriptors."""

    sock: socket.socket | None
    """A connected socket (a `TlsSocket` is driven through its BIOs); None for `fds`.
    An `ssl.SSLSocket` is not accepted: use `ah_connectivity.tls_socket.wrap_tls`."""
    name: str = "peer"
    initial: bytes = b""
    """Bytes already read from this end (e.g. after a protocol head): sent on first."""
    eof_means_reset: threading.Event | None = None
    """Set by whoever feeds this socket when its EOF stands for a reset (a socketpair end
    in front of a QUIC stream that was reset)."""
    on_abort: Callable[[], None] | None = None
    """Called once when the splice aborts this end."""
    fds: tuple[int, int] | None = None
    """``(read_fd, write_fd)`` instead of a socket (a ProxyCommand's stdin and stdout)."""
    eof_ends_splice: bool = False
    """End the whole splice once this end's EOF was delivered to the other (a ProxyCommand
    is done when its server side is, whether or not ssh closed its stdin)."""
    close_fds: bool = True
    """Close `fds` when the splice ends (else only the write side at EOF)."""

    def __post_init__(self) -> None:
        if (self.sock is None) == (self.fds is None):
            raise ValueError("a SpliceEnd needs exactly one of sock and fds")
        if isinstance(self.sock, ssl.SSLSocket):
            raise TypeError(
                f"{self.name}: splice TLS through ah_connectivity.tls_socket.TlsSocket, "
                "not ssl.SSLSocket (its OpenSSL object cannot be read and written safely "
                "from the splice)"
            )


@dataclass
class SpliceStats:
    a_to_b: int = 0
    b_to_a: int = 0
    started: float = field(default_factory=time.monotonic)
    ended: float | None = None
    outcome: SpliceOutcome = "eof"
    reason: str = ""

    @property
    def duration_s(self) -> float:
        return (self.ended or time.monotonic()) - self.started


# ------------------------------------------------------------------------------ ends' I/O


class _Io:
    """Non-blocking I/O of one end. ``pull`` returns bytes read, 0 at EOF, or
    `_WOULD_BLOCK`; ``push`` queues bytes and sends what the kernel takes."""

    def __init__(self, end: SpliceEnd) -> None:
        self.end = end
        self.tx: deque[memoryview] = deque()
        self.tx_bytes = 0
        self.read_fd = -1
        self.write_fd = -1
        self.write_closed = False
        self.readable = True
        """Not known to have nothing to read (cleared when a read would block, set again
        when the selector reports the descriptor readable): saves futile system calls."""
        self.writable = True
        self.buffered = False
        """Input already received but not yet pulled (so readiness will not report it): a
        TLS end whose last pull filled the caller's buffer may have more decrypted."""

    def pull(self, view: memoryview, size: int) -> int:
        raise NotImplementedError

    def _send(self, view: memoryview) -> int:
        raise NotImplementedError

    def push(self, view: memoryview) -> None:
        if not self.tx and self.writable:
            try:
                sent = self._send(view)
            except (BlockingIOError, InterruptedError):
                sent = 0
            if sent == len(view):
                return
            self.writable = False
            view = view[sent:]
        self.tx.append(memoryview(bytes(view)))  # the caller reuses its buffer
        self.tx_bytes += len(view)

    def flush(self) -> bool:
        """Send queued bytes; whether any left."""
        tx = self.tx
        moved = False
        while tx:
            head = tx[0]
            try:
                sent = self._send(head)
            except (BlockingIOError, InterruptedError):
                self.writable = False
                break
            moved = True
            self.tx_bytes -= sent
            if sent == len(head):
                tx.popleft()
            else:
                tx[0] = head[sent:]
                self.writable = False
                break
        return moved

    def shutdown_write(self) -> None:
        raise NotImplementedError

    def close(self, abort: bool) -> None:
        raise NotImplementedError


class _SocketIo(_Io):
    def __init__(self, end: SpliceEnd, sock: socket.socket) -> None:
        super().__init__(end)
        self.sock = sock
        sock.setblocking(False)
        self.read_fd = self.write_fd = sock.fileno()
        self._recv_into: Callable[[memoryview, int], int] = socket.socket.recv_into.__get__(sock)
        self._send_raw: Callable[[memoryview | bytes], int] = socket.socket.send.__get__(sock)

    def pull(self, view: memoryview, size: int) -> int:
        try:
            n = self._recv_into(view, size)
        except (BlockingIOError, InterruptedError):
            return _WOULD_BLOCK
        if n < size:
            # Drained (most likely): wait for readiness rather than spend a system call —
            # each one also gives the interpreter lock away.
            self.readable = False
        return n

    def _send(self, view: memoryview) -> int:
        return self._send_raw(view)

    def shutdown_write(self) -> None:
        with contextlib.suppress(OSError):
            socket.socket.shutdown(self.sock, socket.SHUT_WR)
        self.write_closed = True

    def close(self, abort: bool) -> None:
        if abort:
            with contextlib.suppress(OSError):
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
        with contextlib.suppress(OSError):
            self.sock.close()


class _TlsIo(_SocketIo):
    def __init__(self, end: SpliceEnd, sock: TlsSocket) -> None:
        super().__init__(end, sock)
        parts = sock.tls_parts
        self.sslobj = parts.sslobj
        self.incoming = parts.incoming
        self.outgoing = parts.outgoing
        self.raw = bytearray(RAW_READ_SIZE)
        self.raw_view = memoryview(self.raw)
        self.raw_eof = False
        self.tls_eof = False
        self._read = cast(Callable[[int, memoryview], int], self.sslobj.read)
        if self.outgoing.pending:
            self._queue_outgoing()

    def _queue_outgoing(self) -> None:
        data = self.outgoing.read()
        self.tx.append(memoryview(data))
        self.tx_bytes += len(data)

    def pull(self, view: memoryview, size: int) -> int:
        if self.tls_eof:
            self.buffered = False
            return 0
        incoming = self.incoming
        if self.readable and not self.raw_eof and incoming.pending < RAW_READ_SIZE:
            try:
                k = self._recv_into(self.raw_view, RAW_READ_SIZE)
            except (BlockingIOError, InterruptedError):
                k = _WOULD_BLOCK
            if k < RAW_READ_SIZE:
                self.readable = False
            if k > 0:
                incoming.write(self.raw_view[:k])
            elif k == 0:
                self.raw_eof = True
                incoming.write_eof()
        read = self._read
        total = 0
        while total < size:
            try:
                n = read(size - total, view[total:])
            except ssl.SSLWantReadError:
                if self.raw_eof:  # nothing more will come (a truncated record): EOF
                    self.tls_eof = True
                break
            if n == 0:
                self.tls_eof = True
                break
            total += n
            if not incoming.pending and not self.raw_eof:
                # All ciphertext consumed (the record may have been read only in part: the
                # caller's buffer is full then, and `buffered` brings us back). Another read
                # would only say "want read" — and hand the interpreter lock away.
                break
        self.buffered = total == size
        if self.outgoing.pending:  # alerts, key-update answers
            self._queue_outgoing()
        if total:
            return total
        return 0 if self.tls_eof else _WOULD_BLOCK

    def push(self, view: memoryview) -> None:
        write = self.sslobj.write
        written = 0
        while written < len(view):
            written += write(view[written:])
        data = self.outgoing.read()
        if not self.tx and self.writable:
            try:
                sent = self._send_raw(data)
            except (BlockingIOError, InterruptedError):
                sent = 0
            if sent == len(data):
                return
            self.writable = False
            self.tx.append(memoryview(data)[sent:])
            self.tx_bytes += len(data) - sent
        else:
            self.tx.append(memoryview(data))
            self.tx_bytes += len(data)


class _PipeIo(_Io):
    def __init__(self, end: SpliceEnd, read_fd: int, write_fd: int) -> None:
        super().__init__(end)
        self.read_fd = read_fd
        self.write_fd = write_fd
        self._blocking = {fd: os.get_blocking(fd) for fd in {read_fd, write_fd}}
        for fd in self._blocking:
            os.set_blocking(fd, False)

    def pull(self, view: memoryview, size: int) -> int:
        try:
            n = os.readv(self.read_fd, [view[:size]])
        except (BlockingIOError, InterruptedError):
            return _WOULD_BLOCK
        if n < size:
            self.readable = False
        return n

    def _send(self, view: memoryview) -> int:
        return os.write(self.write_fd, view)

    def _restore(self, fd: int) -> None:
        with contextlib.suppress(OSError):
            os.set_blocking(fd, self._blocking[fd])

    def shutdown_write(self) -> None:
        if not self.write_closed:
            self.write_closed = True
            self._restore(self.write_fd)
            with contextlib.suppress(OSError):
                os.close(self.write_fd)

    def close(self, abort: bool) -> None:
        for fd in self._blocking:
            if fd == self.write_fd and self.write_closed:
                continue
            self._restore(fd)
            if self.end.close_fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.write_closed = True


def _io_for(end: SpliceEnd) -> _Io:
    if end.fds is not None:
        return _PipeIo(end, *end.fds)
    assert end.sock is not None
    if isinstance(end.sock, TlsSocket):
        return _TlsIo(end, end.sock)
    return _SocketIo(end, end.sock)


class _Direction:
    def __init__(self, src: _Io, dst: _Io, size: int, counter: str) -> None:
        self.src = src
        self.dst = dst
        self.size = size
        self.buffer = bytearray(size)
        self.view = memoryview(self.buffer)
        self.counter = counter
        self.total = 0
        self.eof = False
        self.done = False

    def step(self) -> bool:
        """Move what can move without blocking; whether anything did."""
        progressed = False
        src, dst = self.src, self.dst
        if not self.eof and dst.tx_bytes < _HIGH_WATER and (src.readable or src.buffered):
            n = src.pull(self.view, self.size)
            if n == _WOULD_BLOCK:
                src.readable = False
            elif n > 0:
                dst.push(self.view[:n])
                self.total += n
                progressed = True
            elif n == 0:
                self.eof = True
                progressed = True
        if self.eof and not self.done and not dst.tx:
            self.done = True
            progressed = True
        return progressed


# ------------------------------------------------------------------------------ readiness


class _Poller(Protocol):
    """The part of `select.poll` the loop uses (its event bits: `_IN`, `_OUT`)."""

    def register(self, fd: int, eventmask: int, /) -> None: ...
    def modify(self, fd: int, eventmask: int, /) -> None: ...
    def unregister(self, fd: int, /) -> None: ...
    def poll(self) -> list[tuple[int, int]]: ...
    def close(self) -> None: ...


class _PollPoller:
    """`select.poll` (Linux): a handful of descriptors, no system call to change interest,
    results as plain ``(fd, events)`` tuples."""

    def __init__(self) -> None:
        poll = select.poll()
        self.register = poll.register
        self.modify = poll.modify
        self.unregister = poll.unregister
        self.poll = poll.poll

    def close(self) -> None:
        pass


class _SelectorPoller:
    """`selectors.DefaultSelector` behind the same interface (kqueue on macOS, select on
    Windows), with its events translated to poll bits."""

    def __init__(self) -> None:
        self._selector = selectors.DefaultSelector()

    @staticmethod
    def _events(eventmask: int) -> int:
        return (selectors.EVENT_READ if eventmask & _IN else 0) | (
            selectors.EVENT_WRITE if eventmask & _OUT else 0
        )

    def register(self, fd: int, eventmask: int, /) -> None:
        self._selector.register(fd, self._events(eventmask))

    def modify(self, fd: int, eventmask: int, /) -> None:
        self._selector.modify(fd, self._events(eventmask))

    def unregister(self, fd: int, /) -> None:
        self._selector.unregister(fd)

    def poll(self) -> list[tuple[int, int]]:
        return [
            (
                key.fd,
                (_IN if events & selectors.EVENT_READ else 0)
                | (_OUT if events & selectors.EVENT_WRITE else 0),
            )
            for key, events in self._selector.select()
        ]

    def close(self) -> None:
        self._selector.close()


def _poller() -> _Poller:
    return _PollPoller() if sys.platform == "linux" else _SelectorPoller()


def _describe(doing: _Io | _Direction | None) -> str:
    if isinstance(doing, _Io):
        return f"writing to {doing.end.name}"
    if isinstance(doing, _Direction):
        return f"{doing.src.end.name} -> {doing.dst.end.name}"
    return "waiting"


# ------------------------------------------------------------------------------ the splice


class Splice:
    """Pump bytes between `a` and `b` until both directions end (see the module doc)."""

    def __init__(
        self, a: SpliceEnd, b: SpliceEnd, *, buffer_size: int = DEFAULT_SPLICE_BUFFER
    ) -> None:
        self.a = a
        self.b = b
        self.buffer_size = buffer_size
        self.stats = SpliceStats()
        self._lock = threading.Lock()
        self._aborted = False
        self._done = threading.Event()
        self._thread: threading.Thread | None = None
        self._wakeup_r, self._wakeup_w = socket.socketpair()
        self._wakeup_r.setblocking(False)
        self._wakeup_w.setblocking(False)

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def run(self) -> SpliceStats:
        """Pump in this thread; close both ends; return the stats."""
        ios: list[_Io] = []
        try:
            for end in (self.a, self.b):
                ios.append(_io_for(end))
            self._loop(ios[0], ios[1])
        except Exception as exc:
            self.abort(f"{type(exc).__name__}: {exc}")
        except BaseException as exc:
            self.abort(f"{type(exc).__name__}: {exc}")
            raise
        finally:
            self._close(ios)
        return self.stats

    def start(self, on_done: Callable[[SpliceStats], None] | None = None) -> None:
        """`run` in a background thread; `on_done(stats)` is called from it at the end."""

        def main() -> None:
            stats = self.run()
            if on_done is not None:
                try:
                    on_done(stats)
                except Exception:
                    _log.exception("splice completion callback failed")

        self._thread = threading.Thread(
            target=main, name=f"splice {self.a.name}<->{self.b.name}", daemon=True
        )
        self._thread.start()

    def wait(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)

    def abort(self, reason: str = "aborted") -> None:
        """Reset both ends (thread-safe; no-op once aborted). The splice thread closes them
        with a TCP RST; the ends' ``on_abort`` hooks run here and now."""
        with self._lock:
            if self._aborted:
                return
            self._aborted = True
            if self.stats.outcome == "eof":
                self.stats.outcome = "aborted" if reason == "aborted" else "reset"
            self.stats.reason = reason
        for end in (self.a, self.b):
            if end.sock is not None:
                with contextlib.suppress(OSError):
                    end.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
            if end.on_abort is not None:
                try:
                    end.on_abort()
                except Exception:
                    _log.exception("on_abort hook of {} failed", end.name)
        with contextlib.suppress(OSError):
            self._wakeup_w.send(b"x")

    # -- the loop -----------------------------------------------------------------------

    def _loop(self, a: _Io, b: _Io) -> None:
        for io, end in ((a, self.a), (b, self.b)):
            if end.initial:
                # Bytes read from `end` before the splice go to the other side first.
                other = b if io is a else a
                other.push(memoryview(end.initial))
                setattr(self.stats, "a_to_b" if io is a else "b_to_a", len(end.initial))
                end.initial = b""
        ab = _Direction(a, b, self.buffer_size, "a_to_b")
        ba = _Direction(b, a, self.buffer_size, "b_to_a")
        directions = (ab, ba)
        ios = (a, b)
        poller = _poller()
        wakeup = self._wakeup_r.fileno()
        poller.register(wakeup, _IN)
        registered: dict[int, int] = {}
        # What the loop is at, named if it fails. An object, not a message: this loop runs
        # once or twice per packet a tunnel carries, and formatting costs more than moving.
        doing: _Io | _Direction | None = None
        try:
            while not self._aborted:
                progressed = False
                for io in ios:
                    if io.tx and io.writable:
                        doing = io
                        if io.flush():
                            progressed = True
                for d in directions:
                    if d.done:
                        continue
                    doing = d
                    if d.step():
                        progressed = True
                    if d.done:
                        if d.dst.write_fd in registered:
                            poller.unregister(d.dst.write_fd)
                            del registered[d.dst.write_fd]
                        self._finish_direction(d)
                        if self._aborted or d.src.end.eof_ends_splice:
                            return
                if ab.done and ba.done:
                    return
                doing = None
                if progressed:
                    continue
                # Nothing moved: wait for readiness of what can move next.
                wanted: dict[int, int] = {}
                more_buffered = False
                for d in directions:
                    if not d.done and not d.eof and d.dst.tx_bytes < _HIGH_WATER:
                        more_buffered = more_buffered or d.src.buffered
                        fd = d.src.read_fd
                        wanted[fd] = wanted.get(fd, 0) | _IN
                if more_buffered:
                    continue
                for io in ios:
                    if io.tx:
                        fd = io.write_fd
                        wanted[fd] = wanted.get(fd, 0) | _OUT
                if wanted != registered:
                    self._reregister(poller, registered, wanted)
                for fd, events in poller.poll():
                    if fd == wakeup:
                        with contextlib.suppress(OSError):
                            self._wakeup_r.recv(64)
                        continue
                    for io in ios:
                        if events & _READY_IN and io.read_fd == fd:
                            io.readable = True
                        if events & _READY_OUT and io.write_fd == fd:
                            io.writable = True
        except (OSError, ssl.SSLError) as exc:
            self.abort(f"{_describe(doing)}: {type(exc).__name__}: {exc}")
        finally:
            poller.close()
            for d in directions:
                setattr(self.stats, d.counter, getattr(self.stats, d.counter) + d.total)

    @staticmethod
    def _reregister(poller: _Poller, registered: dict[int, int], wanted: dict[int, int]) -> None:
        for fd in list(registered):
            if fd not in wanted:
                poller.unregister(fd)
                del registered[fd]
        for fd, events in wanted.items():
            current = registered.get(fd)
            if current is None:
                poller.register(fd, events)
            elif current != events:
                poller.modify(fd, events)
            registered[fd] = events

    def _finish_direction(self, d: _Direction) -> None:
        reset = d.src.end.eof_means_reset
        if reset is not None and reset.is_set():
            self.abort(f"{d.src.end.name} was reset")
            return
        d.dst.shutdown_write()

    def _close(self, ios: list[_Io]) -> None:
        aborted = self._aborted
        for io in ios:
            io.close(abort=aborted)
        for end in (self.a, self.b):
            # Ends whose I/O never started (the failure came first).
            if end.sock is not None and all(io.end is not end for io in ios):
                with contextlib.suppress(OSError):
                    end.sock.close()
        for sock in (self._wakeup_r, self._wakeup_w):
            sock.close()
        self.stats.ended = time.monotonic()
        self._done.set()
