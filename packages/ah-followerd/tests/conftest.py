"""A fleet PKI made in-process, an enrolled-looking state directory, and a real QUIC control
server (``ah_connectivity.ControlServer`` on 127.0.0.1:0) running in a background loop, so the
real ``ah-followerd`` binary can be driven without an access point daemon."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest

from ah_connectivity import (
    CA_CERT_FILE,
    ControlServer,
    FleetCA,
    FollowerConnection,
    Identity,
    generate_private_key,
    issue_from_csr,
    issue_server_cert,
    make_csr,
    spiffe_id_for_follower,
)
from ah_domain_types import ControlMessage, FollowerHealth
from ah_followerd.state import CERT_FILE, KEY_FILE, SETTINGS_FILE, FollowerSettings, write_settings

T = TypeVar("T")
TRUST_DOMAIN = "follower-test.fleet"
FOLLOWERD = [sys.executable, "-m", "ah_followerd"]


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("AH_")}


def run_followerd(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*FOLLOWERD, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=_env(),
        stdin=subprocess.DEVNULL,
    )


@pytest.fixture(scope="session")
def followerd() -> Any:
    """``followerd(*args)`` → CompletedProcess of one real ``ah-followerd`` invocation."""
    return run_followerd


@pytest.fixture(scope="session")
def followerd_env() -> dict[str, str]:
    return _env()


class LoopThread:
    """An asyncio loop in a daemon thread, so sync tests can drive async servers."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, fn: Callable[[], T], timeout: float = 10.0) -> T:
        async def wrapper() -> T:
            return fn()

        return self.run(wrapper(), timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


@pytest.fixture(scope="session")
def loop_thread() -> Iterator[LoopThread]:
    runner = LoopThread()
    yield runner
    runner.close()


@dataclass
class Recorder:
    """A ControlServerHandler that records every callback (read from any thread)."""

    events: list[tuple[str, str, Any]] = field(default_factory=list)
    conns: dict[str, FollowerConnection] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def _add(self, kind: str, name: str, value: Any) -> None:
        with self.lock:
            self.events.append((kind, name, value))

    def on_follower_connected(self, name: str, conn: FollowerConnection) -> None:
        with self.lock:
            self.conns[name] = conn
        self._add("connected", name, conn)

    def on_control_message(self, name: str, conn: FollowerConnection, msg: ControlMessage) -> None:
        self._add("message", name, msg)

    def on_follower_health(
        self, name: str, conn: FollowerConnection, health: FollowerHealth
    ) -> None:
        self._add("health", name, health)

    def on_follower_disconnected(self, name: str, conn: FollowerConnection, reason: str) -> None:
        self._add("disconnected", name, reason)

    def of(self, kind: str) -> list[Any]:
        with self.lock:
            return [v for k, _, v in self.events if k == kind]


@dataclass
class FakeFleet:
    """A CA, a running control server and a helper writing enrolled state directories."""

    ca: FleetCA
    server: ControlServer
    recorder: Recorder
    port: int
    loop: LoopThread

    def write_state(self, state_dir: Path, name: str, tags: dict[str, str]) -> Path:
        """What a successful ``ah-followerd enroll`` leaves behind, for follower `name`."""
        key = generate_private_key()
        cert = issue_from_csr(
            self.ca, make_csr(key, name), spiffe_id_for_follower(TRUST_DOMAIN, name)
        )
        state_dir.mkdir(parents=True)
        Identity(key=key, cert=cert).write(state_dir / CERT_FILE, state_dir / KEY_FILE)
        (state_dir / CA_CERT_FILE).write_bytes(self.ca.cert_pem)
        write_settings(
            state_dir / SETTINGS_FILE,
            FollowerSettings(
                name=name,
                trust_domain=TRUST_DOMAIN,
                access_point="127.0.0.1:1",
                quic_address=f"127.0.0.1:{self.port}",
                ca_fingerprint=self.ca.fingerprint,
                enrolled_at="2025-01-01T00:00:00+00:00",
                tags=tags,
            ),
        )
        return state_dir


@pytest.fixture
def fake_fleet(loop_thread: LoopThread) -> Iterator[FakeFleet]:
    ca = FleetCA.generate(TRUST_DOMAIN)
    recorder = Recorder()
    server = ControlServer(
        identity=issue_server_cert(ca),
        ca=ca,
        trust_domain=TRUST_DOMAIN,
        handler=recorder,
        heartbeat_interval_ms=100,
    )
    port = loop_thread.run(server.start("127.0.0.1", 0))
    try:
        yield FakeFleet(ca, server, recorder, port, loop_thread)
    finally:
        loop_thread.run(server.close())
