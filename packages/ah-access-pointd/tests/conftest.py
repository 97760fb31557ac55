"""The real ``ah-access-pointd`` binary in subprocesses: its CLI, and a serving daemon."""

from __future__ import annotations

import json
import os
import ssl
import subprocess
import sys
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from ah_access_pointd.state import ApState, load_state
from ah_harness_local import ManagedProcess, ProcessGroup, wait_for

AP = [sys.executable, "-m", "ah_access_pointd"]
TRUST_DOMAIN = "ap-test.fleet"
HEARTBEAT = "200ms"


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("AH_")}


def run_ap(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """One ``ah-access-pointd`` invocation, output captured."""
    return subprocess.run(
        [*AP, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=_env(),
        stdin=subprocess.DEVNULL,
    )


def run_ap_many(*invocations: Sequence[str]) -> list[subprocess.CompletedProcess[str]]:
    """Several independent invocations at once (each one a process start-up)."""
    with ThreadPoolExecutor(max_workers=len(invocations) or 1) as pool:
        return list(pool.map(lambda args: run_ap(*args), invocations))


@pytest.fixture(scope="session")
def cli() -> Any:
    return run_ap


@pytest.fixture(scope="session")
def cli_many() -> Any:
    return run_ap_many


def wait_ready(process: ManagedProcess, ready_file: Path, timeout: float = 60) -> dict[str, Any]:
    def ready() -> dict[str, Any] | None:
        assert process.is_running, f"serve exited {process.returncode}:\n{process.log_text()}"
        try:
            data: dict[str, Any] = json.loads(ready_file.read_text())
        except (OSError, ValueError):
            return None
        return data if data.get("pid") == process.pid else None

    result: dict[str, Any] = wait_for(ready, timeout, what=f"ready file {ready_file}")
    return result


@dataclass
class ServingAp:
    """A running ``ah-access-pointd serve`` over a fresh state directory."""

    state_dir: Path
    state: ApState
    process: ManagedProcess
    ready_file: Path
    ready: dict[str, Any]

    @property
    def api_url(self) -> str:
        return f"https://127.0.0.1:{self.ready['apiPort']}"

    @property
    def quic_port(self) -> int:
        return int(self.ready["quicPort"])

    def ssl_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.state.ca_path))

    def user_token(self) -> str:
        return self.state.signer.issue_user("tester", scopes=["exec", "read-logs"])


def start_serving(
    group: ProcessGroup, state_dir: Path, extra: Sequence[str] = (), name: str = "serve"
) -> ServingAp:
    ready_file = state_dir.parent / f"{name}-ready.json"
    process = group.start(
        [
            *AP,
            "serve",
            "--state-dir",
            str(state_dir),
            "--ready-file",
            str(ready_file),
            "--heartbeat-interval",
            HEARTBEAT,
            *extra,
        ],
        name=name,
        env=_env(),
    )
    ready = wait_ready(process, ready_file)
    return ServingAp(state_dir, load_state(state_dir), process, ready_file, ready)


@pytest.fixture(scope="session")
def ap_group(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProcessGroup]:
    with ProcessGroup(tmp_path_factory.mktemp("ap-logs")) as group:
        yield group


@pytest.fixture(scope="session")
def serving_ap(tmp_path_factory: pytest.TempPathFactory, ap_group: ProcessGroup) -> ServingAp:
    """One serving access point for the session (state initialised through the CLI)."""
    base = tmp_path_factory.mktemp("ap")
    state_dir = base / "state"
    result = run_ap("init", "--state-dir", str(state_dir), "--trust-domain", TRUST_DOMAIN)
    assert result.returncode == 0, result.stderr
    return start_serving(ap_group, state_dir)


@pytest.fixture(scope="session")
def start_ap(ap_group: ProcessGroup) -> Any:
    """``start_ap(state_dir, extra_args=(), name="serve")`` → ServingAp (stopped with the session)."""

    def start(state_dir: Path, extra: Sequence[str] = (), name: str = "serve") -> ServingAp:
        return start_serving(ap_group, state_dir, extra, name)

    return start
