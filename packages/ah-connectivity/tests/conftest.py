"""Shared fixtures: an in-memory fleet PKI, follower infos, a recording server handler."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pytest
from ah_connectivity import (
    FleetCA,
    FollowerConnection,
    Identity,
    generate_private_key,
    issue_from_csr,
    issue_server_cert,
    make_csr,
    spiffe_id_for_follower,
)
from ah_domain_types import ControlMessage, FollowerHealth, FollowerInfo, OsKind, Resources

TRUST_DOMAIN = "test.fleet"

T = TypeVar("T")


def _run(coro: Coroutine[Any, Any, T], timeout: float = 20.0) -> T:
    """Run one async test body with an overall deadline."""

    async def bounded() -> T:
        async with asyncio.timeout(timeout):
            return await coro

    return asyncio.run(bounded())


@pytest.fixture(scope="session")
def run() -> Callable[..., Any]:
    return _run


def make_follower_info(name: str) -> FollowerInfo:
    return FollowerInfo(
        name=name,
        os=OsKind.LINUX,
        arch="x86_64",
        tags={"role": "test"},
        resources=Resources(cpus=2, memory_mb=1024),
        host_key_fingerprint="SHA256:dGVzdGtleQ",
        direct_address=None,
        workspace="/tmp/ws",
        version="0.1.0",
    )


@dataclass
class Fleet:
    ca: FleetCA
    server: Identity
    trust_domain: str = TRUST_DOMAIN

    def follower(self, name: str, ca: FleetCA | None = None) -> Identity:
        """A follower identity issued the way enrollment does it (CSR → certificate)."""
        issuer = ca or self.ca
        key = generate_private_key()
        cert = issue_from_csr(
            issuer, make_csr(key, name), spiffe_id_for_follower(issuer.trust_domain, name)
        )
        return Identity(key=key, cert=cert)


@pytest.fixture(scope="session")
def follower_info() -> Callable[[str], FollowerInfo]:
    return make_follower_info


@pytest.fixture(scope="session")
def fleet() -> Fleet:
    ca = FleetCA.generate(TRUST_DOMAIN)
    return Fleet(ca=ca, server=issue_server_cert(ca))


@dataclass
class RecordingHandler:
    """A ControlServerHandler that records every callback and lets tests wait on them."""

    events: list[tuple[str, str, Any]] = field(default_factory=list)
    conns: dict[str, FollowerConnection] = field(default_factory=dict)
    _changed: asyncio.Event | None = None

    def _record(self, kind: str, name: str, value: Any) -> None:
        self.events.append((kind, name, value))
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    def on_follower_connected(self, name: str, conn: FollowerConnection) -> None:
        self.conns[name] = conn
        self._record("connected", name, conn)

    def on_control_message(self, name: str, conn: FollowerConnection, msg: ControlMessage) -> None:
        self._record("message", name, msg)

    def on_follower_health(
        self, name: str, conn: FollowerConnection, health: FollowerHealth
    ) -> None:
        self._record("health", name, health)

    def on_follower_disconnected(self, name: str, conn: FollowerConnection, reason: str) -> None:
        self._record("disconnected", name, reason)

    def of(self, kind: str, name: str | None = None) -> list[Any]:
        return [v for k, n, v in self.events if k == kind and (name is None or n == name)]

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 5.0) -> None:
        async with asyncio.timeout(timeout):
            while not predicate():
                if self._changed is None:
                    self._changed = asyncio.Event()
                await self._changed.wait()


@pytest.fixture
def handler() -> RecordingHandler:
    return RecordingHandler()
