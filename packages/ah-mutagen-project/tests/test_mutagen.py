"""mutagen.yml generation (snapshot files) and the mutagen project lifecycle (against a
stand-in executable that records its argv and can hang or fail)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from ruamel.yaml import YAML

from ah_domain_types import OsKind
from ah_harness_local import wait_for
from ah_mutagen_project import (
    MutagenError,
    MutagenFollower,
    MutagenNotFound,
    MutagenProject,
    MutagenProjectError,
    MutagenTimeout,
    mutagen_available,
    mutagen_endpoint_path,
    mutagen_session_name,
    render_mutagen_project,
    write_mutagen_project,
)

SNAPSHOTS = Path(__file__).parent / "snapshots"
LEADER = "/home/lead/src/app"


def _check_snapshot(name: str, text: str) -> None:
    path = SNAPSHOTS / name
    if os.environ.get("AH_UPDATE_SNAPSHOTS") == "1":
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
    assert path.is_file(), f"missing snapshot {path}; run with AH_UPDATE_SNAPSHOTS=1 once"
    assert text == path.read_text(), f"{name} differs from the committed snapshot"


def _linux_fleet() -> list[MutagenFollower]:
    return [
        MutagenFollower("linux-b", OsKind.LINUX, "/srv/ws/app", user="ci"),
        MutagenFollower("linux-a", OsKind.LINUX, "/home/dev/ws/app/", user="dev"),
    ]


def _mixed_fleet() -> list[MutagenFollower]:
    return [
        MutagenFollower("win11", OsKind.WINDOWS, "C:\\Users\\dev\\ws\\app", user="dev"),
        MutagenFollower("mac_m2", OsKind.MACOS, "/Users/dev/ws/app", user="dev"),
        MutagenFollower("deb.12", OsKind.LINUX, "~/ws/app"),
    ]


def test_linux_fleet_project_file() -> None:
    text = render_mutagen_project("s42", LEADER, _linux_fleet())
    _check_snapshot("linux-fleet.mutagen.yml", text)
    document = YAML(typ="safe").load(text)
    sessions = document["sync"]
    assert list(sessions) == ["ah-s42-linux-a", "ah-s42-linux-b"]
    entry = sessions["ah-s42-linux-a"]
    assert entry == {
        "alpha": LEADER,
        "beta": "dev@ah-linux-a:/home/dev/ws/app",
        "mode": "one-way-replica",
        "flushOnCreate": True,
        "ignore": {
            "vcs": True,
            "paths": [".git", ".hg", ".svn", ".jj", "node_modules", ".venv", "target", "build"],
        },
    }


def test_mixed_os_fleet_project_file_maps_paths() -> None:
    text = render_mutagen_project("s42", LEADER, _mixed_fleet())
    _check_snapshot("mixed-fleet.mutagen.yml", text)
    sessions = YAML(typ="safe").load(text)["sync"]
    assert {name: s["beta"] for name, s in sessions.items()} == {
        "ah-s42-deb-12": "ah-deb.12:~/ws/app",
        "ah-s42-mac-m2": "dev@ah-mac_m2:/Users/dev/ws/app",
        "ah-s42-win11": "dev@ah-win11:C:/Users/dev/ws/app",
    }


def test_repo_override_of_ignores() -> None:
    text = render_mutagen_project("s42", LEADER, _linux_fleet(), ["dist", "docs/_build/", "*.log"])
    _check_snapshot("linux-fleet-repo-ignores.mutagen.yml", text)
    for entry in YAML(typ="safe").load(text)["sync"].values():
        assert entry["ignore"]["paths"] == [
            ".git", ".hg", ".svn", ".jj", "dist", "/docs/_build/", "*.log",
        ]  # fmt: skip


def test_output_is_deterministic_and_written_atomically(tmp_path: Path) -> None:
    fleet = _mixed_fleet()
    first = render_mutagen_project("s1", LEADER, fleet)
    assert render_mutagen_project("s1", LEADER, list(reversed(fleet))) == first
    path = write_mutagen_project(tmp_path / "sessions" / "s1" / "mutagen.yml", "s1", LEADER, fleet)
    assert path.read_text() == first
    assert sorted(p.name for p in path.parent.iterdir()) == ["mutagen.yml"]


@pytest.mark.parametrize(
    ("workspace", "expected"),
    [
        ("C:\\Users\\dev\\ws", "C:/Users/dev/ws"),
        ("c:/Users/dev/ws/", "C:/Users/dev/ws"),
        ("/D:/build/ws", "D:/build/ws"),
        ("C:\\", "C:/"),
    ],
)
def test_windows_paths(workspace: str, expected: str) -> None:
    assert mutagen_endpoint_path(workspace, OsKind.WINDOWS) == expected


@pytest.mark.parametrize(
    ("workspace", "os_kind"),
    [
        ("Users\\dev", OsKind.WINDOWS),
        ("\\\\server\\share\\ws", OsKind.WINDOWS),
        ("/home/dev/ws", OsKind.WINDOWS),
        ("ws/app", OsKind.LINUX),
        ("C:/ws", OsKind.MACOS),
    ],
)
def test_bad_workspace_paths_are_named(workspace: str, os_kind: OsKind) -> None:
    with pytest.raises(MutagenProjectError, match="follower 'f9'") as info:
        mutagen_endpoint_path(workspace, os_kind, follower="f9")
    assert repr(workspace) in str(info.value)


def test_session_names_and_their_collisions() -> None:
    assert mutagen_session_name("run_7", "mac.m2") == "ah-run-7-mac-m2"
    clash = [
        MutagenFollower("a.b", OsKind.LINUX, "/ws"),
        MutagenFollower("a_b", OsKind.LINUX, "/ws"),
    ]
    with pytest.raises(MutagenProjectError, match=r"'a\.b' and 'a_b'"):
        render_mutagen_project("s", LEADER, clash)
    with pytest.raises(MutagenProjectError, match="absolute"):
        render_mutagen_project("s", "rel/ws", _linux_fleet())
    with pytest.raises(MutagenProjectError, match="no followers"):
        render_mutagen_project("s", LEADER, [])


FAKE_MUTAGEN = """\
#!{python}
# Stand-in for mutagen: records argv, keeps a "running" flag, can hang or fail on request.
import json, os, subprocess, sys, time
with open(os.environ["FAKE_MUTAGEN_LOG"], "a") as log:
    log.write(json.dumps({{"argv": sys.argv[1:], "cwd": os.getcwd(),
                          "ssh_path": os.environ.get("MUTAGEN_SSH_PATH")}}) + "\\n")
call = sys.argv[2] if len(sys.argv) > 2 else ""
state = os.environ["FAKE_MUTAGEN_STATE"]
if call == os.environ.get("FAKE_MUTAGEN_HANG"):
    if call == "start":
        open(state, "w").close()
    helper = subprocess.Popen(["sleep", "600"])
    with open(os.environ["FAKE_MUTAGEN_PIDS"], "w") as pids:
        pids.write(f"{{os.getpid()}} {{helper.pid}}")
    while True:
        time.sleep(60)
if call == os.environ.get("FAKE_MUTAGEN_FAIL"):
    print("Error: unable to connect to beta: ssh: Connection refused", file=sys.stderr)
    sys.exit(1)
running = os.path.exists(state)
if call == "start":
    if running:
        sys.exit("Error: project already running")
    open(state, "w").close()
elif call in ("flush", "terminate"):
    if not running:
        sys.exit("Error: project not running")
    if call == "terminate":
        os.remove(state)
else:
    sys.exit(f"Error: unknown command {{call}}")
"""


class FakeMutagen:
    def __init__(self, root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.bin = root / "bin"
        self.bin.mkdir()
        exe = self.bin / "mutagen"
        exe.write_text(FAKE_MUTAGEN.format(python=sys.executable))
        exe.chmod(0o755)
        self.log = root / "argv.jsonl"
        self.pids = root / "pids"
        monkeypatch.setenv("PATH", f"{self.bin}{os.pathsep}{os.environ['PATH']}")
        monkeypatch.setenv("FAKE_MUTAGEN_LOG", str(self.log))
        monkeypatch.setenv("FAKE_MUTAGEN_STATE", str(root / "running"))
        monkeypatch.setenv("FAKE_MUTAGEN_PIDS", str(self.pids))
        self.monkeypatch = monkeypatch

    def calls(self) -> list[dict[str, Any]]:
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines()]

    def argvs(self) -> list[list[str]]:
        return [c["argv"] for c in self.calls()]

    def hang(self, call: str) -> None:
        self.monkeypatch.setenv("FAKE_MUTAGEN_HANG", call)

    def fail(self, call: str) -> None:
        self.monkeypatch.setenv("FAKE_MUTAGEN_FAIL", call)

    def behave(self) -> None:
        self.monkeypatch.delenv("FAKE_MUTAGEN_HANG", raising=False)
        self.monkeypatch.delenv("FAKE_MUTAGEN_FAIL", raising=False)


@pytest.fixture
def fake_mutagen(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeMutagen:
    return FakeMutagen(tmp_path, monkeypatch)


@pytest.fixture
def project_file(tmp_path: Path) -> Path:
    return write_mutagen_project(tmp_path / "session" / "mutagen.yml", "s1", LEADER, _linux_fleet())


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_lifecycle_argv_sequence(
    fake_mutagen: FakeMutagen, project_file: Path, run: Callable[..., Any]
) -> None:
    project = MutagenProject(project_file=project_file, timeout=30)

    async def body() -> tuple[bool, bool]:
        await project.start()
        await project.flush()
        first = await project.terminate()
        second = await project.terminate()  # idempotent
        return first, second

    assert run(body()) == (True, False)
    tail = ["--project-file", str(project_file)]
    assert fake_mutagen.argvs() == [
        ["project", "start", *tail],
        ["project", "flush", *tail],
        ["project", "terminate", *tail],
        ["project", "terminate", *tail],
    ]
    assert {c["cwd"] for c in fake_mutagen.calls()} == {str(project_file.parent)}
    assert all(c["ssh_path"] is None for c in fake_mutagen.calls())


def test_hanging_flush_is_killed_at_its_deadline(
    fake_mutagen: FakeMutagen, project_file: Path, run: Callable[..., Any]
) -> None:
    project = MutagenProject(project_file=project_file, timeout=30)
    run(project.start())
    fake_mutagen.hang("flush")
    started = time.monotonic()
    with pytest.raises(MutagenTimeout) as info:
        run(project.flush(timeout=1.0))
    elapsed = time.monotonic() - started
    assert 1.0 <= elapsed < 15.0
    assert "mutagen flush" in str(info.value) and "1s deadline" in str(info.value)
    assert info.value.call == "flush"
    # The whole process group is gone: the stand-in and the helper it started.
    pids = [int(p) for p in fake_mutagen.pids.read_text().split()]
    wait_for(lambda: not any(_alive(p) for p in pids), 10.0, what=f"pids {pids} to exit")
    fake_mutagen.behave()
    assert run(project.terminate()) is True


def test_terminate_after_a_killed_start_and_failures(
    fake_mutagen: FakeMutagen, project_file: Path, run: Callable[..., Any]
) -> None:
    project = MutagenProject(project_file=project_file, timeout=1.0)
    fake_mutagen.hang("start")
    with pytest.raises(MutagenTimeout, match="mutagen start"):
        run(project.start())
    fake_mutagen.behave()
    assert run(project.terminate()) is True
    assert run(project.terminate()) is False
    fake_mutagen.fail("start")
    with pytest.raises(MutagenError) as info:
        run(project.start())
    assert info.value.returncode == 1 and "Connection refused" in str(info.value)
    fake_mutagen.fail("terminate")
    with pytest.raises(MutagenError, match="mutagen terminate failed"):
        run(project.terminate())


def test_detection_and_missing_binary(
    tmp_path: Path, project_file: Path, run: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    assert not mutagen_available()
    with pytest.raises(MutagenNotFound, match="'mutagen' not found"):
        run(MutagenProject(project_file=project_file).start())
    fake_root = tmp_path / "fake"
    fake_root.mkdir()
    FakeMutagen(fake_root, monkeypatch)
    assert mutagen_available()


def test_ssh_config_reaches_mutagen_through_wrappers(
    fake_mutagen: FakeMutagen, project_file: Path, run: Callable[..., Any], fleet: Any
) -> None:
    project = MutagenProject(project_file=project_file, ssh_config=fleet.ssh_config)
    run(project.start())
    [call] = fake_mutagen.calls()
    wrappers = Path(call["ssh_path"])
    assert wrappers == project.ssh_wrapper_dir
    assert sorted(p.name for p in wrappers.iterdir()) == ["scp", "ssh"]
    # The wrapper is a working ssh that knows the session's aliases (a real login).
    result = subprocess.run(
        [str(wrappers / "ssh"), fleet.alias(0), "echo", "via-wrapper"],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "via-wrapper"
