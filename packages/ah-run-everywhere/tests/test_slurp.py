"""The pure part of slurp: glob matching and walk pruning, verification, layout."""

from __future__ import annotations

import fnmatch
from pathlib import PurePosixPath

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ah_domain_types import FilesetError, FilesetSpec, OsKind
from ah_run_everywhere.slurp import (
    FilesetMatcher,
    RemoteFileState,
    SlurpEnvelope,
    answered_layout,
    check_transfer,
)
from ah_run_everywhere.slurp_io import sftp_path


def matcher(include: list[str], exclude: list[str] | None = None) -> FilesetMatcher:
    return FilesetMatcher(
        FilesetSpec(name="fs", include=tuple(include), exclude=tuple(exclude or ()))
    )


@pytest.mark.parametrize(
    ("include", "path", "expected"),
    [
        ("*.log", "a.log", True),
        ("*.log", "dir/a.log", False),  # includes are anchored at the workspace
        ("*.log", ".hidden.log", True),  # '*' matches dot-files
        ("out/*.xml", "out/r.xml", True),
        ("out/*.xml", "out/sub/r.xml", False),  # '*' never crosses '/'
        ("out/**/*.xml", "out/r.xml", True),  # '**' is zero or more directories
        ("out/**/*.xml", "out/a/b/c/r.xml", True),
        ("out/**", "out/a/b", True),
        ("**/core", "core", True),
        ("**/core", "x/y/core", True),
        ("a/?.txt", "a/b.txt", True),
        ("a/?.txt", "a/bc.txt", False),
        ("a/[!x]*", "a/yes", True),
        ("a/[!x]*", "a/xno", False),
        ("./logs/a.txt", "logs/a.txt", True),
    ],
)
def test_include_globs(include: str, path: str, expected: bool) -> None:
    assert matcher([include]).matches(path) is expected


def test_excludes_drop_files_and_whole_directories() -> None:
    m = matcher(["**/*"], ["*.tmp", "build/cache", "node_modules"])
    assert m.matches("src/a.py")
    assert not m.matches("src/a.tmp")  # no '/': a name at any depth
    assert not m.matches("x/node_modules/pkg/index.js")
    assert not m.matches("build/cache/blob")  # with '/': anchored, the directory and below
    assert m.matches("other/build/cache/blob")
    assert not m.descend("build/cache") and not m.descend("a/node_modules")
    assert m.descend("build")


@pytest.mark.parametrize(
    "glob", ["/etc/passwd", "../up", "a/../../b", "C:/ws/x", "a\\b", "a/b**/c", "."]
)
def test_globs_that_leave_the_workspace_or_are_malformed_are_errors(glob: str) -> None:
    with pytest.raises(FilesetError, match="fileset 'fs'"):
        matcher([glob])


def test_walk_roots_are_static_prefixes_without_nesting() -> None:
    m = matcher(["out/reports/*.xml", "out/logs/**/*.log", "out/*.txt", "a/b/c.txt"])
    assert m.walk_roots() == [("out",), ("a", "b")]
    assert matcher(["**/*.log"]).walk_roots() == [()]


_NAMES = st.sampled_from(["a", "b", "out", "x.log", "y.txt", ".h", "dir"])
_PATHS = st.lists(_NAMES, min_size=1, max_size=5)
_GLOB_PARTS = st.sampled_from(["a", "b", "out", "*", "*.log", "?", "**", "x.*", "[ab]"])


@given(st.lists(_GLOB_PARTS, min_size=1, max_size=4), _PATHS)
def test_pruning_never_hides_a_match(glob_parts: list[str], path: list[str]) -> None:
    """If a file matches, the walk enters every directory on its way (soundness)."""
    m = matcher(["/".join(glob_parts)])
    if m.matches(path):
        for depth in range(len(path)):
            assert m.descend(path[:depth]), (glob_parts, path, depth)


@given(
    st.lists(st.sampled_from(["a", "b", "*", "*.log", "?", "[ab]"]), min_size=1, max_size=4), _PATHS
)
def test_without_double_star_matching_is_fnmatch_per_component(
    glob_parts: list[str], path: list[str]
) -> None:
    expected = len(glob_parts) == len(path) and all(
        fnmatch.fnmatchcase(name, part) for name, part in zip(path, glob_parts, strict=True)
    )
    assert matcher(["/".join(glob_parts)]).matches(path) is expected


def state(sha: str | None, error: str | None = None) -> RemoteFileState:
    return RemoteFileState(path="p", size=1, mtime=1.0, sha256=sha, error=error)


def test_a_copy_counts_only_when_before_copy_and_after_agree() -> None:
    assert check_transfer("h", "p", state("aa"), "aa", state("aa")).ok
    changed = check_transfer("h", "p", state("aa"), "bb", state("cc"))
    assert not changed.ok
    assert changed.reason is not None and changed.reason.startswith("checksum mismatch for h:p")
    assert not check_transfer("h", "p", state("aa"), "aa", state("bb")).ok
    assert not check_transfer("h", "p", None, "aa", state("aa")).ok
    gone = check_transfer("h", "p", state("aa"), "aa", state(None, "FileNotFoundError: x"))
    assert not gone.ok and "FileNotFoundError" in (gone.reason or "")
    assert not check_transfer("h", "p", state("aa"), None, state("aa")).ok


def test_layout_is_flat_for_one_answering_host_and_per_host_for_several() -> None:
    assert answered_layout("logs", ["a"], "a", "x/y.log") == PurePosixPath("x/y.log")
    assert answered_layout("logs", ["a", "b"], "b", "x/y.log") == PurePosixPath("logs/b/x/y.log")


def test_sftp_paths_per_os() -> None:
    assert sftp_path("/srv/ws", OsKind.LINUX, ("a", "b")) == "/srv/ws/a/b"
    assert sftp_path("C:\\ws", OsKind.WINDOWS, ("a",)) == "/C:/ws/a"
    assert sftp_path("/Users/ci/ws", OsKind.MACOS) == "/Users/ci/ws"


def test_envelope_exit_code() -> None:
    assert SlurpEnvelope(filesets=[]).exit_code == 0
    assert SlurpEnvelope(filesets=[], unreachable={"h": "down"}).exit_code == 1
