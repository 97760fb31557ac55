"""pytest fixtures for real local sshd instances (registered through the pytest11 entry point).

- `sshd`: one running sshd for the test, stopped when the test ends.
- `sshd_factory`: session-wide factory; `sshd_factory()` starts one, `sshd_factory.many(n)`
  starts n concurrently; everything it started is stopped when the session ends.
- `local_fleet`: session-wide `LocalFleet` (an access point and three linux followers
  ``lin-a``/``lin-b``/``lin-c`` with tags ``role=a``/``b``/``c``, mock exec, 500 ms heartbeats).
  Tests must leave it as they found it (every follower healthy).
- `local_fleet_factory`: ``local_fleet_factory([FollowerSpec(...), ...], **LocalFleet options)``
  starts a private fleet for this test, torn down when the test ends.

The fleet fixtures import the daemons lazily, so sessions that never use them pay nothing.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from ah_harness_local.processes import ProcessGroup
from ah_harness_local.sshd import (
    DEFAULT_START_TIMEOUT,
    RunningSshd,
    start_many_sshd,
    start_sshd,
)

if TYPE_CHECKING:
    from ah_harness_local.fleet import FollowerSpec, LocalFleet

__all__ = [
    "LOCAL_FLEET_SPECS",
    "SshdFactory",
    "local_fleet",
    "local_fleet_factory",
    "local_fleet_specs",
    "sshd",
    "sshd_factory",
]


class SshdFactory:
    """Starts sshd instances under one directory and owns them until `close`."""

    def __init__(self, base_dir: Path, group: ProcessGroup) -> None:
        self.base_dir = base_dir
        self.group = group
        self._counter = itertools.count()
        self._lock = threading.Lock()
        self._started: list[RunningSshd] = []

    @property
    def instances(self) -> tuple[RunningSshd, ...]:
        with self._lock:
            return tuple(self._started)

    def _next_dir(self, name: str) -> Path:
        with self._lock:
            return self.base_dir / f"{name}-{next(self._counter)}"

    def __call__(
        self,
        *,
        base_dir: Path | None = None,
        name: str = "sshd",
        port: int = 0,
        user: str | None = None,
        listen: str = "127.0.0.1",
        isolated_home: bool = True,
        session_env: Mapping[str, str] | None = None,
        fast_kex: bool = True,
        timeout: float = DEFAULT_START_TIMEOUT,
        authorized_keys: Sequence[Path] = (),
    ) -> RunningSshd:
        """Start one sshd (in `base_dir`, else a fresh directory under the factory's)."""
        running = start_sshd(
            base_dir or self._next_dir(name),
            port=port,
            user=user,
            listen=listen,
            isolated_home=isolated_home,
            session_env=session_env,
            fast_kex=fast_kex,
            timeout=timeout,
            group=self.group,
            authorized_keys=authorized_keys,
        )
        with self._lock:
            self._started.append(running)
        return running

    def many(
        self,
        n: int,
        *,
        name: str = "fleet",
        user: str | None = None,
        listen: str = "127.0.0.1",
        isolated_home: bool = True,
        session_env: Mapping[str, str] | None = None,
        fast_kex: bool = True,
        timeout: float = DEFAULT_START_TIMEOUT,
        authorized_keys: Sequence[Path] = (),
    ) -> list[RunningSshd]:
        """Start `n` sshd instances concurrently."""
        started = start_many_sshd(
            self._next_dir(name),
            n,
            user=user,
            listen=listen,
            isolated_home=isolated_home,
            session_env=session_env,
            fast_kex=fast_kex,
            timeout=timeout,
            group=self.group,
            authorized_keys=authorized_keys,
        )
        with self._lock:
            self._started.extend(started)
        return started

    def close(self) -> None:
        self.group.close()


@pytest.fixture(scope="session")
def sshd_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SshdFactory]:
    """Session-scoped sshd factory; every instance it started is stopped at session end."""
    base_dir = tmp_path_factory.mktemp("sshd")
    with ProcessGroup(base_dir) as group:
        yield SshdFactory(base_dir, group)


@pytest.fixture
def sshd(sshd_factory: SshdFactory, tmp_path: Path) -> Iterator[RunningSshd]:
    """One real sshd for this test (files under `tmp_path/sshd`), stopped afterwards."""
    running = sshd_factory(base_dir=tmp_path / "sshd")
    try:
        yield running
    finally:
        running.stop()


LOCAL_FLEET_SPECS: tuple[tuple[str, dict[str, str]], ...] = (
    ("lin-a", {"role": "a"}),
    ("lin-b", {"role": "b"}),
    ("lin-c", {"role": "c"}),
)
"""Names and tags of the session fleet's followers."""


def local_fleet_specs() -> list[FollowerSpec]:
    """The follower specs of the `local_fleet` fixture."""
    from ah_harness_local.fleet import FollowerSpec

    return [FollowerSpec(name, tags) for name, tags in LOCAL_FLEET_SPECS]


@pytest.fixture(scope="session")
def local_fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFleet]:
    """One fleet for the whole session: access point + lin-a/lin-b/lin-c (role=a/b/c)."""
    from ah_harness_local.fleet import LocalFleet

    # Heartbeats every 500 ms: health changes are not what the session fleet is for, and a
    # loaded machine must not make its followers flap.
    with LocalFleet(
        local_fleet_specs(),
        base_dir=tmp_path_factory.mktemp("local-fleet"),
        heartbeat_interval="500ms",
    ) as fleet:
        yield fleet


@pytest.fixture
def local_fleet_factory(tmp_path: Path) -> Iterator[Callable[..., LocalFleet]]:
    """Start private fleets for one test; each is torn down when the test ends."""
    from ah_harness_local.fleet import LocalFleet

    fleets: list[LocalFleet] = []

    def make(followers: Sequence[FollowerSpec], **options: Any) -> LocalFleet:
        options.setdefault("base_dir", tmp_path / f"fleet-{len(fleets)}")
        fleet = LocalFleet(followers, **options)
        fleets.append(fleet)
        fleet.start()
        return fleet

    try:
        yield make
    finally:
        errors: list[Exception] = []
        for fleet in reversed(fleets):
            try:
                fleet.close()
            except Exception as exc:
                errors.append(exc)
        if errors:
            raise ExceptionGroup("closing local fleets failed", errors)
