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
    "ID_PREFIX",
    "KIND_DIR",
    "KIND_FILE",
    "KIND_LINK",
    "VCS_IGNORES",
    "ApplyError",
    "IgnorePatternError",
    "IgnoreRules",
    "StatCache",
    "TreeError",
    "apply_changes",
    "content_id",
    "default_cache_path",
    "main",
    "scan_tree",
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
        else:
            return None
    return args if args.root else None


def main(argv: "Sequence[str] | None" = None) -> int:
    """Run the digest command; returns the exit status (0 ok, 1 unreadable tree, 2 usage,
    3 the change set could not be applied)."""
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
