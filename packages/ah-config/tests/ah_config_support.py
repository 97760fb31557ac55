"""Shared test helpers for ah-config: a small schema and a World of real config files."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import tomli_w


class Net(msgspec.Struct, frozen=True, rename="kebab", forbid_unknown_fields=True):
    connect_timeout: int | None = None
    retries: int | None = None


class Host(msgspec.Struct, frozen=True, rename="kebab", forbid_unknown_fields=True):
    user: str | None = None
    port: int | None = None


class Demo(msgspec.Struct, frozen=True, rename="kebab", forbid_unknown_fields=True):
    """A small schema of the same shape as ConfigFile: scalars, list, table, dict of tables."""

    name: str | None = None
    token: str | None = None
    verbose: bool | None = None
    ratio: float | None = None
    tags: list[str] | None = None
    net: Net | None = None
    hosts: dict[str, Host] | None = None
    enforced: list[str] | None = None


DEMO_DEFAULTS = Demo(name="default-name", tags=["d"], net=Net(retries=3))


@dataclass
class World:
    """Real directories and files standing in for one user's machine."""

    root: Path
    home: Path
    repo: Path
    cwd: Path
    system_file: Path
    user_file: Path
    env: dict[str, str] = field(default_factory=dict)

    @property
    def repo_file(self) -> Path:
        return self.repo / ".agents" / "config.toml"

    @property
    def repo_user_file(self) -> Path:
        return self.repo / ".agents" / "config.user.toml"

    def write(self, path: Path, data: dict[str, Any] | str) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        text = data if isinstance(data, str) else tomli_w.dumps(data)
        path.write_text(text, encoding="utf-8")
        return path

    def load_kwargs(self) -> dict[str, Any]:
        return {"cwd": self.cwd, "env": dict(self.env), "platform": "linux"}


def make_world(tmp_path: Path) -> World:
    home = tmp_path / "home"
    repo = tmp_path / "work" / "repo"
    cwd = repo / "src" / "deep"
    cwd.mkdir(parents=True)
    (repo / ".git").mkdir()
    home.mkdir()
    system_file = tmp_path / "etc" / "agent-harbor" / "config.toml"
    ah_home = tmp_path / "ah-home"
    env = {
        "HOME": str(home),
        "AH_HOME": str(ah_home),
        "AH_SYSTEM_CONFIG": str(system_file),
    }
    return World(
        root=tmp_path,
        home=home,
        repo=repo,
        cwd=cwd,
        system_file=system_file,
        user_file=ah_home / "config.toml",
        env=env,
    )
