"""Leader side of the warm executor: one long-lived command server per transport.

Why: every exec channel costs a channel-open round trip, an sshd fork and a login shell that
reads the whole profile (``bash -lc``) — most of a warm fan-out's time on a busy follower.
The warm executor starts ``warm_server.py`` once per transport through the login shell
(``<shell> -lc 'exec python3 -I -S -c <loader> <payload>'``), so the login environment is
read once, and then runs every command as frames on that one channel (``warm_codec``).

Threads: none of its own. The event loop watches the channel's ``fileno()`` pipe (paramiko
signals incoming data, EOF and close through it), decodes frames and hands lines and results
to the callbacks. Small frames are written from the loop, stdin from the transport's pool.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import threading
import zlib
from collections.abc import Callable, Mapping, Sequence
from functools import cache
from importlib import resources
from typing import Any

import msgspec

from ah_ssh_bridge.channel_send import send_all
from ah_ssh_bridge.errors import SshChannelError, SshConnectionLost, SshError
from ah_ssh_bridge.warm_codec import (
    ERROR,
    EXITED,
    HELLO,
    SIGNAL,
    STALE,
    START,
    STDERR,
    STDIN,
    STDIN_CLOSE,
    STDOUT,
    Decoder,
    Frame,
    FrameError,
    encode,
    encode_json,
)

__all__ = [
    "WarmCommand",
    "server_command",
    "server_payload",
]

_POLL_S = 0.5
_LOSS_SETTLE_S = 0.2
_EOF_POLL_S = 0.005
_EOF_WAIT_S = 2.0
_RECV_BYTES = 65536
_STDIN_CHUNK = 32768
_STDERR_TAIL = 4096

_LOADER = (
    "import sys,zlib,base64,json,types\n"
    "for n,s in json.loads(zlib.decompress(base64.b64decode(sys.argv[1]))):\n"
    " m=types.ModuleType(n);m.__path__=[];sys.modules[n]=m\n"
    " exec(compile(s,'<'+n+'>','exec'),m.__dict__)\n"
    "sys.exit(m.main(sys.argv[2:]))\n"
)
"""Runs the shipped modules in order; the last one (the server) has ``main``."""


class WarmCommand(msgspec.Struct, frozen=True, kw_only=True):
    """A command for the warm executor, in structured form (what ``bash -lc`` would run).

    Exactly one of ``argv`` (exec'd directly, looked up in the login ``PATH``) and
    ``script`` (run as ``<shell> -c SCRIPT`` with the login environment: functions and
    aliases defined by the profile are *not* there) is set. ``path_prepend`` goes in front
    of the login ``PATH``; ``env`` is exported on top of the login environment."""

    shell: str
    """The POSIX shell whose login environment the server inherits: ``bash`` or ``zsh``."""
    argv: tuple[str, ...] | None = None
    script: str | None = None
    cwd: str | None = None
    env: dict[str, str] = msgspec.field(default_factory=dict)
    path_prepend: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if (self.argv is None) == (self.script is None):
            raise ValueError("WarmCommand needs exactly one of argv and script")
        if self.argv is not None and (not self.argv or not self.argv[0]):
            raise ValueError("WarmCommand argv needs a non-empty program name")
        if self.shell not in ("bash", "zsh", "sh"):
            raise ValueError(f"WarmCommand shell must be bash, zsh or sh, got {self.shell!r}")

    def start_payload(self, extra_env: Mapping[str, str] | None, *, stdin: bool) -> dict[str, Any]:
        spec: dict[str, Any] = {}
        if self.argv is not None:
            spec["argv"] = list(self.argv)
        else:
            spec["script"] = self.script
            spec["shell"] = self.shell
        if self.cwd is not None:
            spec["cwd"] = self.cwd
        env = {**self.env, **(extra_env or {})}
        if env:
            spec["env"] = env
        if self.path_prepend:
            spec["pathPrepend"] = list(self.path_prepend)
        if stdin:
            spec["stdin"] = True
        return spec


def _module_source(name: str) -> str:
    return resources.files("ah_ssh_bridge").joinpath(name).read_text("utf-8")


@cache
def server_payload() -> str:
    """The shipped modules (codec, server), JSON, zlib-compressed, base64 (computed once)."""
    modules = [
        ("ah_ssh_bridge", ""),
        ("ah_ssh_bridge.warm_codec", _module_source("warm_codec.py")),
        ("ah_warm_server", _module_source("warm_server.py")),
    ]
    packed = zlib.compress(json.dumps(modules).encode("utf-8"), 9)
    return base64.b64encode(packed).decode("ascii")


def _quote(word: str) -> str:
    return "'" + word.replace("'", "'\\''") + "'"


def server_command(shell: str, *, grace_s: float) -> str:
    """The exec request that starts the server through ``shell``'s login environment."""
    inner = (
        f"exec python3 -I -S -c {_quote(_LOADER)} {server_payload()} {_quote(shell)} {grace_s:g}"
    )
    return f"{shell} -lc {_quote(inner)}"


class StaleServer(Exception):
    """The server refused a command because the login files changed (restart, resend)."""


class ServerGone(Exception):
    """The server can take no more commands (it ended or is retiring)."""


class WarmJob:
    """One command on a warm server: its output callbacks' job and the future of its end."""

    __slots__ = ("done", "job")

    def __init__(self, job: Any, done: asyncio.Future[int | None]) -> None:
        self.job = job
        self.done = done


def _settle(future: asyncio.Future[Any], value: Any, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(value)


class WarmServer:
    """Client of one running ``warm_server.py`` (one channel), read on the event loop.

    No reader thread: paramiko signals a channel's incoming data (and its EOF or close)
    through the channel's ``fileno()`` pipe, which the loop watches (``add_reader``), so a
    command's end reaches the loop with one thread switch fewer per host (paramiko's own
    transport thread to the loop) than a reader thread would cost.
    """

    def __init__(
        self,
        host: str,
        channel: Any,
        *,
        loop: asyncio.AbstractEventLoop,
        transport_dead: Callable[[], bool],
        lost_error: Callable[[], SshConnectionLost],
        on_end: Callable[[WarmServer], None],
    ) -> None:
        self.host = host
        self.channel = channel
        self.loop = loop
        self._transport_dead = transport_dead
        self._lost_error = lost_error
        self._on_end = on_end
        self._decoder = Decoder(expect_magic=True)
        self._jobs: dict[int, WarmJob] = {}
        self._send_lock = threading.Lock()
        self._next_id = 1
        self.hello: dict[str, object] | None = None
        self._hello_seen: asyncio.Future[None] = loop.create_future()
        self._ended: asyncio.Future[None] = loop.create_future()
        self.end_reason: str | None = None
        self.retiring = False
        self.reader_started = False
        self._stderr_tail = bytearray()
        self._fd: int | None = None
        self._eof_deadline = 0.0
        self._safety: asyncio.TimerHandle | None = None

    # ---- state

    @property
    def usable(self) -> bool:
        return self.hello is not None and not self.retiring and not self._ended.done()

    @property
    def ended(self) -> bool:
        return self._ended.done()

    @property
    def pid(self) -> int | None:
        """The server's process id on the follower (from its greeting)."""
        value = self.hello.get("pid") if self.hello else None
        return value if isinstance(value, int) else None

    def stderr_tail(self) -> str:
        return bytes(self._stderr_tail).decode("utf-8", "replace").strip()

    def describe_failure(self) -> str:
        parts = [self.end_reason or "the server ended"]
        status = self.channel.exit_status if self.channel.exit_status_ready() else None
        if status is not None and status >= 0:
            parts.append(f"exit status {status}")
        tail = self.stderr_tail()
        if tail:
            parts.append(f"stderr: {tail[-500:]}")
        preamble = self._decoder.preamble().decode("utf-8", "replace").strip()
        if preamble:
            parts.append(f"login shell printed: {preamble[-200:]}")
        return "; ".join(parts)

    # ---- on the loop

    async def start(self, timeout: float) -> None:
        """Watch the channel; wait for the greeting. SshChannelError (with the reason) if
        none comes (the server did not start: no python3, a broken profile...)."""
        self.reader_started = True
        self._fd = self.channel.fileno()
        self.loop.add_reader(self._fd, self._readable)
        self._arm_safety()
        self._readable()  # anything that arrived before we watched
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await asyncio.shield(self._hello_seen)
        if self.hello is None:
            if not self._ended.done():
                self.end_reason = f"no greeting within {timeout}s"
                self._end()
            raise SshChannelError(
                self.host, f"warm executor on {self.host} did not start: {self.describe_failure()}"
            )

    def submit_blocking(
        self,
        job: Any,
        done: asyncio.Future[int | None],
        spec: dict[str, Any],
        stdin: Sequence[bytes] | None,
    ) -> int:
        """Register the command and send its START (and stdin); its id. Called on the loop
        (no stdin) or from a worker thread (stdin to send)."""
        if not self.usable:
            raise ServerGone(self.end_reason or "retiring")
        command_id = self._next_id
        self._next_id += 1
        self._jobs[command_id] = WarmJob(job, done)
        try:
            self._send(encode_json(START, command_id, spec))
            if stdin is not None:
                for chunk in stdin:
                    view = memoryview(chunk).cast("B")
                    for at in range(0, len(view), _STDIN_CHUNK):
                        if job.stopping:
                            return command_id
                        self._send(encode(STDIN, command_id, bytes(view[at : at + _STDIN_CHUNK])))
                self._send(encode(STDIN_CLOSE, command_id))
        except (OSError, EOFError) as exc:
            self._jobs.pop(command_id, None)
            raise ServerGone(f"sending to the warm executor failed: {exc}") from None
        return command_id

    def stop_blocking(self, command_id: int, grace_s: float) -> None:
        # A server that is gone cannot take it; its end fails the job instead.
        with contextlib.suppress(OSError, EOFError):
            self._send(encode_json(SIGNAL, command_id, {"grace": grace_s}))

    def forget(self, command_id: int) -> None:
        self._jobs.pop(command_id, None)

    def _send(self, data: bytes) -> None:
        with self._send_lock:
            if not send_all(self.channel, data):
                raise EOFError("warm executor channel closed")

    def _arm_safety(self) -> None:
        # Every wake-up that matters comes through the pipe; this only re-checks a dead
        # transport now and then, as the exec path's polling threads do.
        self._safety = self.loop.call_later(_POLL_S, self._safety_check)

    def _safety_check(self) -> None:
        if self._ended.done():
            return
        if self._transport_dead():
            self._readable()
            if not self._ended.done():
                self.end_reason = "the SSH connection is gone"
                self._end()
            return
        self._arm_safety()

    def _readable(self) -> None:
        if self._ended.done():
            return
        channel = self.channel
        try:
            # sshd sends EOF, then the exit status, then the close: wait for the status
            # (it names why a server that never greeted ended, e.g. 127 without python3).
            at_end = channel.closed or (channel.eof_received and channel.exit_status_ready())
            while channel.recv_stderr_ready():
                data = channel.recv_stderr(_RECV_BYTES)
                if not data:
                    break
                self._stderr_tail += data
                del self._stderr_tail[:-_STDERR_TAIL]
            while channel.recv_ready():
                data = channel.recv(_RECV_BYTES)
                if not data:
                    break
                for frame in self._decoder.feed(data):
                    self._dispatch(frame)
        except FrameError as exc:
            self.end_reason = f"garbled stream from the warm executor: {exc}"
            at_end = True
        except Exception as exc:  # a reader that dies silently would hang every job
            self.end_reason = f"warm executor reader failed: {type(exc).__name__}: {exc}"
            at_end = True
        if at_end:
            self._end()
        elif channel.eof_received:
            # The pipe stays readable after EOF: poll briefly for the status and the close
            # instead of spinning on it (and give up waiting after _EOF_WAIT_S).
            if self._fd is not None:
                self.loop.remove_reader(self._fd)
                self._fd = None
                self._eof_deadline = self.loop.time() + _EOF_WAIT_S
            if self.loop.time() >= self._eof_deadline:
                self._end()
            else:
                self.loop.call_later(_EOF_POLL_S, self._readable)

    def _end(self) -> None:
        """The channel ended (or must): fail what is still running, free everything."""
        if self._ended.done():
            return
        self._ended.set_result(None)
        self.retiring = True
        if self._fd is not None:
            self.loop.remove_reader(self._fd)
        if self._safety is not None:
            self._safety.cancel()
        if not self._hello_seen.done():
            self._hello_seen.set_result(None)
        if self.end_reason is None:
            self.end_reason = "the warm executor's channel closed"
        jobs = list(self._jobs.values())
        self._jobs.clear()
        with contextlib.suppress(Exception):
            self.channel.close()
        if jobs:
            # Let paramiko's transport thread notice a dead connection first (it unlinks
            # channels before it marks itself inactive), so a lost connection is reported
            # as such (the exec path's _LOSS_SETTLE_S).
            self.loop.call_later(_LOSS_SETTLE_S, self._fail_jobs, jobs)
        self._on_end(self)

    def _fail_jobs(self, jobs: list[WarmJob]) -> None:
        transport_gone = self._transport_dead()
        for warm_job in jobs:
            if transport_gone:
                error: SshError = self._lost_error()
            else:
                error = SshConnectionLost(
                    self.host,
                    f"warm executor on {self.host} ended while a command ran: "
                    f"{self.describe_failure()}",
                )
            job = warm_job.job
            job.emit_stdout(job.stdout_lines.finish())
            job.emit_stderr(job.stderr_lines.finish())
            _settle(warm_job.done, None, error)

    def _dispatch(self, frame: Frame) -> None:
        kind = frame.kind
        if kind == HELLO:
            self.hello = frame.json()
            if not self._hello_seen.done():
                self._hello_seen.set_result(None)
            return
        if frame.id == 0:
            if kind == ERROR:
                raise FrameError(frame.payload.decode("utf-8", "replace"))
            return
        warm_job = self._jobs.get(frame.id)
        if warm_job is None:
            return  # a command we stopped waiting for
        job = warm_job.job
        if kind == STDOUT:
            if job.on_stdout is not None:
                job.emit_stdout(job.stdout_lines.feed(frame.payload))
        elif kind == STDERR:
            if job.on_stderr is not None:
                job.emit_stderr(job.stderr_lines.feed(frame.payload))
        elif kind == EXITED:
            del self._jobs[frame.id]
            job.emit_stdout(job.stdout_lines.finish())
            job.emit_stderr(job.stderr_lines.finish())
            code = frame.json().get("code")
            # After the lines: they are delivered by callbacks already queued on the loop.
            self.loop.call_soon(
                _settle, warm_job.done, code if isinstance(code, int) else None, None
            )
        elif kind == ERROR:
            del self._jobs[frame.id]
            message = frame.payload.decode("utf-8", "replace")
            error = SshChannelError(self.host, f"warm executor on {self.host}: {message}")
            _settle(warm_job.done, None, error)
        elif kind == STALE:
            del self._jobs[frame.id]
            self.retiring = True
            reason = frame.payload.decode("utf-8", "replace")
            _settle(warm_job.done, None, StaleServer(reason))
