"""The ``ah-access-pointd`` command line (click, the CLI contract of ``ah_config``)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import click
import msgspec

from ah_config import (
    AhGroup,
    CliError,
    daemon_log_config,
    duration_callback,
    echo_json,
    is_json,
    tags_callback,
)
from ah_domain_types import (
    DomainValidationError,
    ExitCode,
    validate_host_name,
)
from ah_logging import LogSettings, configure_logging_from_click, log_options

from . import __version__
from .state import SETTINGS_FILE, ApState, StateError, check_trust_domain, init_state, load_state

__all__ = ["main"]

BINARY = "ah-access-pointd"
_SCOPES = ("exec", "ssh", "read-logs")


# ------------------------------------------------------------------------------ helpers


def _configure_logging(ctx: click.Context, state: ApState | None = None) -> None:
    """Log flags, then ``AH_LOG_*``, then ``[log]`` of ``ap.toml``, then the user and system
    configuration files, then the daemon defaults."""
    configured = daemon_log_config(
        state.settings.log if state is not None else None,
        str(state.state_dir / SETTINGS_FILE) if state is not None else None,
    )
    configure_logging_from_click(ctx, BINARY, "daemon", LogSettings.from_config(configured))


def _state(state_dir: Path) -> ApState:
    try:
        return load_state(state_dir)
    except StateError as exc:
        raise CliError(exc.exit_code, exc.message, details={"stateDir": str(state_dir)}) from None


def _state_and_logging(ctx: click.Context, state_dir: Path) -> ApState:
    """Load the state directory, then set up logging with its ``[log]`` (without it, and
    still loudly, when the state cannot be loaded)."""
    try:
        state = _state(state_dir)
    except CliError:
        _configure_logging(ctx)
        raise
    _configure_logging(ctx, state)
    return state


_state_dir_option = click.option(
    "--state-dir",
    "state_dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    metavar="DIR",
    help="The access point's state directory (CA, keys, settings, fleet registry).",
)
_json_option = click.option(
    "--json",
    "json_output",
    is_flag=True,
    default=False,
    help='Print one JSON document on stdout (errors as {"error": {...}}).',
)


# ------------------------------------------------------------------------------ commands


@click.group(cls=AhGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name=BINARY)
@log_options("daemon")
def main(**_: object) -> None:
    """Agent Harbor fleet access point: fleet CA, QUIC control server, REST API."""


class InitResult(msgspec.Struct, frozen=True, rename="camel"):
    state_dir: str
    trust_domain: str
    ca_fingerprint: str
    ca_file: str
    server_sans: list[str]


@main.command()
@_state_dir_option
@click.option(
    "--trust-domain",
    default="ah.local",
    show_default=True,
    help="SPIFFE trust domain of the fleet (lowercase letters, digits, '.', '-', '_').",
)
@click.option(
    "--san",
    "sans",
    multiple=True,
    metavar="NAME_OR_IP",
    help="Extra DNS name or IP address for the server certificate (repeatable).",
)
@click.option("--force", is_flag=True, default=False, help="Replace an existing state directory.")
@_json_option
@log_options("daemon")
@click.pass_context
def init(
    ctx: click.Context,
    /,
    state_dir: Path,
    trust_domain: str,
    sans: tuple[str, ...],
    force: bool,
    json_output: bool,
    **_: object,
) -> None:
    """Create the fleet CA, the server identity and the token-signing key; print the CA
    fingerprint (give it to followers and leaders out of band)."""
    _configure_logging(ctx)
    try:
        check_trust_domain(trust_domain)
    except ValueError as exc:
        raise click.BadParameter(str(exc), ctx=ctx, param_hint="--trust-domain") from None
    try:
        state = init_state(state_dir, trust_domain=trust_domain, extra_sans=sans, force=force)
    except StateError as exc:
        raise CliError(exc.exit_code, exc.message, details={"stateDir": str(state_dir)}) from None
    except OSError as exc:
        raise CliError(
            ExitCode.CONFIGURATION, f"cannot create state directory {state_dir}: {exc}"
        ) from None
    if is_json(ctx):
        echo_json(
            InitResult(
                state_dir=str(state.state_dir),
                trust_domain=state.trust_domain,
                ca_fingerprint=state.ca.fingerprint,
                ca_file=str(state.ca_path),
                server_sans=list(state.settings.server_sans),
            )
        )
    else:
        click.echo(state.ca.fingerprint)


@main.command()
@_state_dir_option
@click.option(
    "--bind", default="127.0.0.1", show_default=True, metavar="ADDR", help="Listen address."
)
@click.option(
    "--quic-port",
    type=click.IntRange(0, 65535),
    default=0,
    show_default=True,
    help="UDP port of the QUIC control server (0: pick a free one).",
)
@click.option(
    "--api-port",
    type=click.IntRange(0, 65535),
    default=0,
    show_default=True,
    help="TCP port of the HTTPS REST API (0: pick a free one).",
)
@click.option(
    "--connect-port",
    type=click.IntRange(0, 65535),
    default=None,
    help="TCP port of the TLS CONNECT listener leaders tunnel SSH through (0 or unset: "
    "pick a free one).",
)
@click.option(
    "--ready-file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    metavar="PATH",
    help="Write the bound ports as JSON here (atomically) once every listener accepts.",
)
@click.option(
    "--heartbeat-interval",
    default="5s",
    show_default=True,
    callback=duration_callback,
    metavar="DURATION",
    help="Heartbeat interval followers are told to use; unhealthy after 3 missed, "
    "disconnected (offline) after 6.",
)
@click.option(
    "--advertise-host",
    default=None,
    metavar="HOST",
    help="Host followers dial for QUIC (default: --bind, or the host name for a wildcard).",
)
@click.option(
    "--sse-keepalive",
    default="15s",
    show_default=True,
    callback=duration_callback,
    metavar="DURATION",
    help="Send a keep-alive comment on an idle session event stream this often.",
)
@click.option(
    "--sse-queue",
    type=click.IntRange(1, 1_000_000),
    default=10_000,
    show_default=True,
    metavar="N",
    help="Live events an event-stream client may lag behind before it is disconnected "
    "(it resumes with Last-Event-ID).",
)
@log_options("daemon")
@click.pass_context
def serve(
    ctx: click.Context,
    /,
    state_dir: Path,
    bind: str,
    quic_port: int,
    api_port: int,
    connect_port: int | None,
    ready_file: Path | None,
    heartbeat_interval: float,
    advertise_host: str | None,
    sse_keepalive: float,
    sse_queue: int,
    **_: object,
) -> int:
    """Serve the QUIC control plane and the REST API until SIGTERM/SIGINT."""
    state = _state_and_logging(ctx, state_dir)
    from .serve import ServeOptions, run_serve

    options = ServeOptions(
        bind=bind,
        quic_port=quic_port,
        api_port=api_port,
        connect_port=connect_port,
        ready_file=ready_file,
        heartbeat_interval_ms=max(1, round(heartbeat_interval * 1000)),
        advertise_host=advertise_host,
        sse_keepalive_s=sse_keepalive,
        sse_queue_size=sse_queue,
    )
    return asyncio.run(run_serve(state, options))


@main.group()
def token() -> None:
    """Mint enrollment tokens (followers) and user tokens (leaders)."""


class TokenResult(msgspec.Struct, frozen=True, rename="camel"):
    token: str
    kind: str
    subject: str
    expires_at: int


@token.command("enroll")
@_state_dir_option
@click.option("--name", required=True, help="Name of the follower the token enrolls.")
@click.option(
    "--tag",
    "tags",
    multiple=True,
    callback=tags_callback,
    metavar="K=V",
    help="Tag granted to the follower (repeatable).",
)
@click.option(
    "--ttl",
    default="1h",
    show_default=True,
    callback=duration_callback,
    metavar="DURATION",
    help="How long the token stays valid.",
)
@click.option(
    "--access-point",
    default=None,
    metavar="HOST:PORT",
    help="The API address followers enroll at, carried in the token.",
)
@_json_option
@log_options("daemon")
@click.pass_context
def token_enroll(
    ctx: click.Context,
    /,
    state_dir: Path,
    name: str,
    tags: dict[str, str],
    ttl: float,
    access_point: str | None,
    json_output: bool,
    **_: object,
) -> None:
    """Print a one-time enrollment token for follower NAME (it pins the CA fingerprint)."""
    try:
        validate_host_name(name)
    except DomainValidationError as exc:
        raise click.BadParameter(str(exc), ctx=ctx, param_hint="--name") from None
    state = _state_and_logging(ctx, state_dir)
    now = int(time.time())
    jwt = state.signer.issue_enroll(
        name,
        ca_fingerprint=state.ca.fingerprint,
        tags=tags,
        ttl=ttl,
        access_point=access_point,
        now=now,
    )
    _print_token(ctx, jwt, "enroll", name, now + int(ttl))


@token.command("user")
@_state_dir_option
@click.option("--subject", required=True, metavar="WHO", help="Who the token is for.")
@click.option(
    "--scope",
    "scopes",
    multiple=True,
    type=click.Choice(_SCOPES),
    help="Scope granted (repeatable; default: all of exec, ssh, read-logs).",
)
@click.option(
    "--hosts",
    default="*",
    show_default=True,
    metavar="GLOB",
    help="Follower names the token may address (fnmatch glob).",
)
@click.option(
    "--ttl",
    default="12h",
    show_default=True,
    callback=duration_callback,
    metavar="DURATION",
    help="How long the token stays valid.",
)
@_json_option
@log_options("daemon")
@click.pass_context
def token_user(
    ctx: click.Context,
    /,
    state_dir: Path,
    subject: str,
    scopes: tuple[str, ...],
    hosts: str,
    ttl: float,
    json_output: bool,
    **_: object,
) -> None:
    """Print a user token (JWT) for the leader."""
    if not subject.strip():
        raise click.BadParameter("must not be empty", ctx=ctx, param_hint="--subject")
    state = _state_and_logging(ctx, state_dir)
    now = int(time.time())
    jwt = state.signer.issue_user(subject, scopes=scopes or _SCOPES, hosts=hosts, ttl=ttl, now=now)
    _print_token(ctx, jwt, "user", subject, now + int(ttl))


def _print_token(ctx: click.Context, jwt: str, kind: str, subject: str, expires_at: int) -> None:
    if is_json(ctx):
        echo_json(TokenResult(token=jwt, kind=kind, subject=subject, expires_at=expires_at))
    else:
        click.echo(jwt)
