"""Log settings, their precedence, the four click flags and the standard log locations."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args

import click

from ah_logging.directives import DirectiveError, parse_directives

__all__ = [
    "LOG_PARAM_NAMES",
    "LogFormat",
    "LogKind",
    "LogSettings",
    "default_log_dir",
    "default_log_file",
    "default_settings",
    "log_options",
    "log_settings_from_click",
]

LogKind = Literal["cli", "daemon"]
LogFormat = Literal["text", "json"]
LOG_KINDS: tuple[LogKind, ...] = get_args(LogKind)
LOG_FORMATS: tuple[LogFormat, ...] = get_args(LogFormat)

# click parameter name → LogSettings field.
LOG_PARAM_NAMES: Mapping[str, str] = {
    "log_level": "level",
    "log_file": "file",
    "log_dir": "dir",
    "log_format": "format",
}

APP_DIR_NAME = "agent-harbor"


def check_kind(kind: str) -> LogKind:
    if kind not in LOG_KINDS:
        raise ValueError(f"unknown binary kind {kind!r}; expected one of {', '.join(LOG_KINDS)}")
    return kind


@dataclass(frozen=True)
class LogSettings:
    """What the four log flags (or the ``log`` config table) ask for; ``None`` = not given.

    ``level`` is a level name or a RUST_LOG-style directive list.  ``file`` and ``dir`` are
    one destination: a file path, or a directory that receives ``<binary>.log`` (``file``
    wins when both are set).  ``format=None`` means the per-sink default: text on stderr,
    and in a file text for a CLI, JSON lines for a daemon.
    """

    level: str | None = None
    file: str | None = None
    dir: str | None = None
    format: LogFormat | None = None

    def __post_init__(self) -> None:
        if self.level is not None:
            parse_directives(self.level, source="log level")  # raises DirectiveError
        for name in ("file", "dir"):
            value = getattr(self, name)
            if value is not None and not value.strip():
                raise ValueError(f"log {name} is an empty path")
        if self.format is not None:
            lowered = self.format.lower()
            if lowered not in LOG_FORMATS:
                raise ValueError(
                    f"unknown log format {self.format!r}; expected one of {', '.join(LOG_FORMATS)}"
                )
            object.__setattr__(self, "format", lowered)

    @classmethod
    def from_config(cls, section: object) -> LogSettings | None:
        """Settings from a ``[log]`` config section: a mapping or any object with ``level``,
        ``file``, ``dir`` and ``format`` attributes (ah-config's ``LogConfig``); ``None``
        when ``section`` is ``None``.  Missing keys count as not configured.
        """
        if section is None:
            return None
        names = [f.name for f in fields(cls)]
        if isinstance(section, Mapping):
            unknown = sorted(str(key) for key in section if key not in names)
            if unknown:
                raise ValueError(
                    f"unknown log setting(s) {', '.join(unknown)}; expected {', '.join(names)}"
                )
            return cls(**{name: section.get(name) for name in names})
        return cls(**{name: getattr(section, name, None) for name in names})

    @property
    def has_destination(self) -> bool:
        return self.file is not None or self.dir is not None

    @staticmethod
    def merged(flags: LogSettings, configured: LogSettings | None, kind: LogKind) -> LogSettings:
        """Flag, else configured value, else the default for ``kind`` — field by field.

        ``file`` and ``dir`` move together: a ``--log-dir`` flag replaces a configured
        ``file`` (and the other way round) instead of losing to it.
        """
        defaults = default_settings(kind)
        layers = [flags] if configured is None else [flags, configured]

        def pick(name: str) -> Any:
            for layer in layers:
                value = getattr(layer, name)
                if value is not None:
                    return value
            return getattr(defaults, name)

        destination = next((layer for layer in layers if layer.has_destination), defaults)
        return LogSettings(
            level=pick("level"),
            file=destination.file,
            dir=destination.dir,
            format=pick("format"),
        )

    def log_file_path(self, binary: str) -> Path | None:
        """The file to write, if any: ``file``, else ``dir/<binary>.log``."""
        if self.file is not None:
            return Path(self.file).expanduser()
        if self.dir is not None:
            return Path(self.dir).expanduser() / f"{check_binary(binary)}.log"
        return None

    def sink_formats(self, kind: LogKind) -> tuple[LogFormat, LogFormat]:
        """(stderr format, file format) after applying the per-kind defaults."""
        if self.format is not None:
            return self.format, self.format
        return "text", ("json" if check_kind(kind) == "daemon" else "text")


def default_settings(kind: LogKind) -> LogSettings:
    """Per-kind defaults: ``info`` on stderr for both; see :meth:`LogSettings.sink_formats`."""
    check_kind(kind)
    return LogSettings(level="info")


def check_binary(binary: str) -> str:
    if not binary or binary != binary.strip() or any(sep in binary for sep in "/\\"):
        raise ValueError(f"binary name {binary!r} must be a non-empty file name")
    return binary


def default_log_dir(
    binary: str,
    platform: str | None = None,
    env: Mapping[str, str] | None = None,
) -> Path:
    """The standard directory for ``binary``'s log file on ``platform`` (``sys.platform``).

    ``$AH_HOME/logs`` when ``AH_HOME`` is set; else Linux and other Unixes
    ``$XDG_STATE_HOME/agent-harbor/logs`` (``~/.local/state/agent-harbor/logs``), macOS
    ``~/Library/Logs/agent-harbor``, Windows ``%LOCALAPPDATA%\\agent-harbor\\logs``.  All
    binaries share the directory; each writes ``<binary>.log`` (:func:`default_log_file`).
    Nothing is created here.
    """
    check_binary(binary)
    environ = os.environ if env is None else env
    system = sys.platform if platform is None else platform
    ah_home = environ.get("AH_HOME", "").strip()
    if ah_home:
        return Path(ah_home).expanduser() / "logs"
    if system.startswith(("win32", "cygwin", "msys")):
        local = environ.get("LOCALAPPDATA", "").strip()
        base = Path(local) if local else _home(environ, system) / "AppData" / "Local"
        return base / APP_DIR_NAME / "logs"
    if system == "darwin":
        return _home(environ, system) / "Library" / "Logs" / APP_DIR_NAME
    state = environ.get("XDG_STATE_HOME", "").strip()
    # The XDG spec says relative paths are invalid and must be ignored.
    if state and Path(state).is_absolute():
        return Path(state) / APP_DIR_NAME / "logs"
    return _home(environ, system) / ".local" / "state" / APP_DIR_NAME / "logs"


def default_log_file(
    binary: str, platform: str | None = None, env: Mapping[str, str] | None = None
) -> Path:
    """``default_log_dir(...) / "<binary>.log"``."""
    return default_log_dir(binary, platform, env) / f"{binary}.log"


def _home(env: Mapping[str, str], system: str) -> Path:
    names = ("USERPROFILE", "HOME") if system.startswith(("win32", "cygwin", "msys")) else ("HOME",)
    for name in names:
        value = env.get(name, "").strip()
        if value:
            return Path(value)
    return Path.home()


# -- click -----------------------------------------------------------------------------

FC = TypeVar("FC", bound=Callable[..., Any] | click.Command)

_LEVEL_HELP = (
    "Log level: trace, debug, info, warning, error or critical (any case), or a "
    "RUST_LOG-style list such as 'ah_connectivity=debug,info'. Default: info. "
    "The RUST_LOG environment variable overrides it."
)


def _check_level(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is None:
        return None
    try:
        parse_directives(value)
    except DirectiveError as error:
        raise click.BadParameter(str(error), ctx=ctx, param=param) from None
    return value.strip()


def log_options(kind: LogKind) -> Callable[[FC], FC]:
    """Add ``--log-level``, ``--log-file``, ``--log-dir`` and ``--log-format`` to a command.

    None has a click default (they arrive as ``None`` when not given), so a configured
    value is never shadowed: turn them into settings with :func:`log_settings_from_click`
    and resolve with :meth:`LogSettings.merged`.  The values arrive as the keyword
    arguments ``log_level``, ``log_file``, ``log_dir`` and ``log_format``.
    """
    check_kind(kind)
    if kind == "daemon":
        file_format = "JSON lines unless --log-format text"
        format_help = "Format: text or json. Default: text on stderr, JSON lines in a log file."
    else:
        file_format = "text unless --log-format json"
        format_help = "Format: text or json. Default: text."
    options = [
        click.option(
            "--log-level",
            "log_level",
            default=None,
            metavar="LEVEL|DIRECTIVES",
            callback=_check_level,
            help=_LEVEL_HELP,
        ),
        click.option(
            "--log-file",
            "log_file",
            default=None,
            metavar="PATH",
            type=click.Path(dir_okay=False),
            help=f"Also append logs to PATH ({file_format}). Default: stderr only.",
        ),
        click.option(
            "--log-dir",
            "log_dir",
            default=None,
            metavar="DIR",
            type=click.Path(file_okay=False),
            help=f"Also append logs to DIR/<binary>.log ({file_format}). --log-file wins.",
        ),
        click.option(
            "--log-format",
            "log_format",
            default=None,
            type=click.Choice(LOG_FORMATS, case_sensitive=False),
            help=format_help,
        ),
    ]

    def decorate(function: FC) -> FC:
        for option in reversed(options):
            function = option(function)
        return function

    return decorate


def _settings_from_values(values: Mapping[str, Any]) -> LogSettings:
    picked = {field: values.get(param) for param, field in LOG_PARAM_NAMES.items()}
    return LogSettings(**picked)


def log_settings_from_click(source: click.Context | Mapping[str, Any]) -> LogSettings:
    """The log flags given on the command line, as :class:`LogSettings` (unset = ``None``).

    ``source`` is the command's keyword arguments or a click context.  With a context,
    every enclosing context is searched too (log flags on a group and on a subcommand),
    the innermost value winning; ``--log-file``/``--log-dir`` move together.
    """
    if isinstance(source, Mapping):
        return _settings_from_values(source)
    layers: list[LogSettings] = []
    context: click.Context | None = source
    while context is not None:
        layers.append(_settings_from_values(context.params))
        context = context.parent
    merged: dict[str, Any] = {}
    for name in (f.name for f in fields(LogSettings)):
        merged[name] = next(
            (getattr(layer, name) for layer in layers if getattr(layer, name) is not None), None
        )
    destination = next((layer for layer in layers if layer.has_destination), LogSettings())
    merged["file"], merged["dir"] = destination.file, destination.dir
    return LogSettings(**merged)
