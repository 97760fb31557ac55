"""Configuration file locations per platform, and the repo root search."""

from __future__ import annotations

from pathlib import Path, PurePosixPath, PureWindowsPath

import pytest

from ah_config import ConfigPaths, find_repo_root, normalize_platform, repo_config_paths


def test_linux_defaults_and_xdg() -> None:
    paths = ConfigPaths.for_platform("linux", {}, PurePosixPath("/home/ann"))
    assert paths.platform == "linux"
    assert PurePosixPath(paths.system) == PurePosixPath("/etc/agent-harbor/config.toml")
    assert PurePosixPath(paths.user) == PurePosixPath("/home/ann/.config/agent-harbor/config.toml")

    paths = ConfigPaths.for_platform(
        "linux", {"XDG_CONFIG_HOME": "/xdg"}, PurePosixPath("/home/ann")
    )
    assert PurePosixPath(paths.user) == PurePosixPath("/xdg/agent-harbor/config.toml")
    # A relative XDG_CONFIG_HOME is invalid per the spec and ignored.
    paths = ConfigPaths.for_platform(
        "linux", {"XDG_CONFIG_HOME": "rel"}, PurePosixPath("/home/ann")
    )
    assert PurePosixPath(paths.user) == PurePosixPath("/home/ann/.config/agent-harbor/config.toml")


def test_home_comes_from_env_when_not_given() -> None:
    paths = ConfigPaths.for_platform("linux", {"HOME": "/home/bob"})
    assert PurePosixPath(paths.user) == PurePosixPath("/home/bob/.config/agent-harbor/config.toml")


def test_macos_locations() -> None:
    paths = ConfigPaths.for_platform(
        "darwin", {"XDG_CONFIG_HOME": "/ignored"}, PurePosixPath("/Users/ann")
    )
    assert paths.platform == "macos"
    assert PurePosixPath(paths.system) == PurePosixPath(
        "/Library/Application Support/agent-harbor/config.toml"
    )
    assert PurePosixPath(paths.user) == PurePosixPath(
        "/Users/ann/Library/Application Support/agent-harbor/config.toml"
    )


def test_windows_locations() -> None:
    env = {"APPDATA": r"C:\Users\ann\AppData\Roaming", "ProgramData": r"D:\ProgramData"}
    paths = ConfigPaths.for_platform("win32", env, PureWindowsPath(r"C:\Users\ann"))
    assert paths.platform == "windows"
    assert PureWindowsPath(paths.system) == PureWindowsPath(
        r"D:\ProgramData\agent-harbor\config.toml"
    )
    assert PureWindowsPath(paths.user) == PureWindowsPath(
        r"C:\Users\ann\AppData\Roaming\agent-harbor\config.toml"
    )
    # Without the variables: the standard defaults.
    paths = ConfigPaths.for_platform("windows", {"USERPROFILE": r"C:\Users\bob"})
    assert PureWindowsPath(paths.system) == PureWindowsPath(
        r"C:\ProgramData\agent-harbor\config.toml"
    )
    assert PureWindowsPath(paths.user) == PureWindowsPath(
        r"C:\Users\bob\AppData\Roaming\agent-harbor\config.toml"
    )


@pytest.mark.parametrize("platform", ["linux", "darwin", "win32"])
def test_ah_home_and_ah_system_config_override(platform: str) -> None:
    env = {"AH_HOME": "/opt/ah", "AH_SYSTEM_CONFIG": "/srv/system.toml"}
    paths = ConfigPaths.for_platform(platform, env, PurePosixPath("/home/ann"))
    assert str(paths.user).replace("\\", "/") == "/opt/ah/config.toml"
    assert str(paths.system).replace("\\", "/") == "/srv/system.toml"


def test_platform_names() -> None:
    assert [
        normalize_platform(p) for p in ("linux", "freebsd14", "darwin", "macos", "win32", "cygwin")
    ] == [
        "linux",
        "linux",
        "macos",
        "macos",
        "windows",
        "windows",
    ]


def test_repo_root_search(tmp_path: Path) -> None:
    outer = tmp_path / "outer"
    inner = outer / "pkg" / "inner"
    deep = inner / "a" / "b"
    deep.mkdir(parents=True)
    assert find_repo_root(deep) is None
    (outer / ".git").write_text("gitdir: elsewhere\n")  # a worktree's .git is a file
    assert find_repo_root(deep) == outer.resolve()
    (inner / ".agents").mkdir()
    assert find_repo_root(deep) == inner.resolve()
    assert find_repo_root(inner) == inner.resolve()
    assert repo_config_paths(inner) == (
        inner / ".agents" / "config.toml",
        inner / ".agents" / "config.user.toml",
    )
