"""Sessions on the access point: leaders push events in (QUIC, ``ah-leader/1``), the REST API
and its SSE streams read them out.

`SessionService` is both the `ah_connectivity.leader_push.PushIngest` of the QUIC server and
the `ah_api.SessionBackend` of the API, over one `EventStore` and one in-process `EventHub`:
a pushed batch is stored (seqs assigned, one transaction) and then published to the live
subscribers of its session, in the same event-loop step, so a subscriber that registered
before a history read can never miss an event committed after it.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Sequence
from typing import Protocol

import msgspec
from loguru import logger

from ah_api import EventHub, PushEndpoint, SessionSummary, StoredEvent, Subscription
from ah_connectivity import TokenError, TokenVerifier, UserClaims
from ah_connectivity.leader_push import LEADER_ALPN, PushGrant, PushRefusedError
from ah_domain_types import Event, FollowerStatus, PushRefusal, SessionInfo

from .events_store import EventStore, EventStoreError

__all__ = ["FollowerSource", "SessionService"]

_log = logger.bind(component="ah-access-pointd.sessions")

_VERIFIED_TOKENS = 64
"""Push tokens whose verification is remembered (a leader agent opens one push stream per
run, all with the same token)."""


class FollowerSource(Protocol):
    def list_followers(self) -> list[FollowerStatus]: ...


class SessionService:
    """PushIngest + SessionBackend of one access point."""

    def __init__(
        self,
        store: EventStore,
        hub: EventHub,
        verifier: TokenVerifier,
        followers: FollowerSource,
        *,
        trust_domain: str,
    ) -> None:
        self.store = store
        self.hub = hub
        self.verifier = verifier
        self.followers = followers
        self.trust_domain = trust_domain
        self.push_host: str | None = None
        self.push_port: int | None = None
        """Where leaders push; set once the QUIC listener is up."""
        self._verified: dict[str, UserClaims] = {}
        """Token → its claims, for tokens that verified with scope ``exec`` (until they
        expire): the signature check is most of the cost of opening a push stream."""

    # -- PushIngest ------------------------------------------------------------------------

    def open_push(self, token: str, session_id: str, producer: str) -> PushGrant:
        try:
            claims = self._verify_exec(token)
        except TokenError as exc:
            code = (
                PushRefusal.FORBIDDEN
                if exc.reason == "missing-scope"
                else PushRefusal.UNAUTHENTICATED
            )
            _log.warning("refused an event push to session {!r}: {}", session_id, exc.message)
            raise PushRefusedError(code, exc.message) from None
        try:
            acked, last_seq = self.store.open_session(session_id, claims.sub, producer)
        except EventStoreError as exc:
            raise PushRefusedError(PushRefusal.INTERNAL, str(exc)) from None
        return PushGrant(
            subject=claims.sub,
            session_id=session_id,
            producer=producer,
            acked_lseq=acked,
            last_seq=last_seq,
        )

    def _verify_exec(self, token: str) -> UserClaims:
        """`TokenVerifier.verify_user` with scope ``exec``, remembered for the same token
        string until it expires (the verification of a given token can only change with
        time)."""
        claims = self._verified.pop(token, None)
        if claims is None or time.time() >= claims.exp:
            claims = self.verifier.verify_user(token, required_scope="exec")
        self._verified[token] = claims  # most recently used last
        while len(self._verified) > _VERIFIED_TOKENS:
            del self._verified[next(iter(self._verified))]
        return claims

    def append_events(
        self, grant: PushGrant, first_lseq: int, events: Sequence[Event]
    ) -> tuple[int, int]:
        stored = self.store.append(grant.session_id, grant.producer, first_lseq, events)
        self.hub.publish(grant.session_id, stored)
        return stored[0].seq, stored[-1].seq

    # -- SessionBackend --------------------------------------------------------------------

    def read_events(
        self,
        session_id: str,
        *,
        after: int = 0,
        until: int | None = None,
        types: Collection[str] | None = None,
        limit: int,
        offset: int = 0,
        descending: bool = False,
    ) -> list[StoredEvent]:
        return self.store.read(
            session_id,
            after=after,
            until=until,
            types=types,
            limit=limit,
            offset=offset,
            descending=descending,
        )

    def count_events(
        self,
        session_id: str,
        *,
        after: int = 0,
        until: int | None = None,
        types: Collection[str] | None = None,
    ) -> int:
        return self.store.count(session_id, after=after, until=until, types=types)

    def subscribe(self, session_id: str, max_queue: int) -> Subscription:
        return self.hub.subscribe(session_id, max_queue)

    def list_sessions(self) -> list[SessionSummary]:
        return self.store.list_sessions()

    def get_session(self, session_id: str) -> SessionSummary | None:
        return self.store.get_session(session_id)

    def session_info(self, session_id: str, hosts_glob: str) -> SessionInfo | None:
        """Leader, the followers the session's events name (as the access point sees them
        now, with the path the session's latest ``connect.path.*`` event left), endpoints."""
        summary = self.store.get_session(session_id)
        if summary is None:
            return None
        members = self.store.session_hosts(session_id).paths
        statuses = {f.info.name: f for f in self.followers.list_followers()}
        followers = [
            msgspec.structs.replace(statuses[name], path=members[name])
            for name in sorted(members)
            if name in statuses
        ]
        base = f"/api/v1/sessions/{session_id}"
        endpoints = {"info": f"{base}/info", "events": f"{base}/events"}
        push = self.push_endpoint()
        if push is not None:
            endpoints["push"] = f"quic://{push.host}:{push.port} ({push.alpn})"
        return SessionInfo(
            id=summary.id,
            leader=summary.leader,
            created_ms=summary.created_ms,
            followers=followers,
            endpoints=endpoints,
            last_event_ms=summary.last_event_ms,
            last_seq=summary.last_seq,
        )

    def push_endpoint(self) -> PushEndpoint | None:
        if self.push_host is None or self.push_port is None:
            return None
        return PushEndpoint(
            host=self.push_host,
            port=self.push_port,
            alpn=LEADER_ALPN,
            trust_domain=self.trust_domain,
        )
