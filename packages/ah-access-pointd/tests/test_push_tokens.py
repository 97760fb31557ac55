"""The push path remembers a verified token (one stream per run of a leader agent, all with
the same token) only until it expires, and never a refused one."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from ah_access_pointd.events_store import EventStore
from ah_access_pointd.sessions import SessionService
from ah_api import EventHub
from ah_connectivity import TokenSigner, TokenVerifier
from ah_connectivity.leader_push import PushRefusedError
from ah_domain_types import FollowerStatus, PushRefusal
from ah_harness_local import wait_for

TRUST_DOMAIN = "tokens.fleet"


class NoFollowers:
    def list_followers(self) -> list[FollowerStatus]:
        return []


def service(tmp_path: Path, signer: TokenSigner) -> SessionService:
    return SessionService(
        EventStore(tmp_path / "events.db"),
        EventHub(),
        TokenVerifier(signer.public_key, TRUST_DOMAIN, leeway_s=0),
        NoFollowers(),
        trust_domain=TRUST_DOMAIN,
    )


def test_a_remembered_push_token_is_refused_once_it_expired(tmp_path: Path) -> None:
    signer = TokenSigner.generate(TRUST_DOMAIN)
    sessions = service(tmp_path, signer)
    token = signer.issue_user("lead", scopes=["exec"], ttl=2)
    expires = signer.verifier().verify_user(token).exp
    assert sessions.open_push(token, "s-tok-1", "p1").subject == "lead"
    assert sessions.open_push(token, "s-tok-2", "p2").subject == "lead"
    wait_for(lambda: time.time() >= expires, 10.0, what="the token to expire")
    with pytest.raises(PushRefusedError) as refused:
        sessions.open_push(token, "s-tok-3", "p3")
    assert refused.value.code is PushRefusal.UNAUTHENTICATED
    assert "expired" in refused.value.message


def test_a_token_without_exec_is_refused_every_time(tmp_path: Path) -> None:
    signer = TokenSigner.generate(TRUST_DOMAIN)
    sessions = service(tmp_path, signer)
    reader = signer.issue_user("reader", scopes=["read-logs"])
    for name in ("s-tok-a", "s-tok-b"):
        with pytest.raises(PushRefusedError) as refused:
            sessions.open_push(reader, name, "p")
        assert refused.value.code is PushRefusal.FORBIDDEN
    forged = TokenSigner.generate(TRUST_DOMAIN).issue_user("mallory", scopes=["exec"])
    with pytest.raises(PushRefusedError) as refused:
        sessions.open_push(forged, "s-tok-c", "p")
    assert refused.value.code is PushRefusal.UNAUTHENTICATED
