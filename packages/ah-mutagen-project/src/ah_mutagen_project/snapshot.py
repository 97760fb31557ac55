"""Leader snapshots: the content id of a workspace minus ignores, with a persistent stat cache.

The walk, the ignore rule and the id are :mod:`ah_mutagen_project.digest_script` — the same
code the followers run — so a leader snapshot id and a follower digest of the same tree are
equal by construction. What this module adds is the stat cache and the manifest types.

Stat cache
----------
A file's SHA-256 is reused when its ``(relative path, size, mtime_ns, inode, ctime_ns)`` equal
those recorded when it was last hashed. The cache is the followers' one
(``digest_script.StatCache``: a marshal file at ``cache_path``, written atomically, holding only
files seen in the latest scan, rewritten only when that changed); a missing, unreadable or
foreign cache (another root, another format) just means hashing everything again. A process
that snapshots the same workspace again keeps the rows in memory and skips reading the file
while it is unchanged.

The racy-mtime problem: a file modified twice within one timestamp tick (1 ns on ext4, 10 ms
to 2 s on other filesystems; the kernel also stamps from a coarse clock) keeps the same mtime,
and if the first version had been cached, the second would be trusted wrongly. So a hash is
only *stored* when both the file's mtime and ctime are at least ``racy_window_s`` (2 s, the
coarsest common granularity: FAT) older than the moment the scan started; younger files are
hashed on every scan until they settle. A modification after the cached hash always lands in
a later tick than the recorded one, so it changes the key. A file that changes while being
read (its stat differs before and after) is not cached either.
"""

from __future__ import annotations

import enum
import gc
import os
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TypeAlias

import msgspec

from ah_mutagen_project import digest_script
from ah_mutagen_project.ignores import user_ignores

__all__ = [
    "RACY_WINDOW_S",
    "EntryKind",
    "LiveSnapshots",
    "Manifest",
    "ManifestDiff",
    "ManifestEntry",
    "Snapshot",
    "SnapshotError",
    "take_snapshot",
]

RACY_WINDOW_S = 2.0
"""Files whose mtime or ctime is younger than this at scan start are hashed, never cached."""


class SnapshotError(OSError):
    """The workspace could not be read (the message names the path)."""


class EntryKind(enum.StrEnum):
    FILE = digest_script.KIND_FILE
    DIRECTORY = digest_script.KIND_DIR
    SYMLINK = digest_script.KIND_LINK


class ManifestEntry(msgspec.Struct, frozen=True, array_like=True, gc=False):
    """One entry; encoded as ``[path, kind, executable, size, data]`` like the digest JSON.
    (``gc=False``: only strings and numbers inside, so never in a cycle, and the garbage
    collector need not walk a workspace's worth of them.)"""

    path: str
    """Relative, ``/``-separated."""
    kind: EntryKind
    executable: bool
    """Owner-executable bit (files only)."""
    size: int
    data: str
    """SHA-256 hex (files), link target (symlinks), empty (directories)."""

    def as_tuple(self) -> tuple[str, str, int, int, str]:
        return (self.path, self.kind.value, int(self.executable), self.size, self.data)


class ManifestDiff(msgspec.Struct, frozen=True):
    """Paths by which two manifests differ, each tuple sorted.

    For ``expected.diff(actual)``: ``added`` are only in ``actual``, ``removed`` only in
    ``expected``, ``changed`` in both with a different kind, content, size, executable bit or
    link target.
    """

    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    changed: tuple[str, ...] = ()

    @property
    def empty(self) -> bool:
        return not (self.added or self.removed or self.changed)

    def paths(self) -> list[str]:
        """Every differing path, sorted."""
        return sorted({*self.added, *self.removed, *self.changed})

    def describe(self, limit: int = 10) -> str:
        """``missing: a, b; unexpected: c; differs: d (+3 more)`` — at most ``limit`` paths
        per group, from the point of view of ``expected`` (the leader)."""
        parts: list[str] = []
        for label, paths in (
            ("missing", self.removed),
            ("unexpected", self.added),
            ("differs", self.changed),
        ):
            if paths:
                shown = ", ".join(paths[:limit])
                more = f" (+{len(paths) - limit} more)" if len(paths) > limit else ""
                parts.append(f"{label}: {shown}{more}")
        return "; ".join(parts) or "no differences"


class Manifest(msgspec.Struct, frozen=True):
    """The entries of a tree, sorted by path bytes (see ``digest_script``)."""

    entries: tuple[ManifestEntry, ...]

    @classmethod
    def from_tuples(cls, rows: Iterable[Sequence[object]]) -> Manifest:
        """Build from ``[path, kind, executable, size, data]`` rows (the digest JSON).

        Raises:
            ValueError: naming the first malformed row.
        """
        entries: list[ManifestEntry] = []
        for index, row in enumerate(rows):
            if len(row) != 5:
                raise ValueError(f"manifest row {index}: expected 5 fields, got {row!r}")
            path, kind, executable, size, data = row
            if not (
                isinstance(path, str)
                and isinstance(kind, str)
                and isinstance(executable, int)
                and isinstance(size, int)
                and isinstance(data, str)
            ):
                raise ValueError(f"manifest row {index}: wrong field types in {row!r}")
            try:
                entry_kind = EntryKind(kind)
            except ValueError:
                raise ValueError(
                    f"manifest row {index}: unknown kind {kind!r} for {path!r}; "
                    f"expected one of {[k.value for k in EntryKind]}"
                ) from None
            entries.append(ManifestEntry(path, entry_kind, bool(executable), size, data))
        entries.sort(key=lambda e: digest_script.path_bytes(e.path))
        return cls(tuple(entries))

    def content_id(self, *, exec_bits: bool = True) -> str:
        """The ``snap-…`` id; ``exec_bits=False`` for followers without executable bits."""
        return digest_script.content_id((e.as_tuple() for e in self.entries), exec_bits)

    def by_path(self) -> dict[str, ManifestEntry]:
        return {e.path: e for e in self.entries}

    def diff(self, other: Manifest, *, exec_bits: bool = True) -> ManifestDiff:
        """How ``other`` differs from this manifest (see :class:`ManifestDiff`)."""
        mine = self.by_path()
        theirs = other.by_path()

        def key(entry: ManifestEntry) -> tuple[object, ...]:
            executable = entry.executable if exec_bits else False
            return (entry.kind, executable, entry.size, entry.data)

        return ManifestDiff(
            added=tuple(sorted(theirs.keys() - mine.keys())),
            removed=tuple(sorted(mine.keys() - theirs.keys())),
            changed=tuple(
                sorted(p for p in mine.keys() & theirs.keys() if key(mine[p]) != key(theirs[p]))
            ),
        )


class Snapshot(msgspec.Struct, frozen=True):
    """A leader snapshot: the content id, the manifest, and what the stat cache saved."""

    id: str
    root: str
    ignores: tuple[str, ...]
    """The sync-ignores it was taken with (VCS metadata is implied)."""
    manifest: Manifest
    files_hashed: int
    """Files whose content was read and hashed in this scan."""
    files_cached: int
    """Files whose hash came from the stat cache."""
    took_s: float


_CacheRows: TypeAlias = dict[str, tuple[tuple[int, int, int, int], str]]

_warm: dict[tuple[str, str], tuple[tuple[int, int, int], _CacheRows]] = {}
"""(Cache file, root) → (its size, mtime and inode when last read or written by this process, its
rows): a leader process that fences again (an agent, a benchmark) skips reading the cache
when the file is still the one it knows."""


def _file_signature(path: Path) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_size, st.st_mtime_ns, st.st_ino)


def take_snapshot(
    root: str | os.PathLike[str],
    ignores: Sequence[str] | None = None,
    *,
    cache_path: Path | None = None,
    racy_window_s: float = RACY_WINDOW_S,
    clock: Callable[[], float] = time.time,
) -> Snapshot:
    """Snapshot the tree at ``root`` minus ``ignores`` (``None``: the default sync-ignores).

    ``cache_path`` enables the persistent stat cache; ``clock`` (wall-clock seconds) is what
    the racy window is measured against.

    Raises:
        SnapshotError: the root is not a directory, or an entry could not be read.
        IgnorePatternError: an ignore pattern is outside the supported syntax.
    """
    started = time.monotonic()
    root_text = os.path.abspath(os.fspath(root))
    patterns = user_ignores(ignores)
    rules = digest_script.IgnoreRules(patterns)
    cache_file = str(cache_path) if cache_path is not None else None
    preloaded: _CacheRows | None = None
    if cache_path is not None:
        signature = _file_signature(cache_path)
        memo = _warm.get((str(cache_path), root_text))
        if memo is not None and signature is not None and memo[0] == signature:
            preloaded = memo[1]
    # Only files that were already quiet for the whole window before the scan began may be
    # cached (see the module docstring).
    cache = digest_script.StatCache(
        cache_file, root_text, racy_window_s=racy_window_s, now=clock(), preloaded=preloaded
    )
    # The scan allocates an entry tuple and a manifest struct per file and no cycles: keep
    # the collector from walking them (and the rest of a big process) again and again.
    collecting = gc.isenabled()
    gc.disable()
    try:
        rows = digest_script.scan_tree(root_text, rules, cache=cache)
    except digest_script.TreeError as exc:
        raise SnapshotError(str(exc)) from exc
    finally:
        if collecting:
            gc.enable()
    if cache_path is not None:
        cache.save()
        signature = _file_signature(cache_path)
        if signature is not None:
            _warm[(str(cache_path), root_text)] = (signature, cache.new)
    kinds = {kind.value: kind for kind in EntryKind}
    manifest = Manifest(tuple([ManifestEntry(p, kinds[k], x == 1, s, d) for p, k, x, s, d in rows]))
    return Snapshot(
        id=digest_script.content_id(rows, presorted=True),
        root=root_text,
        ignores=patterns,
        manifest=manifest,
        files_hashed=cache.hashed,
        files_cached=cache.cached,
        took_s=time.monotonic() - started,
    )


class LiveSnapshots:
    """Snapshots of one workspace for a process that takes them again and again (a benchmark,
    an agent): the tree is kept in memory by ``digest_script.LiveTree`` — the followers'
    warm digest server's code — so a snapshot re-reads only what inotify events named (a
    full stat walk where inotify is unavailable or overflowed; see ``LiveTree`` for what
    inotify cannot see). Entries unchanged since the last snapshot are the same
    :class:`ManifestEntry` objects, and an unchanged tree gives the same :class:`Manifest`.

    The stat cache file (``cache_path``) seeds the first walk and is written back by
    :meth:`save` (at most every ``save_every_s`` seconds from :meth:`snapshot`, and on
    :meth:`close`). Thread-safe: one snapshot at a time."""

    def __init__(
        self,
        root: str | os.PathLike[str],
        ignores: Sequence[str] | None = None,
        *,
        cache_path: Path | None = None,
        watch: bool = True,
        save_every_s: float = 30.0,
        racy_window_s: float = RACY_WINDOW_S,
    ) -> None:
        self.root = os.path.abspath(os.fspath(root))
        self.ignores = user_ignores(ignores)
        self.tree = digest_script.LiveTree(
            self.root,
            digest_script.IgnoreRules(self.ignores),
            cache_path=str(cache_path) if cache_path is not None else None,
            watch=watch,
            racy_window_s=racy_window_s,
        )
        self.save_every_s = save_every_s
        self._lock = threading.Lock()
        self._made: dict[str, tuple[digest_script.Entry, ManifestEntry]] = {}
        self._last: Snapshot | None = None
        self._saved_at = time.monotonic()

    @property
    def mode(self) -> str:
        """``inotify`` or ``walk`` (:attr:`reason` says why)."""
        return self.tree.mode

    @property
    def reason(self) -> str:
        return self.tree.reason

    def snapshot(self) -> Snapshot:
        """The workspace as it is now.

        Raises:
            SnapshotError: the root is not a directory, or an entry could not be read.
        """
        with self._lock:
            started = time.monotonic()
            tree = self.tree
            tree.hashed = 0
            try:
                tree.refresh()
            except digest_script.TreeError as exc:
                raise SnapshotError(str(exc)) from exc
            tree_id = tree.content_id()
            last = self._last
            if last is not None and last.id == tree_id:
                manifest = last.manifest
            else:
                manifest = Manifest(tuple(self._entries(tree.manifest())))
            files = len(tree.rows)
            snapshot = Snapshot(
                id=tree_id,
                root=self.root,
                ignores=self.ignores,
                manifest=manifest,
                files_hashed=tree.hashed,
                files_cached=max(0, files - tree.hashed),
                took_s=time.monotonic() - started,
            )
            self._last = snapshot
            if time.monotonic() - self._saved_at > self.save_every_s:
                tree.save()
                self._saved_at = time.monotonic()
            return snapshot

    def _entries(self, rows: list[digest_script.Entry]) -> list[ManifestEntry]:
        made = self._made
        kinds = {kind.value: kind for kind in EntryKind}
        entries: list[ManifestEntry] = []
        fresh: dict[str, tuple[digest_script.Entry, ManifestEntry]] = {}
        for row in rows:
            known = made.get(row[0])
            if known is None or known[0] is not row:
                path, kind, executable, size, data = row
                known = (row, ManifestEntry(path, kinds[kind], executable == 1, size, data))
            fresh[row[0]] = known
            entries.append(known[1])
        self._made = fresh
        return entries

    def save(self) -> None:
        """Write the stat cache now (when it changed)."""
        with self._lock:
            self.tree.save()
            self._saved_at = time.monotonic()

    def close(self) -> None:
        """Save the stat cache and stop watching (idempotent)."""
        with self._lock:
            self.tree.save()
            self.tree.close()
