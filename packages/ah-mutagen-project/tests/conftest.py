"""Shared fixtures: an async runner, a tree builder, and a fleet of real sshd followers
reachable through host aliases in a generated ssh config."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

from ah_harness_local import RunningSshd
from ah_harness_local.pytest_plugin import SshdFactory

T = TypeVar("T")


def _run(coro: Coroutine[Any, Any, T], timeout: float = 40.0) -> T:
    async def bounded() -> T:
        async with asyncio.timeout(timeout):
            return await coro

    return asyncio.run(bounded())


@pytest.fixture(scope="session")
def run() -> Callable[..., Any]:
    """Run one async test body with an overall deadline."""
    return _run


TreeSpec = dict[str, "str | bytes | tuple[str, str]"]


def _build_tree(root: Path, spec: TreeSpec) -> Path:
    """Create ``spec`` under ``root``. Values: text/bytes (a file), ``("dir", "")``,
    ``("link", target)``, ``("exec", text)`` (an executable file)."""
    root.mkdir(parents=True, exist_ok=True)
    for rel, value in spec.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(value, tuple):
            kind, data = value
            if kind == "dir":
                path.mkdir(exist_ok=True)
            elif kind == "link":
                path.symlink_to(data)
            elif kind == "exec":
                path.write_text(data)
                path.chmod(0o755)
            else:
                raise ValueError(f"unknown tree spec kind {kind!r} for {rel}")
        elif isinstance(value, bytes):
            path.write_bytes(value)
        else:
            path.write_text(value)
    return root


@pytest.fixture(scope="session")
def build_tree() -> Callable[[Path, TreeSpec], Path]:
    return _build_tree


SAMPLE_TREE: TreeSpec = {
    "README.md": "hello\n",
    "src/app.py": "print('app')\n",
    "src/pkg/__init__.py": "",
    "src/pkg/data.bin": bytes(range(256)) * 4,
    "bin/run.sh": ("exec", "#!/bin/sh\necho run\n"),
    "docs/empty": ("dir", ""),
    "links/to-readme": ("link", "../README.md"),
    "links/dangling": ("link", "no/such/target"),
    "links/to-dir": ("link", "../src"),
    "node_modules/left-pad/index.js": "module.exports = 1\n",
    "src/node_modules/inner.js": "x\n",
    ".venv/bin/python": "fake\n",
    ".git/HEAD": "ref: refs/heads/main\n",
    "src/.hg/store": "x\n",
    "target/debug/out": "bin\n",
    "dist/bundle.js": "bundle\n",
}


@pytest.fixture(scope="session")
def sample_tree() -> TreeSpec:
    return dict(SAMPLE_TREE)


@dataclass(frozen=True)
class Fleet:
    """Followers ``f0..f{n-1}``, each its own real sshd, reachable as ``ah-f<i>``."""

    sshds: tuple[RunningSshd, ...]
    ssh_config: Path

    @property
    def names(self) -> list[str]:
        return [f"f{i}" for i in range(len(self.sshds))]

    def alias(self, index: int) -> str:
        return f"ah-f{index}"


def _ssh_config(sshds: tuple[RunningSshd, ...], path: Path) -> Path:
    blocks = []
    for index, sshd in enumerate(sshds):
        blocks.append(
            "\n".join(
                [
                    f"Host ah-f{index}",
                    f"  HostName {sshd.listen}",
                    f"  Port {sshd.port}",
                    f"  User {sshd.user}",
                    f"  IdentityFile {sshd.client_key_path}",
                    "  IdentitiesOnly yes",
                    "  IdentityAgent none",
                    "  StrictHostKeyChecking yes",
                    f"  UserKnownHostsFile {sshd.known_hosts_path}",
                    "  GlobalKnownHostsFile /dev/null",
                    "  UpdateHostKeys no",
                    "  BatchMode yes",
                    "  ConnectTimeout 10",
                    "  LogLevel ERROR",
                ]
            )
        )
    path.write_text("\n\n".join(blocks) + "\n")
    return path


@pytest.fixture(scope="session")
def fleet(sshd_factory: SshdFactory, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    """Three real sshd followers for the whole session (a test that pauses one resumes it)."""
    sshds = tuple(sshd_factory.many(3, name="mutagen-project-fleet"))
    config = _ssh_config(sshds, tmp_path_factory.mktemp("ssh") / "ssh_config")
    yield Fleet(sshds, config)
    for sshd in sshds:
        if sshd.process.is_paused:
            sshd.resume()


def set_old_mtimes(root: Path, age_s: float = 3600.0) -> None:
    """Backdate every file's mtime (not following symlinks)."""
    import time

    old = time.time() - age_s
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            os.utime(os.path.join(dirpath, name), (old, old), follow_symlinks=False)


@pytest.fixture(scope="session")
def backdate() -> Callable[..., None]:
    return set_old_mtimes
