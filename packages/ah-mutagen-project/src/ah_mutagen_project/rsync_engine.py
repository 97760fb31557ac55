"""The rsync-over-SSH sync engine (the default where Mutagen is absent).

Command: ``rsync -rlpt --delete --mkpath --out-format='%i %n' --modify-window=-1
--timeout=N -e '<ssh -F config -o BatchMode=yes>' [--checksum] --exclude=PATTERN...
SRC/ HOST:DST/``. The choices:

* ``-rlpt`` rather than ``-a``: recursion, symlinks as symlinks, permissions (the exec bit is
  part of the snapshot) and mtimes (needed by the next quick check). Not owner/group (the
  follower account owns its copy) and not devices/specials (the snapshot skips them too).
* ``--delete`` makes the follower an exact replica. Excluded paths are *not* deleted on the
  follower (no ``--delete-excluded``): an exclude pattern also protects the receiver's
  matching files, so a follower's own ``node_modules``/``.venv``/``target`` — installed there,
  for that OS — survive every sync, and the follower digest ignores them like the leader
  does. Corollary: a directory the leader removed but that still holds ignored files on the
  follower stays there, and the fence reports it as unexpected.
* Quick check (size + mtime) for the normal sync, ``--checksum`` only for the fence's forced
  resync: checksumming reads every file on both sides every time, while the quick check
  costs a stat per file; the fence's digest catches what a quick check can miss (a follower
  file edited with its size and mtime restored), and the forced resync repairs it.
* ``--modify-window=-1`` makes the quick check compare mtimes to the nanosecond (rsync's
  default compares whole seconds, so a same-size edit within the second of the last sync
  would be skipped); needs rsync >= 3.1.3 on the follower. On a follower filesystem with
  coarse timestamps pass ``modify_window=1`` (FAT) or ``0`` instead, or every file is
  re-checked on every sync.
* ``--mkpath`` creates missing parents of the destination (needs rsync >= 3.2.3 on the
  follower); ``--timeout`` is rsync's own I/O timeout, a backstop behind our deadline, which
  kills rsync's whole process group (rsync and its ssh).

Ignores are :func:`ah_mutagen_project.ignores.rsync_exclude_patterns` (anchored correctly).
"""

from __future__ import annotations

import asyncio
import math
import os
import re
import shlex
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TypeAlias

import msgspec

from ah_mutagen_project._process import CommandTimeout, format_seconds, run_command
from ah_mutagen_project.ignores import rsync_exclude_patterns
from ah_mutagen_project.remote_digest import (
    RemoteDigest,
    parse_digest_output,
    remote_digest_command,
)

__all__ = [
    "RSYNC_EXIT_MEANINGS",
    "RemoteCommandError",
    "RsyncEngine",
    "RsyncError",
    "RsyncFenceDriver",
    "SshEndpoint",
    "SshTarget",
    "SshTransport",
    "SyncJob",
    "SyncOutcome",
    "SyncResult",
    "SyncTimeout",
    "target_label",
]

RSYNC_EXIT_MEANINGS: Mapping[int, str] = {
    1: "syntax or usage error (an rsync option the follower's rsync does not know?)",
    2: "protocol incompatibility between the leader's and the follower's rsync",
    3: "errors selecting input/output files or directories (destination not creatable?)",
    4: "requested action not supported by the follower's rsync",
    5: "error starting the client-server protocol",
    10: "socket I/O error",
    11: "file I/O error",
    12: "error in the rsync protocol data stream (the connection broke, or the follower's "
    "login shell printed text)",
    13: "errors with program diagnostics",
    14: "error in IPC code",
    20: "received SIGUSR1 or SIGINT",
    21: "some error returned by waitpid()",
    22: "error allocating core memory buffers",
    23: "partial transfer due to error (permissions? disk full?)",
    24: "partial transfer: source files vanished (the leader's tree changed during the sync)",
    25: "the --max-delete limit stopped deletions",
    30: "timeout in data send/receive",
    35: "timeout waiting for daemon connection",
    127: "rsync not found on the follower (not installed, or not on the SSH session's PATH)",
    255: "ssh failed (unreachable, authentication or host-key verification)",
}


class SshEndpoint(msgspec.Struct, frozen=True):
    """An SSH destination given explicitly instead of as an ssh-config alias."""

    user: str
    host: str
    port: int = 22
    identity: str | None = None
    """Private key file (``ssh -i``)."""


SshTarget: TypeAlias = str | SshEndpoint
"""A host alias resolved by the ssh config, or an explicit endpoint."""


def target_label(target: SshTarget) -> str:
    """How a target is named in messages."""
    if isinstance(target, str):
        return target
    return f"{target.user}@{target.host}:{target.port}"


_SSH_FAILURE_MARKS = (
    "ssh: ",  # ssh's own errors: "ssh: Could not resolve hostname", "ssh: connect to host"
    "Permission denied (",
    "Host key verification failed",
    "kex_exchange_identification",
    "Connection closed by",
)


def _ssh_never_connected(returncode: int, stderr: str) -> bool:
    """Whether an rsync failure is ssh's: exit 255, or rsync's own code for a stream that
    ended before a byte came back (12, sometimes; which one rsync reports when its ssh dies
    at once is a race) with ssh's error in the output."""
    if returncode == 255:
        return True
    return "(0 bytes received so far)" in stderr and any(m in stderr for m in _SSH_FAILURE_MARKS)


class RsyncError(RuntimeError):
    """rsync exited non-zero; the message names the host, the code, its meaning and stderr.
    ``ssh_failed``: the connection never came up (see `_ssh_never_connected`)."""

    def __init__(self, host: str, returncode: int, stderr: str) -> None:
        self.ssh_failed = _ssh_never_connected(returncode, stderr)
        meaning = RSYNC_EXIT_MEANINGS.get(returncode, "unknown rsync exit status")
        if self.ssh_failed and returncode != 255:
            meaning = f"{RSYNC_EXIT_MEANINGS[255]}; rsync reported it as: {meaning}"
        detail = f": {stderr}" if stderr else ""
        super().__init__(
            f"rsync to {host} failed with exit status {returncode} ({meaning}){detail}"
        )
        self.host = host
        self.returncode = returncode
        self.meaning = meaning
        self.stderr = stderr


class RemoteCommandError(RuntimeError):
    """A command run over ssh on a follower failed (the message names the host);
    ``returncode``: its exit status (255: ssh itself failed), None when not known."""

    def __init__(self, message: str, returncode: int | None = None) -> None:
        super().__init__(message)
        self.returncode = returncode


class SyncTimeout(TimeoutError):
    """A sync did not finish by its deadline; rsync and its ssh were killed."""

    def __init__(self, host: str, timeout: float) -> None:
        super().__init__(
            f"sync to {host} did not finish within {format_seconds(timeout)}s; rsync and its ssh were killed"
        )
        self.host = host
        self.timeout = timeout


class SyncOutcome(msgspec.Struct, frozen=True):
    host: str
    took_s: float
    changed: tuple[str, ...]
    """Paths rsync created or updated (files, links, directories), as it itemized them."""
    deleted: tuple[str, ...]
    checksum: bool
    """Whether this was a ``--checksum`` (forced) sync."""


class SyncJob(msgspec.Struct, frozen=True):
    """One destination of :meth:`RsyncEngine.sync_many`."""

    name: str
    target: SshTarget
    dst_root: str


SyncResult: TypeAlias = SyncOutcome | RsyncError | SyncTimeout

_ITEM_RE = re.compile(r"[<>ch.][fdLDS][^ ]{9} ")


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


class SshTransport:
    """Builds ssh command lines: ``ssh -F <config>`` for aliases, or an explicit command."""

    def __init__(
        self, ssh_config_path: Path | None = None, ssh_command: Sequence[str] | None = None
    ) -> None:
        self.ssh_config_path = ssh_config_path
        self.ssh_command = list(ssh_command) if ssh_command else ["ssh"]

    def ssh_options(self, target: SshTarget) -> list[str]:
        """The ssh program and options (no destination) for ``target``."""
        argv = list(self.ssh_command)
        if self.ssh_config_path is not None:
            argv += ["-F", str(self.ssh_config_path)]
        # Never prompt: a fence runs unattended. Earlier -o values win in ssh, so a caller's
        # own BatchMode (there is no reason for one) would still take precedence.
        argv += ["-o", "BatchMode=yes"]
        if isinstance(target, SshEndpoint):
            argv += ["-p", str(target.port), "-l", target.user]
            if target.identity:
                argv += ["-i", target.identity]
        return argv

    def ssh_argv(self, target: SshTarget, command: str) -> list[str]:
        """A complete ssh argv running ``command`` (one string, for the remote shell)."""
        host = target if isinstance(target, str) else target.host
        return [*self.ssh_options(target), "--", host, command]

    def rsync_destination(self, target: SshTarget, path: str) -> str:
        if isinstance(target, str):
            return f"{target}:{path}"
        return f"{target.user}@{_bracket(target.host)}:{path}"


def _parse_itemized(stdout: bytes) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Split ``--out-format='%i %n'`` output into changed and deleted paths; other lines
    (``created N directories for ...`` from --mkpath) are not items."""
    changed: list[str] = []
    deleted: list[str] = []
    for raw in stdout.decode("utf-8", "surrogateescape").splitlines():
        if raw.startswith("*deleting "):
            name = raw[len("*deleting ") :].lstrip(" ")
            target = deleted
        elif _ITEM_RE.match(raw):
            name = raw[12:]
            target = changed
        else:
            continue
        if name and name != "./":
            target.append(name.rstrip("/"))
    return tuple(changed), tuple(deleted)


class RsyncEngine:
    """Syncs a leader tree to followers with rsync over ssh, and digests followers' trees.

    ``ssh_config_path``: an OpenSSH config defining the host aliases (``ssh -F``).
    ``ssh_command``: the ssh program and options to use instead of plain ``ssh``.
    """

    def __init__(
        self,
        ssh_config_path: Path | None = None,
        ssh_command: Sequence[str] | None = None,
        *,
        rsync_binary: str = "rsync",
        modify_window: int = -1,
    ) -> None:
        self.transport = SshTransport(ssh_config_path, ssh_command)
        self.rsync_binary = rsync_binary
        self.modify_window = modify_window

    def rsync_argv(
        self,
        target: SshTarget,
        src_root: str | os.PathLike[str],
        dst_root: str,
        ignores: Sequence[str] | None,
        *,
        timeout: float,
        checksum: bool = False,
    ) -> list[str]:
        """The rsync command line :meth:`sync` runs (see the module docstring)."""
        src = os.path.abspath(os.fspath(src_root)).rstrip("/") + "/"
        argv = [
            self.rsync_binary,
            "-rlpt",
            "--delete",
            "--mkpath",
            "--out-format=%i %n",
            f"--modify-window={self.modify_window}",
            f"--timeout={max(1, math.ceil(timeout))}",
            "-e",
            shlex.join(self.transport.ssh_options(target)),
        ]
        if checksum:
            argv.append("--checksum")
        argv += [f"--exclude={pattern}" for pattern in rsync_exclude_patterns(ignores)]
        argv += [src, self.transport.rsync_destination(target, dst_root.rstrip("/") + "/")]
        return argv

    async def sync(
        self,
        target: SshTarget,
        src_root: str | os.PathLike[str],
        dst_root: str,
        ignores: Sequence[str] | None,
        timeout: float,
        *,
        checksum: bool = False,
    ) -> SyncOutcome:
        """Make ``dst_root`` on ``target`` a replica of ``src_root`` minus ``ignores``.

        Raises:
            SyncTimeout: not done within ``timeout`` seconds (names the host).
            RsyncError: rsync failed (names the host, exit status and its meaning).
            FileNotFoundError: no rsync on the leader.
        """
        label = target_label(target)
        argv = self.rsync_argv(target, src_root, dst_root, ignores, timeout=timeout,
                               checksum=checksum)  # fmt: skip
        try:
            result = await run_command(argv, timeout=timeout, what=f"rsync to {label}")
        except CommandTimeout:
            raise SyncTimeout(label, timeout) from None
        if result.returncode != 0:
            raise RsyncError(label, result.returncode, result.output_tail())
        changed, deleted = _parse_itemized(result.stdout)
        return SyncOutcome(label, result.took_s, changed, deleted, checksum)

    def listed_rsync_argv(
        self,
        target: SshTarget,
        src_root: str | os.PathLike[str],
        dst_root: str,
        ignores: Sequence[str] | None,
        list_file: Path,
        *,
        timeout: float,
    ) -> list[str]:
        """The rsync command line :meth:`sync_listed` runs."""
        src = os.path.abspath(os.fspath(src_root)).rstrip("/") + "/"
        argv = [
            self.rsync_binary,
            "-lpt",
            f"--files-from={list_file}",
            "--from0",
            "--delete-missing-args",
            "--force",
            "--ignore-times",
            "--mkpath",
            "--out-format=%i %n",
            f"--modify-window={self.modify_window}",
            f"--timeout={max(1, math.ceil(timeout))}",
            "-e",
            shlex.join(self.transport.ssh_options(target)),
        ]
        argv += [f"--exclude={pattern}" for pattern in rsync_exclude_patterns(ignores)]
        argv += [src, self.transport.rsync_destination(target, dst_root.rstrip("/") + "/")]
        return argv

    async def sync_listed(
        self,
        target: SshTarget,
        src_root: str | os.PathLike[str],
        dst_root: str,
        ignores: Sequence[str] | None,
        paths: Sequence[str],
        timeout: float,
        *,
        list_dir: Path,
    ) -> SyncOutcome:
        """Bring just ``paths`` (relative, ``/``-separated) of ``dst_root`` in line with
        ``src_root``: each one present on the leader is sent (``--ignore-times``: listed
        because it differs, whatever its size and mtime say), each one missing there is
        deleted on the follower (``--delete-missing-args --force``, directories with their
        contents); nothing else is looked at. For a caller that knows what differs (the
        fence, from the manifest it last verified on the follower); the list goes through a
        NUL-separated file in ``list_dir``.

        Raises:
            SyncTimeout, RsyncError, FileNotFoundError: as :meth:`sync`.
        """
        label = target_label(target)
        list_dir.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix="files-from.", dir=list_dir)
        list_file = Path(name)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(b"".join(os.fsencode(path) + b"\0" for path in paths))
            argv = self.listed_rsync_argv(
                target, src_root, dst_root, ignores, list_file, timeout=timeout
            )
            try:
                result = await run_command(argv, timeout=timeout, what=f"rsync to {label}")
            except CommandTimeout:
                raise SyncTimeout(label, timeout) from None
        finally:
            list_file.unlink(missing_ok=True)
        if result.returncode != 0:
            raise RsyncError(label, result.returncode, result.output_tail())
        changed, deleted = _parse_itemized(result.stdout)
        return SyncOutcome(label, result.took_s, changed, deleted, False)

    async def sync_many(
        self,
        jobs: Sequence[SyncJob],
        src_root: str | os.PathLike[str],
        ignores: Sequence[str] | None,
        timeout: float,
        *,
        checksum: bool = False,
    ) -> dict[str, SyncResult]:
        """Sync to every job's destination in parallel; one host's failure or timeout does
        not affect the others. Returns each job's outcome or error, by job name."""
        names = [job.name for job in jobs]
        if len(set(names)) != len(names):
            raise ValueError(f"sync_many: duplicate job names in {names}")

        async def one(job: SyncJob) -> SyncResult:
            try:
                return await self.sync(
                    job.target, src_root, job.dst_root, ignores, timeout, checksum=checksum
                )
            except (RsyncError, SyncTimeout) as exc:
                return exc

        results = await asyncio.gather(*(one(job) for job in jobs))
        return dict(zip(names, results, strict=True))

    async def run_remote(
        self, target: SshTarget, command: str, timeout: float, *, stdin: Path | None = None
    ) -> bytes:
        """Run ``command`` on ``target`` over ssh (its standard input from the file
        ``stdin``, else nothing) and return its stdout.

        Raises:
            TimeoutError: (``CommandTimeout``) naming the host, after killing ssh.
            RemoteCommandError: non-zero exit, with the host and the command's stderr.
        """
        label = target_label(target)
        result = await run_command(
            self.transport.ssh_argv(target, command),
            timeout=timeout,
            what=f"ssh to {label}",
            stdin=stdin,
        )
        if result.returncode != 0:
            raise RemoteCommandError(
                f"command on {label} exited with status {result.returncode}"
                + (" (ssh failed)" if result.returncode == 255 else "")
                + f": {result.output_tail()}",
                result.returncode,
            )
        return result.stdout

    async def digest(
        self,
        target: SshTarget,
        root: str,
        ignores: Sequence[str] | None,
        timeout: float,
        *,
        manifest: bool = False,
        exec_bits: bool = True,
        python: str = "python3",
        cache: bool = False,
    ) -> RemoteDigest:
        """The content id (and with ``manifest`` the manifest) of ``root`` on ``target``,
        computed there by the shipped digest script (the follower needs only python3);
        ``cache`` uses the follower's stat cache (``--cache auto``).

        Raises:
            TimeoutError, RemoteCommandError, RemoteDigestError.
        """
        started = time.monotonic()
        command = remote_digest_command(
            root, ignores, manifest=manifest, exec_bits=exec_bits, python=python, cache=cache
        )
        label = target_label(target)
        try:
            stdout = await self.run_remote(target, command, timeout)
        except RemoteCommandError as exc:
            raise RemoteCommandError(f"digest of {root!r}: {exc}", exc.returncode) from None
        except CommandTimeout:
            raise TimeoutError(
                f"digest of {root!r} on {label} did not finish within {format_seconds(timeout)}s "
                f"(gave up after {time.monotonic() - started:.1f}s)"
            ) from None
        digest = parse_digest_output(stdout, manifest=manifest, where=label)
        return digest if exec_bits else msgspec.structs.replace(digest, exec_bits=False)


class RsyncFenceDriver:
    """The ``sync`` and ``digest`` callables of :func:`ah_mutagen_project.fence.run_fence`
    for followers reached by this engine: ``jobs`` name each host's target and workspace."""

    def __init__(
        self,
        engine: RsyncEngine,
        src_root: str | os.PathLike[str],
        ignores: Sequence[str] | None,
        jobs: Sequence[SyncJob],
        *,
        python: str = "python3",
    ) -> None:
        self.engine = engine
        self.src_root = src_root
        self.ignores = ignores
        self.jobs = {job.name: job for job in jobs}
        if len(self.jobs) != len(jobs):
            raise ValueError(f"duplicate host names in {[job.name for job in jobs]}")
        self.python = python

    def _job(self, host: str) -> SyncJob:
        try:
            return self.jobs[host]
        except KeyError:
            raise KeyError(f"no sync target configured for host {host!r}") from None

    async def sync(self, host: str, *, force: bool, timeout: float) -> SyncOutcome:
        job = self._job(host)
        return await self.engine.sync(
            job.target, self.src_root, job.dst_root, self.ignores, timeout, checksum=force
        )

    async def digest(self, host: str, *, with_manifest: bool, timeout: float) -> RemoteDigest:
        job = self._job(host)
        return await self.engine.digest(
            job.target, job.dst_root, self.ignores, timeout, manifest=with_manifest,
            python=self.python,
        )  # fmt: skip
