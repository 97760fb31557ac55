"""Leader snapshots: ignore rule, manifest, content id, diff, and the stat cache."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ah_mutagen_project import (
    DEFAULT_SYNC_IGNORES,
    EntryKind,
    IgnorePatternError,
    Manifest,
    ManifestEntry,
    SnapshotError,
    effective_ignores,
    take_snapshot,
)
from ah_mutagen_project.digest_script import IgnoreRules


def later() -> float:
    """A clock for scans that run once the files have settled (past the racy window)."""
    return time.time() + 60.0


def test_defaults_come_from_the_config_schema() -> None:
    assert DEFAULT_SYNC_IGNORES == ("node_modules", ".venv", "target", "build")
    assert effective_ignores(None)[:4] == (".git", ".hg", ".svn", ".jj")
    assert effective_ignores(["dist", ".git", "dist"]) == (".git", ".hg", ".svn", ".jj", "dist")


@pytest.mark.parametrize(
    ("pattern", "path", "is_dir", "ignored"),
    [
        ("node_modules", "node_modules", True, True),
        ("node_modules", "a/b/node_modules", True, True),
        ("node_modules", "a/node_modules_x", True, False),
        ("*.pyc", "src/x.pyc", False, True),
        ("*.pyc", "src/x.py", False, False),
        ("build/", "build", True, True),
        ("build/", "build", False, False),
        ("build", "build", False, True),
        ("docs/build", "docs/build", True, True),
        ("docs/build", "x/docs/build", True, False),
        ("/out", "out", True, True),
        ("/out", "src/out", True, False),
        ("src/*/gen", "src/a/gen", True, True),
        ("src/*/gen", "src/a/b/gen", True, False),
        ("f?le", "dir/file", False, True),
        ("[!a]x", "bx", False, True),
        ("[!a]x", "ax", False, False),
        ("Build", "build", True, False),
    ],
)
def test_ignore_rule(pattern: str, path: str, is_dir: bool, ignored: bool) -> None:
    rules = IgnoreRules([pattern], vcs=False)
    assert rules.matches(path, path.rsplit("/", 1)[-1], is_dir) is ignored


def test_vcs_metadata_is_always_ignored() -> None:
    rules = IgnoreRules([])
    for name in (".git", ".hg", ".svn", ".jj"):
        assert rules.matches(f"sub/{name}", name, True)
        assert rules.matches(name, name, False)  # a .git *file* (worktrees, submodules)


@pytest.mark.parametrize(
    ("pattern", "why"),
    [
        ("", "non-empty"),
        ("   ", "non-empty"),
        (" x", "whitespace"),
        ("!keep", "negation"),
        ("a\\b", "backslash"),
        ("**/x", "'**'"),
        ("a//b", "'..'"),
        ("a/../b", "'..'"),
        ("/", "root"),
        ("[^a]", "[!...]"),
    ],
)
def test_bad_ignore_patterns_are_named(pattern: str, why: str) -> None:
    with pytest.raises(IgnorePatternError) as info:
        effective_ignores([pattern])
    assert repr(pattern) in str(info.value)
    assert why in str(info.value)


def test_single_string_is_not_a_pattern_list() -> None:
    with pytest.raises(IgnorePatternError, match="list"):
        effective_ignores("node_modules")


def test_snapshot_entries_kinds_exec_bits_and_ignores(
    tmp_path: Path, build_tree: Callable[..., Path], sample_tree: dict[str, Any]
) -> None:
    root = build_tree(tmp_path / "ws", sample_tree)
    os.mkfifo(root / "src" / "fifo")  # specials are skipped, like rsync without -D
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(root / "sock"))
        snap = take_snapshot(root)
    entries = snap.manifest.by_path()
    assert sorted(entries) == [
        "README.md",
        "bin",
        "bin/run.sh",
        "dist",
        "dist/bundle.js",
        "docs",
        "docs/empty",
        "links",
        "links/dangling",
        "links/to-dir",
        "links/to-readme",
        "src",
        "src/app.py",
        "src/pkg",
        "src/pkg/__init__.py",
        "src/pkg/data.bin",
    ]
    assert entries["bin/run.sh"].executable and not entries["src/app.py"].executable
    assert entries["links/to-dir"] == ManifestEntry(
        "links/to-dir", EntryKind.SYMLINK, False, 0, "../src"
    )
    assert entries["docs/empty"].kind is EntryKind.DIRECTORY
    readme = entries["README.md"]
    assert readme.size == 6
    assert readme.data == "5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03"
    assert snap.id.startswith("snap-") and len(snap.id) == 5 + 32
    assert snap.id == snap.manifest.content_id()
    # A repo override replaces the default list: node_modules is synced, dist is not.
    override = take_snapshot(root, ["dist"])
    paths = override.manifest.by_path()
    assert "node_modules/left-pad/index.js" in paths and "src/node_modules/inner.js" in paths
    assert "dist" not in paths and ".git" not in paths and "src/.hg" not in paths
    assert override.id != snap.id


def test_id_changes_with_content_exec_bit_link_target_and_names(
    tmp_path: Path, build_tree: Callable[..., Path], sample_tree: dict[str, Any]
) -> None:
    root = build_tree(tmp_path / "ws", sample_tree)
    seen = {take_snapshot(root).id}

    def changed() -> str:
        new = take_snapshot(root).id
        assert new not in seen
        seen.add(new)
        return new

    (root / "src/app.py").write_text("print('app!')\n")
    changed()
    (root / "src/app.py").chmod(0o755)
    changed()
    (root / "links/to-readme").unlink()
    (root / "links/to-readme").symlink_to("README.md")
    changed()
    (root / "docs/empty").rename(root / "docs/empty2")
    changed()
    (root / "docs/empty2/x").mkdir()
    changed()
    # Ignored content never changes the id.
    before = take_snapshot(root).id
    (root / "node_modules/new.js").write_text("x")
    (root / ".git/config").write_text("x")
    assert take_snapshot(root).id == before
    # Without exec bits the chmod is invisible.
    (root / "src/app.py").chmod(0o644)
    no_exec = take_snapshot(root).manifest.content_id(exec_bits=False)
    (root / "src/app.py").chmod(0o755)
    assert take_snapshot(root).manifest.content_id(exec_bits=False) == no_exec


def test_non_utf8_names_are_hashed_by_their_bytes(tmp_path: Path) -> None:
    root = tmp_path / "ws"
    root.mkdir()
    (root / os.fsdecode(b"caf\xe9")).write_text("latin-1 name")
    snap = take_snapshot(root, [])
    assert [e.path for e in snap.manifest.entries] == [os.fsdecode(b"caf\xe9")]
    assert snap.id == snap.manifest.content_id()


def test_missing_root_and_unreadable_directory_are_named(tmp_path: Path) -> None:
    with pytest.raises(SnapshotError, match="does-not-exist"):
        take_snapshot(tmp_path / "does-not-exist")
    if os.geteuid() == 0:
        return  # root reads everything; the permission case cannot be set up
    locked = tmp_path / "ws" / "locked"
    locked.mkdir(parents=True)
    locked.chmod(0)
    try:
        with pytest.raises(SnapshotError, match="locked"):
            take_snapshot(tmp_path / "ws")
    finally:
        locked.chmod(0o755)


_names = st.text(alphabet="abcxyz._-", min_size=1, max_size=6).filter(
    lambda n: n not in (".", "..")
)
_entries = st.lists(
    st.tuples(
        st.lists(_names, min_size=1, max_size=3).map("/".join),
        st.sampled_from(["f", "d", "l"]),
        st.booleans(),
        st.integers(min_value=0, max_value=10**9),
        st.text(max_size=12),
    ),
    max_size=12,
    unique_by=lambda e: e[0],
)


@settings(max_examples=60, deadline=None)
@given(_entries, st.randoms())
def test_content_id_ignores_entry_order_and_diff_is_exact(
    rows: list[tuple[str, str, bool, int, str]], rnd: Any
) -> None:
    manifest = Manifest.from_tuples([[p, k, int(x), s, d] for p, k, x, s, d in rows])
    shuffled = list(manifest.entries)
    rnd.shuffle(shuffled)
    assert Manifest(tuple(shuffled)).content_id() == manifest.content_id()
    assert manifest.diff(manifest).empty
    if not rows:
        return
    # Drop one entry, change another: diff names exactly those.
    dropped = manifest.entries[0]
    rest = list(manifest.entries[1:])
    changed_paths: tuple[str, ...] = ()
    if rest:
        first = rest[0]
        rest[0] = ManifestEntry(
            first.path, first.kind, first.executable, first.size + 1, first.data
        )
        changed_paths = (first.path,)
    other = Manifest(tuple(rest))
    diff = manifest.diff(other)
    assert diff.removed == (dropped.path,)
    assert diff.added == ()
    assert diff.changed == changed_paths
    assert other.diff(manifest).added == (dropped.path,)
    assert manifest.content_id() != other.content_id()


def test_diff_describe_limits_and_labels() -> None:
    def m(*paths: str) -> Manifest:
        return Manifest.from_tuples([[p, "f", 0, 1, "x"] for p in paths])

    diff = m("a", "b", "c").diff(m("b", *[f"n{i}" for i in range(12)]))
    text = diff.describe(limit=3)
    assert text.startswith("missing: a, c; unexpected: n0, n1, n10 (+9 more)")
    assert m("a").diff(m("a")).describe() == "no differences"


def test_stat_cache_rehashes_exactly_the_changed_file_of_10000(
    tmp_path: Path, backdate: Callable[..., None]
) -> None:
    root = tmp_path / "ws"
    for d in range(50):
        (root / f"d{d:02d}").mkdir(parents=True)
    for i in range(10_000):
        fd = os.open(root / f"d{i % 50:02d}" / f"f{i}.txt", os.O_CREAT | os.O_WRONLY, 0o644)
        os.write(fd, f"content {i}\n".encode())
        os.close(fd)
    backdate(root)
    cache = tmp_path / "state" / "snapshot.cache"
    cold = take_snapshot(root, [], cache_path=cache, clock=later)
    assert (cold.files_hashed, cold.files_cached) == (10_000, 0)
    assert cache.is_file()
    warm = take_snapshot(root, [], cache_path=cache, clock=later)
    assert (warm.files_hashed, warm.files_cached) == (0, 10_000)
    assert warm.id == cold.id
    (root / "d07" / "f1007.txt").write_text("changed content\n")
    one = take_snapshot(root, [], cache_path=cache, clock=later)
    assert (one.files_hashed, one.files_cached) == (1, 9_999)
    assert one.id != cold.id
    assert cold.manifest.diff(one.manifest).changed == ("d07/f1007.txt",)
    # The cached result equals a scan without any cache.
    assert take_snapshot(root, []).id == one.id


def test_racy_files_are_never_trusted_from_the_cache(tmp_path: Path) -> None:
    root = tmp_path / "ws"
    root.mkdir()
    fresh = root / "fresh.txt"
    fresh.write_text("v1")
    cache = tmp_path / "cache"
    # Real clock: the file was written just now, inside the racy window, so it is not cached.
    assert take_snapshot(root, [], cache_path=cache).files_hashed == 1
    second = take_snapshot(root, [], cache_path=cache)
    assert (second.files_hashed, second.files_cached) == (1, 0)
    # Same size, same mtime (restored to the nanosecond), same inode: only the content and
    # ctime differ. Had v1 been cached while racy, a coarse ctime could hide the change.
    st_before = fresh.stat()
    with open(fresh, "r+") as handle:
        handle.write("v2")
    os.utime(fresh, ns=(st_before.st_atime_ns, st_before.st_mtime_ns))
    assert fresh.stat().st_mtime_ns == st_before.st_mtime_ns
    third = take_snapshot(root, [], cache_path=cache)
    assert third.files_hashed == 1
    assert third.id == take_snapshot(root, []).id != second.id
    # Once settled (clock past the window), it is cached and reused.
    take_snapshot(root, [], cache_path=cache, clock=later)
    settled = take_snapshot(root, [], cache_path=cache, clock=later)
    assert (settled.files_hashed, settled.files_cached) == (0, 1)


def test_damaged_or_foreign_cache_means_a_cold_scan(
    tmp_path: Path, backdate: Callable[..., None]
) -> None:
    root = tmp_path / "ws"
    (root / "a").mkdir(parents=True)
    (root / "a" / "x").write_text("x")
    backdate(root)
    cache = tmp_path / "cache"
    cache.write_bytes(b"\xc1 not msgpack")
    assert take_snapshot(root, [], cache_path=cache, clock=later).files_hashed == 1
    assert take_snapshot(root, [], cache_path=cache, clock=later).files_cached == 1
    other = tmp_path / "other"
    (other / "a").mkdir(parents=True)
    (other / "a" / "x").write_text("x")
    backdate(other)
    # Same relative paths under another root: the cache is not reused across roots.
    assert take_snapshot(other, [], cache_path=cache, clock=later).files_hashed == 1
