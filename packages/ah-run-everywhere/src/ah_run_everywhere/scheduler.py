"""The sharding scheduler: a pure state machine, fed events and asked for assignments.

Like ``h11.Connection``, it performs no I/O and keeps no clock. The asyncio engine tells it
what happened (:meth:`ShardScheduler.host_ready`, :meth:`ShardScheduler.job_finished`,
:meth:`ShardScheduler.host_lost`, :meth:`ShardScheduler.cancel_pending`) and asks it what to
start next (:meth:`ShardScheduler.next_assignments`).

Modes:

``every-host``
    Each command runs on every selected host (one job per command and host). A host runs
    its jobs one at a time, in command order; the rest queue.

``once-per-os``
    Each command runs exactly once per OS present among the selected hosts. Jobs of one OS
    are dealt round-robin over that OS's hosts (in the order the hosts were given), so per
    OS the job counts per host differ by at most one. A host runs one job at a time; extra
    work queues on it.

Lost hosts (honest reporting, never a silent re-run): when a host is lost, the job it was
running is reported ``unreachable`` with the reason — it is *not* started again elsewhere,
because a command that may have half-run (and had side effects) on a host must not be
disguised as a clean success on another one. Jobs that were only *queued* on the lost host
never started, so moving them is safe: in ``once-per-os`` they move round-robin to the
remaining hosts of the same OS; when none is left (and always in ``every-host``, where a job
belongs to its host) they are reported ``unreachable``.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Sequence
from typing import Annotated, Literal

import msgspec

from ah_domain_types import HostState, OsKind

__all__ = [
    "SCHEDULING_MODES",
    "Assignment",
    "JobOutcome",
    "JobReport",
    "SchedulerError",
    "SchedulingMode",
    "ShardScheduler",
]

SchedulingMode = Literal["every-host", "once-per-os"]
SCHEDULING_MODES: tuple[SchedulingMode, ...] = ("every-host", "once-per-os")

NonNegativeInt = Annotated[int, msgspec.Meta(ge=0)]


class SchedulerError(ValueError):
    """The scheduler was fed an event that contradicts its state (a bug in the caller)."""


class Assignment(msgspec.Struct, frozen=True, rename="camel"):
    """Start ``command`` (the ``command_index``-th of the run) on ``host``."""

    job_id: int
    command: str
    command_index: int
    host: str
    os: OsKind


class JobOutcome(msgspec.Struct, frozen=True, rename="camel"):
    """How a started job ended, as the engine observed it."""

    state: HostState
    exit_code: int | None = None
    took_ms: NonNegativeInt = 0
    error: str | None = None


class JobReport(msgspec.Struct, frozen=True, rename="camel"):
    """The final word on one job."""

    job_id: int
    command: str
    command_index: int
    os: OsKind
    host: str | None
    """The host the job ran on; None when it never started."""
    queued_on: str
    """The host the job was last assigned or queued to (== ``host`` when it started)."""
    state: HostState
    exit_code: int | None
    took_ms: NonNegativeInt
    error: str | None


class _Phase(enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    REPORTED = "reported"


class _Job:
    __slots__ = ("command", "command_index", "host", "job_id", "os", "phase")

    def __init__(self, job_id: int, command: str, command_index: int, os: OsKind, host: str):
        self.job_id = job_id
        self.command = command
        self.command_index = command_index
        self.os = os
        self.host = host
        self.phase = _Phase.QUEUED


class _Host:
    __slots__ = ("lost", "name", "os", "queue", "ready", "running")

    def __init__(self, name: str, os: OsKind) -> None:
        self.name = name
        self.os = os
        self.ready = False
        self.lost = False
        self.running: int | None = None
        self.queue: deque[int] = deque()


class ShardScheduler:
    """Decides which job runs where and when; see the module docstring for the rules.

    Hosts start *not ready*: nothing is assigned to a host until :meth:`host_ready` says it
    can take work (e.g. its connection is up and its fence came back consistent). After a
    job finishes the host stays ready. A host that is never made ready must eventually be
    reported lost, otherwise the run is never :attr:`done`.
    """

    def __init__(
        self,
        hosts: Sequence[tuple[str, OsKind]],
        commands: Sequence[str],
        mode: SchedulingMode,
    ) -> None:
        if mode not in SCHEDULING_MODES:
            raise SchedulerError(
                f"unknown scheduling mode {mode!r}: expected one of {', '.join(SCHEDULING_MODES)}"
            )
        if not hosts:
            raise SchedulerError("no hosts to schedule on: the selection is empty")
        if not commands:
            raise SchedulerError("no commands to schedule: expected at least one command")
        self.mode: SchedulingMode = mode
        self._hosts: dict[str, _Host] = {}
        for name, os in hosts:
            if name in self._hosts:
                raise SchedulerError(f"host {name!r} is listed twice; host names must be unique")
            self._hosts[name] = _Host(name, OsKind(os))
        self._commands = list(commands)
        self._jobs: list[_Job] = []
        self._reports: dict[int, JobReport] = {}
        self._fresh: list[int] = []
        """Job ids reported since the last :meth:`take_new_reports`."""
        # Per OS: the hosts in the order given, and where round-robin continues.
        self._os_hosts: dict[OsKind, list[str]] = {}
        for host in self._hosts.values():
            self._os_hosts.setdefault(host.os, []).append(host.name)
        self._os_cursor: dict[OsKind, int] = dict.fromkeys(self._os_hosts, 0)
        if mode == "every-host":
            for index, command in enumerate(self._commands):
                for host in self._hosts.values():
                    self._enqueue(self._new_job(command, index, host.os, host.name))
        else:
            for os, names in self._os_hosts.items():
                for index, command in enumerate(self._commands):
                    host_name = names[self._os_cursor[os] % len(names)]
                    self._os_cursor[os] += 1
                    self._enqueue(self._new_job(command, index, os, host_name))

    # ---- queries -------------------------------------------------------------------------

    @property
    def done(self) -> bool:
        """True once every job has been reported (finished, unreachable or cancelled)."""
        return len(self._reports) == len(self._jobs)

    @property
    def job_count(self) -> int:
        return len(self._jobs)

    @property
    def hosts(self) -> list[tuple[str, OsKind]]:
        return [(h.name, h.os) for h in self._hosts.values()]

    def is_lost(self, host: str) -> bool:
        return self._host(host).lost

    def running_jobs(self) -> list[Assignment]:
        """Jobs started and not yet reported."""
        return [self._assignment(j) for j in self._jobs if j.phase is _Phase.RUNNING]

    def next_assignments(self) -> list[Assignment]:
        """Jobs to start now: the head of the queue of every ready, idle, live host.

        Each assignment is handed out exactly once; the job counts as running until
        :meth:`job_finished` or :meth:`host_lost` ends it.
        """
        started: list[Assignment] = []
        for host in self._hosts.values():
            if host.lost or not host.ready or host.running is not None or not host.queue:
                continue
            job = self._jobs[host.queue.popleft()]
            job.phase = _Phase.RUNNING
            host.running = job.job_id
            started.append(self._assignment(job))
        return started

    def report(self) -> list[JobReport]:
        """Every reported job, in job-id order (complete once :attr:`done`)."""
        return [self._reports[job_id] for job_id in sorted(self._reports)]

    def take_new_reports(self) -> list[JobReport]:
        """The jobs reported since the last call (in job-id order); each is handed out
        once. Together the calls hand out exactly what :meth:`report` lists."""
        fresh, self._fresh = self._fresh, []
        if len(fresh) > 1:
            fresh.sort()
        return [self._reports[job_id] for job_id in fresh]

    # ---- events --------------------------------------------------------------------------

    def host_ready(self, host: str) -> None:
        """``host`` can take work. Ignored for a lost host: a lost host stays lost for the
        run (its jobs have already been reported or moved)."""
        self._host(host).ready = True

    def job_finished(self, job_id: int, outcome: JobOutcome) -> None:
        """A started job ended (any state, e.g. ok, failed, timeout, cancelled)."""
        job = self._job(job_id)
        if job.phase is not _Phase.RUNNING:
            raise SchedulerError(
                f"job {job_id} ({job.command!r} on {job.host!r}) finished but it is "
                f"{job.phase.value}, not running"
            )
        host = self._hosts[job.host]
        host.running = None
        self._record(job, ran=True, outcome=outcome)

    def host_lost(self, host: str, reason: str, *, running_started: bool = True) -> None:
        """``host`` is gone for the rest of the run (unreachable or connection lost).

        Its running job is reported unreachable, not re-run. With ``running_started=False``
        the executor knows that job never started (it could not reach the host at all), and
        the report says so rather than "lost while running". Queued jobs move to the other
        live hosts of its OS (``once-per-os``) or are reported unreachable.
        Reporting an already lost host again is a no-op.
        """
        lost = self._host(host)
        if lost.lost:
            return
        lost.lost = True
        if lost.running is not None:
            job = self._jobs[lost.running]
            lost.running = None
            what = (
                "was lost while running this command"
                if running_started
                else "could not be reached, so this command did not start"
            )
            self._record(
                job,
                ran=running_started,
                outcome=JobOutcome(
                    state=HostState.UNREACHABLE,
                    error=f"host {host!r} {what} (not re-run elsewhere): {reason}",
                ),
            )
        orphans = list(lost.queue)
        lost.queue.clear()
        survivors = [n for n in self._os_hosts[lost.os] if not self._hosts[n].lost]
        for job_id in orphans:
            job = self._jobs[job_id]
            if self.mode == "once-per-os" and survivors:
                cursor = self._os_cursor[lost.os]
                self._os_cursor[lost.os] = cursor + 1
                job.host = survivors[cursor % len(survivors)]
                self._enqueue(job)
            else:
                why = (
                    "the command belongs to that host"
                    if self.mode == "every-host"
                    else f"no other {lost.os.value} host is left"
                )
                self._record(
                    job,
                    ran=False,
                    outcome=JobOutcome(
                        state=HostState.UNREACHABLE,
                        error=f"host {host!r} became unreachable before this command "
                        f"started and {why}: {reason}",
                    ),
                )

    def cancel_pending(self, reason: str) -> None:
        """Report every job that has not started as cancelled; nothing new is assigned.

        Running jobs still end through :meth:`job_finished` (the engine cancels them)."""
        for host in self._hosts.values():
            pending = list(host.queue)
            host.queue.clear()
            for job_id in pending:
                self._record(
                    self._jobs[job_id],
                    ran=False,
                    outcome=JobOutcome(
                        state=HostState.CANCELLED,
                        error=f"cancelled before it started: {reason}",
                    ),
                )

    # ---- internals -----------------------------------------------------------------------

    def _new_job(self, command: str, index: int, os: OsKind, host: str) -> _Job:
        job = _Job(len(self._jobs), command, index, os, host)
        self._jobs.append(job)
        return job

    def _enqueue(self, job: _Job) -> None:
        self._hosts[job.host].queue.append(job.job_id)

    def _record(self, job: _Job, *, ran: bool, outcome: JobOutcome) -> None:
        job.phase = _Phase.REPORTED
        self._fresh.append(job.job_id)
        self._reports[job.job_id] = JobReport(
            job_id=job.job_id,
            command=job.command,
            command_index=job.command_index,
            os=job.os,
            host=job.host if ran else None,
            queued_on=job.host,
            state=outcome.state,
            exit_code=outcome.exit_code,
            took_ms=outcome.took_ms,
            error=outcome.error,
        )

    def _assignment(self, job: _Job) -> Assignment:
        return Assignment(
            job_id=job.job_id,
            command=job.command,
            command_index=job.command_index,
            host=job.host,
            os=job.os,
        )

    def _host(self, name: str) -> _Host:
        try:
            return self._hosts[name]
        except KeyError:
            raise SchedulerError(
                f"unknown host {name!r}: expected one of {', '.join(sorted(self._hosts))}"
            ) from None

    def _job(self, job_id: int) -> _Job:
        if not 0 <= job_id < len(self._jobs):
            raise SchedulerError(f"unknown job id {job_id}: expected 0..{len(self._jobs) - 1}")
        return self._jobs[job_id]
