"""The Mutagen engine: a generated per-session ``mutagen.yml`` and the project lifecycle.

Project file
------------
One ``sync:`` entry per follower, named ``ah-<session>-<follower>`` (Mutagen names allow
letters, digits and ``-`` and must start with a letter, so other characters become ``-``),
``alpha`` the leader's workspace, ``beta`` the follower's workspace, ``mode:
one-way-replica`` (the follower mirrors the leader; its changes are overwritten),
``flushOnCreate: true`` (``project start`` returns once the first full sync is done),
``ignore.vcs: true`` plus ``ignore.paths`` (the sync-ignores in Mutagen's syntax, VCS names
included — Mutagen's VCS list lacks ``.jj``). Output is deterministic: same inputs, same bytes.

Endpoint URLs: Mutagen has no ``ssh://`` URL form; SSH endpoints are SCP-style
``[user@]host[:port]:path``. The host is the alias ``ah-<follower>``, which the caller's ssh
config resolves (through the fixed data-plane path, e.g. a ``ProxyCommand``). Windows
followers get a drive-absolute path with forward slashes, ``C:/Users/dev/ws``: the path is
handed to Mutagen's agent on the follower (not to scp/sftp, whose Win32-OpenSSH form would be
``/C:/...``), and a leading ``/`` would make it drive-relative there. ``C:\\...``, ``C:/...``
and ``/C:/...`` inputs are all accepted.

Lifecycle
---------
:class:`MutagenProject` runs ``mutagen project start|flush|terminate --project-file FILE``,
each with a deadline (the process group is killed and :class:`MutagenTimeout` names the call).
``terminate`` is idempotent: Mutagen's ``project not running`` counts as done, so it is safe to
repeat and after a start that was killed. ``stop_daemon`` runs ``mutagen daemon stop`` with
the same environment (for a private ``MUTAGEN_DATA_DIRECTORY``); its exit status is ignored
(no daemon running is fine). With ``ssh_config``, ``ssh``/``scp`` wrappers that
add ``-F <config>`` are written beside the project file and ``MUTAGEN_SSH_PATH`` points at
them. Mutagen resolves ssh in its daemon, which inherits the environment of the command that
started it: a daemon already running keeps its own; give each session a private daemon by
passing ``env={"MUTAGEN_DATA_DIRECTORY": ...}`` when that matters.
"""

from __future__ import annotations

import io
import os
import re
import shlex
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePosixPath

import msgspec
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq

from ah_domain_types import OsKind
from ah_mutagen_project._process import (
    CommandResult,
    CommandTimeout,
    format_seconds,
    run_command,
)
from ah_mutagen_project.ignores import mutagen_ignore_paths

__all__ = [
    "MutagenError",
    "MutagenFollower",
    "MutagenNotFound",
    "MutagenProject",
    "MutagenProjectError",
    "MutagenTimeout",
    "follower_alias",
    "mutagen_available",
    "mutagen_beta_url",
    "mutagen_endpoint_path",
    "mutagen_session_name",
    "render_mutagen_project",
    "write_mutagen_project",
]

SYNC_MODE = "one-way-replica"
_NOT_RUNNING = "project not running"
_WINDOWS_DRIVE = re.compile(r"^/?([A-Za-z]):[\\/](.*)$")
_NAME_BAD_CHARS = re.compile(r"[^A-Za-z0-9-]+")


class MutagenProjectError(ValueError):
    """The project cannot be generated (the message names the follower and value)."""


class MutagenError(RuntimeError):
    """A mutagen call failed; the message names the call, the exit status and the output."""

    def __init__(self, call: str, returncode: int, output: str) -> None:
        super().__init__(f"mutagen {call} failed with exit status {returncode}: {output}")
        self.call = call
        self.returncode = returncode
        self.output = output


class MutagenTimeout(TimeoutError):
    """A mutagen call did not finish by its deadline; its process group was killed."""

    def __init__(self, call: str, timeout: float, project_file: Path) -> None:
        super().__init__(
            f"mutagen {call} ({project_file}) did not finish within its {format_seconds(timeout)}s deadline "
            "and was killed"
        )
        self.call = call
        self.timeout = timeout


class MutagenNotFound(FileNotFoundError):
    """No mutagen binary (the message names what was looked for)."""


class MutagenFollower(msgspec.Struct, frozen=True):
    """A follower as the project file needs it."""

    name: str
    os: OsKind
    workspace: str
    """The follower's workspace in its own OS's notation."""
    user: str | None = None
    """SSH user; ``None`` leaves it to the ssh config."""


def follower_alias(name: str) -> str:
    """The ssh-config host alias of a follower."""
    return f"ah-{name}"


def mutagen_session_name(session_id: str, follower: str) -> str:
    """``ah-<session>-<follower>`` with characters Mutagen rejects replaced by ``-``."""
    raw = f"ah-{session_id}-{follower}"
    return _NAME_BAD_CHARS.sub("-", raw).strip("-")


def mutagen_endpoint_path(workspace: str, os_kind: OsKind, *, follower: str = "?") -> str:
    """The path part of a follower's Mutagen URL (see the module docstring).

    Raises:
        MutagenProjectError: the path is not absolute (or home-relative) for its OS.
    """
    if os_kind is OsKind.WINDOWS:
        match = _WINDOWS_DRIVE.match(workspace)
        if match is None:
            raise MutagenProjectError(
                f"follower {follower!r}: Windows workspace {workspace!r} is not a "
                "drive-absolute path; expected e.g. C:\\Users\\dev\\ws or C:/Users/dev/ws"
            )
        rest = match.group(2).replace("\\", "/").rstrip("/")
        return f"{match.group(1).upper()}:/{rest}"
    if not (workspace.startswith("/") or workspace == "~" or workspace.startswith("~/")):
        raise MutagenProjectError(
            f"follower {follower!r}: {os_kind.value} workspace {workspace!r} must be absolute "
            "(/...) or home-relative (~/...)"
        )
    if workspace in ("/", "~"):
        return workspace
    return workspace.rstrip("/")


def mutagen_beta_url(follower: MutagenFollower) -> str:
    """``[user@]ah-<name>:<path>`` (SCP-style; Mutagen has no ``ssh://`` form)."""
    user = f"{follower.user}@" if follower.user else ""
    path = mutagen_endpoint_path(follower.workspace, follower.os, follower=follower.name)
    return f"{user}{follower_alias(follower.name)}:{path}"


def _yaml() -> YAML:
    yaml = YAML()
    yaml.indent(mapping=2, sequence=4, offset=2)
    yaml.width = 4096
    return yaml


def render_mutagen_project(
    session_id: str,
    leader_workspace: str,
    followers: Sequence[MutagenFollower],
    ignores: Sequence[str] | None = None,
) -> str:
    """The ``mutagen.yml`` text for a session (see the module docstring).

    Raises:
        MutagenProjectError: a relative leader path, no followers, a bad follower path, or
            two followers whose session names collide.
        IgnorePatternError: an ignore pattern outside the supported syntax.
    """
    if not PurePosixPath(leader_workspace).is_absolute():
        raise MutagenProjectError(f"leader workspace {leader_workspace!r} must be an absolute path")
    if not followers:
        raise MutagenProjectError(f"session {session_id!r}: no followers to sync to")
    paths = mutagen_ignore_paths(ignores)
    sessions = CommentedMap()
    owners: dict[str, str] = {}
    for follower in sorted(followers, key=lambda f: f.name):
        name = mutagen_session_name(session_id, follower.name)
        if name in owners:
            raise MutagenProjectError(
                f"followers {owners[name]!r} and {follower.name!r} both map to Mutagen "
                f"session name {name!r}; rename one of them"
            )
        owners[name] = follower.name
        ignore = CommentedMap()
        ignore["vcs"] = True
        ignore["paths"] = CommentedSeq(paths)
        entry = CommentedMap()
        entry["alpha"] = leader_workspace.rstrip("/") or "/"
        entry["beta"] = mutagen_beta_url(follower)
        entry["mode"] = SYNC_MODE
        entry["flushOnCreate"] = True
        entry["ignore"] = ignore
        sessions[name] = entry
    document = CommentedMap()
    document["sync"] = sessions
    document.yaml_set_start_comment(
        f"Generated by ah-mutagen-project for session {session_id}; rewritten on every "
        "fence, do not edit."
    )
    buffer = io.StringIO()
    _yaml().dump(document, buffer)
    return buffer.getvalue()


def write_mutagen_project(
    path: Path,
    session_id: str,
    leader_workspace: str,
    followers: Sequence[MutagenFollower],
    ignores: Sequence[str] | None = None,
) -> Path:
    """Render and write the project file atomically; returns ``path``."""
    text = render_mutagen_project(session_id, leader_workspace, followers, ignores)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.replace(tmp, path)
    return path


def mutagen_available(binary: str = "mutagen") -> bool:
    """True if ``binary`` resolves to an executable (on PATH, for a bare name)."""
    return shutil.which(binary) is not None


def _write_ssh_wrappers(directory: Path, ssh_config: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for tool in ("ssh", "scp"):
        real = shutil.which(tool)
        if real is None:
            raise MutagenNotFound(f"{tool} not found on PATH (needed by mutagen's SSH transport)")
        wrapper = directory / tool
        wrapper.write_text(
            "#!/bin/sh\n"
            f"# Written by ah-mutagen-project: {tool} with the session's ssh config.\n"
            f'exec {shlex.quote(real)} -F {shlex.quote(str(ssh_config))} "$@"\n'
        )
        wrapper.chmod(0o755)


class MutagenProject:
    """``mutagen project start|flush|terminate`` for one project file, each call bounded."""

    def __init__(
        self,
        *,
        binary: str = "mutagen",
        project_file: Path,
        timeout: float = 120.0,
        env: Mapping[str, str] | None = None,
        ssh_config: Path | None = None,
    ) -> None:
        self.binary = binary
        self.project_file = project_file
        self.timeout = timeout
        self.env = dict(env or {})
        self.ssh_config = ssh_config
        self.ssh_wrapper_dir = project_file.parent / ".ah-mutagen-ssh"

    def argv(self, call: str) -> list[str]:
        """The argv of ``call`` (``binary`` resolved on PATH at call time)."""
        resolved = shutil.which(self.binary)
        if resolved is None:
            raise MutagenNotFound(
                f"mutagen binary {self.binary!r} not found (PATH={os.environ.get('PATH', '')}); "
                "install Mutagen or use the rsync engine"
            )
        return [resolved, "project", call, "--project-file", str(self.project_file)]

    def _environment(self) -> dict[str, str]:
        env = {**os.environ, **self.env}
        if self.ssh_config is not None:
            _write_ssh_wrappers(self.ssh_wrapper_dir, self.ssh_config)
            env["MUTAGEN_SSH_PATH"] = str(self.ssh_wrapper_dir)
        return env

    async def _call(self, call: str, timeout: float | None) -> CommandResult:
        deadline = self.timeout if timeout is None else timeout
        argv = self.argv(call)
        try:
            return await run_command(
                argv,
                timeout=deadline,
                what=f"mutagen {call}",
                env=self._environment(),
                cwd=self.project_file.parent,
            )
        except CommandTimeout:
            raise MutagenTimeout(call, deadline, self.project_file) from None

    async def start(self, *, timeout: float | None = None) -> None:
        """Create the project's sessions (returns after the first flush: flushOnCreate).

        Raises:
            MutagenTimeout, MutagenError, MutagenNotFound.
        """
        result = await self._call("start", timeout)
        if result.returncode != 0:
            raise MutagenError("start", result.returncode, result.output_tail())

    async def flush(self, *, timeout: float | None = None) -> None:
        """Wait for a full synchronization cycle of every session of the project.

        Raises:
            MutagenTimeout, MutagenError, MutagenNotFound.
        """
        result = await self._call("flush", timeout)
        if result.returncode != 0:
            raise MutagenError("flush", result.returncode, result.output_tail())

    async def terminate(self, *, timeout: float | None = None) -> bool:
        """Terminate the project's sessions; returns False if none was running.

        Idempotent: ``project not running`` is success.

        Raises:
            MutagenTimeout, MutagenError, MutagenNotFound.
        """
        result = await self._call("terminate", timeout)
        if result.returncode == 0:
            return True
        output = (result.stderr + result.stdout).decode("utf-8", "replace")
        if _NOT_RUNNING in output.lower():
            return False
        raise MutagenError("terminate", result.returncode, result.output_tail())

    async def stop_daemon(self, *, timeout: float | None = None) -> None:
        """``mutagen daemon stop`` with this project's environment: ends the daemon of a
        private ``MUTAGEN_DATA_DIRECTORY`` (``env``); one that is not running is fine.

        Raises:
            MutagenTimeout, MutagenNotFound.
        """
        deadline = self.timeout if timeout is None else timeout
        resolved = shutil.which(self.binary)
        if resolved is None:
            raise MutagenNotFound(f"mutagen binary {self.binary!r} not found")
        try:
            await run_command(
                [resolved, "daemon", "stop"],
                timeout=deadline,
                what="mutagen daemon stop",
                env={**os.environ, **self.env},
                cwd=self.project_file.parent,
            )
        except CommandTimeout:
            raise MutagenTimeout("daemon stop", deadline, self.project_file) from None
