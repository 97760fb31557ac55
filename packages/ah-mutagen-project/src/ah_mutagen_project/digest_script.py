"""ah-tree-digest: the content id of a directory tree minus ignored paths.

This one file is the whole algorithm, shared by the leader (``ah_mutagen_project.snapshot``
imports it and adds a stat cache) and the followers, which run it either as the
``ah-tree-digest`` console script or, where nothing is installed, by piping this very source
into ``python3 -`` over SSH (``remote_digest_command``). It therefore imports only the standard
library and runs on Python 3.6 and later (RHEL 8's platform python): annotations that use
newer syntax are strings, never evaluated.

Usage: ``python3 digest_script.py --root DIR [--ignore PATTERN]... [--json] [--no-exec-bit]
[--cache auto|FILE]``

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
``%LOCALAPPDATA%`` on Windows, then ``agent-harbor/tree-digest/<sha256 of the root>.json``) a
file's SHA-256 is reused when its ``(size, mtime_ns, inode, ctime_ns)`` equal those recorded
when it was hashed — the leader snapshot's rule, with its racy-mtime guard: a hash is stored
only when the file's mtime and ctime were at least 2 s old when the scan started (rsync sets
the leader's mtime, but the ctime is the follower's own and always moves on a write, a chmod
or an ``mtime`` reset, so tampering cannot hide behind a restored mtime). The cache is JSON
written atomically; a missing, damaged or foreign one means hashing everything, and failing
to write it never fails the digest.
"""

# ruff: noqa: UP037  (quoted annotations keep this file importable on Python 3.6)

import argparse
import contextlib
import fnmatch
import hashlib
import json
import os
import stat
import sys
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Sequence

    Entry = tuple[str, str, int, int, str]
    """(path, kind, executable 0/1, size, sha256 hex or symlink target)."""

    FileDigester = Callable[[str, str, os.stat_result], str]
    """(absolute path, relative path, lstat result) -> SHA-256 hex of the content."""

__all__ = [
    "FORMAT",
    "ID_PREFIX",
    "KIND_DIR",
    "KIND_FILE",
    "KIND_LINK",
    "VCS_IGNORES",
    "IgnorePatternError",
    "IgnoreRules",
    "StatCache",
    "TreeError",
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

CACHE_FORMAT = "ah-tree-digest-cache/1"
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
            if (is_dir or not dir_only) and fnmatch.fnmatchcase(name, glob):
                return True
        if self._anchored:
            parts = rel_path.split("/")
            for components, dir_only in self._anchored.get(len(parts), ()):
                if dir_only and not is_dir:
                    continue
                if all(
                    fnmatch.fnmatchcase(part, comp) if _has_glob(comp) else part == comp
                    # Equal lengths by construction; no strict= (this file must run on Python 3.6).
                    for part, comp in zip(parts, components)  # noqa: B905
                ):
                    return True
        return False


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
    root: str, rules: "IgnoreRules", file_digest: "FileDigester | None" = None
) -> "list[Entry]":
    """Every entry under ``root`` not ignored by ``rules``, sorted by path bytes.

    Raises:
        TreeError: ``root`` is not a directory, or a directory or file could not be read.
    """
    # The loop runs once per entry of trees with tens of thousands of them, on the leader
    # and on every follower for every fence: keep it free of avoidable calls.
    digester = file_digest or _default_digester
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
                if child.is_symlink():
                    if names_only is None and matches(rel, name, False):
                        continue
                    append((rel, KIND_LINK, 0, 0, os.readlink(child.path)))
                elif child.is_dir(follow_symlinks=False):
                    if names_only is None and matches(rel, name, True):
                        continue
                    append((rel, KIND_DIR, 0, 0, ""))
                    pending.append((child.path, rel + "/"))
                elif child.is_file(follow_symlinks=False):
                    if names_only is None and matches(rel, name, False):
                        continue
                    st = child.stat(follow_symlinks=False)
                    if not is_regular(st.st_mode):
                        continue
                    append(
                        (
                            rel,
                            KIND_FILE,
                            1 if st.st_mode & exec_mask else 0,
                            st.st_size,
                            digester(child.path, rel, st),
                        )
                    )
            except FileNotFoundError:
                continue  # vanished between listing and reading
            except OSError as exc:
                raise TreeError(f"cannot read {child.path!r}: {exc.strerror or exc}") from exc
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
    return os.path.join(base, "tree-digest", key + ".json")


class StatCache:
    """Reuses file hashes across digests of one tree (see "The follower's stat cache")."""

    def __init__(self, path: str, root: str, racy_window_s: float = RACY_WINDOW_S) -> None:
        self.path = path
        self.root = os.path.abspath(root)
        self.settled_ns = int((time.time() - racy_window_s) * 1e9)
        self.old: "dict[str, list[object]]" = {}
        self.new: "dict[str, list[object]]" = {}
        self.hashed = 0
        self.cached = 0
        try:
            with open(path, encoding="utf-8") as handle:
                document = json.load(handle)
            if (
                isinstance(document, dict)
                and document.get("format") == CACHE_FORMAT
                and document.get("root") == self.root
                and isinstance(document.get("files"), dict)
            ):
                self.old = {
                    rel: row
                    for rel, row in document["files"].items()
                    if isinstance(row, list) and len(row) == 5 and isinstance(row[4], str)
                }
        except (OSError, ValueError):
            pass  # missing or damaged: hash everything and write a fresh one

    def digest(self, abs_path: str, rel_path: str, st: os.stat_result) -> str:
        cached = self.old.get(rel_path)
        mtime_ns = st.st_mtime_ns
        ctime_ns = st.st_ctime_ns
        settled = (mtime_ns if mtime_ns > ctime_ns else ctime_ns) <= self.settled_ns
        if (
            settled
            and cached is not None
            and cached[0] == st.st_size
            and cached[1] == mtime_ns
            and cached[2] == st.st_ino
            and cached[3] == ctime_ns
        ):
            self.cached += 1
            self.new[rel_path] = cached
            return cached[4]  # type: ignore[return-value]  # checked when loaded
        digest = sha256_file(abs_path)
        self.hashed += 1
        if settled:
            after = os.stat(abs_path, follow_symlinks=False)
            key = [st.st_size, mtime_ns, st.st_ino, ctime_ns]
            if [after.st_size, after.st_mtime_ns, after.st_ino, after.st_ctime_ns] == key:
                self.new[rel_path] = [*key, digest]
                return digest
        if cached is not None:
            # Keep the old row (its key no longer matches, so it is never used): a file
            # that is still too young to cache then does not rewrite the whole cache.
            self.new[rel_path] = cached
        return digest

    def save(self) -> None:
        """Write the cache when it changed; an unwritable cache only costs speed."""
        if self.new == self.old:
            return
        directory = os.path.dirname(self.path)
        tmp = f"{self.path}.{os.getpid()}.tmp"
        try:
            os.makedirs(directory, exist_ok=True)
            with open(tmp, "w", encoding="utf-8") as handle:
                json.dump(
                    {"format": CACHE_FORMAT, "root": self.root, "files": self.new},
                    handle,
                    ensure_ascii=True,
                    separators=(",", ":"),
                )
            os.replace(tmp, self.path)
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


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


def _parser() -> argparse.ArgumentParser:
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
    parser.add_argument("--version", action="version", version=FORMAT)
    return parser


def _fail(as_json: bool, kind: str, message: str, code: int) -> int:
    if as_json:
        sys.stdout.write(json.dumps({"error": {"kind": kind, "message": message}}) + "\n")
    sys.stderr.write("ah-tree-digest: " + message + "\n")
    return code


def main(argv: "Sequence[str] | None" = None) -> int:
    """Run the digest command; returns the exit status (0 ok, 1 unreadable tree, 2 usage)."""
    args = _parser().parse_args(argv)
    exec_bits = not args.no_exec_bit
    try:
        rules = IgnoreRules(args.ignore)
    except IgnorePatternError as exc:
        return _fail(args.json, "usage", str(exc), 2)
    cache = None
    if args.cache:
        path = default_cache_path(args.root) if args.cache == "auto" else args.cache
        cache = StatCache(os.path.expanduser(path), args.root)
    try:
        entries = scan_tree(args.root, rules, cache.digest if cache is not None else None)
    except TreeError as exc:
        return _fail(args.json, "tree", str(exc), 1)
    if cache is not None:
        cache.save()
    tree_id = content_id(entries, exec_bits, presorted=True)
    if args.json:
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
