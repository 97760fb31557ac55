"""Run one external command with a deadline; on timeout or cancellation kill its whole
process group (rsync's ssh child, mutagen's helpers) and reap it before returning."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO

import msgspec

__all__ = ["CommandResult", "CommandTimeout", "FedCommand", "format_seconds", "run_command"]


def format_seconds(seconds: float) -> str:
    """``2.43612`` → ``2.44``, ``120.0`` → ``120``: deadlines in messages, readable."""
    return f"{seconds:.2f}".rstrip("0").rstrip(".")


class CommandTimeout(TimeoutError):
    """The command did not finish by its deadline and was killed (with its process group)."""

    def __init__(self, what: str, timeout: float, stderr: bytes = b"") -> None:
        super().__init__(f"{what} did not finish within {format_seconds(timeout)}s and was killed")
        self.what = what
        self.timeout = timeout
        self.stderr = stderr


class CommandResult(msgspec.Struct, frozen=True):
    argv: tuple[str, ...]
    returncode: int
    stdout: bytes
    stderr: bytes
    took_s: float

    def output_tail(self, limit: int = 2000) -> str:
        """stderr (else stdout) decoded, stripped, at most ``limit`` trailing characters."""
        text = (self.stderr or self.stdout).decode("utf-8", "replace").strip()
        return text if len(text) <= limit else "…" + text[-limit:]


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


async def run_command(
    argv: Sequence[str],
    *,
    timeout: float,
    what: str,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    stdin: Path | None = None,
) -> CommandResult:
    """Run ``argv`` in a new session with stdin from /dev/null (or the file ``stdin``) and
    capture its output.

    Output goes to anonymous temporary files, not pipes: an ``ssh`` that joins an OpenSSH
    ControlMaster hands its stdio descriptors to the master, which keeps them until the
    session ends. With pipes, a session stalled on a frozen follower would keep them open
    after we killed rsync and its ssh, and waiting for the process (which in asyncio also
    waits for its pipes to close) would last until the master gives up (30 s and more).

    Raises:
        CommandTimeout: after ``timeout`` seconds (the process group has been killed).
        FileNotFoundError: ``argv[0]`` does not exist.
    """
    started = time.monotonic()
    with contextlib.ExitStack() as files:
        out = files.enter_context(tempfile.TemporaryFile())
        err = files.enter_context(tempfile.TemporaryFile())
        source = files.enter_context(open(stdin, "rb")) if stdin is not None else None
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=source if source is not None else asyncio.subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            start_new_session=True,
            env=dict(env) if env is not None else None,
            cwd=cwd,
        )
        timed_out = False
        try:
            try:
                async with asyncio.timeout(max(timeout, 0.0)):
                    await proc.wait()
            except TimeoutError:
                timed_out = True
        finally:
            # Reached on timeout and also when the caller is cancelled (e.g. an outer
            # deadline): nothing we started may outlive the call.
            if proc.returncode is None:
                _kill_group(proc.pid)
                with contextlib.suppress(ProcessLookupError):
                    await proc.wait()
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if timed_out:
        raise CommandTimeout(what, timeout, stderr)
    assert proc.returncode is not None
    return CommandResult(
        argv=tuple(argv),
        returncode=proc.returncode,
        stdout=stdout,
        stderr=stderr,
        took_s=time.monotonic() - started,
    )


class FedCommand:
    """A command started now whose standard input is written later, once: its start-up
    (for ``ssh``: the session, the remote shell, the interpreter) overlaps whatever the
    caller does meanwhile. Output goes to temporary files as with :func:`run_command`;
    the standard input is a pipe, aborted (never waited on) when the command is killed.

    Use :meth:`start`, then :meth:`feed` or :meth:`cancel` (cancel is always safe, also
    after feed)."""

    def __init__(
        self,
        argv: Sequence[str],
        what: str,
        proc: asyncio.subprocess.Process,
        files: contextlib.ExitStack,
        out: IO[bytes],
        err: IO[bytes],
    ) -> None:
        self.argv = tuple(argv)
        self.what = what
        self._proc = proc
        self._files = files
        self._out = out
        self._err = err
        self._started = time.monotonic()
        self._fed = False

    @property
    def pid(self) -> int:
        return self._proc.pid

    @property
    def returncode(self) -> int | None:
        return self._proc.returncode

    @classmethod
    async def start(cls, argv: Sequence[str], *, what: str) -> FedCommand:
        """Start ``argv`` in a new session.

        Raises:
            FileNotFoundError: ``argv[0]`` does not exist.
        """
        files = contextlib.ExitStack()
        try:
            out = files.enter_context(tempfile.TemporaryFile())  # noqa: SIM115  (kept)
            err = files.enter_context(tempfile.TemporaryFile())  # noqa: SIM115  (kept)
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.PIPE,
                stdout=out,
                stderr=err,
                start_new_session=True,
            )
        except BaseException:
            files.close()
            raise
        return cls(argv, what, proc, files, out, err)

    async def _stop(self) -> None:
        if self._proc.returncode is None:
            _kill_group(self._proc.pid)
        stdin = self._proc.stdin
        if stdin is not None and not stdin.transport.is_closing():
            stdin.transport.abort()
        with contextlib.suppress(ProcessLookupError):
            await self._proc.wait()

    async def feed(self, data: bytes, timeout: float) -> CommandResult:
        """Write ``data`` to the command's standard input, close it, and wait for the
        command to end, all within ``timeout`` seconds.

        Raises:
            CommandTimeout: not done in time (the process group has been killed).
        """
        if self._fed:
            raise RuntimeError(f"{self.what}: standard input written already")
        self._fed = True
        timed_out = False
        try:
            try:
                async with asyncio.timeout(max(timeout, 0.0)):
                    stdin = self._proc.stdin
                    assert stdin is not None
                    # A command that exits without reading all of it is judged by its status.
                    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                        stdin.write(data)
                        await stdin.drain()
                        stdin.close()
                    await self._proc.wait()
            except TimeoutError:
                timed_out = True
        finally:
            # Also when the caller is cancelled: nothing we started may outlive the call.
            if self._proc.returncode is None:
                await self._stop()
        try:
            self._out.seek(0)
            self._err.seek(0)
            stdout, stderr = self._out.read(), self._err.read()
        finally:
            self._files.close()
        if timed_out:
            raise CommandTimeout(self.what, timeout, stderr)
        assert self._proc.returncode is not None
        return CommandResult(
            argv=self.argv,
            returncode=self._proc.returncode,
            stdout=stdout,
            stderr=stderr,
            took_s=time.monotonic() - self._started,
        )

    async def cancel(self) -> None:
        """Kill the command (its whole process group) and reap it; idempotent."""
        self._fed = True
        try:
            await self._stop()
        finally:
            self._files.close()
