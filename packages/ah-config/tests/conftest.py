"""Fixtures: an isolated set of real config locations (system, user, repo) under tmp_path."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

# Tests import their helpers from the uniquely named module beside this file.
sys.path.insert(0, str(Path(__file__).parent))

from ah_config_support import World, make_world


@pytest.fixture
def world(tmp_path: Path) -> World:
    return make_world(tmp_path)


@pytest.fixture
def isolated_process_env(world: World, monkeypatch: pytest.MonkeyPatch) -> Iterator[World]:
    """Point the real process environment and cwd at ``world`` (for click commands)."""
    for name in list(os.environ):
        if name.startswith("AH_") or name in ("XDG_CONFIG_HOME", "APPDATA", "RUST_LOG"):
            monkeypatch.delenv(name)
    for name, value in world.env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(world.cwd)
    yield world
