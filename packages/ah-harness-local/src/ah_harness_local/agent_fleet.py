"""The real ``ah-fleetctl`` console script with leader agents enabled, against a local fleet.

Tests of the thin path (``ah_fleetctl.thin``) recognise it by what the CLI process imported
(``python -X importtime``): none of :data:`HEAVY_MODULES`. :meth:`AgentFleet.running` gives a
private runtime directory (the agents' sockets and logs), a private ``HOME`` and the
fleet's ``AH_*`` environment, and stops every agent it started on the way out.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from ah_fleetctl.localfleet.fleet import LocalFleet
from ah_fleetctl.localfleet.ports import wait_for
from ah_harness_local.cli_result import CliResult

__all__ = ["CLI", "CLI_TIMEOUT_S", "HEAVY_MODULES", "AgentFleet", "RunningCli", "pid_alive"]

CLI = [str(Path(sys.executable).parent / "ah-fleetctl")]
"""The venv's console script (what a user runs), not ``uv run``."""
CLI_TIMEOUT_S = 90.0
HEAVY_MODULES = frozenset(
    {"click", "msgspec", "paramiko", "httpx", "litestar", "aioquic", "cryptography"}
)
"""What the full CLI imports and the thin path must not."""


def _gone(pid: int) -> bool:
    return not pid_alive(pid)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


class RunningCli:
    """A CLI process in its own group whose stdout lines are collected as they come."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._eof = False
        self._thread = threading.Thread(target=self._pump, daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    def wait_for_lines(self, predicate: Callable[[list[str]], bool], what: str) -> None:
        deadline = time.monotonic() + 30.0
        with self._cond:
            while not predicate(self.lines):
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._eof:
                    raise AssertionError(f"no {what} (eof={self._eof}): {self.lines}")
                self._cond.wait(remaining)

    def wait(self, timeout: float) -> tuple[int, list[str], str]:
        code = self.proc.wait(timeout)
        self._thread.join(10.0)
        assert self.proc.stderr is not None
        return code, list(self.lines), self.proc.stderr.read()

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10.0)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


@dataclass
class AgentFleet:
    fleet: LocalFleet
    env: dict[str, str]
    work: Path
    """The leader's workspace (the CLI's working directory)."""
    runtime: Path
    """``XDG_RUNTIME_DIR`` of every CLI call: the agents' sockets and logs live below it."""
    importtime: bool = False
    """Whether :meth:`cli` runs under ``-X importtime`` unless told otherwise."""

    @classmethod
    @contextlib.contextmanager
    def running(
        cls,
        fleet: LocalFleet,
        work: Path,
        home: Path,
        *,
        extra_env: Mapping[str, str] | None = None,
        importtime: bool = False,
    ) -> Iterator[AgentFleet]:
        home.mkdir(parents=True, exist_ok=True)
        runtime = Path(tempfile.mkdtemp(prefix="aha-", dir="/tmp"))  # short: sockaddr_un
        env = {
            **fleet.env(),
            "NO_COLOR": "1",
            "HOME": str(home),
            "XDG_RUNTIME_DIR": str(runtime),
            "AH_AGENT_ENABLED": "true",
            "AH_AGENT_IDLE": "120s",
            **(extra_env or {}),
        }
        env.pop("RUST_LOG", None)
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        agent_fleet = cls(fleet=fleet, env=env, work=work, runtime=runtime, importtime=importtime)
        try:
            yield agent_fleet
        finally:
            agent_fleet.stop_agents()
            shutil.rmtree(runtime, ignore_errors=True)

    @property
    def agents(self) -> Path:
        return self.runtime / "agent-harbor" / "agents"

    def cli(
        self,
        *args: str,
        cwd: Path | None = None,
        extra_env: Mapping[str, str] | None = None,
        importtime: bool | None = None,
    ) -> tuple[CliResult, set[str]]:
        """Run ``ah-fleetctl ARGS`` in the workspace; also the modules it imported (under
        ``-X importtime``; empty otherwise)."""
        traced = self.importtime if importtime is None else importtime
        argv = [sys.executable, "-X", "importtime", "-m", "ah_fleetctl"] if traced else CLI
        done = subprocess.run(
            [*argv, *args],
            env={**self.env, **(extra_env or {})},
            cwd=cwd or self.work,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=CLI_TIMEOUT_S,
            check=False,
        )
        modules = set()
        stderr_lines = []
        for line in done.stderr.splitlines():
            if line.startswith("import time:"):
                modules.add(line.rsplit("|", 1)[-1].strip())
            else:
                stderr_lines.append(line)
        stderr = "".join(f"{line}\n" for line in stderr_lines)
        return CliResult(tuple(args), done.returncode, done.stdout, stderr), modules

    def thin(self, *args: str) -> CliResult:
        """``ah-fleetctl ARGS``, which must take the thin path."""
        result, modules = self.cli(*args, importtime=True)
        heavy = HEAVY_MODULES & modules
        assert not heavy, f"not the thin path: imported {heavy}\n{result}"
        return result

    def popen(self, *args: str) -> RunningCli:
        proc = subprocess.Popen(
            [*CLI, *args],
            env=self.env,
            cwd=self.work,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        return RunningCli(proc)

    def agent_pids(self) -> list[int]:
        from ah_fleetctl.agent import AgentClient

        pids = []
        for sock in self.agents.glob("*.sock") if self.agents.is_dir() else []:

            async def ping(path: Path = sock) -> int | None:
                with contextlib.suppress(OSError):
                    return (await AgentClient(path).ping()).pid
                return None

            pid = asyncio.run(ping())
            if pid is not None:
                pids.append(pid)
        return pids

    def agent_log(self) -> str:
        return "".join(p.read_text() for p in sorted(self.agents.glob("*.log")))

    def workspace(self, name: str) -> Path:
        """Follower ``name``'s workspace directory (the followers are local)."""
        return Path(self.fleet.follower(name).workspace)

    def stop_agents(self) -> None:
        from ah_fleetctl.agent import AgentClient

        for pid in self.agent_pids():
            for sock in self.agents.glob("*.sock"):
                with contextlib.suppress(OSError):
                    asyncio.run(AgentClient(sock).shutdown())
            wait_for(partial(_gone, pid), 15.0, what=f"leader agent {pid} to exit")
