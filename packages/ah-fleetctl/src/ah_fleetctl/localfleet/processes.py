"""Subprocesses that are always cleaned up: own process group, logs on disk, group signals.

Every `ManagedProcess` starts in its own session (`start_new_session=True`), so its process
group id is its pid and a signal to the group reaches the children it did not detach. Some
servers detach their children on purpose — sshd calls `setsid()` for every connection — so
`terminate`, `kill` and `pause` also walk the process tree (by parent pid, snapshotted *before*
any signal is sent, while the parent links still exist) and signal every descendant.

A process counts as gone once it no longer exists or is a zombie: orphans are reparented to
PID 1, which in a container may never reap them.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import os
import re
import signal
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

__all__ = ["DetachedProcess", "ManagedProcess", "ProcessGroup", "stop_detached", "terminate_all"]

_PROC = Path("/proc")
_KILL_GRACE_SECONDS = 5.0
_SAFE_NAME = re.compile(r"[^A-Za-z0-9_.-]+")


@dataclass(frozen=True)
class _ProcInfo:
    pid: int
    ppid: int
    pgid: int
    zombie: bool
    # Start time (clock ticks since boot) tells a process apart from a later one that reuses
    # its pid; None where the platform does not give it cheaply.
    start_time: int | None


def _process_table() -> dict[int, _ProcInfo]:
    if _PROC.is_dir() and sys.platform.startswith("linux"):
        return _linux_process_table()
    return _ps_process_table()


def _linux_process_table() -> dict[int, _ProcInfo]:
    table: dict[int, _ProcInfo] = {}
    for entry in os.scandir(_PROC):
        if not entry.name.isdigit():
            continue
        info = _linux_proc_info(int(entry.name))
        if info is not None:
            table[info.pid] = info
    return table


def _linux_proc_info(pid: int) -> _ProcInfo | None:
    try:
        raw = (_PROC / str(pid) / "stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # The command name (field 2) may contain spaces and parentheses; it ends at the last ')'.
    fields = raw[raw.rfind(")") + 2 :].split()
    return _ProcInfo(
        pid=pid,
        ppid=int(fields[1]),
        pgid=int(fields[2]),
        zombie=fields[0] in ("Z", "X"),
        start_time=int(fields[19]),
    )


def _ps_process_table() -> dict[int, _ProcInfo]:
    out = subprocess.run(
        ["ps", "-A", "-o", "pid=,ppid=,pgid=,stat="],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    table: dict[int, _ProcInfo] = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) < 4:
            continue
        pid = int(parts[0])
        table[pid] = _ProcInfo(
            pid=pid,
            ppid=int(parts[1]),
            pgid=int(parts[2]),
            zombie=parts[3].startswith("Z"),
            start_time=None,
        )
    return table


def _group_is_ours(pgid: int, leader_start: int | None, table: Mapping[int, _ProcInfo]) -> bool:
    """False once group id `pgid` may belong to a stranger.

    The kernel does not hand out a pid that is still in use as a process-group id, so while
    any member of our group lives, no new process can take the leader's pid. Only when a
    process with that pid exists but started at another time has the number been reused.
    """
    leader = table.get(pgid)
    return leader is None or leader_start is None or leader.start_time == leader_start


def _tree(
    table: Mapping[int, _ProcInfo], roots: Iterable[int], pgid: int | None
) -> list[_ProcInfo]:
    """Every live process in group `pgid` or descended from `roots` or from a group member."""
    children: dict[int, list[int]] = {}
    for info in table.values():
        children.setdefault(info.ppid, []).append(info.pid)
    members = [p.pid for p in table.values() if pgid is not None and p.pgid == pgid]
    pending = [*roots, *members]
    found: dict[int, _ProcInfo] = {}
    while pending:
        pid = pending.pop()
        if pid in found or pid not in table:
            continue
        found[pid] = table[pid]
        pending.extend(children.get(pid, ()))
    me = os.getpid()
    return [p for p in found.values() if not p.zombie and p.pid != me]


def _still_alive(info: _ProcInfo, table: Mapping[int, _ProcInfo]) -> bool:
    now = table.get(info.pid)
    if now is None or now.zombie:
        return False
    return info.start_time is None or now.start_time == info.start_time


def _signal_pid(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _stop_groups(watched: Mapping[int, int | None], grace: float) -> list[_ProcInfo]:
    """SIGTERM (and SIGCONT) every group in `watched` (pgid -> its leader's start time, None
    where unknown) and every descendant, SIGKILL what is left after `grace` seconds.

    Groups whose id now belongs to a stranger are skipped. Returns the processes that were
    signalled (found before the first signal).
    """
    table = _process_table()
    pgids = {pgid for pgid, start in watched.items() if _group_is_ours(pgid, start, table)}
    targets = {info.pid: info for pgid in pgids for info in _tree(table, [pgid], pgid)}
    for sig in (signal.SIGTERM, signal.SIGCONT):
        for pgid in pgids:
            _signal_group(pgid, sig)
        for info in targets.values():
            _signal_pid(info.pid, sig)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        table = _process_table()
        if not any(_still_alive(info, table) for info in targets.values()):
            return list(targets.values())
        time.sleep(0.02)
    table = _process_table()
    for pgid in pgids:
        _signal_group(pgid, signal.SIGKILL)
    for info in targets.values():
        if _still_alive(info, table):
            _signal_pid(info.pid, signal.SIGKILL)
    return list(targets.values())


@dataclass(frozen=True)
class DetachedProcess:
    """A process a `ProcessGroup` let go of (see `ProcessGroup.detach`): enough to find its
    process group again from another process and stop it with `stop_detached`."""

    name: str
    pgid: int
    start_time: int | None
    """The group leader's start time (clock ticks since boot), to tell a reused pid apart."""


def stop_detached(processes: Iterable[DetachedProcess], grace: float = _KILL_GRACE_SECONDS) -> int:
    """Stop detached process groups (and every descendant) from any process: SIGTERM, then
    SIGKILL after `grace` seconds. Groups already gone, or whose id was reused by a stranger,
    are skipped. Returns how many processes were signalled.

    Raises:
        RuntimeError: naming the pids that survived SIGKILL (should never happen).
    """
    signalled = _stop_groups({p.pgid: p.start_time for p in processes}, grace)
    deadline = time.monotonic() + _KILL_GRACE_SECONDS
    while True:
        table = _process_table()
        left = sorted(info.pid for info in signalled if _still_alive(info, table))
        if not left:
            return len(signalled)
        if time.monotonic() >= deadline:
            raise RuntimeError(f"processes survived SIGKILL: {left}")
        time.sleep(0.02)


class ManagedProcess:
    """A subprocess in its own process group whose stdout/stderr go to log files.

    Started on construction, like `subprocess.Popen`. Until it is terminated it is also kept
    in a module-level registry that an `atexit` hook tears down.
    """

    def __init__(
        self,
        argv: Sequence[str | os.PathLike[str]],
        *,
        log_dir: Path,
        name: str | None = None,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        if not argv:
            raise ValueError("ManagedProcess needs a non-empty argv")
        self.argv: tuple[str, ...] = tuple(os.fspath(a) for a in argv)
        self.name: str = _SAFE_NAME.sub("_", name or Path(self.argv[0]).name)
        log_dir.mkdir(parents=True, exist_ok=True)
        self.stdout_path, self.stderr_path = _unique_log_paths(log_dir, self.name)
        with self.stdout_path.open("wb") as out, self.stderr_path.open("wb") as err:
            try:
                self._popen = subprocess.Popen(
                    self.argv,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=err,
                    env=dict(env) if env is not None else None,
                    cwd=cwd,
                    start_new_session=True,
                )
            except OSError as exc:
                raise OSError(
                    exc.errno, f"cannot start {self.name}: {self.argv[0]}: {exc.strerror}"
                ) from exc
        self._paused: list[_ProcInfo] = []
        self._lock = threading.Lock()
        leader = _linux_proc_info(self.pid) if _PROC.is_dir() else None
        self._leader_start = leader.start_time if leader is not None else None
        _register(self)

    def __repr__(self) -> str:
        state = "running" if self.is_running else f"exited {self.returncode}"
        return f"<ManagedProcess {self.name} pid={self.pid} {state}>"

    @property
    def pid(self) -> int:
        return self._popen.pid

    @property
    def pgid(self) -> int:
        """The process group id; equal to `pid` because the process leads its own session."""
        return self._popen.pid

    @property
    def is_running(self) -> bool:
        """True until the process has exited (a paused process is still running)."""
        return self._popen.poll() is None

    @property
    def is_paused(self) -> bool:
        return bool(self._paused)

    @property
    def returncode(self) -> int | None:
        """Exit status once exited; negative is the number of the signal that ended it."""
        return self._popen.poll()

    def wait(self, timeout: float) -> int:
        """Wait for the process to exit and return its exit status."""
        try:
            return self._popen.wait(timeout)
        except subprocess.TimeoutExpired:
            raise TimeoutError(
                f"timed out after {timeout}s waiting for {self.name} (pid {self.pid}) to exit"
            ) from None

    def stdout_text(self) -> str:
        return self.stdout_path.read_text(encoding="utf-8", errors="replace")

    def stderr_text(self) -> str:
        return self.stderr_path.read_text(encoding="utf-8", errors="replace")

    def log_text(self) -> str:
        """stdout then stderr, each under a header naming its file; for error messages."""
        return (
            f"--- {self.stdout_path} ---\n{self.stdout_text()}"
            f"--- {self.stderr_path} ---\n{self.stderr_text()}"
        )

    def tree_pids(self) -> list[int]:
        """Live pids of the group and of every descendant, including detached ones."""
        return [p.pid for p in self._snapshot(_process_table())]

    def pause(self) -> None:
        """SIGSTOP the process group and every descendant; `resume` undoes it."""
        with self._lock:
            table = _process_table()
            targets = self._snapshot(table)
            self._signal_own_group(signal.SIGSTOP, table)
            for info in targets:
                _signal_pid(info.pid, signal.SIGSTOP)
            self._paused = targets

    def resume(self) -> None:
        """SIGCONT everything `pause` stopped, and the group and its descendants as they are now."""
        with self._lock:
            table = _process_table()
            self._signal_own_group(signal.SIGCONT, table)
            for info in [*self._paused, *self._snapshot(table)]:
                if _still_alive(info, table):
                    _signal_pid(info.pid, signal.SIGCONT)
            self._paused = []

    def terminate(self, timeout: float = _KILL_GRACE_SECONDS) -> int | None:
        """SIGTERM the group and descendants, wait up to `timeout`, then SIGKILL what is left.

        Returns the exit status (None only if even SIGKILL did not end it, which is raised
        as an error instead).
        """
        terminate_all([self], timeout)
        return self.returncode

    def kill(self) -> int | None:
        """SIGKILL the group and descendants at once."""
        terminate_all([self], 0.0)
        return self.returncode

    def _owns_group(self, table: Mapping[int, _ProcInfo]) -> bool:
        return self._popen.poll() is None or _group_is_ours(self.pgid, self._leader_start, table)

    def _snapshot(self, table: Mapping[int, _ProcInfo]) -> list[_ProcInfo]:
        alive = self._popen.poll() is None
        pgid = self.pgid if self._owns_group(table) else None
        return _tree(table, [self.pid] if alive else [], pgid)

    def _signal_own_group(self, sig: int, table: Mapping[int, _ProcInfo]) -> None:
        if self._owns_group(table):
            _signal_group(self.pgid, sig)


def _unique_log_paths(log_dir: Path, name: str) -> tuple[Path, Path]:
    for n in itertools.count():
        stem = name if n == 0 else f"{name}.{n}"
        out = log_dir / f"{stem}.stdout.log"
        err = log_dir / f"{stem}.stderr.log"
        try:
            out.open("xb").close()
        except FileExistsError:
            continue
        return out, err
    raise AssertionError("unreachable")


def terminate_all(processes: Sequence[ManagedProcess], timeout: float) -> None:
    """Stop several processes under one deadline: SIGTERM all, wait, SIGKILL the rest.

    Signals go to each process group and to every descendant found before the first signal.
    Stopped processes are also sent SIGCONT so they can act on SIGTERM.

    Raises:
        RuntimeError: naming the pids that survived SIGKILL (should never happen).
    """
    table = _process_table()
    targets: dict[int, _ProcInfo] = {}
    for proc in processes:
        for info in proc._snapshot(table):
            targets[info.pid] = info
    soft = timeout > 0
    if soft:
        for proc in processes:
            proc._signal_own_group(signal.SIGTERM, table)
            proc._signal_own_group(signal.SIGCONT, table)
        for info in targets.values():
            _signal_pid(info.pid, signal.SIGTERM)
            _signal_pid(info.pid, signal.SIGCONT)
        if _wait_gone(processes, targets, timeout):
            _finish(processes)
            return
    # Descendants started during the grace period are found from the survivors.
    table = _process_table()
    for proc in processes:
        for info in proc._snapshot(table):
            targets.setdefault(info.pid, info)
    for proc in processes:
        proc._signal_own_group(signal.SIGKILL, table)
    for info in targets.values():
        if _still_alive(info, table):
            _signal_pid(info.pid, signal.SIGKILL)
    if not _wait_gone(processes, targets, _KILL_GRACE_SECONDS):
        table = _process_table()
        left = sorted(p.pid for p in targets.values() if _still_alive(p, table))
        raise RuntimeError(f"processes survived SIGKILL: {left}")
    _finish(processes)


def _wait_gone(
    processes: Sequence[ManagedProcess], targets: Mapping[int, _ProcInfo], timeout: float
) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        # poll() reaps each leader as soon as it exits, so it does not linger as a zombie.
        leaders_done = all(p._popen.poll() is not None for p in processes)
        if leaders_done:
            table = _process_table()
            groups = {p.pgid for p in processes if p._owns_group(table)}
            in_groups = any(i.pgid in groups and not i.zombie for i in table.values())
            if not in_groups and not any(_still_alive(i, table) for i in targets.values()):
                return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.01)


def _finish(processes: Sequence[ManagedProcess]) -> None:
    for proc in processes:
        proc._paused = []
        _unregister(proc)


_live: set[ManagedProcess] = set()
_live_lock = threading.Lock()
_watchdog: subprocess.Popen[bytes] | None = None
_watchdog_failed = False


def _tell_watchdog(message: str) -> None:
    """Send one line to the watchdog (see `_watchdog`), starting it first if needed.

    Called with `_live_lock` held, so lines arrive in order. Cleanup must not fail because
    the safety net is missing, so a watchdog that cannot start or died is only warned about.
    """
    global _watchdog, _watchdog_failed
    if _watchdog_failed:
        return
    try:
        if _watchdog is None:
            _watchdog = subprocess.Popen(
                [sys.executable, "-m", "ah_fleetctl.localfleet._watchdog"],
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
        assert _watchdog.stdin is not None
        _watchdog.stdin.write(message.encode() + b"\n")
        _watchdog.stdin.flush()
    except OSError as exc:
        _watchdog_failed = True
        warnings.warn(
            f"ah_fleetctl.localfleet: cleanup watchdog unavailable ({exc}); processes started by "
            "a test process that is killed outright may outlive it",
            RuntimeWarning,
            stacklevel=3,
        )


def _register(proc: ManagedProcess) -> None:
    with _live_lock:
        _live.add(proc)
        start = "-" if proc._leader_start is None else str(proc._leader_start)
        _tell_watchdog(f"+ {proc.pgid} {start}")


def _unregister(proc: ManagedProcess) -> None:
    with _live_lock:
        if proc in _live:
            _live.discard(proc)
            _tell_watchdog(f"- {proc.pgid}")


@atexit.register
def _terminate_leftovers() -> None:
    with _live_lock:
        leftovers = list(_live)
    if leftovers:
        terminate_all(leftovers, 2.0)
    # Nothing is left to watch: let the watchdog see EOF and exit now, not after we are gone.
    if _watchdog is not None and _watchdog.stdin is not None:
        with contextlib.suppress(OSError):
            _watchdog.stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            _watchdog.wait(2.0)


class ProcessGroup:
    """Owns processes and cleanup callbacks; tears all of them down on exit, even on error.

    Use as a context manager. Cleanups run newest first, then every owned process is
    terminated under one deadline. An `atexit` hook does the same if `close` was never
    reached (an interpreter exiting with the group still open).
    """

    def __init__(self, log_dir: Path | None = None, *, terminate_timeout: float = 5.0) -> None:
        self.log_dir = log_dir
        self.terminate_timeout = terminate_timeout
        self._processes: list[ManagedProcess] = []
        self._cleanups: list[Callable[[], object]] = []
        self._lock = threading.Lock()
        self._closed = False
        atexit.register(self.close)

    def __enter__(self) -> ProcessGroup:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def processes(self) -> tuple[ManagedProcess, ...]:
        with self._lock:
            return tuple(self._processes)

    def start(
        self,
        argv: Sequence[str | os.PathLike[str]],
        *,
        name: str | None = None,
        log_dir: Path | None = None,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> ManagedProcess:
        """Start a process owned by this group (logs in `log_dir`, else the group's)."""
        directory = log_dir or self.log_dir
        if directory is None:
            raise ValueError(f"no log_dir given for {name or argv[0]!s} and the group has none")
        self._check_open()
        return self.adopt(ManagedProcess(argv, log_dir=directory, name=name, env=env, cwd=cwd))

    def adopt(self, process: ManagedProcess) -> ManagedProcess:
        """Make this group responsible for terminating `process`."""
        with self._lock:
            if self._closed:
                closed = True
            else:
                closed = False
                self._processes.append(process)
        if closed:
            process.terminate(self.terminate_timeout)
            raise RuntimeError(f"ProcessGroup is closed; terminated {process.name} at once")
        return process

    def detach(self) -> list[DetachedProcess]:
        """Let go of every process: they keep running after this interpreter exits (no
        `atexit` teardown, no watchdog) until someone calls `stop_detached` on the result.
        The group is closed; its cleanups are dropped without running."""
        with self._lock:
            if self._closed:
                raise RuntimeError("ProcessGroup is closed")
            self._closed = True
            processes = list(self._processes)
            self._cleanups.clear()
        atexit.unregister(self.close)
        for proc in processes:
            _unregister(proc)
        return [DetachedProcess(p.name, p.pgid, p._leader_start) for p in processes]

    def add_cleanup(self, callback: Callable[[], object]) -> None:
        """Run `callback` at close, before the processes are terminated (newest first)."""
        self._check_open()
        with self._lock:
            self._cleanups.append(callback)

    def close(self) -> None:
        """Run the cleanups, terminate every owned process. Idempotent.

        Raises:
            ExceptionGroup: of every cleanup error, after all cleanups have been attempted.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            cleanups = list(reversed(self._cleanups))
            processes = list(self._processes)
        atexit.unregister(self.close)
        errors: list[Exception] = []
        for callback in cleanups:
            try:
                callback()
            except Exception as exc:
                errors.append(exc)
        try:
            terminate_all(processes, self.terminate_timeout)
        except Exception as exc:
            errors.append(exc)
        if errors:
            raise ExceptionGroup("ProcessGroup cleanup failed", errors)

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("ProcessGroup is closed")
