"""The CLI contract shared by every binary: exit codes, ``--json`` errors, interaction.

- :class:`AhGroup` / :class:`AhCommand` run click in non-standalone mode and turn every
  outcome into the spec's exit codes: usage errors → 2 (message and usage hint on stderr),
  :class:`CliError` / :class:`ConfigError` / ``DomainValidationError`` → their own code,
  Ctrl-C → 130, anything unexpected → 1 with a one-line message (a traceback only with
  ``AH_DEBUG=1`` or ``--log-level debug``).
- With ``--json`` (or ``AH_JSON=1``) an error also prints exactly one JSON document,
  ``{"error": {"kind", "message", "exitCode", "details"}}``, on stdout.
- A callback may return an ``int`` (e.g. an :class:`ExitCode`) to choose the exit code.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import sys
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import click
import msgspec
import tomli_w

from ah_domain_types import DomainValidationError, ErrorBody, ErrorEnvelope, ExitCode
from ah_domain_types.config_schema import ConfigFile

from .click import config_file_option, config_option, resolve_from_click
from .keys import format_key

__all__ = [
    "AhCommand",
    "AhGroup",
    "CliError",
    "confirm",
    "echo_json",
    "format_toml_value",
    "global_options",
    "is_interactive",
    "is_json",
    "is_non_interactive",
    "make_config_show_command",
    "require_interaction",
]

FC = TypeVar("FC", bound=Callable[..., Any] | click.Command)

INTERRUPTED_EXIT_CODE = 130
"""128 + SIGINT, what shells report for Ctrl-C."""

JSON_PARAM = "json_output"
NON_INTERACTIVE_PARAM = "non_interactive"
_TRUE_WORDS = frozenset({"1", "true", "yes", "on"})


def _camel(name: str) -> str:
    head, *rest = name.lower().split("_")
    return head + "".join(word.capitalize() for word in rest)


class CliError(Exception):
    """A failure to report to the user with a specific exit code.

    ``kind`` is the machine-readable ``error.kind`` of the ``--json`` document (by default
    derived from the exit code: ``interactionNeeded``, ``auth``, ``network``...).
    """

    def __init__(
        self,
        exit_code: ExitCode,
        message: str,
        *,
        kind: str | None = None,
        details: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.exit_code = ExitCode(exit_code)
        self.message = message
        self.kind = kind or _camel(self.exit_code.name)
        self.details: dict[str, str] = dict(details or {})

    def __str__(self) -> str:
        return self.message


# --------------------------------------------------------------------------- context flags


def _chain(ctx: click.Context | None) -> Iterator[click.Context]:
    while ctx is not None:
        yield ctx
        ctx = ctx.parent


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in _TRUE_WORDS


def _flag_in_chain(ctx: click.Context | None, param: str) -> bool:
    return any(bool(c.params.get(param)) for c in _chain(ctx))


def is_json(ctx: click.Context | None) -> bool:
    """Whether ``--json`` is in effect (on ``ctx`` or a parent, or ``AH_JSON=1``)."""
    return _flag_in_chain(ctx, JSON_PARAM) or _env_flag("AH_JSON")


def is_non_interactive(ctx: click.Context | None) -> bool:
    """Whether ``--non-interactive`` is in effect (or ``AH_NON_INTERACTIVE=1``)."""
    return _flag_in_chain(ctx, NON_INTERACTIVE_PARAM) or _env_flag("AH_NON_INTERACTIVE")


def _stdin_is_tty() -> bool:
    try:
        return sys.stdin is not None and sys.stdin.isatty()
    except (AttributeError, ValueError):  # replaced or closed stdin
        return False


def is_interactive(ctx: click.Context | None) -> bool:
    """Whether prompting is allowed: not ``--non-interactive`` and stdin is a terminal."""
    return not is_non_interactive(ctx) and _stdin_is_tty()


def require_interaction(ctx: click.Context | None, what: str) -> None:
    """Raise ``CliError(INTERACTION_NEEDED)`` (exit 10) if ``--non-interactive`` is set."""
    if is_non_interactive(ctx):
        raise CliError(
            ExitCode.INTERACTION_NEEDED,
            f"{what} needs interaction but --non-interactive is set",
            details={"what": what},
        )


def confirm(ctx: click.Context | None, prompt: str, *, default: bool = False) -> bool:
    """Ask a yes/no question on stderr. Never prompts under ``--non-interactive`` or when
    stdin is not a terminal: both raise ``CliError(INTERACTION_NEEDED)`` (exit 10)."""
    require_interaction(ctx, f"the question {prompt!r}")
    if not _stdin_is_tty():
        raise CliError(
            ExitCode.INTERACTION_NEEDED,
            f"the question {prompt!r} needs interaction but standard input is not a "
            "terminal; answer it with a flag or run in a terminal",
            details={"what": prompt},
        )
    return click.confirm(prompt, default=default, err=True)


def echo_json(value: object) -> None:
    """Print ``value`` as one JSON document (Structs use their camelCase names)."""
    click.echo(msgspec.json.encode(value).decode("utf-8"))


# --------------------------------------------------------------------------- main()

_CONTEXTS: contextvars.ContextVar[list[click.Context] | None] = contextvars.ContextVar(
    "ah_config_cli_contexts", default=None
)


def _record(ctx: click.Context) -> None:
    contexts = _CONTEXTS.get()
    if contexts is not None:
        contexts.append(ctx)


def _json_requested(ctx: click.Context | None, raw_args: Sequence[str]) -> bool:
    if _env_flag("AH_JSON"):
        return True
    unprocessed = ctx is None
    for current in _chain(ctx):
        if any(p.name == JSON_PARAM for p in current.command.params):
            if current.params.get(JSON_PARAM):
                return True
            if JSON_PARAM not in current.params:
                unprocessed = True
    if not unprocessed:
        return False
    # Parsing failed before --json was processed: look at the raw arguments instead.
    options = raw_args[: raw_args.index("--")] if "--" in raw_args else raw_args
    return "--json" in options


def _debug_requested(ctx: click.Context | None) -> bool:
    if _env_flag("AH_DEBUG"):
        return True
    levels = {str(c.params.get("log_level", "")).lower() for c in _chain(ctx)}
    return bool(levels & {"debug", "trace"})


def _report(exc: BaseException, contexts: Sequence[click.Context], raw_args: Sequence[str]) -> int:
    """Print ``exc`` the CLI way and return the exit code."""
    ctx = getattr(exc, "ctx", None) or (contexts[-1] if contexts else None)
    details: dict[str, str] = {}
    if isinstance(exc, click.exceptions.NoArgsIsHelpError):
        exc.show()
        code, kind, message = exc.exit_code, "usage", "missing command (see --help)"
    elif isinstance(exc, click.UsageError):
        exc.show()
        code, kind, message = exc.exit_code, "usage", exc.format_message()
    elif isinstance(exc, click.ClickException):
        exc.show()
        code, message = exc.exit_code, exc.format_message()
        kind = "usage" if code == ExitCode.USAGE else "error"
    elif isinstance(exc, KeyboardInterrupt) or (
        isinstance(exc, click.Abort) and isinstance(exc.__cause__, KeyboardInterrupt)
    ):
        click.echo("Interrupted.", err=True)
        code, kind, message = INTERRUPTED_EXIT_CODE, "interrupted", "interrupted"
    elif isinstance(exc, click.Abort):
        click.echo("Aborted!", err=True)
        code, kind, message = int(ExitCode.HOSTS_FAILED), "aborted", "aborted"
    elif isinstance(exc, CliError | DomainValidationError):
        code, kind, message = int(exc.exit_code), exc.kind, exc.message
        details = dict(exc.details)
        click.echo(f"Error: {message}", err=True)
    elif isinstance(exc, BrokenPipeError):
        # The reader went away (``| head``): nothing more can be written to stdout.
        # Point fd 1 at devnull so the interpreter's final flush does not fail again.
        with contextlib.suppress(OSError, ValueError, AttributeError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        return int(ExitCode.HOSTS_FAILED)
    else:
        code, kind = int(ExitCode.HOSTS_FAILED), "internal"
        message = f"unexpected {type(exc).__name__}: {exc}"
        if _debug_requested(ctx):
            traceback.print_exception(exc, file=sys.stderr)
            click.echo(f"Error: {message}", err=True)
        else:
            click.echo(f"Error: {message} (AH_DEBUG=1 shows the traceback)", err=True)
    if _json_requested(ctx, raw_args):
        echo_json(
            ErrorEnvelope(ErrorBody(kind=kind, message=message, exit_code=code, details=details))
        )
    return code


def _exit_code_of(result: object) -> int:
    if isinstance(result, int) and not isinstance(result, bool):
        return int(result)
    return int(ExitCode.OK)


def _run_main(
    base_main: Callable[..., Any],
    args: Sequence[str] | None,
    prog_name: str | None,
    complete_var: str | None,
    standalone_mode: bool,
    windows_expand_args: bool,
    extra: dict[str, Any],
) -> Any:
    call = {
        "args": args,
        "prog_name": prog_name,
        "complete_var": complete_var,
        "windows_expand_args": windows_expand_args,
        **extra,
    }
    if not standalone_mode:
        return base_main(standalone_mode=False, **call)
    raw_args = list(args) if args is not None else sys.argv[1:]
    contexts: list[click.Context] = []
    token = _CONTEXTS.set(contexts)
    try:
        try:
            result = base_main(standalone_mode=False, **call)
        except SystemExit:
            raise
        except (Exception, KeyboardInterrupt) as exc:
            code = _report(exc, contexts, raw_args)
        else:
            code = _exit_code_of(result)
    finally:
        _CONTEXTS.reset(token)
    sys.exit(code)


class AhCommand(click.Command):
    """A click command that follows the CLI contract (see the module docstring)."""

    def make_context(
        self,
        info_name: str | None,
        args: list[str],
        parent: click.Context | None = None,
        **extra: Any,
    ) -> click.Context:
        ctx = super().make_context(info_name, args, parent, **extra)
        _record(ctx)
        return ctx

    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        windows_expand_args: bool = True,
        **extra: Any,
    ) -> Any:
        return _run_main(
            super().main, args, prog_name, complete_var, standalone_mode, windows_expand_args, extra
        )


class AhGroup(click.Group):
    """A click group that follows the CLI contract; its subcommands and subgroups default
    to :class:`AhCommand` / :class:`AhGroup`."""

    command_class = AhCommand
    group_class = type  # subgroups are of this same class

    def make_context(
        self,
        info_name: str | None,
        args: list[str],
        parent: click.Context | None = None,
        **extra: Any,
    ) -> click.Context:
        ctx = super().make_context(info_name, args, parent, **extra)
        _record(ctx)
        return ctx

    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        windows_expand_args: bool = True,
        **extra: Any,
    ) -> Any:
        return _run_main(
            super().main, args, prog_name, complete_var, standalone_mode, windows_expand_args, extra
        )


# --------------------------------------------------------------------------- global options


def global_options(f: FC) -> FC:
    """Add ``--access-point``, ``--token``, ``--json``, ``--non-interactive`` and
    ``--config FILE``. The first two are config options (keys ``remote-server`` and
    ``token``; ``AH_REMOTE_SERVER``/``AH_ACCESS_POINT`` and ``AH_TOKEN``) with no click
    default, so configured values are never shadowed."""
    decorators: list[Callable[[FC], FC]] = [
        config_option(
            "remote-server",
            "--access-point",
            "access_point",
            metavar="URL",
            help="Access point URL (config key remote-server; AH_REMOTE_SERVER, AH_ACCESS_POINT).",
        ),
        config_option(
            "token",
            "--token",
            "token",
            metavar="TOKEN",
            help="User token for the access point (config key token; AH_TOKEN).",
        ),
        click.option(
            "--json",
            JSON_PARAM,
            is_flag=True,
            default=False,
            help='Print exactly one JSON document on stdout (errors as {"error": {...}}).',
        ),
        click.option(
            "--non-interactive",
            NON_INTERACTIVE_PARAM,
            is_flag=True,
            default=False,
            help="Never prompt; exit with code 10 when input would be needed.",
        ),
        config_file_option(),
    ]
    for decorator in reversed(decorators):
        f = decorator(f)
    return f


# --------------------------------------------------------------------------- config show


def format_toml_value(value: object) -> str:
    """A value as a one-line TOML expression (inline tables and arrays)."""
    if isinstance(value, Mapping):
        if not value:
            return "{}"
        inner = ", ".join(
            f"{format_key((str(k),))} = {format_toml_value(v)}" for k, v in value.items()
        )
        return "{ " + inner + " }"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(format_toml_value(v) for v in value) + "]"
    return tomli_w.dumps({"v": value}).split(" = ", 1)[1].rstrip("\n")


def make_config_show_command(
    name: str = "show",
    *,
    schema: type[msgspec.Struct] | None = None,
    defaults: msgspec.Struct | None = None,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    platform: str | None = None,
) -> click.Command:
    """``show [KEY] [--show-origin]``: print the resolved configuration.

    Lines are ``key = value`` (``  # layer source`` appended with ``--show-origin``);
    tokens and other secrets print as ``"***"``. With ``--json``: one object
    ``{key: {"value": ..., "origin": {"layer", "source"}}}``. An unknown KEY is a usage
    error (exit 2) naming close matches; a known but unset KEY prints nothing on stdout.
    """

    @click.command(name, cls=AhCommand)
    @click.argument("key", required=False)
    @click.option(
        "--show-origin",
        is_flag=True,
        default=False,
        help="Show which layer and file, variable or flag supplied each value.",
    )
    @click.pass_context
    def show(ctx: click.Context, key: str | None, show_origin: bool) -> None:
        """Show the resolved configuration (optionally one KEY or table)."""
        resolved = resolve_from_click(
            ctx,
            schema=ConfigFile if schema is None else schema,
            defaults=defaults,
            cwd=cwd,
            env=env,
            platform=platform,
        )
        for var in resolved.unknown_env:
            click.echo(f"warning: ignoring {var}: it is not a configuration variable", err=True)
        if key is not None and not resolved.is_key(key):
            suggestions = resolved.suggest(key)
            hint = f"; did you mean {', '.join(suggestions)}?" if suggestions else ""
            raise click.UsageError(f"unknown configuration key {key!r}{hint}", ctx=ctx)
        entries = resolved.entries(key, redact=True)
        if is_json(ctx):
            document: dict[str, object] = {
                e.key: {"value": e.value, "origin": e.origin} for e in entries
            }
            if key is not None and not entries:
                document[key] = {"value": None, "origin": None}
            echo_json(document)
            return
        if key is not None and not entries:
            click.echo(f"{key} is not set", err=True)
            return
        for entry in entries:
            line = f"{entry.key} = {format_toml_value(entry.value)}"
            if show_origin:
                line += f"  # {entry.origin.describe()}"
            click.echo(line)

    return show
