"""Last-resort cleanup that survives the death of the process that started the children.

`atexit` does not run when the test process is SIGKILLed or leaves through `os._exit` (which
is what pytest-timeout's thread method does on a hung test). So the first `ManagedProcess`
also starts this small watchdog in its own session, connected by a pipe: the parent writes
"+ <pgid> <leader start time or ->" when it starts a process group and "- <pgid>" when it
has cleaned one up. When the pipe reaches EOF — the parent exited, however it exited — the
watchdog terminates every group still listed, with all their descendants, and exits.

Run as `python -m ah_fleetctl.localfleet._watchdog`.
"""

from __future__ import annotations

import signal
import sys

from ah_fleetctl.localfleet.processes import _stop_groups

_GRACE_SECONDS = 2.0


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
        _stop_groups(watched, _GRACE_SECONDS)


if __name__ == "__main__":
    main()
