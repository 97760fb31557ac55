"""stdlib `ssl` contexts for the fleet's TLS-over-TCP listeners and clients.

Every TCP leg is TLS with the fleet CA as the only trust anchor. Peers are identified by their
SPIFFE ID (`ah_connectivity.pki`), not by host name: a client checks the chain during the
handshake and then `verify_tls_peer` requires the expected ID, just as the QUIC shells do.

Every context sets OP_IGNORE_UNEXPECTED_EOF: tunnels half-close with a bare TCP FIN (see
`ah_connectivity.splice`), and without the option OpenSSL 3 answers that EOF with a fatal
decode_error alert on the still-open direction. Sockets are wrapped with
``suppress_ragged_eofs=False``: with the option a FIN still reads as a clean EOF, while a
TCP reset raises (`ssl.SSLEOFError`) instead of looking like one.

Server contexts issue no TLS 1.3 session tickets: nothing resumes sessions, and a ticket is a
post-handshake write nobody needs. Connections are wrapped with
`ah_connectivity.tls_socket.wrap_tls` (memory BIOs: large socket reads and writes, and one
thread at a time inside OpenSSL), not `SSLContext.wrap_socket`.
"""

from __future__ import annotations

import os
import socket
import ssl
import tempfile
from collections.abc import Callable
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from ah_connectivity.pki import (
    SERVE_SPIFFE,
    FleetCA,
    Identity,
    PeerVerificationError,
    peer_spiffe_id,
    verify_peer,
    write_private_file,
)
from ah_connectivity.tls_socket import TlsSocket

__all__ = [
    "client_context",
    "serve_spiffe_for_ca",
    "server_context",
    "trust_domain_of_ca",
    "tune_tcp",
    "verify_tls_peer",
]


def _ca_pem(ca: FleetCA | x509.Certificate | bytes | str) -> str:
    if isinstance(ca, FleetCA):
        ca = ca.cert
    if isinstance(ca, x509.Certificate):
        return ca.public_bytes(serialization.Encoding.PEM).decode()
    return ca.decode() if isinstance(ca, bytes) else ca


def _ca_cert(ca: FleetCA | x509.Certificate | bytes | str) -> x509.Certificate:
    if isinstance(ca, FleetCA):
        return ca.cert
    if isinstance(ca, x509.Certificate):
        return ca
    return x509.load_pem_x509_certificate(ca.encode() if isinstance(ca, str) else ca)


def trust_domain_of_ca(ca: FleetCA | x509.Certificate | bytes | str) -> str:
    """The trust domain named by the fleet CA certificate's ``spiffe://<td>`` SAN."""
    uri = peer_spiffe_id(_ca_cert(ca))
    if uri is None or not uri.startswith("spiffe://") or uri.count("/") != 2:
        raise PeerVerificationError("fleet CA certificate lacks its spiffe://<trust-domain> SAN")
    return uri.removeprefix("spiffe://")


def serve_spiffe_for_ca(ca: FleetCA | x509.Certificate | bytes | str) -> str:
    """The access point's SPIFFE ID in the CA's trust domain."""
    return SERVE_SPIFFE(trust_domain_of_ca(ca))


def _load_identity(context: ssl.SSLContext, identity: Identity) -> None:
    # SSLContext.load_cert_chain only reads files: stage the key in a private temp dir.
    with tempfile.TemporaryDirectory(prefix="ah-tls-") as tmp:
        os.chmod(tmp, 0o700)
        cert_path, key_path = Path(tmp) / "cert.pem", Path(tmp) / "key.pem"
        cert_path.write_bytes(identity.cert_pem)
        write_private_file(key_path, identity.key_pem)
        context.load_cert_chain(cert_path, key_path)


def server_context(
    identity: Identity,
    ca: FleetCA | x509.Certificate | bytes | str,
    *,
    client_certs: bool = True,
) -> ssl.SSLContext:
    """A TLS server context presenting `identity`.

    With `client_certs`, clients are asked for a certificate issued by the fleet CA but may
    present none (leaders have none; followers dialling a data channel do).
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_identity(context, identity)
    context.num_tickets = 0
    context.options |= ssl.OP_IGNORE_UNEXPECTED_EOF
    if client_certs:
        context.load_verify_locations(cadata=_ca_pem(ca))
        context.verify_mode = ssl.CERT_OPTIONAL
    return context


def client_context(
    ca: FleetCA | x509.Certificate | bytes | str, identity: Identity | None = None
) -> ssl.SSLContext:
    """A TLS client context trusting only the fleet CA (no host-name check: call
    `verify_tls_peer` after the handshake), presenting `identity` when given."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = False
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(cadata=_ca_pem(ca))
    context.options |= ssl.OP_IGNORE_UNEXPECTED_EOF
    if identity is not None:
        _load_identity(context, identity)
    return context


def verify_tls_peer(
    sock: ssl.SSLSocket | TlsSocket,
    ca: FleetCA | x509.Certificate | bytes | str,
    expected: str | Callable[[str], bool],
) -> str:
    """Check the peer's certificate against the fleet CA and its SPIFFE ID; return the ID."""
    der = sock.getpeercert(binary_form=True)
    if der is None:
        raise PeerVerificationError("peer presented no certificate")
    return verify_peer(der, _ca_cert(ca), expected)


def tune_tcp(sock: socket.socket) -> None:
    """No Nagle delay (interactive SSH) and keepalives (idle tunnels notice dead peers)."""
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
