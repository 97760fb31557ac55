"""The fence end to end: real access point, real followers each with a real sshd, real rsync
and OpenSSH, the real ``ah-fleetctl`` console script run in a leader workspace.

One fleet serves the whole module (lin-a, lin-b, lin-c). Every test works in a fresh leader
workspace (a temp dir marked as a repo by ``.git/``); each fence makes the followers'
workspaces replicas of it (paths ignored on the leader are left alone on the followers, so
tests assert on paths of their own).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import pytest
from loguru import logger

from ah_config import ResolvedConfig, load_config
from ah_domain_types import (
    ConfigFile,
    ExitCode,
    FenceHostState,
    FenceResultEvent,
    FenceStartedEvent,
    FollowerStatus,
)
from ah_fleetctl import fencing
from ah_fleetctl.dataplane import DirectConnector, FleetLinks
from ah_fleetctl.fencing import fence_selected
from ah_harness_local.fleet import FollowerSpec, LocalFleet
from ah_mutagen_project import FenceError, require_consistent, take_snapshot

NAMES = ("lin-a", "lin-b", "lin-c")
SNAPSHOTS = Path(__file__).parent / "snapshots"
CLI_TIMEOUT_S = 90.0


def _console_script() -> list[str]:
    script = Path(sys.executable).parent / "ah-fleetctl"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "ah_fleetctl"]


@dataclass(frozen=True)
class Result:
    args: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        return json.loads(self.stdout)

    def __str__(self) -> str:
        return (
            f"ah-fleetctl {' '.join(self.args)} -> {self.returncode}\n"
            f"--- stdout\n{self.stdout}--- stderr\n{self.stderr}"
        )


@dataclass
class FenceFleet:
    fleet: LocalFleet
    env: dict[str, str]
    base: Path

    def cli(self, workspace: Path, *args: str, env: Mapping[str, str] | None = None) -> Result:
        done = subprocess.run(
            [*_console_script(), *args],
            cwd=workspace,
            env={**self.env, **(env or {})},
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=CLI_TIMEOUT_S,
            check=False,
        )
        return Result(tuple(args), done.returncode, done.stdout, done.stderr)

    def workspace(self, name: str) -> Path:
        return self.fleet.follower(name).workspace


@pytest.fixture(scope="module")
def fence_fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FenceFleet]:
    base = tmp_path_factory.mktemp("fence")
    specs = [FollowerSpec(name, {"role": name[-1]}) for name in NAMES]
    with LocalFleet(specs, base_dir=base / "fleet") as fleet:
        env = {**fleet.env(), "NO_COLOR": "1"}
        env.pop("RUST_LOG", None)
        yield FenceFleet(fleet=fleet, env=env, base=base)


def make_workspace(root: Path, files: Mapping[str, str | bytes] | None = None) -> Path:
    """A leader workspace: a repo root (``.git/``) holding ``files``."""
    (root / ".git").mkdir(parents=True)
    (root / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    for rel, content in (files or {}).items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
    return root


def fence_ok(ff: FenceFleet, workspace: Path, *args: str) -> dict[str, Any]:
    done = ff.cli(workspace, "fence", "--json", *args)
    assert done.returncode == 0, done
    document: dict[str, Any] = done.json()
    assert set(document["hosts"]) == set(NAMES), done
    assert all(h["state"] == "consistent" for h in document["hosts"].values()), done
    return document


def follower_id(ff: FenceFleet, name: str, ignores: Sequence[str] | None = None) -> str:
    return take_snapshot(ff.workspace(name), ignores).id


# --------------------------------------------------------------------------- the run


def test_run_sees_the_file_just_edited_on_the_leader(
    fence_fleet: FenceFleet, tmp_path: Path
) -> None:
    ws = make_workspace(tmp_path / "ws", {"notes.txt": "first draft\n", "src/app.py": "x = 1\n"})
    first = fence_fleet.cli(ws, "run", "--", "cat", "notes.txt")
    assert first.returncode == 0, first
    (ws / "notes.txt").write_text("second draft, not committed\n")
    done = fence_fleet.cli(ws / "src", "run", "--", "cat", "../notes.txt")
    assert done.returncode == 0, done
    for name in NAMES:
        assert f"{name} | second draft, not committed" in done.stdout, done
    assert "first draft" not in done.stdout
    assert "3 succeeded, 0 failed, 0 unreachable" in done.stdout, done


# --------------------------------------------------------------------------- ignores


def test_ignores_follow_config_and_the_repo_override(
    fence_fleet: FenceFleet, tmp_path: Path
) -> None:
    ws = make_workspace(
        tmp_path / "ws",
        {
            "src/main.py": "print('hi')\n",
            "node_modules/left-pad/index.js": "module.exports = 1\n",
            ".venv/bin/activate": "# venv\n",
            "dist/bundle-one.js": "one\n",
        },
    )
    fence_ok(fence_fleet, ws)
    for name in NAMES:
        copy = fence_fleet.workspace(name)
        assert (copy / "src" / "main.py").read_text() == "print('hi')\n"
        assert not (copy / "node_modules" / "left-pad").exists()
        assert not (copy / ".venv" / "bin" / "activate").exists()
        assert not (copy / ".git").exists()
        assert (copy / "dist" / "bundle-one.js").read_text() == "one\n"

    # The repo's own config replaces the list: dist is ignored now, node_modules and .venv
    # are not (VCS metadata always is).
    (ws / ".agents").mkdir()
    (ws / ".agents" / "config.toml").write_text('sync-ignores = ["dist"]\n')
    (ws / "dist" / "bundle-two.js").write_text("two\n")
    document = fence_ok(fence_fleet, ws)
    assert document["snapshotId"] == take_snapshot(ws, ["dist"]).id
    for name in NAMES:
        copy = fence_fleet.workspace(name)
        assert (copy / "node_modules" / "left-pad" / "index.js").is_file()
        assert (copy / ".venv" / "bin" / "activate").is_file()
        assert (copy / ".agents" / "config.toml").is_file()
        assert not (copy / "dist" / "bundle-two.js").exists()
        assert not (copy / ".git").exists()
        assert follower_id(fence_fleet, name, ["dist"]) == document["snapshotId"]


# --------------------------------------------------------------------------- tree changes


def _tree_state(root: Path) -> dict[str, tuple[str, Any]]:
    state: dict[str, tuple[str, Any]] = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if rel.split("/")[0] in (".git", "node_modules", ".venv", "dist"):
            continue
        if path.is_symlink():
            state[rel] = ("link", os.readlink(path))
        elif path.is_dir():
            state[rel] = ("dir", None)
        else:
            mode = path.stat().st_mode
            state[rel] = ("file", (path.read_bytes(), bool(mode & stat.S_IXUSR)))
    return state


def test_deletes_renames_symlinks_and_exec_bits_propagate(
    fence_fleet: FenceFleet, tmp_path: Path
) -> None:
    ws = make_workspace(
        tmp_path / "ws",
        {
            "old-dir/inner/a.txt": "a\n",
            "old-dir/b.txt": "b\n",
            "gone.txt": "delete me\n",
            "name-before.txt": "renamed\n",
            "tools/build.sh": "#!/bin/sh\necho build\n",
            "tools/plain.sh": "#!/bin/sh\necho plain\n",
            "empty-later/x": "x\n",
            "stable.txt": "never changes\n",
        },
    )
    (ws / "tools" / "build.sh").chmod(0o755)
    (ws / "link-to-b").symlink_to("old-dir/b.txt")
    fence_ok(fence_fleet, ws)
    for name in NAMES:
        assert _tree_state(fence_fleet.workspace(name)) == _tree_state(ws)
    # An mtime-only change on a follower: content (all the fence proves) is the same. A full
    # rsync would reset the mtime; the next fence sends only what changed since the
    # manifest it proved there, so this file stays untouched.
    stable = fence_fleet.workspace("lin-a") / "stable.txt"
    os.utime(stable, (978_307_200, 978_307_200))

    (ws / "old-dir").rename(ws / "new-dir")
    (ws / "gone.txt").unlink()
    (ws / "name-before.txt").rename(ws / "name-after.txt")
    (ws / "tools" / "build.sh").chmod(0o644)  # exec bit removed ...
    (ws / "tools" / "plain.sh").chmod(0o755)  # ... and added
    (ws / "link-to-b").unlink()
    (ws / "link-to-b").symlink_to("new-dir/b.txt")
    (ws / "dir-link").symlink_to("new-dir")
    (ws / "dangling").symlink_to("no/such/target")
    (ws / "empty-later" / "x").unlink()
    document = fence_ok(fence_fleet, ws)
    expected = _tree_state(ws)
    assert expected["empty-later"] == ("dir", None)
    for name in NAMES:
        copy = fence_fleet.workspace(name)
        assert _tree_state(copy) == expected, name
        assert not (copy / "old-dir").exists() and not (copy / "gone.txt").exists()
        assert os.access(copy / "tools" / "plain.sh", os.X_OK)
        assert not os.access(copy / "tools" / "build.sh", os.X_OK)
        assert os.readlink(copy / "dir-link") == "new-dir"
        assert follower_id(fence_fleet, name) == document["snapshotId"]
    assert stable.stat().st_mtime == 978_307_200, "the fence re-sent an unchanged file"


# --------------------------------------------------------------------------- tampering


def test_tampering_on_a_follower_is_detected_and_repaired(
    fence_fleet: FenceFleet, tmp_path: Path
) -> None:
    ws = make_workspace(tmp_path / "ws", {"lib/core.py": "VALUE = 1\n", "README": "read me\n"})
    fence_ok(fence_fleet, ws)

    # lin-b: same size, mtime put back — invisible to rsync's quick check, not to the digest.
    core = fence_fleet.workspace("lin-b") / "lib" / "core.py"
    before = core.stat()
    core.write_text("VALUE = 2\n")
    os.utime(core, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert core.stat().st_size == before.st_size
    # lin-c: an extra file and a deleted one.
    (fence_fleet.workspace("lin-c") / "stray.txt").write_text("left behind\n")
    (fence_fleet.workspace("lin-c") / "README").unlink()

    document = fence_ok(fence_fleet, ws, "--session", "fence-tamper-1")
    assert document["hosts"]["lin-b"]["detail"] == "repaired by a forced resync", document
    assert core.read_text() == "VALUE = 1\n"
    assert not (fence_fleet.workspace("lin-c") / "stray.txt").exists()
    assert (fence_fleet.workspace("lin-c") / "README").read_text() == "read me\n"
    assert document["hosts"]["lin-a"]["detail"] is None
    for name in NAMES:
        assert follower_id(fence_fleet, name) == document["snapshotId"]

    # The session's events (local copy; the access point gets the same stream).
    copy = Path(fence_fleet.env["AH_HOME"]) / "logs" / "sessions" / "fence-tamper-1.events.jsonl"
    events = [json.loads(line) for line in copy.read_text().splitlines()]
    assert [e["type"] for e in events] == ["fenceStarted", "fenceResult"], events
    assert {e["snapshotId"] for e in events} == {document["snapshotId"]}
    assert all(e["sessionId"] == "fence-tamper-1" for e in events)
    assert sorted(events[0]["hosts"]) == sorted(NAMES)
    assert events[1]["hosts"] == document["hosts"]


# --------------------------------------------------------------------------- incremental


async def _fence_logged(
    ff: FenceFleet, ws: Path, cache_root: Path
) -> tuple[Any, dict[str, str], list[str]]:
    """Fence every follower in this process; returns the metadata, each host's sync mode
    and the fence's debug messages."""
    messages: list[str] = []
    sink = logger.add(
        lambda message: messages.append(message.record["message"]),
        level="DEBUG",
        filter="ah_fleetctl.fencing",
    )
    followers = msgspec.convert(ff.fleet.list_followers(), list[FollowerStatus])
    links = await FleetLinks.open(
        followers, DirectConnector(ff.fleet.ssh_user, ff.fleet.leader_key), leader_root=ws
    )
    try:
        metadata = await fence_selected(
            _Invocation(load_config(cwd=ws, env=ff.env)), links, NAMES, cache_root=cache_root
        )
    finally:
        await links.close()
        logger.remove(sink)
    modes: dict[str, str] = {}
    for message in messages:
        for name in NAMES:
            if message.startswith(f"fence: {name}: "):
                modes[name] = message.split(": ")[2].split(" ")[0]
    return metadata, modes, messages


def _fence_incrementally(
    ff: FenceFleet, ws: Path, cache_root: Path
) -> tuple[Any, dict[str, str], list[str]]:
    return asyncio.run(asyncio.wait_for(_fence_logged(ff, ws, cache_root), 90))


def test_incremental_fences_send_only_the_changes_and_still_prove_them(
    fence_fleet: FenceFleet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ws = make_workspace(
        tmp_path / "ws",
        {
            "src/app.py": "print('v1')\n",
            "src/old/a.txt": "a\n",
            "gone.txt": "bye\n",
            "tool.sh": "#!/bin/sh\n",
            "becomes-dir": "a file for now\n",
            "stable.txt": "never changes\n",
        },
    )
    (ws / "link").symlink_to("src/app.py")
    cache = tmp_path / "cache"
    first, modes, _ = _fence_incrementally(fence_fleet, ws, cache)
    assert not first.lagging_hosts(), first
    assert modes == dict.fromkeys(NAMES, "full"), "nothing was proven before the first fence"
    stable = fence_fleet.workspace("lin-a") / "stable.txt"
    os.utime(stable, (978_307_200, 978_307_200))  # content unchanged: still consistent

    (ws / "src" / "app.py").write_text("print('v2')\n")
    (ws / "src" / "old").rename(ws / "src" / "new")
    (ws / "gone.txt").unlink()
    (ws / "tool.sh").chmod(0o755)
    (ws / "becomes-dir").unlink()
    (ws / "becomes-dir").mkdir()
    (ws / "becomes-dir" / "inside.txt").write_text("inside\n")
    (ws / "link").unlink()
    (ws / "link").symlink_to("src/new/a.txt")
    second, modes, _ = _fence_incrementally(fence_fleet, ws, cache)
    assert modes == dict.fromkeys(NAMES, "apply"), modes
    for name in NAMES:
        assert second.hosts[name].state is FenceHostState.CONSISTENT, second
        assert second.hosts[name].detail is None, second
        assert _tree_state(fence_fleet.workspace(name)) == _tree_state(ws), name
        assert follower_id(fence_fleet, name) == second.snapshot_id
    assert stable.stat().st_mtime == 978_307_200, "the change set touched an unchanged file"

    third, modes, _ = _fence_incrementally(fence_fleet, ws, cache)
    assert modes == dict.fromkeys(NAMES, "nothing") and not third.lagging_hosts(), third
    assert third.snapshot_id == second.snapshot_id
    # A change set over the size limit goes by rsync --files-from instead.
    (ws / "src" / "app.py").write_text("print('v3')\n")
    monkeypatch.setattr(fencing, "MAX_APPLY_BYTES", 0)
    fourth, modes, _ = _fence_incrementally(fence_fleet, ws, cache)
    monkeypatch.undo()
    assert modes == dict.fromkeys(NAMES, "listed") and not fourth.lagging_hosts(), fourth
    for name in NAMES:
        assert (fence_fleet.workspace(name) / "src" / "app.py").read_text() == "print('v3')\n"
    # Another leader cache: nothing proven there, so full syncs again.
    _, modes, _ = _fence_incrementally(fence_fleet, ws, tmp_path / "other-cache")
    assert modes == dict.fromkeys(NAMES, "full"), modes


def test_a_follower_changed_since_its_proof_falls_back_to_a_full_sync(
    fence_fleet: FenceFleet, tmp_path: Path
) -> None:
    ws = make_workspace(
        tmp_path / "ws", {"sub/x.txt": "x1\n", "keep.txt": "keep\n", "lib/core.py": "A = 1\n"}
    )
    cache = tmp_path / "cache"
    assert not _fence_incrementally(fence_fleet, ws, cache)[0].lagging_hosts()
    # lin-a: a stray file and a deleted one. lin-b: its sub/ is now a symlink to a directory
    # outside the workspace, so writing sub/x.txt would escape it. lin-c: a same-size edit
    # with the mtime put back (rsync's quick check cannot see it; the digest does).
    (fence_fleet.workspace("lin-a") / "stray.txt").write_text("left behind\n")
    (fence_fleet.workspace("lin-a") / "keep.txt").unlink()
    outside = tmp_path / "outside"
    outside.mkdir()
    sub = fence_fleet.workspace("lin-b") / "sub"
    shutil.rmtree(sub)
    sub.symlink_to(outside)
    core = fence_fleet.workspace("lin-c") / "lib" / "core.py"
    before = core.stat()
    core.write_text("A = 2\n")
    os.utime(core, ns=(before.st_atime_ns, before.st_mtime_ns))

    (ws / "sub" / "x.txt").write_text("x2\n")
    metadata, modes, messages = _fence_incrementally(fence_fleet, ws, cache)
    assert modes == dict.fromkeys(NAMES, "apply"), modes
    assert not metadata.lagging_hosts(), metadata
    assert any(m.startswith("fence: lin-a differs from its last proof") for m in messages)
    assert any(m.startswith("fence: lin-b could not apply its change set") for m in messages)
    assert list(outside.iterdir()) == [], "the change set wrote through the follower's symlink"
    assert metadata.hosts["lin-c"].detail == "repaired by a forced resync", metadata
    for name in NAMES:
        assert _tree_state(fence_fleet.workspace(name)) == _tree_state(ws), name
        assert follower_id(fence_fleet, name) == metadata.snapshot_id


# --------------------------------------------------------------------------- stalls


@dataclass(frozen=True)
class _Invocation:
    config: ResolvedConfig[ConfigFile]


async def _fence_in_process(ff: FenceFleet, ws: Path, stall: str, events: list[object]) -> Any:
    """Link every follower, *then* stall one sshd (SIGSTOP) and fence: the fence itself
    (rsync over the shared ControlMaster) meets the stall."""
    followers = msgspec.convert(ff.fleet.list_followers(), list[FollowerStatus])
    connector = DirectConnector(ff.fleet.ssh_user, ff.fleet.leader_key)
    links = await FleetLinks.open(followers, connector, leader_root=ws)
    stalled = ff.fleet.follower(stall).sshd
    try:
        assert sorted(links.linked) == sorted(NAMES)
        stalled.pause()
        try:
            return await fence_selected(
                _Invocation(load_config(cwd=ws, env=ff.env)),
                links,
                NAMES,
                timeout=3.0,
                emit=events.append,
                cache_root=ff.base / "in-process-cache",
            )
        finally:
            stalled.resume()
    finally:
        await links.close()


def test_a_stalled_follower_times_out_and_the_others_are_consistent(
    fence_fleet: FenceFleet, tmp_path: Path
) -> None:
    ws = make_workspace(tmp_path / "ws", {"data.txt": "payload\n"})
    fence_ok(fence_fleet, ws)  # ControlMasters are up: the stall hits a live connection
    (ws / "data.txt").write_text("payload v2\n")

    events: list[object] = []
    metadata = asyncio.run(
        asyncio.wait_for(_fence_in_process(fence_fleet, ws, "lin-c", events), 60)
    )
    assert metadata.lagging_hosts() == ["lin-c"]
    lagging = metadata.hosts["lin-c"]
    assert lagging.state is FenceHostState.TIMEOUT
    assert lagging.detail is not None and "3s fence deadline" in lagging.detail
    assert 2_500 <= lagging.took_ms < 15_000, lagging
    for name in ("lin-a", "lin-b"):
        assert metadata.hosts[name].state is FenceHostState.CONSISTENT
        assert (fence_fleet.workspace(name) / "data.txt").read_text() == "payload v2\n"
    with pytest.raises(FenceError) as failure:
        require_consistent(metadata)
    message = str(failure.value)
    assert "timed out (lagging): lin-c" in message
    assert "--host/--tag" in message
    assert [type(e) for e in events] == [FenceStartedEvent, FenceResultEvent]
    started, result = events
    assert isinstance(started, FenceStartedEvent) and isinstance(result, FenceResultEvent)
    assert started.snapshot_id == result.snapshot_id == metadata.snapshot_id
    assert result.hosts == metadata.hosts

    # Through the CLI, with the sshd stalled before anything connects: the fence names it,
    # and run gives it no command while the others run. Reaching a follower is bounded by
    # timeouts.connect per path method (direct, connect), not by the fence timeout.
    quick_connect = {"AH_TIMEOUTS_CONNECT": "1s"}
    stalled = fence_fleet.fleet.follower("lin-c").sshd
    stalled.pause()
    try:
        fenced = fence_fleet.cli(ws, "fence", "--timeout", "3s", env=quick_connect)
        ran = fence_fleet.cli(ws, "run", "--", "cat", "data.txt", env={"AH_TIMEOUTS_CONNECT": "2s"})
    finally:
        stalled.resume()
    assert fenced.returncode == 1, fenced
    assert "lin-c" in fenced.stderr and "timed out (lagging): lin-c" in fenced.stderr, fenced
    assert "--host/--tag" in fenced.stderr
    rows = {line.split()[0]: line.split()[1] for line in fenced.stdout.splitlines()[1:4]}
    assert rows == {"lin-a": "consistent", "lin-b": "consistent", "lin-c": "timeout"}, fenced
    assert ran.returncode == 1, ran
    assert "lin-a | payload v2" in ran.stdout and "lin-b | payload v2" in ran.stdout, ran
    assert "lin-c | payload" not in ran.stdout
    assert "2 succeeded" in ran.stdout and "1 unreachable" in ran.stdout, ran
    # Resumed, it catches up.
    fence_ok(fence_fleet, ws)


# --------------------------------------------------------------------------- Mutagen


FAKE_MUTAGEN = """\
#!{python}
# Stand-in for mutagen: records each call, and implements "sync" for `project start` and
# `project flush` by running rsync from alpha to every beta through $MUTAGEN_SSH_PATH/ssh
# (the wrapper adding the session's ssh config), honouring the project's ignores.
import json, os, subprocess, sys, time
from ruamel.yaml import YAML

args = sys.argv[1:]
record = {{"argv": args, "dataDir": os.environ.get("MUTAGEN_DATA_DIRECTORY"),
          "sshPath": os.environ.get("MUTAGEN_SSH_PATH")}}
if args[:1] == ["project"] and "--project-file" in args:
    project = args[args.index("--project-file") + 1]
    with open(project) as handle:
        record["projectFile"] = handle.read()
with open(os.environ["FAKE_MUTAGEN_LOG"], "a") as log:
    log.write(json.dumps(record) + "\\n")
call = " ".join(args[:2])
if call == os.environ.get("FAKE_MUTAGEN_HANG"):
    helper = subprocess.Popen(["sleep", "600"])
    with open(os.environ["FAKE_MUTAGEN_PIDS"], "w") as pids:
        pids.write(f"{{os.getpid()}} {{helper.pid}}")
    while True:  # hang on purpose, as a stuck `mutagen project flush` does: the fence's
        time.sleep(60)  # deadline must kill this process group
if call in ("project start", "project flush"):
    spec = YAML(typ="safe").load(open(project))
    ssh = os.path.join(os.environ["MUTAGEN_SSH_PATH"], "ssh")
    for name, session in spec["sync"].items():
        excludes = [f"--exclude={{p}}" for p in session["ignore"]["paths"]]
        if session["ignore"].get("vcs"):
            excludes += ["--exclude=.git", "--exclude=.hg", "--exclude=.svn"]
        done = subprocess.run(["rsync", "-rlpt", "--delete", "--mkpath", "-e", ssh, *excludes,
                               session["alpha"] + "/", session["beta"] + "/"])
        if done.returncode:
            sys.exit(f"Error: sync {{name}} failed")
elif call == "project terminate" or call == "daemon stop":
    pass
else:
    sys.exit(f"Error: unexpected call {{args}}")
"""


@dataclass
class StandIn:
    bin_dir: Path
    log: Path
    pids: Path

    def env(self, **extra: str) -> dict[str, str]:
        return {
            "PATH": f"{self.bin_dir}{os.pathsep}{os.environ['PATH']}",
            "FAKE_MUTAGEN_LOG": str(self.log),
            "FAKE_MUTAGEN_PIDS": str(self.pids),
            **extra,
        }

    def calls(self) -> list[dict[str, Any]]:
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines()]


@pytest.fixture
def stand_in(tmp_path: Path) -> StandIn:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    exe = bin_dir / "mutagen"
    exe.write_text(FAKE_MUTAGEN.format(python=sys.executable))
    exe.chmod(0o755)
    return StandIn(bin_dir, tmp_path / "mutagen-calls.jsonl", tmp_path / "pids")


def _normalised_project(text: str, ws: Path, ff: FenceFleet) -> str:
    text = text.replace(str(ws.resolve()), "<LEADER>")
    for name in NAMES:
        text = text.replace(str(ff.workspace(name)), f"<WORKSPACE {name}>")
    return text


def _alive(pid: int) -> bool:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return False
    return fields[0] != "Z"


def test_mutagen_engine_lifecycle_with_a_stand_in(
    fence_fleet: FenceFleet, tmp_path: Path, stand_in: StandIn
) -> None:
    ws = make_workspace(
        tmp_path / "ws",
        {"pkg/mod.py": "A = 1\n", "node_modules/x.js": "x\n", "build/out.o": "o\n"},
    )
    done = fence_fleet.cli(ws, "fence", env=stand_in.env())
    assert done.returncode == 0, done
    assert "(mutagen," in done.stdout, done
    calls = stand_in.calls()
    assert [c["argv"][:2] for c in calls] == [
        ["project", "start"],
        ["project", "flush"],
        ["project", "terminate"],
        ["daemon", "stop"],
    ], calls
    project_file = calls[0]["argv"][calls[0]["argv"].index("--project-file") + 1]
    assert all(c["argv"][2:] == ["--project-file", project_file] for c in calls[:3])
    assert len({c["dataDir"] for c in calls}) == 1 and calls[0]["dataDir"]
    assert calls[0]["sshPath"] and (Path(calls[0]["sshPath"]).name == ".ah-mutagen-ssh")
    assert not Path(project_file).exists(), "the session directory outlived the fence"

    # The generated project file (paths normalised) is a reviewed snapshot.
    text = _normalised_project(calls[0]["projectFile"], ws, fence_fleet)
    snapshot = SNAPSHOTS / "fence-mutagen.yml"
    if os.environ.get("AH_UPDATE_SNAPSHOTS") == "1":
        snapshot.parent.mkdir(exist_ok=True)
        snapshot.write_text(text)
    assert text == snapshot.read_text()
    for name in NAMES:
        copy = fence_fleet.workspace(name)
        assert (copy / "pkg" / "mod.py").read_text() == "A = 1\n"
        assert not (copy / "build" / "out.o").exists()

    # A flush that hangs is killed at its deadline, named, and the project still torn down.
    stand_in.log.unlink()
    (ws / "pkg" / "mod.py").write_text("A = 2\n")
    hung = fence_fleet.cli(
        ws, "fence", "--timeout", "3s", env=stand_in.env(FAKE_MUTAGEN_HANG="project flush")
    )
    assert hung.returncode == 1, hung
    assert "mutagen flush" in hung.stderr and "deadline" in hung.stderr, hung
    for name in NAMES:
        assert f"{name}" in hung.stderr
    assert [c["argv"][:2] for c in stand_in.calls()] == [
        ["project", "start"],
        ["project", "flush"],
        ["project", "terminate"],
        ["daemon", "stop"],
    ]
    pids = [int(p) for p in stand_in.pids.read_text().split()]
    assert not any(_alive(pid) for pid in pids), "the hanging flush outlived its deadline"
    shutil.rmtree(ws)


def test_sync_engine_setting_forces_rsync_or_insists_on_mutagen(
    fence_fleet: FenceFleet, tmp_path: Path, stand_in: StandIn
) -> None:
    ws = make_workspace(tmp_path / "ws", {"a.txt": "one\n"})
    # A mutagen is on PATH, so auto would take it; the repo's config says rsync.
    (ws / ".agents").mkdir()
    (ws / ".agents" / "config.toml").write_text('sync-engine = "rsync"\n')
    forced = fence_fleet.cli(ws, "fence", env=stand_in.env())
    assert forced.returncode == 0, forced
    assert "(rsync," in forced.stdout, forced
    assert stand_in.calls() == []
    for name in NAMES:
        assert (fence_fleet.workspace(name) / "a.txt").read_text() == "one\n"

    # Mutagen insisted on where none is installed: a configuration error that says where the
    # setting came from, before anything is synced.
    (ws / "a.txt").write_text("two\n")
    insisted = fence_fleet.cli(ws, "fence", env={"AH_SYNC_ENGINE": "mutagen"})
    assert insisted.returncode == ExitCode.CONFIGURATION, insisted
    assert "sync-engine = 'mutagen' (env AH_SYNC_ENGINE): no 'mutagen' binary on PATH" in (
        insisted.stderr
    ), insisted
    for name in NAMES:
        assert (fence_fleet.workspace(name) / "a.txt").read_text() == "one\n"
    shutil.rmtree(ws)
