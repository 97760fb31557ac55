"""The leader agent: one background process per user and access point (the ControlMaster
equivalent) that keeps each follower's fixed path and SSH transport open between
``ah-fleetctl`` invocations.

* :func:`agent_client` — the agent of this invocation's configuration, started on first use
  (``ah-fleetctl agent``, a hidden command, in its own session), or None when bypassed
  (``--no-agent``, config ``agent.enabled = false``).
* The socket lives in the private (0700) runtime directory, named by a hash of the access
  point URL and the data-plane configuration (login, path policy, timeouts), so an
  invocation never reuses an agent that would reach followers differently.
* The agent exits after ``agent.idle`` (default 10 minutes) without a request.
* :class:`AgentExecutor` is an ``ah_run_everywhere.HostExecutor`` whose commands run on the
  agent's transports (streamed lines, exit status, cancel).

The protocol is in :mod:`ah_fleetctl.agent_proto`.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import gc
import hashlib
import os
import subprocess
import sys
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec
from loguru import logger

from ah_config import CliError, find_config_file
from ah_connectivity.framing import (
    DEFAULT_MAX_FRAME_SIZE,
    HEADER_SIZE,
    FrameDecoder,
    FrameError,
    encode_frame,
)
from ah_domain_types import Event, ExitCode, FollowerStatus, parse_duration
from ah_run_everywhere import HostConnectionLost, HostUnreachable, OutputCallback
from ah_ssh_bridge import SshChannelError, SshConnectionLost, SshError

from .agent_proto import (
    AgentReply,
    AgentRequest,
    CancelRequest,
    ErrorReply,
    ExecRequest,
    ExitReply,
    HostPath,
    LineReply,
    PathsReply,
    PathsRequest,
    PingRequest,
    PongReply,
    ShutdownRequest,
)
from .dataplane import FollowerUnreachable

if TYPE_CHECKING:
    from ah_run_everywhere import SpareRunDirectory

    from .context import FleetContext
    from .events import AgentEventPush, AgentSessionSink
    from .paths import PathConnector

__all__ = [
    "DEFAULT_IDLE_S",
    "AgentClient",
    "AgentExecutor",
    "AgentOutcome",
    "LeaderAgent",
    "agent_client",
    "agent_executor",
    "agent_socket_path",
]

DEFAULT_IDLE_S = 600.0
_START_TIMEOUT_S = 20.0
_FOLLOWERS_TTL_S = 2.0
"""A run never uses a follower list older than this (it fetches one first)."""
_FOLLOWERS_REFRESH_AHEAD_S = 0.5
"""While the agent is in use the list is fetched again this long before it gets too old,
in the background, so runs a few seconds apart (a user, a coding agent) never wait for
it."""
_FOLLOWERS_KEEP_FRESH_S = 60.0
"""...for this long after the last request (then the next run fetches it itself)."""
_EVENT_RELEASE_DELAY_S = 0.25
"""A run's session events are pushed when it answered, or this long after it started if
that comes first: short runs do not share the CPU with their own events."""
_MAX_SPARE_RUN_DIRS = 4
"""Spare run directories kept (one per recent host selection; see prepare_spare_run_dir)."""
_MAX_LATE_WARNINGS = 20
"""Warnings kept for the next thin run (see LeaderAgent.keep_late_warning); older ones are
counted, and every one is in the agent's log."""
_LATE_PREFIX = "warning: "


class GcPolicy:
    """When the agent's garbage collector runs: between requests, not in the middle of one.

    With CPython's defaults a collection of the youngest generation runs every 700 new
    container objects, several times per 16-host run, and every so often a full one walks
    every object the agent holds (~70,000 after start-up: click, paramiko, aioquic, the
    transports), ~40 ms in the middle of somebody's run. So: the objects alive after
    start-up are frozen (never walked again), automatic collections only start after
    `young_threshold` new objects (a long run with much output still gets them), the young
    generations are collected after every request, once its answer went out (while the next
    CLI process starts up, on the other core), and a full collection runs when the agent has
    been idle for `full_after_idle_s`, which also re-freezes what is alive then (lazily
    imported modules, transports opened since)."""

    def __init__(self, *, young_threshold: int = 50_000, full_after_idle_s: float = 2.0) -> None:
        self.young_threshold = young_threshold
        self.full_after_idle_s = full_after_idle_s
        self.full_due = False
        """A request was served since the last full collection."""

    def start(self) -> None:
        gc.collect()
        gc.freeze()
        _, middle, old = gc.get_threshold()
        gc.set_threshold(self.young_threshold, middle, old)

    def after_request(self) -> None:
        gc.collect(1)
        self.full_due = True

    def when_idle(self, idle_for_s: float) -> None:
        if self.full_due and idle_for_s >= self.full_after_idle_s:
            self.full_due = False
            gc.unfreeze()  # what was frozen and died since (a closed transport) goes now
            gc.collect()
            gc.freeze()


_log = logger.bind(component="ah-fleetctl.agent")

_REQUEST_DECODER_TYPE: Any = AgentRequest
_REPLY_DECODER_TYPE: Any = AgentReply


# --------------------------------------------------------------------------- where


def agent_idle_s(app: FleetContext) -> float:
    agent = app.config.typed.agent
    value = agent.idle if agent is not None else None
    return DEFAULT_IDLE_S if value is None else max(parse_duration(value), 0.1)


def agent_enabled(app: FleetContext) -> bool:
    if app.click_ctx.find_root().meta.get("ah_fleetctl.no_agent"):
        return False
    if os.environ.get("AH_NO_AGENT"):
        return False
    agent = app.config.typed.agent
    return not (agent is not None and agent.enabled is False)


def agent_socket_path(app: FleetContext) -> Path:
    """The agent's socket: keyed by the access point and every setting that changes how
    followers are reached (and by whom)."""
    from .paths import runtime_dir

    cfg = app.config.typed
    key = msgspec.json.encode(
        {
            "accessPoint": app.access_point(),
            "token": hashlib.sha256(app.token().encode()).hexdigest(),
            "caFile": str(app.ca_file() or ""),
            "ssh": msgspec.to_builtins(cfg.ssh),
            "hosts": msgspec.to_builtins(cfg.hosts),
            "pathPolicy": msgspec.to_builtins(cfg.path_policy),
            "timeouts": msgspec.to_builtins(cfg.timeouts),
            "session": cfg.session,
        }
    )
    directory = runtime_dir() / "agents"
    with contextlib.suppress(FileExistsError):
        directory.mkdir(mode=0o700)
    return directory / f"{hashlib.sha256(key).hexdigest()[:20]}.sock"


# --------------------------------------------------------------------------- client


class AgentError(Exception):
    """The agent answered with an error (``reply``) or could not be talked to."""

    def __init__(self, message: str, reply: ErrorReply | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.reply = reply


class AgentOutcome(msgspec.Struct, frozen=True):
    """An ``ExecOutcomeLike`` from the agent's :class:`ExitReply`."""

    exit_code: int | None
    timed_out: bool
    cancelled: bool
    took_ms: float


class AgentClient:
    """Talks to a running agent over its unix socket."""

    def __init__(self, socket_path: Path) -> None:
        self.socket_path = socket_path

    async def _open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_unix_connection(str(self.socket_path), limit=1 << 20)

    async def replies(
        self,
        request: AgentRequest,
        *,
        cancel: asyncio.Event | None = None,
    ) -> AsyncIterator[AgentReply]:
        """Send ``request`` and yield the agent's replies until it closes the connection.
        When ``cancel`` is set, a :class:`CancelRequest` follows."""
        reader, writer = await self._open()
        decoder: FrameDecoder[AgentReply] = FrameDecoder(_REPLY_DECODER_TYPE)
        canceller: asyncio.Task[None] | None = None
        try:
            writer.write(encode_frame(request))
            await writer.drain()
            if cancel is not None:

                async def send_cancel() -> None:
                    await cancel.wait()
                    with contextlib.suppress(OSError, RuntimeError):
                        writer.write(encode_frame(CancelRequest()))
                        await writer.drain()

                canceller = asyncio.get_running_loop().create_task(send_cancel())
            while data := await reader.read(1 << 16):
                for reply in decoder.feed(data):
                    yield reply
        finally:
            if canceller is not None:
                canceller.cancel()
            writer.close()
            with contextlib.suppress(OSError, ConnectionError):
                await writer.wait_closed()

    async def one(self, request: AgentRequest) -> AgentReply:
        async for reply in self.replies(request):
            return reply
        raise AgentError(f"the agent at {self.socket_path} closed the connection without a reply")

    async def ping(self) -> PongReply:
        reply = await self.one(PingRequest())
        if not isinstance(reply, PongReply):
            raise AgentError(f"unexpected answer to ping: {reply!r}")
        return reply

    async def paths(self, hosts: list[str]) -> PathsReply:
        reply = await self.one(PathsRequest(hosts=hosts))
        if isinstance(reply, ErrorReply):
            raise AgentError(reply.message, reply)
        if not isinstance(reply, PathsReply):
            raise AgentError(f"unexpected answer to paths: {reply!r}")
        return reply

    async def shutdown(self) -> None:
        with contextlib.suppress(AgentError, OSError):
            await self.one(ShutdownRequest())

    async def run(
        self,
        host: str,
        command: str,
        *,
        on_stdout: Callable[[str], object],
        on_stderr: Callable[[str], object],
        timeout: float | None = None,
        cancel: asyncio.Event | None = None,
    ) -> AgentOutcome:
        """Run ``command`` on ``host`` through the agent; lines (without terminators) go
        to the callbacks. Raises :class:`AgentError` (``reply.unreachable``...)."""
        request = ExecRequest(host=host, command=command, timeout_s=timeout)
        async for reply in self.replies(request, cancel=cancel):
            if isinstance(reply, LineReply):
                (on_stdout if reply.stream == "stdout" else on_stderr)(reply.line)
            elif isinstance(reply, ExitReply):
                return AgentOutcome(
                    reply.exit_code, reply.timed_out, reply.cancelled, reply.took_ms
                )
            elif isinstance(reply, ErrorReply):
                raise AgentError(reply.message, reply)
        raise AgentError(f"the agent lost the command on {host} (connection closed)")


async def _ping(path: Path) -> bool:
    if not path.exists():
        return False
    try:
        async with asyncio.timeout(5.0):
            await AgentClient(path).ping()
    except (OSError, AgentError, FrameError, TimeoutError):
        return False
    return True


def _spawn_argv(app: FleetContext, socket_path: Path, idle_s: float) -> list[str]:
    argv = [sys.executable, "-m", "ah_fleetctl"]
    config = find_config_file(app.click_ctx)
    if config is not None:
        argv += ["--config", str(config.absolute())]
    return [*argv, "agent", "--socket", str(socket_path), "--idle", f"{idle_s:g}s"]


async def agent_client(app: FleetContext) -> AgentClient | None:
    """The running agent of this configuration, started if needed; None when bypassed or
    when it cannot be started (the caller then connects by itself)."""
    if not agent_enabled(app):
        return None
    path = agent_socket_path(app)
    if await _ping(path):
        return AgentClient(path)
    lock_path = path.with_suffix(".lock")
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        await asyncio.to_thread(fcntl.flock, fd, fcntl.LOCK_EX)
        if await _ping(path):
            return AgentClient(path)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        log_path = path.with_suffix(".log")
        env = {
            **os.environ,
            "AH_REMOTE_SERVER": app.access_point(),
            "AH_TOKEN": app.token(),
        }
        env.pop("AH_JSON", None)
        ca_file = app.ca_file()
        if ca_file is not None:
            env["AH_CA_FILE"] = str(ca_file.absolute())
        with open(log_path, "ab") as log:
            process = subprocess.Popen(
                _spawn_argv(app, path, agent_idle_s(app)),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log,
                env=env,
                cwd="/",
                start_new_session=True,
            )
        deadline = time.monotonic() + _START_TIMEOUT_S
        while time.monotonic() < deadline:
            if process.poll() is not None:
                _log.warning(
                    "the leader agent exited with status {} at start (log: {})",
                    process.returncode,
                    log_path,
                )
                return None
            if await _ping(path):
                _log.debug("started the leader agent (pid {}) at {}", process.pid, path)
                return AgentClient(path)
            await asyncio.sleep(0.05)
        _log.warning(
            "the leader agent did not answer within {}s (log: {})", _START_TIMEOUT_S, log_path
        )
        return None
    finally:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


# --------------------------------------------------------------------------- executor


class AgentExecutor:
    """An ``ah_run_everywhere.HostExecutor`` running each command through the agent."""

    def __init__(self, client: AgentClient) -> None:
        self.client = client

    async def run(
        self,
        host: str,
        command: str,
        *,
        on_stdout: OutputCallback,
        on_stderr: OutputCallback,
        timeout: float | None,
    ) -> AgentOutcome:
        cancel = asyncio.Event()
        try:
            return await self.client.run(
                host,
                command,
                on_stdout=lambda line: on_stdout(line + "\n"),
                on_stderr=lambda line: on_stderr(line + "\n"),
                timeout=timeout,
                cancel=cancel,
            )
        except AgentError as exc:
            reply = exc.reply
            if reply is not None and reply.unreachable:
                raise HostUnreachable(host, reply.message) from None
            if reply is not None and reply.kind != "connection-lost":
                raise
            raise HostConnectionLost(host, exc.message) from None
        except (OSError, FrameError) as exc:
            raise HostConnectionLost(host, f"leader agent: {exc}") from None
        except asyncio.CancelledError:
            cancel.set()
            raise


# --------------------------------------------------------------------------- the agent


class LeaderAgent:
    """The agent process: paths and transports, served over a unix socket."""

    def __init__(self, app: FleetContext, socket_path: Path, idle_s: float) -> None:
        self.app = app
        self.socket_path = socket_path
        self.idle_s = idle_s
        self.connector: PathConnector | None = None
        self._followers: dict[str, FollowerStatus] = {}
        self._fetched_at = -1e9
        self._fetch_lock = asyncio.Lock()
        self._active = 0
        self._last_activity = time.monotonic()
        self._stop = asyncio.Event()
        self._client: Any = None
        self._background: set[asyncio.Task[None]] = set()
        self._event_push: AgentEventPush | None = None
        self._spare_run_dirs: dict[tuple[str, frozenset[str]], SpareRunDirectory] = {}
        self.gc = GcPolicy()
        self._refresher: asyncio.Task[None] | None = None
        self.follower_fetches_in_runs = 0
        """Follower-list fetches a request had to wait for (the ping reports it)."""
        self.follower_fetches_ahead = 0
        """Fetches made in the background, before the list got too old for a run."""
        self._late_warnings: deque[str] = deque(maxlen=_MAX_LATE_WARNINGS)
        self._late_dropped = 0

    async def serve(self) -> int:
        from .paths import make_path_connector

        self._client = self.app.api_client()
        self.connector = await asyncio.to_thread(make_path_connector, self.app)
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()
        old_umask = os.umask(0o177)
        try:
            server = await asyncio.start_unix_server(
                self._handle, path=str(self.socket_path), limit=1 << 20
            )
        finally:
            os.umask(old_umask)
        self.gc.start()
        _log.info(
            "leader agent (pid {}) for {} on {}; exits after {:g}s idle",
            os.getpid(),
            self.app.access_point(),
            self.socket_path,
            self.idle_s,
        )
        try:
            while not self._stop.is_set():
                idle_for = time.monotonic() - self._last_activity
                if self._active == 0 and idle_for >= self.idle_s:
                    _log.info("leader agent idle for {:.0f}s: exiting", idle_for)
                    break
                if self._active == 0 and not self._background:
                    self.gc.when_idle(idle_for)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(max(0.05, min(1.0, self.idle_s - idle_for))):
                        await self._stop.wait()
        finally:
            server.close()
            with contextlib.suppress(FileNotFoundError):
                self.socket_path.unlink()
            if self._refresher is not None:
                self._refresher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._refresher
            if self._background:
                await asyncio.wait(set(self._background), timeout=30.0)
            if self._event_push is not None:  # every run's events flushed above (bounded)
                await self._event_push.close()
            if "ah_fleetctl.thin_fence" in sys.modules:  # it served fences: end their sessions
                await sys.modules["ah_fleetctl.thin_fence"].close_workspaces()
            for spare in self._spare_run_dirs.values():
                with contextlib.suppress(OSError):
                    spare.discard()
            await self.connector.close()
            self._client.close()
        return int(ExitCode.OK)

    def _followers_usable(self, names: list[str]) -> bool:
        fresh = time.monotonic() - self._fetched_at <= _FOLLOWERS_TTL_S
        return fresh and all(n in self._followers for n in names)

    async def _fetch_followers(self) -> None:
        response = await asyncio.to_thread(self._client.followers)
        self._followers = {f.info.name: f for f in response.followers}
        self._fetched_at = time.monotonic()

    async def _followers_named(self, names: list[str]) -> list[FollowerStatus]:
        if not self._followers_usable(names):
            async with self._fetch_lock:
                if not self._followers_usable(names):  # (not fetched while we waited)
                    self.follower_fetches_in_runs += 1
                    await self._fetch_followers()
        if self._refresher is None or self._refresher.done():
            self._refresher = asyncio.get_running_loop().create_task(self._keep_followers_fresh())
        if not names:
            return list(self._followers.values())
        unknown = [n for n in names if n not in self._followers]
        if unknown:
            raise CliError(
                ExitCode.VALIDATION,
                f"no follower named {', '.join(map(repr, unknown))} in this fleet",
                kind="validation",
            )
        return [self._followers[n] for n in names]

    async def _keep_followers_fresh(self) -> None:
        """Fetch the follower list again shortly before a run would have to, for as long as
        the agent is in use (see `_FOLLOWERS_REFRESH_AHEAD_S`)."""

        def refresh_due() -> float:  # (read again after each wait: a run may have fetched)
            return self._fetched_at + _FOLLOWERS_TTL_S - _FOLLOWERS_REFRESH_AHEAD_S

        while time.monotonic() - self._last_activity < _FOLLOWERS_KEEP_FRESH_S:
            await asyncio.sleep(max(0.0, refresh_due() - time.monotonic()))
            async with self._fetch_lock:
                if time.monotonic() < refresh_due():
                    continue  # a run fetched it meanwhile
                try:
                    await self._fetch_followers()
                except Exception as exc:  # the next run fetches it itself, and reports
                    _log.debug("background follower-list fetch failed: {}", exc)
                    return
                self.follower_fetches_ahead += 1

    def event_sink(self, local_copy_dir: Path, warn: Callable[[str], None]) -> AgentSessionSink:
        """A session event sink for one run, on this agent's one push connection (see
        :class:`ah_fleetctl.events.AgentEventPush`): no thread, handshake or HTTPS
        discovery per run; a run's events go out after it answered (or 0.25 s in)."""
        return self.event_push().sink(local_copy_dir, warn)

    def event_push(self) -> AgentEventPush:
        """This agent's session events: one connection to the access point for all runs
        (made by the first run that pushes)."""
        if self._event_push is None:
            from . import __version__
            from .client import tls_context
            from .events import AgentEventPush

            ca_file = self.app.ca_file()
            self._event_push = AgentEventPush(
                api_url=self.app.access_point(),
                token=self.app.token(),
                verify=tls_context(ca_file),
                ca_pem=ca_file.read_text() if ca_file is not None else None,
                connect_timeout_s=self.app.connect_timeout_s(),
                client_version=f"ah-fleetctl {__version__}",
                release_delay_s=_EVENT_RELEASE_DELAY_S,
            )
        return self._event_push

    async def close_event_sink(self, sink: AgentSessionSink) -> None:
        """Close ``sink``: its events go to the access point now (it waits, bounded, for
        the acks)."""
        await sink.close()

    def take_spare_run_dir(self, key: tuple[str, frozenset[str]]) -> SpareRunDirectory | None:
        """The run directory prepared after the last run over these hosts (``key``: runs
        base and host names), if any; see :meth:`prepare_spare_run_dir`."""
        return self._spare_run_dirs.pop(key, None)

    async def prepare_spare_run_dir(self, key: tuple[str, frozenset[str]]) -> None:
        """Make the next run's directory and log files now, after the answer went out."""
        from ah_run_everywhere import SpareRunDirectory

        base, hosts = key
        if key in self._spare_run_dirs:
            return
        spare = await asyncio.to_thread(SpareRunDirectory, base, hosts)
        stale = [self._spare_run_dirs.pop(key, None)]
        self._spare_run_dirs[key] = spare
        while len(self._spare_run_dirs) > _MAX_SPARE_RUN_DIRS:  # oldest selection first
            stale.append(self._spare_run_dirs.pop(next(iter(self._spare_run_dirs))))
        for old in stale:
            if old is not None:
                await asyncio.to_thread(old.discard)

    def keep_late_warning(self, text: str) -> None:
        """Keep ``text``, a warning for a thin run's CLI that came when that CLI was gone
        (most often the run's session events failing after it answered), for the next thin
        run to show; and log it. Nothing the user should know is dropped on the floor."""
        message = text.strip()
        if message.startswith(_LATE_PREFIX):
            message = message[len(_LATE_PREFIX) :]
        _log.warning("after a run answered: {}", message)
        if len(self._late_warnings) == self._late_warnings.maxlen:
            self._late_dropped += 1
        self._late_warnings.append(message)

    def take_late_warnings(self) -> list[str]:
        """The warnings kept since the last call, as lines for a CLI's stderr."""
        lines = [
            f"{_LATE_PREFIX}after an earlier run answered: {message}\n"
            for message in self._late_warnings
        ]
        if self._late_dropped:
            lines.append(
                f"{_LATE_PREFIX}{self._late_dropped} more such warning(s) are only in the "
                f"agent's log {self.socket_path.with_suffix('.log')}\n"
            )
        self._late_warnings.clear()
        self._late_dropped = 0
        return lines

    def in_background(self, awaitable: Awaitable[object]) -> None:
        """Finish ``awaitable`` after the reply went out (awaited before the agent exits)."""

        async def run() -> None:
            try:
                await awaitable
            except Exception as exc:
                _log.warning("agent background work failed: {}", exc)

        task = asyncio.get_running_loop().create_task(run())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._active += 1
        self._last_activity = time.monotonic()
        try:
            header = await reader.readexactly(HEADER_SIZE)
            length = int.from_bytes(header, "big")
            if not 0 < length <= DEFAULT_MAX_FRAME_SIZE:
                raise FrameError(f"request frame of {length} bytes")
            payload = await reader.readexactly(length)
            if payload[:1] in (b"{", b"\xfb"):
                # The thin run path speaks marshal (see ah_fleetctl.thin).
                from .thin_server import serve_thin_run

                await serve_thin_run(self, payload, reader, writer)
                await writer.drain()
                return
            decoder: FrameDecoder[AgentRequest] = FrameDecoder(_REQUEST_DECODER_TYPE)
            (request,) = decoder.feed(header + payload)
            await self._dispatch(request, reader, writer, decoder)
        except asyncio.IncompleteReadError:
            return
        except FrameError as exc:
            _log.warning("bad request on the agent socket: {}", exc)
        except (ConnectionError, OSError) as exc:
            _log.debug("agent client went away: {}", exc)
        finally:
            self._active -= 1
            self._last_activity = time.monotonic()
            writer.close()
            with contextlib.suppress(OSError, ConnectionError):
                await writer.wait_closed()
            self.gc.after_request()

    @staticmethod
    def _send(writer: asyncio.StreamWriter, reply: AgentReply) -> None:
        writer.write(encode_frame(reply))

    async def _dispatch(
        self,
        request: AgentRequest,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        decoder: FrameDecoder[AgentRequest],
    ) -> None:
        push = self._event_push
        pong = PongReply(
            pid=os.getpid(),
            access_point=self.app.access_point(),
            push_connections=push.connections if push is not None else 0,
            follower_fetches_in_runs=self.follower_fetches_in_runs,
            follower_fetches_ahead=self.follower_fetches_ahead,
        )
        if isinstance(request, PingRequest):
            self._send(writer, pong)
        elif isinstance(request, ShutdownRequest):
            self._send(writer, pong)
            self._stop.set()
        elif isinstance(request, PathsRequest):
            self._send(writer, await self._paths(request))
        elif isinstance(request, ExecRequest):
            await self._exec(request, reader, writer, decoder)
        else:
            self._send(writer, ErrorReply(message=f"unexpected request {request!r}", kind="usage"))
        await writer.drain()

    async def _paths(self, request: PathsRequest) -> PathsReply | ErrorReply:
        from .paths import establish_paths

        assert self.connector is not None
        try:
            followers = await self._followers_named(list(request.hosts))
        except CliError as exc:
            return ErrorReply(message=exc.message, kind=exc.kind)
        paths: list[HostPath] = await establish_paths(self.connector, followers)
        events: list[Event] = []
        for follower in followers:
            driver = self.connector.paths.get(follower.info.name)
            if driver is not None:
                events.extend(driver.events)
        events.sort(key=lambda e: e.ts_ms)
        return PathsReply(paths=paths, events=events)

    async def _exec(
        self,
        request: ExecRequest,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        decoder: FrameDecoder[AgentRequest],
    ) -> None:
        assert self.connector is not None
        try:
            (follower,) = await self._followers_named([request.host])
        except CliError as exc:
            self._send(writer, ErrorReply(message=exc.message, kind=exc.kind, unreachable=True))
            return
        try:
            transport = await self.connector.connect(follower)
        except FollowerUnreachable as exc:
            self._send(writer, ErrorReply(message=exc.reason, kind=exc.kind, unreachable=True))
            return
        cancel = asyncio.Event()

        async def watch_client() -> None:
            # A CancelRequest, or the client going away, stops the command.
            with contextlib.suppress(OSError, ConnectionError, FrameError):
                while data := await reader.read(4096):
                    if any(isinstance(r, CancelRequest) for r in decoder.feed(data)):
                        break
            cancel.set()

        watcher = asyncio.get_running_loop().create_task(watch_client())
        try:
            outcome = await transport.run(
                request.command,
                on_stdout=lambda line: self._send(writer, LineReply(stream="stdout", line=line)),
                on_stderr=lambda line: self._send(writer, LineReply(stream="stderr", line=line)),
                timeout=request.timeout_s,
                cancel=cancel,
            )
        except SshConnectionLost as exc:
            self._send(writer, ErrorReply(message=str(exc), kind="connection-lost"))
            return
        except SshChannelError as exc:
            self._send(writer, ErrorReply(message=str(exc), kind="channel"))
            return
        except SshError as exc:
            self._send(writer, ErrorReply(message=str(exc), kind=exc.kind, unreachable=True))
            return
        finally:
            watcher.cancel()
        self._send(
            writer,
            ExitReply(
                exit_code=outcome.exit_code,
                timed_out=outcome.timed_out,
                cancelled=outcome.cancelled,
                took_ms=outcome.took_ms,
            ),
        )


async def agent_executor(app: FleetContext) -> AgentExecutor | None:
    """An :class:`AgentExecutor` on this configuration's agent (started if needed), or None
    when the agent is bypassed or unavailable (the caller links the followers itself)."""
    try:
        client = await agent_client(app)
    except (OSError, CliError) as exc:
        _log.info("not using the leader agent: {}", exc)
        return None
    return AgentExecutor(client) if client is not None else None
