"""The agent's side of the thin ``run`` path, and the thin index the full CLI writes.

See :mod:`ah_fleetctl.thin` for the client and why it exists. Here:

* :func:`write_thin_index` — called by the full ``run`` after it ran through the agent:
  records the agent's socket, the configuration files the invocation consulted and the run
  settings from configuration, keyed by (cwd, environment).
* :func:`serve_thin_run` — the agent runs the whole ``run`` (selection, rendering, the
  fence unless ``--no-fence`` (:mod:`ah_fleetctl.thin_fence`), the
  :class:`~ah_run_everywhere.RunEngine` over its warm transports, per-host logs, session
  events, the summary) and streams the text the CLI would have printed; ``fence`` likewise
  (:func:`ah_fleetctl.thin_fence.thin_fence_command`).
"""

from __future__ import annotations

import asyncio
import contextlib
import marshal
import os
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click
import msgspec
from loguru import logger

from ah_config import CliError
from ah_domain_types import (
    DomainValidationError,
    ErrorBody,
    ErrorEnvelope,
    ExitCode,
    FollowerStatus,
    RunEnvelope,
    RunSummary,
    validate_session_id,
)
from ah_run_everywhere import HostUnreachable, OutputCallback
from ah_run_everywhere.ssh_executor import SshExecutor

from .agent_proto import (
    ThinCancelRequest,
    ThinDefaults,
    ThinDoneReply,
    ThinFallbackReply,
    ThinIndexEntry,
    ThinOutReply,
    ThinReply,
    ThinRunRequest,
    ThinStartedReply,
)
from .dataplane import FollowerUnreachable
from .thin import INDEX_VERSION, file_signature, index_path, relevant_env, repo_root_of

if TYPE_CHECKING:
    from ah_ssh_bridge import ExecOutcome, SshTransport, WarmCommand

    from .agent import LeaderAgent
    from .context import FleetContext
    from .events import AgentSessionSink

__all__ = [
    "SERVED_PARAMS",
    "config_flags_given",
    "serve_thin_run",
    "start_event_sink",
    "write_thin_index",
]

SERVED_PARAMS = frozenset(
    {
        "hosts",
        "tags",
        "all_",
        "commands",
        "timeout_s",
        "no_fence",
        "session_id",
        "argv",
        "json_output",
        "non_interactive",
    }
)
"""``run`` parameters the thin path serves; any other one given (``--access-point``,
``--config``, the log flags...) changes the configuration, so the full CLI handles it."""

_INTERRUPTED_EXIT_CODE = 130
_T = TypeVar("_T")
_log = logger.bind(component="ah-fleetctl.agent")
_json_encoder = msgspec.json.Encoder()


def _encode(reply: ThinReply) -> bytes:
    return marshal.dumps(msgspec.to_builtins(reply))


def _decode(payload: bytes, type_: type[_T]) -> _T:
    """A thin-client frame (marshal; see ``ah_fleetctl.thin``), validated as ``type_``."""
    try:
        value = marshal.loads(payload)
    except (ValueError, EOFError, TypeError) as exc:
        raise msgspec.ValidationError(f"not a marshal frame: {exc}") from None
    return msgspec.convert(value, type_)


def _given(value: object) -> bool:
    return value not in (None, False, (), "", [])


def config_flags_given(ctx: click.Context) -> list[str]:
    """Parameters of ``ctx`` and its parents, outside :data:`SERVED_PARAMS`, that were given."""
    given: list[str] = []
    current: click.Context | None = ctx
    while current is not None:
        given += [n for n, v in current.params.items() if n not in SERVED_PARAMS and _given(v)]
        current = current.parent
    return given


def parse_thin_request(request: ThinRunRequest, command: click.Command) -> dict[str, Any]:
    """``request``'s arguments parsed by ``command`` as the full CLI would (its params);
    :class:`_Fallback` when the protocol version differs, the full CLI would report the
    invocation itself (usage error, ``--help``), or configuration flags were given.

    Parsing depends on the arguments alone (no option reads the environment, and the ones
    that look at files are configuration flags, a fallback either way), so the outcome is
    kept per argument list: the same invocation typed again is not parsed again."""
    if request.version != INDEX_VERSION:
        raise _Fallback(f"thin protocol version {request.version}, agent speaks {INDEX_VERSION}")
    key = (command, tuple(request.args))
    outcome = _parsed.get(key)
    if outcome is None:
        outcome = _parse(command, list(request.args))
        if len(_parsed) >= _PARSED_KEPT:
            _parsed.clear()
        _parsed[key] = outcome
    if isinstance(outcome, str):
        raise _Fallback(outcome)
    return dict(outcome)


def _parse(command: click.Command, args: list[str]) -> dict[str, Any] | str:
    """``command``'s params for ``args``, or why the full CLI must handle them."""
    try:
        ctx = command.make_context(command.name or "run", args)
    except (click.ClickException, click.exceptions.Exit, click.Abort) as exc:
        return f"the full CLI reports this invocation ({type(exc).__name__})"
    flags = config_flags_given(ctx)
    if flags:
        return f"configuration flags given: {', '.join(flags)}"
    return dict(ctx.params)


_PARSED_KEPT = 64
_parsed: dict[tuple[click.Command, tuple[str, ...]], dict[str, Any] | str] = {}


# --------------------------------------------------------------------------- the index


def write_thin_index(app: FleetContext, socket_path: Path, defaults: ThinDefaults) -> Path | None:
    """Record this invocation's agent for the thin path; None when it must not be recorded
    (configuration flags were given). Never raises for I/O: the run matters more."""
    if config_flags_given(app.click_ctx):
        return None
    from ah_config import Layer

    file_layers = {Layer.SYSTEM, Layer.USER, Layer.REPO, Layer.REPO_USER, Layer.CONFIG_FILE}
    try:
        cwd = os.getcwd()
        files = [
            [source.source, file_signature(source.source)]
            for source in app.config.layers
            if source.layer in file_layers
        ]
        entry = ThinIndexEntry(
            version=INDEX_VERSION,
            cwd=cwd,
            env=relevant_env(os.environ),
            socket=str(socket_path),
            files=files,
            repo_root=repo_root_of(cwd),
            defaults=defaults,
        )
        path = Path(index_path(cwd))
        for directory in (path.parent.parent, path.parent):
            with contextlib.suppress(FileExistsError):
                directory.mkdir(mode=0o700)
            info = directory.lstat()
            if directory.is_symlink() or info.st_uid != os.getuid() or info.st_mode & 0o077:
                _log.warning("not writing the thin index: {} is not private to us", directory)
                return None
        fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=".entry-")
        with os.fdopen(fd, "wb") as handle:
            handle.write(marshal.dumps(msgspec.to_builtins(entry)))
        os.replace(temporary, path)
    except OSError as exc:
        _log.debug("could not write the thin index: {}", exc)
        return None
    return path


# --------------------------------------------------------------------------- serving


class _Fallback(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _OutStream:
    """A text stream for ``LinePrinter``: each write becomes one ``out`` frame."""

    def __init__(self, send: Callable[[ThinReply], None], fd: int) -> None:
        self._send = send
        self._fd: Any = fd

    def write(self, text: str) -> int:
        self._send(ThinOutReply(fd=self._fd, text=text))
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False


class _ConnectorExecutor:
    """A ``HostExecutor`` on the agent's warm transports (linked on first use), running
    POSIX commands on each transport's warm executor (``ah_ssh_bridge.warm``)."""

    accepts_warm_commands = True

    def __init__(
        self,
        agent: LeaderAgent,
        followers: Mapping[str, FollowerStatus],
        connect_timeout: float,
    ) -> None:
        self.agent = agent
        self.followers = followers
        self.connect_timeout = connect_timeout
        self._transports: dict[str, SshTransport] = {}
        self._executor = SshExecutor(self._transports)

    async def run(
        self,
        host: str,
        command: str,
        *,
        on_stdout: OutputCallback,
        on_stderr: OutputCallback,
        timeout: float | None,
        warm: WarmCommand | None = None,
    ) -> ExecOutcome:
        connector = self.agent.connector
        assert connector is not None
        follower = self.followers[host]
        # The usual case (the path is fixed and up) needs no deadline, lock or task switch.
        transport = connector.ready_transport(follower)
        if transport is None:
            deadline = max(self.connect_timeout, getattr(connector, "overall_timeout_s", 0.0))
            try:
                async with asyncio.timeout(deadline):
                    transport = await connector.connect(follower)
            except FollowerUnreachable as exc:
                raise HostUnreachable(host, exc.reason) from None
            except TimeoutError:
                raise HostUnreachable(host, f"no path within {deadline:g}s") from None
        self._transports[host] = transport
        return await self._executor.run(
            host, command, on_stdout=on_stdout, on_stderr=on_stderr, timeout=timeout, warm=warm
        )


def send_error(
    send: Callable[[ThinReply], None], exc: CliError | DomainValidationError, json_mode: bool
) -> int:
    """Send what the full CLI prints for ``exc``; returns its exit code."""
    stdout, stderr, code = _error_text(exc, json_mode)
    send(ThinOutReply(fd=2, text=stderr))
    if stdout:
        send(ThinOutReply(fd=1, text=stdout))
    return code


def selection_and_session(
    params: Mapping[str, Any], defaults: ThinDefaults
) -> tuple[Any, str | None]:
    """The selector of ``--host/--tag/--all`` and the session id (flag, else configured).

    Raises:
        CliError, DomainValidationError: as the full CLI would report them.
    """
    from .options import selector_from_options

    selector = selector_from_options(params["hosts"], params["tags"], params["all_"])
    session_flag = params["session_id"] or defaults.session
    return selector, (validate_session_id(session_flag) if session_flag else None)


def start_event_sink(
    agent: LeaderAgent,
    defaults: ThinDefaults,
    send: Callable[[ThinReply], None],
    session_id: str | None,
) -> tuple[AgentSessionSink | None, str | None]:
    """This run's session-event sink, started, and the session id it got; (None, the id
    asked for) with a warning to the CLI when the sink cannot start: the run (or fence)
    matters more than its event stream. The sink's own warnings go to the CLI too."""
    loop = asyncio.get_running_loop()

    def warn(message: str) -> None:
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(send, ThinOutReply(fd=2, text=f"warning: {message}\n"))

    try:
        events = agent.event_sink(Path(defaults.runs_base) / "sessions", warn)
        return events, events.start(session_id)
    except Exception as exc:
        send(ThinOutReply(fd=2, text=f"warning: session events are off for this run: {exc}\n"))
        return None, session_id


def _error_text(exc: CliError | DomainValidationError, json_mode: bool) -> tuple[str, str, int]:
    """(stdout, stderr, code) the full CLI prints for ``exc``."""
    code, kind, message = int(exc.exit_code), exc.kind, exc.message
    stdout = ""
    if json_mode:
        body = ErrorBody(kind=kind, message=message, exit_code=code, details=dict(exc.details))
        stdout = _json_encoder.encode(ErrorEnvelope(body)).decode() + "\n"
    return stdout, f"Error: {message}\n", code


async def serve_thin_run(
    agent: LeaderAgent,
    payload: bytes,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
) -> None:
    """Serve one thin ``run`` on this connection (see :mod:`ah_fleetctl.thin`).

    A warning meant for this CLI that comes after it got its answer (the run's session
    events are pushed after the answer: an access point that refuses them says so then) or
    after it went away is kept by the agent and shown by the next thin run's CLI."""
    answered = False

    def send(reply: ThinReply) -> None:
        if answered or writer.is_closing():
            if isinstance(reply, ThinOutReply) and reply.fd == 2:
                agent.keep_late_warning(reply.text)
            return
        frame = _encode(reply)
        writer.write(len(frame).to_bytes(4, "big") + frame)

    try:
        await _serve(agent, payload, reader, send)
    finally:
        answered = True


async def _serve(
    agent: LeaderAgent,
    payload: bytes,
    reader: asyncio.StreamReader,
    send: Callable[[ThinReply], None],
) -> None:
    try:
        request = _decode(payload, ThinRunRequest)
    except msgspec.ValidationError as exc:
        send(ThinFallbackReply(reason=f"unreadable thin request: {exc}"))
        return
    for text in agent.take_late_warnings():
        send(ThinOutReply(fd=2, text=text))
    started: list[bool] = []

    def send_tracked(reply: ThinReply) -> None:
        if isinstance(reply, ThinStartedReply):
            started.append(True)
        send(reply)

    try:
        if request.command == "fence":
            from .thin_fence import thin_fence_command

            code = await thin_fence_command(agent, request, send_tracked, reader)
        else:
            code = await _thin_run(agent, request, send_tracked, reader)
    except _Fallback as exc:
        _log.debug("thin run declined: {}", exc.reason)
        send(ThinFallbackReply(reason=exc.reason))
        return
    except Exception as exc:
        _log.opt(exception=exc).error("thin run failed: {}", exc)
        if not started:
            send(ThinFallbackReply(reason=f"the agent failed before the run: {exc!r}"))
            return
        send(ThinOutReply(fd=2, text=f"Error: the leader agent failed during the run: {exc!r}\n"))
        code = int(ExitCode.HOSTS_FAILED)
    send(ThinDoneReply(code=code))


async def _thin_run(
    agent: LeaderAgent,
    request: ThinRunRequest,
    send: Callable[[ThinReply], None],
    reader: asyncio.StreamReader,
) -> int:
    from ah_run_everywhere import (
        LinePrinter,
        RunDirectory,
        RunEngine,
        default_mode,
        display_command,
        format_summary,
    )

    from .commands.fleet import select_followers
    from .commands.run import _check_renderable, _supplement, run_command
    from .thin_fence import AgentLinks

    marks: list[tuple[str, float]] = [("received", time.perf_counter())]
    params = parse_thin_request(request, run_command)
    fence = not params["no_fence"]
    if fence:
        from .thin_fence import fence_fallback_reason

        reason = fence_fallback_reason(request)
        if reason is not None:
            raise _Fallback(reason)
    argv: tuple[str, ...] = params["argv"]
    commands: tuple[str, ...] = params["commands"]
    if bool(argv) == bool(commands):
        raise _Fallback("usage error: the full CLI reports it")
    defaults = request.defaults
    json_mode = bool(params["json_output"]) or defaults.json

    logical: list[Any] = [list(argv)] if argv else list(commands)
    try:
        selector, session_id = selection_and_session(params, defaults)
    except (CliError, DomainValidationError) as exc:
        return send_error(send, exc, json_mode)
    try:
        marks.append(("parsed", time.perf_counter()))
        fleet = await agent._followers_named([])
        marks.append(("followers", time.perf_counter()))
    except Exception as exc:  # the full CLI asks the access point itself and reports it
        raise _Fallback(f"follower list: {exc}") from None
    try:
        selected = select_followers(selector, fleet)
        links = AgentLinks(
            selected,
            agent.connector,  # type: ignore[arg-type]
            connect_timeout=agent.app.connect_timeout_s(),
            leader_root=request.cwd,
            workspaces=defaults.workspaces,
        )
        targets = links.target_hosts(request.cwd)
        _check_renderable(targets, logical)
    except (CliError, DomainValidationError) as exc:
        return send_error(send, exc, json_mode)

    timeout = params["timeout_s"] if params["timeout_s"] is not None else defaults.timeout_s
    loop = asyncio.get_running_loop()
    events, session_id = start_event_sink(agent, defaults, send, session_id)
    marks.append(("events", time.perf_counter()))
    send(ThinStartedReply())
    names = [t.name for t in targets]
    mode = default_mode(len(logical))
    printer = None if json_mode else LinePrinter(_OutStream(send, 1), names, colour=request.colour)  # type: ignore[arg-type]
    spare_key: tuple[str, frozenset[str]] | None = None
    interrupted = False
    engine: RunEngine | None = None
    fencing: asyncio.Task[dict[str, str]] | None = None
    fence_failed: dict[str, str] = {}
    fence_cancelled = False

    async def watch_client() -> None:
        nonlocal interrupted
        # A cancel frame (Ctrl-C in the CLI) or the CLI going away stops the run.
        with contextlib.suppress(OSError, ConnectionError, asyncio.IncompleteReadError):
            while True:
                header = await reader.readexactly(4)
                frame = await reader.readexactly(int.from_bytes(header, "big"))
                with contextlib.suppress(msgspec.ValidationError):
                    _decode(frame, ThinCancelRequest)
                    break
        interrupted = True
        if engine is not None:
            engine.cancel("interrupted (SIGINT)")
        elif fencing is not None:
            fencing.cancel()

    watcher = loop.create_task(watch_client())
    try:
        if fence:
            # As the full CLI: link, fence the linked hosts (ah_fleetctl.thin_fence); a host
            # whose fence is not consistent gets no command.
            from .thin_fence import fence_for_run

            fencing = loop.create_task(
                fence_for_run(links, defaults, events.emit if events is not None else None)
            )
            try:
                fence_failed = await fencing
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if current is not None and current.cancelling():
                    raise
                fence_cancelled = True
            except (CliError, DomainValidationError) as exc:
                return send_error(send, exc, json_mode)
            marks.append(("fence", time.perf_counter()))
        engine_hosts = [t for t in targets if t.name not in fence_failed]
        # One command: every host that runs gets a log, so a directory made after the last
        # run over the same hosts fits (file creation off the hot path; SpareRunDirectory).
        # Keyed on the hosts that run, after the fence: a host it failed gets no log file.
        if mode == "every-host" and engine_hosts:
            spare_key = (defaults.runs_base, frozenset(t.name for t in engine_hosts))
        spare = agent.take_spare_run_dir(spare_key) if spare_key is not None else None
        run_dir = RunDirectory(defaults.runs_base, spare=spare)
        unreachable = {
            t.name: f"unreachable: {links.unreachable[t.name].reason}"
            for t in engine_hosts
            if t.name in links.unreachable
        }
        if fence_cancelled or not engine_hosts:
            run_dir.close()
            envelope = RunEnvelope(
                session_id=session_id,
                commands=[display_command(c) for c in logical],
                hosts=[],
                summary=RunSummary.from_results([]),
                run_dir=str(run_dir.path),
            )
        else:
            engine = RunEngine(
                _ConnectorExecutor(agent, links.followers, links.connect_timeout),
                engine_hosts,
                logical,
                mode=mode,
                timeout=timeout,
                sink=events.emit if events is not None else None,
                printer=printer,
                run_dir=run_dir,
                session_id=session_id,
                unreachable=unreachable,
            )
            if interrupted:
                engine.cancel("interrupted (SIGINT)")
            envelope = await engine.run()
        marks.append(("engine", time.perf_counter()))
    finally:
        watcher.cancel()
        if spare_key is not None:
            agent.in_background(agent.prepare_spare_run_dir(spare_key))
        if events is not None:
            agent.in_background(agent.close_event_sink(events))
    # As the full CLI: a selected host that got no job (sharding) is reported, never dropped.
    cancelled = "interrupted (SIGINT)" if fence_cancelled else None
    hosts = _supplement(list(envelope.hosts), links, fence_failed, cancelled=cancelled)
    envelope = RunEnvelope(
        session_id=envelope.session_id,
        commands=envelope.commands,
        hosts=hosts,
        summary=RunSummary.from_results(hosts),
        run_dir=envelope.run_dir,
    )
    if json_mode:
        send(ThinOutReply(fd=1, text=_json_encoder.encode(envelope).decode() + "\n"))
    else:
        send(ThinOutReply(fd=1, text=format_summary(envelope.hosts) + "\n"))
        if envelope.run_dir:
            send(ThinOutReply(fd=2, text=f"logs: {envelope.run_dir}\n"))
    marks.append(("output", time.perf_counter()))
    _log.debug(
        "thin run on {} host(s): {}",
        len(targets),
        ", ".join(f"{name} +{(t - marks[0][1]) * 1000:.1f}ms" for name, t in marks[1:]),
    )
    return _INTERRUPTED_EXIT_CODE if interrupted else int(envelope.exit_code)
