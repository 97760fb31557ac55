"""Run-everywhere results: per host, aggregated, and the ``--json`` envelope."""

from __future__ import annotations

import enum
from collections.abc import Iterable
from typing import Annotated

import msgspec

from .exit_codes import ExitCode
from .hosts import OsKind

__all__ = ["HostResult", "HostState", "RunEnvelope", "RunSummary"]

NonNegativeInt = Annotated[int, msgspec.Meta(ge=0)]


class HostState(enum.StrEnum):
    """How a command ended on one host; anything but OK and IDLE fails the run."""

    OK = "ok"
    FAILED = "failed"
    UNREACHABLE = "unreachable"
    TIMEOUT = "timeout"
    CANCELLED = "cancelled"
    IDLE = "idle"
    """Sharded runs only: every command already ran on another host of this host's OS (more
    hosts than commands), so none was meant for it. Not a failure; never used for a host
    that was lost, cancelled or failed its fence."""


class HostResult(msgspec.Struct, frozen=True, rename="camel"):
    host: str
    os: OsKind | None
    state: HostState
    exit_code: int | None
    """The command's exit status, None when it never ran or never finished."""
    took_ms: NonNegativeInt
    log_path: str | None
    """Where the per-host log file was written."""
    error: str | None = None
    command: str | None = None


class RunSummary(msgspec.Struct, frozen=True, rename="camel"):
    """Counts over a run's host results."""

    total: NonNegativeInt
    succeeded: NonNegativeInt
    failed: NonNegativeInt
    unreachable: NonNegativeInt
    timed_out: NonNegativeInt
    cancelled: NonNegativeInt
    idle: NonNegativeInt = 0

    @classmethod
    def from_results(cls, results: Iterable[HostResult]) -> RunSummary:
        counts = dict.fromkeys(HostState, 0)
        for result in results:
            counts[result.state] += 1
        return cls(
            total=sum(counts.values()),
            succeeded=counts[HostState.OK],
            failed=counts[HostState.FAILED],
            unreachable=counts[HostState.UNREACHABLE],
            timed_out=counts[HostState.TIMEOUT],
            cancelled=counts[HostState.CANCELLED],
            idle=counts[HostState.IDLE],
        )

    @property
    def exit_code(self) -> ExitCode:
        """OK only if something ran and every host succeeded (or, sharding, had no job)."""
        if self.succeeded > 0 and self.succeeded + self.idle == self.total:
            return ExitCode.OK
        return ExitCode.HOSTS_FAILED

    def line(self) -> str:
        """``3 succeeded, 1 failed, 1 unreachable[, N timed out][, N cancelled][, N idle]``."""
        text = f"{self.succeeded} succeeded, {self.failed} failed, {self.unreachable} unreachable"
        if self.timed_out:
            text += f", {self.timed_out} timed out"
        if self.cancelled:
            text += f", {self.cancelled} cancelled"
        if self.idle:
            text += f", {self.idle} idle"
        return text


class RunEnvelope(msgspec.Struct, frozen=True, rename="camel"):
    """The ``--json`` document of ``ah-fleetctl run``."""

    session_id: str | None
    commands: list[str]
    hosts: list[HostResult]
    summary: RunSummary
    run_dir: str | None
    """Directory holding the per-host logs of this run."""

    @property
    def exit_code(self) -> ExitCode:
        return self.summary.exit_code
