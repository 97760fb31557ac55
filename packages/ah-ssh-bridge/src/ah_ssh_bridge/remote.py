"""The small shell texts sent to POSIX followers (pure, no I/O).

Why a wrapper: OpenSSH does not signal the processes of a pty-less session when the client
closes the channel (they run on, reparented, until they happen to write to the closed pipe),
and the ``signal`` channel request is refused or ignored by many server versions. What *is*
reliable is that sshd starts every session with ``setsid()``, so the login shell that runs
our command leads its own process group, and everything the command starts (that does not
call ``setsid`` itself) stays in that group. The wrapper prints the shell's pid — the group
id — as the first line of stdout behind a per-command nonce; to stop the command we kill the
whole group from a second channel.
"""

from __future__ import annotations

import re
import secrets
import shlex
from collections.abc import Mapping

__all__ = [
    "MARKER_PREFIX",
    "RemoteCommand",
    "kill_group_script",
    "parse_marker",
    "wrap_command",
]

MARKER_PREFIX = "__ah_ssh_bridge_pgid__"
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_EXEC_SAFE = re.compile(r"[A-Za-z0-9_./-]+(?: -[A-Za-z]+)* '[^']*'(?:\\''[^']*')*")
"""A program, short flags and one single-quoted word (``'`` written ``'\\''``), as the
run-everywhere adapters render ``bash -lc '<script>'``: exactly one simple command whose
words are all literal."""


class RemoteCommand:
    """A wrapped command and the nonce its process-group marker line carries."""

    __slots__ = ("nonce", "text")

    def __init__(self, text: str, nonce: str) -> None:
        self.text = text
        self.nonce = nonce


def wrap_command(
    command: str,
    *,
    env: Mapping[str, str] | None = None,
    report_pgid: bool = True,
    nonce: str | None = None,
) -> RemoteCommand:
    """Build what the login shell runs: marker line, ``export``s, then the command itself.

    The command runs through ``eval`` of its quoted text, so the script the shell parses is
    always valid: zsh parses a whole ``-c`` script before running any of it, and a syntax
    error in the command must not stop the marker (it becomes the command's own error).
    A command that is one simple command with literal words (``bash -lc '...'``, see
    ``_EXEC_SAFE``) is ``exec``-ed instead: the login shell becomes it, saving a fork and
    a process per command, and it keeps the pid (the process group the marker names).
    """
    nonce = nonce or secrets.token_hex(8)
    lines: list[str] = []
    if report_pgid:
        lines.append(f"printf '{MARKER_PREFIX} %s %s\\n' {nonce} \"$$\"")
    for name, value in (env or {}).items():
        if not _ENV_NAME.fullmatch(name):
            raise ValueError(
                f"env: {name!r} is not a valid environment variable name "
                "(expected letters, digits and '_', not starting with a digit)"
            )
        lines.append(f"export {name}={shlex.quote(value)}")
    if _EXEC_SAFE.fullmatch(command):
        lines.append(f"exec {command}")
    else:
        lines.append(f"eval {shlex.quote(command)}")
    return RemoteCommand("\n".join(lines), nonce)


def parse_marker(line: str, nonce: str) -> int | None:
    """The process-group id if ``line`` is the marker line carrying ``nonce``, else None."""
    parts = line.split(" ")
    if len(parts) != 3 or parts[0] != MARKER_PREFIX or parts[1] != nonce:
        return None
    if not parts[2].isdigit():
        return None
    pgid = int(parts[2])
    return pgid if pgid > 1 else None


def kill_group_script(pgid: int, *, grace_s: float, poll_s: float = 0.05) -> str:
    """SIGTERM process group ``pgid`` now; SIGKILL it after ``grace_s`` if anything is left.

    The escalation runs detached in the background, so the channel that carries this script
    ends at once (freeing its session slot) while the follow-up still happens. A group with
    only zombies left (orphans of an init that does not reap) still answers ``kill -0``; it
    just gets a harmless SIGKILL at the end of the grace period.
    """
    if pgid <= 1:
        raise ValueError(f"refusing to signal process group {pgid}")
    rounds = max(1, round(grace_s / poll_s))
    return (
        f"kill -TERM -{pgid} 2>/dev/null || exit 0\n"
        f"( i=0; while kill -0 -{pgid} 2>/dev/null; do "
        f'if [ "$i" -ge {rounds} ]; then kill -KILL -{pgid} 2>/dev/null; exit 0; fi; '
        f"sleep {poll_s}; i=$((i+1)); done ) </dev/null >/dev/null 2>&1 &\n"
        "exit 0"
    )
