from __future__ import annotations

import base64
import json
import stat
import time
from pathlib import Path

import jwt
import pytest

from ah_connectivity import (
    InMemoryUsedTokenStore,
    TokenError,
    TokenExpired,
    TokenForged,
    TokenMalformed,
    TokenMissing,
    TokenMissingScope,
    TokenReused,
    TokenSigner,
    TokenWrongAudience,
    TokenWrongName,
    parse_ttl,
    peek_enroll_claims,
)

TD = "test.fleet"
CAF = "sha256:" + "ab" * 32


@pytest.fixture(scope="module")
def signer() -> TokenSigner:
    return TokenSigner.generate(TD)


def test_user_token_round_trip(signer: TokenSigner) -> None:
    token = signer.issue_user("alice", scopes=["exec", "read-logs"], hosts="web-*", ttl="1h")
    claims = signer.verifier().verify_user(token, required_scope="exec")
    assert (claims.sub, claims.scopes, claims.hosts, claims.aud) == (
        "alice",
        ["exec", "read-logs"],
        "web-*",
        "ah-fleet:test.fleet",
    )
    assert claims.exp - claims.iat == 3600
    assert claims.allows_host("web-1") and not claims.allows_host("db-1")
    # "Bearer " prefixes (as in Authorization headers) are accepted.
    assert signer.verifier().verify_user(f"Bearer {token}").sub == "alice"


def test_user_token_defaults_to_every_host(signer: TokenSigner) -> None:
    claims = signer.verifier().verify_user(signer.issue_user("bob", scopes=["ssh"]))
    assert claims.hosts == "*" and claims.allows_host("anything")


def test_unknown_scope_cannot_be_issued(signer: TokenSigner) -> None:
    with pytest.raises(ValueError, match="unknown scope"):
        signer.issue_user("bob", scopes=["root"])


def test_forged_token_is_refused(signer: TokenSigner) -> None:
    mallory = TokenSigner.generate(TD)
    token = mallory.issue_user("mallory", scopes=["exec"])
    with pytest.raises(TokenForged) as info:
        signer.verifier().verify_user(token)
    assert info.value.reason == "forged"
    assert "signature does not verify" in str(info.value)


def test_tampered_claims_are_forged(signer: TokenSigner) -> None:
    header, payload, sig = signer.issue_user("bob", scopes=["ssh"]).split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=="))
    claims["scopes"] = ["ssh", "exec"]
    evil = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    with pytest.raises(TokenForged):
        signer.verifier().verify_user(f"{header}.{evil}.{sig}")


def test_unsigned_and_hmac_tokens_are_forged(signer: TokenSigner) -> None:
    claims = {
        "typ": "user",
        "sub": "x",
        "scopes": ["exec"],
        "hosts": "*",
        "jti": "j",
        "iat": int(time.time()),
        "exp": int(time.time()) + 60,
        "aud": "ah-fleet:test.fleet",
    }
    unsigned = jwt.encode(claims, "", algorithm="none")
    with pytest.raises(TokenForged, match="algorithm 'none'"):
        signer.verifier().verify_user(unsigned)
    hmac = jwt.encode(claims, "k" * 32, algorithm="HS256")
    with pytest.raises(TokenForged, match="HS256"):
        signer.verifier().verify_user(hmac)


def test_expired_token_is_refused(signer: TokenSigner) -> None:
    token = signer.issue_user("alice", scopes=["exec"], ttl=60, now=time.time() - 3600)
    with pytest.raises(TokenExpired) as info:
        signer.verifier().verify_user(token)
    assert info.value.reason == "expired"


def test_wrong_audience_is_refused(signer: TokenSigner) -> None:
    other_fleet = TokenSigner(signer.key, "other.fleet")
    token = other_fleet.issue_user("alice", scopes=["exec"])
    with pytest.raises(TokenWrongAudience) as info:
        signer.verifier().verify_user(token)
    assert info.value.reason == "wrong-audience"
    assert "'ah-fleet:other.fleet'" in str(info.value) and "'ah-fleet:test.fleet'" in str(
        info.value
    )
    # An enrollment token is not a user token, even from the same signer.
    enroll = signer.issue_enroll("web-1", ca_fingerprint=CAF)
    with pytest.raises(TokenWrongAudience):
        signer.verifier().verify_user(enroll)


def test_missing_scope_is_refused(signer: TokenSigner) -> None:
    token = signer.issue_user("carol", scopes=["read-logs"])
    with pytest.raises(TokenMissingScope) as info:
        signer.verifier().verify_user(token, required_scope="ssh")
    assert info.value.reason == "missing-scope"
    assert "'carol' lacks scope 'ssh'" in str(info.value)


@pytest.mark.parametrize("token", [None, "", "   ", "Bearer "])
def test_missing_token(signer: TokenSigner, token: str | None) -> None:
    with pytest.raises(TokenMissing) as info:
        signer.verifier().verify_user(token)
    assert info.value.reason == "missing"


@pytest.mark.parametrize("token", ["abc", "a.b.c", "e30.e30.e30"])
def test_malformed_token(signer: TokenSigner, token: str) -> None:
    with pytest.raises(TokenError) as info:
        signer.verifier().verify_user(token)
    assert info.value.reason in ("malformed", "forged")


def test_enroll_token_round_trip_wrong_name_and_reuse(signer: TokenSigner) -> None:
    token = signer.issue_enroll(
        "web-1", ca_fingerprint=CAF, tags={"os": "linux"}, ttl="15m", access_point="ap.example:4433"
    )
    verifier = signer.verifier()
    with pytest.raises(TokenWrongName) as info:
        verifier.verify_enroll(token, "web-2")
    assert info.value.reason == "wrong-name"
    assert "'web-1', not 'web-2'" in str(info.value)
    used = InMemoryUsedTokenStore()
    claims = verifier.verify_enroll(token, "web-1", used)
    assert (claims.name, claims.tags, claims.caf, claims.ap) == (
        "web-1",
        {"os": "linux"},
        CAF,
        "ap.example:4433",
    )
    assert claims.exp - claims.iat == 900
    with pytest.raises(TokenReused) as reused:
        verifier.verify_enroll(token, None, used)
    assert reused.value.reason == "reused"


def test_expired_enroll_token(signer: TokenSigner) -> None:
    token = signer.issue_enroll("web-1", ca_fingerprint=CAF, ttl=10, now=time.time() - 100)
    with pytest.raises(TokenExpired):
        signer.verifier().verify_enroll(token, "web-1")


def test_peek_reads_pinning_claims_without_a_key(signer: TokenSigner) -> None:
    token = signer.issue_enroll("web-1", ca_fingerprint=CAF, access_point="10.0.0.1:4433")
    claims = peek_enroll_claims(token)
    assert (claims.caf, claims.ap, claims.name) == (CAF, "10.0.0.1:4433", "web-1")
    with pytest.raises(TokenMalformed):
        peek_enroll_claims("not-a-jwt")
    user = signer.issue_user("alice", scopes=["exec"])
    with pytest.raises(TokenMalformed, match="claims invalid"):
        peek_enroll_claims(user)


def test_signing_key_file_is_0600_and_loads(tmp_path: Path) -> None:
    path = tmp_path / "token-signing.key"
    created = TokenSigner.create(path, TD)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    loaded = TokenSigner.load(path, TD)
    token = created.issue_user("alice", scopes=["exec"])
    assert loaded.verifier().verify_user(token).sub == "alice"
    with pytest.raises(FileExistsError, match="refusing to replace"):
        TokenSigner.create(path, TD)


def test_ttl_parsing() -> None:
    assert parse_ttl("1h") == 3600
    assert parse_ttl("1m30s") == 90
    assert parse_ttl(45) == 45
    with pytest.raises(ValueError):
        parse_ttl("soon")
    with pytest.raises(ValueError, match="positive"):
        parse_ttl(0)
