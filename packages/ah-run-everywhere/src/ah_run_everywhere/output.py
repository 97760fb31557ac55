"""Output of a run: host-attributed terminal lines, per-host log files, and the summary."""

from __future__ import annotations

import datetime as dt
import os
import queue
import secrets
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Literal, TextIO

from ah_domain_types import HostResult, HostState, RunSummary, validate_host_name

__all__ = [
    "HOST_COLOURS",
    "HostLog",
    "LinePrinter",
    "RunDirectory",
    "SpareRunDirectory",
    "StreamName",
    "colour_enabled",
    "format_summary",
]

StreamName = Literal["stdout", "stderr"]

HOST_COLOURS: tuple[str, ...] = ("36", "33", "35", "32", "34", "91", "96", "93", "95", "92")
"""ANSI SGR foreground codes cycled over hosts (red is kept out: it reads as an error)."""

_RESET = "\x1b[0m"
_LOG_BUFFER_BYTES = 1 << 16
"""A log's pending bytes are written once they reach this (or when the writer caught up)."""


def colour_enabled(stream: TextIO, environ: Mapping[str, str] | None = None) -> bool:
    """Colour only on a terminal, and never when ``NO_COLOR`` is set to a non-empty value
    (https://no-color.org)."""
    env = os.environ if environ is None else environ
    if env.get("NO_COLOR", ""):
        return False
    isatty = getattr(stream, "isatty", None)
    return bool(isatty is not None and isatty())


class LinePrinter:
    """Writes ``host | line`` to ``stream``; thread-safe and never interleaved mid-line.

    Every call takes one lock and performs a single ``write`` of whole lines followed by a
    flush, so lines of different hosts never mix even when callbacks run on several
    threads. The host column is padded to the longest host name. Text containing line
    breaks is written as several prefixed lines.
    """

    def __init__(
        self,
        stream: TextIO,
        hosts: Sequence[str],
        *,
        colour: bool | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self._stream = stream
        self._lock = threading.Lock()
        self._width = max((len(h) for h in hosts), default=0)
        self.colour = colour_enabled(stream, environ) if colour is None else colour
        self._colours = {h: HOST_COLOURS[i % len(HOST_COLOURS)] for i, h in enumerate(hosts)}

    def _prefix(self, host: str) -> str:
        padded = host.ljust(self._width)
        if not self.colour:
            return f"{padded} | "
        code = self._colours.get(host, "39")
        return f"\x1b[{code}m{padded}{_RESET} | "

    def line(self, host: str, text: str) -> None:
        """Write ``text`` (one or more lines, without terminator) attributed to ``host``."""
        prefix = self._prefix(host)
        pieces = text.replace("\r\n", "\n").split("\n")
        block = "".join(f"{prefix}{piece}\n" for piece in pieces)
        with self._lock:
            self._stream.write(block)
            self._stream.flush()


class _LogWriter:
    """Writes a run directory's logs on the process's one log-writing thread.

    Why a thread: a run's event loop shares the interpreter with one SSH worker thread per
    host, and every blocking file call it made itself (``open``, ``write``, ``flush``) gave
    up the GIL and then waited up to a switch interval to get it back — measured ~2 ms per
    ``open`` on a loaded 2-core machine, paid before each host's command could start. Here
    the loop only enqueues; the thread writes in arrival order (so each log keeps its
    order) and flushes whenever it has caught up, so a log can still be followed live.
    The first I/O error is kept and raised by :meth:`drain`.

    The thread starts writing a writer's lines ``start_delay_s`` after its first line, or at
    its first :meth:`drain`, whichever comes first: a short run (a warm fan-out takes ~20 ms)
    then writes its logs after its commands instead of while they run. Even a thread that
    only opens files takes the GIL away from the loop and the SSH threads (each blocking
    call costs up to a switch interval to get it back): measured ~10 ms more per 16-host run.

    One thread serves every writer of the process (a long-lived process, the leader agent,
    makes a run directory per run: a thread started per run costs a start-up hand-off on
    the loop, and one left waiting per run piles up).
    """

    def __init__(self, start_delay_s: float = 0.1) -> None:
        self._start_delay_s = start_delay_s
        self._go = threading.Event()
        self._first_at: float | None = None
        self.error: OSError | None = None

    def submit(self, log: HostLog, text: str | None) -> None:
        """Append ``text`` to ``log`` (None: close its file)."""
        if self._first_at is None:
            self._first_at = time.monotonic()
        _writer_queue().put((self, log, text))

    def drain(self) -> None:
        """Wait until everything submitted so far is written; raise the first I/O error."""
        self._go.set()
        if self._first_at is not None:
            done = threading.Event()
            _writer_queue().put((self, None, done))
            done.wait()
        if self.error is not None:
            error, self.error = self.error, None
            raise error

    def close(self) -> None:
        """:meth:`drain` (kept for the run directory's and a lone log's close)."""
        self.drain()

    def _hold_until_due(self) -> None:
        """On the thread: wait out this writer's start delay (cut short by a drain)."""
        if self._go.is_set() or self._first_at is None:
            return
        remaining = self._first_at + self._start_delay_s - time.monotonic()
        if remaining > 0:
            self._go.wait(remaining)
        self._go.set()

    def _failed(self, exc: OSError) -> None:
        if self.error is None:
            self.error = exc


_WriterItem = tuple[_LogWriter, "HostLog | None", "str | threading.Event | None"]
_queue_lock = threading.Lock()
_shared_queue: queue.SimpleQueue[_WriterItem] | None = None


def _writer_queue() -> queue.SimpleQueue[_WriterItem]:
    """The queue of the process's log-writing thread (started on first use)."""
    global _shared_queue
    items = _shared_queue
    if items is not None:
        return items
    with _queue_lock:
        if _shared_queue is None:
            _shared_queue = queue.SimpleQueue()
            threading.Thread(
                target=_write_logs, args=(_shared_queue,), name="ah-run-logs", daemon=True
            ).start()
        return _shared_queue


def _forget_writer_queue() -> None:
    # A forked child has no writer thread: it starts its own on first use.
    global _shared_queue
    _shared_queue = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_writer_queue)


def _write_logs(items: queue.SimpleQueue[_WriterItem]) -> None:
    dirty: set[HostLog] = set()
    while True:
        writer, log, item = items.get()
        writer._hold_until_due()
        if isinstance(item, threading.Event):
            _flush(dirty)
            item.set()
            continue
        assert log is not None
        try:
            if item is None:
                dirty.discard(log)
                log._close_file()
            else:
                log._append(item)
                dirty.add(log)
        except OSError as exc:
            writer._failed(exc)
        if items.empty():
            _flush(dirty)


def _flush(dirty: set[HostLog]) -> None:
    for log in dirty:
        try:
            log._flush()
        except OSError as exc:
            log._writer._failed(exc)
    dirty.clear()


class HostLog:
    """One host's log file: every line tagged with its stream (``out |`` / ``err |``) and
    job headers/footers as ``== ...`` lines. Thread-safe; each call writes whole lines.

    Writes go through the run directory's writer thread (see ``_LogWriter``); a log made
    on its own writes through a private one. :meth:`close` waits until all is written."""

    def __init__(self, path: Path | str, writer: _LogWriter | None = None) -> None:
        self._name = os.fspath(path)
        self._path = path if isinstance(path, Path) else None
        self._writer = writer if writer is not None else _LogWriter()
        self._own_writer = writer is None
        self._fd: int | None = None
        self._pending: list[bytes] = []
        self._pending_bytes = 0

    @property
    def path(self) -> Path:
        """The log file."""
        if self._path is None:
            self._path = Path(self._name)
        return self._path

    def write_line(self, stream: StreamName, text: str) -> None:
        tag = "out" if stream == "stdout" else "err"
        self._writer.submit(self, "".join(f"{tag} | {piece}\n" for piece in text.split("\n")))

    def write_note(self, text: str) -> None:
        self._writer.submit(self, f"== {text}\n")

    def close(self) -> None:
        self._writer.submit(self, None)
        if self._own_writer:
            self._writer.close()

    # -- the writer thread's side --

    # A plain append-mode descriptor and UTF-8 bytes (what a text file opened with "a",
    # utf-8, surrogateescape and newline="\n" writes), buffered here until the writer has
    # caught up: no TextIOWrapper to build and tear down per host per run.

    def _append(self, text: str) -> None:
        if self._fd is None:
            self._fd = os.open(self._name, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666)
        data = text.encode("utf-8", "surrogateescape")
        self._pending.append(data)
        self._pending_bytes += len(data)
        if self._pending_bytes >= _LOG_BUFFER_BYTES:
            self._flush()

    def _flush(self) -> None:
        if self._fd is None or not self._pending:
            return
        data = memoryview(b"".join(self._pending))
        self._pending.clear()
        self._pending_bytes = 0
        while data:
            data = data[os.write(self._fd, data) :]

    def _close_file(self) -> None:
        if self._fd is not None:
            fd = self._fd
            try:
                self._flush()
            finally:
                self._fd = None
                self._pending.clear()
                self._pending_bytes = 0
                os.close(fd)


class RunDirectory:
    """``<base>/runs/<UTC timestamp>-<id>/`` holding one ``<host>.log`` per host.

    The directory is created on construction (never reused: a clash picks a new id).

    ``spare`` (a :class:`SpareRunDirectory` made earlier, off the hot path, for exactly
    these hosts) is renamed into place instead: creating 16 log files costs 1-10 ms on a
    loaded machine (ext4, measured), opening 16 existing ones ~0.5 ms. A spare that does
    not fit (other base, already used) is ignored.
    """

    def __init__(
        self,
        base: Path | str,
        *,
        run_id: str | None = None,
        now: dt.datetime | None = None,
        spare: SpareRunDirectory | None = None,
    ) -> None:
        stamp = (now or dt.datetime.now(dt.UTC)).astimezone(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
        runs = Path(base) / "runs"
        runs.mkdir(parents=True, exist_ok=True)
        ident = run_id or secrets.token_hex(4)
        adopt = spare.claim(runs) if spare is not None else None
        while True:
            candidate = runs / f"{stamp}-{ident}"
            try:
                if adopt is not None:
                    if candidate.exists():  # rename would replace an empty directory
                        raise FileExistsError(candidate)
                    try:
                        adopt.rename(candidate)
                    except FileExistsError:
                        raise
                    except OSError:
                        adopt = None  # (gone, or not ours any more): make a new one
                        continue
                else:
                    candidate.mkdir()
            except FileExistsError:
                if run_id is not None:
                    raise FileExistsError(
                        f"run directory {candidate} already exists; pick another run id"
                    ) from None
                ident = secrets.token_hex(4)
                continue
            break
        self.path = candidate
        self.run_id = ident
        self._logs: dict[str, HostLog] = {}
        self._paths: dict[str, str] = {}
        self._files: dict[str, str] = {}
        self._prefix = os.path.join(str(candidate), "")
        self._lock = threading.Lock()
        self._writer = _LogWriter()

    def log_path(self, host: str) -> Path:
        """Where ``host``'s log goes (the name is validated, so it cannot escape the dir)."""
        return Path(self.log_file(host))

    def log_file(self, host: str) -> str:
        """:meth:`log_path` as a string (kept per host: a run asks for it per job)."""
        found = self._files.get(host)
        if found is None:
            found = self._files[host] = f"{self._prefix}{validate_host_name(host)}.log"
        return found

    def open_log(self, host: str) -> HostLog:
        """The (shared, append-mode) log of ``host``; opened on first use (again after
        :meth:`close`, appending)."""
        with self._lock:
            log = self._logs.get(host)
            if log is None:
                name = self.log_file(host)
                log = self._logs[host] = HostLog(name, self._writer)
                self._paths[host] = name
            return log

    def log_paths(self) -> dict[str, Path]:
        """Every log written in this run directory so far, by host."""
        with self._lock:
            return {host: Path(name) for host, name in self._paths.items()}

    def close(self) -> None:
        """Write out and close the open log files (the engine does this when its run ends);
        raises the first I/O error any of them met."""
        with self._lock:
            for log in self._logs.values():
                log.close()
            self._logs.clear()
        self._writer.close()


class SpareRunDirectory:
    """A run directory made ahead of time (``<base>/runs/.spare-<id>/`` with an empty
    ``<host>.log`` per host), for a long-lived process (the leader agent) to hand to the
    next :class:`RunDirectory` over the same hosts. Blocking: make it in a worker thread."""

    def __init__(self, base: Path | str, hosts: Iterable[str]) -> None:
        self.hosts = frozenset(validate_host_name(h) for h in hosts)
        runs = Path(base) / "runs"
        runs.mkdir(parents=True, exist_ok=True)
        self.runs = runs
        self.path: Path | None = runs / f".spare-{secrets.token_hex(6)}"
        os.mkdir(self.path)
        prefix = os.path.join(self.path, "")
        for host in self.hosts:
            # Path.touch() would first try utime() on the file that is not there yet.
            os.close(os.open(f"{prefix}{host}.log", os.O_WRONLY | os.O_CREAT, 0o666))
        self._lock = threading.Lock()

    def claim(self, runs: Path) -> Path | None:
        """The directory to rename into ``runs`` (once; None if used or elsewhere)."""
        with self._lock:
            path, self.path = self.path, None
        if path is None or runs != self.runs:
            self.path = path
            return None
        return path

    def discard(self) -> None:
        """Remove it if it was never claimed."""
        with self._lock:
            path, self.path = self.path, None
        if path is not None:
            for host in self.hosts:
                (path / f"{host}.log").unlink(missing_ok=True)
            path.rmdir()


def _describe(result: HostResult) -> str:
    if result.state is HostState.FAILED and result.exit_code is not None:
        detail = f"exit {result.exit_code}"
        if result.error:
            detail += f": {result.error}"
        return detail
    return result.error or ""


def format_summary(results: Iterable[HostResult]) -> str:
    """Every non-ok result (host, state, command, reason), then the count line
    ``X succeeded, Y failed, Z unreachable[, ...]``, which is always present."""
    results = list(results)
    bad = [r for r in results if r.state is not HostState.OK]
    lines: list[str] = []
    if bad:
        host_width = max(len(r.host) for r in bad)
        state_width = max(len(r.state.value) for r in bad)
        for r in bad:
            line = f"{r.host.ljust(host_width)}  {r.state.value.ljust(state_width)}"
            if r.command is not None:
                line += f"  [{r.command}]"
            reason = _describe(r)
            if reason:
                line += f"  {reason}"
            lines.append(line.rstrip())
    lines.append(RunSummary.from_results(results).line())
    return "\n".join(lines)
