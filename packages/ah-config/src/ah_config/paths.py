"""Where the configuration files live on each platform, and how the repo root is found."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path, PurePath, PurePosixPath, PureWindowsPath
from typing import Literal

import msgspec

__all__ = [
    "APP_DIR_NAME",
    "CONFIG_FILE_NAME",
    "ConfigPaths",
    "PlatformName",
    "find_repo_root",
    "home_from_env",
    "normalize_platform",
    "repo_config_paths",
]

PlatformName = Literal["linux", "macos", "windows"]

APP_DIR_NAME = "agent-harbor"
CONFIG_FILE_NAME = "config.toml"
REPO_CONFIG_DIR = ".agents"
REPO_CONFIG_FILE = "config.toml"
REPO_USER_CONFIG_FILE = "config.user.toml"


def normalize_platform(platform: str | None = None) -> PlatformName:
    """Map ``sys.platform`` spellings (and ``macos``/``windows``) to one of three names.

    Other Unix-likes (FreeBSD, ...) follow the Linux (XDG) conventions.
    """
    name = (platform or sys.platform).lower()
    if name in ("darwin", "macos", "mac", "osx"):
        return "macos"
    if name in ("win32", "windows", "cygwin", "msys", "nt"):
        return "windows"
    return "linux"


def home_from_env(env: Mapping[str, str], platform: str | None = None) -> Path:
    """The user's home directory as ``env`` describes it (falls back to ``Path.home()``)."""
    names = ("USERPROFILE", "HOME") if normalize_platform(platform) == "windows" else ("HOME",)
    for name in names:
        value = env.get(name)
        if value:
            return Path(value)
    return Path.home()


def _native(platform: PlatformName, text: str) -> PurePath:
    """A path object of the right flavour: concrete on this OS, pure for another OS."""
    if platform == "windows":
        return Path(text) if os.name == "nt" else PureWindowsPath(text)
    return Path(text) if os.name != "nt" else PurePosixPath(text)


class ConfigPaths(msgspec.Struct, frozen=True):
    """The system-wide and per-user configuration files for one platform."""

    platform: PlatformName
    system: PurePath
    user: PurePath

    @classmethod
    def for_platform(
        cls,
        platform: str | None = None,
        env: Mapping[str, str] | None = None,
        home: PurePath | None = None,
    ) -> ConfigPaths:
        """Resolve the locations from the environment.

        - system: Linux ``/etc/agent-harbor/config.toml``; macOS ``/Library/Application
          Support/agent-harbor/config.toml``; Windows ``%ProgramData%\\agent-harbor\\
          config.toml``. ``AH_SYSTEM_CONFIG`` names another file.
        - user: Linux ``$XDG_CONFIG_HOME/agent-harbor/config.toml`` (``~/.config`` when
          unset or not absolute); macOS ``~/Library/Application Support/agent-harbor/
          config.toml``; Windows ``%APPDATA%\\agent-harbor\\config.toml``.
          ``AH_HOME`` moves it to ``$AH_HOME/config.toml``.
        """
        name = normalize_platform(platform)
        env = os.environ if env is None else env
        home_text = str(home) if home is not None else str(home_from_env(env, name))
        home_path = _native(name, home_text)

        if name == "windows":
            program_data = env.get("ProgramData") or env.get("PROGRAMDATA") or r"C:\ProgramData"
            system = _native(name, program_data) / APP_DIR_NAME / CONFIG_FILE_NAME
            app_data = env.get("APPDATA") or str(home_path / "AppData" / "Roaming")
            user = _native(name, app_data) / APP_DIR_NAME / CONFIG_FILE_NAME
        elif name == "macos":
            system = _native(name, "/Library/Application Support") / APP_DIR_NAME / CONFIG_FILE_NAME
            user = home_path / "Library" / "Application Support" / APP_DIR_NAME / CONFIG_FILE_NAME
        else:
            system = _native(name, "/etc") / APP_DIR_NAME / CONFIG_FILE_NAME
            xdg = env.get("XDG_CONFIG_HOME", "")
            # The XDG spec says relative values are invalid and must be ignored.
            base = _native(name, xdg) if xdg and _native(name, xdg).is_absolute() else None
            user = (base or home_path / ".config") / APP_DIR_NAME / CONFIG_FILE_NAME

        if env.get("AH_SYSTEM_CONFIG"):
            system = _native(name, env["AH_SYSTEM_CONFIG"])
        if env.get("AH_HOME"):
            user = _native(name, env["AH_HOME"]) / CONFIG_FILE_NAME
        return cls(platform=name, system=system, user=user)


def find_repo_root(start: Path) -> Path | None:
    """The nearest ancestor of ``start`` (itself included) holding ``.agents/`` or ``.git``."""
    current = start.resolve()
    for directory in (current, *current.parents):
        if (directory / REPO_CONFIG_DIR).is_dir() or (directory / ".git").exists():
            return directory
    return None


def repo_config_paths(repo_root: Path) -> tuple[Path, Path]:
    """``(<repo>/.agents/config.toml, <repo>/.agents/config.user.toml)``."""
    base = repo_root / REPO_CONFIG_DIR
    return base / REPO_CONFIG_FILE, base / REPO_USER_CONFIG_FILE
