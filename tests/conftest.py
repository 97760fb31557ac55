"""Shared fixtures of the cross-package tests.

``dataplane_fleet``: one real fleet for the session's data-plane tests (``test_run_*``,
``test_slurp_*``): an access point and four followers, each with its own real sshd that
authorizes the fleet's leader key — ``lin-a``/``lin-b``/``lin-c`` (Linux, tags
``role=a``/``b``/``c``) and ``mac-d`` (reporting macOS, ``role=d``; its commands run through
zsh as on a Mac). ``cli`` runs the installed ``ah-fleetctl`` against it from a leader
directory outside any repository. Tests must leave every follower's sshd running and its
workspace without the files they created.
"""

from __future__ import annotations

import contextlib
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import pytest

from ah_harness_local import CliResult

CLI_TIMEOUT_S = 90.0


def _console_script() -> list[str]:
    script = Path(sys.executable).parent / "ah-fleetctl"
    if script.is_file():
        return [str(script)]
    found = shutil.which("ah-fleetctl")
    return [found] if found else [sys.executable, "-m", "ah_fleetctl"]


CLI = _console_script()


class LineReader:
    """Collects a pipe's lines in a thread, so a test can wait for one with a deadline."""

    def __init__(self, stream: IO[str]) -> None:
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._thread = threading.Thread(target=self._pump, args=(stream,), daemon=True)
        self._thread.start()

    def _pump(self, stream: IO[str]) -> None:
        for line in stream:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def wait_for(self, predicate: Any, timeout: float, what: str) -> None:
        """Until ``predicate(all lines so far)`` holds; fails at the deadline or at EOF."""
        deadline = time.monotonic() + timeout
        while not predicate(self.lines):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"timed out after {timeout}s waiting for {what}: {self.lines}")
            try:
                line = self._queue.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                raise AssertionError(f"output ended before {what}: {self.lines}")
            self.lines.append(line)

    def rest(self, timeout: float) -> list[str]:
        """Every line until EOF (the process has exited)."""
        self._thread.join(timeout)
        while True:
            try:
                line = self._queue.get_nowait()
            except queue.Empty:
                break
            if line is not None:
                self.lines.append(line)
        return self.lines


@dataclass
class FleetCli:
    """Runs ``ah-fleetctl`` against a LocalFleet (``AH_HOME`` from ``fleet.env()``)."""

    fleet: Any  # ah_harness_local.fleet.LocalFleet
    env: dict[str, str]
    work: Path
    """The leader's working directory (outside any repository: it is the leader tree)."""

    def __call__(
        self,
        *args: str,
        cwd: Path | None = None,
        env: Mapping[str, str] | None = None,
        timeout: float = CLI_TIMEOUT_S,
    ) -> CliResult:
        done = subprocess.run(
            [*CLI, *args],
            env={**self.env, **(env or {})},
            cwd=cwd or self.work,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        return CliResult(tuple(args), done.returncode, done.stdout, done.stderr)

    def popen(self, *args: str, cwd: Path | None = None) -> RunningCli:
        """Start ``ah-fleetctl ARGS`` in its own process group; stdout is read line by line
        as it comes (``RunningCli.stdout``)."""
        proc = subprocess.Popen(
            [*CLI, *args],
            env=self.env,
            cwd=cwd or self.work,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        assert proc.stdout is not None
        return RunningCli(proc, LineReader(proc.stdout))


@dataclass
class RunningCli:
    proc: subprocess.Popen[str]
    stdout: LineReader

    def wait(self, timeout: float) -> tuple[int, list[str], str]:
        """Exit status, stdout lines and stderr, failing if it does not exit in time."""
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"ah-fleetctl did not exit within {timeout}s; output so far: {self.stdout.lines}"
            ) from None
        lines = self.stdout.rest(10.0)
        assert self.proc.stderr is not None
        return code, lines, self.proc.stderr.read()

    def stop(self, timeout: float = 10.0) -> None:
        """Make sure the process and its group are gone (test clean-up)."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


DATAPLANE_SPECS: tuple[tuple[str, dict[str, str], str | None], ...] = (
    ("lin-a", {"role": "a"}, None),
    ("lin-b", {"role": "b"}, None),
    ("lin-c", {"role": "c"}, None),
    ("mac-d", {"role": "d"}, "macos"),
)


@pytest.fixture(scope="session")
def dataplane_fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FleetCli]:
    """One fleet for every data-plane test of the session (see the module docstring)."""
    from ah_harness_local.fleet import FollowerSpec, LocalFleet

    base = tmp_path_factory.mktemp("dataplane")
    specs = [FollowerSpec(name, tags=tags, os=os_name) for name, tags, os_name in DATAPLANE_SPECS]
    # 1 s heartbeats: the followers' health is not under test here, and a loaded machine
    # must not make them flap.
    with LocalFleet(specs, base_dir=base / "fleet", heartbeat_interval="1s") as fleet:
        work = base / "leader"
        work.mkdir()
        env = {**fleet.env(), "NO_COLOR": "1", "HOME": str(base / "home")}
        env.pop("RUST_LOG", None)
        # Every CLI call would otherwise compile its ~600 modules afresh (an installed tool
        # has its bytecode cached).
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        (base / "home").mkdir()
        yield FleetCli(fleet=fleet, env=env, work=work)
