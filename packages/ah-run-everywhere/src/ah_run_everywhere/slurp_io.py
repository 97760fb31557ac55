"""``slurp``, the I/O shell: fetch filesets from followers over their SSH transports.

Per fileset, every host in parallel:

1. **List** — an SFTP walk of the follower's workspace from the static prefixes of the
   include globs, entering only directories a glob may still match (the matcher is the pure
   :class:`~ah_run_everywhere.slurp.FilesetMatcher`). Why SFTP rather than a remote
   ``find``: one implementation for Linux, macOS and Windows followers (SFTP paths are ``/``
   paths everywhere), no glob quoting through three shells, names with spaces or newlines
   are just names, and sizes/types come with the listing. Symlinks and special files are
   not followed or fetched.
2. **Hash before** — one exec per host runs a small stdlib Python script (``python3``;
   ``python`` on Windows) that reads NUL-separated paths from stdin and prints one JSON line
   per file: size, mtime, sha256 (the fence's digest needs Python on followers too).
3. **Transfer** — SFTP ``get`` into a staging directory beside the destination, hashing
   while writing; up to ``concurrency`` transfers at once over all hosts (config
   ``concurrency.transfer``), up to :data:`SFTP_SESSIONS_PER_HOST` SFTP channels per host.
4. **Hash after** — the same script again. A copy counts only when before, copy and after
   agree (:func:`~ah_run_everywhere.slurp.check_transfer`); files that disagree get one more
   round (steps 2 to 4), then an error naming host and file.

A transient SSH error (connection lost, a channel refused, an SFTP session dying) is retried
once per step, over a fresh transport from ``relink`` when the old one died. Verified files
are moved (``os.replace``, same filesystem) to their place; the metadata document is written
last.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import secrets
import shutil
import stat
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, TypeVar

import msgspec
import paramiko  # type: ignore[import-untyped]
from loguru import logger

from ah_domain_types import FilesetSpec, OsKind
from ah_ssh_bridge import SshChannelError, SshConnectionLost, SshTransport

from .adapters import adapter_for
from .engine import HostExecutionError
from .slurp import (
    FilesetMatcher,
    FilesetOutcome,
    RemoteFileState,
    SlurpedFile,
    SlurpEnvelope,
    SlurpHostResult,
    answered_layout,
    check_transfer,
    metadata_path,
)

__all__ = [
    "HASH_SCRIPT",
    "SFTP_SESSIONS_PER_HOST",
    "SlurpError",
    "SlurpTarget",
    "sftp_path",
    "slurp",
]

_T = TypeVar("_T")

SFTP_SESSIONS_PER_HOST = 4
"""SFTP channels per host at once (each holds one of the transport's command slots)."""

HASH_SCRIPT = r"""
import hashlib, json, os, sys
for raw in sys.stdin.buffer.read().split(b"\0"):
    if not raw:
        continue
    path = raw.decode("utf-8", "surrogateescape")
    try:
        st = os.stat(path)
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        out = {"path": path, "size": st.st_size, "mtime": st.st_mtime, "sha256": digest.hexdigest()}
    except OSError as exc:
        out = {"path": path, "error": "%s: %s" % (type(exc).__name__, exc)}
    sys.stdout.write(json.dumps(out) + "\n")
""".strip()
"""Runs on the follower (stdlib only, Python 3.6+)."""

_COPY_BLOCK = 1 << 20


class SlurpError(Exception):
    """A step failed on one host for a reason a retry will not fix."""


class SlurpTarget(msgspec.Struct, frozen=True):
    """A follower to fetch from."""

    name: str
    os: OsKind
    workspace: str
    """The follower's workspace, native path (``/srv/ws``, ``C:\\ws``)."""


TransportFor = Callable[[str], SshTransport]
Relink = Callable[[str], Awaitable[SshTransport]]


def sftp_path(workspace: str, os_kind: OsKind, relative: Sequence[str] = ()) -> str:
    """The SFTP path of ``relative`` below ``workspace`` (``/C:/ws/a/b`` on Windows)."""
    if os_kind is OsKind.WINDOWS:
        root = "/" + PureWindowsPath(workspace).as_posix().lstrip("/")
    else:
        root = workspace
    return str(PurePosixPath(root, *relative))


_TRANSIENT: tuple[type[BaseException], ...] = (
    SshConnectionLost,
    SshChannelError,
    paramiko.SSHException,
    EOFError,
    ConnectionError,
    TimeoutError,
)


def _transient(exc: BaseException) -> bool:
    if isinstance(exc, _TRANSIENT):
        return True
    # paramiko reports a dead SFTP channel as OSError("Socket is closed").
    return isinstance(exc, OSError) and "closed" in str(exc).lower() and exc.errno is None


class _Candidate(msgspec.Struct, frozen=True):
    path: str
    size: int


class _HostRun:
    """One host's part in one fileset."""

    def __init__(
        self,
        target: SlurpTarget,
        spec: FilesetSpec,
        matcher: FilesetMatcher,
        staging: Path,
        *,
        transport_for: TransportFor,
        relink: Relink | None,
        transfers: asyncio.Semaphore,
        command_timeout: float,
    ) -> None:
        self.target = target
        self.spec = spec
        self.matcher = matcher
        self.staging = staging
        self._transport_for = transport_for
        self._relink = relink
        self._transfers = transfers
        self._timeout = command_timeout
        self.candidates: list[_Candidate] = []
        self.verified: dict[str, tuple[Path, RemoteFileState]] = {}
        self.errors: list[str] = []
        self.unreachable = False
        self.listed = False

    @property
    def name(self) -> str:
        return self.target.name

    # -- retry -----------------------------------------------------------------------------

    async def _step(self, what: str, op: Callable[[SshTransport], Awaitable[_T]]) -> _T:
        transport = self._transport_for(self.name)
        try:
            return await op(transport)
        except Exception as exc:
            if not _transient(exc):
                raise
            logger.info("slurp {}: {} failed ({}); retrying once", self.name, what, exc)
        if not transport.is_active and self._relink is not None:
            transport = await self._relink(self.name)
        return await op(transport)

    # -- the steps ---------------------------------------------------------------------------

    async def run(self) -> None:
        try:
            self.candidates = await self._step("listing", self._list)
            self.listed = True
            pending = [c.path for c in self.candidates]
            last_reasons: dict[str, str] = {}
            for _round in range(2):
                if not pending:
                    break
                pending, last_reasons = await self._round(pending)
            for path in pending:
                reason = last_reasons.get(path, f"{self.name}:{path}: not verified")
                self.errors.append(f"{reason} (also after one retry)")
        except HostExecutionError as exc:
            self.unreachable = True
            self.errors.append(f"{self.name}: {exc.reason}")
        except SlurpError as exc:
            self.errors.append(str(exc))
        except Exception as exc:
            self.errors.append(f"{self.name}: {type(exc).__name__}: {exc}")

    async def _round(self, paths: list[str]) -> tuple[list[str], dict[str, str]]:
        before = await self._step("hashing", lambda t: self._hash(t, paths))
        fetched: dict[str, str | None] = {}
        failures: dict[str, str] = {}
        await self._step("transfer", lambda t: self._transfer(t, paths, fetched, failures))
        after = await self._step("hashing", lambda t: self._hash(t, paths))
        retry: list[str] = []
        reasons: dict[str, str] = {}
        for path in paths:
            if path in failures:
                # Not a checksum question: the file could not be read at all.
                self.errors.append(failures[path])
                continue
            verdict = check_transfer(
                self.name, path, before.get(path), fetched.get(path), after.get(path)
            )
            if verdict.ok:
                state = before[path]
                self.verified[path] = (self._staged(path), state)
            else:
                retry.append(path)
                reasons[path] = verdict.reason or f"{self.name}:{path}: not verified"
                logger.info("slurp {}", reasons[path])
        return retry, reasons

    async def _list(self, transport: SshTransport) -> list[_Candidate]:
        async with transport.sftp() as sftp:
            found, problems = await asyncio.to_thread(self._walk, sftp)
        self.errors.extend(problems)
        return found

    def _walk(self, sftp: Any) -> tuple[list[_Candidate], list[str]]:
        found: dict[str, _Candidate] = {}
        problems: list[str] = []
        for start in self.matcher.walk_roots():
            stack: list[tuple[str, ...]] = [start]
            while stack:
                directory = stack.pop()
                remote = sftp_path(self.target.workspace, self.target.os, directory)
                try:
                    entries = sftp.listdir_attr(remote)
                except FileNotFoundError:
                    continue  # the glob's directory does not exist there: nothing to fetch
                except OSError as exc:
                    if _transient(exc):
                        raise
                    problems.append(f"{self.name}: cannot list {remote}: {exc}")
                    continue
                for entry in entries:
                    rel = (*directory, entry.filename)
                    mode = entry.st_mode or 0
                    if stat.S_ISDIR(mode):
                        if self.matcher.descend(rel):
                            stack.append(rel)
                    elif stat.S_ISREG(mode) and self.matcher.matches(rel):
                        path = "/".join(rel)
                        found[path] = _Candidate(path=path, size=int(entry.st_size or 0))
        return sorted(found.values(), key=lambda c: c.path), problems

    async def _hash(
        self, transport: SshTransport, paths: Sequence[str]
    ) -> dict[str, RemoteFileState]:
        python = "python" if self.target.os is OsKind.WINDOWS else "python3"
        command = adapter_for(self.target.os).render(
            [python, "-c", HASH_SCRIPT], cwd=self.target.workspace
        )
        payload = b"".join(p.encode("utf-8", "surrogateescape") + b"\0" for p in paths)
        out: list[str] = []
        err: list[str] = []
        outcome = await transport.run(
            command,
            on_stdout=out.append,
            on_stderr=err.append,
            stdin=payload,
            timeout=self._timeout,
        )
        if outcome.exit_code != 0:
            detail = "; ".join(err[-3:]) or "no error output"
            why = "timed out" if outcome.timed_out else f"exited with {outcome.exit_code}"
            raise SlurpError(
                f"{self.name}: computing sha256 on the follower ({python}) {why}: {detail}"
            )
        states: dict[str, RemoteFileState] = {}
        decoder = msgspec.json.Decoder(RemoteFileState)
        for line in out:
            text = line.strip()
            if not text.startswith("{"):
                continue  # a chatty login shell; the script prints JSON objects only
            try:
                state = decoder.decode(text)
            except msgspec.DecodeError:
                continue
            states[state.path] = state
        return states

    def _staged(self, path: str) -> Path:
        return self.staging.joinpath(*path.split("/"))

    async def _transfer(
        self,
        transport: SshTransport,
        paths: Sequence[str],
        fetched: dict[str, str | None],
        failures: dict[str, str],
    ) -> None:
        todo = [p for p in paths if p not in fetched and p not in failures]
        if not todo:
            return
        queue: asyncio.Queue[str] = asyncio.Queue()
        for path in todo:
            queue.put_nowait(path)

        async def worker() -> None:
            async with transport.sftp() as sftp:
                while True:
                    try:
                        path = queue.get_nowait()
                    except asyncio.QueueEmpty:
                        return
                    remote = sftp_path(self.target.workspace, self.target.os, path.split("/"))
                    local = self._staged(path)
                    async with self._transfers:
                        try:
                            fetched[path] = await asyncio.to_thread(_fetch, sftp, remote, local)
                        except Exception as exc:
                            if _transient(exc):
                                raise
                            failures[path] = f"{self.name}:{path}: cannot fetch {remote}: {exc}"

        workers = min(SFTP_SESSIONS_PER_HOST, len(todo))
        results = await asyncio.gather(*(worker() for _ in range(workers)), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result


def _fetch(sftp: Any, remote: str, local: Path) -> str:
    """Blocking: copy ``remote`` to ``local``, returning the sha256 of what was written."""
    local.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    with local.open("wb") as sink, sftp.open(remote, "rb") as source:
        with contextlib.suppress(Exception):
            source.prefetch()
        while True:
            block = source.read(_COPY_BLOCK)
            if not block:
                break
            digest.update(block)
            sink.write(block)
    return digest.hexdigest()


def _fileset_dest(dest: Path, spec: FilesetSpec) -> Path:
    sub = Path(spec.dest).expanduser()
    return sub if sub.is_absolute() else (dest / sub)


def _place(
    spec: FilesetSpec, runs: Sequence[_HostRun], fileset_dest: Path
) -> tuple[list[str], list[SlurpedFile], list[str]]:
    answered = [r.name for r in runs if r.candidates]
    files: list[SlurpedFile] = []
    errors: list[str] = []
    for run in runs:
        for path, (staged, state) in sorted(run.verified.items()):
            target = fileset_dest / Path(
                *answered_layout(spec.name, answered, run.name, path).parts
            )
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(staged, target)
            except OSError as exc:
                errors.append(f"{run.name}:{path}: cannot move it to {target}: {exc}")
                continue
            files.append(
                SlurpedFile(
                    host=run.name,
                    path=path,
                    local_path=str(target),
                    size=int(state.size or 0),
                    mtime=float(state.mtime or 0.0),
                    sha256=str(state.sha256),
                )
            )
    return answered, files, errors


async def slurp(
    filesets: Sequence[FilesetSpec],
    targets: Sequence[SlurpTarget],
    *,
    transport_for: TransportFor,
    dest: Path,
    relink: Relink | None = None,
    unreachable: Mapping[str, str] | None = None,
    concurrency: int = 16,
    command_timeout: float = 600.0,
) -> SlurpEnvelope:
    """Fetch every fileset from every target (see the module docstring).

    ``transport_for(name)`` gives a host's transport (raising ``HostUnreachable`` when it
    has none); ``relink(name)`` a fresh one after it died. ``unreachable`` lists selected
    hosts that have no transport at all: they are reported, never silently skipped.
    """
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    matchers = [FilesetMatcher(spec) for spec in filesets]  # glob errors before any I/O
    unreachable = dict(unreachable or {})
    transfers = asyncio.Semaphore(concurrency)
    dest = dest.resolve()
    outcomes: list[FilesetOutcome] = []
    for spec, matcher in zip(filesets, matchers, strict=True):
        fileset_dest = _fileset_dest(dest, spec)
        fileset_dest.mkdir(parents=True, exist_ok=True)
        staging = fileset_dest / f".ah-slurp-{secrets.token_hex(4)}"
        staging.mkdir(mode=0o700)
        try:
            runs = [
                _HostRun(
                    target,
                    spec,
                    matcher,
                    staging / target.name,
                    transport_for=transport_for,
                    relink=relink,
                    transfers=transfers,
                    command_timeout=command_timeout,
                )
                for target in targets
                if target.name not in unreachable
            ]
            await asyncio.gather(*(run.run() for run in runs))
            answered, files, move_errors = _place(spec, runs, fileset_dest)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        for lost in runs:
            if lost.unreachable:
                unreachable[lost.name] = "; ".join(lost.errors) or "connection lost"
        hosts: list[SlurpHostResult] = []
        by_name = {r.name: r for r in runs}
        for target in targets:
            host_run = by_name.get(target.name)
            if host_run is None or host_run.unreachable:
                hosts.append(SlurpHostResult(host=target.name, state="unreachable"))
                continue
            mine = [f for f in files if f.host == target.name]
            if host_run.errors:
                state = "failed"
            elif not host_run.candidates:
                state = "empty"
            else:
                state = "ok"
            hosts.append(
                SlurpHostResult(
                    host=target.name,
                    state=state,
                    files=len(mine),
                    bytes=sum(f.size for f in mine),
                    errors=list(host_run.errors),
                )
            )
        errors = list(move_errors)
        if spec.required and not answered:
            errors.append(
                f"required fileset {spec.name!r}: no host provided a file matching "
                f"{', '.join(spec.include)}"
                + (f" (excluding {', '.join(spec.exclude)})" if spec.exclude else "")
            )
        meta: str | None = None
        if files:
            meta_file = fileset_dest / metadata_path(spec.name)
            meta_file.write_bytes(msgspec.json.format(msgspec.json.encode(files), indent=2) + b"\n")
            meta = str(meta_file)
        outcomes.append(
            FilesetOutcome(
                name=spec.name,
                required=spec.required,
                dest=str(fileset_dest),
                answered=answered,
                hosts=hosts,
                files=files,
                metadata_path=meta,
                errors=errors,
            )
        )
    return SlurpEnvelope(filesets=outcomes, unreachable=unreachable)
