"""ah-run-everywhere: run one command on many followers and get one trustworthy answer.

* :mod:`.scheduler` — the pure sharding scheduler (every-host / once-per-os).
* :mod:`.adapters` — per-OS command rendering (bash, zsh, PowerShell) and path mapping.
* :mod:`.output` — ``host | line`` printing, per-host run logs, the summary text.
* :mod:`.engine` — the asyncio engine over a :class:`HostExecutor` protocol.
* :mod:`.local` — a :class:`HostExecutor` running commands as local processes.
"""

from __future__ import annotations

from .adapters import (
    MAX_POSIX_COMMAND_BYTES,
    MAX_WINDOWS_COMMAND_CHARS,
    POWERSHELL_SINGLE_QUOTES,
    AdapterError,
    CommandAdapter,
    LogicalCommand,
    PathMapping,
    PathOutsideWorkspaceError,
    PosixShellAdapter,
    PowerShellAdapter,
    adapter_for,
    display_command,
    posix_quote,
    powershell_quote,
)
from .engine import (
    EventSink,
    ExecOutcome,
    ExecOutcomeLike,
    HostConnectionLost,
    HostExecutionError,
    HostExecutor,
    HostUnreachable,
    OutputCallback,
    RunEngine,
    TargetHost,
    default_mode,
    run_everywhere,
)
from .local import LocalProcessExecutor
from .output import (
    HOST_COLOURS,
    HostLog,
    LinePrinter,
    RunDirectory,
    SpareRunDirectory,
    StreamName,
    colour_enabled,
    format_summary,
)
from .scheduler import (
    SCHEDULING_MODES,
    Assignment,
    JobOutcome,
    JobReport,
    SchedulerError,
    SchedulingMode,
    ShardScheduler,
)

__version__ = "0.1.0"

__all__ = [
    "HOST_COLOURS",
    "MAX_POSIX_COMMAND_BYTES",
    "MAX_WINDOWS_COMMAND_CHARS",
    "POWERSHELL_SINGLE_QUOTES",
    "SCHEDULING_MODES",
    "AdapterError",
    "Assignment",
    "CommandAdapter",
    "EventSink",
    "ExecOutcome",
    "ExecOutcomeLike",
    "HostConnectionLost",
    "HostExecutionError",
    "HostExecutor",
    "HostLog",
    "HostUnreachable",
    "JobOutcome",
    "JobReport",
    "LinePrinter",
    "LocalProcessExecutor",
    "LogicalCommand",
    "OutputCallback",
    "PathMapping",
    "PathOutsideWorkspaceError",
    "PosixShellAdapter",
    "PowerShellAdapter",
    "RunDirectory",
    "RunEngine",
    "SchedulerError",
    "SchedulingMode",
    "ShardScheduler",
    "SpareRunDirectory",
    "StreamName",
    "TargetHost",
    "adapter_for",
    "colour_enabled",
    "default_mode",
    "display_command",
    "format_summary",
    "posix_quote",
    "powershell_quote",
    "run_everywhere",
]
