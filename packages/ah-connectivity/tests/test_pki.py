from __future__ import annotations

import datetime as dt
import hashlib
import stat
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from ah_connectivity import (
    CA_CERT_FILE,
    CA_KEY_FILE,
    SERVE_SPIFFE,
    CertificateRequestError,
    FleetCA,
    FollowerSpiffeId,
    Identity,
    PeerVerificationError,
    ca_fingerprint,
    follower_name_from_spiffe_id,
    generate_private_key,
    issue_from_csr,
    issue_server_cert,
    make_csr,
    peer_spiffe_id,
    spiffe_id_for_follower,
    verify_peer,
)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_ca_create_load_round_trip_with_private_key_0600(tmp_path: Path) -> None:
    ca = FleetCA.create("prod.example", tmp_path / "state")
    assert mode(tmp_path / "state" / CA_KEY_FILE) == 0o600
    loaded = FleetCA.load(tmp_path / "state")
    assert loaded.trust_domain == "prod.example"
    assert loaded.cert == ca.cert
    assert isinstance(loaded.key.curve, ec.SECP256R1)
    lifetime = ca.cert.not_valid_after_utc - ca.cert.not_valid_before_utc
    assert dt.timedelta(days=3649) < lifetime < dt.timedelta(days=3651)
    constraints = ca.cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert constraints.ca
    with pytest.raises(FileExistsError, match="refusing to replace the fleet CA"):
        FleetCA.create("prod.example", tmp_path / "state")


def test_ca_load_names_the_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=CA_CERT_FILE):
        FleetCA.load(tmp_path)


def test_fingerprint_is_sha256_over_der(fleet: Any) -> None:
    der = fleet.ca.cert.public_bytes(serialization.Encoding.DER)
    expected = "sha256:" + hashlib.sha256(der).hexdigest()
    assert ca_fingerprint(fleet.ca.cert_pem) == expected
    assert ca_fingerprint(fleet.ca.cert_pem.decode()) == expected
    assert fleet.ca.fingerprint == expected


def test_server_cert_names_serve_identity_localhost_and_loopback(fleet: Any) -> None:
    cert = fleet.server.cert
    assert peer_spiffe_id(cert) == "spiffe://test.fleet/ah/serve" == SERVE_SPIFFE("test.fleet")
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in san.get_values_for_type(x509.DNSName)
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1", "::1"]
    assert verify_peer([cert], fleet.ca, SERVE_SPIFFE("test.fleet")) == SERVE_SPIFFE("test.fleet")


def test_follower_cert_from_csr_takes_its_name_from_the_ca_not_the_csr(fleet: Any) -> None:
    key = generate_private_key()
    csr = make_csr(key, "someone-else")
    cert = issue_from_csr(fleet.ca, csr, spiffe_id_for_follower("test.fleet", "web-1"), days=30)
    assert peer_spiffe_id(cert) == "spiffe://test.fleet/ah/agent/web-1"
    assert cert.public_key() == key.public_key()
    der = cert.public_bytes(serialization.Encoding.DER)
    assert (
        verify_peer(der, fleet.ca.cert, FollowerSpiffeId("test.fleet"))
        == "spiffe://test.fleet/ah/agent/web-1"
    )
    assert (
        follower_name_from_spiffe_id("test.fleet", "spiffe://test.fleet/ah/agent/web-1") == "web-1"
    )
    assert follower_name_from_spiffe_id("other", "spiffe://test.fleet/ah/agent/web-1") is None


def test_csr_with_a_broken_signature_is_refused(fleet: Any) -> None:
    csr = x509.load_pem_x509_csr(make_csr(generate_private_key(), "web-1"))
    der = bytearray(csr.public_bytes(serialization.Encoding.DER))
    der[-1] ^= 0x01  # last byte of the ECDSA signature's s value
    tampered = x509.load_der_x509_csr(bytes(der)).public_bytes(serialization.Encoding.PEM)
    with pytest.raises(CertificateRequestError, match="signature does not verify"):
        issue_from_csr(fleet.ca, tampered, spiffe_id_for_follower("test.fleet", "web-1"))
    with pytest.raises(CertificateRequestError, match="not valid PEM"):
        issue_from_csr(fleet.ca, b"garbage", spiffe_id_for_follower("test.fleet", "web-1"))


def test_verify_peer_refuses_another_ca(fleet: Any) -> None:
    other = FleetCA.generate("test.fleet")
    impostor = issue_server_cert(other)
    with pytest.raises(PeerVerificationError, match="certificate not issued by this fleet CA"):
        verify_peer([impostor.cert], fleet.ca, SERVE_SPIFFE("test.fleet"))


def test_verify_peer_refuses_a_forged_issuer_name(fleet: Any) -> None:
    # Same subject name as the fleet CA but a different key: only the signature tells.
    forger_key = generate_private_key()
    forged_ca = FleetCA(trust_domain="test.fleet", key=forger_key, cert=fleet.ca.cert)
    forged = issue_server_cert(forged_ca)
    with pytest.raises(PeerVerificationError, match="signature check failed"):
        verify_peer([forged.cert], fleet.ca, SERVE_SPIFFE("test.fleet"))


def test_verify_peer_names_expected_and_actual_identity(fleet: Any) -> None:
    follower = fleet.follower("web-1")
    with pytest.raises(PeerVerificationError) as info:
        verify_peer([follower.cert], fleet.ca, SERVE_SPIFFE("test.fleet"))
    assert str(info.value) == (
        "expected spiffe://test.fleet/ah/serve, got spiffe://test.fleet/ah/agent/web-1"
    )
    with pytest.raises(
        PeerVerificationError, match=r"expected spiffe://test.fleet/ah/agent/<name>"
    ):
        verify_peer([fleet.server.cert], fleet.ca, FollowerSpiffeId("test.fleet"))


def test_verify_peer_checks_the_validity_period(fleet: Any) -> None:
    cert = fleet.follower("web-1").cert
    later = cert.not_valid_after_utc + dt.timedelta(seconds=1)
    with pytest.raises(PeerVerificationError, match="peer certificate expired"):
        verify_peer([cert], fleet.ca, FollowerSpiffeId("test.fleet"), now=later)
    earlier = cert.not_valid_before_utc - dt.timedelta(seconds=1)
    with pytest.raises(PeerVerificationError, match="not valid before"):
        verify_peer([cert], fleet.ca, FollowerSpiffeId("test.fleet"), now=earlier)


def test_identity_write_and_load(tmp_path: Path, fleet: Any) -> None:
    ident = fleet.follower("web-1")
    ident.write(tmp_path / "f.pem", tmp_path / "f.key")
    assert mode(tmp_path / "f.key") == 0o600
    loaded = Identity.load(tmp_path / "f.pem", tmp_path / "f.key")
    assert loaded.cert == ident.cert and loaded.spiffe_id == "spiffe://test.fleet/ah/agent/web-1"


@pytest.mark.parametrize("name", ["", "a/b", "x" * 64, "-lead", "sp ace", ".."])
def test_bad_follower_names_are_refused(name: str) -> None:
    with pytest.raises(ValueError, match="invalid follower name"):
        spiffe_id_for_follower("test.fleet", name)
