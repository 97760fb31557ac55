"""The asyncio run engine: drives the :class:`ShardScheduler` over a :class:`HostExecutor`.

The engine is the short I/O shell around the pure scheduler: it renders every command for
every host up front (so a command that cannot be expressed on some OS is a validation
error before anything starts), starts the scheduler's assignments as concurrent tasks,
turns executor results and exceptions into scheduler events, streams output line by line
(terminal, per-host log, ``hostLog`` events) and returns a :class:`RunEnvelope`.

Failure semantics (see also the scheduler):

* A job's exit code 0 is ``ok``; any other code is ``failed``; an executor-reported
  timeout is ``timeout``; a cancelled remote command is ``cancelled``.
* :class:`HostUnreachable` / :class:`HostConnectionLost` from the executor mark the host
  lost: its job is ``unreachable`` (never silently re-run) and its queued work moves or is
  reported ``unreachable``. Other hosts carry on.
* Timeouts are per job and run in parallel. If an executor ignores its ``timeout``, the
  engine cancels it ``timeout_grace`` seconds later and reports ``timeout`` anyway.
* Hosts passed as ``unreachable`` (no connection could be made before the run) never
  get a job: in ``once-per-os`` their jobs go to the other hosts of the same OS, otherwise
  they are reported ``unreachable`` with the reason.
* Every host is in the result. In ``once-per-os`` a host that no job ended on is
  ``idle`` (its OS had fewer commands than hosts; not a failure) or, if it was passed as
  unreachable, ``unreachable`` with the reason.
* Cancellation (:meth:`RunEngine.cancel`, or cancelling the task running
  :meth:`RunEngine.run`, which is what Ctrl-C does under ``asyncio.run``) cancels every
  running executor call — which must stop the remote command — and reports queued jobs
  ``cancelled``. ``run()`` then still *returns* the envelope: a cancellation of its own
  task is absorbed (and ``uncancel()``-ed) so an interrupted run still gets its per-host
  report and exit code 1.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

import msgspec

from ah_domain_types import (
    EmptySelectionError,
    Event,
    HostExitedEvent,
    HostLogEvent,
    HostResult,
    HostStartedEvent,
    HostState,
    OsKind,
    RunEnvelope,
    RunSummary,
    SummaryEvent,
    validate_host_name,
)
from ah_ssh_bridge import WarmCommand

from .adapters import LogicalCommand, PathMapping, adapter_for, display_command
from .output import HostLog, LinePrinter, RunDirectory, StreamName
from .scheduler import Assignment, JobOutcome, JobReport, SchedulingMode, ShardScheduler

__all__ = [
    "EventSink",
    "ExecOutcome",
    "ExecOutcomeLike",
    "HostConnectionLost",
    "HostExecutionError",
    "HostExecutor",
    "HostUnreachable",
    "OutputCallback",
    "RunEngine",
    "TargetHost",
    "default_mode",
    "run_everywhere",
]


class HostExecutionError(Exception):
    """Base of the executor errors that take a host out of the run."""

    def __init__(self, host: str, reason: str) -> None:
        super().__init__(f"{host}: {reason}")
        self.host = host
        self.reason = reason


class HostUnreachable(HostExecutionError):
    """The executor could not reach the host at all (no path, auth refused, ...)."""


class HostConnectionLost(HostExecutionError):
    """The connection to the host broke while (or before) the command ran."""


class ExecOutcomeLike(Protocol):
    """What an executor returns; ``ah_ssh_bridge.ExecOutcome`` has this shape."""

    @property
    def exit_code(self) -> int | None: ...

    @property
    def timed_out(self) -> bool: ...

    @property
    def cancelled(self) -> bool: ...


class ExecOutcome(msgspec.Struct, frozen=True, rename="camel"):
    """A plain :class:`ExecOutcomeLike`."""

    exit_code: int | None
    timed_out: bool = False
    cancelled: bool = False
    took_ms: int = 0


OutputCallback = Callable[[bytes | str], None]
"""Receives output *chunks* in order (bytes, or already decoded text). Chunks need not
align with lines: the engine finds line breaks itself, so a chunk must keep its ``\\n``.
May be called from any thread."""


class HostExecutor(Protocol):
    """Runs one rendered command on one host (e.g. an SSH exec channel).

    An executor with ``accepts_warm_commands = True`` (attribute) also gets ``warm=`` (an
    ``ah_ssh_bridge.WarmCommand``, the same command in structured form, or None on
    Windows) as a keyword argument of :meth:`run`."""

    async def run(
        self,
        host: str,
        command: str,
        *,
        on_stdout: OutputCallback,
        on_stderr: OutputCallback,
        timeout: float | None,
    ) -> ExecOutcomeLike:
        """Run ``command`` and return its outcome; on ``timeout`` stop the remote command
        and return ``timed_out=True``. Cancellation of this coroutine must stop the remote
        command. Raise :class:`HostUnreachable` / :class:`HostConnectionLost` when the host
        cannot be reached or the connection breaks."""
        ...


EventSink = Callable[[Event], None]


class TargetHost(msgspec.Struct, frozen=True, rename="camel"):
    """A selected host as the engine needs it."""

    name: str
    os: OsKind
    cwd: str | None = None
    """Working directory on the follower (already mapped, e.g. with
    :meth:`TargetHost.in_workspace`); None runs in the login directory."""

    def __post_init__(self) -> None:
        # Host names become log file names and event fields: refuse bad ones up front.
        validate_host_name(self.name)

    @classmethod
    def in_workspace(
        cls,
        name: str,
        os: OsKind,
        *,
        leader_root: str,
        follower_root: str,
        leader_cwd: str,
        leader_os: OsKind = OsKind.LINUX,
    ) -> TargetHost:
        """A host whose working directory is ``leader_cwd`` mapped into its workspace."""
        mapping = PathMapping(leader_root, follower_root, os, leader_os)
        return cls(name=name, os=os, cwd=mapping.to_follower(leader_cwd))


def default_mode(command_count: int) -> SchedulingMode:
    """The spec's rule: one command runs on every host; several are sharded per OS."""
    return "every-host" if command_count == 1 else "once-per-os"


class _Lost(msgspec.Struct, frozen=True):
    reason: str
    started: bool
    """Whether the command may have started (False: the host could not be reached at all)."""


_utf8_decoder = codecs.getincrementaldecoder("utf-8")
"""Makes ``errors="strict"`` decoders by default; called with ``errors="replace"``."""


class _LineStream:
    """Turns one job stream's chunks into lines and hands each to the engine."""

    def __init__(self, emit: Callable[[str], None]) -> None:
        self._emit = emit
        self._decoder: codecs.IncrementalDecoder | None = None
        """Made for the first bytes chunk (executors that hand out text never need one)."""
        self._pending = ""
        self.closed = False
        self.handed_over = False
        """Some chunk came from another thread (queued on the loop, maybe not fed yet)."""

    def feed(self, chunk: bytes | str) -> None:
        if self.closed:
            return
        if isinstance(chunk, str):
            text = chunk
        else:
            if self._decoder is None:
                self._decoder = _utf8_decoder(errors="replace")
            text = self._decoder.decode(chunk)
        if not text:
            return
        parts = (self._pending + text).split("\n")
        self._pending = parts.pop()
        for line in parts:
            self._emit(line.removesuffix("\r"))

    def close(self) -> None:
        if self.closed:
            return
        tail = self._pending
        if self._decoder is not None:
            tail += self._decoder.decode(b"", final=True)
        self._pending = ""
        if tail:
            self._emit(tail.removesuffix("\r"))
        self.closed = True


class RunEngine:
    """One run-everywhere run. Create it, then ``await run()`` once."""

    def __init__(
        self,
        executor: HostExecutor,
        hosts: Sequence[TargetHost],
        commands: Sequence[LogicalCommand],
        *,
        mode: SchedulingMode | None = None,
        timeout: float | None = None,
        env: Mapping[str, str] | None = None,
        path_prepend: Sequence[str] = (),
        sink: EventSink | None = None,
        printer: LinePrinter | None = None,
        run_dir: RunDirectory | None = None,
        session_id: str | None = None,
        timeout_grace: float = 5.0,
        cancel_grace: float = 5.0,
        clock: Callable[[], float] = time.time,
        unreachable: Mapping[str, str] | None = None,
    ) -> None:
        if timeout is not None and timeout <= 0:
            raise ValueError(f"timeout must be positive seconds or None, got {timeout!r}")
        if not hosts:
            raise EmptySelectionError(
                "no hosts to run on: the selection is empty (a run never succeeds on nothing)"
            )
        self._executor = executor
        self._hosts = {h.name: h for h in hosts}
        self._commands = list(commands)
        self._display = [display_command(c) for c in self._commands]
        self.mode: SchedulingMode = mode or default_mode(len(self._commands))
        self._scheduler = ShardScheduler([(h.name, h.os) for h in hosts], self._display, self.mode)
        # Render everything first: an inexpressible command is an error before any start.
        self._unreachable = dict(unreachable or {})
        unknown = sorted(set(self._unreachable) - set(self._hosts))
        if unknown:
            raise ValueError(f"unreachable hosts {unknown} are not among the run's hosts")
        self._rendered: dict[tuple[str, int], str] = {}
        self._warm: dict[tuple[str, int], WarmCommand | None] | None = (
            {} if getattr(executor, "accepts_warm_commands", False) else None
        )
        # Rendering depends on the OS and the working directory only: hosts that share both
        # share the rendered strings (typically every host of a fleet).
        rendered_for: dict[tuple[OsKind, str | None], list[str]] = {}
        warm_for: dict[tuple[OsKind, str | None], list[WarmCommand | None]] = {}
        for host in hosts:
            key = (host.os, host.cwd)
            rendered = rendered_for.get(key)
            if rendered is None:
                adapter = adapter_for(host.os)
                rendered = rendered_for[key] = [
                    adapter.render(command, cwd=host.cwd, env=env or {}, path_prepend=path_prepend)
                    for command in self._commands
                ]
                if self._warm is not None:
                    warm_for[key] = [
                        adapter.warm_command(
                            command, cwd=host.cwd, env=env or {}, path_prepend=path_prepend
                        )
                        for command in self._commands
                    ]
            for index, text in enumerate(rendered):
                self._rendered[(host.name, index)] = text
            if self._warm is not None:
                for index, warm in enumerate(warm_for[key]):
                    self._warm[(host.name, index)] = warm
        self._timeout = timeout
        self._sink = sink
        self._printer = printer
        self._run_dir = run_dir
        self._session_id = session_id
        self._sid = session_id or ""
        self._timeout_grace = timeout_grace
        self._cancel_grace = cancel_grace
        self._clock = clock
        self._last_ts_ms = 0.0
        self._cancel_requested = False
        self._cancel_reason = "cancelled"
        self._wakeup: asyncio.Future[None] | None = None
        """What :meth:`run` waits on between job ends (set by a job's end or a cancel)."""
        self._results: dict[int, HostResult] = {}
        """Job id → its result, made when the job was reported."""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self._started = False

    @property
    def commands(self) -> list[str]:
        return list(self._display)

    def rendered(self, host: str, command_index: int = 0) -> str:
        """The exact string the executor receives for ``host`` and that command."""
        return self._rendered[(host, command_index)]

    def cancel(self, reason: str = "cancelled by the user") -> None:
        """Stop the run: running commands are cancelled, queued ones never start.

        Safe to call from a signal handler running on the event loop; from another thread
        use ``loop.call_soon_threadsafe(engine.cancel)``."""
        self._cancel_reason = reason
        self._cancel_requested = True
        self._wake()

    def _wake(self, _task: object = None) -> None:
        wakeup = self._wakeup
        if wakeup is not None and not wakeup.done():
            wakeup.set_result(None)

    # ---- the run -------------------------------------------------------------------------

    async def run(self) -> RunEnvelope:
        if self._started:
            raise RuntimeError("RunEngine.run() may only be awaited once")
        self._started = True
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._loop_thread = threading.get_ident()
        scheduler = self._scheduler
        # Hosts known to be unreachable before the start are lost first: in once-per-os
        # their jobs move to the other hosts of their OS (none of them had started).
        for name, reason in self._unreachable.items():
            scheduler.host_lost(name, reason)
        for name in self._hosts:
            if name not in self._unreachable:
                scheduler.host_ready(name)
        self._emit_new_reports()
        tasks: dict[asyncio.Task[JobOutcome | _Lost], Assignment] = {}
        cancelled_reason: str | None = None
        absorbed = False
        try:
            while True:
                for assignment in scheduler.next_assignments():
                    task = loop.create_task(self._run_job(assignment))
                    task.add_done_callback(self._wake)
                    tasks[task] = assignment
                if scheduler.done:
                    break
                if not tasks:
                    raise RuntimeError(
                        "scheduler is not done but nothing is running (a host was never made ready)"
                    )
                # Until a job ends or cancel() is called (one future, woken by either,
                # instead of asyncio.wait's callbacks on every running job per round).
                done = [t for t in tasks if t.done()]
                if not done and not self._cancel_requested:
                    self._wakeup = loop.create_future()
                    try:
                        await self._wakeup
                    finally:
                        self._wakeup = None
                    done = [t for t in tasks if t.done()]
                for task in done:
                    self._apply(tasks.pop(task), task)
                if self._cancel_requested and not scheduler.done:
                    cancelled_reason = self._cancel_reason
                    break
        except asyncio.CancelledError:
            cancelled_reason = "run interrupted (cancelled)"
            absorbed = True
        except BaseException:
            # An engine or sink bug: never leave remote commands running behind us.
            for task in tasks:
                task.cancel()
            if tasks:
                await asyncio.wait(tasks, timeout=self._cancel_grace)
            raise
        if cancelled_reason is not None:
            await self._cancel_all(tasks, cancelled_reason)
            current = asyncio.current_task()
            if absorbed and current is not None:
                current.uncancel()
        return self._finish()

    async def _cancel_all(
        self, tasks: dict[asyncio.Task[JobOutcome | _Lost], Assignment], reason: str
    ) -> None:
        self._scheduler.cancel_pending(reason)
        self._emit_new_reports()
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=self._cancel_grace)
        for task, assignment in tasks.items():
            if task.done():
                self._apply(assignment, task, cancel_reason=reason)
            else:
                # The executor ignored cancellation; report honestly and stop waiting.
                self._scheduler.job_finished(
                    assignment.job_id,
                    JobOutcome(
                        state=HostState.CANCELLED,
                        error=f"{reason}; the executor did not stop within "
                        f"{self._cancel_grace:g} s, the remote command may still run",
                    ),
                )
                self._emit_new_reports()

    def _apply(
        self,
        assignment: Assignment,
        task: asyncio.Task[JobOutcome | _Lost],
        *,
        cancel_reason: str | None = None,
    ) -> None:
        if task.cancelled():
            result: JobOutcome | _Lost = JobOutcome(
                state=HostState.CANCELLED, error=cancel_reason or "cancelled"
            )
        else:
            exc = task.exception()
            if exc is not None:
                # _run_job handles executor errors; anything here is an engine bug.
                raise exc
            result = task.result()
        if isinstance(result, _Lost):
            self._scheduler.host_lost(
                assignment.host, result.reason, running_started=result.started
            )
        else:
            self._scheduler.job_finished(assignment.job_id, result)
        self._emit_new_reports()

    async def _run_job(self, assignment: Assignment) -> JobOutcome | _Lost:
        host = assignment.host
        log = self._run_dir.open_log(host) if self._run_dir is not None else None
        if log is not None:
            log.write_note(f"job {assignment.job_id} started: {assignment.command}")
        if self._sink is not None:
            self._sink(
                HostStartedEvent(
                    session_id=self._sid,
                    ts_ms=self._now_ms(),
                    host=host,
                    command=assignment.command,
                )
            )
        out = _LineStream(lambda line: self._line(host, "stdout", line, log))
        err = _LineStream(lambda line: self._line(host, "stderr", line, log))
        started = time.monotonic()

        def took_ms() -> int:
            return max(0, round((time.monotonic() - started) * 1000))

        limit = None if self._timeout is None else self._timeout + self._timeout_grace
        deadline: asyncio.Timeout | None = None
        try:
            key = (host, assignment.command_index)
            extra = {} if self._warm is None else {"warm": self._warm[key]}
            call = self._executor.run(
                host,
                self._rendered[key],
                on_stdout=self._threadsafe(out),
                on_stderr=self._threadsafe(err),
                timeout=self._timeout,
                **extra,
            )
            if limit is None:
                outcome = await call
            else:
                async with asyncio.timeout(limit) as deadline:
                    outcome = await call
        except TimeoutError as exc:
            if deadline is None or not deadline.expired():
                return JobOutcome(
                    state=HostState.FAILED,
                    took_ms=took_ms(),
                    error=f"executor error on {host!r}: TimeoutError: {exc}",
                )
            return JobOutcome(
                state=HostState.TIMEOUT,
                took_ms=took_ms(),
                error=f"timed out after {self._timeout:g} s (the executor did not stop it; "
                f"cancelled {self._timeout_grace:g} s later)",
            )
        except HostExecutionError as exc:
            return _Lost(
                reason=f"{type(exc).__name__}: {exc.reason}",
                started=not isinstance(exc, HostUnreachable),
            )
        except Exception as exc:
            return JobOutcome(
                state=HostState.FAILED,
                took_ms=took_ms(),
                error=f"executor error on {host!r}: {type(exc).__name__}: {exc}",
            )
        finally:
            # Output callbacks from executor threads are queued on the loop before the
            # executor's result; one loop pass lets them all land before the streams close.
            # (Not needed, and not paid for, when every chunk came on the loop's thread.)
            if out.handed_over or err.handed_over:
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.sleep(0)
            out.close()
            err.close()
        return self._judge(outcome, took_ms())

    def _judge(self, outcome: ExecOutcomeLike, took_ms: int) -> JobOutcome:
        if outcome.cancelled:
            return JobOutcome(
                state=HostState.CANCELLED,
                exit_code=outcome.exit_code,
                took_ms=took_ms,
                error="the remote command was cancelled",
            )
        if outcome.timed_out:
            limit = "its limit" if self._timeout is None else f"{self._timeout:g} s"
            return JobOutcome(
                state=HostState.TIMEOUT,
                exit_code=outcome.exit_code,
                took_ms=took_ms,
                error=f"timed out after {limit}",
            )
        if outcome.exit_code == 0:
            return JobOutcome(state=HostState.OK, exit_code=0, took_ms=took_ms)
        if outcome.exit_code is None:
            return JobOutcome(
                state=HostState.FAILED,
                took_ms=took_ms,
                error="the command ended without an exit status (killed by a signal?)",
            )
        return JobOutcome(state=HostState.FAILED, exit_code=outcome.exit_code, took_ms=took_ms)

    # ---- output and events ---------------------------------------------------------------

    def _threadsafe(self, stream: _LineStream) -> OutputCallback:
        loop = self._loop
        assert loop is not None

        def feed(chunk: bytes | str) -> None:
            if threading.get_ident() == self._loop_thread:
                stream.feed(chunk)
            else:
                stream.handed_over = True  # before the hand-over, so the job sees it after
                loop.call_soon_threadsafe(stream.feed, chunk)

        return feed

    def _line(self, host: str, stream: StreamName, line: str, log: HostLog | None) -> None:
        if self._printer is not None:
            self._printer.line(host, line)
        if log is not None:
            log.write_line(stream, line)
        if self._sink is not None:
            self._sink(
                HostLogEvent(
                    session_id=self._sid, ts_ms=self._now_ms(), host=host, stream=stream, line=line
                )
            )

    def _now_ms(self) -> float:
        # Wall-clock ms, but never going backwards within a run (events must be ordered).
        now = self._clock() * 1000.0
        self._last_ts_ms = max(self._last_ts_ms, now)
        return self._last_ts_ms

    def _emit(self, event: Event) -> None:
        if self._sink is not None:
            self._sink(event)

    def _emit_new_reports(self) -> None:
        for report in self._scheduler.take_new_reports():
            result = self._results[report.job_id] = self._host_result(report)
            if self._run_dir is not None:
                log = self._run_dir.open_log(result.host)
                note = f"job {report.job_id} {result.state.value}"
                if result.exit_code is not None:
                    note += f" (exit {result.exit_code})"
                note += f" after {result.took_ms} ms: {report.command}"
                if result.error:
                    note += f" -- {result.error}"
                log.write_note(note)
            if self._sink is not None:
                self._sink(
                    HostExitedEvent(
                        session_id=self._sid, ts_ms=self._now_ms(), host=result.host, result=result
                    )
                )

    def _host_result(self, report: JobReport) -> HostResult:
        host = report.host or report.queued_on
        log_path = self._run_dir.log_file(host) if self._run_dir is not None else None
        return HostResult(
            host=host,
            os=report.os,
            state=report.state,
            exit_code=report.exit_code,
            took_ms=report.took_ms,
            log_path=log_path,
            error=report.error,
            command=report.command,
        )

    def _hosts_without_a_job(self, reported: set[str]) -> list[HostResult]:
        """Every host is named in the result, also one no job ended on (once-per-os only: its
        OS had fewer commands than hosts, or it was unreachable and its work moved away)."""
        missing: list[HostResult] = []
        for name, target in self._hosts.items():
            if name in reported:
                continue
            if name in self._unreachable:
                state, error = HostState.UNREACHABLE, self._unreachable[name]
            else:
                state = HostState.IDLE
                error = "no command for it: each one ran on another host of its OS"
            missing.append(
                HostResult(
                    host=name,
                    os=target.os,
                    state=state,
                    exit_code=None,
                    took_ms=0,
                    log_path=None,
                    error=error,
                )
            )
        return missing

    def _finish(self) -> RunEnvelope:
        self._emit_new_reports()
        results = [self._results[report.job_id] for report in self._scheduler.report()]
        results += self._hosts_without_a_job({r.host for r in results})
        summary = RunSummary.from_results(results)
        self._emit(SummaryEvent(session_id=self._sid, ts_ms=self._now_ms(), summary=summary))
        if self._run_dir is not None:
            self._run_dir.close()
        return RunEnvelope(
            session_id=self._session_id,
            commands=list(self._display),
            hosts=results,
            summary=summary,
            run_dir=str(self._run_dir.path) if self._run_dir is not None else None,
        )


async def run_everywhere(
    executor: HostExecutor,
    hosts: Sequence[TargetHost],
    commands: Sequence[LogicalCommand],
    *,
    mode: SchedulingMode | None = None,
    timeout: float | None = None,
    env: Mapping[str, str] | None = None,
    path_prepend: Sequence[str] = (),
    sink: EventSink | None = None,
    printer: LinePrinter | None = None,
    run_dir: RunDirectory | None = None,
    session_id: str | None = None,
) -> RunEnvelope:
    """Convenience: build a :class:`RunEngine` and run it."""
    engine = RunEngine(
        executor,
        hosts,
        commands,
        mode=mode,
        timeout=timeout,
        env=env,
        path_prepend=path_prepend,
        sink=sink,
        printer=printer,
        run_dir=run_dir,
        session_id=session_id,
    )
    return await engine.run()
