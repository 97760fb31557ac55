"""Shared fixtures: an async test runner and real sshd instances."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from ah_harness_local import ProcessGroup, RunningSshd, prepare_sshd
from ah_harness_local.pytest_plugin import SshdFactory

# Tests import their helpers from the uniquely named module beside this file.
sys.path.insert(0, str(Path(__file__).parent))

from ssh_bridge_support import pid_gone, read_pids

T = TypeVar("T")


def run_async(coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
    """Run one async test body with an overall deadline."""

    async def bounded() -> T:
        async with asyncio.timeout(timeout):
            return await coro

    return asyncio.run(bounded())


@pytest.fixture(scope="session")
def run() -> Callable[..., Any]:
    return run_async


@pytest.fixture(scope="module")
def shared_sshd(sshd_factory: SshdFactory) -> RunningSshd:
    """One sshd for the tests that do not break it (stopped at session end)."""
    return sshd_factory(name="bridge-shared")


@pytest.fixture(scope="module")
def sshd_max10(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningSshd]:
    """An sshd with OpenSSH's default MaxSessions 10 (the harness default is 64)."""
    base = tmp_path_factory.mktemp("sshd-max10")
    instance = prepare_sshd(base / "sshd")
    config = instance.config_path.read_text()
    assert "MaxSessions 64" in config
    instance.config_path.write_text(config.replace("MaxSessions 64", "MaxSessions 10"))
    with ProcessGroup(base) as group:
        yield instance.start(group=group)


@pytest.fixture
def pid_files(tmp_path: Path) -> Iterator[Callable[[str], Path]]:
    """Pid files for remote commands; whatever they list is killed at teardown, so a
    failing test (or a peer that died before we could stop its commands) leaves nothing."""
    created: list[Path] = []

    def make(name: str) -> Path:
        path = tmp_path / name
        created.append(path)
        return path

    yield make
    for path in created:
        for pid in read_pids(path):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                if not pid_gone(pid):
                    os.kill(pid, signal.SIGKILL)
