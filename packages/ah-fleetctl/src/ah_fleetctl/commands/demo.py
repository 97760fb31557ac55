"""``ah-fleetctl demo``: a private fleet on this machine, a fenced run on it, teardown.

Order of work: check the programs it needs (exit 8 naming the Debian packages when one is
missing) → bring the fleet up in a fresh temp directory (:mod:`ah_fleetctl.localfleet.demo`)
→ ``ah-fleetctl run -- CMD`` against it from the current directory, as a child process with
the fleet's ``AH_*`` environment (so it is exactly the command a user would type; its lines
are passed through and the first ``host | ...`` line is timed) → teardown, or with
``--keep`` the env file. The exit code is the run's.

Ctrl-C (SIGINT), SIGTERM and SIGHUP: during bring-up they stop what was started and exit
130; during the run they are passed on to the run as one SIGINT (it cancels the remote
commands and prints its summary), then the fleet is torn down — also with ``--keep``.
The run is a session of its own so that a terminal's Ctrl-C reaches it only through us,
exactly once.
"""

from __future__ import annotations

import contextlib
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import FrameType
from typing import IO, TYPE_CHECKING

import click
from loguru import logger

from ah_config import AhCommand, CliError
from ah_domain_types import ExitCode
from ah_logging import log_settings_from_click

from ..context import FleetContext
from ..options import common_options

if TYPE_CHECKING:
    from ..localfleet.demo import DemoFleet

__all__ = ["demo_command"]

_INTERRUPTED = 130
_RUN_EXIT_GRACE_S = 30.0
"""How long the run may take to print its summary and exit after it was interrupted."""


def _say(message: str) -> None:
    click.echo(f"demo: {message}", err=True)


@contextlib.contextmanager
def _terminate_like_ctrl_c() -> Iterator[None]:
    """SIGTERM and SIGHUP end the demo the way Ctrl-C does (the fleet is torn down)."""

    def raise_interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, raise_interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _forwarded_flags(ctx: click.Context) -> list[str]:
    """The log flags given to the demo, for the run it starts (so `--log-level debug` shows
    the run's links, fence and commands too)."""
    flags = log_settings_from_click(ctx)
    forwarded: list[str] = []
    for option, value in (
        ("--log-level", flags.level),
        ("--log-file", flags.file),
        ("--log-dir", flags.dir),
        ("--log-format", flags.format),
    ):
        if value is not None:
            forwarded += [option, str(value)]
    return forwarded


def _teardown(demo: DemoFleet) -> None:
    """Stop the fleet and remove its directory; a second Ctrl-C must not cut this short
    (the watchdog would still stop the processes, but the directory would stay)."""
    ignored = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in ignored}
    try:
        demo.teardown()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class _Run:
    """``ah-fleetctl run`` as a child: its stdout passed through line by line, SIGINT passed
    on, the first host-prefixed line timed."""

    def __init__(self, argv: Sequence[str], env: Mapping[str, str], started: float) -> None:
        self.started = started
        self.first_result_s: float | None = None
        self.interrupts = 0
        self.proc = subprocess.Popen(
            list(argv),
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            start_new_session=True,
        )

    def _interrupt(self) -> None:
        self.interrupts += 1
        if self.proc.poll() is not None:
            return
        # The first SIGINT makes the run cancel and print its summary; a third Ctrl-C
        # means "now": the run's process group is killed outright.
        with contextlib.suppress(ProcessLookupError):
            if self.interrupts < 3:
                self.proc.send_signal(signal.SIGINT)
            else:
                self.proc.kill()

    def pump(self, out: IO[bytes]) -> int:
        """Pass the run's stdout through until it ends; its exit status."""
        stream = self.proc.stdout
        assert stream is not None
        while True:
            try:
                line = stream.readline()
            except KeyboardInterrupt:
                self._interrupt()
                continue
            if not line:
                break
            if self.first_result_s is None and b" | " in line:
                self.first_result_s = time.monotonic() - self.started
            out.write(line)
            out.flush()
        deadline = time.monotonic() + _RUN_EXIT_GRACE_S
        while True:
            try:
                return self.proc.wait(max(0.0, deadline - time.monotonic()))
            except KeyboardInterrupt:
                self._interrupt()
            except subprocess.TimeoutExpired:
                self.proc.kill()
                return self.proc.wait()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def _down(env_file: Path | None, app: FleetContext) -> int:
    from ..localfleet.demo import DemoError, down

    if env_file is None:
        raise click.UsageError("--down needs --env-file PATH (the file `demo --keep` printed)")
    try:
        result = down(env_file)
    except DemoError as exc:
        raise CliError(
            ExitCode.VALIDATION, str(exc), kind="notADemoFleet", details={"envFile": str(env_file)}
        ) from None
    logger.debug("demo --down: {}", result)
    if app.json:
        from ah_config import echo_json

        echo_json(
            {
                "directory": str(result.directory),
                "envFile": str(result.env_file),
                "processesStopped": result.processes_stopped,
            }
        )
    else:
        click.echo(
            f"Stopped the demo fleet ({result.processes_stopped} processes) and removed "
            f"{result.directory}"
        )
    return 0


@click.command(
    "demo",
    cls=AhCommand,
    context_settings={"allow_interspersed_args": False},
    short_help="Run a command on a private fleet on this machine.",
)
@click.option(
    "--followers",
    type=click.IntRange(1, 32),
    default=None,
    metavar="N",
    help="How many local followers (default 3, at most 32).",
)
@click.option(
    "--keep",
    is_flag=True,
    default=False,
    help="Leave the fleet running and write an env file that points ah-fleetctl at it.",
)
@click.option(
    "--env-file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    metavar="PATH",
    help="With --keep: where to write the env file (default: in the demo's temp directory). "
    "With --down: the env file of the fleet to stop.",
)
@click.option(
    "--down",
    is_flag=True,
    default=False,
    help="Stop the kept fleet of --env-file and remove its files.",
)
@common_options
@click.argument("argv", nargs=-1, metavar="[--] [CMD [ARGS]...]")
@click.pass_context
def demo_command(
    ctx: click.Context,
    /,
    followers: int | None,
    keep: bool,
    env_file: Path | None,
    down: bool,
    argv: tuple[str, ...],
    **_: object,
) -> int:
    """Start a private access point and N followers on this machine (each with its own
    real sshd on loopback and its own workspace) in a temp directory, wait until all are
    connected, fence the current directory to them, run CMD on every one of them, print
    the per-host results and the summary, and tear everything down (also on Ctrl-C or a
    failure).

    Without CMD each follower prints its host name, its OS and how many files of the
    synced tree it holds.

    With --keep the fleet stays up: source the env file it prints and every ah-fleetctl
    command (fleet list, run, paths, ...) uses it; `demo --down --env-file PATH` stops it.

    Needs sshd and ssh (openssh-server, openssh-client) and rsync; without them: exit 8
    naming the packages to install. Otherwise the exit code is the run's: 0 only when
    every follower ran CMD and returned 0.
    """
    app = FleetContext.of(ctx)
    if down:
        if keep or followers is not None or argv:
            raise click.UsageError("--down takes only --env-file", ctx=ctx)
        return _down(env_file, app)
    if env_file is not None and not keep:
        raise click.UsageError("--env-file needs --keep (or --down)", ctx=ctx)
    if env_file is not None and not env_file.expanduser().absolute().parent.is_dir():
        raise click.BadParameter(
            f"{env_file}: its directory does not exist", ctx=ctx, param_hint="--env-file"
        )

    from ..localfleet.demo import DEFAULT_COMMAND, DEFAULT_FOLLOWERS, DemoFleet
    from ..localfleet.demo import missing_prerequisites as missing_programs

    missing = missing_programs()
    if missing:
        from ..localfleet.demo import install_hint

        # A missing system program is a property of this machine's set-up, not of the
        # command line (2), its values (7) or the network (5): the configuration exit code.
        raise CliError(
            ExitCode.CONFIGURATION,
            install_hint(missing),
            kind="missingPrerequisite",
            details={
                "missing": " ".join(m.program for m in missing),
                "debianPackages": " ".join(dict.fromkeys(m.debian_package for m in missing)),
            },
        )
    command = list(argv) or list(DEFAULT_COMMAND)
    count = followers or DEFAULT_FOLLOWERS
    started = time.monotonic()
    demo = DemoFleet(count)
    kept: Path | None = None
    followers_text = f"{count} follower{'s' if count != 1 else ''}"
    _say(f"starting an access point and {followers_text} in {demo.directory}")
    try:
        with _terminate_like_ctrl_c():
            try:
                fleet = demo.start()
            except Exception as exc:
                # Not a host of a real fleet failing, but the same for the user: the command
                # did not run everywhere (never exit 0). The message carries the daemon logs.
                raise CliError(
                    ExitCode.HOSTS_FAILED,
                    f"the demo fleet did not come up: {exc}",
                    kind="demoStartFailed",
                ) from None
            _say(
                f"{followers_text} connected in {demo.startup_seconds:.1f}s "
                f"({', '.join(demo.follower_names)}; access point {fleet.api_url})"
            )
            run_argv = [sys.executable, "-m", "ah_fleetctl", "run", *_forwarded_flags(ctx)]
            if app.json:
                run_argv.append("--json")
            run_argv += ["--", *command]
            _say(f"fencing {Path.cwd()} to them and running: {shlex.join(command)}")
            run = _Run(run_argv, {**fleet.env(), **demo.env()}, started)
            try:
                code = run.pump(sys.stdout.buffer)
            finally:
                run.close()
            if run.interrupts:
                raise KeyboardInterrupt
            first = (
                f", first result after {run.first_result_s:.1f}s"
                if run.first_result_s is not None
                else ""
            )
            _say(f"run exit {code}{first}")
            if keep:
                kept = demo.keep(env_file)
    except KeyboardInterrupt:
        _say("interrupted: stopping the fleet")
        _teardown(demo)
        _say(f"fleet stopped, {demo.directory} removed")
        return _INTERRUPTED
    except BaseException:
        _teardown(demo)
        raise
    if kept is None:
        _teardown(demo)
        _say(f"fleet stopped, {demo.directory} removed; total {time.monotonic() - started:.1f}s")
    else:
        _say(
            f"the fleet keeps running (logs in {demo.directory / 'logs'}); total "
            f"{time.monotonic() - started:.1f}s\n"
            f"  use it:   . {kept}   then e.g.  ah-fleetctl fleet list\n"
            f"  stop it:  ah-fleetctl demo --down --env-file {kept}"
        )
    if code < 0:
        raise CliError(
            ExitCode.HOSTS_FAILED,
            f"ah-fleetctl run was killed by signal {-code}",
            kind="runKilled",
        )
    return code
