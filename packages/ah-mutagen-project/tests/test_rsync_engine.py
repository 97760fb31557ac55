"""The rsync engine against real sshd followers on loopback."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from ah_mutagen_project import (
    RsyncEngine,
    RsyncError,
    SshEndpoint,
    SyncJob,
    SyncOutcome,
    SyncTimeout,
    remote_digest_command,
    rsync_exclude_patterns,
    take_snapshot,
)
from ah_mutagen_project.digest_script import IgnoreRules

pytestmark = pytest.mark.skipif(shutil.which("rsync") is None, reason="rsync not installed")


def _jobs(fleet: Any, tmp_path: Path, count: int = 3) -> list[SyncJob]:
    return [
        SyncJob(name, fleet.alias(i), str(tmp_path / "followers" / name / "ws"))
        for i, name in enumerate(fleet.names[:count])
    ]


def _ssh_digest(fleet: Any, index: int, root: str, ignores: list[str] | None) -> str:
    """The follower's digest, computed there via remote_digest_command over plain ssh."""
    result = subprocess.run(
        ["ssh", "-F", str(fleet.ssh_config), fleet.alias(index),
         remote_digest_command(root, ignores)],
        capture_output=True, text=True, timeout=30, check=False, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_sync_many_propagates_changes_and_verifies_by_remote_digest(
    fleet: Any,
    tmp_path: Path,
    run: Callable[..., Any],
    build_tree: Callable[..., Path],
    sample_tree: dict[str, Any],
) -> None:
    leader = build_tree(tmp_path / "leader", sample_tree)
    engine = RsyncEngine(ssh_config_path=fleet.ssh_config)
    jobs = _jobs(fleet, tmp_path)
    # A follower's own installed dependencies: ignored paths are never deleted there.
    own = Path(jobs[1].dst_root) / "node_modules" / "follower-only.js"
    own.parent.mkdir(parents=True)
    own.write_text("installed on the follower\n")

    results = run(engine.sync_many(jobs, leader, None, 30.0))
    assert all(isinstance(r, SyncOutcome) for r in results.values()), results
    snap = take_snapshot(leader)
    for index, job in enumerate(jobs):
        dst = Path(job.dst_root)
        assert _ssh_digest(fleet, index, job.dst_root, None) == snap.id
        assert (dst / "bin/run.sh").stat().st_mode & 0o111 == 0o111
        assert os.readlink(dst / "links/to-dir") == "../src"
        assert os.readlink(dst / "links/dangling") == "no/such/target"
        assert (dst / "docs/empty").is_dir()
        assert (dst / "dist/bundle.js").is_file()
        for ignored in ("node_modules/left-pad", "src/node_modules", ".venv", ".git",
                        "src/.hg", "target"):  # fmt: skip
            assert not (dst / ignored).exists(), f"{ignored} was copied to {job.name}"
    assert own.read_text() == "installed on the follower\n"

    # Create, delete, rename, chmod, retarget: all propagate; nothing else is re-sent.
    (leader / "src/new.py").write_text("new\n")
    (leader / "README.md").unlink()
    (leader / "src/pkg").rename(leader / "src/pkg2")
    (leader / "src/app.py").chmod(0o755)
    (leader / "links/to-readme").unlink()
    (leader / "links/to-readme").symlink_to("../src/new.py")
    shutil.rmtree(leader / "docs")
    results = run(engine.sync_many(jobs, leader, None, 30.0))
    snap = take_snapshot(leader)
    for index, job in enumerate(jobs):
        outcome = results[job.name]
        assert isinstance(outcome, SyncOutcome), outcome
        assert "README.md" in outcome.deleted and "src/pkg" in outcome.deleted
        assert "src/new.py" in outcome.changed and "src/pkg2/data.bin" in outcome.changed
        assert "dist/bundle.js" not in outcome.changed
        assert _ssh_digest(fleet, index, job.dst_root, None) == snap.id
        assert not (Path(job.dst_root) / "src/pkg").exists()
    assert own.exists()
    # A no-op sync changes nothing.
    again = run(engine.sync(fleet.alias(0), leader, jobs[0].dst_root, None, 30.0))
    assert again.changed == () and again.deleted == ()


def test_repo_override_of_ignores_changes_what_is_copied(
    fleet: Any,
    tmp_path: Path,
    run: Callable[..., Any],
    build_tree: Callable[..., Path],
    sample_tree: dict[str, Any],
) -> None:
    leader = build_tree(tmp_path / "leader", sample_tree)
    dst = tmp_path / "f0" / "ws"
    override = ["dist", "docs/empty/", "links/to-*"]
    engine = RsyncEngine(ssh_config_path=fleet.ssh_config)
    run(engine.sync(fleet.alias(0), leader, str(dst), override, 30.0))
    assert (dst / "node_modules/left-pad/index.js").is_file()
    assert (dst / "src/node_modules/inner.js").is_file()
    assert not (dst / "dist").exists() and not (dst / ".git").exists()
    assert not (dst / "docs/empty").exists() and (dst / "docs").is_dir()
    assert not (dst / "links/to-readme").exists() and (dst / "links/dangling").is_symlink()
    assert _ssh_digest(fleet, 0, str(dst), override) == take_snapshot(leader, override).id


def test_tampered_follower_is_detected_named_and_repaired(
    fleet: Any,
    tmp_path: Path,
    run: Callable[..., Any],
    build_tree: Callable[..., Path],
    sample_tree: dict[str, Any],
) -> None:
    leader = build_tree(tmp_path / "leader", sample_tree)
    dst = tmp_path / "f2" / "ws"
    engine = RsyncEngine(ssh_config_path=fleet.ssh_config)
    run(engine.sync(fleet.alias(2), leader, str(dst), None, 30.0))
    snap = take_snapshot(leader)
    # Same size, mtime restored to the nanosecond: rsync's quick check cannot see it.
    victim = dst / "src/app.py"
    before = victim.stat()
    victim.write_text("print('APP')\n")
    os.utime(victim, ns=(before.st_atime_ns, before.st_mtime_ns))
    (dst / "stray.txt").write_text("left behind\n")
    remote = run(engine.digest(fleet.alias(2), str(dst), None, 30.0, manifest=True))
    assert remote.id != snap.id
    diff = snap.manifest.diff(remote.manifest)
    assert diff.changed == ("src/app.py",) and diff.added == ("stray.txt",)
    assert diff.removed == ()
    plain = run(engine.sync(fleet.alias(2), leader, str(dst), None, 30.0))
    assert "src/app.py" not in plain.changed and plain.deleted == ("stray.txt",)
    assert run(engine.digest(fleet.alias(2), str(dst), None, 30.0)).id != snap.id
    forced = run(engine.sync(fleet.alias(2), leader, str(dst), None, 30.0, checksum=True))
    assert forced.checksum and "src/app.py" in forced.changed
    assert run(engine.digest(fleet.alias(2), str(dst), None, 30.0)).id == snap.id


def test_paused_follower_times_out_at_its_deadline_while_others_succeed(
    fleet: Any, tmp_path: Path, run: Callable[..., Any], build_tree: Callable[..., Path]
) -> None:
    leader = build_tree(tmp_path / "leader", {"a.txt": "a\n", "d/b.txt": "b\n"})
    engine = RsyncEngine(ssh_config_path=fleet.ssh_config)
    jobs = _jobs(fleet, tmp_path)
    paused = fleet.sshds[1]
    paused.pause()
    try:
        started = time.monotonic()
        results = run(engine.sync_many(jobs, leader, None, 3.0))
        elapsed = time.monotonic() - started
    finally:
        paused.resume()
    lagging = results["f1"]
    assert isinstance(lagging, SyncTimeout), lagging
    assert lagging.host == "ah-f1" and "ah-f1" in str(lagging) and "3s" in str(lagging)
    assert 3.0 <= elapsed < 15.0
    for name in ("f0", "f2"):
        assert isinstance(results[name], SyncOutcome), results[name]
    assert (tmp_path / "followers/f0/ws/d/b.txt").read_text() == "b\n"


def test_explicit_endpoint_and_ssh_command(
    fleet: Any, tmp_path: Path, run: Callable[..., Any], build_tree: Callable[..., Path]
) -> None:
    leader = build_tree(tmp_path / "leader", {"x": "x\n", "tool": ("exec", "#!/bin/sh\n")})
    sshd = fleet.sshds[0]
    ssh_command = ["ssh", "-F", "/dev/null", "-o", "IdentitiesOnly=yes",
                   "-o", "StrictHostKeyChecking=yes",
                   "-o", f"UserKnownHostsFile={sshd.known_hosts_path}"]  # fmt: skip
    engine = RsyncEngine(ssh_command=ssh_command)
    endpoint = SshEndpoint(sshd.user, sshd.listen, sshd.port, str(sshd.client_key_path))
    dst = tmp_path / "explicit" / "deep" / "ws"
    outcome = run(engine.sync(endpoint, leader, str(dst), [], 30.0))
    assert outcome.host == f"{sshd.user}@127.0.0.1:{sshd.port}"
    digest = run(engine.digest(endpoint, str(dst), [], 30.0))
    assert digest.id == take_snapshot(leader, []).id


def test_rsync_failures_are_named_and_explained(
    fleet: Any, tmp_path: Path, run: Callable[..., Any], build_tree: Callable[..., Path]
) -> None:
    leader = build_tree(tmp_path / "leader", {"x": "x\n"})
    engine = RsyncEngine(ssh_config_path=fleet.ssh_config)
    with pytest.raises(RsyncError) as info:
        run(engine.sync("ah-no-such-alias.invalid", leader, str(tmp_path / "d"), None, 20.0))
    # ssh fails at once; rsync reports that as 255 or, racing its own reader, as 12.
    assert info.value.ssh_failed and "ssh failed" in str(info.value), info.value
    assert info.value.returncode in (12, 255) and "ah-no-such-alias.invalid" in str(info.value)
    blocker = tmp_path / "file-not-dir"
    blocker.write_text("x")
    with pytest.raises(RsyncError) as info:
        run(engine.sync(fleet.alias(0), leader, str(blocker / "ws"), None, 20.0))
    assert info.value.returncode in (3, 11, 23) and "ah-f0" in str(info.value)


@pytest.mark.parametrize(
    "patterns",
    [
        ["build", "*.log"],
        ["a/build", "/top", "dir-only/"],
        ["src/*/gen", "x?z", "[!b]ar"],
    ],
)
def test_exclude_translation_matches_the_snapshot_rule(
    tmp_path: Path, build_tree: Callable[..., Path], patterns: list[str]
) -> None:
    """Local rsync (no ssh) with the translated excludes copies exactly what the snapshot
    keeps: the ignore rule means the same to both."""
    names = ["build", "top", "dir-only", "x.log", "xyz", "bar", "car", "gen", "keep"]
    spec: dict[str, Any] = {}
    for parent in ["", "a/", "src/p/", "top/", "deep/a/"]:
        for name in names:
            spec[f"{parent}{name}/f"] = "d"  # as a directory
            spec[f"{parent}files/{name}"] = "f"  # as a file
    leader = build_tree(tmp_path / "leader", spec)
    dst = tmp_path / "copy"
    excludes = [f"--exclude={p}" for p in rsync_exclude_patterns(patterns)]
    subprocess.run(["rsync", "-rlpt", *excludes, f"{leader}/", f"{dst}/"], check=True, timeout=60)
    assert take_snapshot(dst, []).id == take_snapshot(leader, patterns).id
    rules = IgnoreRules(patterns)
    assert rules.patterns[:4] == (".git", ".hg", ".svn", ".jj")


@pytest.mark.parametrize(
    ("code", "stderr", "ssh_failed"),
    [
        (255, "ssh: connect to host 10.0.0.9 port 22: Connection refused", True),
        (
            12,
            "ssh: Could not resolve hostname nowhere.invalid: Name or service not known\n"
            "rsync: connection unexpectedly closed (0 bytes received so far) [sender]\n"
            "rsync error: error in rsync protocol data stream (code 12) at io.c(285)",
            True,
        ),
        (
            12,
            "Host key verification failed.\n"
            "rsync: connection unexpectedly closed (0 bytes received so far) [sender]",
            True,
        ),
        # The stream broke mid-transfer: rsync's error, not ssh's.
        (12, "rsync: connection unexpectedly closed (81920 bytes received so far)", False),
        # A login shell that prints text: the data stream is garbage, ssh was fine.
        (12, "protocol version mismatch -- is your shell clean?", False),
        (23, "rsync: mkdir failed: Permission denied", False),
    ],
)
def test_an_ssh_failure_is_named_whatever_code_rsync_gave_it(
    code: int, stderr: str, ssh_failed: bool
) -> None:
    error = RsyncError("ah-f0", code, stderr)
    assert error.ssh_failed is ssh_failed
    assert ("ssh failed" in str(error)) is ssh_failed
    assert f"exit status {code}" in str(error) and "ah-f0" in str(error)
