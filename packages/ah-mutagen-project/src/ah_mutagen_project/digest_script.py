"""ah-tree-digest: the content id of a directory tree minus ignored paths.

This one file is the whole algorithm, shared by the leader (``ah_mutagen_project.snapshot``
imports it and adds a stat cache) and the followers, which run it either as the
``ah-tree-digest`` console script or, where nothing is installed, by piping this very source
into ``python3 -`` over SSH (``remote_digest_command``). It therefore imports only the standard
library and runs on Python 3.6 and later (RHEL 8's platform python): annotations that use
newer syntax are strings, never evaluated.

Usage: ``python3 digest_script.py --root DIR [--ignore PATTERN]... [--json] [--no-exec-bit]
[--cache auto|FILE] [--apply FILE|-]``

With ``--apply`` the command first applies a change set the leader sends (the files that
differ from what this host last proved it held; see :func:`apply_changes`) and then digests
the tree as always: the id it prints is still this host's own reading of its whole tree.

The tree
--------
Walked with ``os.scandir``; symlinks are never followed. Entries are regular files (relative
path, owner-executable bit, size, SHA-256 of the content), directories, and symlinks (the
target string as stored, not resolved). Anything else (FIFOs, sockets, devices) is skipped, as
rsync without ``-D`` skips it. The root itself is not an entry. An entry that vanishes between
listing and reading is skipped (the tree is changing; the fence notices).

Ignores (the matching rule)
---------------------------
The VCS metadata names ``.git``, ``.hg``, ``.svn`` and ``.jj`` are always ignored, in addition
to the given patterns. A pattern is matched against each entry while walking; an ignored
directory is not entered, so nothing below it is seen.

* A pattern without ``/`` (``node_modules``, ``*.pyc``) matches an entry whose *name* matches,
  at any depth.
* A pattern with a ``/`` (``docs/build``, ``/out``, ``src/*/gen``) is anchored to the root and
  matches the entry's whole relative path, one path component per pattern component. A
  leading ``/`` only marks the anchoring.
* A trailing ``/`` (``build/``) restricts the pattern to directories (a symlink to a directory
  is not a directory here).
* Globs: ``*`` and ``?`` (never crossing ``/``), ``[seq]`` and ``[!seq]``; matching is
  case-sensitive. Not supported, and rejected: ``**``, negation (a leading ``!``),
  backslashes, ``[^seq]``, empty patterns and ``.``/``..`` components.

This is the subset on which rsync's ``--exclude`` and Mutagen's ignore syntax agree (Mutagen
likewise matches slash-free patterns against the base name and slashed ones against the whole
path), so the same list drives the snapshot, the digest, rsync and ``mutagen.yml``.

The content id
--------------
SHA-256 over a canonical manifest, rendered as ``snap-`` plus the first 32 hex digits. The
manifest is the format line ``ah-tree-digest/1`` (``ah-tree-digest/1 no-exec-bit`` when the
executable bits are left out, for followers whose filesystem has none), a newline, then for
each entry in the order of its path's UTF-8 bytes the five fields path, kind (``f``/``d``/
``l``), executable (``1``/``0``), size, and SHA-256 hex (files) or link target (symlinks),
each followed by a NUL byte. Paths are relative, ``/``-separated; names that are not valid
UTF-8 are hashed by their raw bytes.

The follower's stat cache (``--cache``)
---------------------------------------
A fence digests the follower's whole tree after every sync; without a cache that reads every
byte of it every time. With ``--cache FILE`` (``auto``: ``$XDG_CACHE_HOME`` or ``~/.cache``,
``%LOCALAPPDATA%`` on Windows, then ``agent-harbor/tree-digest/<sha256 of the root>.cache``) a
file's SHA-256 is reused when its ``(size, mtime_ns, inode, ctime_ns)`` equal those recorded
when it was hashed — the leader snapshot's rule, with its racy-mtime guard: a hash is stored
only when the file's mtime and ctime were at least 2 s old when the scan started (rsync sets
the leader's mtime, but the ctime is the follower's own and always moves on a write, a chmod
or an ``mtime`` reset, so tampering cannot hide behind a restored mtime). The cache is a
``marshal`` file (ten times faster to load than JSON; it is the account's own, in its private
cache directory) written atomically; a missing, damaged or foreign one means hashing
everything, and failing to write it never fails the digest.
"""

# ruff: noqa: UP037  (quoted annotations keep this file importable on Python 3.6)

# Start-up matters: every fence runs this once per follower in a fresh interpreter. So only
# cheap modules at the top; argparse (with re, enum, gettext), json and fnmatch are imported
# where needed, and TYPE_CHECKING is a constant rather than an import of typing.
import gc
import hashlib
import marshal
import os
import stat
import sys
import time
from operator import itemgetter

TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse
    from collections.abc import Callable, Iterable, Sequence
    from typing import BinaryIO

    Entry = tuple[str, str, int, int, str]
    """(path, kind, executable 0/1, size, sha256 hex or symlink target)."""

    FileDigester = Callable[[str, str, os.stat_result], str]
    """(absolute path, relative path, lstat result) -> SHA-256 hex of the content."""

__all__ = [
    "APPLY_FORMAT",
    "FORMAT",
    "FRAME_MAGIC",
    "ID_PREFIX",
    "KIND_DIR",
    "KIND_FILE",
    "KIND_LINK",
    "MAX_FRAME_BODY",
    "VCS_IGNORES",
    "ApplyError",
    "FrameDecoder",
    "FrameError",
    "IgnorePatternError",
    "IgnoreRules",
    "Inotify",
    "LiveTree",
    "StatCache",
    "TreeError",
    "apply_changes",
    "content_id",
    "default_cache_path",
    "encode_frame",
    "main",
    "scan_tree",
    "serve",
    "sha256_file",
]

FORMAT = "ah-tree-digest/1"
ID_PREFIX = "snap-"
ID_HEX_DIGITS = 32
VCS_IGNORES = (".git", ".hg", ".svn", ".jj")
KIND_FILE = "f"
KIND_DIR = "d"
KIND_LINK = "l"

CACHE_FORMAT = "ah-tree-digest-cache/2"
RACY_WINDOW_S = 2.0
VERIFY_EVERY_S = 60.0
"""A live tree (``--serve``, a warm leader) walks the whole tree at least this often, to
catch what inotify cannot see (see ``LiveTree``)."""
_GLOB_CHARS = frozenset("*?[")
_CHUNK = 1 << 20


class IgnorePatternError(ValueError):
    """An ignore pattern outside the supported syntax (the message names it and why)."""


class TreeError(OSError):
    """The tree could not be read (the message names the path)."""


def _has_glob(text: str) -> bool:
    return any(c in _GLOB_CHARS for c in text)


def _check_component(pattern: str, component: str) -> None:
    if component in ("", ".", ".."):
        raise IgnorePatternError(
            f"ignore pattern {pattern!r}: empty, '.' or '..' path component; "
            "expected names or globs separated by single '/'"
        )
    if "**" in component:
        raise IgnorePatternError(
            f"ignore pattern {pattern!r}: '**' is not supported; use a bare name to match "
            "at any depth, or one '*' per path component"
        )
    if "[^" in component:
        raise IgnorePatternError(
            f"ignore pattern {pattern!r}: '[^...]' is not supported; write '[!...]'"
        )


class IgnoreRules:
    """Compiled ignore patterns (see the module docstring for the matching rule)."""

    def __init__(self, patterns: "Iterable[str]", *, vcs: bool = True) -> None:
        ordered: "list[str]" = []
        for pattern in [*(VCS_IGNORES if vcs else ()), *patterns]:
            if pattern not in ordered:
                ordered.append(pattern)
        self.patterns: "tuple[str, ...]" = tuple(ordered)
        self._leaf_names: "set[str]" = set()
        self._leaf_dir_names: "set[str]" = set()
        self._leaf_globs: "list[tuple[str, bool]]" = []
        self._anchored: "dict[int, list[tuple[tuple[str, ...], bool]]]" = {}
        for pattern in self.patterns:
            self._add(pattern)

    def _add(self, pattern: str) -> None:
        if not isinstance(pattern, str) or not pattern.strip():
            raise IgnorePatternError(f"ignore pattern {pattern!r}: must be a non-empty string")
        if pattern != pattern.strip():
            raise IgnorePatternError(
                f"ignore pattern {pattern!r}: leading or trailing whitespace is not allowed"
            )
        if pattern.startswith("!"):
            raise IgnorePatternError(
                f"ignore pattern {pattern!r}: negation ('!') is not supported; "
                "remove the pattern from the list instead"
            )
        if "\\" in pattern:
            raise IgnorePatternError(
                f"ignore pattern {pattern!r}: backslashes are not allowed; separate path "
                "components with '/'"
            )
        dir_only = pattern.endswith("/")
        body = pattern[:-1] if dir_only else pattern
        anchored = body.startswith("/") or "/" in body
        body = body[1:] if body.startswith("/") else body
        if not body:
            raise IgnorePatternError(
                f"ignore pattern {pattern!r}: matches the root itself; expected a name or path"
            )
        components = tuple(body.split("/"))
        for component in components:
            _check_component(pattern, component)
        if anchored:
            self._anchored.setdefault(len(components), []).append((components, dir_only))
        elif _has_glob(body):
            self._leaf_globs.append((body, dir_only))
        elif dir_only:
            self._leaf_dir_names.add(body)
        else:
            self._leaf_names.add(body)

    @property
    def names_only(self) -> "frozenset[str] | None":
        """The ignored names when every pattern is a plain name (the default list), so that
        a set lookup decides for files and directories alike; None otherwise."""
        if self._leaf_dir_names or self._leaf_globs or self._anchored:
            return None
        return frozenset(self._leaf_names)

    def matches(self, rel_path: str, name: str, is_dir: bool) -> bool:
        """True if the entry at ``rel_path`` (``/``-separated, last component ``name``) is ignored."""
        if name in self._leaf_names or (is_dir and name in self._leaf_dir_names):
            return True
        for glob, dir_only in self._leaf_globs:
            if (is_dir or not dir_only) and _fnmatchcase(name, glob):
                return True
        if self._anchored:
            parts = rel_path.split("/")
            for components, dir_only in self._anchored.get(len(parts), ()):
                if dir_only and not is_dir:
                    continue
                if all(
                    _fnmatchcase(part, comp) if _has_glob(comp) else part == comp
                    # Equal lengths by construction; no strict= (this file must run on Python 3.6).
                    for part, comp in zip(parts, components)  # noqa: B905
                ):
                    return True
        return False


def _fnmatchcase(name: str, pattern: str) -> bool:
    import fnmatch  # only for glob patterns (the default ignores are plain names)

    return fnmatch.fnmatchcase(name, pattern)


def sha256_file(path: str) -> str:
    """SHA-256 hex of a file's content."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while True:
            chunk = handle.read(_CHUNK)
            if not chunk:
                break
            digest.update(chunk)
    return digest.hexdigest()


def _default_digester(abs_path: str, rel_path: str, st: os.stat_result) -> str:
    return sha256_file(abs_path)


def path_bytes(path: str) -> bytes:
    """The bytes a path is hashed and sorted by (raw bytes for names that are not UTF-8)."""
    try:
        return path.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        # Windows names can hold lone UTF-16 surrogates, which surrogateescape rejects.
        return path.encode("utf-8", "surrogatepass")


def _sort_by_path_bytes(entries: "list[Entry]") -> None:
    """Sort in place by the paths' UTF-8 bytes. For valid Unicode that is code point order,
    i.e. plain ``str`` order (paths are unique, so tuples compare by path alone); names that
    are not UTF-8 (surrogate escapes) need the byte key."""
    try:
        "".join([entry[0] for entry in entries]).encode("utf-8")
    except UnicodeEncodeError:
        entries.sort(key=lambda entry: path_bytes(entry[0]))
    else:
        entries.sort()


def scan_tree(
    root: str,
    rules: "IgnoreRules",
    file_digest: "FileDigester | None" = None,
    cache: "StatCache | None" = None,
) -> "list[Entry]":
    """Every entry under ``root`` not ignored by ``rules``, sorted by path bytes.

    File contents are hashed by ``file_digest`` (default: read and hash), or with ``cache``
    looked up in that stat cache first (inline, no call per file on a hit).

    Raises:
        TreeError: ``root`` is not a directory, or a directory or file could not be read.
    """
    # The loop runs once per entry of trees with tens of thousands of them, on the leader
    # and on every follower for every fence: keep it free of avoidable calls.
    digester = file_digest or _default_digester
    known = cache.old if cache is not None else None
    fresh = cache.new if cache is not None else None
    miss = cache.miss if cache is not None else None
    settled = cache.settled_ns if cache is not None else 0
    hits = 0
    if not os.path.isdir(root):
        raise TreeError(f"tree root {root!r} is not a directory (or does not exist)")
    names_only = rules.names_only
    matches = rules.matches
    is_regular = stat.S_ISREG
    exec_mask = stat.S_IXUSR
    entries: "list[Entry]" = []
    append = entries.append
    pending: "list[tuple[str, str]]" = [(root, "")]
    while pending:
        directory, prefix = pending.pop()
        try:
            with os.scandir(directory) as listing:
                children = list(listing)
        except FileNotFoundError:
            if prefix:
                continue  # removed while we walked
            raise TreeError(f"tree root {root!r} vanished while being read") from None
        except OSError as exc:
            raise TreeError(f"cannot list directory {directory!r}: {exc.strerror or exc}") from exc
        for child in children:
            name = child.name
            if names_only is not None and name in names_only:
                continue
            rel = prefix + name
            try:
                # Regular files first: most entries are, and d_type answers without a call.
                if child.is_file(follow_symlinks=False):
                    if names_only is None and matches(rel, name, False):
                        continue
                    st = child.stat(follow_symlinks=False)
                    mode = st.st_mode
                    if not is_regular(mode):
                        continue
                    if known is not None:
                        size = st.st_size
                        mtime = st.st_mtime_ns
                        ctime = st.st_ctime_ns
                        key = (size, mtime, st.st_ino, ctime)
                        row = known.get(rel)
                        if (
                            row is not None
                            and row[0] == key
                            and (mtime if mtime > ctime else ctime) <= settled
                        ):
                            fresh[rel] = row  # type: ignore[index]
                            hits += 1
                            sha = row[1]
                        else:
                            sha = miss(child.path, rel, st, key, row)  # type: ignore[misc]
                    else:
                        size = st.st_size
                        sha = digester(child.path, rel, st)
                    append((rel, KIND_FILE, 1 if mode & exec_mask else 0, size, sha))
                elif child.is_dir(follow_symlinks=False):
                    if names_only is None and matches(rel, name, True):
                        continue
                    append((rel, KIND_DIR, 0, 0, ""))
                    pending.append((child.path, rel + "/"))
                elif child.is_symlink():
                    if names_only is None and matches(rel, name, False):
                        continue
                    append((rel, KIND_LINK, 0, 0, os.readlink(child.path)))
            except FileNotFoundError:
                continue  # vanished between listing and reading
            except OSError as exc:
                raise TreeError(f"cannot read {child.path!r}: {exc.strerror or exc}") from exc
    if cache is not None:
        cache.cached += hits
    _sort_by_path_bytes(entries)
    return entries


def default_cache_path(root: str) -> str:
    """Where ``--cache auto`` keeps the stat cache of ``root`` (see the module docstring)."""
    if os.name == "nt":
        base = os.environ.get("LOCALAPPDATA") or os.path.join(
            os.path.expanduser("~"), "AppData", "Local"
        )
        base = os.path.join(base, "agent-harbor", "cache")
    else:
        xdg = os.environ.get("XDG_CACHE_HOME", "")
        base = xdg if os.path.isabs(xdg) else os.path.join(os.path.expanduser("~"), ".cache")
        base = os.path.join(base, "agent-harbor")
    key = hashlib.sha256(path_bytes(os.path.abspath(root))).hexdigest()[:24]
    return os.path.join(base, "tree-digest", key + ".cache")


class StatCache:
    """Reuses file hashes across digests of one tree (see "The follower's stat cache").

    Rows are ``{relative path: ((size, mtime_ns, inode, ctime_ns), sha256 hex)}``; a row is
    stored only when its file's mtime and ctime were older than ``racy_window_s`` when the
    scan started (``now``, default the current time), and when the file did not change
    while being hashed. ``preloaded``: rows already in memory (a warm leader process), used
    instead of reading ``path``."""

    def __init__(
        self,
        path: "str | None",
        root: str,
        racy_window_s: float = RACY_WINDOW_S,
        now: "float | None" = None,
        preloaded: "dict[str, tuple[tuple[int, int, int, int], str]] | None" = None,
    ) -> None:
        self.path = path
        self.root = os.path.abspath(root)
        self.settled_ns = int(((time.time() if now is None else now) - racy_window_s) * 1e9)
        self.old: "dict[str, tuple[tuple[int, int, int, int], str]]" = {}
        self.new: "dict[str, tuple[tuple[int, int, int, int], str]]" = {}
        self.hashed = 0
        self.cached = 0
        if preloaded is not None:
            self.old = preloaded
        elif path is not None:
            self.old = _read_cache(path, self.root)

    def miss(
        self,
        abs_path: str,
        rel_path: str,
        st: os.stat_result,
        key: "tuple[int, int, int, int]",
        cached: "tuple[tuple[int, int, int, int], str] | None",
    ) -> str:
        """Hash a file whose row is missing or stale, and store a row when it may be."""
        digest = sha256_file(abs_path)
        self.hashed += 1
        if (key[1] if key[1] > key[3] else key[3]) <= self.settled_ns:
            after = os.stat(abs_path, follow_symlinks=False)
            if (after.st_size, after.st_mtime_ns, after.st_ino, after.st_ctime_ns) == key:
                self.new[rel_path] = (key, digest)
                return digest
        if cached is not None:
            # Keep the old row (its key no longer matches, so it is never used): a file
            # that is still too young to cache then does not rewrite the whole cache.
            self.new[rel_path] = cached
        return digest

    def digest(self, abs_path: str, rel_path: str, st: os.stat_result) -> str:
        """The ``file_digest`` form of the cache, for :func:`scan_tree` callers that pass
        one (``scan_tree(..., cache=...)`` does the same inline)."""
        key = (st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns)
        cached = self.old.get(rel_path)
        if cached is not None and cached[0] == key and max(key[1], key[3]) <= self.settled_ns:
            self.cached += 1
            self.new[rel_path] = cached
            return cached[1]
        return self.miss(abs_path, rel_path, st, key, cached)

    @property
    def changed(self) -> bool:
        return self.new != self.old

    def save(self) -> bool:
        """Write the cache when it changed; an unwritable cache only costs speed. Returns
        whether it was written."""
        if self.path is None or not self.changed:
            return False
        directory = os.path.dirname(self.path)
        tmp = f"{self.path}.{os.getpid()}.tmp"
        try:
            os.makedirs(directory, exist_ok=True)
            with open(tmp, "wb") as handle:
                handle.write(marshal.dumps((CACHE_FORMAT, self.root, self.new)))
            os.replace(tmp, self.path)
        except OSError:
            try:  # noqa: SIM105  (contextlib costs start-up)
                os.unlink(tmp)
            except OSError:
                pass
            return False
        return True


def _read_cache(path: str, root: str) -> "dict[str, tuple[tuple[int, int, int, int], str]]":
    """The rows of the cache at ``path`` for ``root``; {} when it is missing, damaged or
    foreign. (marshal: ten times faster to load than JSON; the file is the account's own,
    in its private cache directory, and nothing else writes it.)"""
    try:
        with open(path, "rb") as handle:
            document = marshal.loads(handle.read())
        fmt, cached_root, files = document
        if fmt != CACHE_FORMAT or cached_root != root or type(files) is not dict:
            return {}
        # Whole-document shape checks at C speed; any odd row discards the cache.
        rows = files.values()
        keys = list(map(itemgetter(0), rows)) if set(map(type, rows)) <= {tuple} else None
        if (
            keys is None
            or not set(map(len, rows)) <= {2}
            or not set(map(type, map(itemgetter(1), rows))) <= {str}
            or not set(map(type, keys)) <= {tuple}
            or not set(map(len, keys)) <= {4}
        ):
            return {}
        return files
    except Exception:  # missing, truncated, another format: hash everything
        return {}


APPLY_FORMAT = "ah-tree-apply/1"


class ApplyError(OSError):
    """A change set could not be applied (the message names the path and why)."""


def _remove(path: str) -> None:
    """Remove whatever is at ``path`` (a directory with everything in it); absent is fine."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(path)
        return
    with os.scandir(path) as listing:
        children = list(listing)
    for child in children:
        if child.is_dir(follow_symlinks=False):
            _remove(child.path)
        else:
            try:  # noqa: SIM105  (contextlib costs start-up)
                os.unlink(child.path)
            except FileNotFoundError:
                pass
    os.rmdir(path)


def _checked_relative(rel: object) -> str:
    if not isinstance(rel, str) or not rel or rel.startswith("/"):
        raise ApplyError(f"change set names a bad path {rel!r}")
    for part in rel.split("/"):
        if part in ("", ".", ".."):
            raise ApplyError(f"change set names a bad path {rel!r}")
    return rel


def apply_changes(root: str, stream: "BinaryIO") -> int:
    """Apply a change set (the leader's ``ah_mutagen_project.incremental`` writes it) to the
    tree at ``root``; returns how many changes were applied.

    The stream is the line ``ah-tree-apply/1``, one line of JSON — a list of changes, in
    path order — then the content of every file change, in the same order. Changes:
    ``["rm", path]`` removes what is there (a directory with its content), ``["d", path,
    mode]`` makes a directory, ``["f", path, mode, size, mtime_ns]`` a file with the next
    ``size`` bytes, ``["l", path, target]`` a symlink; each replaces whatever else was at the
    path. Files and links are written beside their destination and renamed over it. Every
    parent must be a real directory (never a symlink: nothing is written outside ``root``).

    Raises:
        ApplyError: malformed change set, a parent that is not a directory, a short stream.
        OSError: the filesystem refused a change.
    """
    root = os.path.abspath(root)
    if not os.path.isdir(root):
        raise ApplyError(f"tree root {root!r} is not a directory")
    if stream.readline() != APPLY_FORMAT.encode("ascii") + b"\n":
        raise ApplyError(f"change set does not start with {APPLY_FORMAT}")
    import json

    try:
        changes = json.loads(stream.readline().decode("utf-8"))
    except ValueError as exc:
        raise ApplyError(f"change set list is not JSON: {exc}") from None
    if not isinstance(changes, list):
        raise ApplyError("change set list is not a list")
    directories = {""}  # relative paths known to be real directories

    def parent_of(rel: str) -> str:
        parent = rel.rpartition("/")[0]
        if parent in directories:
            return os.path.join(root, parent) if parent else root
        parent_of(parent)
        st = os.lstat(os.path.join(root, parent)) if parent else None
        if st is None or not stat.S_ISDIR(st.st_mode):
            raise ApplyError(f"cannot apply below {parent!r}: not a directory on this host")
        directories.add(parent)
        return os.path.join(root, parent)

    for change in changes:
        if not isinstance(change, list) or not change:
            raise ApplyError(f"bad change {change!r}")
        kind, rel = change[0], _checked_relative(change[1] if len(change) > 1 else None)
        directory = parent_of(rel)
        path = os.path.join(directory, rel.rpartition("/")[2])
        if kind != "d" and (
            rel in directories or any(d.startswith(rel + "/") for d in directories)
        ):
            # No longer known to be a directory (whatever replaces it is checked again).
            directories.difference_update(
                [d for d in directories if d == rel or d.startswith(rel + "/")]
            )
        if kind == "rm" and len(change) == 2:
            _remove(path)
        elif kind == "d" and len(change) == 3:
            try:
                is_dir = stat.S_ISDIR(os.lstat(path).st_mode)
            except FileNotFoundError:
                is_dir = False
            if not is_dir:
                _remove(path)
                os.mkdir(path)
            os.chmod(path, int(change[2]) & 0o7777)
            directories.add(rel)
        elif kind == "f" and len(change) == 5:
            mode, size, mtime_ns = int(change[2]), int(change[3]), int(change[4])
            tmp = os.path.join(directory, f".ah-apply-{os.getpid()}.tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
            try:
                left = size
                while left:
                    chunk = stream.read(min(left, _CHUNK))
                    if not chunk:
                        raise ApplyError(f"change set ends inside the content of {rel!r}")
                    _write_all(fd, chunk)
                    left -= len(chunk)
                os.fchmod(fd, mode & 0o7777)
            except BaseException:
                os.close(fd)
                os.unlink(tmp)
                raise
            os.close(fd)
            os.utime(tmp, ns=(mtime_ns, mtime_ns))
            if os.path.isdir(path) and not os.path.islink(path):
                _remove(path)
            os.replace(tmp, path)
        elif kind == "l" and len(change) == 3 and isinstance(change[2], str):
            tmp = os.path.join(directory, f".ah-apply-{os.getpid()}.tmp")
            try:  # noqa: SIM105  (contextlib costs start-up)
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            os.symlink(change[2], tmp)
            if os.path.isdir(path) and not os.path.islink(path):
                _remove(path)
            os.replace(tmp, path)
        else:
            raise ApplyError(f"bad change {change!r}")
    return len(changes)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def content_id(entries: "Iterable[Entry]", exec_bits: bool = True, presorted: bool = False) -> str:
    """The ``snap-<hex>`` id of the canonical manifest of ``entries``, taken in the order of
    their paths' bytes (``presorted``: they already are, as :func:`scan_tree` returns them)."""
    rows = list(entries)
    if not presorted:
        _sort_by_path_bytes(rows)
    header = FORMAT if exec_bits else FORMAT + " no-exec-bit"
    digest = hashlib.sha256(header.encode("ascii") + b"\n")
    text = "".join(
        [
            f"{path}\0{kind}\0{'1' if executable and exec_bits else '0'}\0{size}\0{data}\0"
            for path, kind, executable, size, data in rows
        ]
    )
    try:
        # One encode for the whole manifest; equal to encoding field by field (path_bytes)
        # whenever no name needs surrogatepass.
        digest.update(text.encode("utf-8", "surrogateescape"))
    except UnicodeEncodeError:
        digest = hashlib.sha256(header.encode("ascii") + b"\n")
        for path, kind, executable, size, data in rows:
            exec_field = b"1" if (executable and exec_bits) else b"0"
            digest.update(
                b"\0".join(
                    (path_bytes(path), kind.encode("ascii"), exec_field,
                     str(size).encode("ascii"), path_bytes(data))
                )
                + b"\0"
            )  # fmt: skip
    return ID_PREFIX + digest.hexdigest()[:ID_HEX_DIGITS]


# --------------------------------------------------------------------------- warm sessions
#
# ``--serve`` keeps one digest process per follower alive across fences (the leader's
# ``ah_mutagen_project.digest_session``): it reads requests from its standard input and
# answers on its standard output, both in the frames below, and keeps what it knows of the
# tree in memory (:class:`LiveTree`) between requests.

FRAME_MAGIC = b"AH"
FRAME_HEADER = 7
"""``AH``, the kind (one ASCII capital letter), the body length (4 bytes, big-endian)."""
MAX_FRAME_BODY = 1 << 29
"""512 MiB: far above any change set the leader sends (16 MiB) or manifest it asks for."""
SERVE_FORMAT = "ah-tree-digest-serve/1"


class FrameError(ValueError):
    """The byte stream is not a sequence of frames (the message says what was found)."""


def encode_frame(kind: str, body: bytes) -> bytes:
    """One frame: ``AH`` + ``kind`` (a capital letter) + the body's length + the body."""
    if len(kind) != 1 or not ("A" <= kind <= "Z"):
        raise FrameError(f"frame kind {kind!r}: expected one capital letter")
    if len(body) > MAX_FRAME_BODY:
        raise FrameError(f"frame body of {len(body)} bytes exceeds {MAX_FRAME_BODY}")
    return FRAME_MAGIC + kind.encode("ascii") + len(body).to_bytes(4, "big") + bytes(body)


class FrameDecoder:
    """Splits a byte stream, fed in chunks of any size, into ``(kind, body)`` frames.

    After a :class:`FrameError` (anything that is not a frame: a login banner, a traceback,
    a length beyond ``max_body``) the decoder stays broken: every later :meth:`feed` raises
    the same error. Sans-I/O: both ends of a session use it."""

    def __init__(self, max_body: int = MAX_FRAME_BODY) -> None:
        self.max_body = max_body
        self._buffer = bytearray()
        self._error: "FrameError | None" = None

    @property
    def pending(self) -> int:
        """Bytes received that do not complete a frame yet."""
        return len(self._buffer)

    def feed(self, data: bytes) -> "list[tuple[str, bytes]]":
        """Add ``data``; return the frames it completes, in order.

        Raises:
            FrameError: the stream is not made of frames.
        """
        if self._error is not None:
            raise self._error
        self._buffer += data
        frames: "list[tuple[str, bytes]]" = []
        buffer = self._buffer
        offset = 0
        try:
            while True:
                available = len(buffer) - offset
                if not available:
                    break
                probe = bytes(buffer[offset : offset + min(available, 2)])
                if probe != FRAME_MAGIC[: len(probe)]:
                    raise FrameError(
                        f"expected a frame (b'AH'...), got {bytes(buffer[offset : offset + 40])!r}"
                    )
                if available < 3:
                    break
                kind = chr(buffer[offset + 2])
                if not ("A" <= kind <= "Z"):
                    raise FrameError(f"bad frame kind {bytes(buffer[offset + 2 : offset + 3])!r}")
                if available < FRAME_HEADER:
                    break
                size = int.from_bytes(buffer[offset + 3 : offset + FRAME_HEADER], "big")
                if size > self.max_body:
                    raise FrameError(
                        f"frame {kind!r} announces {size} bytes, more than {self.max_body}"
                    )
                if available < FRAME_HEADER + size:
                    break
                end = offset + FRAME_HEADER + size
                frames.append((kind, bytes(buffer[offset + FRAME_HEADER : end])))
                offset = end
        except FrameError as exc:
            self._error = exc
            self._buffer = bytearray()
            raise
        del buffer[:offset]
        return frames


_IN_MODIFY = 0x2
_IN_ATTRIB = 0x4
_IN_MOVED_FROM = 0x40
_IN_MOVED_TO = 0x80
_IN_CREATE = 0x100
_IN_DELETE = 0x200
_IN_DELETE_SELF = 0x400
_IN_MOVE_SELF = 0x800
_IN_UNMOUNT = 0x2000
_IN_Q_OVERFLOW = 0x4000
_IN_IGNORED = 0x8000
_IN_ONLYDIR = 0x1000000
_IN_DONT_FOLLOW = 0x2000000
_IN_NONBLOCK = 0o4000
_IN_CLOEXEC = 0o2000000
_IN_CLOSE_WRITE = 0x8
# IN_CLOSE_WRITE as well as IN_MODIFY: a writer that goes through a shared mmap (linkers do)
# raises no IN_MODIFY, but closing its descriptor afterwards does raise IN_CLOSE_WRITE.
_WATCH_MASK = (
    _IN_MODIFY | _IN_CLOSE_WRITE | _IN_ATTRIB | _IN_MOVED_FROM | _IN_MOVED_TO | _IN_CREATE | _IN_DELETE
    | _IN_DELETE_SELF | _IN_MOVE_SELF | _IN_ONLYDIR | _IN_DONT_FOLLOW
)  # fmt: skip
_NEW_NAME = _IN_CREATE | _IN_MOVED_TO
_ROOT_GONE = _IN_DELETE_SELF | _IN_MOVE_SELF | _IN_UNMOUNT | _IN_IGNORED
_LOCAL_FILESYSTEMS = frozenset(
    [
        "ext2",
        "ext3",
        "ext4",
        "xfs",
        "btrfs",
        "tmpfs",
        "ramfs",
        "f2fs",
        "bcachefs",
        "jfs",
        "reiserfs",
        "zfs",
        "overlay",
    ]
)
"""Filesystems whose every change is made by this kernel (so it queues the event). Network
and FUSE filesystems can change without one: there the full stat walk runs every time."""


class WatchError(OSError):
    """inotify is unusable here, or a directory could not be watched (reason in message)."""


def _filesystem_type(path: str) -> "str | None":
    """The type of the filesystem ``path`` is on, from ``/proc/self/mountinfo``."""
    try:
        with open("/proc/self/mountinfo", "rb") as handle:
            lines = handle.read().decode("utf-8", "surrogateescape").splitlines()
    except OSError:
        return None
    target = os.path.realpath(path)
    best, found = -1, None
    for line in lines:
        left, _, right = line.partition(" - ")
        fields = left.split()
        if len(fields) < 5 or not right:
            continue
        mount = fields[4]
        for escape, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
            mount = mount.replace(escape, char)
        inside = target == mount or target.startswith(mount.rstrip("/") + "/")
        if inside and len(mount) >= best:  # later mounts over the same point win
            best, found = len(mount), right.split()[0]
    return found


class Inotify:
    """inotify(7) through ctypes on the C library (Linux; no other dependency).

    :meth:`add` watches one directory (never following a symlink), :meth:`read` drains the
    queue without blocking. Raises :class:`WatchError` when inotify is unavailable."""

    def __init__(self) -> None:
        if not sys.platform.startswith("linux"):
            raise WatchError("inotify needs Linux")
        try:
            import ctypes
            import ctypes.util
        except ImportError as exc:  # a Python built without ctypes
            raise WatchError(f"no ctypes: {exc}") from None
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            self._init1 = libc.inotify_init1
            self._add = libc.inotify_add_watch
            self._rm = libc.inotify_rm_watch
        except (OSError, AttributeError) as exc:
            raise WatchError(f"no inotify in the C library: {exc}") from None
        self._ctypes = ctypes
        self._add.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
        self._rm.argtypes = [ctypes.c_int, ctypes.c_int]
        fd = self._init1(_IN_NONBLOCK | _IN_CLOEXEC)
        if fd < 0:
            errno = ctypes.get_errno()
            raise WatchError(f"inotify_init1: {os.strerror(errno)}")
        self.fd = fd
        import struct

        self._event = struct.Struct("iIII")

    def add(self, path: str) -> int:
        """Watch the directory ``path``; returns the watch descriptor (the same one when
        the directory, by inode, is watched already).

        Raises:
            WatchError: ENOSPC (``fs.inotify.max_user_watches`` reached) and the like;
                FileNotFoundError / NotADirectoryError when it is gone or not a directory.
        """
        wd = self._add(self.fd, path_bytes(path), _WATCH_MASK)
        if wd >= 0:
            return int(wd)
        errno = self._ctypes.get_errno()
        import errno as codes

        if errno == codes.ENOENT:
            raise FileNotFoundError(errno, os.strerror(errno), path)
        if errno == codes.ENOTDIR:
            raise NotADirectoryError(errno, os.strerror(errno), path)
        raise WatchError(f"cannot watch {path!r}: {os.strerror(errno)}")

    def remove(self, wd: int) -> None:
        self._rm(self.fd, wd)  # EINVAL for a watch the kernel dropped already: fine

    def read(self) -> "list[tuple[int, int, str]]":
        """Every queued event as ``(wd, mask, name)``, without blocking."""
        events: "list[tuple[int, int, str]]" = []
        unpack = self._event.unpack_from
        size = self._event.size
        while True:
            try:
                data = os.read(self.fd, 1 << 16)
            except BlockingIOError:
                return events
            offset = 0
            while offset + size <= len(data):
                wd, mask, _cookie, length = unpack(data, offset)
                raw = data[offset + size : offset + size + length].rstrip(b"\0")
                events.append((wd, mask, os.fsdecode(raw)))
                offset += size + length

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _render(entry: "Entry", exec_bits: bool) -> bytes:
    """An entry's bytes in the canonical manifest (see :func:`content_id`)."""
    path, kind, executable, size, data = entry
    exec_field = "1" if executable and exec_bits else "0"
    try:
        return f"{path}\0{kind}\0{exec_field}\0{size}\0{data}\0".encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return b"\0".join(
            (path_bytes(path), kind.encode("ascii"), exec_field.encode("ascii"),
             str(size).encode("ascii"), path_bytes(data), b"")
        )  # fmt: skip


class LiveTree:
    """A tree's entries kept in memory between digests (the ``--serve`` mode).

    Each :meth:`refresh` brings them up to date and :meth:`content_id` hashes the result —
    always the whole tree, as :func:`scan_tree` would see it now. How it learns what changed:

    * **inotify** (Linux, local filesystems): every directory of the tree that is not ignored
      is watched (the watch is added *before* the directory is listed, so an entry created
      meanwhile is either listed or reported). A refresh drains the queue and re-reads only
      the paths the events name; a new or moved-in directory is watched and scanned. Why
      that is the whole truth: the kernel queues an event inside the very system call that
      changes a directory entry, a file's content (``write``, ``truncate``) or its metadata
      (``chmod``, ``utime``), so a change made before the request reached us is in the queue
      when we drain it; a change made after that belongs to the next request.
      Known blind spots of inotify, closed here by stat-checking on every refresh: files
      with more than one hard link (written through a link outside a watched directory, no
      watch of ours sees it) — their rows follow the stat cache's rule every time. Not
      covered by events: writes through a shared ``mmap`` while the writer keeps the file
      open (no event until it closes it: ``IN_CLOSE_WRITE`` is watched). Those are bounded
      by the **verification walk**: when the last full walk is ``verify_every_s`` old (60 s),
      the next refresh is a full walk, and the ``--serve`` loop runs it ahead of time while
      idle (:meth:`verify`, which reports on stderr what the walk found that no event had
      announced). ``--no-inotify`` makes every refresh a full walk.
    * **full stat walk** with the in-memory rows as stat cache: everywhere else (no inotify,
      a network or FUSE filesystem, ``--no-inotify``) and whenever the events cannot be
      trusted: the queue overflowed (``IN_Q_OVERFLOW``), a watch could not be added (ENOSPC:
      ``fs.inotify.max_user_watches``), the root itself moved.

    Hashes are reused by the stat cache's rule: a file whose ``(size, mtime, inode, ctime)``
    equal those of its row, and whose row was hashed when both times were already
    ``racy_window_s`` old; any other file named by an event or met by a walk is read again.
    Each entry's manifest bytes are kept, so a digest after a small change hashes the
    joined rows without building them again.
    """

    CHECKPOINT_EVERY = 256
    """Entries per hashed chunk (see :meth:`content_id`)."""

    def __init__(
        self,
        root: str,
        rules: "IgnoreRules",
        exec_bits: bool = True,
        cache_path: "str | None" = None,
        watch: bool = True,
        racy_window_s: float = RACY_WINDOW_S,
        verify_every_s: float = VERIFY_EVERY_S,
    ) -> None:
        self.root = os.path.abspath(root)
        self.verify_every_s = verify_every_s
        self.walked_at: "float | None" = None
        """``time.monotonic()`` when the last full walk started."""
        self.rules = rules
        self.exec_bits = exec_bits
        self.racy_ns = int(racy_window_s * 1e9)
        self.cache_path = cache_path
        self.entries: "dict[str, Entry]" = {}
        self.rendered: "dict[str, bytes]" = {}
        self.rows: "dict[str, tuple[tuple[int, int, int, int], str, bool]]" = {}
        """Files: (stat key, sha256 hex, settled when hashed)."""
        self.linked: "set[str]" = set()
        """Files with more than one hard link: stat-checked on every refresh."""
        self.hashed = 0
        self.restatted = 0
        self.mode = "walk"
        self.reason = "" if watch else "--no-inotify"
        self._order: "list[str] | None" = None
        self._id: "str | None" = None
        self._full = True
        self._dirty: "dict[str, int]" = {}
        self._watcher: "Inotify | None" = None
        self._wd_dirs: "dict[int, str]" = {}
        self._dir_wds: "dict[str, int]" = {}
        self._unsaved = False
        self._previous: "dict[str, tuple[Entry, bytes]]" = {}
        self._index: "dict[str, int]" = {}
        self._checkpoints: "list[hashlib._Hash]" = []
        self._changed_from = 0
        if cache_path:
            loaded = _read_cache(cache_path, self.root)
            # Persisted rows were stored by the stat cache's rule: they count as settled.
            self.rows = {rel: (row[0], row[1], True) for rel, row in loaded.items()}
        if watch:
            fs_type = _filesystem_type(self.root)
            if fs_type not in _LOCAL_FILESYSTEMS:
                self.reason = f"filesystem {fs_type or 'unknown'} may change without events"
            else:
                try:
                    self._watcher = Inotify()
                    self.mode = "inotify"
                except WatchError as exc:
                    self.reason = str(exc)

    # -- the walk --------------------------------------------------------------------------

    def _stop_watching(self, reason: str) -> None:
        if self._watcher is not None:
            self._watcher.close()
            self._watcher = None
            self._wd_dirs.clear()
            self._dir_wds.clear()
        self.mode = "walk"
        self.reason = reason
        self._full = True

    def _watch(self, rel: str, path: str) -> None:
        watcher = self._watcher
        if watcher is None:
            return
        try:
            wd = watcher.add(path)
        except WatchError as exc:
            self._stop_watching(str(exc))
            return
        except (FileNotFoundError, NotADirectoryError):
            return  # gone meanwhile: listing it fails next and drops it
        self._wd_dirs[wd] = rel
        self._dir_wds[rel] = wd

    def _file(self, rel: str, path: str, st: "os.stat_result", now_ns: int) -> None:
        key = (st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns)
        row = self.rows.get(rel)
        if row is not None and row[0] == key and row[2]:
            sha = row[1]
        else:
            sha = sha256_file(path)
            self.hashed += 1
            settled = (key[1] if key[1] > key[3] else key[3]) <= now_ns - self.racy_ns
            if settled:
                after = os.lstat(path)
                settled = key == (after.st_size, after.st_mtime_ns, after.st_ino, after.st_ctime_ns)
            self.rows[rel] = (key, sha, settled)
            self._unsaved = True
        if st.st_nlink > 1:
            self.linked.add(rel)
        else:
            self.linked.discard(rel)
        self._set(rel, (rel, KIND_FILE, 1 if st.st_mode & stat.S_IXUSR else 0, st.st_size, sha))

    def _set(self, rel: str, entry: "Entry") -> None:
        if self.entries.get(rel) != entry:
            if rel not in self.entries:
                self._order = None
            elif self._order is not None:
                # Same paths: the hash is resumed from the checkpoint before this entry.
                index = self._index[rel]
                if index < self._changed_from:
                    self._changed_from = index
            previous = self._previous.get(rel)
            if previous is not None and previous[0] == entry:
                # A full walk met it unchanged: the same objects (cheap to compare later).
                self.entries[rel], self.rendered[rel] = previous
            else:
                self.entries[rel] = entry
                self.rendered[rel] = _render(entry, self.exec_bits)
            self._id = None

    def _drop(self, rel: str) -> None:
        """Forget ``rel`` and, if it was a directory, everything below it."""
        entry = self.entries.pop(rel, None)
        if entry is None:
            return
        del self.rendered[rel]
        self._order = None
        self._id = None
        self.linked.discard(rel)
        if self.rows.pop(rel, None) is not None:
            self._unsaved = True
        if entry[1] != KIND_DIR:
            return
        prefix = rel + "/"
        below = [p for p in self.entries if p.startswith(prefix)]
        for path in below:
            del self.entries[path]
            del self.rendered[path]
            self.linked.discard(path)
            self.rows.pop(path, None)
        self._unsaved = True
        for directory in [rel, *(d for d in self._dir_wds if d.startswith(prefix))]:
            wd = self._dir_wds.pop(directory, None)
            if wd is not None and self._wd_dirs.get(wd) == directory:
                del self._wd_dirs[wd]
                if self._watcher is not None:
                    self._watcher.remove(wd)

    def _scan(self, rel: str, now_ns: int) -> None:
        """(Re)read the directory ``rel`` ("" the root) and everything below it."""
        names_only = self.rules.names_only
        matches = self.rules.matches
        pending = [rel]
        while pending:
            directory = pending.pop()
            path = os.path.join(self.root, directory) if directory else self.root
            self._watch(directory, path)  # before listing: see the class docstring
            try:
                with os.scandir(path) as listing:
                    children = list(listing)
            except (FileNotFoundError, NotADirectoryError):
                if not directory:
                    raise TreeError(f"tree root {self.root!r} vanished while being read") from None
                self._drop(directory)
                continue
            except OSError as exc:
                raise TreeError(f"cannot list directory {path!r}: {exc.strerror or exc}") from exc
            prefix = directory + "/" if directory else ""
            for child in children:
                name = child.name
                if names_only is not None and name in names_only:
                    continue
                child_rel = prefix + name
                try:
                    if child.is_file(follow_symlinks=False):
                        if names_only is None and matches(child_rel, name, False):
                            continue
                        st = child.stat(follow_symlinks=False)
                        if stat.S_ISREG(st.st_mode):
                            self._file(child_rel, child.path, st, now_ns)
                    elif child.is_dir(follow_symlinks=False):
                        if names_only is None and matches(child_rel, name, True):
                            continue
                        self._set(child_rel, (child_rel, KIND_DIR, 0, 0, ""))
                        pending.append(child_rel)
                    elif child.is_symlink():
                        if names_only is None and matches(child_rel, name, False):
                            continue
                        target = os.readlink(child.path)
                        self._set(child_rel, (child_rel, KIND_LINK, 0, 0, target))
                except FileNotFoundError:
                    continue  # vanished between listing and reading (its event follows)
                except OSError as exc:
                    raise TreeError(f"cannot read {child.path!r}: {exc.strerror or exc}") from exc

    def _full_walk(self, now_ns: int) -> None:
        if not os.path.isdir(self.root):
            raise TreeError(f"tree root {self.root!r} is not a directory (or does not exist)")
        self.walked_at = time.monotonic()
        if self._watcher is not None:
            self._watcher.read()  # what it says is superseded by the walk that follows
        old, old_id, old_order = self.entries, self._id, self._order
        self._previous = {rel: (entry, self.rendered[rel]) for rel, entry in old.items()}
        self.entries, self.rendered = {}, {}
        self.linked = set()
        self._wd_dirs.clear()
        self._dir_wds.clear()
        self._order = None
        self._id = None
        seen_rows = self.rows
        try:
            self._scan("", now_ns)
        finally:
            self._previous = {}
        if self.entries == old:  # nothing changed (the same objects: compared by identity)
            self._id, self._order = old_id, old_order
        if self.entries.keys() != old.keys():
            self._unsaved = True
        # Rows of files no longer there: forget them (as the stat cache does).
        gone = [rel for rel in seen_rows if rel not in self.entries]
        for rel in gone:
            del self.rows[rel]
        self._full = False

    def _update(self, rel: str, now_ns: int, structural: bool) -> bool:
        """Bring the entry at ``rel`` (named by an event) up to date; True when everything
        below it was dealt with too (dropped or scanned again)."""
        parent, _, name = rel.rpartition("/")
        if parent and (self.entries.get(parent) or ("", ""))[1] != KIND_DIR:
            self._drop(rel)  # its directory is gone or not one any more
            return True
        path = os.path.join(self.root, rel)
        try:
            st = os.lstat(path)
        except (FileNotFoundError, NotADirectoryError):
            self._drop(rel)
            return True
        except OSError as exc:
            raise TreeError(f"cannot read {path!r}: {exc.strerror or exc}") from exc
        mode = st.st_mode
        is_dir = stat.S_ISDIR(mode)
        names_only = self.rules.names_only
        if (
            (name in names_only)
            if names_only is not None
            else self.rules.matches(rel, name, is_dir)
        ):
            self._drop(rel)
            return True
        old = self.entries.get(rel)
        if is_dir:
            if old is None or old[1] != KIND_DIR or structural or rel not in self._dir_wds:
                self._drop(rel)
                self._set(rel, (rel, KIND_DIR, 0, 0, ""))
                self._scan(rel, now_ns)
                return True
            return False
        if old is not None and old[1] == KIND_DIR:
            self._drop(rel)
        try:
            if stat.S_ISREG(mode):
                self._file(rel, path, st, now_ns)
            elif stat.S_ISLNK(mode):
                self._set(rel, (rel, KIND_LINK, 0, 0, os.readlink(path)))
            else:
                self._drop(rel)
        except FileNotFoundError:
            self._drop(rel)  # gone meanwhile (its event follows)
        except OSError as exc:
            raise TreeError(f"cannot read {path!r}: {exc.strerror or exc}") from exc
        return True

    def _drain(self) -> None:
        watcher = self._watcher
        if watcher is None:
            return
        for wd, mask, name in watcher.read():
            if mask & _IN_Q_OVERFLOW:
                self._full = True
                continue
            directory = self._wd_dirs.get(wd)
            if directory is None:
                continue  # a watch we gave up (its directory left the tree)
            if not name:
                if not directory and mask & _ROOT_GONE:
                    self._full = True  # the root itself moved or went away
                continue  # the parent's watch reports the rest by name
            rel = directory + "/" + name if directory else name
            self._dirty[rel] = self._dirty.get(rel, 0) | mask

    def verify_due(self) -> "float | None":
        """Seconds until the next verification walk is due (0.0: now); None when there is
        none to schedule (no watcher: every refresh walks anyway, or verification is off)."""
        if self._watcher is None or self.verify_every_s <= 0 or self.walked_at is None:
            return None
        return max(0.0, self.walked_at + self.verify_every_s - time.monotonic())

    def verify(self) -> int:
        """A verification walk: bring the entries up to date from the events, then walk the
        whole tree. Returns how many entries the walk found different from what the events
        had left (writes no event announced — or changes made during the walk itself)."""
        self.refresh(verifying=False)
        before = dict(self.entries)
        self.refresh(force_walk=True)
        after = self.entries
        return sum(1 for rel in before.keys() | after.keys() if before.get(rel) != after.get(rel))

    def refresh(self, force_walk: bool = False, verifying: bool = True) -> None:
        """Bring the entries up to date (see the class docstring): from the events, or by a
        full walk when ``force_walk``, when events cannot be trusted, or when a verification
        walk is due (unless ``verifying`` is False).

        Raises:
            TreeError: the root is gone or something in the tree cannot be read.
        """
        now_ns = time.time_ns() if hasattr(time, "time_ns") else int(time.time() * 1e9)
        self._drain()
        due = verifying and self.verify_due() == 0.0
        if self._full or force_walk or self._watcher is None or due:
            self._dirty.clear()
            self._full_walk(now_ns)
            return
        dirty = sorted(self._dirty.items())
        self._dirty.clear()
        rescanned: "list[str]" = []
        for rel, mask in dirty:
            if any(rel.startswith(d + "/") for d in rescanned):
                continue  # read again with its directory
            handled = self._update(rel, now_ns, bool(mask & _NEW_NAME))
            if self._full:  # a watch failed meanwhile
                self._full_walk(now_ns)
                return
            if handled:
                rescanned.append(rel)
        for rel in list(self.linked):
            self.restatted += 1
            self._update(rel, now_ns, False)
        if self._full:
            self._full_walk(now_ns)

    def _sorted(self) -> "list[str]":
        if self._order is None:
            order = list(self.entries)
            try:
                "".join(order).encode("utf-8")
            except UnicodeEncodeError:
                order.sort(key=path_bytes)
            else:
                order.sort()
            self._order = order
            self._index = {rel: index for index, rel in enumerate(order)}
            self._checkpoints = []
            self._changed_from = 0
        return self._order

    def content_id(self) -> str:
        """The id of the entries as of the last :meth:`refresh` (:func:`content_id`'s).

        The manifest is hashed in chunks of :attr:`CHECKPOINT_EVERY` entries and the hash
        state after each chunk is kept: when only entries changed (no path came or went),
        hashing resumes from the chunk of the first changed one."""
        if self._id is None:
            order = self._sorted()
            step = self.CHECKPOINT_EVERY
            checkpoints = self._checkpoints
            if not checkpoints:
                header = FORMAT if self.exec_bits else FORMAT + " no-exec-bit"
                checkpoints.append(hashlib.sha256(header.encode("ascii") + b"\n"))
            chunk = min(self._changed_from // step, len(checkpoints) - 1)
            del checkpoints[chunk + 1 :]
            digest = checkpoints[chunk].copy()
            rendered = self.rendered.__getitem__
            for start in range(chunk * step, len(order), step):
                digest.update(b"".join(map(rendered, order[start : start + step])))
                if start + step < len(order):
                    checkpoints.append(digest.copy())
            self._changed_from = len(order)
            self._id = ID_PREFIX + digest.hexdigest()[:ID_HEX_DIGITS]
        return self._id

    def manifest(self) -> "list[Entry]":
        """The entries in manifest order."""
        return [self.entries[rel] for rel in self._sorted()]

    def save(self) -> bool:
        """Write the settled rows to the ``--cache`` file (a restart then hashes only what
        changed); returns whether it was written. Failing to write only costs speed."""
        if not self.cache_path or not self._unsaved:
            return False
        cache = StatCache(None, self.root)
        cache.path = self.cache_path
        cache.new = {rel: (row[0], row[1]) for rel, row in self.rows.items() if row[2]}
        cache.old = {}
        written = cache.save()
        self._unsaved = not written
        return written

    def close(self) -> None:
        if self._watcher is not None:
            self._watcher.close()
            self._watcher = None


def _write_frame(fd: int, kind: str, body: bytes) -> None:
    _write_all(fd, encode_frame(kind, body))


def serve(
    args: "_Args | argparse.Namespace", rules: "IgnoreRules", stdin: int = 0, stdout: int = 1
) -> int:
    """The ``--serve`` loop: a hello frame ``H``, then one reply ``R`` per request ``Q``
    until the standard input ends (then the cache is saved and the status is 0).

    A request's body is one line of JSON — ``{"manifest": bool, "apply": bool, "walk":
    bool}`` — then, with ``apply``, a change set (:func:`apply_changes`). A reply's body is
    one line of JSON (``status`` as the one-shot command's exit status: 0, 1 unreadable
    tree, 3 change set not applied; ``mode``, ``hashed``, ``took_ms``), then what the
    one-shot command would print."""
    import io
    import json

    exec_bits = not args.no_exec_bit
    cache_path = None
    if args.cache:
        cache_path = default_cache_path(args.root) if args.cache == "auto" else args.cache
        cache_path = os.path.expanduser(cache_path)
    tree = LiveTree(
        args.root, rules, exec_bits, cache_path, watch=not args.no_inotify,
        verify_every_s=args.verify_every,
    )  # fmt: skip
    hello = {"format": SERVE_FORMAT, "pid": os.getpid(), "mode": tree.mode, "reason": tree.reason}
    _write_frame(stdout, "H", json.dumps(hello).encode("utf-8"))
    decoder = FrameDecoder()
    saved_at = time.monotonic()
    try:
        while True:
            due = tree.verify_due()
            if due is not None and not _readable(stdin, due):
                # Idle, and a verification walk is due: run it now rather than in the
                # next request.
                try:
                    missed = tree.verify()
                except TreeError:
                    tree._full = True
                    continue
                if missed:
                    sys.stderr.write(
                        f"ah-tree-digest: verification walk found {missed} entries changed "
                        "without an inotify event (mmap writers, or changes during the walk)\n"
                    )
                continue
            data = os.read(stdin, 1 << 20)
            if not data:
                return 0
            for kind, body in decoder.feed(data):
                if kind != "Q":
                    raise FrameError(f"unexpected frame {kind!r} from the leader")
                started = time.monotonic()
                header, _, rest = body.partition(b"\n")
                request = json.loads(header.decode("utf-8"))
                status, output = 0, ""
                tree.hashed = 0
                if request.get("apply"):
                    try:
                        apply_changes(args.root, io.BytesIO(rest))
                    except OSError as exc:
                        status = 3
                        output = _error_json("apply", f"cannot apply the change set: {exc}")
                if status == 0:
                    try:
                        tree.refresh(force_walk=bool(request.get("walk")))
                    except TreeError as exc:
                        status, output = 1, _error_json("tree", str(exc))
                        tree._full = True
                if status == 0:
                    tree_id = tree.content_id()
                    if request.get("manifest"):
                        document = {
                            "format": FORMAT,
                            "id": tree_id,
                            "execBits": exec_bits,
                            "entries": [list(entry) for entry in tree.manifest()],
                        }
                        output = json.dumps(document, ensure_ascii=True, separators=(",", ":"))
                    else:
                        output = tree_id
                info = {
                    "status": status,
                    "mode": tree.mode,
                    "reason": tree.reason,
                    "hashed": tree.hashed,
                    "entries": len(tree.entries),
                    "took_ms": round((time.monotonic() - started) * 1000, 1),
                }
                reply = json.dumps(info).encode("utf-8") + b"\n" + output.encode("utf-8") + b"\n"
                _write_frame(stdout, "R", reply)
                if time.monotonic() - saved_at > 30.0 and tree.save():
                    saved_at = time.monotonic()
    finally:
        tree.save()
        tree.close()


def _readable(fd: int, timeout: float) -> bool:
    """True when ``fd`` has data (or its end) within ``timeout`` seconds."""
    import select

    return bool(select.select([fd], [], [], timeout)[0])


def _error_json(kind: str, message: str) -> str:
    import json

    sys.stderr.write("ah-tree-digest: " + message + "\n")
    return json.dumps({"error": {"kind": kind, "message": message}})


def _parser() -> "argparse.ArgumentParser":
    import argparse

    parser = argparse.ArgumentParser(
        prog="ah-tree-digest",
        description="Print the content id of a directory tree minus ignored paths "
        "(VCS metadata .git .hg .svn .jj is always ignored).",
    )
    parser.add_argument("--root", required=True, help="the tree to digest")
    parser.add_argument(
        "--ignore",
        action="append",
        default=[],
        metavar="PATTERN",
        help="ignore pattern (repeatable): a bare name matches at any depth, a pattern with "
        "'/' is anchored to the root, a trailing '/' matches directories only",
    )
    parser.add_argument(
        "--json", action="store_true", help="print one JSON document with the id and manifest"
    )
    parser.add_argument(
        "--no-exec-bit",
        action="store_true",
        help="leave executable bits out of the id (for filesystems without them)",
    )
    parser.add_argument(
        "--cache",
        metavar="auto|FILE",
        help="reuse file hashes from this stat cache (auto: the per-user cache directory)",
    )
    parser.add_argument(
        "--apply",
        metavar="FILE",
        help="first apply the change set in FILE ('-': standard input) to the tree",
    )
    parser.add_argument(
        "--serve",
        action="store_true",
        help="answer digest requests framed on standard input until it ends (a warm session)",
    )
    parser.add_argument(
        "--no-inotify",
        action="store_true",
        help="with --serve: a full stat walk for every request instead of inotify events",
    )
    parser.add_argument(
        "--verify-every",
        type=float,
        default=VERIFY_EVERY_S,
        metavar="SECONDS",
        help="with --serve and inotify: walk the whole tree at least this often, while idle "
        "(0: never; default %(default)s)",
    )
    parser.add_argument("--version", action="version", version=FORMAT)
    return parser


def _fail(as_json: bool, kind: str, message: str, code: int) -> int:
    if as_json:
        import json

        sys.stdout.write(json.dumps({"error": {"kind": kind, "message": message}}) + "\n")
    sys.stderr.write("ah-tree-digest: " + message + "\n")
    return code


class _Args:
    root = ""
    ignore: "list[str]"
    json = False
    no_exec_bit = False
    cache: "str | None" = None
    apply: "str | None" = None
    serve = False
    no_inotify = False
    verify_every = VERIFY_EVERY_S


def _parse_fast(argv: "Sequence[str]") -> "_Args | None":
    """The arguments a fence passes, parsed without argparse (which would double the
    start-up); None for anything else (help, version, mistakes), which argparse handles."""
    args = _Args()
    args.ignore = []
    valued = {"--root", "--ignore", "--cache", "--apply"}
    index = 0
    while index < len(argv):
        word = argv[index]
        if word in valued:
            following = argv[index + 1] if index + 1 < len(argv) else None
            if following is None or (following.startswith("-") and following != "-"):
                return None
            value = argv[index + 1]
            index += 2
            if word == "--ignore":
                args.ignore.append(value)
            elif word == "--root":
                args.root = value
            elif word == "--cache":
                args.cache = value
            else:
                args.apply = value
        elif word == "--json":
            args.json = True
            index += 1
        elif word == "--no-exec-bit":
            args.no_exec_bit = True
            index += 1
        elif word == "--serve":
            args.serve = True
            index += 1
        elif word == "--no-inotify":
            args.no_inotify = True
            index += 1
        else:
            return None
    return args if args.root else None


def main(argv: "Sequence[str] | None" = None) -> int:
    """Run the digest command; returns the exit status (0 ok, 1 unreadable tree, 2 usage,
    3 the change set could not be applied). With ``--serve``: :func:`serve`."""
    # A short-lived process whose objects form no cycles: the collector would only walk the
    # tens of thousands of entries it creates, again and again.
    gc.disable()
    words = sys.argv[1:] if argv is None else list(argv)
    args = _parse_fast(words) or _parser().parse_args(words)
    exec_bits = not args.no_exec_bit
    try:
        rules = IgnoreRules(args.ignore)
    except IgnorePatternError as exc:
        return _fail(args.json, "usage", str(exc), 2)
    if args.serve:
        # Long-lived, but what it allocates forms no cycles either: the collector stays off.
        return serve(args, rules)
    # The cache is loaded before a change set is read: a fence starts this command early
    # and sends the change set later, so the load overlaps the leader's snapshot. (Its rows
    # are only ever used when a file's stat still matches, and the racy window is measured
    # from now, earlier than the scan: stricter, never looser.)
    cache = None
    if args.cache:
        path = default_cache_path(args.root) if args.cache == "auto" else args.cache
        cache = StatCache(os.path.expanduser(path), args.root)
    if args.apply:
        import json  # apply_changes needs it: imported before waiting for the input

        try:
            if args.apply == "-":
                apply_changes(args.root, sys.stdin.buffer)
            else:
                with open(args.apply, "rb") as stream:
                    apply_changes(args.root, stream)
        except OSError as exc:
            return _fail(args.json, "apply", f"cannot apply the change set: {exc}", 3)
    try:
        entries = scan_tree(args.root, rules, cache=cache)
    except TreeError as exc:
        return _fail(args.json, "tree", str(exc), 1)
    if cache is not None:
        cache.save()
    tree_id = content_id(entries, exec_bits, presorted=True)
    if args.json:
        import json

        document = {
            "format": FORMAT,
            "id": tree_id,
            "execBits": exec_bits,
            "entries": [list(entry) for entry in entries],
        }
        # ensure_ascii keeps names that are not UTF-8 representable (as \udcXX escapes).
        sys.stdout.write(json.dumps(document, ensure_ascii=True, separators=(",", ":")) + "\n")
    else:
        sys.stdout.write(tree_id + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
