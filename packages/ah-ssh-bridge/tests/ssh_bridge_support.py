"""Helpers shared by the transport and warm-executor tests (real sshd, real processes)."""

from __future__ import annotations

from pathlib import Path

from ah_harness_local import RunningSshd
from ah_ssh_bridge import SshOptions, SshTransport

# Commands in these tests must notice a dead peer fast; the default 15 s would be too slow.
FAST = SshOptions(keepalive_interval_s=0.5, keepalive_timeout_s=2.0, kill_grace_s=0.5)


async def open_transport(
    sshd: RunningSshd, *, options: SshOptions = FAST, host: str = "follower-1"
) -> SshTransport:
    return await SshTransport.connect(
        sshd.listen,
        sshd.port,
        host=host,
        username=sshd.user,
        key_path=sshd.client_key_path,
        expected_fingerprint=sshd.host_key_fingerprint,
        options=options,
    )


def pid_gone(pid: int) -> bool:
    """No such process, or a zombie (orphans of an init that does not reap stay zombies)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat[stat.rfind(")") + 2] in "ZX"


def read_pids(path: Path) -> list[int]:
    try:
        return [int(word) for word in path.read_text().split()]
    except FileNotFoundError:
        return []


def sleeper(pid_file: Path, *, ignore_term: bool = False) -> str:
    """A command whose processes (the shell, a child and a grandchild) record their pids."""
    trap = "trap '' TERM; " if ignore_term else ""
    return (
        f"{trap}sleep 1000 & echo $! >> {pid_file}; "
        f"sh -c 'sleep 1000 & echo $! >> {pid_file}; wait' & "
        f'echo $$ >> {pid_file}; while [ "$(wc -l < {pid_file})" -lt 3 ]; do sleep 0.01; done; '
        "echo started; wait"
    )
