"""What the fleet fence added: the follower's stat cache (``--cache``), the fast content id and
sort, the isolated digest command, run_command with output in files (a ControlMaster keeps
an ssh's stdio), Windows followers' no-exec-bit comparison, step deadlines in messages, and
``mutagen daemon stop``."""

from __future__ import annotations

import asyncio
import hashlib
import marshal
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ah_domain_types import FenceHostState, FenceMetadata
from ah_mutagen_project import (
    FencePlan,
    RemoteDigest,
    describe_fence_failure,
    remote_digest_command,
    run_fence,
    take_snapshot,
)
from ah_mutagen_project import digest_script as ds
from ah_mutagen_project._process import CommandTimeout, run_command

SCRIPT = Path(ds.__file__)


# --------------------------------------------------------------------------- the stat cache


def _scan(
    root: Path, cache_file: Path, window: float = 0.0, *, inline: bool = True
) -> tuple[str, ds.StatCache]:
    """A digest with the stat cache: ``inline`` the way the command runs it (the lookup in
    scan_tree's loop), else through the ``file_digest`` callback form."""
    cache = ds.StatCache(str(cache_file), str(root), racy_window_s=window)
    rules = ds.IgnoreRules(["node_modules"])
    if inline:
        entries = ds.scan_tree(str(root), rules, cache=cache)
    else:
        entries = ds.scan_tree(str(root), rules, cache.digest)
    cache.save()
    return ds.content_id(entries, presorted=True), cache


def _cache_document(cache_file: Path) -> tuple[str, str, dict[str, Any]]:
    document = marshal.loads(cache_file.read_bytes())
    assert isinstance(document, tuple) and len(document) == 3
    return document


@pytest.mark.parametrize("inline", [True, False], ids=["inline", "callback"])
def test_stat_cache_reuses_hashes_and_sees_through_a_restored_mtime(
    tmp_path: Path, inline: bool
) -> None:
    root = tmp_path / "tree"
    (root / "pkg").mkdir(parents=True)
    for index in range(20):
        (root / "pkg" / f"m{index}.py").write_text(f"VALUE = {index}\n")
    cache_file = tmp_path / "cache.bin"

    first, cold = _scan(root, cache_file, inline=inline)
    assert (cold.hashed, cold.cached) == (20, 0)
    assert first == take_snapshot(root, ["node_modules"]).id
    fmt, cached_root, files = _cache_document(cache_file)
    assert (fmt, cached_root, len(files)) == (ds.CACHE_FORMAT, str(root), 20)

    second, warm = _scan(root, cache_file, inline=inline)
    assert (second, warm.hashed, warm.cached) == (first, 0, 20)
    assert not warm.save(), "an unchanged cache is not rewritten"

    # Same size, mtime put back: only the ctime (and the content) tells.
    victim = root / "pkg" / "m7.py"
    before = victim.stat()
    victim.write_text("VALUE = 8\n")
    os.utime(victim, ns=(before.st_atime_ns, before.st_mtime_ns))
    third, after = _scan(root, cache_file, inline=inline)
    assert (after.hashed, after.cached) == (1, 19)
    assert third != first and third == take_snapshot(root, ["node_modules"]).id


def test_stat_cache_racy_window_and_damaged_or_foreign_caches(tmp_path: Path) -> None:
    root = tmp_path / "tree"
    root.mkdir()
    (root / "young.txt").write_text("just written\n")
    cache_file = tmp_path / "cache.bin"
    # Written a moment ago: inside the 2 s window, so hashed every time and never stored.
    for _ in range(2):
        _, cache = _scan(root, cache_file, window=ds.RACY_WINDOW_S)
        assert (cache.hashed, cache.cached) == (1, 0)
    assert not cache_file.exists() or _cache_document(cache_file)[2] == {}

    _scan(root, cache_file)  # window 0: stored
    assert _scan(root, cache_file)[1].cached == 1
    for damage in (
        b"not marshal",
        marshal.dumps(_cache_document(cache_file))[:-3],  # truncated
        marshal.dumps(("other", str(root), {})),
    ):
        cache_file.write_bytes(damage)
        tree_id, cache = _scan(root, cache_file)
        assert (cache.hashed, tree_id) == (1, take_snapshot(root).id)
    other_root = tmp_path / "elsewhere"
    other_root.mkdir()
    (other_root / "young.txt").write_text("just written\n")
    _, cache = _scan(other_root, cache_file)  # the cache names another root
    assert cache.hashed == 1
    _scan(root, cache_file)
    _, _, rows = _cache_document(cache_file)
    ((key, sha),) = rows.values()
    for bad in [(1, 2), (key, 2), (key[:3], sha), [key, sha], (key, sha, sha)]:
        cache_file.write_bytes(marshal.dumps((ds.CACHE_FORMAT, str(root), {"young.txt": bad})))
        _, cache = _scan(root, cache_file)
        assert cache.hashed == 1, bad


def test_digest_command_with_cache_flag_and_the_auto_location(tmp_path: Path) -> None:
    root = tmp_path / "tree"
    root.mkdir()
    (root / "a.txt").write_text("a\n")
    home = tmp_path / "home"
    env = {"HOME": str(home), "PATH": os.environ["PATH"]}
    done = subprocess.run(
        [sys.executable, "-I", "-S", str(SCRIPT), "--root", str(root), "--cache", "auto"],
        capture_output=True,
        text=True,
        env=env,
        check=False,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == take_snapshot(root).id
    key = hashlib.sha256(str(root).encode()).hexdigest()[:24]
    expected = home / ".cache" / "agent-harbor" / "tree-digest" / f"{key}.cache"
    assert ds.default_cache_path(str(root)).startswith(os.path.expanduser("~"))
    # The file is young (inside the racy window), so the cache may be empty, but it exists
    # only where documented, if at all.
    assert not (root / ".cache").exists()
    assert [p for p in home.rglob("*") if p.is_file()] in ([], [expected])

    command = remote_digest_command(str(root), ["dist"], cache=True, isolated=True)
    first_line = command.splitlines()[0]
    assert first_line.startswith("python3 -I -S - --root ")
    assert "--ignore dist --cache auto <<'AH_TREE_DIGEST_EOF'" in first_line
    inline = remote_digest_command("C:/ws", None, style="inline-powershell", isolated=True)
    assert inline.startswith("python3 -I -S -c ")
    assert "--cache" not in remote_digest_command(str(root)).splitlines()[0]


# --------------------------------------------------------------------------- fast paths

names = st.text(
    alphabet=st.sampled_from(["a", "B", "é", "€", "😀", "\udcff", "\udc80", "-", " "]),
    min_size=1,
    max_size=6,
)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(names, st.sampled_from(["f", "d", "l"]), st.integers(0, 1), st.integers(0, 99)),
        max_size=12,
        unique_by=lambda row: row[0],
    ),
    st.booleans(),
)
def test_content_id_fast_path_equals_the_field_by_field_definition(
    rows: list[tuple[str, str, int, int]], exec_bits: bool
) -> None:
    entries = [(path, kind, x, size, f"data-{path}") for path, kind, x, size in rows]
    reference = hashlib.sha256(
        (ds.FORMAT if exec_bits else ds.FORMAT + " no-exec-bit").encode() + b"\n"
    )
    for path, kind, x, size, data in sorted(entries, key=lambda e: ds.path_bytes(e[0])):
        fields = [
            ds.path_bytes(path),
            kind.encode(),
            b"1" if x and exec_bits else b"0",
            str(size).encode(),
            ds.path_bytes(data),
        ]
        reference.update(b"\0".join(fields) + b"\0")
    expected = ds.ID_PREFIX + reference.hexdigest()[: ds.ID_HEX_DIGITS]
    assert ds.content_id(list(reversed(entries)), exec_bits) == expected
    ordered = list(entries)
    ds._sort_by_path_bytes(ordered)
    assert [e[0] for e in ordered] == sorted((e[0] for e in entries), key=ds.path_bytes)
    assert ds.content_id(ordered, exec_bits, presorted=True) == expected


# --------------------------------------------------------------------------- run_command


def test_run_command_deadline_is_not_held_up_by_a_process_keeping_its_output(
    tmp_path: Path,
) -> None:
    """Like an ssh that handed its stdio to a ControlMaster stuck on a frozen follower: a
    process outside the killed group keeps the output descriptors open."""
    pid_file = tmp_path / "escaped.pid"
    script = f"setsid sleep 60 & echo $! > {pid_file}; echo started; sleep 60"
    started = time.monotonic()
    try:
        with pytest.raises(CommandTimeout) as timeout:
            asyncio.run(run_command(["sh", "-c", script], timeout=1.0, what="stuck"))
        took = time.monotonic() - started
        assert took < 5.0, f"the deadline took {took:.1f}s"
        assert "stuck did not finish within 1s" in str(timeout.value)
    finally:
        if pid_file.exists():
            os.kill(int(pid_file.read_text()), signal.SIGKILL)
    result = asyncio.run(
        run_command(["sh", "-c", "echo out; echo err >&2; exit 3"], timeout=10, what="x")
    )
    assert (result.returncode, result.stdout, result.stderr) == (3, b"out\n", b"err\n")


# --------------------------------------------------------------------------- exec bits


def test_followers_without_exec_bits_compare_against_the_no_exec_bit_id(tmp_path: Path) -> None:
    root = tmp_path / "tree"
    root.mkdir()
    (root / "run.sh").write_text("#!/bin/sh\n")
    (root / "run.sh").chmod(0o755)
    snapshot = take_snapshot(root)
    no_exec = snapshot.manifest.content_id(exec_bits=False)
    assert no_exec != snapshot.id
    plan = FencePlan(snapshot.id, ["win", "lin"], snapshot.manifest)
    assert plan.expected_id(False) == no_exec and plan.expected_id(True) == snapshot.id
    for host in ("win", "lin"):
        plan.begin(host)
        plan.synced(host)
    windows = plan.digested("win", RemoteDigest(no_exec, exec_bits=False))
    assert windows.state is FenceHostState.CONSISTENT  # type: ignore[union-attr]
    # A POSIX follower must match with the bits: the no-exec-bit id is a mismatch there.
    assert plan.digested("lin", RemoteDigest(no_exec)).__class__.__name__ == "SyncStep"
    with pytest.raises(ValueError, match="manifest"):
        FencePlan(snapshot.id, ["w"]).expected_id(False)


# --------------------------------------------------------------------------- messages


def test_a_steps_own_deadline_is_named_and_the_fence_deadline_honoured(
    run: Callable[..., Any], tmp_path: Path
) -> None:
    root = tmp_path / "tree"
    root.mkdir()
    snapshot = take_snapshot(root)

    async def sync(host: str, *, force: bool, timeout: float) -> object:
        if host == "slow":
            raise TimeoutError("mutagen flush (x.yml) did not finish within its 5s deadline")
        if host == "hung":
            await asyncio.Event().wait()
        return None

    async def digest(host: str, *, with_manifest: bool, timeout: float) -> RemoteDigest:
        return RemoteDigest(snapshot.id)

    async def fence() -> FenceMetadata:
        # The fence began earlier (say, with the snapshot): 0.5 s are left of its 7 s.
        deadline = asyncio.get_running_loop().time() + 0.5
        return await run_fence(snapshot, ["slow", "hung", "fast"], sync, digest, 7.0,
                               deadline=deadline)  # fmt: skip

    metadata = run(fence())
    slow, hung = metadata.hosts["slow"], metadata.hosts["hung"]
    assert slow.state is hung.state is FenceHostState.TIMEOUT
    assert slow.detail == (
        "no answer within the 7s fence deadline (during sync): "
        "mutagen flush (x.yml) did not finish within its 5s deadline"
    )
    assert hung.detail == "no answer within the 7s fence deadline (during sync)"
    assert 400 <= hung.took_ms < 3000
    assert metadata.hosts["fast"].state is FenceHostState.CONSISTENT
    message = describe_fence_failure(metadata)
    assert "timed out (lagging): hung, slow" in message
    assert "slow: no answer within the 7s fence deadline (during sync): mutagen flush" in message
    assert "--host/--tag" in message and "timeouts.fence" in message


# --------------------------------------------------------------------------- mutagen daemon

RECORDER = """#!/bin/sh
echo "$* data=$MUTAGEN_DATA_DIRECTORY" >> "$RECORD"
exit 1
"""


def test_stop_daemon_runs_with_the_projects_environment(
    run: Callable[..., Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ah_mutagen_project import MutagenProject

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "mutagen").write_text(RECORDER)
    (bin_dir / "mutagen").chmod(0o755)
    record = tmp_path / "record"
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("RECORD", str(record))
    project = MutagenProject(
        project_file=tmp_path / "s" / "mutagen.yml", env={"MUTAGEN_DATA_DIRECTORY": "/d/x"}
    )
    (tmp_path / "s").mkdir()
    run(project.stop_daemon(timeout=10))  # exit status 1 (no daemon) is fine
    assert record.read_text() == "daemon stop data=/d/x\n"


# --------------------------------------------------------------------------- listed sync


def test_sync_listed_touches_exactly_the_listed_paths(
    fleet: Any, tmp_path: Path, run: Callable[..., Any], build_tree: Callable[..., Path]
) -> None:
    from ah_mutagen_project import RsyncEngine

    leader = build_tree(
        tmp_path / "leader",
        {
            "keep.txt": "keep\n",
            "edit.txt": "old\n",
            "old-dir/a.txt": "a\n",
            "old-dir/sub/b.txt": "b\n",
            "becomes-file/c.txt": "c\n",
            "node_modules/dep.js": "leader dep\n",
        },
    )
    follower = tmp_path / "follower" / "ws"
    engine = RsyncEngine(ssh_config_path=fleet.ssh_config)
    run(engine.sync(fleet.alias(0), leader, str(follower), None, 30))
    proven = take_snapshot(leader)
    os.utime(follower / "keep.txt", (978_307_200, 978_307_200))  # not listed: left alone
    (follower / "node_modules").mkdir()
    (follower / "node_modules" / "own.js").write_text("the follower's own\n")

    (leader / "edit.txt").write_text("new\n")  # same size, so --ignore-times matters
    os.utime(leader / "edit.txt", ns=(0, (follower / "edit.txt").stat().st_mtime_ns))
    import shutil as _shutil

    _shutil.rmtree(leader / "old-dir")
    _shutil.rmtree(leader / "becomes-file")
    (leader / "becomes-file").write_text("now a file\n")
    (leader / "new-dir").mkdir()
    (leader / "new-dir" / "n.txt").write_text("n\n")
    (leader / "odd\nname").write_text("newline in the name\n")
    wanted = take_snapshot(leader)
    diff = proven.manifest.diff(wanted.manifest)
    paths = sorted({*diff.added, *diff.changed, "old-dir"})
    outcome = run(
        engine.sync_listed(
            fleet.alias(0), leader, str(follower), None, paths, 30, list_dir=tmp_path / "lists"
        )
    )
    assert take_snapshot(follower).id == wanted.id
    assert (follower / "keep.txt").stat().st_mtime == 978_307_200
    assert "old-dir" in outcome.deleted
    assert (follower / "node_modules" / "own.js").is_file()
    assert list((tmp_path / "lists").iterdir()) == []  # the list file is gone
