"""Installing the sinks: stderr, an optional file, stdlib interception and redaction."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import sys
import threading
import traceback
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import click
from loguru import logger

from ah_logging.directives import LEVELS, Directives, parse_directives
from ah_logging.redaction import redact, redact_text
from ah_logging.settings import (
    LogFormat,
    LogKind,
    LogSettings,
    check_binary,
    check_kind,
    log_settings_from_click,
)

if TYPE_CHECKING:
    from loguru import Message, Record

__all__ = [
    "JSON_FIELDS",
    "QUIET_LIBRARIES",
    "InterceptHandler",
    "LogFileError",
    "LoggingHandle",
    "configure_logging",
    "configure_logging_from_click",
    "effective_directives",
    "render_json",
    "render_text",
]

# Libraries that log a lot at INFO/DEBUG: they get WARNING unless a directive names them
# (or a parent), e.g. ``paramiko=debug``.
QUIET_LIBRARIES: tuple[str, ...] = (
    "aioquic",
    "aiosqlite",
    "anyio",
    "asyncio",
    "cryptography",
    "h11",
    "h2",
    "hpack",
    "httpcore",
    "httpx",
    "litestar",
    "multipart",
    "paramiko",
    "quic",  # aioquic's per-connection logger is named "quic", not "aioquic.*"
    "urllib3",
    "uvicorn",
    "watchfiles",
    "websockets",
)
QUIET_FLOOR = LEVELS["warning"]

# The fixed fields of a JSON line; an extra field with one of these names is written as
# "extra.<name>" instead of replacing it.
JSON_FIELDS: tuple[str, ...] = (
    "ts",
    "level",
    "logger",
    "message",
    "binary",
    "pid",
    "thread",
    "function",
    "line",
    "exception",
)

_LEVEL_COLOURS: Mapping[str, str] = {
    "TRACE": "\x1b[2m",
    "DEBUG": "\x1b[34m",
    "INFO": "\x1b[32m",
    "SUCCESS": "\x1b[1;32m",
    "WARNING": "\x1b[33m",
    "ERROR": "\x1b[31m",
    "CRITICAL": "\x1b[1;31m",
}
_RESET = "\x1b[0m"


class LogFileError(OSError):
    """The log file could not be created or opened (the message names the path)."""


class _LogDestinationError(click.ClickException):
    # 8 is the spec's "configuration" exit code (ah-logging sits below the ExitCode users).
    exit_code = 8


# -- rendering -------------------------------------------------------------------------


def _timestamp(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _exception_text(record: Record) -> str | None:
    exception = record["exception"]
    if exception is None or exception.type is None:
        return None
    lines = traceback.format_exception(exception.type, exception.value, exception.traceback)
    return redact_text("".join(lines).rstrip("\n"))


def _jsonable(value: Any) -> Any:
    """A JSON-safe copy of an already redacted value (unknown objects become text)."""
    if value is None or isinstance(value, str | bool | int | float):
        return value
    if isinstance(value, Mapping):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_jsonable(item) for item in value]
    if isinstance(value, bytes | bytearray):
        return redact_text(bytes(value).decode("utf-8", errors="replace"))
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _jsonable(redact(value))
    struct_fields = getattr(type(value), "__struct_fields__", None)  # msgspec.Struct
    if isinstance(struct_fields, tuple):
        return _jsonable(redact({name: getattr(value, name) for name in struct_fields}))
    return redact_text(str(value))


def _safe_extra(record: Record) -> dict[str, Any]:
    # Redacted again here: a patcher added with logger.patch() runs after the core one.
    redacted = redact(record["extra"])
    return {str(key): _jsonable(value) for key, value in redacted.items()}


def render_json(record: Record, binary: str) -> str:
    """One JSON line (with the trailing newline) for ``record``."""
    document: dict[str, Any] = {
        "ts": _timestamp(record["time"]),
        "level": record["level"].name,
        "logger": record["name"] or "",
        "message": redact_text(record["message"]),
        "binary": binary,
        "pid": record["process"].id,
        "thread": record["thread"].name,
        "function": record["function"],
        "line": record["line"],
    }
    exception = _exception_text(record)
    if exception is not None:
        document["exception"] = exception
    for key, value in _safe_extra(record).items():
        document[f"extra.{key}" if key in JSON_FIELDS else key] = value
    return json.dumps(document, ensure_ascii=False, separators=(",", ":")) + "\n"


def _text_value(value: Any) -> str:
    if isinstance(value, str) and value and not any(c.isspace() or c in "\"'=" for c in value):
        return value
    return json.dumps(value, ensure_ascii=False)


def render_text(record: Record, colour: bool = False) -> str:
    """``<ts> <LEVEL> <logger>: <message> key=value...`` plus the traceback, if any."""
    level = record["level"].name
    shown_level = f"{level:<8}"
    if colour:
        shown_level = f"{_LEVEL_COLOURS.get(level, '')}{shown_level}{_RESET}"
    fields = "".join(f" {key}={_text_value(value)}" for key, value in _safe_extra(record).items())
    line = (
        f"{_timestamp(record['time'])} {shown_level} {record['name'] or '?'}: "
        f"{redact_text(record['message'])}{fields}\n"
    )
    exception = _exception_text(record)
    return line if exception is None else f"{line}{exception}\n"


# -- sinks -----------------------------------------------------------------------------


class _StderrSink:
    """Writes to whatever ``sys.stderr`` is at the time (so redirection keeps working)."""

    def __init__(self, render: Callable[[Record, bool], str], colour_allowed: bool) -> None:
        self._render = render
        self._colour_allowed = colour_allowed

    def write(self, message: Message) -> None:
        stream = sys.stderr
        if stream is None:  # pythonw.exe and friends
            return
        stream.write(self._render(message.record, self._colour_allowed and _isatty(stream)))
        stream.flush()


def _isatty(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError, OSError):
        return False


class _FileSink:
    """Appends rendered lines to a file, flushed per record (daemons may die abruptly)."""

    def __init__(self, path: Path, render: Callable[[Record, bool], str]) -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._stream = path.open("a", encoding="utf-8", newline="\n")
        except OSError as error:
            raise LogFileError(
                error.errno, f"cannot open log file {path} for appending: {error.strerror}"
            ) from error
        self._render = render
        self.path = path

    def write(self, message: Message) -> None:
        self._stream.write(self._render(message.record, False))

    def flush(self) -> None:
        self._stream.flush()

    def stop(self) -> None:
        self._stream.close()


def _renderer(log_format: LogFormat, binary: str) -> Callable[[Record, bool], str]:
    if log_format == "json":
        return lambda record, _colour: render_json(record, binary)
    return render_text


# -- stdlib logging --------------------------------------------------------------------

_LOGGING_SOURCE = logging.Handler.handle.__code__.co_filename


def _rename(name: str, record: Record) -> None:
    record["name"] = name


class InterceptHandler(logging.Handler):
    """A stdlib ``logging`` handler that hands records to loguru.

    The loguru record keeps the stdlib logger's name (``paramiko.transport``), so
    directives like ``paramiko=warning`` apply, and the caller's function and line.
    Records the directives would drop are dropped here, before any formatting.
    """

    def __init__(self, directives: Directives | None = None) -> None:
        super().__init__(logging.NOTSET)
        self.directives = directives

    def emit(self, record: logging.LogRecord) -> None:
        if self.directives is not None and record.levelno < self.directives.level_for(record.name):
            return
        try:
            level: str | int = logger.level(record.levelname).name
        except ValueError:
            level = record.levelno
        try:
            message = record.getMessage()
        except Exception:
            self.handleError(record)
            return
        frame = sys._getframe(1)
        depth = 1
        # Skip the logging package's own frames to report the line that called it.
        while frame.f_back is not None and frame.f_code.co_filename == _LOGGING_SOURCE:
            frame = frame.f_back
            depth += 1
        logger.patch(partial(_rename, record.name)).opt(
            depth=depth, exception=record.exc_info or None
        ).log(level, message)


def _install_intercept(handler: InterceptHandler | None, level: int) -> None:
    root = logging.getLogger()
    for existing in list(root.handlers):
        if isinstance(existing, InterceptHandler):
            root.removeHandler(existing)
    if handler is not None:
        root.addHandler(handler)
        root.setLevel(level)


# -- configure -------------------------------------------------------------------------


def _redact_record(record: Record) -> None:
    record["message"] = redact_text(record["message"])
    record["extra"] = redact(record["extra"])


@dataclasses.dataclass(frozen=True)
class LoggingHandle:
    """What :func:`configure_logging` installed; :meth:`close` removes it again."""

    binary: str
    kind: LogKind
    settings: LogSettings
    directives: Directives
    stderr_format: LogFormat
    file_format: LogFormat | None
    file_path: Path | None
    handler_ids: tuple[int, ...]
    intercept: InterceptHandler = dataclasses.field(repr=False)

    def level_for(self, module_name: str | None) -> int:
        return self.directives.level_for(module_name)

    def close(self) -> None:
        """Remove this configuration's sinks (closing the file) and the stdlib hook."""
        global _current
        with _lock:
            for handler_id in self.handler_ids:
                # Already gone when a later configure_logging() replaced this one.
                with contextlib.suppress(ValueError):
                    logger.remove(handler_id)
            root = logging.getLogger()
            if self.intercept in root.handlers:
                root.removeHandler(self.intercept)
            if _current is self:
                _current = None

    def __enter__(self) -> LoggingHandle:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


_lock = threading.Lock()
_current: LoggingHandle | None = None


def effective_directives(
    settings: LogSettings, env: Mapping[str, str], quiet: Iterable[str] = QUIET_LIBRARIES
) -> Directives:
    """The level filter: ``settings.level`` (default info), overlaid by ``RUST_LOG``."""
    directives = parse_directives(settings.level or "info", source="log level")
    rust_log = env.get("RUST_LOG", "")
    if rust_log.strip():
        directives = directives.overlay(parse_directives(rust_log, source="RUST_LOG"))
    return directives.with_quiet_modules(quiet, QUIET_FLOOR)


def configure_logging(
    binary: str,
    kind: LogKind,
    settings: LogSettings,
    env: Mapping[str, str] = os.environ,
) -> LoggingHandle:
    """Set up loguru for ``binary``; calling it again replaces the previous set-up.

    Every existing loguru handler is removed (loguru's default one included), then:
    stderr gets text (JSON lines with format ``json``); the file from ``--log-file`` or
    ``--log-dir`` gets JSON lines for a daemon and text for a CLI unless a format is
    given; stdout is never written.  The level comes from ``settings`` (flag → config →
    ``info``; unset fields are resolved here too) and ``RUST_LOG`` overrides it.  Stdlib
    logging is routed through :class:`InterceptHandler` on the root logger; noisy
    libraries (:data:`QUIET_LIBRARIES`) stay at WARNING unless a directive names them.
    A patcher redacts every record's message and extra fields.

    Raises ``ValueError`` (a :class:`~ah_logging.DirectiveError` for a bad level or
    ``RUST_LOG``; the message names the bad part) and :class:`LogFileError`.  On error
    the previous set-up stays in place.
    """
    global _current
    check_binary(binary)
    check_kind(kind)
    resolved = LogSettings.merged(settings, None, kind)
    directives = effective_directives(resolved, env)
    stderr_format, file_format = resolved.sink_formats(kind)
    file_path = resolved.log_file_path(binary)
    file_sink = None if file_path is None else _FileSink(file_path, _renderer(file_format, binary))
    colour_allowed = "NO_COLOR" not in env and env.get("TERM") != "dumb"

    def level_filter(record: Record) -> bool:
        return record["level"].no >= directives.level_for(record["name"])

    with _lock:
        logger.remove()
        logger.configure(patcher=_redact_record)
        stderr_sink = _StderrSink(_renderer(stderr_format, binary), colour_allowed)
        ids = [
            logger.add(
                stderr_sink.write,
                level=directives.min_level,
                format="{message}",
                filter=level_filter,
                colorize=False,
                backtrace=False,
                diagnose=False,
            )
        ]
        if file_sink is not None:
            ids.append(
                logger.add(
                    file_sink,
                    level=directives.min_level,
                    format="{message}",
                    filter=level_filter,
                    colorize=False,
                    backtrace=False,
                    diagnose=False,
                )
            )
        intercept = InterceptHandler(directives)
        _install_intercept(intercept, directives.min_level)
        handle = LoggingHandle(
            binary=binary,
            kind=kind,
            settings=resolved,
            directives=directives,
            stderr_format=stderr_format,
            file_format=None if file_path is None else file_format,
            file_path=file_path,
            handler_ids=tuple(ids),
            intercept=intercept,
        )
        _current = handle
    return handle


def configure_logging_from_click(
    ctx: click.Context,
    binary: str,
    kind: LogKind,
    configured: LogSettings | None = None,
) -> LoggingHandle:
    """The usual set-up of a command: its log flags, then ``configured`` (what the binary's
    own configuration sets), then the defaults for ``kind``. A bad level or ``RUST_LOG`` is a
    usage error (exit 2); a log file that cannot be opened is a configuration error (exit
    8); the sinks are closed when the click context closes."""
    try:
        settings = LogSettings.merged(log_settings_from_click(ctx), configured, kind)
        handle = configure_logging(binary, kind, settings)
    except ValueError as exc:  # bad --log-level, configured level or RUST_LOG
        raise click.UsageError(str(exc), ctx=ctx) from None
    except LogFileError as exc:
        raise _LogDestinationError(f"{exc} (--log-file/--log-dir or configured [log])") from None
    ctx.call_on_close(handle.close)
    return handle
