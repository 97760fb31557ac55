"""Last-resort cleanup that survives the death of the process that started the children.

`atexit` does not run when the test process is SIGKILLed or leaves through `os._exit` (which
is what pytest-timeout's thread method does on a hung test). So the first `ManagedProcess`
also starts this small watchdog in its own session, connected by a pipe: the parent writes
"+ <pgid> <leader start time or ->" when it starts a process group and "- <pgid>" when it
has cleaned one up. When the pipe reaches EOF — the parent exited, however it exited — the
watchdog terminates every group still listed, with all their descendants, and exits.

Run as `python -m ah_harness_local._watchdog`.
"""

from __future__ import annotations

import signal
import sys
import time

from ah_harness_local.processes import (
    _group_is_ours,
    _process_table,
    _signal_group,
    _signal_pid,
    _still_alive,
    _tree,
)

_GRACE_SECONDS = 2.0


def _kill_groups(watched: dict[int, int | None]) -> None:
    table = _process_table()
    pgids = {pgid for pgid, start in watched.items() if _group_is_ours(pgid, start, table)}
    targets = {info.pid: info for pgid in pgids for info in _tree(table, [pgid], pgid)}
    for sig in (signal.SIGTERM, signal.SIGCONT):
        for pgid in pgids:
            _signal_group(pgid, sig)
        for info in targets.values():
            _signal_pid(info.pid, sig)
    deadline = time.monotonic() + _GRACE_SECONDS
    while time.monotonic() < deadline:
        table = _process_table()
        if not any(_still_alive(info, table) for info in targets.values()):
            return
        time.sleep(0.02)
    for pgid in pgids:
        _signal_group(pgid, signal.SIGKILL)
    for info in targets.values():
        if _still_alive(info, table):
            _signal_pid(info.pid, signal.SIGKILL)


def main() -> None:
    # Signals meant for the parent's terminal session must not stop the watchdog early.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    # pgid -> the leader's start time (None where unknown), to skip a reused group id.
    watched: dict[int, int | None] = {}
    for line in sys.stdin:
        match line.split():
            case ["+", pgid, start] if pgid.isdigit():
                watched[int(pgid)] = int(start) if start.isdigit() else None
            case ["-", pgid] if pgid.isdigit():
                watched.pop(int(pgid), None)
    if watched:
        _kill_groups(watched)


if __name__ == "__main__":
    main()
