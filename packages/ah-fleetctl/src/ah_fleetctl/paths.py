"""Data-plane path selection for the leader: the asyncio shell around ``PathSelector``.

For each follower the candidates are, in order (config ``path-policy.methods``):

* ``direct`` — TCP to the address the follower advertised, when ``path-policy`` allows it
  (``allow-direct``, ``direct-hosts``, ``direct-tags``);
* ``connect`` — ``CONNECT <follower>:22`` on the configured access point's TLS CONNECT
  listener (its port comes from ``GET /api/v1/endpoints``);
* ``relay`` — ``CONNECT <follower>@<home-host>:<home-port>:22`` on each access point of
  ``path-policy.relays``, which forwards to the home access point.

A method passes when SSH over it completes the handshake with the host key the follower
reported over its authenticated control connection and the liveness probe
(``uname -a && id -u``) succeeds; the first that passes is **fixed** (``connect.path.fixed``).
Each attempt gets ``timeouts.connect`` (5 s), the whole search ``timeouts.overall`` (60 s).
While fixed, a health probe runs every ``path-policy.probe-interval`` (30 s, timeout
``path-policy.probe-timeout`` 1 s); ``path-policy.probe-failures`` (3) failures in a row →
``connect.path.degraded``, then re-establishing (last good method first) →
``connect.path.restored``. When no method works: ``connect.path.failed`` with every attempt's
method, error and timestamps, and :class:`PathUnreachable` naming the best reason.

:class:`PathConnector` is the :class:`~ah_fleetctl.dataplane.HostConnector` the commands use;
events go to an optional sink callable (and the log).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import socket
import ssl
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit

import msgspec
from loguru import logger

from ah_config import CliError
from ah_connectivity.connect_client import ConnectRefused, open_connect_tunnel
from ah_connectivity.path_selection import (
    METHOD_ORDER,
    Degraded,
    Diagnostic,
    FailureKind,
    FixPath,
    GiveUp,
    PathAction,
    PathCandidate,
    PathPhase,
    PathSelector,
    PathTimeout,
    Restored,
    ScheduleProbe,
    TryMethod,
)
from ah_connectivity.pki import PeerVerificationError
from ah_domain_types import (
    EVENT_CLASSES,
    EVENT_TYPES,
    Event,
    FollowerStatus,
    OsKind,
    PathAttemptFailure,
    PathFailedEvent,
    PathPolicyConfig,
    PathRecord,
    TransportMethod,
    parse_duration,
    parse_host_port,
)
from ah_ssh_bridge import SshError, SshOptions, SshTransport, tcp_connect

from .agent_proto import HostPath
from .dataplane import FollowerUnreachable, SshLogin, control_dir, direct_refusal, ssh_login

if TYPE_CHECKING:
    from .context import FleetContext

__all__ = [
    "AccessPointEndpoint",
    "AttemptError",
    "FollowerPath",
    "PathConnector",
    "PathDialer",
    "PathSettings",
    "PathUnreachable",
    "classify_failure",
    "establish_paths",
    "event_type",
    "host_path",
    "make_path_connector",
    "path_candidates",
    "path_settings",
]

_log = logger.bind(component="ah-fleetctl.paths")
_T = TypeVar("_T")

EventSink = Callable[[Event], None]


@dataclass(frozen=True)
class PathSettings:
    """Deadlines and health probing (config ``timeouts.*`` and ``path-policy.probe-*``)."""

    per_method_timeout_s: float = 5.0
    overall_timeout_s: float = 60.0
    probe_interval_s: float = 30.0
    probe_timeout_s: float = 1.0
    failures_to_degrade: int = 3
    session_id: str = ""
    """``sessionId`` of the events (config ``session``), empty outside a session."""


class AccessPointEndpoint(msgspec.Struct, frozen=True, rename="camel"):
    """An access point's CONNECT listener as this leader reaches it."""

    url: str
    """Its API URL (``https://host:port``)."""
    host: str
    connect_port: int

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.connect_port}"


class AttemptError(Exception):
    """One attempt failed; ``kind`` classifies it for the diagnostic."""

    def __init__(self, kind: FailureKind, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


class PathUnreachable(FollowerUnreachable):
    """No method reached the follower; ``diagnostic`` holds every attempt."""

    def __init__(self, host: str, reason: str, *, kind: str, diagnostic: Diagnostic | None) -> None:
        super().__init__(host, reason, kind=kind)
        self.diagnostic = diagnostic


def classify_failure(exc: BaseException) -> tuple[FailureKind, str]:
    """The failure kind of an exception raised while dialling, tunnelling or logging in."""
    if isinstance(exc, AttemptError):
        return exc.kind, exc.message
    if isinstance(exc, ConnectRefused):
        kind = FailureKind.AUTH if exc.status in (401, 403, 407) else FailureKind.PROXY
        return kind, f"access point answered {exc.status} {exc.reason}: {exc.message}"
    if isinstance(exc, PeerVerificationError):
        return FailureKind.TLS, f"access point failed verification: {exc}"
    if isinstance(exc, ssl.SSLError):
        return FailureKind.TLS, f"TLS to the access point failed: {exc}"
    if isinstance(exc, SshError):
        try:
            kind = FailureKind(exc.kind)
        except ValueError:
            kind = FailureKind.OTHER
        return kind, str(exc)
    if isinstance(exc, ConnectionRefusedError):
        return FailureKind.REFUSED, f"connection refused: {exc}"
    if isinstance(exc, TimeoutError):
        return FailureKind.TIMEOUT, f"timed out: {exc}" if str(exc) else "timed out"
    if isinstance(exc, ConnectionError):
        return FailureKind.CONNECTION_LOST, str(exc)
    if isinstance(exc, OSError):
        return FailureKind.UNREACHABLE, exc.strerror or str(exc)
    return FailureKind.OTHER, f"{type(exc).__name__}: {exc}"


async def _owned_socket_in_thread(
    fn: Callable[[], socket.socket],
) -> socket.socket:
    """Run a blocking dial in a thread; a socket that arrives after we gave up is closed."""
    future = asyncio.get_running_loop().run_in_executor(None, fn)
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:

        def close_late(done: asyncio.Future[socket.socket]) -> None:
            if not done.cancelled() and done.exception() is None:
                with contextlib.suppress(OSError):
                    done.result().close()

        future.add_done_callback(close_late)
        raise


class PathDialer:
    """Opens the socket of a candidate and logs in over it (the I/O of one attempt)."""

    def __init__(
        self,
        *,
        login: SshLogin,
        options: SshOptions,
        home: AccessPointEndpoint | None,
        relays: Sequence[AccessPointEndpoint] = (),
        ca_pem: bytes | None = None,
        token: str | None = None,
    ) -> None:
        self.login = login
        self.options = options
        self.home = home
        self.relays = {r.address: r for r in relays}
        self.ca_pem = ca_pem
        self.token = token

    def endpoint_for(self, candidate: PathCandidate) -> AccessPointEndpoint | None:
        """The access point a connect/relay candidate sends its CONNECT to."""
        if candidate.method is TransportMethod.CONNECT:
            return self.home
        if candidate.method is TransportMethod.RELAY and candidate.relay is not None:
            return self.relays.get(candidate.relay)
        return None

    def open_socket(self, name: str, candidate: PathCandidate, timeout: float) -> socket.socket:
        """A connected socket leading to the follower's sshd (blocking)."""
        if candidate.method is TransportMethod.DIRECT:
            host, port = parse_host_port(candidate.target, default_port=22)
            return tcp_connect(name, host, port, timeout)
        endpoint = self.endpoint_for(candidate)
        if endpoint is None or self.ca_pem is None:
            raise AttemptError(
                FailureKind.OTHER, f"no access point known for {candidate.describe()}"
            )
        sock = open_connect_tunnel(
            endpoint.host,
            endpoint.connect_port,
            ca_pem=self.ca_pem,
            token=self.token,
            target=candidate.target,
            timeout=timeout,
        )
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # A TlsSocket may be read by paramiko's transport thread while others write to it
        # (one thread inside OpenSSL at a time, records sent whole even across paramiko's
        # 0.1 s socket timeouts): no bridge thread, no extra hop.
        return sock

    def options_for(self, follower: FollowerStatus) -> SshOptions:
        if follower.info.os is OsKind.WINDOWS and self.options.process_control:
            return msgspec.structs.replace(self.options, process_control=False)
        return self.options

    async def attempt(
        self, follower: FollowerStatus, candidate: PathCandidate, timeout: float
    ) -> tuple[SshTransport, float]:
        """Dial, log in (host key checked), probe; the transport and the probe's RTT (ms).

        Raises :class:`AttemptError`."""
        name = follower.info.name
        started = time.monotonic()
        try:
            sock = await _owned_socket_in_thread(lambda: self.open_socket(name, candidate, timeout))
            transport = await SshTransport.open(
                sock,
                host=name,
                username=self.login.user_for(name),
                key_path=self.login.identity_file,
                expected_fingerprint=follower.info.host_key_fingerprint,
                options=self.options_for(follower),
            )
        except (AttemptError, SshError, ConnectRefused, PeerVerificationError, OSError) as exc:
            kind, message = classify_failure(exc)
            raise AttemptError(kind, message) from exc
        except ValueError as exc:
            raise AttemptError(FailureKind.OTHER, str(exc)) from exc
        remaining = max(0.2, timeout - (time.monotonic() - started))
        probe = await transport.probe(timeout=remaining)
        if not probe.ok:
            with contextlib.suppress(Exception):
                await transport.close()
            raise AttemptError(FailureKind.PROBE, probe.error or "liveness probe failed")
        return transport, float(probe.rtt_ms or 0.0)


# --------------------------------------------------------------------------- candidates


def path_candidates(
    follower: FollowerStatus,
    policy: PathPolicyConfig | None,
    home: AccessPointEndpoint | None,
    relays: Sequence[AccessPointEndpoint] = (),
) -> tuple[list[PathCandidate], list[str]]:
    """The candidates for ``follower`` under ``policy``, and why other methods are left out."""
    info = follower.info
    name = info.name
    methods: Sequence[TransportMethod] = (
        policy.methods if policy is not None and policy.methods else METHOD_ORDER
    )
    candidates: list[PathCandidate] = []
    excluded: list[str] = []
    for method in methods:
        if method is TransportMethod.DIRECT:
            refusal = direct_refusal(follower, policy)
            if refusal is not None:
                excluded.append(f"direct: {refusal}")
            elif info.direct_address is None:
                excluded.append(f"direct: {name} advertises no direct SSH address")
            else:
                candidates.append(PathCandidate(method=method, target=info.direct_address))
        elif method is TransportMethod.CONNECT:
            if home is None:
                excluded.append("connect: the access point serves no CONNECT listener")
            else:
                candidates.append(PathCandidate(method=method, target=f"{name}:22"))
        elif method is TransportMethod.RELAY:
            if home is None or not relays:
                excluded.append("relay: no relaying access point configured (path-policy.relays)")
                continue
            home_host = f"[{home.host}]" if ":" in home.host else home.host
            for relay in relays:
                candidates.append(
                    PathCandidate(
                        method=method,
                        target=f"{name}@{home_host}:{home.connect_port}:22",
                        relay=relay.address,
                    )
                )
    for method in METHOD_ORDER:
        if method not in methods:
            excluded.append(f"{method.value}: not in path-policy.methods")
    return candidates, excluded


# --------------------------------------------------------------------------- driver


def _wall_offset_ms() -> float:
    """Add to ``loop.time() * 1000`` for wall-clock milliseconds."""
    return time.time() * 1000.0 - asyncio.get_running_loop().time() * 1000.0


class FollowerPath:
    """The fixed path of one follower, its transport, and its health probing."""

    def __init__(
        self,
        follower: FollowerStatus,
        candidates: Iterable[PathCandidate],
        dialer: PathDialer,
        settings: PathSettings,
        *,
        excluded: Sequence[str] = (),
        emit: EventSink | None = None,
    ) -> None:
        self.follower = follower
        self.name = follower.info.name
        self.dialer = dialer
        self.settings = settings
        self.excluded = list(excluded)
        self.selector = PathSelector(
            self.name,
            candidates,
            per_method_timeout_s=settings.per_method_timeout_s,
            overall_timeout_s=settings.overall_timeout_s,
            probe_interval_s=settings.probe_interval_s,
            probe_timeout_s=settings.probe_timeout_s,
            failures_to_degrade=settings.failures_to_degrade,
        )
        self._emit = emit
        self.transport: SshTransport | None = None
        self.diagnostic: Diagnostic | None = None
        self.events: list[Event] = []
        """Every event this follower's path published, oldest first."""
        self._lock = asyncio.Lock()
        self._probe_task: asyncio.Task[None] | None = None
        self._retry_task: asyncio.Task[None] | None = None
        self._degraded_from: PathRecord | None = None
        self._offset_ms = _wall_offset_ms()
        self._closed = False

    # -- state --------------------------------------------------------------------------

    @property
    def path(self) -> PathRecord | None:
        """The fixed path (None while there is none); RTT is the smoothed estimate."""
        path = self.selector.path
        rtt = self.selector.rtt_estimate_ms
        if path is not None and rtt is not None and rtt != path.rtt_estimate_ms:
            return msgspec.structs.replace(path, rtt_estimate_ms=round(rtt, 3))
        return path

    @property
    def phase(self) -> PathPhase:
        return self.selector.phase

    def _is_fixed(self) -> bool:
        return self.selector.phase is PathPhase.FIXED

    @staticmethod
    def _now() -> float:
        return asyncio.get_running_loop().time()

    def _wall_ms(self, loop_s: float) -> float:
        return round(loop_s * 1000.0 + self._offset_ms, 3)

    # -- public -------------------------------------------------------------------------

    def ready_transport(self) -> SshTransport | None:
        """The fixed path's transport when :meth:`transport_now` would hand it out at once
        (nobody is selecting, it is up), else None; no task switch, no lock."""
        transport = self.transport
        if (
            self._closed
            or self._lock.locked()
            or self.selector.phase is not PathPhase.FIXED
            or transport is None
            or not transport.is_active
        ):
            return None
        return transport

    async def transport_now(self) -> SshTransport:
        """The transport of the fixed path, selecting (or re-establishing) one first.

        Raises :class:`PathUnreachable` naming the most informative failure."""
        async with self._lock:
            if self._closed:
                raise PathUnreachable(
                    self.name, f"{self.name}: path closed", kind="other", diagnostic=None
                )
            transport = self.transport
            if self.phase is PathPhase.FIXED and transport is not None and transport.is_active:
                return transport
            if self.phase is PathPhase.FIXED:
                # The transport died between probes: that is a failed path, re-establish now.
                reason = f"{self.name}: SSH transport lost"
                actions: list[PathAction] = []
                while self.phase is PathPhase.FIXED:
                    actions += self.selector.probe_failed(
                        reason, self._now(), kind=FailureKind.CONNECTION_LOST
                    )
                await self._drive(actions)
            elif self.phase in (PathPhase.IDLE, PathPhase.FAILED):
                await self._drive(self.selector.start(self._now()))
            transport = self.transport
            if self._is_fixed() and transport is not None:
                return transport
            raise self._unreachable()

    async def close(self) -> None:
        self._closed = True
        for task in (self._probe_task, self._retry_task):
            if task is not None and task is not asyncio.current_task():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        transport, self.transport = self.transport, None
        if transport is not None:
            with contextlib.suppress(Exception):
                await transport.close()

    # -- the shell ----------------------------------------------------------------------

    def _unreachable(self) -> PathUnreachable:
        diagnostic = self.diagnostic
        excluded = f" (not tried: {'; '.join(self.excluded)})" if self.excluded else ""
        if diagnostic is None or not diagnostic.failures:
            return PathUnreachable(
                self.name,
                f"{self.name}: no method may be used to reach it{excluded}",
                kind="policy" if self.excluded else "no-address",
                diagnostic=diagnostic,
            )
        best = diagnostic.best_reason
        kind = best.kind.value if best is not None else "other"
        return PathUnreachable(
            self.name, diagnostic.message + excluded, kind=kind, diagnostic=diagnostic
        )

    def _publish(self, event: Event) -> None:
        self.events.append(event)
        _log.debug("{}: {}", self.name, _describe_event(event))
        if self._emit is not None:
            try:
                self._emit(event)
            except Exception:
                _log.exception("path event sink failed")

    def _failed_event(self, diagnostic: Diagnostic) -> PathFailedEvent:
        failures = [
            PathAttemptFailure(
                method=f.method,
                target=f.target,
                relay=f.relay,
                kind=f.kind.value,
                error=f.error,
                started_ms=self._wall_ms(f.started),
                ended_ms=self._wall_ms(f.ended),
                stage="probe" if f.stage == "probe" else "attempt",
            )
            for f in diagnostic.failures
        ]
        return PathFailedEvent(
            host=self.name,
            reason=self._unreachable().reason,
            timed_out=isinstance(diagnostic, PathTimeout),
            methods_tried=list(diagnostic.methods_tried),
            failures=failures,
            session_id=self.settings.session_id,
            ts_ms=time.time() * 1000.0,
        )

    async def _drive(self, actions: Iterable[PathAction]) -> None:
        """Carry out the selector's actions (and those that follow from them), in order."""
        queue: deque[PathAction] = deque(actions)
        session = self.settings.session_id
        while queue:
            action = queue.popleft()
            if isinstance(action, TryMethod):
                queue.extend(await self._attempt(action))
            elif isinstance(action, FixPath):
                self.diagnostic = None
                if self._degraded_from is not None:
                    # Restored after a round that gave up: still a restoration.
                    restored = Restored(action.host, action.path, self._degraded_from)
                    self._degraded_from = None
                    self._publish(restored.event(session, time.time() * 1000.0))
                else:
                    self._publish(action.event(session, time.time() * 1000.0))
            elif isinstance(action, Restored):
                self.diagnostic = None
                self._degraded_from = None
                self._publish(action.event(session, time.time() * 1000.0))
            elif isinstance(action, Degraded):
                transport, self.transport = self.transport, None
                if transport is not None:
                    with contextlib.suppress(Exception):
                        await transport.close()
                self._degraded_from = action.path
                self._publish(action.event(session, time.time() * 1000.0))
            elif isinstance(action, ScheduleProbe):
                self._schedule_probe(action.at, action.timeout_s)
            elif isinstance(action, GiveUp):
                self.diagnostic = action.diagnostic
                self._publish(self._failed_event(action.diagnostic))
                if self._degraded_from is not None:
                    self._schedule_retry()

    async def _attempt(self, action: TryMethod) -> list[PathAction]:
        candidate = action.candidate
        remaining = max(0.0, action.deadline - self._now())
        _log.debug("{}: trying {} ({:.1f}s)", self.name, candidate.describe(), remaining)
        try:
            async with asyncio.timeout(remaining):
                transport, rtt_ms = await self.dialer.attempt(self.follower, candidate, remaining)
        except TimeoutError:
            return self.selector.attempt_timed_out(candidate, max(self._now(), action.deadline))
        except AttemptError as exc:
            _log.debug("{}: {} failed: {}", self.name, candidate.describe(), exc.message)
            return self.selector.attempt_failed(candidate, exc.message, self._now(), kind=exc.kind)
        actions = self.selector.attempt_succeeded(candidate, rtt_ms, self._now())
        if any(isinstance(a, (FixPath, Restored)) for a in actions):
            old, self.transport = self.transport, transport
            if old is not None and old is not transport:
                with contextlib.suppress(Exception):
                    await old.close()
        else:  # a stale success (the attempt had already timed out)
            with contextlib.suppress(Exception):
                await transport.close()
        return actions

    def _schedule_probe(self, at: float, timeout_s: float) -> None:
        current = asyncio.current_task()
        if self._probe_task is not None and self._probe_task is not current:
            self._probe_task.cancel()
        self._probe_task = asyncio.get_running_loop().create_task(
            self._probe_at(at, timeout_s), name=f"path-probe-{self.name}"
        )

    async def _probe_at(self, at: float, timeout_s: float) -> None:
        await asyncio.sleep(max(0.0, at - self._now()))
        async with self._lock:
            if self._closed or self.phase is not PathPhase.FIXED:
                return
            transport = self.transport
            if transport is None or transport.closed:
                return  # its owner closed it: nothing left to watch
            result = await transport.probe(timeout=timeout_s)
            now = self._now()
            if result.ok:
                actions = self.selector.probe_succeeded(float(result.rtt_ms or 0.0), now)
            else:
                error = result.error or "health probe failed"
                kind = FailureKind.CONNECTION_LOST if not transport.is_active else FailureKind.PROBE
                _log.info("{}: health probe failed: {}", self.name, error)
                actions = self.selector.probe_failed(error, now, kind=kind)
            await self._drive(actions)

    def _schedule_retry(self) -> None:
        if self._closed or (self._retry_task is not None and not self._retry_task.done()):
            return
        self._retry_task = asyncio.get_running_loop().create_task(
            self._retry_later(), name=f"path-retry-{self.name}"
        )

    async def _retry_later(self) -> None:
        """Keep re-establishing a degraded path (every probe interval) until it works."""
        await asyncio.sleep(self.settings.probe_interval_s)
        async with self._lock:
            if self._closed or self.phase is not PathPhase.FAILED:
                return
            await self._drive(self.selector.start(self._now()))


_EVENT_TYPE_OF: dict[type, str] = dict(zip(EVENT_CLASSES, EVENT_TYPES, strict=True))


def event_type(event: Event) -> str:
    """The ``type`` tag of an event (``connect.path.fixed``...)."""
    return _EVENT_TYPE_OF.get(type(event), type(event).__name__)


def _describe_event(event: Event) -> str:
    path = getattr(event, "path", None)
    what = path.describe() if isinstance(path, PathRecord) else ""
    if isinstance(event, PathFailedEvent):
        what = event.reason
    return f"{event_type(event)} {what}".strip()


# --------------------------------------------------------------------------- connector


class PathConnector:
    """The ``HostConnector`` of path selection: one :class:`FollowerPath` per follower."""

    def __init__(
        self,
        dialer: PathDialer,
        settings: PathSettings,
        policy: PathPolicyConfig | None,
        *,
        emit: EventSink | None = None,
        ca_file: Path | None = None,
        token_file: Path | None = None,
        connect_problem: str | None = None,
    ) -> None:
        self.dialer = dialer
        self.settings = settings
        self.policy = policy
        self.emit = emit
        self.ca_file = ca_file
        self.token_file = token_file
        self.connect_problem = connect_problem
        """Why the access point's CONNECT endpoint is unknown (shown in diagnostics)."""
        self.paths: dict[str, FollowerPath] = {}

    @property
    def overall_timeout_s(self) -> float:
        """How long :meth:`connect` may take (``FleetLinks`` waits this long)."""
        return self.settings.overall_timeout_s + 1.0

    def driver(self, follower: FollowerStatus) -> FollowerPath:
        """The path driver of ``follower`` (a new one when what it advertises changed)."""
        name = follower.info.name
        current = self.paths.get(name)
        if current is not None and _same_reachability(current.follower, follower):
            return current
        if current is not None:
            _log.info("{}: advertised address or host key changed; selecting a new path", name)
            old = current

            async def close_old() -> None:
                await old.close()

            with contextlib.suppress(RuntimeError):
                asyncio.get_running_loop().create_task(close_old())
        relays = list(self.dialer.relays.values())
        candidates, excluded = path_candidates(follower, self.policy, self.dialer.home, relays)
        if self.connect_problem:
            excluded = [
                f"connect: {self.connect_problem}" if e.startswith("connect:") else e
                for e in excluded
            ]
        driver = FollowerPath(
            follower, candidates, self.dialer, self.settings, excluded=excluded, emit=self.emit
        )
        self.paths[name] = driver
        return driver

    async def connect(self, follower: FollowerStatus) -> SshTransport:
        return await self.driver(follower).transport_now()

    def ready_transport(self, follower: FollowerStatus) -> SshTransport | None:
        """What :meth:`connect` returns when it needs no work (the follower's fixed path is
        up, its advertised reachability unchanged), else None: then call :meth:`connect`."""
        current = self.paths.get(follower.info.name)
        if current is None or not _same_reachability(current.follower, follower):
            return None
        return current.ready_transport()

    def record(self, name: str) -> PathRecord | None:
        driver = self.paths.get(name)
        return driver.path if driver is not None else None

    def openssh_options(self, follower: FollowerStatus) -> dict[str, str]:
        """OpenSSH options reaching the follower over its fixed path (``ProxyCommand`` for
        connect/relay); :class:`FollowerUnreachable` when no path is fixed."""
        name = follower.info.name
        path = self.record(name)
        if path is None:
            raise FollowerUnreachable(name, f"{name}: no fixed path", kind="no-address")
        return openssh_options_for(
            name,
            path,
            user=self.dialer.login.user_for(name),
            identity_file=self.dialer.login.identity_file,
            home=self.dialer.home,
            relays=self.dialer.relays,
            ca_file=self.ca_file,
            token_file=self.token_file,
        )

    async def close(self) -> None:
        paths = list(self.paths.values())
        self.paths.clear()
        for driver in paths:
            await driver.close()


def _same_reachability(a: FollowerStatus, b: FollowerStatus) -> bool:
    return (
        a.info.direct_address == b.info.direct_address
        and a.info.host_key_fingerprint == b.info.host_key_fingerprint
    )


def proxy_command_argv(
    endpoint: AccessPointEndpoint, target: str, *, ca_file: Path, token_file: Path | None
) -> list[str]:
    """A ProxyCommand that tunnels through ``endpoint`` (``ah_connectivity.connect_client``)."""
    argv = [
        sys.executable,
        "-m",
        "ah_connectivity.connect_client",
        "--access-point",
        endpoint.address,
        "--ca-file",
        str(ca_file),
    ]
    if token_file is not None:
        argv += ["--token-file", str(token_file)]
    return [*argv, target]


def openssh_options_for(
    name: str,
    path: PathRecord,
    *,
    user: str,
    identity_file: Path,
    home: AccessPointEndpoint | None,
    relays: Mapping[str, AccessPointEndpoint],
    ca_file: Path | None,
    token_file: Path | None,
) -> dict[str, str]:
    base = {"User": user, "IdentityFile": str(identity_file)}
    if path.method is TransportMethod.DIRECT:
        host, port = parse_host_port(path.target, default_port=22)
        return {"HostName": host, "Port": str(port), **base}
    endpoint = home if path.method is TransportMethod.CONNECT else relays.get(path.relay or "")
    if endpoint is None or ca_file is None:
        raise FollowerUnreachable(
            name, f"{name}: no access point to tunnel through for {path.describe()}", kind="other"
        )
    argv = proxy_command_argv(endpoint, path.target, ca_file=ca_file, token_file=token_file)
    return {
        "HostName": name,
        "HostKeyAlias": name,
        "ProxyCommand": " ".join(_shell_word(a) for a in argv),
        **base,
    }


def _shell_word(text: str) -> str:
    if text and all(c.isalnum() or c in "@%+=:,./-_" for c in text):
        return text
    return "'" + text.replace("'", "'\"'\"'") + "'"


# --------------------------------------------------------------------------- from config


def path_settings(app: FleetContext) -> PathSettings:
    cfg = app.config.typed
    timeouts = cfg.timeouts
    policy = cfg.path_policy

    def seconds(value: str | float | None, default: float) -> float:
        return default if value is None else max(parse_duration(value), 0.001)

    overall = timeouts.seconds("overall") if timeouts is not None else None
    return PathSettings(
        per_method_timeout_s=app.connect_timeout_s(),
        overall_timeout_s=max(overall, 0.001) if overall is not None else 60.0,
        probe_interval_s=seconds(policy.probe_interval if policy else None, 30.0),
        probe_timeout_s=seconds(policy.probe_timeout if policy else None, 1.0),
        failures_to_degrade=(policy.probe_failures if policy and policy.probe_failures else 3),
        session_id=cfg.session or "",
    )


def runtime_dir() -> Path:
    """The private (0700) runtime directory of the leader's data plane (beside the
    ControlMaster sockets)."""
    return control_dir().parent


def write_private_file(name: str, data: bytes) -> Path:
    """``data`` in a 0600 file of :func:`runtime_dir` named by ``name`` and its content hash."""
    digest = hashlib.sha256(data).hexdigest()[:16]
    path = runtime_dir() / f"{name}-{digest}"
    if not path.exists():
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(temporary, path)
    return path


def _endpoint_from_api(app: FleetContext, url: str, client: Any) -> AccessPointEndpoint | None:
    response = client.endpoints()
    if response.connect_port is None:
        return None
    host = response.connect_host or urlsplit(url).hostname or "127.0.0.1"
    return AccessPointEndpoint(url=url, host=host, connect_port=response.connect_port)


def make_path_connector(app: FleetContext, *, emit: EventSink | None = None) -> PathConnector:
    """The connector of this invocation: login, policy, deadlines and the access points'
    CONNECT endpoints (asked of their APIs only when connect or relay may be used)."""
    from .context import normalize_access_point

    login = ssh_login(app)
    cfg = app.config.typed
    policy = cfg.path_policy
    settings = path_settings(app)
    options = SshOptions(connect_timeout_s=settings.per_method_timeout_s)
    methods = policy.methods if policy is not None and policy.methods else list(METHOD_ORDER)
    wants_tunnels = any(m is not TransportMethod.DIRECT for m in methods)
    home: AccessPointEndpoint | None = None
    relays: list[AccessPointEndpoint] = []
    ca_pem: bytes | None = None
    token: str | None = None
    ca_file = app.ca_file()
    token_file: Path | None = None
    problem: str | None = None
    if wants_tunnels:
        token = app.token()
        client = app.api_client()
        try:
            url = app.access_point()
            try:
                home = _endpoint_from_api(app, url, client)
            except CliError as exc:
                problem = f"cannot learn the CONNECT port of {url}: {exc.message}"
                _log.info("{}", problem)
            if ca_file is not None:
                ca_pem = ca_file.read_bytes()
            else:
                ca_pem = client.ca_pem().encode()
                ca_file = write_private_file("fleet-ca.pem", ca_pem)
        finally:
            client.close()
        token_file = write_private_file("token", token.encode())
        for text in (policy.relays or []) if policy is not None else []:
            relay_url = normalize_access_point(text, source="path-policy.relays")
            relay_client = _client_for(app, relay_url)
            try:
                relay = _endpoint_from_api(app, relay_url, relay_client)
            except CliError as exc:
                _log.info("relay access point {} unusable: {}", relay_url, exc.message)
                relay = None
            finally:
                relay_client.close()
            if relay is not None:
                relays.append(relay)
    dialer = PathDialer(
        login=login, options=options, home=home, relays=relays, ca_pem=ca_pem, token=token
    )
    return PathConnector(
        dialer,
        settings,
        policy,
        emit=emit,
        ca_file=ca_file,
        token_file=token_file,
        connect_problem=problem,
    )


def _client_for(app: FleetContext, url: str) -> Any:
    from .client import ApiClient, tls_context

    ca_file = app.ca_file()
    return ApiClient(
        url,
        token=app.token(),
        verify=tls_context(ca_file) if ca_file is not None else tls_context(),
        ca_description=f"the fleet CA {ca_file}" if ca_file else "the system trust store",
        connect_timeout_s=app.connect_timeout_s(),
    )


# --------------------------------------------------------------------------- reports


def host_path(
    connector: PathConnector, name: str, error: FollowerUnreachable | None = None
) -> HostPath:
    """What :class:`HostPath` reports for ``name`` after selection."""
    driver = connector.paths.get(name)
    record = driver.path if driver is not None else None
    transport = driver.transport if driver is not None else None
    failures: list[PathAttemptFailure] = []
    if driver is not None and driver.events:
        last = driver.events[-1]
        if isinstance(last, PathFailedEvent):
            failures = list(last.failures)
    if record is None:
        return HostPath(
            host=name,
            error=error.reason if error is not None else f"{name}: no fixed path",
            kind=error.kind if error is not None else "other",
            failures=failures,
        )
    return HostPath(
        host=name,
        method=record.method,
        target=record.target,
        relay=record.relay,
        rtt_estimate_ms=record.rtt_estimate_ms,
        host_key=transport.host_public_key if transport is not None else None,
    )


async def establish_paths(
    connector: PathConnector, followers: Sequence[FollowerStatus]
) -> list[HostPath]:
    """Select (or reuse) a path for every follower, in parallel; one report each, in order."""

    async def one(follower: FollowerStatus) -> HostPath:
        try:
            await connector.connect(follower)
        except FollowerUnreachable as exc:
            return host_path(connector, follower.info.name, exc)
        return host_path(connector, follower.info.name)

    return list(await asyncio.gather(*(one(f) for f in followers)))
