"""The fence as ``ah-fleetctl`` runs it: snapshot the leader's tree, sync it to every selected
follower, and prove that each one now holds exactly that snapshot.

:func:`fence_selected` is what ``ah-fleetctl fence`` and ``ah-fleetctl run`` call with the
selection's :class:`~ah_fleetctl.dataplane.FleetLinks`:

1. **Snapshot** (:func:`ah_mutagen_project.take_snapshot`) of the leader workspace (the repo
   root, ``links.leader_root``) minus the effective ignores: config ``sync-ignores`` — whose
   repo layer, ``<repo>/.agents/config.toml``, replaces the default list — plus VCS metadata,
   always. The stat cache lives in the user cache directory, one per workspace
   (:func:`workspace_cache_dir`), so an unchanged file is never read twice.
2. **Sync**, every host in parallel, with the engine config ``sync-engine`` names
   (:func:`configured_engine`); ``auto``, the default, is :func:`choose_engine`'s rule: Mutagen
   when a ``mutagen`` binary is on ``PATH`` (a generated ``mutagen.yml``, ``project start``
   then ``project flush``, each bounded by the fence deadline), else rsync over OpenSSH
   (``rsync -rlpt --delete``, see :mod:`ah_mutagen_project.rsync_engine`). Both reach the
   followers through the OpenSSH config the links write (``Host ah-<name>``, host keys the
   links verified, one ControlMaster per follower reused across invocations).
3. **Verify**: the follower digests its own tree (the shipped stdlib-only script, so
   ``python3`` is all a follower needs) and the fence compares the content id with the
   snapshot id: equal → ``consistent``. Different → one forced resync (rsync
   ``--checksum``; for Mutagen another flush) and a digest with the manifest → still
   different → ``error`` naming the differing paths. A host that does not finish by the
   deadline (``--timeout``, config ``timeouts.fence``, 120 s) is ``timeout``; the
   :class:`~ah_mutagen_project.FenceError` message names the lagging hosts and suggests
   narrowing the selection with ``--host``/``--tag``.

The events ``fenceStarted{snapshotId}`` then ``fenceResult{snapshotId, hosts}`` go to
``emit`` (any callable taking the event; a coroutine function is awaited).

Speed (see ``benchmarks/fence.py``). The proof is always the follower's digest of its whole
tree; everything before it only has to make that digest likely to match:

* :class:`VerifiedHosts` remembers, per leader workspace, which snapshot each host was last
  *proven* to hold (and that snapshot's manifest). For such a host the fence plans just
  the changes from that manifest to the new snapshot
  (:mod:`ah_mutagen_project.incremental`) and :func:`~ah_mutagen_project.incremental.
  choose_sync` picks how to send them: ``nothing``; ``apply`` — the change set (the
  changed files' contents, deletions, links, modes and mtimes) goes on the standard input
  of the digest command, which applies it and then digests: one SSH exec per follower
  for sync and proof, started before the snapshot (SSH, shell and interpreter start-up
  overlap it; the command reads the tree only after it has the change set, which is
  empty for ``nothing``); ``listed`` — ``rsync --files-from`` for large change sets and
  Windows followers. A host with nothing proven gets a full rsync, started *while* the
  snapshot is taken. When the follower changed meanwhile (a build wrote into the tree,
  another workspace was fenced there), its digest disagrees, or the change set cannot be
  applied (a parent is not a directory there: nothing is ever written through a
  symlink), and it gets a full rsync and a second digest before the plan's forced resync.
* Both sides keep stat caches (the leader's snapshot cache; the follower's ``--cache auto``
  of the digest script, keyed on inode and ctime, which a follower-side edit always
  changes, so tampering cannot hide behind a restored mtime): only changed files are read.
  A leader process that fences again keeps the cache rows and proven manifests in memory.
* The digest runs ``python3 -I -S`` (no site import; the script imports only cheap modules
  on this path) and reuses each ControlMaster.
* **Warm sessions** (:class:`DigestSessions`, for a process that fences again and again:
  the benchmark, later ``ah-fleetctl agent``; :func:`keep_digest_sessions` attaches them to
  the :class:`~ah_fleetctl.dataplane.FleetLinks`, closing the links ends them): one
  long-lived ``digest_script.py --serve`` per POSIX follower over its ControlMaster, which
  keeps the tree in memory (``digest_script.LiveTree``: inotify on Linux followers, else a
  stat walk against the rows in memory) and answers each request — apply this change set,
  then your id (and manifest) — with its own reading of its whole tree, as the one-shot
  command would. The leader's snapshot comes from the same code
  (:class:`~ah_mutagen_project.snapshot.LiveSnapshots`). A session that ended (ssh or the
  server died, its output was not the protocol) is dropped with the reason logged and the
  host is digested the one-shot way; one that does not answer by the deadline is killed and
  the host is ``timeout``, named. After three failed sessions in a row a host gets only
  one-shot digests. Without kept sessions (the CLI) everything is as above.

Selected followers the links could not reach are part of the result, never dropped: a
connect timeout is ``timeout``, any other failure ``error``, with the reason.

Windows followers have no executable bits: they are digested with ``--no-exec-bit`` and
compared with the id of the same snapshot without the bits
(:meth:`ah_mutagen_project.FencePlan.expected_id`); their digest command is the quote-free
``python -c`` form for PowerShell. rsync to Windows needs an rsync there and a POSIX-style
workspace path (``hosts.<name>.workspace``); Mutagen is the engine for Windows fleets.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import inspect
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol, TypeAlias

import msgspec
from loguru import logger

from ah_config import CliError, ResolvedConfig
from ah_domain_types import (
    ConfigFile,
    ExitCode,
    FenceHostResult,
    FenceHostState,
    FenceMetadata,
    FenceResultEvent,
    FenceStartedEvent,
    FollowerStatus,
    OsKind,
)
from ah_mutagen_project import (
    FedCommand,
    IgnorePatternError,
    Manifest,
    MutagenFollower,
    MutagenProject,
    RemoteDigest,
    RsyncEngine,
    RsyncError,
    Snapshot,
    SnapshotError,
    SyncOutcome,
    mutagen_available,
    parse_digest_output,
    remote_digest_command,
    run_fence,
    take_snapshot,
    user_ignores,
    write_mutagen_project,
)
from ah_mutagen_project.digest_session import (
    DigestReply,
    DigestSession,
    DigestSessionError,
    SessionTimeout,
)
from ah_mutagen_project.incremental import (
    DEFAULT_MAX_APPLY_BYTES,
    ChangeSet,
    ChangeSetError,
    SyncMode,
    change_list,
    choose_sync,
    encode_change_set,
    plan_changes,
)
from ah_mutagen_project.rsync_engine import RemoteCommandError
from ah_mutagen_project.snapshot import LiveSnapshots

if TYPE_CHECKING:
    from .dataplane import FleetLinks

__all__ = [
    "DEFAULT_FENCE_TIMEOUT_S",
    "MAX_APPLY_BYTES",
    "DigestSessions",
    "EngineName",
    "FenceEmit",
    "FenceTarget",
    "MutagenSync",
    "RsyncSync",
    "VerifiedHosts",
    "changed_paths",
    "choose_engine",
    "fence_selected",
    "fence_targets",
    "fence_timeout_s",
    "fence_workspace",
    "keep_digest_sessions",
    "user_cache_dir",
    "workspace_cache_dir",
]

DEFAULT_FENCE_TIMEOUT_S = 120.0
_STEP_MARGIN_S = 0.25
"""A step's own deadline ends this much (at most 10 %) before the fence's, so the error that
reaches the user names the call that hung (rsync to X, mutagen flush) rather than just
"the fence deadline passed"."""

EngineName: TypeAlias = Literal["rsync", "mutagen"]
FenceEvent: TypeAlias = FenceStartedEvent | FenceResultEvent
FenceEmit: TypeAlias = (
    Callable[[FenceEvent], Awaitable[None] | None] | Callable[[FenceEvent], object]
)


class _Configured(Protocol):
    """What the fence needs of the invocation: its resolved configuration
    (:class:`~ah_fleetctl.context.FleetContext` has it)."""

    @property
    def config(self) -> ResolvedConfig[ConfigFile]: ...


class FenceTarget(msgspec.Struct, frozen=True):
    """One follower as the fence reaches it."""

    name: str
    alias: str
    """Its ``Host`` in the OpenSSH config (``ah-<name>``)."""
    workspace: str
    """Its copy of the leader's tree, in its own path notation."""
    os: OsKind

    @property
    def exec_bits(self) -> bool:
        """Windows filesystems have no executable bits: digest with ``--no-exec-bit``."""
        return self.os is not OsKind.WINDOWS


# --------------------------------------------------------------------------- where things live


def user_cache_dir(env: Mapping[str, str] | None = None, platform: str | None = None) -> Path:
    """The per-user cache directory: ``$AH_HOME/cache`` when ``AH_HOME`` is set; else
    ``$XDG_CACHE_HOME/agent-harbor`` (``~/.cache/agent-harbor``) on Linux and other Unixes,
    ``~/Library/Caches/agent-harbor`` on macOS, ``%LOCALAPPDATA%\\agent-harbor\\cache`` on
    Windows. Nothing is created here."""
    environ = os.environ if env is None else env
    system = sys.platform if platform is None else platform
    ah_home = environ.get("AH_HOME", "").strip()
    if ah_home:
        return Path(ah_home).expanduser() / "cache"
    home = Path(environ.get("HOME") or Path.home())
    if system.startswith(("win32", "cygwin", "msys")):
        local = environ.get("LOCALAPPDATA", "").strip()
        base = (
            Path(local) if local else Path(environ.get("USERPROFILE") or home) / "AppData" / "Local"
        )
        return base / "agent-harbor" / "cache"
    if system == "darwin":
        return home / "Library" / "Caches" / "agent-harbor"
    xdg = environ.get("XDG_CACHE_HOME", "").strip()
    # The XDG spec says relative paths are invalid and must be ignored.
    base = Path(xdg) if xdg and Path(xdg).is_absolute() else home / ".cache"
    return base / "agent-harbor"


def workspace_cache_dir(leader_root: Path, cache_root: Path | None = None) -> Path:
    """``<user cache>/fence/<first 16 hex of sha256(workspace path)>``, created 0700: the
    leader snapshot's stat cache (``snapshot.cache``) and, while a fence runs, its session
    directory (the ssh config, Mutagen's project file and private daemon)."""
    key = hashlib.sha256(os.fsencode(str(leader_root))).hexdigest()[:16]
    directory = (cache_root or user_cache_dir()) / "fence" / key
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    return directory


def fence_timeout_s(config: ConfigFile, flag: float | None = None) -> float:
    """``--timeout``, else config ``timeouts.fence``, else 120 s."""
    if flag is not None:
        return flag
    configured = config.timeouts.seconds("fence") if config.timeouts is not None else None
    return configured if configured else DEFAULT_FENCE_TIMEOUT_S


def choose_engine(mutagen_binary: str = "mutagen") -> EngineName:
    """``mutagen`` when its binary is on PATH, else ``rsync`` (the spec's rule)."""
    return "mutagen" if mutagen_available(mutagen_binary) else "rsync"


def engine_for(setting: str | None, mutagen_binary: str = "mutagen") -> EngineName:
    """The engine config ``sync-engine`` = ``setting`` picks.

    Raises:
        ValueError: it names Mutagen and none is installed (or no engine at all).
    """
    if setting in (None, "auto"):
        return choose_engine(mutagen_binary)
    if setting == "rsync":
        return "rsync"
    if setting == "mutagen":
        if mutagen_available(mutagen_binary):
            return "mutagen"
        raise ValueError(f"no {mutagen_binary!r} binary on PATH")
    raise ValueError(f"unknown engine {setting!r} (auto, rsync or mutagen)")


def configured_engine(config: ResolvedConfig[ConfigFile]) -> EngineName:
    """The fence's engine from config ``sync-engine`` (default ``auto``: :func:`choose_engine`).

    Raises:
        CliError: ``mutagen`` is asked for and not installed (a configuration error naming
            where the setting came from).
    """
    setting = config.typed.sync_engine
    try:
        return engine_for(setting)
    except ValueError as exc:
        raise CliError(
            ExitCode.CONFIGURATION,
            f"sync-engine = {setting!r} ({config.where('sync-engine')}): {exc}; install Mutagen or set "
            "sync-engine to auto or rsync",
            kind="configuration",
            details={"key": "sync-engine"},
        ) from None


def _step_timeout(remaining: float) -> float:
    return max(0.05, remaining - min(_STEP_MARGIN_S, remaining * 0.1))


# --------------------------------------------------------------------------- verified hosts


class _HostRecord(msgspec.Struct, frozen=True):
    """The snapshot a fence last *proved* a host holds, and under which terms."""

    snapshot_id: str
    workspace: str
    ignores: tuple[str, ...]
    exec_bits: bool


class _Records(msgspec.Struct):
    hosts: dict[str, _HostRecord] = {}


class VerifiedHosts:
    """What the fences of one leader workspace proved, kept in its cache directory:
    ``verified.json`` (host → :class:`_HostRecord`) and ``manifests/<snapshot id>.msgpack``
    (each proven snapshot's manifest, kept while some host's record names it).

    Only ever a hint: the next fence sends a host just what differs from the manifest it
    last proved there, and the digest afterwards still proves the result (when the follower
    changed meanwhile, the digest disagrees and a full sync follows)."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / "verified.json"
        self.manifest_dir = directory / "manifests"
        self.records = _Records()
        self._manifests: dict[str, Manifest | None] = {}
        # None yet, or unreadable: every host gets a full sync.
        with contextlib.suppress(OSError, msgspec.DecodeError, msgspec.ValidationError):
            self.records = msgspec.json.decode(self.path.read_bytes(), type=_Records)

    def manifest_for(
        self, host: str, target: FenceTarget, ignores: tuple[str, ...]
    ) -> Manifest | None:
        """The manifest last proven on ``host``, if that proof holds for how it is fenced
        now (same workspace, ignores and executable-bit rule)."""
        record = self.records.hosts.get(host)
        if record is None or (record.workspace, record.ignores, record.exec_bits) != (
            target.workspace,
            ignores,
            target.exec_bits,
        ):
            return None
        if record.snapshot_id not in self._manifests:
            self._manifests[record.snapshot_id] = _read_manifest(
                self.manifest_dir / f"{record.snapshot_id}.msgpack"
            )
        return self._manifests[record.snapshot_id]

    def store_manifest(self, snapshot: Snapshot) -> None:
        """Write ``snapshot``'s manifest unless it is there (a fence may do this while its
        hosts are still being verified; :meth:`update` removes it again if no host ends up
        proven at it).

        Raises:
            OSError: it could not be written.
        """
        self.manifest_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = self.manifest_dir / f"{snapshot.id}.msgpack"
        if not path.exists():
            _write_atomically(path, msgspec.msgpack.encode(snapshot.manifest))
            _remember_manifest(path, snapshot.manifest)

    def update(
        self,
        snapshot: Snapshot,
        results: Mapping[str, FenceHostResult],
        targets: Mapping[str, FenceTarget],
        ignores: tuple[str, ...],
    ) -> None:
        """Record the hosts proven consistent with ``snapshot``, forget the others; keep
        only manifests still named. Failing to write loses only the shortcut."""
        for host, result in results.items():
            target = targets.get(host)
            if target is not None and result.state is FenceHostState.CONSISTENT:
                self.records.hosts[host] = _HostRecord(
                    snapshot.id, target.workspace, ignores, target.exec_bits
                )
            else:
                self.records.hosts.pop(host, None)
        wanted = {r.snapshot_id for r in self.records.hosts.values()}
        try:
            if snapshot.id in wanted:
                self.store_manifest(snapshot)
            for stale in self.manifest_dir.glob("*.msgpack"):
                if stale.stem not in wanted:
                    stale.unlink(missing_ok=True)
            _write_atomically(self.path, msgspec.json.encode(self.records))
        except OSError as exc:
            logger.debug("fence: cannot record the verified hosts in {}: {}", self.path, exc)


_known_manifests: dict[Path, tuple[tuple[int, int, int], Manifest]] = {}
"""Manifest file → (its size, mtime and inode, the manifest) as this process last wrote or
read it: a leader process that fences again (an agent, a benchmark) skips decoding it."""


def _signature(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_size, st.st_mtime_ns, st.st_ino)


def _remember_manifest(path: Path, manifest: Manifest) -> None:
    signature = _signature(path)
    if signature is not None:
        if len(_known_manifests) > 64:
            _known_manifests.clear()
        _known_manifests[path] = (signature, manifest)


def _read_manifest(path: Path) -> Manifest | None:
    """The manifest stored at ``path``; None when missing or unreadable."""
    signature = _signature(path)
    known = _known_manifests.get(path)
    if known is not None and signature is not None and known[0] == signature:
        return known[1]
    try:
        manifest = msgspec.msgpack.decode(path.read_bytes(), type=Manifest)
    except (OSError, msgspec.DecodeError, msgspec.ValidationError):
        return None
    _remember_manifest(path, manifest)
    return manifest


def _write_atomically(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


changed_paths = change_list
"""What ``rsync --files-from`` is given (:func:`ah_mutagen_project.incremental.change_list`)."""

MAX_APPLY_BYTES = DEFAULT_MAX_APPLY_BYTES
"""Change sets with more file content than this go by ``rsync --files-from``."""
_APPLY_FAILED = 3
"""The digest command's exit status when it could not apply a change set."""
_EMPTY_CHANGE_SET = encode_change_set(".", ChangeSet((), (), 0))


def _encode_change_set(leader_root: Path, change_set: ChangeSet) -> bytes | None:
    """The change set's stream; None when the leader's tree no longer matches the snapshot
    there (then ``rsync --files-from`` sends what is there now)."""
    try:
        return encode_change_set(leader_root, change_set)
    except (ChangeSetError, OSError) as exc:
        logger.debug("fence: change set not sent ({}); using rsync --files-from", exc)
        return None


# --------------------------------------------------------------------------- engines


class DigestSessions:
    """Warm digest sessions (:class:`~ah_mutagen_project.digest_session.DigestSession`), one
    per follower, kept by a process that fences again and again (the benchmark, an agent)
    so that a fence asks a running server for the follower's id instead of starting a
    digest process. Held by the :class:`~ah_fleetctl.dataplane.FleetLinks` they run over
    (:func:`keep_digest_sessions`); closing the links closes them (the servers end).

    A session is reused only for the same follower, workspace, ignores and executable-bit
    rule; a dead one (ssh or the server ended, it did not answer in time) is dropped with
    its reason logged, and the fence digests that host the one-shot way meanwhile.
    ``inotify=False`` makes every digest a full stat walk on the follower."""

    MAX_FAILURES = 3
    """After this many sessions in a row failed on a host (its python cannot serve, ssh
    refuses the long-lived command...), only one-shot digests go there."""

    def __init__(self, *, inotify: bool = True) -> None:
        self.inotify = inotify
        self._sessions: dict[str, tuple[tuple[object, ...], DigestSession]] = {}
        self._closing: set[asyncio.Task[None]] = set()
        self._failures: dict[str, int] = {}
        self._leaders: dict[tuple[Path, tuple[str, ...]], LiveSnapshots] = {}

    def leader(self, root: Path, ignores: tuple[str, ...], cache_path: Path) -> LiveSnapshots:
        """The leader workspace's live snapshots (kept current by the same watcher code as
        the followers' servers), created on first use; closed with the sessions."""
        key = (root, ignores)
        found = self._leaders.get(key)
        if found is None:
            found = self._leaders[key] = LiveSnapshots(
                root, list(ignores), cache_path=cache_path, watch=self.inotify
            )
        return found

    def answered(self, host: str) -> None:
        """``host``'s session answered: its failures are forgiven."""
        self._failures.pop(host, None)

    def get(self, host: str, key: tuple[object, ...]) -> DigestSession | None:
        """``host``'s live session for ``key``, if any."""
        found = self._sessions.get(host)
        if found is None or found[0] != key or not found[1].alive:
            return None
        return found[1]

    def forget(self, host: str, why: str | None = None) -> None:
        """Drop ``host``'s session (closing it in the background); ``why`` is logged."""
        found = self._sessions.pop(host, None)
        if found is None:
            return
        if why is not None:
            failures = self._failures[host] = self._failures.get(host, 0) + 1
            logger.warning("fence: {}: digest session dropped: {}", host, why)
            if failures == self.MAX_FAILURES:
                logger.warning(
                    "fence: {}: {} digest sessions in a row failed; one-shot digests from now on",
                    host,
                    failures,
                )
        task = asyncio.ensure_future(found[1].close(grace=0.5))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def ensure(
        self, host: str, key: tuple[object, ...], argv: Sequence[str]
    ) -> DigestSession | None:
        """``host``'s session for ``key``, started with ``argv`` when there is none (a dead
        or differently configured one is dropped first). None when ``argv`` cannot start."""
        found = self._sessions.get(host)
        if found is None and self._failures.get(host, 0) >= self.MAX_FAILURES:
            return None
        if found is not None:
            if found[0] == key and found[1].alive:
                return found[1]
            if found[0] != key:
                self.forget(host)
            else:
                self.forget(host, f"it had ended ({found[1].reason}); starting a new one")
        try:
            session = await DigestSession.start(argv, what=f"digest session on {host}")
        except OSError as exc:
            logger.warning("fence: {}: cannot start a digest session: {}", host, exc)
            return None
        self._sessions[host] = (key, session)
        return session

    @property
    def hosts(self) -> list[str]:
        return list(self._sessions)

    def session(self, host: str) -> DigestSession | None:
        found = self._sessions.get(host)
        return found[1] if found is not None else None

    async def close(self) -> None:
        """End every session (idempotent)."""
        sessions = [s for _, s in self._sessions.values()]
        self._sessions.clear()
        leaders = list(self._leaders.values())
        self._leaders.clear()
        for leader in leaders:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(leader.close)
        await asyncio.gather(*(s.close() for s in sessions), return_exceptions=True)
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)


def keep_digest_sessions(links: FleetLinks, *, inotify: bool = True) -> DigestSessions:
    """Let the fences over ``links`` keep warm digest sessions (see :class:`DigestSessions`)
    until ``links`` is closed; returns them (the existing ones when already kept)."""
    if links.digest_sessions is None:
        links.digest_sessions = DigestSessions(inotify=inotify)
    return links.digest_sessions


class _Digester:
    """Digests followers' trees over OpenSSH (the same config and ControlMaster as rsync):
    through a warm session when ``sessions`` keeps one for the host, else one digest
    command per call."""

    def __init__(
        self,
        engine: RsyncEngine,
        targets: Mapping[str, FenceTarget],
        ignores: Sequence[str],
        sessions: DigestSessions | None = None,
    ) -> None:
        self.engine = engine
        self.targets = targets
        self.ignores = tuple(ignores)
        self.sessions = sessions

    def _command(self, host: str, *, with_manifest: bool, apply: bool) -> tuple[FenceTarget, str]:
        target = self.targets[host]
        windows = target.os is OsKind.WINDOWS
        if apply and windows:
            raise ValueError(f"{host}: change sets go to POSIX followers only")
        command = remote_digest_command(
            target.workspace,
            self.ignores,
            manifest=with_manifest,
            exec_bits=target.exec_bits,
            python="python" if windows else "python3",
            style="inline-powershell" if windows else "inline-posix" if apply else "heredoc",
            cache=True,
            isolated=True,
            apply=apply,
        )
        return target, command

    def _session_key(self, host: str) -> tuple[object, ...]:
        target = self.targets[host]
        inotify = self.sessions.inotify if self.sessions is not None else True
        return (target.alias, target.workspace, self.ignores, target.exec_bits, inotify)

    def session_for(self, host: str) -> DigestSession | None:
        """``host``'s live warm session, if the fence keeps one (one that ended since the
        fence began is dropped here, with its reason logged)."""
        if self.sessions is None or self.targets[host].os is OsKind.WINDOWS:
            return None
        found = self.sessions.session(host)
        if found is not None and not found.alive:
            self.sessions.forget(
                host, f"it ended ({found.reason}); digesting with a one-shot command"
            )
            return None
        return self.sessions.get(host, self._session_key(host))

    async def start_sessions(self) -> set[str]:
        """Make sure every POSIX host has a session (when sessions are kept); returns the
        hosts that have one. A new server starts reading its tree at once, in parallel
        with the leader's snapshot."""
        sessions = self.sessions
        if sessions is None:
            return set()
        hosts = [h for h, t in self.targets.items() if t.os is not OsKind.WINDOWS]

        async def one(host: str) -> DigestSession | None:
            target = self.targets[host]
            command = remote_digest_command(
                target.workspace,
                self.ignores,
                exec_bits=target.exec_bits,
                style="inline-posix",
                cache=True,
                isolated=True,
                serve=True,
                inotify=sessions.inotify,
            )
            argv = self.engine.transport.ssh_argv(target.alias, command)
            return await sessions.ensure(host, self._session_key(host), argv)

        started = await asyncio.gather(*(one(h) for h in hosts))
        return {h for h, s in zip(hosts, started, strict=True) if s is not None}

    async def prestart(self, host: str, *, with_manifest: bool = False) -> FedCommand:
        """Start ``host``'s digest command that first applies a change set from its standard
        input (POSIX followers): SSH, the remote shell and the interpreter start while the
        leader is still taking its snapshot; the command reads nothing of the tree before
        it has the change set, so what it digests is the tree after the change set."""
        target, command = self._command(host, with_manifest=with_manifest, apply=True)
        return await FedCommand.start(
            self.engine.transport.ssh_argv(target.alias, command), what=f"ssh to {host}"
        )

    async def _ask_session(
        self,
        session: DigestSession,
        host: str,
        *,
        with_manifest: bool,
        timeout: float,
        change_set: bytes | None,
    ) -> RemoteDigest:
        target = self.targets[host]
        where = f"digest of {target.workspace!r}"
        try:
            reply: DigestReply = await session.request(
                change_set=change_set, manifest=with_manifest, timeout=_step_timeout(timeout)
            )
        except SessionTimeout:
            assert self.sessions is not None
            self.sessions.forget(host)
            raise TimeoutError(
                f"{where} on {host} did not answer in time; its digest session was killed"
            ) from None
        assert self.sessions is not None
        self.sessions.answered(host)
        logger.debug(
            "fence: {}: session digest ({}{}, {} hashed, {:.1f} ms on the follower)",
            host,
            reply.mode,
            f": {reply.reason}" if reply.reason else "",
            reply.hashed,
            reply.took_ms,
        )
        if reply.status != 0:
            raise RemoteCommandError(
                f"{where}: digest session on {host} answered status {reply.status}: "
                f"{reply.output.decode('utf-8', 'replace').strip()[:2000]}",
                reply.status,
            )
        found = parse_digest_output(reply.output, manifest=with_manifest, where=host)
        return found if target.exec_bits else msgspec.structs.replace(found, exec_bits=False)

    async def digest(
        self,
        host: str,
        *,
        with_manifest: bool,
        timeout: float,
        change_set: bytes | None = None,
        started: FedCommand | None = None,
    ) -> RemoteDigest:
        """``change_set``: a stream (``encode_change_set``) for the command to apply before
        it digests (POSIX followers only), through ``started`` (from :meth:`prestart`) when
        given. A warm session answers when there is one; when it fails (it ended, or its
        output is not the protocol) the reason is logged and a one-shot command answers."""
        session = self.session_for(host) if started is None else None
        if session is not None:
            deadline = time.monotonic() + timeout
            try:
                return await self._ask_session(
                    session,
                    host,
                    with_manifest=with_manifest,
                    timeout=timeout,
                    change_set=change_set,
                )
            except DigestSessionError as exc:
                assert self.sessions is not None
                self.sessions.forget(host, f"{exc}; digesting with a one-shot command")
                timeout = max(0.0, deadline - time.monotonic())
        return await self._digest_once(
            host,
            with_manifest=with_manifest,
            timeout=timeout,
            change_set=change_set,
            started=started,
        )

    async def _digest_once(
        self,
        host: str,
        *,
        with_manifest: bool,
        timeout: float,
        change_set: bytes | None = None,
        started: FedCommand | None = None,
    ) -> RemoteDigest:
        target, command = self._command(
            host, with_manifest=with_manifest, apply=change_set is not None
        )
        where = f"digest of {target.workspace!r}"
        try:
            if change_set is None:
                stdout = await self.engine.run_remote(target.alias, command, _step_timeout(timeout))
            else:
                if started is not None and with_manifest:  # prestarted without --json
                    await started.cancel()
                    started = None
                fed = started or await self.prestart(host, with_manifest=with_manifest)
                try:
                    result = await fed.feed(change_set, _step_timeout(timeout))
                finally:
                    await fed.cancel()
                if result.returncode != 0:
                    raise RemoteCommandError(
                        f"command on {host} exited with status {result.returncode}"
                        + (" (ssh failed)" if result.returncode == 255 else "")
                        + f": {result.output_tail()}",
                        result.returncode,
                    )
                stdout = result.stdout
        except RemoteCommandError as exc:
            raise RemoteCommandError(f"{where}: {exc}", exc.returncode) from None
        except TimeoutError:
            raise TimeoutError(
                f"{where} on {host} did not finish in time; ssh was killed"
            ) from None
        found = parse_digest_output(stdout, manifest=with_manifest, where=host)
        return found if target.exec_bits else msgspec.structs.replace(found, exec_bits=False)


class RsyncSync:
    """The rsync engine as the fence's ``sync``: one ``rsync -rlpt --delete`` per host over
    the generated OpenSSH config (``--checksum`` for the forced resync)."""

    name: EngineName = "rsync"

    def __init__(
        self,
        engine: RsyncEngine,
        leader_root: Path,
        targets: Mapping[str, FenceTarget],
        ignores: Sequence[str],
    ) -> None:
        self.engine = engine
        self.leader_root = leader_root
        self.targets = targets
        self.ignores = tuple(ignores)

    async def sync(self, host: str, *, force: bool, timeout: float) -> SyncOutcome:
        target = self.targets[host]
        return await self.engine.sync(
            target.alias,
            self.leader_root,
            target.workspace,
            self.ignores,
            _step_timeout(timeout),
            checksum=force,
        )

    async def close(self) -> None:
        """Nothing outlives an rsync call."""


class MutagenSync:
    """The Mutagen engine as the fence's ``sync``.

    Mutagen syncs a whole project at once, so the hosts share its calls: the first host to
    ask starts the project (``project start``: the sessions are created and, with
    ``flushOnCreate``, complete a first cycle) and flushes it (``project flush``: one more
    full cycle, so everything written before the fence is in); the others wait for the same
    calls. A forced resync is another flush (shared by the hosts that ask together). Every
    call's deadline ends just before the fence's, so a hanging call is killed and named.

    The project runs under a private Mutagen daemon (``MUTAGEN_DATA_DIRECTORY`` in the
    session's directory) started with ``MUTAGEN_SSH_PATH`` pointing at ``ssh``/``scp``
    wrappers that add ``-F <generated config>``: the ``ah-<name>`` aliases resolve there
    and nowhere else. :meth:`close` (teardown, always) terminates the project and stops
    that daemon: one-way-replica sessions left running would revert files a command
    writes into the tree on the follower while it runs.

    Limitation: a flush waits for every session of the project, so with Mutagen one stalled
    follower makes every host of the fence time out (rsync fences hosts independently).
    """

    name: EngineName = "mutagen"

    def __init__(
        self,
        session_dir: Path,
        *,
        session_id: str,
        leader_root: Path,
        targets: Mapping[str, FenceTarget],
        ignores: Sequence[str],
        ssh_config: Path,
        binary: str = "mutagen",
    ) -> None:
        self.project_file = session_dir / "mutagen.yml"
        followers = [
            MutagenFollower(name=t.name, os=t.os, workspace=t.workspace) for t in targets.values()
        ]
        write_mutagen_project(
            self.project_file, session_id, str(leader_root), followers, list(ignores)
        )
        self.project = MutagenProject(
            binary=binary,
            project_file=self.project_file,
            env={"MUTAGEN_DATA_DIRECTORY": str(session_dir / "mutagen-data")},
            ssh_config=ssh_config,
        )
        self._lock = asyncio.Lock()
        self._flushes = 0
        self._initial: asyncio.Task[None] | None = None

    async def _start_and_flush(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        async with self._lock:
            await self.project.start(timeout=_step_timeout(deadline - time.monotonic()))
            self._flushes += 1
            await self.project.flush(timeout=_step_timeout(deadline - time.monotonic()))

    async def _flush_again(self, requested_after: int, timeout: float) -> None:
        async with self._lock:
            if self._flushes > requested_after:
                return  # a flush that began after this request has completed meanwhile
            self._flushes += 1
            await self.project.flush(timeout=_step_timeout(timeout))

    async def sync(self, host: str, *, force: bool, timeout: float) -> None:
        if not force:
            if self._initial is None:
                self._initial = asyncio.ensure_future(self._start_and_flush(timeout))
            # shield: one host's deadline must not cancel the call the others wait for.
            await asyncio.shield(self._initial)
            return
        await self._flush_again(self._flushes, timeout)

    async def close(self) -> None:
        """Terminate the project and stop its private daemon. Never raises: the fence's
        verdicts stand; a teardown that fails is a loud warning naming the project."""
        if self._initial is not None and not self._initial.done():
            self._initial.cancel()
            with contextlib.suppress(BaseException):
                await self._initial
        for what, call in (
            ("project terminate", self.project.terminate),
            ("daemon stop", self.project.stop_daemon),
        ):
            try:
                await call(timeout=30.0)
            except Exception as exc:
                logger.warning(
                    "fence: mutagen {} for {} failed, its sessions may still run: {}",
                    what,
                    self.project_file,
                    exc,
                )


# --------------------------------------------------------------------------- the fence


async def _emit_to(emit: FenceEmit | None, event: FenceEvent) -> None:
    if emit is None:
        return
    result = emit(event)
    if inspect.isawaitable(result):
        await result


async def fence_workspace(
    leader_root: Path,
    targets: Sequence[FenceTarget],
    *,
    ssh_config: Path,
    ignores: Sequence[str],
    timeout: float,
    emit: FenceEmit | None = None,
    session_id: str = "local",
    cache_dir: Path | None = None,
    engine: EngineName | None = None,
    unreachable: Mapping[str, tuple[FenceHostState, str]] | None = None,
    mutagen_binary: str = "mutagen",
    sessions: DigestSessions | None = None,
) -> FenceMetadata:
    """Fence ``targets`` (reached through ``ssh_config``) to the tree at ``leader_root``.

    ``unreachable``: selected hosts with no path, reported with the given state and reason
    (they are in the events and the result, and nothing is attempted on them).
    ``cache_dir``: where the snapshot's stat cache and the :class:`VerifiedHosts` live
    (default :func:`workspace_cache_dir`). ``engine``: default :func:`choose_engine`.
    ``sessions``: warm digest sessions to use and keep (:class:`DigestSessions`).
    Never raises for a host's failure (see :func:`ah_mutagen_project.require_consistent`).
    """
    leader_root = leader_root.resolve()
    unreachable = dict(unreachable or {})
    by_name = {t.name: t for t in targets}
    names = [*by_name, *(n for n in unreachable if n not in by_name)]
    cache = cache_dir or workspace_cache_dir(leader_root)
    engine_name = engine or choose_engine(mutagen_binary)
    ignore_list = tuple(ignores)
    rsync = RsyncEngine(ssh_config_path=ssh_config)
    digester = _Digester(rsync, by_name, ignore_list, sessions)
    session_dir = Path(tempfile.mkdtemp(prefix="session-", dir=cache))
    syncer: RsyncSync | MutagenSync
    try:
        if engine_name == "mutagen" and by_name:
            syncer = MutagenSync(
                session_dir,
                session_id=session_id,
                leader_root=leader_root,
                targets=by_name,
                ignores=ignore_list,
                ssh_config=ssh_config,
                binary=mutagen_binary,
            )
        else:
            syncer = RsyncSync(rsync, leader_root, by_name, ignore_list)
        try:
            return await _fence(
                leader_root,
                names,
                syncer,
                digester,
                timeout=timeout,
                emit=emit,
                session_id=session_id,
                cache=cache,
                ignores=ignore_list,
                unreachable=unreachable,
                rsync=rsync,
                targets=by_name,
                session_dir=session_dir,
            )
        finally:
            await syncer.close()
    finally:
        shutil.rmtree(session_dir, ignore_errors=True)


async def _fence(
    leader_root: Path,
    names: Sequence[str],
    syncer: RsyncSync | MutagenSync,
    digester: _Digester,
    *,
    timeout: float,
    emit: FenceEmit | None,
    session_id: str,
    cache: Path,
    ignores: tuple[str, ...],
    unreachable: Mapping[str, tuple[FenceHostState, str]],
    rsync: RsyncEngine,
    targets: Mapping[str, FenceTarget],
    session_dir: Path,
) -> FenceMetadata:
    loop = asyncio.get_running_loop()
    started = loop.time()
    deadline = started + timeout

    def remaining() -> float:
        return max(0.0, deadline - loop.time())

    verified = VerifiedHosts(cache)
    proven: dict[str, Manifest] = {}
    if isinstance(syncer, RsyncSync):
        for host, target in targets.items():
            found = verified.manifest_for(host, target, ignores)
            if found is not None:
                proven[host] = found
    # Hosts with nothing proven get a full rsync at once, while the snapshot is taken (the
    # digest afterwards proves what arrived, whatever the order). The others wait for the
    # snapshot and are sent just what differs from the manifest last proven there.
    # Warm digest sessions (when kept): started now for hosts without one, so a new server
    # reads its tree while the leader takes its snapshot.
    with_session = await digester.start_sessions()
    early_sync: dict[str, asyncio.Task[object]] = {}
    if isinstance(syncer, RsyncSync):
        early_sync = {
            host: asyncio.ensure_future(syncer.sync(host, force=False, timeout=remaining()))
            for host in targets
            if host not in proven
        }

    # Proven POSIX hosts without a session get their digest command started now too: it
    # waits for the change set (empty when nothing changed) and reads the tree only after
    # applying it.
    prestarted: dict[str, asyncio.Task[FedCommand]] = {
        host: asyncio.ensure_future(digester.prestart(host))
        for host in proven
        if targets[host].os is not OsKind.WINDOWS and host not in with_session
    }

    async def cancel_early() -> None:
        for task in early_sync.values():
            task.cancel()
        await asyncio.gather(*early_sync.values(), return_exceptions=True)
        for task in prestarted.values():
            task.cancel()
        for result in await asyncio.gather(*prestarted.values(), return_exceptions=True):
            if isinstance(result, FedCommand):
                await result.cancel()
        prestarted.clear()

    try:
        snapshot: Snapshot
        if digester.sessions is not None:
            # A process that keeps sessions keeps the leader's tree in memory too.
            live = digester.sessions.leader(leader_root, ignores, cache / "snapshot.cache")
            snapshot = await asyncio.to_thread(live.snapshot)
        else:
            snapshot = await asyncio.to_thread(
                take_snapshot, leader_root, list(ignores), cache_path=cache / "snapshot.cache"
            )
    except SnapshotError as exc:
        await cancel_early()
        raise CliError(
            ExitCode.HOSTS_FAILED,
            f"fence: cannot snapshot the leader workspace {leader_root}: {exc}",
            kind="fence",
            details={"workspace": str(leader_root)},
        ) from None
    except BaseException:
        await cancel_early()
        raise
    logger.debug(
        "fence: snapshot {} of {} ({} files hashed, {} from the stat cache, {:.0f} ms)",
        snapshot.id,
        leader_root,
        snapshot.files_hashed,
        snapshot.files_cached,
        snapshot.took_s * 1000,
    )
    expected_ids = {True: snapshot.id}
    # Hosts proven at the same snapshot share one manifest object: diff each one once, and
    # encode its change set (into a file each host's digest command reads) at most once.
    change_sets: dict[int, ChangeSet] = {}
    encoded: dict[int, bytes | None] = {}
    plans: dict[str, tuple[SyncMode, ChangeSet | None]] = {}
    for host, target in targets.items():
        manifest = proven.get(host)
        if manifest is None:
            plans[host] = ("full", None)
            logger.debug("fence: {}: full (no snapshot proven there)", host)
            continue
        if id(manifest) not in change_sets:
            change_sets[id(manifest)] = plan_changes(manifest, snapshot.manifest)
        change_set = change_sets[id(manifest)]
        mode = choose_sync(
            change_set,
            can_apply=target.os is not OsKind.WINDOWS,
            max_apply_bytes=MAX_APPLY_BYTES,
        )
        if mode == "apply":
            if id(manifest) not in encoded:
                encoded[id(manifest)] = _encode_change_set(leader_root, change_set)
            if encoded[id(manifest)] is None:
                mode = "listed"  # the leader's tree moved under the change set
        plans[host] = (mode, change_set)
        logger.debug(
            "fence: {}: {} ({} paths since its proven snapshot)", host, mode, len(change_set.paths)
        )
    # The manifest the next fence will diff against, written while the hosts are verified.
    storing = asyncio.ensure_future(asyncio.to_thread(verified.store_manifest, snapshot))
    # A prestarted digest command the plan has no use for is ended now.
    for host in [h for h in prestarted if plans[h][0] not in ("apply", "nothing")]:
        task = prestarted.pop(host)
        task.cancel()
        with contextlib.suppress(BaseException):
            await (await task).cancel()
    pending_apply: dict[str, bytes] = {}
    fell_back: set[str] = set()

    def expected_id(exec_bits: bool) -> str:
        if exec_bits not in expected_ids:
            expected_ids[exec_bits] = snapshot.manifest.content_id(exec_bits=exec_bits)
        return expected_ids[exec_bits]

    async def full_sync(host: str, timeout: float) -> object:
        fell_back.add(host)
        return await syncer.sync(host, force=False, timeout=timeout)

    async def sync(host: str, *, force: bool, timeout: float) -> object:
        if host in unreachable:
            state, reason = unreachable[host]
            if state is FenceHostState.TIMEOUT:
                raise TimeoutError(reason)
            raise RuntimeError(reason)
        if force:
            return await syncer.sync(host, force=True, timeout=timeout)
        task = early_sync.pop(host, None)
        if task is not None:
            return await task
        mode, change_set = plans[host]
        if mode == "full" or change_set is None:
            return await full_sync(host, timeout)
        if mode == "nothing":
            if host in prestarted:
                pending_apply[host] = _EMPTY_CHANGE_SET  # what the waiting command needs
            return None  # nothing differs from what was proven there; the digest checks
        if mode == "apply":
            # The digest command applies the change set first: one SSH exec does both.
            found = encoded[id(proven[host])]
            assert found is not None
            pending_apply[host] = found
            return None
        target = targets[host]
        try:
            return await rsync.sync_listed(
                target.alias,
                leader_root,
                target.workspace,
                ignores,
                change_set.paths,
                _step_timeout(timeout),
                list_dir=session_dir,
            )
        except RsyncError as exc:
            logger.debug("fence: listed sync to {} failed ({}); syncing it in full", host, exc)
            return await full_sync(host, remaining())

    async def digest(host: str, *, with_manifest: bool, timeout: float) -> RemoteDigest:
        change_set = pending_apply.pop(host, None)
        started: FedCommand | None = None
        task = prestarted.pop(host, None) if change_set is not None else None
        if task is not None:
            try:
                started = await task
            except BaseException:
                task.cancel()
                with contextlib.suppress(BaseException):
                    await (await task).cancel()
                raise
        try:
            found = await digester.digest(
                host,
                with_manifest=with_manifest,
                timeout=timeout,
                change_set=change_set,
                started=started,
            )
        except RemoteCommandError as exc:
            if change_set is None or exc.returncode != _APPLY_FAILED:
                raise
            # The follower's tree is not the one proven there (a parent became a symlink,
            # a file is not writable...): sync it in full and digest again.
            logger.debug("fence: {} could not apply its change set ({}); full sync", host, exc)
            await full_sync(host, remaining())
            return await digester.digest(host, with_manifest=with_manifest, timeout=remaining())
        if (
            plans.get(host, ("full", None))[0] != "full"
            and host not in fell_back
            and not with_manifest
            and found.id != expected_id(found.exec_bits)
        ):
            # The follower changed since its last proof (a build wrote into the tree, another
            # workspace was fenced there...): sync it in full before the plan's forced resync.
            logger.debug("fence: {} differs from its last proof; syncing it in full", host)
            await full_sync(host, remaining())
            found = await digester.digest(host, with_manifest=False, timeout=remaining())
        return found

    def fix_up(hosts: Mapping[str, FenceHostResult]) -> dict[str, FenceHostResult]:
        """Unreachable hosts: their own state and reason, not "sync failed: ..."."""
        fixed = dict(hosts)
        for host, (state, reason) in unreachable.items():
            if host in fixed:
                fixed[host] = FenceHostResult(state=state, took_ms=fixed[host].took_ms,
                                              detail=reason)  # fmt: skip
        return fixed

    async def relay(event: FenceEvent) -> None:
        if isinstance(event, FenceResultEvent):
            event = msgspec.structs.replace(event, hosts=fix_up(event.hosts))
        await _emit_to(emit, event)

    try:
        metadata = await run_fence(
            snapshot,
            names,
            sync,
            digest,
            timeout,
            relay,
            session_id=session_id,
            deadline=deadline,
        )
    finally:
        await cancel_early()  # only tasks no host got to use are left
    metadata = msgspec.structs.replace(
        metadata, hosts=fix_up(metadata.hosts), took_ms=int((loop.time() - started) * 1000)
    )
    with contextlib.suppress(OSError):
        await storing  # update() writes it if this could not
    verified.update(snapshot, metadata.hosts, targets, ignores)
    return metadata


def fence_targets(links: FleetLinks, hosts: Iterable[str]) -> list[FenceTarget]:
    """The linked hosts among ``hosts`` as fence targets (alias, workspace, OS)."""
    from .dataplane import ssh_alias

    linked = set(links.linked)
    return [
        FenceTarget(name=h, alias=ssh_alias(h), workspace=links.workspace(h), os=links.os_of(h))
        for h in hosts
        if h in linked
    ]


async def fence_selected(
    ctx: _Configured,
    links: FleetLinks,
    hosts: Iterable[str | FollowerStatus] | None = None,
    *,
    timeout: float | None = None,
    emit: FenceEmit | None = None,
    engine: EngineName | None = None,
    cache_root: Path | None = None,
) -> FenceMetadata:
    """Fence ``hosts`` (default: every follower of ``links``) to the leader workspace
    ``links.leader_root`` and return every host's verdict (see the module docstring).

    ``timeout``: seconds (default config ``timeouts.fence``, else 120). Hosts the links
    could not reach are in the result as ``timeout`` (connect timeout) or ``error``.
    ``engine``: default config ``sync-engine`` (:func:`configured_engine`); ``cache_root``: default
    :func:`user_cache_dir`. Warm digest sessions are used and kept when the links keep them
    (:func:`keep_digest_sessions`). Never raises for a host's failure: check
    ``metadata.lagging_hosts()`` or use :func:`ah_mutagen_project.require_consistent`.
    """
    config = ctx.config.typed
    names = [h.info.name if isinstance(h, FollowerStatus) else h for h in (hosts or links.names)]
    if not names:
        raise ValueError("fence: no hosts to fence (an empty selection is an error)")
    if engine is None:
        engine = configured_engine(ctx.config)
    limit = fence_timeout_s(config, timeout)
    try:
        ignores = user_ignores(config.sync_ignores)
    except IgnorePatternError as exc:
        raise CliError(
            ExitCode.CONFIGURATION,
            f"{ctx.config.where('sync-ignores')}: {exc}",
            kind="configuration",
            details={"key": "sync-ignores"},
        ) from None
    leader_root = Path(links.leader_root)
    cache = workspace_cache_dir(leader_root, cache_root)
    unreachable: dict[str, tuple[FenceHostState, str]] = {}
    for name in names:
        if name in links.linked:
            continue
        failure = links.unreachable.get(name)
        if failure is None:
            unreachable[name] = (FenceHostState.ERROR, f"{name} is not part of this selection")
        elif failure.kind == "timeout":
            unreachable[name] = (FenceHostState.TIMEOUT, f"unreachable: {failure.reason}")
        else:
            unreachable[name] = (FenceHostState.ERROR, f"unreachable: {failure.reason}")
    targets = fence_targets(links, names)
    # The config file goes when the fence ends; warm sessions' ssh processes read it at start.
    with tempfile.TemporaryDirectory(prefix="ssh-", dir=cache) as scratch:
        ssh_config = links.ssh_config(Path(scratch) / "ssh_config")
        return await fence_workspace(
            leader_root,
            targets,
            ssh_config=ssh_config,
            ignores=ignores,
            timeout=limit,
            emit=emit,
            session_id=config.session or "local",
            cache_dir=cache,
            engine=engine,
            unreachable=unreachable,
            sessions=links.digest_sessions,
        )
