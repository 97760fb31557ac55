"""TLS over a TCP socket through memory BIOs: `TlsSocket`.

`ssl.SSLSocket` lets OpenSSL read the socket itself: one ``SSL_read`` is two ``recv``
system calls (record header, then body) for at most one 16 KB record, and one ``SSL_write``
record is one ``send``. For bulk tunnels those calls, not the cipher, were most of the cost.
A `TlsSocket` keeps the TLS state in an `ssl.SSLObject` between two `ssl.MemoryBIO`\\ s
and does the socket I/O itself: one ``recv`` of up to 256 KB feeds many records, and many
records leave in one ``send``. `ah_connectivity.splice` drives those pieces directly
(non-blocking, one thread per splice: see `TlsSocket.tls_parts`).

For everything else it is a blocking socket like `ssl.SSLSocket`: ``recv``/``recv_into``/
``send``/``sendall`` carry plaintext, ``getpeercert``/``version``/``cipher`` describe the
session, and the plain ``socket.socket`` methods (``settimeout``, ``setsockopt``,
``shutdown``, ``close``, ``fileno``) act on the TCP socket — ``shutdown(SHUT_WR)`` is a bare
TCP half-close (no close_notify; peers use ``OP_IGNORE_UNEXPECTED_EOF``, see
`ah_connectivity.tls`).

Thread safety: one thread may read while another writes (paramiko does). Every call into the
`SSLObject` holds one lock, and no socket I/O happens under it, so OpenSSL's state is only
ever used by one thread at a time — unlike a shared `ssl.SSLSocket`, whose reads and writes
run concurrently inside OpenSSL. Writes hold a second lock from encryption to the last byte
sent, so records leave in the order they were made. Two threads reading at once (or writing
at once) get the interleaving a plain socket would give them.
"""

from __future__ import annotations

import socket
import ssl
import threading
from typing import Any, cast

# Buffers (bytes-like objects): typeshed's ReadableBuffer/WriteableBuffer are not importable.
ReadableBuffer = Any
WriteableBuffer = Any

__all__ = ["RAW_READ_SIZE", "TlsParts", "TlsSocket", "wrap_tls"]

RAW_READ_SIZE = 256 * 1024
"""Ciphertext read per ``recv`` (many records)."""


class TlsParts:
    """What the splice needs to run a `TlsSocket` non-blocking from one thread."""

    __slots__ = ("incoming", "outgoing", "sslobj")

    def __init__(self, sslobj: ssl.SSLObject, incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO):
        self.sslobj = sslobj
        self.incoming = incoming
        self.outgoing = outgoing


class TlsSocket(socket.socket):
    """A TCP socket carrying TLS through memory BIOs (see the module doc).

    Build one with `wrap_tls`; the handshake is done when it returns.
    """

    _parts: TlsParts
    _ssl_lock: threading.Lock
    _send_lock: threading.Lock
    _raw_eof: bool

    # -- construction ---------------------------------------------------------------------

    @classmethod
    def _adopt(cls, raw: socket.socket) -> TlsSocket:
        timeout = raw.gettimeout()
        sock = cls(raw.family, raw.type, raw.proto, fileno=raw.detach())
        sock.settimeout(timeout)
        return sock

    def _init_tls(
        self, context: ssl.SSLContext, *, server_side: bool, server_hostname: str | None
    ) -> None:
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        sslobj = context.wrap_bio(
            incoming, outgoing, server_side=server_side, server_hostname=server_hostname
        )
        self._parts = TlsParts(sslobj, incoming, outgoing)
        self._ssl_lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._raw_eof = False

    # -- TLS plumbing ---------------------------------------------------------------------

    @property
    def tls_parts(self) -> TlsParts:
        """The `SSLObject` and its BIOs, for a caller that takes over ALL I/O of this socket
        from one thread (the splice): it must read ciphertext into ``incoming``, send what
        appears in ``outgoing``, and never use the blocking methods again."""
        return self._parts

    def _fill(self) -> None:
        """Read ciphertext from the socket (blocking, honours the timeout) into the BIO."""
        if self._raw_eof:
            return
        data = socket.socket.recv(self, RAW_READ_SIZE)
        with self._ssl_lock:
            if data:
                self._parts.incoming.write(data)
            else:
                self._raw_eof = True
                self._parts.incoming.write_eof()

    def _send_ciphertext(self, data: bytes) -> None:
        """Send all of `data` (caller holds _send_lock). Records already made must all leave,
        or the stream is broken: a socket timeout here (paramiko sets 0.1 s on its socket)
        only means "not yet", so keep going; real errors propagate."""
        view = memoryview(data)
        while view:
            try:
                sent = socket.socket.send(self, view)
            except TimeoutError:
                continue
            view = view[sent:]

    def _take_outgoing(self) -> bytes:
        # (caller holds _ssl_lock)
        outgoing = self._parts.outgoing
        return outgoing.read() if outgoing.pending else b""

    def _flush_pending(self) -> None:
        """Send what OpenSSL produced outside `sendall` (handshake messages, alerts, key
        updates). Only if no writer is active: an active writer sends it before it lets go."""
        while self._parts.outgoing.pending and self._send_lock.acquire(blocking=False):
            try:
                with self._ssl_lock:
                    data = self._take_outgoing()
                if data:
                    self._send_ciphertext(data)
            finally:
                self._send_lock.release()

    def do_handshake(self) -> None:
        """Run the TLS handshake to completion (blocking, honours the timeout)."""
        while True:
            with self._send_lock:
                with self._ssl_lock:
                    try:
                        self._parts.sslobj.do_handshake()
                        done = True
                    except ssl.SSLWantReadError:
                        done = False
                    data = self._take_outgoing()
                if data:
                    socket.socket.sendall(self, data)
            if done:
                return
            if self._raw_eof:
                raise ssl.SSLEOFError(ssl.SSL_ERROR_EOF, "EOF during the TLS handshake")
            self._fill()

    # -- plaintext I/O --------------------------------------------------------------------

    def recv_into(self, buffer: WriteableBuffer, nbytes: int = 0, flags: int = 0) -> int:
        if flags:
            raise ValueError("flags are not supported on a TLS socket")
        view = memoryview(buffer).cast("B")
        size = nbytes or len(view)
        if size == 0:
            return 0
        while True:
            total = 0
            eof = False
            with self._ssl_lock:
                read = self._parts.sslobj.read
                incoming = self._parts.incoming
                # As many records as fit: one call per record, each a GIL hand-off.
                while total < size:
                    try:
                        n = cast(int, read(size - total, view[total:]))
                    except ssl.SSLWantReadError:
                        eof = self._raw_eof  # a truncated record: nothing more will come
                        break
                    if n == 0:
                        eof = True
                        break
                    total += n
                    if not incoming.pending and not self._raw_eof:
                        break
            if self._parts.outgoing.pending:
                self._flush_pending()
            if total or eof:
                return total
            self._fill()

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        buffer = bytearray(bufsize)
        n = self.recv_into(buffer, bufsize, flags)
        return bytes(buffer[:n])

    def sendall(self, data: ReadableBuffer, flags: int = 0) -> None:
        if flags:
            raise ValueError("flags are not supported on a TLS socket")
        view = memoryview(data).cast("B")
        with self._send_lock:
            with self._ssl_lock:
                written = 0
                while written < len(view):
                    written += self._parts.sslobj.write(view[written:])
                out = self._take_outgoing()
            self._send_ciphertext(out)
        if self._parts.outgoing.pending:
            self._flush_pending()

    def send(self, data: ReadableBuffer, flags: int = 0) -> int:
        view = memoryview(data).cast("B")
        self.sendall(view, flags)
        return len(view)

    def pending(self) -> int:
        """Plaintext bytes already decrypted and waiting to be read."""
        with self._ssl_lock:
            return self._parts.sslobj.pending()

    # -- session --------------------------------------------------------------------------

    def getpeercert(self, binary_form: bool = False) -> Any:
        return self._parts.sslobj.getpeercert(binary_form)

    def version(self) -> str | None:
        return self._parts.sslobj.version()

    def cipher(self) -> tuple[str, str, int] | None:
        return self._parts.sslobj.cipher()

    # -- unsupported socket methods -------------------------------------------------------

    def dup(self) -> TlsSocket:
        raise NotImplementedError("a TlsSocket cannot be duplicated")

    def recvfrom(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError("recvfrom on a TLS socket")

    def recvmsg(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError("recvmsg on a TLS socket")

    def sendmsg(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError("sendmsg on a TLS socket")

    def sendfile(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError("sendfile on a TLS socket")


def wrap_tls(
    context: ssl.SSLContext,
    raw: socket.socket,
    *,
    server_side: bool = False,
    server_hostname: str | None = None,
) -> TlsSocket:
    """Take over the connected socket `raw` (it is detached) and run the TLS handshake
    (blocking, within `raw`'s timeout). On failure the socket is closed."""
    sock = TlsSocket._adopt(raw)
    try:
        sock._init_tls(context, server_side=server_side, server_hostname=server_hostname)
        sock.do_handshake()
    except BaseException:
        sock.close()
        raise
    return sock
