"""``ah-fleetctl run``: one command (or a sharded set) on the selected followers over SSH.

Order of work: resolve the selection (exit 7 when it is bad or empty) → render every command
for every selected OS (an inexpressible command is exit 7 before anything connects) → link
every follower in parallel (:mod:`ah_fleetctl.dataplane`; unreachable ones become
``unreachable`` results) → fence the linked ones unless ``--no-fence`` (hosts whose fence
is not ``consistent`` are reported ``failed`` and get no command) → run the engine
(``ah_run_everywhere.RunEngine`` over ``SshExecutor``) → summary.

Ctrl-C (SIGINT) cancels: running remote commands are stopped (their process groups killed),
queued jobs are reported ``cancelled``, the summary (or the ``--json`` envelope) is still
printed, and the exit code is 130 — what shells report for an interrupted command, so a
script can tell "interrupted" from "a host failed" (1).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import click
from loguru import logger

from ah_config import AhCommand, echo_json
from ah_domain_types import (
    FollowerStatus,
    HostResult,
    HostState,
    RunEnvelope,
    RunSummary,
    validate_session_id,
)

from ..context import FleetContext
from ..options import (
    common_options,
    parse_duration_option,
    selector_from_options,
    selector_options,
)
from .exec import runs_dir
from .fleet import select_followers

if TYPE_CHECKING:
    from ah_run_everywhere import LogicalCommand, TargetHost

    from ..dataplane import FleetLinks
    from ..events import SessionEventSink

__all__ = ["INTERRUPTED_EXIT_CODE", "run_command"]

INTERRUPTED_EXIT_CODE = 130
"""Exit status after Ctrl-C (128 + SIGINT): the summary is printed first."""


def _load_fencing() -> ModuleType | None:
    """``ah_fleetctl.fencing`` when this build has it (the fence integration), else None."""
    try:
        return importlib.import_module("ah_fleetctl.fencing")
    except ModuleNotFoundError as exc:
        if exc.name != "ah_fleetctl.fencing":
            raise
        return None


def _event_sink(app: FleetContext) -> SessionEventSink | None:
    """The session event sink (``hostStarted``/``hostLog``/``hostExited``/``summary`` and
    the fence's events go to the access point and a local copy), or None when this
    build has none. It never fails the run: a sink that cannot be set up is a warning."""
    try:
        from ..events import SessionEventSink
    except ImportError:
        return None
    try:
        return SessionEventSink.from_context(app)
    except Exception as exc:  # the run matters more than its event stream
        click.echo(f"warning: session events are off for this run: {exc}", err=True)
        return None


def _session_id(app: FleetContext, flag: str | None) -> str | None:
    value = flag or app.config.typed.session
    return validate_session_id(value) if value else None


def _timeout_s(app: FleetContext, flag: float | None) -> float | None:
    """``--timeout``, else config ``timeouts.run``; without either, no limit (builds and
    test suites legitimately run for a long time)."""
    if flag is not None:
        return flag
    timeouts = app.config.typed.timeouts
    seconds = timeouts.seconds("run") if timeouts is not None else None
    return seconds or None


def _check_renderable(targets: Sequence[TargetHost], commands: Sequence[LogicalCommand]) -> None:
    """Render every command for every host once, so an inexpressible command (NUL, a path
    Windows cannot hold, over-long) is exit 7 before any follower is contacted."""
    from ah_run_everywhere import adapter_for

    for target in targets:
        adapter = adapter_for(target.os)
        for command in commands:
            adapter.render(command, cwd=target.cwd)


def _engine_hosts(targets: Sequence[TargetHost], fence_failed: dict[str, str]) -> list[TargetHost]:
    """Who the engine schedules: every selected host except those whose fence failed
    (they never get a command). Unreachable hosts go in as such (``RunEngine``'s
    ``unreachable``): their jobs move to another host of their OS when sharding, else are
    reported ``unreachable`` with the reason."""
    return [t for t in targets if t.name not in fence_failed]


def _supplement(
    envelope_hosts: list[HostResult],
    links: FleetLinks,
    fence_failed: dict[str, str],
    cancelled: str | None = None,
) -> list[HostResult]:
    """Results for selected hosts the engine did not report (never silently dropped)."""
    seen = {r.host for r in envelope_hosts}
    extra: list[HostResult] = []
    for name in links.names:
        if name in seen:
            continue
        os_kind = links.os_of(name)
        if name in links.unreachable:
            state, error = HostState.UNREACHABLE, links.unreachable[name].reason
        elif name in fence_failed:
            state, error = HostState.FAILED, fence_failed[name]
        else:  # the engine reports every host it had (idle ones too): this one never got there
            state, error = HostState.CANCELLED, cancelled or "no command was started on it"
        extra.append(
            HostResult(
                host=name,
                os=os_kind,
                state=state,
                exit_code=None,
                took_ms=0,
                log_path=None,
                error=error,
            )
        )
    return envelope_hosts + extra


class _Interrupt:
    """SIGINT while the run is under way: cancel the engine (or the set-up before it)."""

    def __init__(self) -> None:
        self.count = 0
        self.engine: object | None = None
        self.task: asyncio.Task[object] | None = None

    def __call__(self) -> None:
        self.count += 1
        cancel = getattr(self.engine, "cancel", None)
        if cancel is not None and self.count == 1:
            cancel("interrupted (SIGINT)")
        elif self.task is not None:
            self.task.cancel()


async def _run(
    app: FleetContext,
    selected: Sequence[FollowerStatus],
    commands: Sequence[LogicalCommand],
    *,
    timeout: float | None,
    fence: bool,
    session_id: str | None,
    interrupt: _Interrupt,
) -> RunEnvelope:
    from ah_run_everywhere import HostExecutor, LinePrinter, RunDirectory, RunEngine, default_mode
    from ah_run_everywhere.ssh_executor import SshExecutor

    from ..dataplane import FleetLinks, make_connector, workspace_overrides

    loop = asyncio.get_running_loop()
    interrupt.task = asyncio.current_task()
    with contextlib.suppress(NotImplementedError, RuntimeError):
        loop.add_signal_handler(signal.SIGINT, interrupt)

    mode = default_mode(len(commands))
    # Everything that can be checked without the network is checked first.
    links = FleetLinks(
        selected,
        make_connector(app),
        connect_timeout=app.connect_timeout_s(),
        workspaces=workspace_overrides(app),
    )
    targets = links.target_hosts(Path.cwd())
    _check_renderable(targets, commands)

    fence_failed: dict[str, str] = {}
    printer = None if app.json else LinePrinter(sys.stdout, [t.name for t in targets])
    run_dir = RunDirectory(runs_dir(app).parent)
    events = _event_sink(app)
    if events is not None:
        session_id = events.start(session_id)
    # The leader agent (issue 4) keeps paths and transports between invocations; it runs
    # the commands when no fence needs this process's own links. A fenced run links and
    # fences by itself, and meanwhile makes sure an agent runs, so the next run here takes
    # the thin path (the agent fences then: ah_fleetctl.thin_fence).
    from ..agent import agent_executor

    via_agent = None if fence else await agent_executor(app)
    if via_agent is not None:
        _record_for_thin_runs(app, via_agent.client.socket_path)
    agent_for_next = start_agent_for_thin_runs(app) if fence else None
    try:
        try:
            if via_agent is None:
                await links.connect()
            if fence and links.linked:
                fence_failed = await _fence(app, links, events)
            elif not fence:
                logger.debug("run: --no-fence, not fencing")
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None:
                current.uncancel()
            hosts = _supplement([], links, fence_failed, cancelled="interrupted (SIGINT)")
            run_dir.close()
            return RunEnvelope(
                session_id=session_id,
                commands=_display(commands),
                hosts=hosts,
                summary=RunSummary.from_results(hosts),
                run_dir=str(run_dir.path),
            )
        engine_hosts = _engine_hosts(targets, fence_failed)
        if not engine_hosts:
            hosts = _supplement([], links, fence_failed)
            run_dir.close()
            return RunEnvelope(
                session_id=session_id,
                commands=_display(commands),
                hosts=hosts,
                summary=RunSummary.from_results(hosts),
                run_dir=str(run_dir.path),
            )
        unreachable = {
            t.name: f"unreachable: {links.unreachable[t.name].reason}"
            for t in engine_hosts
            if t.name in links.unreachable
        }
        executor: HostExecutor = (
            via_agent
            if via_agent is not None
            # One run over fresh transports: exec channels (a warm executor per host would
            # cost more to start than it saves; the agent's long-lived transports use it).
            else SshExecutor(links.transports, unreachable=unreachable, warm=False)
        )
        engine = RunEngine(
            executor,
            engine_hosts,
            commands,
            mode=mode,
            timeout=timeout,
            sink=events.emit if events is not None else None,
            printer=printer,
            run_dir=run_dir,
            session_id=session_id,
            unreachable=unreachable,
        )
        interrupt.engine = engine
        if interrupt.count:
            engine.cancel("interrupted (SIGINT)")
        envelope = await engine.run()
        interrupt.engine = None
        hosts = _supplement(list(envelope.hosts), links, fence_failed)
        return RunEnvelope(
            session_id=envelope.session_id,
            commands=envelope.commands,
            hosts=hosts,
            summary=RunSummary.from_results(hosts),
            run_dir=envelope.run_dir,
        )
    finally:
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.remove_signal_handler(signal.SIGINT)
        await links.close()
        if events is not None:
            # Bounded: waits a few seconds at most for the access point's acknowledgements.
            await asyncio.to_thread(events.close)
        if agent_for_next is not None:
            await finish_agent_for_thin_runs(app, agent_for_next)


def start_agent_for_thin_runs(app: FleetContext) -> asyncio.Task[object] | None:
    """Find (or start) this configuration's leader agent while the caller works; see
    :func:`finish_agent_for_thin_runs`. None when the agent is bypassed."""
    from ..agent import agent_client, agent_enabled

    if not agent_enabled(app):
        return None
    return asyncio.ensure_future(agent_client(app))


async def finish_agent_for_thin_runs(app: FleetContext, task: asyncio.Task[object]) -> None:
    """Record the agent :func:`start_agent_for_thin_runs` looked for, for the thin path. One
    still starting is left to start (it runs in its own session) and recorded all the same
    (its socket path is known): until it listens there, the thin path finds nobody and the
    full CLI runs. Never fails the command."""
    from ..agent import AgentClient, agent_socket_path

    if not task.done():
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
        logger.debug("the leader agent is still starting; recorded where it will listen")
        _record_for_thin_runs(app, agent_socket_path(app))
        return
    try:
        client = task.result()
    except Exception as exc:
        logger.info("not using the leader agent: {}", exc)
        return
    if isinstance(client, AgentClient):
        _record_for_thin_runs(app, client.socket_path)


def _record_for_thin_runs(app: FleetContext, socket_path: Path) -> None:
    """Let the next ``run`` in this directory and environment take the thin path
    (:mod:`ah_fleetctl.thin`): record the agent and the settings from configuration."""
    from ..agent_proto import ThinDefaults
    from ..dataplane import workspace_overrides
    from ..fencing import fence_timeout_s, user_cache_dir
    from ..thin_server import write_thin_index

    json_env = os.environ.get("AH_JSON", "").strip().lower() in {"1", "true", "yes", "on"}
    defaults = ThinDefaults(
        runs_base=str(runs_dir(app).parent),
        timeout_s=_timeout_s(app, None),
        session=app.config.typed.session,
        json=json_env,
        workspaces=workspace_overrides(app),
        sync_ignores=app.config.typed.sync_ignores,
        sync_engine=app.config.typed.sync_engine,
        fence_timeout_s=fence_timeout_s(app.config.typed),
        cache_root=str(user_cache_dir()),
    )
    path = write_thin_index(app, socket_path, defaults)
    if path is not None:
        logger.debug("run: the next run here may take the thin path ({})", path)


async def _fence(
    app: FleetContext, links: FleetLinks, events: SessionEventSink | None
) -> dict[str, str]:
    """Fence the linked hosts; returns host → why it may not run (not ``consistent``)."""
    fencing = _load_fencing()
    if fencing is None:
        click.echo(
            "note: this ah-fleetctl has no fence yet; running without one (as with --no-fence)",
            err=True,
        )
        return {}
    from ..thin_fence import fence_failures

    metadata = await fencing.fence_selected(
        app, links, links.linked, emit=events.emit if events is not None else None
    )
    return fence_failures(links, metadata)


def _display(commands: Sequence[LogicalCommand]) -> list[str]:
    from ah_run_everywhere import display_command

    return [display_command(c) for c in commands]


@click.command(
    "run",
    cls=AhCommand,
    context_settings={"allow_interspersed_args": False},
    short_help="Run a command on the selected followers over SSH.",
)
@selector_options
@click.option(
    "--command",
    "commands",
    multiple=True,
    metavar="CMD",
    help="A shell snippet to run (repeatable). One runs on every selected host; several are "
    "sharded: each runs exactly once per OS, at most one job per host at a time.",
)
@click.option(
    "--timeout",
    "timeout_s",
    default=None,
    metavar="DURATION",
    callback=parse_duration_option,
    help="Per-job time limit (500ms, 30s, 1m30s...); the remote command is killed. "
    "Default: config timeouts.run, else none.",
)
@click.option(
    "--no-fence",
    is_flag=True,
    default=False,
    help="Do not sync and verify the tree before running.",
)
@click.option(
    "--session",
    "session_id",
    default=None,
    metavar="ID",
    help="Session the run's events belong to (default: config session).",
)
@common_options
@click.argument("argv", nargs=-1, metavar="[--] CMD [ARGS]...")
@click.pass_context
def run_command(
    ctx: click.Context,
    /,
    hosts: tuple[str, ...],
    tags: tuple[str, ...],
    all_: bool,
    commands: tuple[str, ...],
    timeout_s: float | None,
    no_fence: bool,
    session_id: str | None,
    argv: tuple[str, ...],
    **_: object,
) -> int:
    """Run CMD [ARGS]... on every selected follower, or shard several --command snippets.

    Options end at CMD (`--` is optional): in `run --host a ls -la`, `-la` goes to ls.
    CMD's arguments reach it unchanged; a --command is a snippet for the follower's shell
    (bash on Linux, zsh on macOS, PowerShell on Windows). Commands run in the follower's
    copy of the current directory. Output streams as `HOST | line`; each host's output is
    also logged in a run directory (its path is printed). Then the summary:
    `X succeeded, Y failed, Z unreachable`.

    Exit 0 only when every selected host ran and returned 0; 1 when a host failed, timed
    out or was unreachable; 7 for a bad or empty selection; 130 after Ctrl-C (the summary
    is printed first). With --json: one run envelope.
    """
    if argv and commands:
        raise click.UsageError(
            "give either CMD [ARGS]... or --command (repeatable), not both", ctx=ctx
        )
    if not argv and not commands:
        raise click.UsageError("missing command: give CMD [ARGS]... or --command CMD", ctx=ctx)
    selector = selector_from_options(hosts, tags, all_)
    app = FleetContext.of(ctx)
    session = _session_id(app, session_id)
    limit = _timeout_s(app, timeout_s)
    logical: list[LogicalCommand] = [list(argv)] if argv else list(commands)
    with app.api_client() as api:
        selected = select_followers(selector, api.followers().followers)
    logger.debug("run {} on {}", logical, ", ".join(f.info.name for f in selected))

    interrupt = _Interrupt()
    envelope = asyncio.run(
        _run(
            app,
            selected,
            logical,
            timeout=limit,
            fence=not no_fence,
            session_id=session,
            interrupt=interrupt,
        )
    )
    if app.json:
        echo_json(envelope)
    else:
        from ah_run_everywhere import format_summary

        click.echo(format_summary(envelope.hosts))
        if envelope.run_dir:
            click.echo(f"logs: {envelope.run_dir}", err=True)
    if interrupt.count:
        return INTERRUPTED_EXIT_CODE
    return int(envelope.exit_code)
