"""The leader's side of a CONNECT tunnel: TLS to an access point, CONNECT, then raw bytes.

`open_connect_tunnel` returns a connected, blocking `TlsSocket` positioned right after
the proxy's ``200`` — hand it to paramiko (``Transport(sock)``) or pump it with
`pump_stdio` (an OpenSSH ``ProxyCommand``). The access point is identified by the fleet CA
and its ``spiffe://<td>/ah/serve`` certificate (the trust domain is read from the CA), not
by host name. Any other answer raises `ConnectRefused` with the status.

``python -m ah_connectivity.connect_client --access-point HOST:PORT --ca-file CA.pem
[--token-file FILE] TARGET`` is a ready ProxyCommand (the token may also come from
``AH_TOKEN``); ``ah-fleetctl proxy`` wraps the same functions.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import socket
import ssl
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from ah_connectivity.connect_proto import (
    ConnectProtocolError,
    ConnectResponse,
    ConnectResponseParser,
    ConnectTarget,
    build_request,
    parse_target,
)
from ah_connectivity.pki import FleetCA, PeerVerificationError, verify_peer
from ah_connectivity.splice import Splice, SpliceEnd, SpliceStats
from ah_connectivity.tls import client_context, serve_spiffe_for_ca, tune_tcp, verify_tls_peer
from ah_connectivity.tls_socket import TlsSocket, wrap_tls
from ah_domain_types import ExitCode

__all__ = [
    "ConnectRefused",
    "open_connect_tunnel",
    "open_connect_tunnel_async",
    "pump_stdio",
]

if TYPE_CHECKING:
    # asyncio is imported only by the async variant: the ProxyCommand starts once per ssh.
    import asyncio

CaLike = FleetCA | x509.Certificate | bytes | str
_PIPE_SIZE = 1024 * 1024


class ConnectRefused(Exception):
    """The access point answered the CONNECT with a non-2xx status."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"CONNECT refused: {status} {reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message


def _target(target: ConnectTarget | str) -> ConnectTarget:
    if isinstance(target, ConnectTarget):
        return target
    try:
        return parse_target(target)
    except ConnectProtocolError as exc:
        raise ValueError(exc.message) from None


def _ca_key(ca: CaLike) -> bytes:
    if isinstance(ca, FleetCA):
        return ca.cert_pem
    if isinstance(ca, x509.Certificate):
        return ca.public_bytes(serialization.Encoding.PEM)
    return ca.encode() if isinstance(ca, str) else ca


@functools.lru_cache(maxsize=16)
def _context(ca_pem: bytes) -> tuple[ssl.SSLContext, str]:
    return client_context(ca_pem), serve_spiffe_for_ca(ca_pem)


def _raise_for(response: ConnectResponse) -> None:
    if not 200 <= response.status < 300:
        raise ConnectRefused(response.status, response.reason, response.text)


def open_connect_tunnel(
    ap_host: str,
    ap_port: int,
    *,
    ca_pem: CaLike,
    token: str | None,
    target: ConnectTarget | str,
    timeout: float = 10.0,
) -> TlsSocket:
    """TLS-connect to the access point, send CONNECT `target`, return the socket after 200.

    Raises `ConnectRefused` (any other status), `TimeoutError`, `OSError` / `ssl.SSLError`
    (network, TLS), `PeerVerificationError` (not this fleet's access point), `ValueError`
    (a target that is not ``follower:port`` or ``follower@host:port:port``).
    """
    parsed = _target(target)
    context, expected = _context(_ca_key(ca_pem))
    raw = socket.create_connection((ap_host, ap_port), timeout=timeout)
    try:
        tune_tcp(raw)
        sock = wrap_tls(context, raw)
    except BaseException:
        raw.close()
        raise
    try:
        verify_tls_peer(sock, ca_pem, expected)
        sock.sendall(build_request(parsed, token))
        parser = ConnectResponseParser()
        # Read the head one byte at a time so no tunnel byte after it is consumed here:
        # the caller gets a plain socket positioned at the first tunnel byte.
        response = None
        while response is None:
            # (An error body is read in bulk: the connection ends after it anyway.)
            chunk = sock.recv(4096 if parser.wants_body else 1)
            if not chunk:
                raise ConnectionError(
                    f"access point {ap_host}:{ap_port} closed the connection during CONNECT"
                )
            response = parser.feed(chunk)
        _raise_for(response)
        sock.settimeout(None)
    except ConnectProtocolError as exc:
        sock.close()
        raise ConnectionError(
            f"access point {ap_host}:{ap_port} sent a bad CONNECT answer: {exc.message}"
        ) from None
    except BaseException:
        sock.close()
        raise
    return sock


async def open_connect_tunnel_async(
    ap_host: str,
    ap_port: int,
    *,
    ca_pem: CaLike,
    token: str | None,
    target: ConnectTarget | str,
    timeout: float = 10.0,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """`open_connect_tunnel` for asyncio: returns the streams after the 200.

    asyncio's TLS transports cannot half-close (``write_eof`` raises): prefer the blocking
    socket where EOF must travel separately from close.
    """
    import asyncio

    parsed = _target(target)
    context, expected = _context(_ca_key(ca_pem))
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection(
            ap_host, ap_port, ssl=context, server_hostname=ap_host
        )
        try:
            sslobj = writer.get_extra_info("ssl_object")
            der = sslobj.getpeercert(binary_form=True) if sslobj is not None else None
            if der is None:
                raise PeerVerificationError("access point presented no certificate")
            verify_peer(der, x509.load_pem_x509_certificate(_ca_key(ca_pem)), expected)
            writer.write(build_request(parsed, token))
            await writer.drain()
            parser = ConnectResponseParser()
            response = None
            while response is None:
                if parser.wants_body:
                    chunk = await reader.read(4096)
                else:
                    chunk = await reader.readline()
                if not chunk:
                    raise ConnectionError(
                        f"access point {ap_host}:{ap_port} closed the connection during CONNECT"
                    )
                response = parser.feed(chunk)
            _raise_for(response)
        except ConnectProtocolError as exc:
            writer.close()
            raise ConnectionError(
                f"access point {ap_host}:{ap_port} sent a bad CONNECT answer: {exc.message}"
            ) from None
        except BaseException:
            writer.close()
            raise
    return reader, writer


def pump_stdio(sock: socket.socket, stdin_fd: int = 0, stdout_fd: int = 1) -> SpliceStats:
    """Copy `stdin_fd` → `sock` and `sock` → `stdout_fd` until the socket's side ends.

    Stdin EOF half-closes the socket; the function returns once the socket reached EOF and
    everything was written out, or either side failed (``outcome`` of the returned stats is
    then ``"reset"``, with the reason). One thread, non-blocking
    (`ah_connectivity.splice`); a `TlsSocket` is pumped through its memory BIOs.
    """
    for fd in (stdin_fd, stdout_fd):
        # Bigger pipes (Linux): ssh's writes then reach us in fewer, larger reads.
        with contextlib.suppress(OSError, AttributeError, ImportError):
            import fcntl

            fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, _PIPE_SIZE)
    return Splice(
        SpliceEnd(sock, "tunnel", eof_ends_splice=True),
        SpliceEnd(None, "stdio", fds=(stdin_fd, stdout_fd), close_fds=False),
    ).run()


def _split_host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"--access-point {text!r}: expected HOST:PORT")
    return host.strip("[]"), int(port)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ah_connectivity.connect_client",
        description="Open a CONNECT tunnel through an access point and pump stdin/stdout "
        "(an OpenSSH ProxyCommand).",
    )
    parser.add_argument("--access-point", required=True, metavar="HOST:PORT")
    parser.add_argument("--ca-file", required=True, help="the fleet CA certificate (PEM)")
    parser.add_argument("--token-file", help="file holding the user token (else $AH_TOKEN)")
    parser.add_argument("--timeout", type=float, default=10.0)
    parser.add_argument("target", help="<follower>:<port> or <follower>@<home-ap>:<port>")
    args = parser.parse_args(argv)
    try:
        host, port = _split_host_port(args.access_point)
        with open(args.ca_file, "rb") as fh:
            ca_pem = fh.read()
        if args.token_file:
            with open(args.token_file, encoding="utf-8") as fh:
                token: str | None = fh.read().strip()
        else:
            token = os.environ.get("AH_TOKEN")
        sock = open_connect_tunnel(
            host, port, ca_pem=ca_pem, token=token, target=args.target, timeout=args.timeout
        )
    except ConnectRefused as exc:
        print(f"error: {exc}", file=sys.stderr)
        return int(ExitCode.AUTH if exc.status in (401, 403, 407) else ExitCode.NETWORK)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return int(ExitCode.USAGE)
    except (OSError, ssl.SSLError, PeerVerificationError) as exc:
        print(f"error: {args.access_point}: {exc}", file=sys.stderr)
        return int(ExitCode.NETWORK)
    stats = pump_stdio(sock)
    if stats.outcome != "eof":
        print(f"error: tunnel to {args.target} broke: {stats.reason}", file=sys.stderr)
        return int(ExitCode.NETWORK)
    return 0


if __name__ == "__main__":
    sys.exit(main())
