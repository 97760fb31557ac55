"""POST /api/v1/enroll: a one-time token and a CSR in, a follower certificate out."""

from __future__ import annotations

import time
from typing import Any

from cryptography import x509

from ah_connectivity.pki import (
    generate_private_key,
    load_ca_certificate,
    make_csr,
    peer_spiffe_id,
    spiffe_id_for_follower,
)
from ah_connectivity.tokens import TokenSigner

ENROLL = "/api/v1/enroll"


def enroll_body(token: str, name: str) -> dict[str, Any]:
    csr = make_csr(generate_private_key(), name).decode()
    return {"token": token, "name": name, "csrPem": csr, "tags": {"pool": "ci"}}


def test_enroll_issues_a_certificate_once(api: Any, check: Any, signer: TokenSigner) -> None:
    fingerprint = api.tls.ca.fingerprint
    token = signer.issue_enroll("lin-new", ca_fingerprint=fingerprint, tags={"pool": "ci"})
    with api.client() as client:
        first = check.json(
            client.post(ENROLL, json=enroll_body(token, "lin-new")), ENROLL, status=200
        )
        again = client.post(ENROLL, json=enroll_body(token, "lin-new"))
    assert first["name"] == "lin-new"
    assert first["trustDomain"] == api.trust_domain
    assert first["caPem"] == api.tls.ca.cert_pem.decode()
    cert = x509.load_pem_x509_certificate(first["certificatePem"].encode())
    cert.verify_directly_issued_by(load_ca_certificate(first["caPem"]))
    assert peer_spiffe_id(cert) == spiffe_id_for_follower(api.trust_domain, "lin-new")

    reused = check.json(again, ENROLL, status=409)
    assert reused["type"] == "urn:ah:problem:enroll-reused"
    assert "'lin-new'" in reused["detail"] and "already used" in reused["detail"]


def test_enroll_refusals_map_to_401_and_403(api: Any, check: Any, signer: TokenSigner) -> None:
    fingerprint = api.tls.ca.fingerprint
    forger = TokenSigner.generate(api.trust_domain)
    cases = [
        (signer.issue_enroll("lin-x", ca_fingerprint=fingerprint), "lin-y", 403, "wrong-name"),
        (forger.issue_enroll("lin-f", ca_fingerprint=fingerprint), "lin-f", 401, "forged"),
        (
            signer.issue_enroll(
                "lin-e", ca_fingerprint=fingerprint, ttl=60, now=time.time() - 3600
            ),
            "lin-e",
            401,
            "expired",
        ),
        ("not-a-token", "lin-m", 401, "malformed"),
    ]
    with api.client() as client:
        for token, name, status, reason in cases:
            problem = check.json(
                client.post(ENROLL, json=enroll_body(token, name)), ENROLL, status=status
            )
            assert problem["type"] == f"urn:ah:problem:enroll-{reason}", problem
            assert f"'{name}'" in problem["detail"]


def test_enroll_body_is_validated(api: Any, check: Any, signer: TokenSigner) -> None:
    token = signer.issue_enroll("lin-v", ca_fingerprint=api.tls.ca.fingerprint)
    body = enroll_body(token, "lin-v")
    del body["csrPem"]
    with api.client() as client:
        problem = check.json(client.post(ENROLL, json=body), ENROLL, status=400)
    assert problem["type"] == "urn:ah:problem:invalid-request"
    assert "csrPem" in problem["detail"]
