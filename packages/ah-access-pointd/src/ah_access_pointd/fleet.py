"""The access point's fleet: registry + live control connections, behind the REST API.

`AccessPointFleet` is both the `ControlServerHandler` of the QUIC server (it learns who is
connected and how healthy) and the `FleetBackend` of the REST API (it lists followers, fans out
mock exec RPCs and enrolls new followers).

Health of a follower: ``healthy`` while its heartbeats arrive, ``unhealthy`` once
`unhealthy_after_intervals` heartbeat intervals passed without one (the connection is still
open), ``offline`` when it is not connected. A follower that stays silent for
`offline_after_intervals` intervals is disconnected by the access point, so a follower that
died without closing its QUIC connection is ``offline`` within that budget instead of after the
QUIC idle timeout.

Tags: a follower's listed tags are those of its Hello overlaid with its enrolled tags (the
enrollment token's, plus extra keys the follower asked for when it enrolled). On a conflict the
enrolled value wins: tags granted by whoever issued the token must not be changed by the
follower itself; it may only add keys.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from dataclasses import dataclass

import msgspec
from cryptography.hazmat.primitives import serialization
from loguru import logger

from ah_api import EnrollmentRefusal, EnrollmentRefused, ExecState, HostExec
from ah_connectivity import (
    CertificateRequestError,
    ConnectionCloseCode,
    FollowerConnection,
    FrameError,
    RpcConnectionLost,
    RpcError,
    RpcTimeout,
    TokenError,
    TokenVerifier,
    issue_from_csr,
    spiffe_id_for_follower,
)
from ah_domain_types import (
    ControlMessage,
    EnrollRequest,
    EnrollResponse,
    ExecRequest,
    ExecResult,
    FollowerHealth,
    FollowerStatus,
    Heartbeat,
)

from .registry import FleetRegistry
from .state import ApState

__all__ = ["DEFAULT_EXEC_TIMEOUT_MS", "AccessPointFleet"]

DEFAULT_EXEC_TIMEOUT_MS = 30_000
_PERSIST_EVERY_MS = 5_000
"""How often the last-seen times of connected followers are written to the registry: all of
them in one transaction, not one transaction per heartbeat (500 followers at the default
interval were ~100 SQLite commits a second on the event loop)."""
_REFUSALS: dict[str, EnrollmentRefusal] = {
    "malformed": "malformed",
    "missing": "malformed",
    "forged": "forged",
    "expired": "expired",
    "reused": "reused",
    "wrong-name": "wrong-name",
}

_log = logger.bind(component="ah-access-pointd.fleet")


def _wall_ms() -> int:
    return int(time.time() * 1000)


def _loop_ms() -> int:
    return int(asyncio.get_running_loop().time() * 1000)


@dataclass
class _Live:
    """A connected follower."""

    conn: FollowerConnection
    connected_since_ms: int
    last_heartbeat_ms: int
    """Wall-clock ms of the last Hello or Heartbeat."""
    persisted_ms: int
    """The last-seen time the registry holds for this follower."""
    offline_timer: asyncio.TimerHandle | None = None
    unhealthy: bool = False


class AccessPointFleet:
    """ControlServerHandler + FleetBackend over one state directory's registry."""

    def __init__(
        self,
        state: ApState,
        registry: FleetRegistry,
        *,
        heartbeat_interval_ms: int,
        unhealthy_after_intervals: int = 3,
        offline_after_intervals: int = 6,
    ) -> None:
        if offline_after_intervals <= unhealthy_after_intervals:
            raise ValueError(
                f"offline_after_intervals ({offline_after_intervals}) must exceed "
                f"unhealthy_after_intervals ({unhealthy_after_intervals})"
            )
        self.state = state
        self.registry = registry
        self.heartbeat_interval_ms = heartbeat_interval_ms
        self.unhealthy_after_intervals = unhealthy_after_intervals
        self.offline_after_intervals = offline_after_intervals
        self.quic_address: str | None = None
        """``host:port`` followers dial (told to them at enrollment); set once listening."""
        self.ready = False
        self._verifier: TokenVerifier = state.signer.verifier()
        self._live: dict[str, _Live] = {}
        self._persist_timer: asyncio.TimerHandle | None = None

    # -- ControlServerHandler --------------------------------------------------------------

    def on_follower_connected(self, name: str, conn: FollowerConnection) -> None:
        where = _address(conn)
        if self.registry.get(name) is None:
            reason = (
                f"follower {name!r} presented a valid certificate but is not enrolled in this "
                "access point's registry"
            )
            _log.warning("refusing connection from {}: {}", where, reason)
            conn.close(reason, ConnectionCloseCode.PEER_REFUSED)
            return
        now = _wall_ms()
        old = self._live.pop(name, None)
        if old is not None and old.offline_timer is not None:
            old.offline_timer.cancel()
        self._live[name] = _Live(conn, now, now, now)
        info = conn.info
        if info is not None:
            self.registry.record_hello(name, info, now)
            _log.info(
                "follower {!r} connected from {} ({} {}, version {}, sshd {}, tags {})",
                name,
                where,
                info.os.value,
                info.arch,
                info.version,
                info.host_key_fingerprint,
                info.tags,
            )

    def on_control_message(self, name: str, conn: FollowerConnection, msg: ControlMessage) -> None:
        live = self._live.get(name)
        if live is None or live.conn is not conn or not isinstance(msg, Heartbeat):
            return
        live.last_heartbeat_ms = _wall_ms()
        if self._persist_timer is None:
            self._persist_timer = asyncio.get_running_loop().call_later(
                _PERSIST_EVERY_MS / 1000, self._persist_last_seen
            )

    def _persist_last_seen(self) -> None:
        """Write every last-seen time that moved since the previous write, in one go."""
        self._persist_timer = None
        moved = [
            (name, live)
            for name, live in self._live.items()
            if live.last_heartbeat_ms > live.persisted_ms
        ]
        try:
            self.registry.touch_many([(name, live.last_heartbeat_ms) for name, live in moved])
        except Exception:
            _log.exception("cannot record when {} followers were last seen", len(moved))
            return
        for _, live in moved:
            live.persisted_ms = live.last_heartbeat_ms

    def on_follower_health(
        self, name: str, conn: FollowerConnection, health: FollowerHealth
    ) -> None:
        live = self._live.get(name)
        if live is None or live.conn is not conn:
            return
        if health is FollowerHealth.UNHEALTHY:
            live.unhealthy = True
            _log.warning(
                "follower {!r} is unhealthy: no heartbeat for {} intervals of {} ms",
                name,
                self.unhealthy_after_intervals,
                self.heartbeat_interval_ms,
            )
            self._schedule_offline_check(name, live)
        elif health is FollowerHealth.HEALTHY and live.unhealthy:
            live.unhealthy = False
            _log.info("follower {!r} is healthy again", name)
            if live.offline_timer is not None:
                live.offline_timer.cancel()
                live.offline_timer = None

    def _schedule_offline_check(self, name: str, live: _Live) -> None:
        if live.offline_timer is not None:
            live.offline_timer.cancel()
        last = live.conn.last_heartbeat_ms
        budget = self.offline_after_intervals * self.heartbeat_interval_ms
        due_in_ms = budget - (_loop_ms() - last) if last is not None else budget
        loop = asyncio.get_running_loop()
        live.offline_timer = loop.call_later(
            max(0.0, due_in_ms / 1000) + 0.001, self._offline_check, name, live
        )

    def _offline_check(self, name: str, live: _Live) -> None:
        live.offline_timer = None
        if self._live.get(name) is not live or not live.conn.connected:
            return
        last = live.conn.last_heartbeat_ms
        budget = self.offline_after_intervals * self.heartbeat_interval_ms
        if last is not None and _loop_ms() - last < budget:
            if live.conn.health() is FollowerHealth.UNHEALTHY:
                self._schedule_offline_check(name, live)
            return
        reason = (
            f"no heartbeat for {self.offline_after_intervals} intervals of "
            f"{self.heartbeat_interval_ms} ms"
        )
        _log.warning("disconnecting silent follower {!r}: {}", name, reason)
        live.conn.close(reason, ConnectionCloseCode.NO_ERROR)

    def on_follower_disconnected(self, name: str, conn: FollowerConnection, reason: str) -> None:
        live = self._live.get(name)
        if live is None or live.conn is not conn:
            return
        del self._live[name]
        if live.offline_timer is not None:
            live.offline_timer.cancel()
        self.registry.touch(name, live.last_heartbeat_ms)
        _log.info("follower {!r} disconnected ({}): {}", name, _address(conn), reason)

    # -- FleetBackend ----------------------------------------------------------------------

    def list_followers(self) -> list[FollowerStatus]:
        """Every enrolled follower that ever connected (one that never said Hello has no facts
        to report yet), with its live health."""
        statuses: list[FollowerStatus] = []
        for record in self.registry.followers():
            live = self._live.get(record.name)
            info = (
                live.conn.info if live is not None and live.conn.info is not None else record.info
            )
            if info is None:
                continue
            merged = {**info.tags, **record.enrolled_tags}
            if merged != info.tags:
                info = msgspec.structs.replace(info, tags=merged)
            if live is not None:
                status = FollowerStatus(
                    info=info,
                    health=live.conn.health(),
                    last_heartbeat_ms=live.last_heartbeat_ms,
                    connected_since_ms=live.connected_since_ms,
                )
            else:
                status = FollowerStatus(
                    info=info,
                    health=FollowerHealth.OFFLINE,
                    last_heartbeat_ms=record.last_seen_ms,
                    connected_since_ms=None,
                )
            statuses.append(status)
        return statuses

    async def exec_mock(
        self, hosts: list[str], command: list[str], timeout_ms: int | None
    ) -> list[HostExec]:
        """Run `command` on every host at once (one RPC stream each); results in host order."""
        budget_ms = timeout_ms if timeout_ms is not None else DEFAULT_EXEC_TIMEOUT_MS
        results = await asyncio.gather(
            *(self._exec_one(host, command, budget_ms, timeout_ms) for host in hosts)
        )
        return list(results)

    async def _exec_one(
        self, host: str, command: list[str], budget_ms: int, timeout_ms: int | None
    ) -> HostExec:
        started = time.monotonic()

        def took() -> int:
            return int((time.monotonic() - started) * 1000)

        def failure(state: ExecState, error: str) -> HostExec:
            return HostExec(
                host=host,
                state=state,
                exit_code=None,
                stdout="",
                stderr="",
                took_ms=took(),
                error=error,
            )

        live = self._live.get(host)
        if live is None or not live.conn.connected:
            return failure(
                "unreachable", f"follower {host!r} is not connected to this access point"
            )
        request = ExecRequest(
            request_id=uuid.uuid4().hex, command=list(command), timeout_ms=timeout_ms
        )
        try:
            reply = await live.conn.open_rpc(request, timeout=budget_ms / 1000)
        except RpcTimeout as exc:
            return failure("timeout", exc.message)
        except RpcConnectionLost as exc:
            return failure("unreachable", exc.message)
        except RpcError as exc:
            return failure("failed", exc.message)
        except FrameError as exc:
            return failure("failed", f"request not sent: {exc.message}")
        if not isinstance(reply, ExecResult):
            return failure(
                "failed", f"follower {host!r} answered {type(reply).__name__}, expected ExecResult"
            )
        ok = reply.exit_code == 0
        return HostExec(
            host=host,
            state="ok" if ok else "failed",
            exit_code=reply.exit_code,
            stdout=reply.stdout,
            stderr=reply.stderr,
            took_ms=took(),
            error=None if ok else f"exit code {reply.exit_code}",
        )

    async def enroll(self, req: EnrollRequest) -> EnrollResponse:
        """Verify the one-time token, sign the CSR, record the follower (token consumed last,
        atomically with the registry entry, so a refused CSR does not burn the token)."""
        try:
            claims = self._verifier.verify_enroll(req.token, req.name)
        except TokenError as exc:
            _log.warning(
                "refused enrollment of {!r}: token {}: {}", req.name, exc.reason, exc.message
            )
            raise EnrollmentRefused(_REFUSALS.get(exc.reason, "unknown"), exc.message) from None
        trust_domain = self.state.trust_domain
        try:
            cert = issue_from_csr(
                self.state.ca, req.csr_pem, spiffe_id_for_follower(trust_domain, claims.name)
            )
        except CertificateRequestError as exc:
            _log.warning("refused enrollment of {!r}: {}", req.name, exc)
            raise EnrollmentRefused("malformed", str(exc)) from None
        tags = {**req.tags, **claims.tags}
        if not self.registry.enroll(claims.name, tags, claims.jti, claims.exp):
            message = f"enrollment token {claims.jti} for {claims.name!r} was already used"
            _log.warning("refused enrollment of {!r}: token reused: {}", req.name, message)
            raise EnrollmentRefused("reused", message)
        if self.quic_address is None:  # pragma: no cover - the API starts after QUIC
            raise RuntimeError("enrollment before the QUIC listener is up")
        _log.info(
            "enrolled follower {!r} as {} (tags {}, token {})",
            claims.name,
            spiffe_id_for_follower(trust_domain, claims.name),
            tags,
            claims.jti,
        )
        return EnrollResponse(
            name=claims.name,
            certificate_pem=cert.public_bytes(serialization.Encoding.PEM).decode(),
            ca_pem=self.ca_pem(),
            trust_domain=trust_domain,
            access_point_quic=self.quic_address,
        )

    def ca_pem(self) -> str:
        return self.state.ca.cert_pem.decode()

    def ca_fingerprint(self) -> str:
        return self.state.ca.fingerprint

    def is_ready(self) -> bool:
        return self.ready

    # -- lifecycle -------------------------------------------------------------------------

    def close(self) -> None:
        """Persist when every still-connected follower was last seen; stop timers."""
        if self._persist_timer is not None:
            self._persist_timer.cancel()
            self._persist_timer = None
        for live in self._live.values():
            if live.offline_timer is not None:
                live.offline_timer.cancel()
        with contextlib.suppress(Exception):
            self.registry.touch_many(
                [(name, live.last_heartbeat_ms) for name, live in self._live.items()]
            )
        self._live.clear()


def _address(conn: FollowerConnection) -> str:
    address = conn.peer_address
    return f"{address[0]}:{address[1]}" if address else "an unknown address"
