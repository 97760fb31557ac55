"""Blocking byte pumps between two sockets (plain TCP, TLS, or a socketpair end).

One thread per direction: ``recv_into`` a large reusable buffer, ``sendall`` a memoryview of
it. The interpreter lock is released inside every ``recv``/``send`` and inside OpenSSL's
record encryption, so the two directions (and many tunnels) use several cores; per chunk the
Python work is a handful of calls. The alternative — asyncio streams with large reads — does
all TLS of all tunnels on the event-loop thread and measured slower (see the package README).

Closing semantics:

* EOF from one end → half-close (TCP FIN) towards the other, the other direction goes on;
  the splice ends when both directions are done, then both sockets are closed.
* A read or write error (reset, broken pipe) on either end, or `Splice.abort` → both ends are
  aborted: SO_LINGER 0 so the close sends a TCP RST, and the end's ``on_abort`` hook runs
  (e.g. it resets the QUIC stream behind a socketpair).

TLS ends are shut down at the TCP level (``socket.socket.shutdown`` on the raw descriptor):
`ssl.SSLSocket.shutdown` would discard the TLS state that the other direction still reads
with, and a close_notify exchange would need reading and writing from one thread. Peers read
the unannounced TCP EOF as EOF (``suppress_ragged_eofs``, the stdlib default); SSH inside
the tunnel has its own integrity check against truncation.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from loguru import logger

__all__ = [
    "DEFAULT_SPLICE_BUFFER",
    "Splice",
    "SpliceEnd",
    "SpliceStats",
]

DEFAULT_SPLICE_BUFFER = 256 * 1024

_log = logger.bind(component="ah-connectivity.splice")
_LINGER_RST = struct.pack("ii", 1, 0)
_ESCALATE_AFTER_S = 0.5

SpliceOutcome = Literal["eof", "reset", "aborted"]


@dataclass
class SpliceEnd:
    """One side of a splice."""

    sock: socket.socket
    """A connected blocking socket (``ssl.SSLSocket`` included)."""
    name: str = "peer"
    initial: bytes = b""
    """Bytes already read from this end (e.g. after a protocol head): sent on first."""
    eof_means_reset: threading.Event | None = None
    """Set by whoever feeds this socket when its EOF stands for a reset (a socketpair end
    in front of a QUIC stream that was reset)."""
    on_abort: Callable[[], None] | None = None
    """Called once (from a splice thread) when the splice aborts this end."""


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


def _raw_shutdown(sock: socket.socket, how: int) -> None:
    # socket.socket.shutdown on an SSLSocket: the descriptor only, the TLS state stays.
    with contextlib.suppress(OSError):
        socket.socket.shutdown(sock, how)


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

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def run(self) -> SpliceStats:
        """Pump in this thread and one helper thread; close both sockets; return the stats."""
        helper = threading.Thread(
            target=self._pump_guarded,
            args=(self.a, self.b, "a_to_b"),
            name=f"splice {self.a.name}->{self.b.name}",
            daemon=True,
        )
        helper.start()
        try:
            self._pump_guarded(self.b, self.a, "b_to_a")
            helper.join()
        finally:
            self._close()
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
        """Reset both ends now (thread-safe; no-op once aborted)."""
        with self._lock:
            if self._aborted:
                return
            self._aborted = True
            if self.stats.outcome == "eof":
                self.stats.outcome = "aborted" if reason == "aborted" else "reset"
            self.stats.reason = reason
        for end in (self.a, self.b):
            with contextlib.suppress(OSError):
                end.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
            # Wake a thread blocked in recv on it (close() alone would not). SHUT_RD sends
            # nothing, so the peer's first news is the RST of the final close.
            _raw_shutdown(end.sock, socket.SHUT_RD)
            if end.on_abort is not None:
                try:
                    end.on_abort()
                except Exception:
                    _log.exception("on_abort hook of {} failed", end.name)
        # A thread blocked in sendall (its peer not reading) only wakes on SHUT_WR, which
        # sends a FIN first: do that only if the splice has not wound down shortly.
        timer = threading.Timer(_ESCALATE_AFTER_S, self._escalate)
        timer.daemon = True
        timer.start()

    def _escalate(self) -> None:
        if self._done.is_set():
            return
        for end in (self.a, self.b):
            _raw_shutdown(end.sock, socket.SHUT_RDWR)

    def _pump_guarded(self, src: SpliceEnd, dst: SpliceEnd, counter: str) -> None:
        try:
            self._pump(src, dst, counter)
        except (OSError, ssl.SSLError, ValueError) as exc:
            # ValueError: the other direction closed the socket object under us.
            if not self._aborted:
                self.abort(f"{src.name}->{dst.name}: {type(exc).__name__}: {exc}")
        except BaseException as exc:
            self.abort(f"{src.name}->{dst.name}: {type(exc).__name__}: {exc}")
            raise

    def _pump(self, src: SpliceEnd, dst: SpliceEnd, counter: str) -> None:
        size = self.buffer_size
        buffer = bytearray(size)
        view = memoryview(buffer)
        recv_into = src.sock.recv_into
        sendall = dst.sock.sendall
        total = 0
        if src.initial:
            sendall(src.initial)
            total += len(src.initial)
            src.initial = b""
        try:
            while True:
                n = recv_into(buffer, size)
                if not n:
                    break
                sendall(view[:n])
                total += n
        finally:
            setattr(self.stats, counter, getattr(self.stats, counter) + total)
        if src.eof_means_reset is not None and src.eof_means_reset.is_set():
            self.abort(f"{src.name} was reset")
            return
        if not self._aborted:
            _raw_shutdown(dst.sock, socket.SHUT_WR)

    def _close(self) -> None:
        for end in (self.a, self.b):
            with contextlib.suppress(OSError):
                end.sock.close()
        self.stats.ended = time.monotonic()
        self._done.set()
