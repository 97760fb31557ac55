"""The ``ah-followerd`` command line (click, the CLI contract of ``ah_config``)."""

from __future__ import annotations

import asyncio
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
    OsKind,
    parse_host_port,
    validate_host_name,
)
from ah_logging import LogSettings, configure_logging_from_click, log_options

from . import __version__
from .agent import (
    DEFAULT_HOST_KEY_FILE,
    ExecMode,
    HostKeyError,
    RunOptions,
    host_key_fingerprint,
    run_agent,
)
from .enroll import EnrollError, enroll
from .state import SETTINGS_FILE, FollowerState, FollowerStateError, load_follower_state

__all__ = ["main"]

BINARY = "ah-followerd"


def _configure_logging(ctx: click.Context, state: FollowerState | None = None) -> None:
    """Log flags, then ``AH_LOG_*``, then ``[log]`` of ``follower.toml``, then the user and
    system configuration files, then the daemon defaults."""
    configured = daemon_log_config(
        state.settings.log if state is not None else None,
        str(state.state_dir / SETTINGS_FILE) if state is not None else None,
    )
    configure_logging_from_click(ctx, BINARY, "daemon", LogSettings.from_config(configured))


def _host_port(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is None:
        return None
    try:
        parse_host_port(value)
    except DomainValidationError as exc:
        raise click.BadParameter(str(exc), ctx=ctx, param=param) from None
    return value


_state_dir_option = click.option(
    "--state-dir",
    "state_dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    metavar="DIR",
    help="The follower's state directory (key, certificate, pinned CA, follower.toml).",
)


@click.group(cls=AhGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name=BINARY)
@log_options("daemon")
def main(**_: object) -> None:
    """Agent Harbor fleet follower: enroll with an access point, then stay connected."""


class EnrollResult(msgspec.Struct, frozen=True, rename="camel"):
    name: str
    state_dir: str
    trust_domain: str
    ca_fingerprint: str
    access_point: str
    quic_address: str
    tags: dict[str, str]


@main.command("enroll")
@click.option(
    "--access-point",
    default=None,
    callback=_host_port,
    metavar="HOST:PORT",
    help="The access point's API address (default: the one the token carries).",
)
@click.option("--token", required=True, metavar="TOKEN", help="One-time enrollment token.")
@_state_dir_option
@click.option("--name", default=None, help="Follower name (default: the token's).")
@click.option(
    "--tag",
    "tags",
    multiple=True,
    callback=tags_callback,
    metavar="K=V",
    help="Extra tag to ask for (repeatable); the token's tags win on a conflict.",
)
@click.option("--force", is_flag=True, default=False, help="Replace an existing enrollment.")
@click.option("--json", "json_output", is_flag=True, default=False, help="Print one JSON document.")
@log_options("daemon")
@click.pass_context
def enroll_command(
    ctx: click.Context,
    /,
    access_point: str | None,
    token: str,
    state_dir: Path,
    name: str | None,
    tags: dict[str, str],
    force: bool,
    json_output: bool,
    **_: object,
) -> None:
    """Join the fleet with a one-time TOKEN: pin the CA, get a certificate, store it."""
    _configure_logging(ctx)
    if name is not None:
        try:
            validate_host_name(name)
        except DomainValidationError as exc:
            raise click.BadParameter(str(exc), ctx=ctx, param_hint="--name") from None
    try:
        outcome = enroll(
            access_point=access_point,
            token=token,
            state_dir=state_dir,
            name=name,
            tags=tags,
            force=force,
        )
    except EnrollError as exc:
        details = {"reason": exc.reason} if exc.reason else {}
        raise CliError(exc.exit_code, exc.message, details=details) from None
    except FollowerStateError as exc:
        raise CliError(exc.exit_code, exc.message) from None
    settings = outcome.settings
    if is_json(ctx):
        echo_json(
            EnrollResult(
                name=settings.name,
                state_dir=str(outcome.state_dir),
                trust_domain=settings.trust_domain,
                ca_fingerprint=settings.ca_fingerprint,
                access_point=settings.access_point,
                quic_address=settings.quic_address,
                tags=settings.tags,
            )
        )
    else:
        click.echo(
            f"enrolled {settings.name} in trust domain {settings.trust_domain} "
            f"(access point {settings.access_point}, QUIC {settings.quic_address})"
        )


@main.command("run")
@_state_dir_option
@click.option(
    "--ssh-dst",
    default="127.0.0.1:22",
    show_default=True,
    callback=_host_port,
    metavar="HOST:PORT",
    help="The local sshd tunnels are allowed to reach.",
)
@click.option("--ssh-user", default=None, metavar="USER", help="Account leaders log in as.")
@click.option(
    "--ssh-host-key-file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=DEFAULT_HOST_KEY_FILE,
    show_default=True,
    metavar="PATH",
    help="Public host key of that sshd; its SHA256 fingerprint is reported for pinning.",
)
@click.option(
    "--direct-address",
    default=None,
    callback=_host_port,
    metavar="HOST:PORT",
    help="Where leaders may dial the sshd directly (default: nowhere).",
)
@click.option(
    "--workspace",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    metavar="DIR",
    help="Directory receiving the leader's tree (default: STATE_DIR/workspace).",
)
@click.option(
    "--os",
    "os_name",
    type=click.Choice([k.value for k in OsKind]),
    default=None,
    help="Report this OS instead of the real one (to simulate cross-OS fleets).",
)
@click.option(
    "--tag",
    "tags",
    multiple=True,
    callback=tags_callback,
    metavar="K=V",
    help="Extra tag reported in Hello (repeatable); enrolled tags win at the access point.",
)
@click.option(
    "--exec",
    "exec_mode",
    type=click.Choice([m.value for m in ExecMode]),
    default=ExecMode.REAL.value,
    show_default=True,
    help="How exec RPCs are answered: mock (canned output), noop (exit 0), real (refused: "
    "real commands run over SSH).",
)
@click.option(
    "--mock-exit-code",
    type=click.IntRange(0, 255),
    default=0,
    show_default=True,
    help="Exit code of mock exec.",
)
@click.option(
    "--ready-file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    metavar="PATH",
    help='Write {"pid", "name"} here once the first Welcome arrives.',
)
@click.option(
    "--backoff-cap",
    default="10s",
    show_default=True,
    callback=duration_callback,
    metavar="DURATION",
    help="Longest wait between reconnection attempts (exponential backoff, full jitter).",
)
@log_options("daemon")
@click.pass_context
def run_command(
    ctx: click.Context,
    /,
    state_dir: Path,
    ssh_dst: str,
    ssh_user: str | None,
    ssh_host_key_file: Path,
    direct_address: str | None,
    workspace: Path | None,
    os_name: str | None,
    tags: dict[str, str],
    exec_mode: str,
    mock_exit_code: int,
    ready_file: Path | None,
    backoff_cap: float,
    **_: object,
) -> int:
    """Connect to the access point and stay connected (reconnecting with backoff)."""
    try:
        state = load_follower_state(state_dir)
    except FollowerStateError as exc:
        _configure_logging(ctx)
        raise CliError(exc.exit_code, exc.message, details={"stateDir": str(state_dir)}) from None
    _configure_logging(ctx, state)
    try:
        fingerprint = host_key_fingerprint(ssh_host_key_file)
    except HostKeyError as exc:
        raise CliError(ExitCode.CONFIGURATION, str(exc)) from None
    workspace_dir = (workspace or state.state_dir / "workspace").absolute()
    try:
        workspace_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CliError(
            ExitCode.CONFIGURATION, f"cannot create workspace {workspace_dir}: {exc}"
        ) from None
    options = RunOptions(
        ssh_dst=ssh_dst,
        ssh_user=ssh_user,
        host_key_fingerprint=fingerprint,
        direct_address=direct_address,
        workspace=str(workspace_dir),
        os_kind=OsKind(os_name) if os_name else None,
        tags=tags,
        exec_mode=ExecMode(exec_mode),
        mock_exit_code=mock_exit_code,
        ready_file=ready_file,
        backoff_cap_s=backoff_cap,
    )
    return asyncio.run(run_agent(state, options))
