"""Incremental sync: the change list between two manifests, the sync decision, the change-set
stream, and the follower applying it (``digest_script.apply_changes`` and ``--apply``)."""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ah_harness_local import wait_for
from ah_mutagen_project import FedCommand, Manifest, take_snapshot
from ah_mutagen_project import digest_script as ds
from ah_mutagen_project._process import CommandTimeout
from ah_mutagen_project.incremental import (
    ChangeSet,
    ChangeSetError,
    change_list,
    choose_sync,
    encode_change_set,
    plan_changes,
)

SCRIPT = Path(ds.__file__)

# A tree: path -> ("d",) | ("f", content, executable) | ("l", target). Few names, shallow,
# so that two random trees share paths, and kinds change between them often.
Spec = dict[str, tuple[object, ...]]

_names = st.sampled_from(["a", "b", "c", "d.txt", "é"])
_leaf = st.one_of(
    st.tuples(st.just("d")),
    st.tuples(st.just("f"), st.sampled_from(["", "x", "y\n", "longer content\n"]), st.booleans()),
    st.tuples(st.just("l"), st.sampled_from(["a", "../b", "no/such", "d.txt"])),
)


@st.composite
def trees(draw: st.DrawFn) -> Spec:
    """A valid tree: every parent of an entry is a directory of the tree."""
    tree: Spec = {}
    for parts, leaf in draw(
        st.lists(st.tuples(st.lists(_names, min_size=1, max_size=3), _leaf), max_size=14)
    ):
        path = "/".join(parts)
        parents = ["/".join(parts[:i]) for i in range(1, len(parts))]
        if any(tree.get(p, ("d",))[0] != "d" for p in parents) or path in tree:
            continue
        if leaf[0] != "d" and any(key.startswith(path + "/") for key in tree):
            continue
        for parent in parents:
            tree[parent] = ("d",)
        tree[path] = leaf
    return tree


def build(root: Path, spec: Spec) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for path in sorted(spec):
        entry = spec[path]
        target = root / path
        if entry[0] == "d":
            target.mkdir(exist_ok=True)
        elif entry[0] == "f":
            target.write_text(str(entry[1]))
            target.chmod(0o755 if entry[2] else 0o644)
        else:
            target.symlink_to(str(entry[1]))
    return root


def model_apply(
    rows: Mapping[str, tuple[object, ...]], change_set: ChangeSet, wanted: Manifest
) -> dict[str, tuple[object, ...]]:
    """What a follower holding ``rows`` (path -> row) holds after the change set: the
    semantics ``apply_changes`` documents, on a dict."""
    tree = dict(rows)
    want = {e.path: e.as_tuple()[1:] for e in wanted.entries}

    def drop(path: str, itself: bool) -> None:
        for key in [k for k in tree if k.startswith(path + "/") or (itself and k == path)]:
            del tree[key]

    for change in change_set.changes:
        kind, path = change[0], change[1]
        if kind == "rm":
            drop(path, itself=True)
            continue
        assert all(tree.get(p, ("?",))[0] == "d" for p in _parents(path)), (path, tree)
        if kind == "d":
            if tree.get(path, ("?",))[0] != "d":
                drop(path, itself=True)
        else:
            drop(path, itself=False)
        tree[path] = want[path]
    return tree


def _parents(path: str) -> list[str]:
    parts = path.split("/")
    return ["/".join(parts[:i]) for i in range(1, len(parts))]


def manifest_of(spec: Spec) -> Manifest:
    rows = []
    for path, entry in spec.items():
        if entry[0] == "d":
            rows.append([path, "d", 0, 0, ""])
        elif entry[0] == "f":
            data = str(entry[1]).encode()
            rows.append(
                [path, "f", int(bool(entry[2])), len(data), hashlib.sha256(data).hexdigest()]
            )
        else:
            rows.append([path, "l", 0, 0, str(entry[1])])
    return Manifest.from_tuples(rows)


# --------------------------------------------------------------------------- pure logic


@given(trees(), trees())
@settings(max_examples=300, deadline=None)
def test_applying_the_change_set_to_the_proven_tree_gives_the_wanted_tree(
    proven_spec: Spec, wanted_spec: Spec
) -> None:
    proven, wanted = manifest_of(proven_spec), manifest_of(wanted_spec)
    change_set = plan_changes(proven, wanted)
    assert list(change_set.paths) == change_list(proven, wanted)
    assert list(change_set.paths) == sorted(change_set.paths)
    assert len(change_set.paths) == len(set(change_set.paths)) == len(change_set.changes)
    before = {e.path: e.as_tuple()[1:] for e in proven.entries}
    after = {e.path: e.as_tuple()[1:] for e in wanted.entries}
    assert model_apply(before, change_set, wanted) == after
    # Minimal enough: only paths whose entry differs, or removed ones (whose parent stays).
    for path in change_set.paths:
        assert before.get(path) != after.get(path)
    assert change_set.content_bytes == sum(
        e.size for e in wanted.entries if e.path in set(change_set.paths) and e.kind == "f"
    )
    assert plan_changes(wanted, wanted).empty


def test_change_list_names_what_to_send_and_the_top_of_what_to_delete() -> None:
    proven = manifest_of(
        {
            "keep.txt": ("f", "k", False),
            "edit.txt": ("f", "old", False),
            "gone-dir": ("d",),
            "gone-dir/a.txt": ("f", "a", False),
            "gone-dir/sub": ("d",),
            "gone-dir/sub/b.txt": ("f", "b", False),
            "dir-to-file": ("d",),
            "dir-to-file/c.txt": ("f", "c", False),
            "mode.sh": ("f", "#!", False),
        }
    )
    wanted = manifest_of(
        {
            "keep.txt": ("f", "k", False),
            "edit.txt": ("f", "new", False),
            "dir-to-file": ("f", "now a file", False),
            "mode.sh": ("f", "#!", True),
            "new-dir": ("d",),
            "new-dir/n.txt": ("f", "n", False),
        }
    )
    change_set = plan_changes(proven, wanted)
    assert change_set.changes == (
        ("f", "dir-to-file", False, 10),
        ("f", "edit.txt", False, 3),
        ("rm", "gone-dir"),
        ("f", "mode.sh", True, 2),
        ("d", "new-dir"),
        ("f", "new-dir/n.txt", False, 1),
    )
    assert change_set.content_bytes == 16


@given(
    st.one_of(st.none(), st.builds(ChangeSet, st.just(()), st.just(()), st.just(0))),
    st.booleans(),
)
def test_nothing_proven_means_a_full_sync_and_nothing_changed_means_none(
    change_set: ChangeSet | None, can_apply: bool
) -> None:
    expected = "full" if change_set is None else "nothing"
    assert choose_sync(change_set, can_apply=can_apply) == expected


@given(
    st.integers(min_value=1, max_value=50),
    st.integers(min_value=0, max_value=10_000),
    st.booleans(),
    st.integers(min_value=1, max_value=60),
    st.integers(min_value=0, max_value=10_000),
)
def test_change_sets_go_with_the_digest_only_where_they_can_and_within_limits(
    count: int, content: int, can_apply: bool, max_changes: int, max_bytes: int
) -> None:
    paths = tuple(f"p{i}" for i in range(count))
    change_set = ChangeSet(paths, tuple(("rm", p) for p in paths), content)
    mode = choose_sync(
        change_set, can_apply=can_apply, max_apply_bytes=max_bytes, max_apply_changes=max_changes
    )
    fits = can_apply and count <= max_changes and content <= max_bytes
    assert mode == ("apply" if fits else "listed")


# --------------------------------------------------------------------------- real trees


@given(trees(), trees())
@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
def test_a_follower_applying_the_change_set_holds_the_leader_snapshot(
    proven_spec: Spec, wanted_spec: Spec
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        follower = build(Path(tmp) / "follower", proven_spec)
        leader = build(Path(tmp) / "leader", wanted_spec)
        proven, wanted = take_snapshot(follower, []), take_snapshot(leader, [])
        change_set = plan_changes(proven.manifest, wanted.manifest)
        stream = encode_change_set(leader, change_set)
        assert ds.apply_changes(str(follower), io.BytesIO(stream)) == len(change_set.changes)
        assert take_snapshot(follower, []).id == wanted.id
        for change in change_set.changes:
            if change[0] == "f":  # mtimes travel too, so a later rsync quick check agrees
                path = change[1]
                assert (follower / path).stat().st_mtime_ns == (leader / path).stat().st_mtime_ns
        assert not [p for p in follower.rglob(".ah-apply-*")]


def test_the_digest_command_applies_a_change_set_from_stdin(tmp_path: Path) -> None:
    follower = build(tmp_path / "follower", {"src": ("d",), "src/a.py": ("f", "A = 1\n", False)})
    leader = build(
        tmp_path / "leader",
        {"src": ("d",), "src/a.py": ("f", "A = 2\n", False), "run.sh": ("f", "#!/bin/sh\n", True)},
    )
    change_set = plan_changes(
        take_snapshot(follower, []).manifest, take_snapshot(leader, []).manifest
    )
    done = subprocess.run(
        [sys.executable, "-I", "-S", str(SCRIPT), "--root", str(follower), "--apply", "-"],
        input=encode_change_set(leader, change_set),
        capture_output=True,
        check=False,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.decode().strip() == take_snapshot(leader, []).id
    assert os.access(follower / "run.sh", os.X_OK)

    # A change set that cannot be applied: exit 3, a message, the tree untouched.
    before = take_snapshot(follower, []).id
    bad = subprocess.run(
        [sys.executable, "-I", "-S", str(SCRIPT), "--root", str(follower), "--apply", "-"],
        input=b"ah-tree-apply/1\n" + b'[["f","src/a.py",420,100,0]]\nshort',
        capture_output=True,
        check=False,
        timeout=60,
    )
    assert bad.returncode == 3
    assert b"ends inside the content of 'src/a.py'" in bad.stderr
    assert take_snapshot(follower, []).id == before, "a failed change left a temporary file"


@pytest.mark.parametrize(
    ("stream", "message"),
    [
        (b"something else\n[]\n", "does not start with ah-tree-apply/1"),
        (b"ah-tree-apply/1\n{not json\n", "not JSON"),
        (b'ah-tree-apply/1\n[["rm","../escape"]]\n', "bad path '../escape'"),
        (b'ah-tree-apply/1\n[["rm","/etc/passwd"]]\n', "bad path '/etc/passwd'"),
        (b'ah-tree-apply/1\n[["rm","a//b"]]\n', "bad path 'a//b'"),
        (b'ah-tree-apply/1\n[["x","a"]]\n', "bad change"),
        (b'ah-tree-apply/1\n[["f","a",420,5,0]]\nabc', "ends inside the content"),
    ],
)
def test_malformed_change_sets_are_refused(tmp_path: Path, stream: bytes, message: str) -> None:
    with pytest.raises(ds.ApplyError, match=message.replace("(", r"\(")):
        ds.apply_changes(str(tmp_path), io.BytesIO(stream))


def test_a_change_set_never_writes_through_a_symlink(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    follower = tmp_path / "follower"
    follower.mkdir()
    (follower / "sub").symlink_to(outside)  # the follower's own doing; the leader has a dir
    stream = b'ah-tree-apply/1\n[["f","sub/x.txt",420,2,0]]\nhi'
    with pytest.raises(ds.ApplyError, match="cannot apply below 'sub': not a directory"):
        ds.apply_changes(str(follower), io.BytesIO(stream))
    assert list(outside.iterdir()) == []


def test_a_change_set_cannot_turn_a_checked_directory_into_a_way_out(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    follower = tmp_path / "follower"
    follower.mkdir()
    # A directory made (so known to be one), removed, replaced by a symlink leading out,
    # then written below: the parent is checked again, and refused.
    stream = (
        b"ah-tree-apply/1\n"
        + f'[["d","a",493],["rm","a"],["l","a","{outside}"],["f","a/x",420,2,0]]'.encode()
        + b"\nhi"
    )
    with pytest.raises(ds.ApplyError, match="cannot apply below 'a': not a directory"):
        ds.apply_changes(str(follower), io.BytesIO(stream))
    assert list(outside.iterdir()) == []


def test_encoding_fails_when_the_leader_moved_on(tmp_path: Path) -> None:
    leader = build(tmp_path / "leader", {"a.txt": ("f", "a", False)})
    change_set = plan_changes(Manifest(()), take_snapshot(leader, []).manifest)
    (leader / "a.txt").unlink()
    with pytest.raises(ChangeSetError, match=r"a\.txt vanished"):
        encode_change_set(leader, change_set)
    (leader / "a.txt").mkdir()
    with pytest.raises(ChangeSetError, match="no longer a regular file"):
        encode_change_set(leader, change_set)


# --------------------------------------------------------------------------- FedCommand


def _gone(pid: int) -> bool:
    """Exited (a zombie nobody reaped yet counts as exited)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return True
    return fields[0] == "Z"


def test_a_fed_command_gets_its_input_late_and_is_killed_on_time(
    run: Callable[..., Any], tmp_path: Path
) -> None:
    async def scenario() -> None:
        echo = await FedCommand.start(["sh", "-c", "cat; echo fed >&2"], what="cat")
        result = await echo.feed(b"change set", timeout=30)
        assert (result.returncode, result.stdout, result.stderr) == (0, b"change set", b"fed\n")
        await echo.cancel()  # safe after feed
        with pytest.raises(RuntimeError, match="written already"):
            await echo.feed(b"again", timeout=1)

        # A command that never finishes: killed with its process group at the deadline.
        marker = tmp_path / "child.pid"
        stuck = await FedCommand.start(
            ["sh", "-c", f"sleep 300 & echo $! > {marker}; cat >/dev/null; wait"], what="stuck"
        )
        with pytest.raises(CommandTimeout, match=r"stuck did not finish within 0\.5s"):
            await stuck.feed(b"x", timeout=0.5)
        assert stuck.returncode is not None
        child = int(marker.read_text())
        wait_for(lambda: _gone(child), timeout=10, what="the group's sleep to die")

        unused = await FedCommand.start(["sleep", "300"], what="unused")
        await unused.cancel()
        assert unused.returncode is not None and _gone(unused.pid)

    run(scenario())
