"""A :class:`HostExecutor` that runs rendered commands as local processes.

It does locally what sshd does remotely: hand the rendered string to a POSIX shell as
``-c STRING`` (sshd uses the account's login shell). Each job is its own process group, so
a timeout or a cancellation kills the whole command tree. Used by the tests as a real
executor, and usable wherever "the hosts" are processes on this machine (e.g. a demo in
which every "host" gets its own environment).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Callable, Mapping

from .engine import ExecOutcome, OutputCallback

__all__ = ["LocalProcessExecutor"]

_READ_SIZE = 65536


class LocalProcessExecutor:
    """Runs ``<shell> -c <rendered>`` with the environment ``host_env(host)`` on top of
    this process's (or ``base_env``'s) environment."""

    def __init__(
        self,
        *,
        shell: str = "/bin/sh",
        host_env: Callable[[str], Mapping[str, str]] | None = None,
        base_env: Mapping[str, str] | None = None,
        kill_grace: float = 2.0,
    ) -> None:
        self.shell = shell
        self._host_env = host_env
        self._base_env = base_env
        self._kill_grace = kill_grace
        self.pids: dict[str, list[int]] = {}
        """Process ids started per host (for inspection, e.g. that they are gone)."""

    def _env(self, host: str) -> dict[str, str]:
        env = dict(os.environ if self._base_env is None else self._base_env)
        if self._host_env is not None:
            env.update(self._host_env(host))
        return env

    async def run(
        self,
        host: str,
        command: str,
        *,
        on_stdout: OutputCallback,
        on_stderr: OutputCallback,
        timeout: float | None,
    ) -> ExecOutcome:
        started = time.monotonic()
        proc = await asyncio.create_subprocess_exec(
            self.shell,
            "-c",
            command,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=self._env(host),
            start_new_session=True,
        )
        self.pids.setdefault(host, []).append(proc.pid)
        assert proc.stdout is not None and proc.stderr is not None
        pumps = [
            asyncio.ensure_future(_pump(proc.stdout, on_stdout)),
            asyncio.ensure_future(_pump(proc.stderr, on_stderr)),
        ]
        timed_out = False
        try:
            try:
                await asyncio.wait_for(proc.wait(), timeout)
            except TimeoutError:
                timed_out = True
                await self._kill(proc)
            # The pipes close once every process of the group is gone; bound the wait in
            # case a grandchild left the group and still holds them.
            await asyncio.wait(pumps, timeout=self._kill_grace)
        except asyncio.CancelledError:
            await asyncio.shield(self._kill(proc))
            raise
        finally:
            for pump in pumps:
                pump.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
        took_ms = round((time.monotonic() - started) * 1000)
        code = proc.returncode
        return ExecOutcome(
            exit_code=None if timed_out or code is None or code < 0 else code,
            timed_out=timed_out,
            took_ms=took_ms,
        )

    async def _kill(self, proc: asyncio.subprocess.Process) -> None:
        """SIGTERM the process group, SIGKILL it if still there after ``kill_grace``."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            try:
                await asyncio.wait_for(proc.wait(), self._kill_grace)
                break
            except TimeoutError:
                continue
        # Reap stragglers of the group even when the leader exited on SIGTERM.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


async def _pump(reader: asyncio.StreamReader, callback: OutputCallback) -> None:
    while chunk := await reader.read(_READ_SIZE):
        callback(chunk)
