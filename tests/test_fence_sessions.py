"""Warm digest sessions end to end: real access point, real followers each with a real sshd,
real rsync and OpenSSH; one ``FleetLinks`` kept open across several in-process fences with
:func:`ah_fleetctl.fencing.keep_digest_sessions`, as a benchmark or an agent would.

Every fence must still prove each follower's whole tree; the tests check that the session
(not a one-shot digest) answered, that it survives fences, that tampering between fences is
caught through it, and that a killed or wedged session never costs a weaker answer or a hang.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import pytest
from loguru import logger

from ah_config import ResolvedConfig, load_config
from ah_domain_types import ConfigFile, FenceHostState, FollowerStatus
from ah_fleetctl.dataplane import DirectConnector, FleetLinks
from ah_fleetctl.fencing import DigestSessions, fence_selected, keep_digest_sessions
from ah_harness_local import wait_for
from ah_harness_local.fleet import FollowerSpec, LocalFleet
from ah_mutagen_project import take_snapshot
from ah_mutagen_project.digest_session import DigestSessionError

NAMES = ("ses-a", "ses-b")


@dataclass(frozen=True)
class _Invocation:
    config: ResolvedConfig[ConfigFile]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFleet]:
    base = tmp_path_factory.mktemp("sessions")
    with LocalFleet([FollowerSpec(n) for n in NAMES], base_dir=base / "fleet") as running:
        yield running


def _workspace(root: Path, files: dict[str, str]) -> Path:
    (root / ".git").mkdir(parents=True)
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


def _tree(root: Path) -> dict[str, tuple[str, object]]:
    """Every entry below ``root`` (minus .git): kind and content, link target or mode."""
    found: dict[str, tuple[str, object]] = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if rel == ".git" or rel.startswith(".git/"):
            continue
        if path.is_symlink():
            found[rel] = ("l", os.readlink(path))
        elif path.is_dir():
            found[rel] = ("d", None)
        else:
            found[rel] = ("f", (path.read_bytes(), os.access(path, os.X_OK)))
    return found


class Fencer:
    """One kept ``FleetLinks`` with digest sessions; :meth:`fence` logs what it did."""

    def __init__(self, fleet: LocalFleet, links: FleetLinks, ws: Path, cache: Path) -> None:
        self.fleet = fleet
        self.links = links
        self.ws = ws
        self.cache = cache
        self.sessions: DigestSessions = keep_digest_sessions(links)
        self.messages: list[str] = []

    async def fence(self, timeout: float | None = None) -> Any:
        self.messages.clear()
        sink = logger.add(
            lambda m: self.messages.append(m.record["message"]),
            level="DEBUG",
            filter="ah_fleetctl.fencing",
        )
        try:
            return await fence_selected(
                _Invocation(load_config(cwd=self.ws, env=self.fleet.env())),
                self.links,
                NAMES,
                timeout=timeout,
                engine="rsync",
                cache_root=self.cache,
            )
        finally:
            logger.remove(sink)

    def follower(self, name: str) -> Path:
        return self.fleet.follower(name).workspace

    def server_pid(self, name: str) -> int:
        session = self.sessions.session(name)
        assert session is not None and session.alive, name
        return int(session.hello["pid"])

    def answered_by_session(self, name: str) -> bool:
        return any(m.startswith(f"fence: {name}: session digest") for m in self.messages)

    async def consistent(self, timeout: float | None = None) -> Any:
        metadata = await self.fence(timeout)
        assert not metadata.lagging_hosts(), (metadata, self.messages)
        for name in NAMES:
            assert _tree(self.follower(name)) == _tree(self.ws), name
            assert take_snapshot(self.follower(name)).id == metadata.snapshot_id, name
        return metadata


@asynccontextmanager
async def _fencer(fleet: LocalFleet, ws: Path, cache: Path) -> AsyncIterator[Fencer]:
    followers = msgspec.convert(fleet.list_followers(), list[FollowerStatus])
    links = await FleetLinks.open(
        followers, DirectConnector(fleet.ssh_user, fleet.leader_key), leader_root=ws
    )
    try:
        yield Fencer(fleet, links, ws, cache)
    finally:
        await links.close()


def _run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 150))


def test_a_session_survives_fences_and_sees_every_kind_of_change(
    fleet: LocalFleet, tmp_path: Path
) -> None:
    ws = _workspace(
        tmp_path / "ws",
        {"src/app.py": "v1\n", "src/old/a.txt": "a\n", "gone.txt": "bye\n", "tool.sh": "#!\n"},
    )
    (ws / "link").symlink_to("src")

    async def scenario() -> None:
        async with _fencer(fleet, ws, tmp_path / "cache") as f:
            await f.consistent()
            pids = {name: f.server_pid(name) for name in NAMES}
            edits = [
                lambda: (ws / "src" / "app.py").write_text("v2\n"),
                lambda: (ws / "gone.txt").unlink(),
                lambda: (ws / "src" / "app.py").rename(ws / "src" / "main.py"),
                lambda: (ws / "src" / "old").rename(ws / "src" / "new"),
                lambda: shutil.copytree(ws / "src" / "new", ws / "fresh" / "deep"),
                lambda: ((ws / "link").unlink(), (ws / "link").mkdir(), (ws / "link" / "in").write_text("in\n")),
                lambda: (ws / "tool.sh").chmod(0o755),
                lambda: shutil.rmtree(ws / "fresh"),
            ]  # fmt: skip
            for edit in edits:
                edit()
                await f.consistent()
                for name in NAMES:
                    assert f.answered_by_session(name), f.messages
                    assert f.server_pid(name) == pids[name], "the session did not survive"
            # Nothing changed: nothing sent, and the session still proves it.
            await f.consistent()
            assert all(f.answered_by_session(n) for n in NAMES), f.messages

    _run(scenario())


def test_tampering_between_fences_is_caught_through_the_session(
    fleet: LocalFleet, tmp_path: Path
) -> None:
    ws = _workspace(tmp_path / "ws", {"lib/core.py": "VALUE = 1\n", "README": "read me\n"})

    async def scenario() -> None:
        async with _fencer(fleet, ws, tmp_path / "cache") as f:
            await f.consistent()
            pid = f.server_pid("ses-b")
            # A plain write on ses-a; a same-size write with the mtime put back on ses-b.
            (f.follower("ses-a") / "README").write_text("tampered\n")
            core = f.follower("ses-b") / "lib" / "core.py"
            before = core.stat()
            core.write_text("VALUE = 2\n")
            os.utime(core, ns=(before.st_atime_ns, before.st_mtime_ns))
            metadata = await f.consistent()
            assert f.answered_by_session("ses-a") and f.answered_by_session("ses-b")
            assert any(m.startswith("fence: ses-a differs from its last proof") for m in f.messages)
            assert metadata.hosts["ses-b"].detail == "repaired by a forced resync", metadata
            assert core.read_text() == "VALUE = 1\n"
            assert f.server_pid("ses-b") == pid

    _run(scenario())


def test_a_killed_session_falls_back_to_a_one_shot_digest_and_says_so(
    fleet: LocalFleet, tmp_path: Path
) -> None:
    ws = _workspace(tmp_path / "ws", {"data.txt": "1\n"})

    async def scenario() -> None:
        async with _fencer(fleet, ws, tmp_path / "cache") as f:
            await f.consistent()
            # The server on ses-a dies (the followers are local: signal it directly) ...
            server = f.server_pid("ses-a")
            os.kill(server, signal.SIGKILL)
            # ... and the leader's ssh of ses-b's session.
            ssh = f.sessions.session("ses-b")
            assert ssh is not None and ssh.pid is not None
            os.killpg(ssh.pid, signal.SIGKILL)
            (ws / "data.txt").write_text("2\n")
            await f.consistent()
            for name in NAMES:
                dropped = [m for m in f.messages if m.startswith(f"fence: {name}: digest session")]
                assert dropped, "\n".join([name, *f.messages])
            # The next fence has new sessions again.
            (ws / "data.txt").write_text("3\n")
            await f.consistent()
            assert all(f.answered_by_session(n) for n in NAMES), f.messages
            assert f.server_pid("ses-a") != server

    _run(scenario())


def test_a_wedged_session_server_hits_the_fence_deadline_and_names_the_host(
    fleet: LocalFleet, tmp_path: Path
) -> None:
    ws = _workspace(tmp_path / "ws", {"data.txt": "1\n"})

    async def scenario() -> None:
        async with _fencer(fleet, ws, tmp_path / "cache") as f:
            await f.consistent()
            server = f.server_pid("ses-b")
            os.kill(server, signal.SIGSTOP)
            try:
                (ws / "data.txt").write_text("2\n")
                metadata = await f.fence(timeout=4.0)
                assert metadata.hosts["ses-a"].state is FenceHostState.CONSISTENT, metadata
                result = metadata.hosts["ses-b"]
                assert result.state is FenceHostState.TIMEOUT, metadata
                assert "ses-b" in (result.detail or ""), result
                assert "digest session was killed" in (result.detail or ""), result
                assert f.sessions.session("ses-b") is None
            finally:
                os.kill(server, signal.SIGCONT)  # it reads EOF and ends
            wait_for(lambda: not _running(server), 20, what=f"the wedged server {server} to end")
            # The next fence starts a new session there and is consistent again.
            await f.consistent()

    _run(scenario())


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            return handle.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except FileNotFoundError:
        return False


@pytest.mark.parametrize(
    "script",
    [
        "echo 'python3: not found' >&2; exit 127",
        # Its standard input is seen closed before its last words arrive: the error still
        # carries them (it used to say only "its standard input is closed").
        "exec 0<&-; sleep 0.2; echo 'python3: not found' >&2; exit 127",
    ],
    ids=["exits-at-once", "closes-stdin-first"],
)
def test_sessions_that_keep_failing_on_a_host_are_given_up(script: str) -> None:
    """No fleet needed: a "server" that dies at once, three times in a row; each failure
    names what it printed."""

    async def scenario() -> None:
        sessions = DigestSessions()
        argv = ["sh", "-c", script]
        key = ("ah-x", "/ws", (), True, True)
        try:
            for _ in range(DigestSessions.MAX_FAILURES):
                session = await sessions.ensure("x", key, argv)
                assert session is not None
                with pytest.raises(DigestSessionError, match="python3: not found"):
                    await session.request(change_set=None, manifest=False, timeout=20)
                sessions.forget("x", "it failed")
            assert await sessions.ensure("x", key, argv) is None
            assert sessions.session("x") is None
        finally:
            await sessions.close()

    _run(scenario())
