"""``init`` and ``token`` through the real binary."""

from __future__ import annotations

import ipaddress
import json
import socket
import stat
import time
from pathlib import Path
from typing import Any

from cryptography import x509

from ah_access_pointd.events_store import EVENTS_DB_FILE
from ah_access_pointd.state import load_state
from ah_connectivity import (
    SERVE_SPIFFE,
    TokenVerifier,
    ca_fingerprint,
    peek_enroll_claims,
    peer_spiffe_id,
)

TD = "init-test.fleet"


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_init_creates_the_state_and_a_second_init_is_refused(tmp_path: Path, cli: Any) -> None:
    state_dir = tmp_path / "ap"
    first = cli("init", "--state-dir", str(state_dir), "--trust-domain", TD, "--san", "10.9.8.7",
                "--san", "ap.example.test")  # fmt: skip
    assert first.returncode == 0, first.stderr
    fingerprint = first.stdout.strip()
    assert fingerprint == ca_fingerprint((state_dir / "fleet-ca.pem").read_bytes())
    assert fingerprint.startswith("sha256:") and len(fingerprint) == len("sha256:") + 64
    for private in ("fleet-ca.key", "server.key", "token-signing.key"):
        assert _mode(state_dir / private) == 0o600, private

    state = load_state(state_dir)
    assert state.trust_domain == TD
    server = state.identity.cert
    assert peer_spiffe_id(server) == SERVE_SPIFFE(TD)
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    dns = set(san.get_values_for_type(x509.DNSName))
    ips = set(san.get_values_for_type(x509.IPAddress))
    assert {"localhost", socket.gethostname(), "ap.example.test"} <= dns
    assert {ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("10.9.8.7")} <= ips

    again = cli("init", "--state-dir", str(state_dir), "--json")
    assert again.returncode == 8, again.stderr
    error = json.loads(again.stdout)["error"]
    assert error["exitCode"] == 8
    assert "already holds an access point" in error["message"] and "--force" in error["message"]
    assert "already holds an access point" in again.stderr
    # The refused init left everything as it was.
    assert ca_fingerprint((state_dir / "fleet-ca.pem").read_bytes()) == fingerprint

    (state_dir / EVENTS_DB_FILE).write_bytes(b"old fleet history")
    forced = cli("init", "--state-dir", str(state_dir), "--force", "--json")
    assert forced.returncode == 0, forced.stderr
    document = json.loads(forced.stdout)
    assert document["trustDomain"] == "ah.local"
    assert document["caFingerprint"] != fingerprint
    assert document["caFingerprint"] == ca_fingerprint((state_dir / "fleet-ca.pem").read_bytes())
    assert not (state_dir / EVENTS_DB_FILE).exists()  # the new fleet starts a new history


def test_init_rejects_a_bad_trust_domain(tmp_path: Path, cli: Any) -> None:
    result = cli("init", "--state-dir", str(tmp_path / "ap"), "--trust-domain", "Bad Domain")
    assert result.returncode == 2
    assert "trust domain 'Bad Domain'" in result.stderr
    assert not (tmp_path / "ap").exists()


def test_tokens_carry_what_was_asked(tmp_path: Path, cli: Any, cli_many: Any) -> None:
    state_dir = tmp_path / "ap"
    assert cli("init", "--state-dir", str(state_dir), "--trust-domain", TD).returncode == 0
    state = load_state(state_dir)
    verifier: TokenVerifier = state.signer.verifier()
    sd = str(state_dir)
    enroll, user, default_scopes, bad_tag, missing = cli_many(
        ["token", "enroll", "--state-dir", sd, "--name", "lin-1", "--tag", "role=build",
         "--tag", "pool=ci", "--ttl", "90s", "--access-point", "ap.example.test:8443"],
        ["token", "user", "--state-dir", sd, "--subject", "alice", "--scope", "exec",
         "--scope", "read-logs", "--hosts", "lin-*", "--json"],
        ["token", "user", "--state-dir", sd, "--subject", "bob"],
        ["token", "enroll", "--state-dir", sd, "--name", "x", "--tag", "nokv"],
        ["token", "enroll", "--state-dir", str(tmp_path / "nowhere"), "--name", "x"],
    )  # fmt: skip

    assert enroll.returncode == 0, enroll.stderr
    token = enroll.stdout.strip()
    claims = verifier.verify_enroll(token, "lin-1")
    assert claims == peek_enroll_claims(token)
    assert claims.tags == {"role": "build", "pool": "ci"}
    assert claims.caf == state.ca.fingerprint
    assert claims.ap == "ap.example.test:8443"
    assert claims.exp - claims.iat == 90
    assert abs(claims.iat - time.time()) < 60

    assert user.returncode == 0, user.stderr
    document = json.loads(user.stdout)
    user_claims = verifier.verify_user(document["token"])
    assert user_claims.sub == "alice" == document["subject"]
    assert sorted(user_claims.scopes) == ["exec", "read-logs"]
    assert user_claims.hosts == "lin-*"
    assert user_claims.exp - user_claims.iat == 12 * 3600
    assert document["expiresAt"] == user_claims.exp

    assert sorted(verifier.verify_user(default_scopes.stdout.strip()).scopes) == [
        "exec", "read-logs", "ssh",
    ]  # fmt: skip
    assert bad_tag.returncode == 2 and "missing '='" in bad_tag.stderr
    assert missing.returncode == 8
    assert "does not exist" in missing.stderr and "init" in missing.stderr


def test_init_knows_the_event_store_file() -> None:
    from ah_access_pointd import state

    assert EVENTS_DB_FILE in state.STATE_FILES
