"""The fleet PKI: a small EC P-256 CA, SPIFFE-named leaf certificates, and peer verification.

Every identity in the fleet is a SPIFFE ID carried as the single URI SAN of a certificate:
``spiffe://<trust-domain>/ah/serve`` for the access point and
``spiffe://<trust-domain>/ah/agent/<name>`` for a follower. Chains are one level deep (the CA
signs every leaf directly), so verification is "directly issued by the CA, inside its validity
period, with the expected SPIFFE ID".
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ah_domain_types import HOST_NAME_PATTERN

__all__ = [
    "CA_CERT_FILE",
    "CA_KEY_FILE",
    "SERVE_SPIFFE",
    "CertificateRequestError",
    "FleetCA",
    "FollowerSpiffeId",
    "Identity",
    "PeerVerificationError",
    "ca_fingerprint",
    "follower_name_from_spiffe_id",
    "generate_private_key",
    "issue_from_csr",
    "issue_server_cert",
    "load_ca_certificate",
    "make_csr",
    "peer_spiffe_id",
    "spiffe_id_for_follower",
    "validate_follower_name",
    "verify_peer",
    "write_private_file",
]

CA_CERT_FILE = "fleet-ca.pem"
CA_KEY_FILE = "fleet-ca.key"

CA_VALIDITY_DAYS = 3650
SERVER_CERT_VALIDITY_DAYS = 825
FOLLOWER_CERT_VALIDITY_DAYS = 365
# Issued certificates start a little in the past so a follower whose clock lags the access
# point's by a few minutes still accepts them.
_BACKDATE = dt.timedelta(minutes=5)

# Follower names are host names (ah_domain_types), which are also valid SPIFFE path segments.
_NAME_RE = re.compile(HOST_NAME_PATTERN)
_TRUST_DOMAIN_RE = re.compile(r"^[a-z0-9._-]{1,255}$")

PrivateKey = ec.EllipticCurvePrivateKey


class PeerVerificationError(Exception):
    """The peer's certificate chain or SPIFFE ID is not acceptable."""


class CertificateRequestError(ValueError):
    """A certificate signing request is unreadable or its signature does not verify."""


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _check_trust_domain(trust_domain: str) -> str:
    if not _TRUST_DOMAIN_RE.match(trust_domain):
        raise ValueError(
            f"invalid trust domain {trust_domain!r}: expected lowercase letters, digits, '.', '-', '_'"
        )
    return trust_domain


def validate_follower_name(name: str) -> str:
    """Return `name` if it can be a SPIFFE path segment, else raise ValueError naming it."""
    if not _NAME_RE.match(name) or name in {".", ".."}:
        raise ValueError(
            f"invalid follower name {name!r}: expected 1-63 characters: a letter or digit, then letters, digits, '_', '.' or '-'"
        )
    return name


def spiffe_id_for_follower(trust_domain: str, name: str) -> str:
    """``spiffe://<trust_domain>/ah/agent/<name>``."""
    return f"spiffe://{_check_trust_domain(trust_domain)}/ah/agent/{validate_follower_name(name)}"


def SERVE_SPIFFE(trust_domain: str) -> str:
    """``spiffe://<trust_domain>/ah/serve``: the access point's identity."""
    return f"spiffe://{_check_trust_domain(trust_domain)}/ah/serve"


def follower_name_from_spiffe_id(trust_domain: str, spiffe_id: str) -> str | None:
    """The follower name in a follower SPIFFE ID of this trust domain, else None."""
    prefix = f"spiffe://{trust_domain}/ah/agent/"
    if not spiffe_id.startswith(prefix):
        return None
    name = spiffe_id[len(prefix) :]
    return name if _NAME_RE.match(name) and name not in {".", ".."} else None


@dataclass(frozen=True)
class FollowerSpiffeId:
    """Matches any ``spiffe://<trust_domain>/ah/agent/<name>``; usable as `verify_peer`'s expectation."""

    trust_domain: str

    def __call__(self, spiffe_id: str) -> bool:
        return follower_name_from_spiffe_id(self.trust_domain, spiffe_id) is not None

    def __str__(self) -> str:
        return f"spiffe://{self.trust_domain}/ah/agent/<name>"


def generate_private_key() -> PrivateKey:
    """A fresh EC P-256 private key."""
    return ec.generate_private_key(ec.SECP256R1())


def write_private_file(path: Path, data: bytes) -> None:
    """Write `data` to `path` readable by the owner only (0600), never briefly world-readable."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    os.chmod(path, 0o600)


def _key_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _load_key(path: Path) -> PrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{path}: not a PEM private key: {exc}") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{path}: expected an EC private key, got {type(key).__name__}")
    return key


def _load_cert(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except ValueError as exc:
        raise ValueError(f"{path}: not a PEM certificate: {exc}") from exc


def load_ca_certificate(ca_pem: bytes | str) -> x509.Certificate:
    """Parse a PEM CA certificate (the form followers and leaders pin)."""
    data = ca_pem.encode() if isinstance(ca_pem, str) else ca_pem
    return x509.load_pem_x509_certificate(data)


def ca_fingerprint(ca_pem: bytes | str | x509.Certificate) -> str:
    """``sha256:<hex>`` over the DER encoding of the CA certificate."""
    cert = ca_pem if isinstance(ca_pem, x509.Certificate) else load_ca_certificate(ca_pem)
    return "sha256:" + hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


@dataclass(frozen=True)
class Identity:
    """A leaf certificate with its private key (the access point's or a follower's)."""

    key: PrivateKey
    cert: x509.Certificate

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @property
    def key_pem(self) -> bytes:
        return _key_pem(self.key)

    @property
    def spiffe_id(self) -> str | None:
        return peer_spiffe_id(self.cert)

    def write(self, cert_path: Path, key_path: Path) -> None:
        """Write the certificate (0644) and the private key (0600)."""
        cert_path.parent.mkdir(parents=True, exist_ok=True)
        cert_path.write_bytes(self.cert_pem)
        write_private_file(key_path, self.key_pem)

    @classmethod
    def load(cls, cert_path: Path, key_path: Path) -> Identity:
        return cls(key=_load_key(key_path), cert=_load_cert(cert_path))


@dataclass(frozen=True)
class FleetCA:
    """The access point's certificate authority: an EC P-256 key and a self-signed certificate."""

    trust_domain: str
    key: PrivateKey
    cert: x509.Certificate

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @property
    def fingerprint(self) -> str:
        return ca_fingerprint(self.cert)

    @classmethod
    def generate(cls, trust_domain: str, *, valid_days: int = CA_VALIDITY_DAYS) -> FleetCA:
        """A new CA held in memory only."""
        _check_trust_domain(trust_domain)
        key = generate_private_key()
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Agent Harbor fleet"),
                x509.NameAttribute(NameOID.COMMON_NAME, f"Agent Harbor fleet CA {trust_domain}"),
            ]
        )
        now = _now()
        public = key.public_key()
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _BACKDATE)
            .not_valid_after(now + dt.timedelta(days=valid_days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            # The trust domain's own SPIFFE ID, so `load` can recover it from the certificate.
            .add_extension(
                x509.SubjectAlternativeName(
                    [x509.UniformResourceIdentifier(f"spiffe://{trust_domain}")]
                ),
                critical=False,
            )
            .sign(key, hashes.SHA256())
        )
        return cls(trust_domain=trust_domain, key=key, cert=cert)

    @classmethod
    def create(
        cls, trust_domain: str, state_dir: Path, *, valid_days: int = CA_VALIDITY_DAYS
    ) -> FleetCA:
        """Create the CA and write ``fleet-ca.pem`` and ``fleet-ca.key`` (0600) into `state_dir`.

        Refuses to overwrite an existing CA: every follower certificate depends on it.
        """
        state_dir = Path(state_dir)
        for name in (CA_CERT_FILE, CA_KEY_FILE):
            if (state_dir / name).exists():
                raise FileExistsError(
                    f"{state_dir / name} already exists; refusing to replace the fleet CA"
                )
        ca = cls.generate(trust_domain, valid_days=valid_days)
        state_dir.mkdir(parents=True, exist_ok=True)
        write_private_file(state_dir / CA_KEY_FILE, _key_pem(ca.key))
        (state_dir / CA_CERT_FILE).write_bytes(ca.cert_pem)
        return ca

    @classmethod
    def load(cls, state_dir: Path) -> FleetCA:
        state_dir = Path(state_dir)
        cert_path, key_path = state_dir / CA_CERT_FILE, state_dir / CA_KEY_FILE
        for path in (cert_path, key_path):
            if not path.is_file():
                raise FileNotFoundError(f"{path}: fleet CA file missing (run `init` first)")
        cert = _load_cert(cert_path)
        key = _load_key(key_path)
        if cert.public_key() != key.public_key():
            raise ValueError(f"{key_path} does not belong to the certificate in {cert_path}")
        uri = peer_spiffe_id(cert)
        if uri is None or not uri.startswith("spiffe://") or uri.count("/") != 2:
            raise ValueError(f"{cert_path}: CA certificate lacks its spiffe://<trust-domain> SAN")
        return cls(trust_domain=uri.removeprefix("spiffe://"), key=key, cert=cert)


def _leaf_builder(
    ca: FleetCA,
    subject_cn: str,
    public_key: ec.EllipticCurvePublicKey,
    san: list[x509.GeneralName],
    usage: x509.ObjectIdentifier,
    days: int,
) -> x509.CertificateBuilder:
    now = _now()
    not_after = min(now + dt.timedelta(days=days), ca.cert.not_valid_after_utc)
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject_cn)]))
        .issuer_name(ca.cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=True,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectAlternativeName(san), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )


def issue_server_cert(
    ca: FleetCA,
    spiffe_id: str | None = None,
    dns_names: Iterable[str] = ("localhost",),
    ip_addresses: Iterable[str] = ("127.0.0.1", "::1"),
    *,
    days: int = SERVER_CERT_VALIDITY_DAYS,
    key: PrivateKey | None = None,
) -> Identity:
    """A server identity (new key unless given) for the access point.

    `spiffe_id` defaults to ``SERVE_SPIFFE(ca.trust_domain)``; DNS and IP SANs let plain TLS
    clients (CONNECT, REST) check the host name too.
    """
    spiffe_id = spiffe_id or SERVE_SPIFFE(ca.trust_domain)
    key = key or generate_private_key()
    dns = list(dns_names)
    san: list[x509.GeneralName] = [x509.UniformResourceIdentifier(spiffe_id)]
    san += [x509.DNSName(d) for d in dns]
    san += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ip_addresses]
    cert = _leaf_builder(
        ca,
        dns[0] if dns else spiffe_id,
        key.public_key(),
        san,
        ExtendedKeyUsageOID.SERVER_AUTH,
        days,
    ).sign(ca.key, hashes.SHA256())
    return Identity(key=key, cert=cert)


def make_csr(private_key: PrivateKey, name: str) -> bytes:
    """A PEM CSR with CN=`name`, signed by `private_key` (the CA decides the SAN)."""
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .sign(private_key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM)


def issue_from_csr(
    ca: FleetCA,
    csr_pem: bytes | str,
    spiffe_id: str,
    days: int = FOLLOWER_CERT_VALIDITY_DAYS,
) -> x509.Certificate:
    """Sign the CSR's public key into a client certificate whose only SAN is `spiffe_id`.

    The CSR's own subject and extensions are ignored: the name comes from the verified
    enrollment token, never from the requester.
    """
    data = csr_pem.encode() if isinstance(csr_pem, str) else csr_pem
    try:
        csr = x509.load_pem_x509_csr(data)
    except ValueError as exc:
        raise CertificateRequestError(
            f"certificate signing request is not valid PEM: {exc}"
        ) from exc
    if not csr.is_signature_valid:
        raise CertificateRequestError(
            "certificate signing request signature does not verify against its public key"
        )
    public_key = csr.public_key()
    if not isinstance(public_key, ec.EllipticCurvePublicKey):
        raise CertificateRequestError(
            f"certificate signing request must carry an EC public key, got {type(public_key).__name__}"
        )
    return _leaf_builder(
        ca,
        spiffe_id.rsplit("/", 1)[-1],
        public_key,
        [x509.UniformResourceIdentifier(spiffe_id)],
        ExtendedKeyUsageOID.CLIENT_AUTH,
        days,
    ).sign(ca.key, hashes.SHA256())


def peer_spiffe_id(cert: x509.Certificate) -> str | None:
    """The certificate's SPIFFE ID: its single ``spiffe://`` URI SAN, or None (none or several)."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    uris = [
        u
        for u in san.get_values_for_type(x509.UniformResourceIdentifier)
        if u.startswith("spiffe://")
    ]
    return uris[0] if len(uris) == 1 else None


def _as_cert(item: bytes | x509.Certificate) -> x509.Certificate:
    if isinstance(item, x509.Certificate):
        return item
    try:
        return x509.load_der_x509_certificate(item)
    except ValueError as exc:
        raise PeerVerificationError(f"peer certificate could not be parsed: {exc}") from exc


def _ca_cert_of(ca: FleetCA | x509.Certificate) -> x509.Certificate:
    return ca.cert if isinstance(ca, FleetCA) else ca


def verify_peer(
    chain: Sequence[bytes | x509.Certificate] | bytes | x509.Certificate,
    ca: FleetCA | x509.Certificate,
    expected: str | Callable[[str], bool],
    *,
    now: dt.datetime | None = None,
) -> str:
    """Check the peer's leaf certificate against the fleet CA and its SPIFFE ID; return the ID.

    `chain` is leaf first (DER bytes or parsed). `expected` is an exact SPIFFE ID or a
    predicate (e.g. `FollowerSpiffeId`); its ``str()`` is used in the error message.
    """
    items: Sequence[bytes | x509.Certificate]
    items = [chain] if isinstance(chain, bytes | x509.Certificate) else chain
    if not items:
        raise PeerVerificationError("peer presented no certificate")
    leaf = _as_cert(items[0])
    ca_cert = _ca_cert_of(ca)
    now = now or _now()

    if leaf.issuer != ca_cert.subject:
        raise PeerVerificationError(
            f"certificate not issued by this fleet CA (issuer {leaf.issuer.rfc4514_string()!r}, "
            f"fleet CA {ca_cert.subject.rfc4514_string()!r})"
        )
    try:
        leaf.verify_directly_issued_by(ca_cert)
    except (InvalidSignature, ValueError, TypeError) as exc:
        raise PeerVerificationError(
            f"certificate not issued by this fleet CA (signature check failed: {exc or type(exc).__name__})"
        ) from exc
    for what, cert in (("peer certificate", leaf), ("fleet CA certificate", ca_cert)):
        if now < cert.not_valid_before_utc:
            raise PeerVerificationError(
                f"{what} is not valid before {cert.not_valid_before_utc.isoformat()}"
            )
        if now > cert.not_valid_after_utc:
            raise PeerVerificationError(f"{what} expired at {cert.not_valid_after_utc.isoformat()}")
    try:
        constraints = leaf.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        constraints = None
    if constraints is not None and constraints.ca:
        raise PeerVerificationError("peer certificate is a CA certificate, expected a leaf")

    got = peer_spiffe_id(leaf)
    ok = got is not None and (got == expected if isinstance(expected, str) else expected(got))
    if not ok or got is None:
        raise PeerVerificationError(f"expected {expected}, got {got or 'no SPIFFE ID'}")
    return got
