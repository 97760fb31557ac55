"""The fleet side of ``ah-fleetctl demo``: prerequisites, bring-up, teardown, ``--keep``/``--down``.

A demo fleet lives in one private directory (``$TMPDIR/ah-demo-XXXXXXXX``, mode 0700): the
`LocalFleet` layout (access point state, one sshd and one follower state directory and
workspace per follower, ``home/`` — the ``AH_HOME`` of every ``ah-fleetctl`` call against it
— and ``logs/`` with every daemon's output), plus, once kept:

    demo.json    what ``--down`` needs: the process groups (pgid and the leader's start time,
                 so a reused pid is never signalled) and the files to remove
    demo.env     the env file (unless ``--env-file`` put it elsewhere): ``export AH_*=...``
                 lines that point ``ah-fleetctl`` at the kept fleet

Every daemon runs in its own session, so a Ctrl-C at the terminal reaches only the demo
process, which then tears the fleet down (or, while the run is under way, passes the
interrupt on to the run first). A kept fleet's processes are let go of (no watchdog, no
``atexit`` teardown) and outlive the demo process; ``--down`` finds them again from
``demo.json``.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec

from ah_fleetctl.localfleet.processes import DetachedProcess, stop_detached
from ah_fleetctl.localfleet.sshd import find_sshd

if TYPE_CHECKING:
    from ah_fleetctl.localfleet.fleet import LocalFleet

__all__ = [
    "DEFAULT_COMMAND",
    "DEFAULT_FOLLOWERS",
    "DIRECTORY_MARKER",
    "ENV_FILE_NAME",
    "MAX_FOLLOWERS",
    "PREREQUISITES",
    "STATE_FILE_NAME",
    "DemoError",
    "DemoFleet",
    "DemoProcess",
    "DemoState",
    "DownResult",
    "Prerequisite",
    "demo_directory_of",
    "down",
    "install_hint",
    "missing_prerequisites",
    "render_env_file",
]

DEFAULT_FOLLOWERS = 3
MAX_FOLLOWERS = 32
"""Each follower is a daemon and an sshd; more than this on one machine is a typo."""

DEFAULT_COMMAND: tuple[str, ...] = (
    "sh",
    "-c",
    'echo "$(hostname): $(uname -srm); $(find . -type f | wc -l | tr -d " ") files in $PWD"',
)
"""What every follower runs when no command is given: its host name and OS as it sees them,
and how many files of the synced tree it holds."""

STATE_FILE_NAME = "demo.json"
ENV_FILE_NAME = "demo.env"
DIRECTORY_MARKER = "# ah-fleetctl demo directory: "
"""The env file's line naming the demo directory (what ``--down`` reads)."""

_HEARTBEAT_INTERVAL = "1s"
"""Health changes show within seconds; a kept fleet idles cheaply."""


class DemoError(RuntimeError):
    """A demo fleet cannot be found, read or stopped; the message says which file and why."""


# --------------------------------------------------------------------------- prerequisites


@dataclass(frozen=True)
class Prerequisite:
    """A program the demo runs, and the Debian/Ubuntu package that installs it."""

    program: str
    debian_package: str
    why: str


PREREQUISITES: tuple[Prerequisite, ...] = (
    Prerequisite("sshd", "openssh-server", "each follower's SSH server"),
    Prerequisite("ssh", "openssh-client", "rsync's transport to the followers"),
    Prerequisite("ssh-keygen", "openssh-client", "host and leader keys"),
    Prerequisite("rsync", "rsync", "the fence's sync engine"),
)


def _sshd_present() -> bool:
    try:
        find_sshd()
    except FileNotFoundError:
        return False
    return True


def missing_prerequisites(
    which: Callable[[str], str | None] = shutil.which,
    sshd_present: Callable[[], bool] = _sshd_present,
) -> list[Prerequisite]:
    """The prerequisites that are not installed (sshd is also looked for outside PATH, in
    the usual ``/usr/sbin``-style places, since it is often not on a user's PATH)."""
    missing: list[Prerequisite] = []
    for item in PREREQUISITES:
        present = sshd_present() if item.program == "sshd" else which(item.program) is not None
        if not present:
            missing.append(item)
    return missing


def install_hint(missing: Sequence[Prerequisite]) -> str:
    """One message naming what is missing and how to install it."""
    programs = ", ".join(f"{m.program} ({m.why})" for m in missing)
    packages = " ".join(dict.fromkeys(m.debian_package for m in missing))
    return (
        f"ah-fleetctl demo needs programs that are not installed: {programs}. "
        f"On Debian/Ubuntu: sudo apt-get install {packages} "
        "(in a checkout of the project: bash scripts/install-system-deps.sh)"
    )


# --------------------------------------------------------------------------- files


class DemoProcess(msgspec.Struct, frozen=True, rename="camel"):
    """One process group of a kept demo fleet."""

    name: str
    pgid: int
    start_time: int | None
    """The group leader's start time (clock ticks since boot); None where unknown."""


class DemoState(msgspec.Struct, frozen=True, rename="camel"):
    """``demo.json``: a kept demo fleet, as ``--down`` needs it."""

    directory: str
    env_file: str
    access_point: str
    followers: list[str]
    processes: list[DemoProcess]
    kept_at_ms: int


def render_env_file(directory: Path, env_file: Path, env: Mapping[str, str]) -> str:
    """The env file: comments saying what it is, the demo directory marker, and one
    ``export NAME=value`` line per variable (values shell-quoted)."""
    lines = [
        "# Written by `ah-fleetctl demo --keep`. Source it to point ah-fleetctl at the kept",
        "# demo fleet:  . " + shlex.quote(str(env_file)),
        "# Stop the fleet and remove its files:",
        "#   ah-fleetctl demo --down --env-file " + shlex.quote(str(env_file)),
        f"{DIRECTORY_MARKER}{directory}",
        *(f"export {name}={shlex.quote(value)}" for name, value in sorted(env.items())),
    ]
    return "\n".join(lines) + "\n"


def demo_directory_of(text: str, source: Path) -> Path:
    """The demo directory named by an env file's marker line.

    Raises:
        DemoError: when ``text`` has no marker line (not an env file of ``demo --keep``).
    """
    for line in text.splitlines():
        if line.startswith(DIRECTORY_MARKER):
            value = line[len(DIRECTORY_MARKER) :].strip()
            if value:
                return Path(value)
    raise DemoError(
        f"{source}: not an env file written by `ah-fleetctl demo --keep` "
        f"(no line starting with {DIRECTORY_MARKER.strip()!r})"
    )


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` with mode 0600 (it holds the demo fleet's token)."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise


# --------------------------------------------------------------------------- the fleet


class DemoFleet:
    """A demo fleet of ``followers`` followers named ``demo-1``…``demo-N`` in a fresh private
    directory. `start`, then either `teardown` or `keep`."""

    def __init__(self, followers: int, *, parent_dir: Path | None = None) -> None:
        if not 1 <= followers <= MAX_FOLLOWERS:
            raise ValueError(f"followers must be 1..{MAX_FOLLOWERS}, got {followers}")
        self.follower_names = [f"demo-{i}" for i in range(1, followers + 1)]
        self.directory = Path(
            tempfile.mkdtemp(prefix="ah-demo-", dir=None if parent_dir is None else parent_dir)
        ).resolve()
        self.fleet: LocalFleet | None = None
        self.startup_seconds: float | None = None
        self._detached: list[DetachedProcess] = []

    def start(self) -> LocalFleet:
        """Bring the fleet up: access point, an sshd per follower, enrollment, every
        follower connected and healthy. On any failure (or Ctrl-C) what was started is
        stopped before the error propagates; the directory stays for `teardown`."""
        from ah_fleetctl.localfleet.fleet import FollowerSpec, LocalFleet

        started = time.monotonic()
        specs = [FollowerSpec(name, tags={"demo": "yes"}) for name in self.follower_names]
        fleet = LocalFleet(specs, base_dir=self.directory, heartbeat_interval=_HEARTBEAT_INTERVAL)
        self.fleet = fleet
        try:
            fleet.start()
        except BaseException:
            fleet.close()
            raise
        self.startup_seconds = time.monotonic() - started
        return fleet

    def env(self) -> dict[str, str]:
        """``AH_*`` variables that point ``ah-fleetctl`` at this fleet. ``AH_HOME`` alone
        would do (its user config holds everything), but a repository's own
        ``.agents/config.toml`` outranks the user config; the environment outranks both."""
        fleet = self._started()
        return {
            "AH_HOME": str(fleet.home),
            "AH_SYSTEM_CONFIG": str(fleet.home / "no-system-config.toml"),
            "AH_REMOTE_SERVER": fleet.api_url,
            "AH_TOKEN": fleet.user_token,
            "AH_CA_FILE": str(fleet.ca_path),
            "AH_SSH_USER": fleet.ssh_user,
            "AH_SSH_IDENTITY_FILE": str(fleet.leader_key),
            # The leader agent would outlive the demo and hold links to a fleet that is gone.
            "AH_AGENT_ENABLED": "false",
        }

    def teardown(self) -> None:
        """Stop every process (followers say Goodbye first) and remove the directory."""
        try:
            if self._detached:
                stop_detached(self._detached)
            elif self.fleet is not None:
                self.fleet.close()
        finally:
            shutil.rmtree(self.directory, ignore_errors=True)

    def keep(self, env_file: Path | None = None) -> Path:
        """Let the fleet run on after this process exits: write ``demo.json`` and the env
        file (``env_file``, default ``<directory>/demo.env``) and return the env file's path."""
        fleet = self._started()
        target = (env_file or self.directory / ENV_FILE_NAME).expanduser().absolute()
        if not target.parent.is_dir():
            raise DemoError(f"--env-file {target}: directory {target.parent} does not exist")
        env = self.env()
        detached = self._detached = fleet.group.detach()
        state = DemoState(
            directory=str(self.directory),
            env_file=str(target),
            access_point=fleet.api_url,
            followers=list(self.follower_names),
            processes=[DemoProcess(p.name, p.pgid, p.start_time) for p in detached],
            kept_at_ms=int(time.time() * 1000),
        )
        _write_private(self.directory / STATE_FILE_NAME, msgspec.json.encode(state).decode())
        _write_private(target, render_env_file(self.directory, target, env))
        return target

    def _started(self) -> LocalFleet:
        if self.fleet is None:
            raise RuntimeError("the demo fleet was not started")
        return self.fleet


@dataclass(frozen=True)
class DownResult:
    directory: Path
    env_file: Path
    processes_stopped: int


def down(env_file: Path) -> DownResult:
    """Stop the kept demo fleet an env file points at and remove its files.

    Raises:
        DemoError: naming the file at fault when ``env_file`` is not a demo env file or
            its directory holds no readable ``demo.json``.
    """
    try:
        text = env_file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DemoError(f"--env-file {env_file}: cannot read it: {exc}") from None
    directory = demo_directory_of(text, env_file)
    state_file = directory / STATE_FILE_NAME
    try:
        state = msgspec.json.decode(state_file.read_bytes(), type=DemoState)
    except FileNotFoundError:
        raise DemoError(
            f"{state_file}: no kept demo fleet there (already stopped, or {env_file} is stale)"
        ) from None
    except (OSError, msgspec.DecodeError) as exc:
        raise DemoError(f"{state_file}: not a demo fleet state file: {exc}") from None
    if Path(state.directory) != directory:
        # Never remove a directory on the word of a file that does not describe it.
        raise DemoError(
            f"{state_file} describes the demo directory {state.directory}, not {directory}"
        )
    stopped = stop_detached(
        [DetachedProcess(p.name, p.pgid, p.start_time) for p in state.processes]
    )
    shutil.rmtree(directory, ignore_errors=True)
    env_file.unlink(missing_ok=True)
    return DownResult(directory=directory, env_file=env_file, processes_stopped=stopped)
