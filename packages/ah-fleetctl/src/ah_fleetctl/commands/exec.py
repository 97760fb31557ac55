"""``ah-fleetctl exec --mock``: fan the follower's mock exec RPC out through the access point.

Real commands over SSH (with the fence) are ``ah-fleetctl run``; ``exec`` exists to exercise
the control plane end to end without touching the followers' machines.
"""

from __future__ import annotations

import datetime as dt
import os
import secrets
import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import click
from loguru import logger

from ah_config import echo_json
from ah_domain_types import (
    FollowerStatus,
    HostResult,
    HostState,
    RunEnvelope,
    RunSummary,
)
from ah_logging import default_log_dir

from ..context import BINARY, FleetContext
from ..options import (
    common_options,
    parse_duration_option,
    selector_from_options,
    selector_options,
)
from ..output import prefix_lines
from .fleet import select_followers

if TYPE_CHECKING:
    from ah_api import HostExec

__all__ = ["exec_command", "host_result", "runs_dir"]

_DEFAULT_TIMEOUT_S = 60.0
_ANSWER_MARGIN_S = 10.0
"""How much longer than the command's timeout to wait for the access point's answer."""

_STATES: dict[str, HostState] = {
    "ok": HostState.OK,
    "failed": HostState.FAILED,
    "unreachable": HostState.UNREACHABLE,
    "timeout": HostState.TIMEOUT,
}


def runs_dir(app: FleetContext) -> Path:
    """Where per-run host logs go: ``<log dir>/runs`` (``--log-dir``/``[log] dir``, else the
    standard log directory, ``$AH_HOME/logs`` when ``AH_HOME`` is set)."""
    configured = app.logging.settings.dir
    base = Path(configured).expanduser() if configured else default_log_dir(BINARY)
    return base / "runs"


def _new_run_dir(app: FleetContext) -> Path:
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    run_dir = runs_dir(app) / f"exec-{stamp}-{secrets.token_hex(3)}"
    run_dir.mkdir(mode=0o700, parents=True)
    return run_dir


def _write_host_log(run_dir: Path, result: HostExec) -> Path:
    """``<run dir>/<host>.log``: the host's stdout, then its stderr (host names are safe
    file names: letters, digits, ``_``, ``.``, ``-``, never starting with a dot)."""
    path = run_dir / f"{result.host}.log"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(result.stdout)
        if result.stderr:
            if result.stdout and not result.stdout.endswith("\n"):
                handle.write("\n")
            handle.write(result.stderr)
    return path


def _keep_logs(app: FleetContext, execs: Sequence[HostExec]) -> tuple[Path | None, dict[str, str]]:
    """Write every host's output under a new run directory. The results matter more than
    their copies on disk: when the directory cannot be written, warn and go on without."""
    try:
        run_dir = _new_run_dir(app)
        return run_dir, {r.host: str(_write_host_log(run_dir, r)) for r in execs}
    except OSError as exc:
        click.echo(f"warning: cannot keep the per-host logs: {exc}", err=True)
        return None, {}


def host_result(
    result: HostExec, follower: FollowerStatus | None, *, command: str, log_path: str | None
) -> HostResult:
    """The run-everywhere view of one host's mock exec outcome."""
    return HostResult(
        host=result.host,
        os=follower.info.os if follower is not None else None,
        state=_STATES[result.state],
        exit_code=result.exit_code,
        took_ms=result.took_ms,
        log_path=log_path,
        error=result.error,
        command=command,
    )


def _missing(host: str) -> HostExec:
    from ah_api import HostExec

    return HostExec(
        host=host,
        state="unreachable",
        exit_code=None,
        stdout="",
        stderr="",
        took_ms=0,
        error="the access point returned no result for this host",
    )


def _note(result: HostResult, timeout_s: float) -> str | None:
    if result.state is HostState.OK:
        return None
    if result.state is HostState.FAILED:
        why = f"exit code {result.exit_code}" if result.exit_code is not None else "did not run"
        text = f"failed ({why})"
        if result.error == why:  # the follower's reason says no more than the exit code
            return text
    elif result.state is HostState.TIMEOUT:
        text = f"timed out (limit {timeout_s:g}s)"
    else:
        text = result.state.value
    return f"{text}: {result.error}" if result.error else text


def _timeout_s(app: FleetContext, flag: float | None) -> float:
    if flag is not None:
        return flag
    timeouts = app.config.typed.timeouts
    if timeouts is not None:
        for name in ("run", "overall"):
            seconds = timeouts.seconds(name)
            if seconds:
                return seconds
    return _DEFAULT_TIMEOUT_S


@click.command(
    "exec",
    context_settings={"allow_interspersed_args": False},
    short_help="Run the mock exec RPC on the selected followers.",
)
@click.option(
    "--mock",
    is_flag=True,
    default=False,
    help="Use the followers' mock exec RPC (required: real commands are `ah-fleetctl run`).",
)
@selector_options
@click.option(
    "--timeout",
    "timeout_s",
    default=None,
    metavar="DURATION",
    callback=parse_duration_option,
    help="Per-host time limit (500ms, 30s, 1m30s...). Default: config timeouts.run, else "
    "timeouts.overall (60s).",
)
@common_options
@click.argument("command", nargs=-1, required=True, metavar="[--] CMD [ARGS]...")
@click.pass_context
def exec_command(
    ctx: click.Context,
    /,
    mock: bool,
    hosts: tuple[str, ...],
    tags: tuple[str, ...],
    all_: bool,
    timeout_s: float | None,
    command: Sequence[str],
    **_: object,
) -> int:
    """Run CMD through each selected follower's mock exec RPC, via the access point.

    Options end at CMD: everything from CMD on (or after `--`) goes to the command. Output is
    printed per host as `HOST | line`, then `X succeeded, Y failed, Z unreachable`. Exit 0
    only when every selected host returned ok, else 1. With --json: one run envelope
    ({"sessionId", "commands", "hosts", "summary", "runDir"}); each host's output is in its
    logPath.
    """
    if not mock:
        raise click.UsageError(
            "exec without --mock is not supported: `exec --mock` runs the followers' mock RPC; "
            "real commands run with `ah-fleetctl run [selectors] -- CMD`",
            ctx=ctx,
        )
    selector = selector_from_options(hosts, tags, all_)
    app = FleetContext.of(ctx)
    limit_s = _timeout_s(app, timeout_s)
    argv = list(command)
    command_text = shlex.join(argv)
    with app.api_client() as api:
        from ah_api import ExecApiRequest  # loaded by api_client() already

        selected = select_followers(selector, api.followers().followers)
        names = [f.info.name for f in selected]
        logger.debug("exec --mock {} on {}", command_text, ", ".join(names))
        request = ExecApiRequest(
            hosts=names, command=argv, timeout_ms=max(1, round(limit_s * 1000))
        )
        answer = api.exec_mock(request, wait_s=limit_s + app.connect_timeout_s() + _ANSWER_MARGIN_S)

    by_host = {r.host: r for r in answer.hosts}
    followers = {f.info.name: f for f in selected}
    execs = [by_host.get(name) or _missing(name) for name in names]
    run_dir, log_paths = _keep_logs(app, execs)
    results = [
        host_result(r, followers.get(r.host), command=command_text, log_path=log_paths.get(r.host))
        for r in execs
    ]
    summary = RunSummary.from_results(results)
    envelope = RunEnvelope(
        session_id=None,
        commands=[command_text],
        hosts=results,
        summary=summary,
        run_dir=None if run_dir is None else str(run_dir),
    )
    if app.json:
        echo_json(envelope)
        return int(envelope.exit_code)

    width = max(len(n) for n in names)
    for raw, result in zip(execs, results, strict=True):
        prefix_lines(raw.host, raw.stdout, width=width)
        prefix_lines(raw.host, raw.stderr, width=width, err=True)
        note = _note(result, limit_s)
        if note is not None:
            click.echo(f"{raw.host.ljust(width)} ! {note}", err=True)
    click.echo(summary.line())
    return int(envelope.exit_code)
