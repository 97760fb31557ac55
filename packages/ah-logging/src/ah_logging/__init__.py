"""Logging set-up shared by every Agent Harbor fleet binary (loguru).

Binaries: ``ah-fleetctl`` is kind ``"cli"``; ``ah-access-pointd`` and ``ah-followerd`` are
kind ``"daemon"``.  Typical use in a click entry point::

    @click.group()
    @log_options("daemon")
    @click.pass_context
    def main(ctx: click.Context, **_: object) -> None:
        # flags, then what the binary's own configuration sets, then the defaults;
        # a bad --log-level / RUST_LOG is a usage error; sinks close with the context
        configure_logging_from_click(ctx, "ah-followerd", "daemon", configured_log_settings)

Flags (every binary): ``--log-level LEVEL|DIRECTIVES``, ``--log-file PATH``, ``--log-dir
DIR``, ``--log-format text|json``.  None has a click default; precedence is flag, then
configuration, then the per-kind default, and the ``RUST_LOG`` environment variable
overrides the resulting level (its module directives win; its bare level, if any,
replaces the default level).

Destinations: logs always go to stderr and never to stdout (stdout belongs to command
output and ``--json``).  A file is written only when asked for: ``--log-file PATH``
(appended) or ``--log-dir DIR`` (``DIR/<binary>.log``; the file path wins when both are
set), from the flags or from configuration; this holds for daemons too — they do not
write to :func:`default_log_dir` on their own, which is offered for configuration and
service files to point at.

Defaults per kind: both log at ``info``.  A CLI writes text everywhere; a daemon writes
text on stderr and JSON lines in its file.  ``--log-format`` sets the format of both sinks.

JSON lines hold ``ts`` (ISO 8601 UTC), ``level``, ``logger`` (module or stdlib logger
name), ``message``, ``binary``, ``pid``, ``thread``, ``function``, ``line``,
``exception`` (when there is one) and every field bound with ``logger.bind(...)`` (as
``extra.<name>`` if it collides with one of those).

Directives: ``debug``, ``ah_connectivity=debug,info``, ``ah_connectivity::quic=trace,warn``
(see :mod:`ah_logging.directives`).  Stdlib logging (paramiko, aioquic, asyncio, httpx,
uvicorn, litestar...) is routed into loguru under its logger name; the libraries in
:data:`QUIET_LIBRARIES` log at WARNING unless a directive names them.

Redaction: a loguru patcher masks secrets in every record's message and extra fields,
and the sinks mask again while rendering (see :mod:`ah_logging.redaction`).
"""

from ah_logging.configure import (
    JSON_FIELDS,
    QUIET_LIBRARIES,
    InterceptHandler,
    LogFileError,
    LoggingHandle,
    configure_logging,
    configure_logging_from_click,
    effective_directives,
    render_json,
    render_text,
)
from ah_logging.directives import (
    LEVELS,
    DirectiveError,
    Directives,
    ModuleDirective,
    level_name,
    parse_directives,
    parse_level,
)
from ah_logging.redaction import MASK, is_sensitive_key, redact, redact_text
from ah_logging.settings import (
    LOG_PARAM_NAMES,
    LogFormat,
    LogKind,
    LogSettings,
    default_log_dir,
    default_log_file,
    default_settings,
    log_options,
    log_settings_from_click,
)

__all__ = [
    "JSON_FIELDS",
    "LEVELS",
    "LOG_PARAM_NAMES",
    "MASK",
    "QUIET_LIBRARIES",
    "DirectiveError",
    "Directives",
    "InterceptHandler",
    "LogFileError",
    "LogFormat",
    "LogKind",
    "LogSettings",
    "LoggingHandle",
    "ModuleDirective",
    "configure_logging",
    "configure_logging_from_click",
    "default_log_dir",
    "default_log_file",
    "default_settings",
    "effective_directives",
    "is_sensitive_key",
    "level_name",
    "log_options",
    "log_settings_from_click",
    "parse_directives",
    "parse_level",
    "redact",
    "redact_text",
    "render_json",
    "render_text",
]
