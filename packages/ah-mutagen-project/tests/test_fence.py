"""The fence: the FencePlan state machine, and run_fence with the real rsync engine against
real sshd followers."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ah_domain_types import (
    ExitCode,
    FenceHostState,
    FenceResultEvent,
    FenceStartedEvent,
    decode_event_json,
    encode_event_json,
)
from ah_mutagen_project import (
    FenceError,
    FencePlan,
    HostVerdict,
    Manifest,
    RemoteDigest,
    RsyncEngine,
    RsyncFenceDriver,
    SyncJob,
    require_consistent,
    run_fence,
    take_snapshot,
)
from ah_mutagen_project.fence import DigestStep, SyncStep

SNAP = "snap-" + "a" * 32
OTHER = "snap-" + "b" * 32


def _manifest(*paths: str) -> Manifest:
    return Manifest.from_tuples([[p, "f", 0, 1, "x"] for p in paths])


def test_plan_consistent_on_first_digest() -> None:
    plan = FencePlan(SNAP, ["h1"])
    assert plan.begin("h1") == SyncStep("h1", force=False)
    assert plan.stage("h1") == "sync"
    assert plan.synced("h1") == DigestStep("h1", with_manifest=False)
    assert plan.digested("h1", RemoteDigest(SNAP)) == HostVerdict("h1", FenceHostState.CONSISTENT)
    assert plan.done


def test_plan_mismatch_forces_one_resync_then_names_paths() -> None:
    plan = FencePlan(SNAP, ["h1", "h2"], _manifest("a", "b"))
    for host in ("h1", "h2"):
        plan.begin(host)
        plan.synced(host)
        assert plan.digested(host, RemoteDigest(OTHER)) == SyncStep(host, force=True)
        assert plan.stage(host) == "forced resync"
        assert plan.synced(host) == DigestStep(host, with_manifest=True)
    repaired = plan.digested("h1", RemoteDigest(SNAP, _manifest("a", "b")))
    assert repaired == HostVerdict("h1", FenceHostState.CONSISTENT, "repaired by a forced resync")
    verdict = plan.digested("h2", RemoteDigest(OTHER, _manifest("a", "c")))
    assert isinstance(verdict, HostVerdict) and verdict.state is FenceHostState.ERROR
    assert verdict.detail is not None
    assert "missing: b" in verdict.detail and "unexpected: c" in verdict.detail
    assert plan.done


def test_plan_rejects_misuse() -> None:
    with pytest.raises(ValueError, match="h1"):
        FencePlan(SNAP, ["h1", "h1"])
    with pytest.raises(ValueError, match="no hosts"):
        FencePlan(SNAP, [])
    plan = FencePlan(SNAP, ["h1"])
    with pytest.raises(KeyError, match="nope"):
        plan.begin("nope")
    plan.begin("h1")
    with pytest.raises(RuntimeError, match="DigestStep"):
        plan.digested("h1", RemoteDigest(SNAP))
    timed_out = plan.timed_out("h1", 5.0)
    assert timed_out.state is FenceHostState.TIMEOUT
    assert timed_out.detail == "no answer within the 5s fence deadline (during sync)"


@settings(max_examples=100, deadline=None)
@given(st.lists(st.booleans(), min_size=1, max_size=4))
def test_plan_at_most_two_syncs_and_consistent_iff_last_digest_matched(
    matches: list[bool],
) -> None:
    plan = FencePlan(SNAP, ["h"], _manifest("a"))
    step = plan.begin("h")
    syncs = 0
    digests = iter(matches)
    last = None
    while not isinstance(step, HostVerdict):
        if isinstance(step, SyncStep):
            syncs += 1
            step = plan.synced("h")
        else:
            last = next(digests, False)
            step = plan.digested("h", RemoteDigest(SNAP if last else OTHER, _manifest("a")))
    assert syncs <= 2
    assert (step.state is FenceHostState.CONSISTENT) == bool(last)


class _Recorder:
    def __init__(self) -> None:
        self.events: list[FenceStartedEvent | FenceResultEvent] = []

    def __call__(self, event: FenceStartedEvent | FenceResultEvent) -> None:
        # Events must survive the wire format the access point stores.
        decoded = decode_event_json(encode_event_json(event))
        assert decoded == event
        self.events.append(event)


def _driver(
    fleet: Any, tmp_path: Path, leader: Path, ignores: list[str] | None = None
) -> RsyncFenceDriver:
    jobs = [
        SyncJob(name, fleet.alias(i), str(tmp_path / "followers" / name / "ws"))
        for i, name in enumerate(fleet.names)
    ]
    return RsyncFenceDriver(RsyncEngine(ssh_config_path=fleet.ssh_config), leader, ignores, jobs)


@pytest.mark.skipif(shutil.which("rsync") is None, reason="rsync not installed")
def test_fence_all_consistent_then_repairs_and_reports_what_cannot_be_repaired(
    fleet: Any,
    tmp_path: Path,
    run: Callable[..., Any],
    build_tree: Callable[..., Path],
    sample_tree: dict[str, Any],
) -> None:
    leader = build_tree(tmp_path / "leader", sample_tree)
    driver = _driver(fleet, tmp_path, leader)
    snap = take_snapshot(leader)
    recorder = _Recorder()
    meta = run(
        run_fence(snap, fleet.names, driver.sync, driver.digest, 30.0, recorder, session_id="s1")
    )
    assert {h: r.state for h, r in meta.hosts.items()} == dict.fromkeys(
        fleet.names, FenceHostState.CONSISTENT
    )
    assert require_consistent(meta) is meta and meta.snapshot_id == snap.id
    started, result = recorder.events
    assert isinstance(started, FenceStartedEvent) and isinstance(result, FenceResultEvent)
    assert started.snapshot_id == result.snapshot_id == snap.id
    assert started.hosts == fleet.names and started.session_id == "s1"
    assert result.hosts == meta.hosts

    # f0: a same-size edit with the mtime restored (rsync's quick check misses it) -> the
    #     forced resync repairs it.
    # f1: the leader removed a directory that, on f1, still holds the follower's own ignored
    #     node_modules: rsync may not delete it, so the fence names it.
    # f2: untouched.
    followers = tmp_path / "followers"
    victim = followers / "f0/ws/src/app.py"
    before = victim.stat()
    victim.write_text("print('APP')\n")
    os.utime(victim, ns=(before.st_atime_ns, before.st_mtime_ns))
    own = followers / "f1/ws/docs/node_modules/cache.js"
    own.parent.mkdir(parents=True)
    own.write_text("follower's own\n")
    shutil.rmtree(leader / "docs")
    snap2 = take_snapshot(leader)
    meta2 = run(run_fence(snap2, fleet.names, driver.sync, driver.digest, 30.0, recorder))
    assert meta2.hosts["f0"].state is FenceHostState.CONSISTENT
    assert meta2.hosts["f0"].detail == "repaired by a forced resync"
    assert meta2.hosts["f2"].state is FenceHostState.CONSISTENT
    failed = meta2.hosts["f1"]
    assert failed.state is FenceHostState.ERROR
    assert failed.detail is not None and "unexpected: docs" in failed.detail
    with pytest.raises(FenceError) as info:
        require_consistent(meta2)
    assert info.value.lagging_hosts == ["f1"]
    assert "f1: tree is snap-" in str(info.value) and "--host/--tag" in str(info.value)
    assert info.value.exit_code is ExitCode.HOSTS_FAILED


@pytest.mark.skipif(shutil.which("rsync") is None, reason="rsync not installed")
def test_fence_timeout_names_the_lagging_host(
    fleet: Any, tmp_path: Path, run: Callable[..., Any], build_tree: Callable[..., Path]
) -> None:
    leader = build_tree(tmp_path / "leader", {"a.txt": "a\n", "sub/b.txt": "b\n"})
    driver = _driver(fleet, tmp_path, leader, [])
    snap = take_snapshot(leader, [])
    paused = fleet.sshds[2]
    paused.pause()
    try:
        started = time.monotonic()
        meta = run(run_fence(snap, fleet.names, driver.sync, driver.digest, 4.0))
        elapsed = time.monotonic() - started
    finally:
        paused.resume()
    assert 4.0 <= elapsed < 20.0
    assert meta.lagging_hosts() == ["f2"]
    lagging = meta.hosts["f2"]
    assert lagging.state is FenceHostState.TIMEOUT
    assert lagging.detail is not None and "during sync" in lagging.detail
    assert 3500 <= lagging.took_ms < 20_000
    assert meta.hosts["f0"].state is FenceHostState.CONSISTENT
    message = str(FenceError(meta))
    assert "timed out (lagging): f2" in message
    assert "--host/--tag" in message and "timeouts.fence" in message


def test_fence_reports_failures_of_the_callables(run: Callable[..., Any], tmp_path: Path) -> None:
    (tmp_path / "ws").mkdir()
    snap = take_snapshot(tmp_path / "ws", [])

    async def sync(host: str, *, force: bool, timeout: float) -> None:
        if host == "broken":
            raise RuntimeError("rsync to ah-broken failed with exit status 12")

    async def digest(host: str, *, with_manifest: bool, timeout: float) -> RemoteDigest:
        return RemoteDigest(snap.id, snap.manifest if with_manifest else None)

    meta = run(run_fence(snap, ["ok", "broken"], sync, digest, 10.0))
    assert meta.hosts["ok"].consistent
    assert meta.hosts["broken"].state is FenceHostState.ERROR
    assert (
        meta.hosts["broken"].detail == "sync failed: rsync to ah-broken failed with exit status 12"
    )
