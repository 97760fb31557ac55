"""A warm digest session: one long-lived ``digest_script.py --serve`` on a follower, reached
over ``ssh`` (the follower's ControlMaster), asked for its tree's content id again and again.

The server keeps its tree in memory between requests (``digest_script.LiveTree``: inotify
on Linux followers, else a stat walk with the rows in memory), so a digest after a small
change costs milliseconds instead of an interpreter start, a cache load and a stat of every
file. What it answers is still its own reading of its whole tree.

Protocol: frames (``digest_script.encode_frame`` / ``FrameDecoder``, the same code on both
ends) on the ssh command's standard input and output. The server says hello (``H``), then
answers each request (``Q``) with one reply (``R``); see ``digest_script.serve``.

Failure is never a hang and never a weaker answer: a session whose process ended, whose
output is not frames, or that does not answer by the caller's deadline is *dead*
(:attr:`DigestSession.reason` says why; a late one is killed with its process group) and
the caller digests another way.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
from collections.abc import Sequence
from typing import Any

import msgspec

from ah_mutagen_project.digest_script import FrameDecoder, FrameError, encode_frame

__all__ = ["DigestReply", "DigestSession", "DigestSessionError", "SessionTimeout"]

_STDERR_TAIL = 2000


class DigestSessionError(RuntimeError):
    """The session cannot answer (it ended, or spoke something that is not the protocol);
    the message says why. The session is dead afterwards."""


class SessionTimeout(TimeoutError):
    """No reply by the deadline; the session has been killed."""


class DigestReply(msgspec.Struct, frozen=True):
    """One reply: ``status`` as the one-shot digest command's exit status, ``output`` what
    it would have printed, and the server's account of the request."""

    status: int
    output: bytes
    mode: str = ""
    """``inotify`` or ``walk``."""
    reason: str = ""
    """Why ``walk`` (no inotify, a network filesystem, the queue overflowed...)."""
    hashed: int = 0
    took_ms: float = 0.0


class _Protocol(asyncio.SubprocessProtocol):
    def __init__(self, session: DigestSession) -> None:
        self.session = session

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.SubprocessTransport)
        self.session._transport = transport  # before anything can be received

    def pipe_data_received(self, fd: int, data: bytes) -> None:
        self.session._received(fd, data)

    def pipe_connection_lost(self, fd: int, exc: Exception | None) -> None:
        if fd == 1:
            self.session._died("its output ended")
        elif fd == 2:
            self.session._stderr_closed.set()

    def process_exited(self) -> None:
        self.session._exited()


class DigestSession:
    """One server, started by :meth:`start`; :meth:`request` at most one at a time;
    :meth:`close` always (it ends the server: standard input closed, then killed)."""

    def __init__(self, what: str) -> None:
        self.what = what
        self._reason: str | None = None
        self.hello: dict[str, Any] = {}
        self.started = time.monotonic()
        self._transport: asyncio.SubprocessTransport | None = None
        self._decoder = FrameDecoder()
        self._frames: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue()
        self._stderr = bytearray()
        self._lock = asyncio.Lock()
        self._dead = asyncio.Event()
        self._exit = asyncio.Event()
        self._stderr_closed = asyncio.Event()

    @classmethod
    async def start(cls, argv: Sequence[str], *, what: str) -> DigestSession:
        """Start ``argv`` (``ssh ... python3 ... --serve ...``) in a new process group.

        Raises:
            FileNotFoundError: ``argv[0]`` does not exist.
        """
        session = cls(what)
        loop = asyncio.get_running_loop()
        await loop.subprocess_exec(lambda: _Protocol(session), *argv, start_new_session=True)
        return session

    @property
    def alive(self) -> bool:
        return self._reason is None

    @property
    def reason(self) -> str | None:
        """Why the session is dead (with the exit status and the end of its standard error
        when known); None while it is alive."""
        if self._reason is None:
            return None
        parts = [self._reason]
        code = self._transport.get_returncode() if self._transport is not None else None
        if code is not None and "exited" not in self._reason:
            parts.append(f"exit status {code}")
        tail = self.stderr_tail()
        if tail:
            parts.append(tail)
        return "; ".join(parts)

    @property
    def pid(self) -> int | None:
        return self._transport.get_pid() if self._transport is not None else None

    def stderr_tail(self) -> str:
        text = bytes(self._stderr).decode("utf-8", "replace").strip()
        return text if len(text) <= _STDERR_TAIL else "…" + text[-_STDERR_TAIL:]

    # -- protocol callbacks -----------------------------------------------------------------

    def _received(self, fd: int, data: bytes) -> None:
        if fd == 2:
            self._stderr += data
            del self._stderr[: max(0, len(self._stderr) - 4 * _STDERR_TAIL)]
            return
        try:
            frames = self._decoder.feed(data)
        except FrameError as exc:
            self._kill(f"its output is not the session protocol: {exc}")
            return
        for frame in frames:
            self._frames.put_nowait(frame)

    def _died(self, reason: str) -> None:
        if self._reason is None:
            self._reason = reason
        self._dead.set()

    def _exited(self) -> None:
        code = self._transport.get_returncode() if self._transport is not None else None
        self._died(f"it exited with status {code}")
        self._exit.set()

    def _kill(self, reason: str) -> None:
        self._died(reason)
        pid = self.pid
        if pid is not None and (
            self._transport is None or self._transport.get_returncode() is None
        ):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
        if self._transport is not None:
            # A ControlMaster keeps the mux client's descriptors: never wait for the pipes.
            for fd in (0, 1, 2):
                pipe = self._transport.get_pipe_transport(fd)
                if pipe is None or pipe.is_closing():
                    continue
                if isinstance(pipe, asyncio.WriteTransport):
                    pipe.abort()  # drop what is buffered
                else:
                    pipe.close()  # a read pipe closes at once

    # -- requests ---------------------------------------------------------------------------

    async def _last_words(self) -> None:
        """Its output ended: let the exit status and the end of its standard error arrive
        (briefly), so the reason names them."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(0.5):
                await self._exit.wait()
                await self._stderr_closed.wait()

    async def _next_frame(self) -> tuple[str, bytes]:
        if not self._frames.empty():
            return self._frames.get_nowait()
        getter = asyncio.ensure_future(self._frames.get())
        dead = asyncio.ensure_future(self._dead.wait())
        try:
            await asyncio.wait({getter, dead}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            dead.cancel()
            if not getter.done():
                getter.cancel()
        if getter.done() and not getter.cancelled():
            return getter.result()
        await self._last_words()
        raise DigestSessionError(f"{self.what}: the digest session ended: {self.reason}")

    async def request(
        self, *, change_set: bytes | None, manifest: bool, timeout: float, walk: bool = False
    ) -> DigestReply:
        """Ask for the tree's id (``manifest``: the JSON document with the manifest), after
        applying ``change_set`` when given (``walk``: a full stat walk, whatever inotify says).

        Raises:
            DigestSessionError: the session is or went dead (the reason is in the message).
            SessionTimeout: no reply within ``timeout`` seconds (the session was killed).
        """
        if self._reason is not None:
            await self._last_words()
            raise DigestSessionError(f"{self.what}: the digest session ended: {self.reason}")
        header = json.dumps({"manifest": manifest, "apply": change_set is not None, "walk": walk})
        body = header.encode("utf-8") + b"\n" + (change_set or b"")
        async with self._lock:
            try:
                async with asyncio.timeout(max(timeout, 0.0)):
                    return await self._exchange(encode_frame("Q", body))
            except TimeoutError:
                self._kill(f"no reply within {timeout:.2f}s")
                raise SessionTimeout(
                    f"{self.what}: no reply within {timeout:.2f}s; the session was killed"
                ) from None
            except asyncio.CancelledError:
                self._kill("a request was cancelled mid-way")
                raise

    async def _exchange(self, frame: bytes) -> DigestReply:
        assert self._transport is not None
        stdin = self._transport.get_pipe_transport(0)
        if stdin is None or stdin.is_closing():
            # It died before we could ask (e.g. "python3: not found"): the reason should say
            # how, so let its exit status and the rest of its standard error arrive first.
            self._died("its standard input is closed")
            await self._last_words()
            raise DigestSessionError(f"{self.what}: the digest session ended: {self.reason}")
        if not self.hello:
            kind, body = await self._next_frame()
            if kind != "H":
                self._kill(f"it sent {kind!r} before its hello")
                raise DigestSessionError(f"{self.what}: {self.reason}")
            self.hello = _json_object(body, self)
        assert isinstance(stdin, asyncio.WriteTransport)
        stdin.write(frame)
        kind, body = await self._next_frame()
        if kind != "R":
            self._kill(f"it answered with a {kind!r} frame")
            raise DigestSessionError(f"{self.what}: {self.reason}")
        head, _, output = body.partition(b"\n")
        info = _json_object(head, self)
        status = info.get("status")
        if not isinstance(status, int):
            self._kill(f"its reply has no status: {head[:200]!r}")
            raise DigestSessionError(f"{self.what}: {self.reason}")
        return DigestReply(
            status=status,
            output=output,
            mode=str(info.get("mode", "")),
            reason=str(info.get("reason", "")),
            hashed=int(info.get("hashed", 0) or 0),
            took_ms=float(info.get("took_ms", 0.0) or 0.0),
        )

    async def close(self, grace: float = 2.0) -> None:
        """End the server: close its standard input (it saves its stat cache and exits),
        wait up to ``grace`` seconds, then kill the process group. Idempotent."""
        if self._transport is None:
            return
        stdin = self._transport.get_pipe_transport(0)
        if stdin is not None and not stdin.is_closing():
            stdin.close()
        if self._transport.get_returncode() is None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(grace):
                    await self._exit.wait()
        self._kill("closed")
        self._transport.close()


def _json_object(data: bytes, session: DigestSession) -> dict[str, Any]:
    try:
        found = json.loads(data.decode("utf-8"))
    except ValueError:
        found = None
    if not isinstance(found, dict):
        session._kill(f"it sent {data[:200]!r}, not a JSON object")
        raise DigestSessionError(f"{session.what}: {session.reason}")
    return found
