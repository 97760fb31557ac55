"""Per-OS command adapters: turn a logical command into the string sent over SSH ``exec``.

A logical command is either an argv list (``ah-fleetctl run -- CMD ARGS...``: every element
reaches the program unchanged) or a shell string (``--command CMD``: a snippet in the
follower's shell language, inserted verbatim).

What sshd does with the string: OpenSSH hands it to the user's login shell as ``-c STRING``
(POSIX sshd) or to its ``DefaultShell`` (Windows: ``cmd.exe`` unless configured to be
PowerShell). The adapters therefore produce a string that survives *that outer shell* and
then starts the shell we want with a script we control:

* Linux: ``bash -lc '<script>'`` and macOS: ``zsh -lc '<script>'``. The script is one
  single-quoted word; a ``'`` inside it becomes ``'\\''``. Single-quoted text is literal in
  every POSIX-family shell (sh, bash, dash, zsh, ksh), so this holds whichever POSIX login
  shell the account has. Login shells (``-l``) so the toolchain ``PATH`` from the profile
  is there; our exports run *after* the profile, so they win.
* Windows: ``powershell -NoLogo -NoProfile -NonInteractive -EncodedCommand <base64>``,
  the script encoded as UTF-16LE base64. Chosen over ``-Command "<script>"`` because the
  base64 alphabet (``A-Za-z0-9+/=``) means nothing to cmd.exe, to PowerShell as outer shell,
  nor to the Windows command-line splitter, so no quoting layer can mangle it; ``-Command``
  would need quoting for an outer shell we cannot know (cmd.exe or PowerShell, depending
  on sshd's ``DefaultShell``) plus Windows argv rules that strip embedded double quotes.
  The price is length (~2.7x the script), checked against cmd.exe's 8191-character limit.
  Inside the script, arguments are PowerShell single-quoted strings: the only special
  characters are the single quotes ``'`` and its typographic forms U+2018..U+201B, which
  PowerShell also accepts as quotes, each escaped by doubling.

Working directories are mapped with :class:`PathMapping` (leader workspace path → the
follower's workspace), which refuses paths outside the workspace.
"""

from __future__ import annotations

import base64
import ntpath
import posixpath
import re
from collections.abc import Mapping, Sequence
from pathlib import PurePath, PurePosixPath, PureWindowsPath
from typing import Protocol, TypeAlias, TypeVar

import msgspec

from ah_domain_types import DomainValidationError, OsKind
from ah_ssh_bridge import WarmCommand

__all__ = [
    "MAX_POSIX_COMMAND_BYTES",
    "MAX_WINDOWS_COMMAND_CHARS",
    "POWERSHELL_SINGLE_QUOTES",
    "AdapterError",
    "CommandAdapter",
    "LogicalCommand",
    "PathMapping",
    "PathOutsideWorkspaceError",
    "PosixShellAdapter",
    "PowerShellAdapter",
    "adapter_for",
    "display_command",
    "posix_quote",
    "powershell_quote",
]

LogicalCommand: TypeAlias = Sequence[str] | str
"""An argv list (each element passed exactly) or a shell string (inserted verbatim)."""

_V = TypeVar("_V")

MAX_POSIX_COMMAND_BYTES = 131_071
"""Linux ``MAX_ARG_STRLEN`` (128 KiB incl. the NUL): sshd passes the whole command to the
login shell as one argument, so no single argument may be longer."""

MAX_WINDOWS_COMMAND_CHARS = 8_191
"""cmd.exe's command-line limit (cmd.exe is OpenSSH for Windows' default shell)."""

POWERSHELL_SINGLE_QUOTES = frozenset("'\u2018\u2019\u201a\u201b")
"""Characters PowerShell's tokenizer treats as a single quote (ASCII and typographic)."""

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_RENDER_CACHE_SIZE = 1024
"""Rendered commands an adapter keeps (a long-lived process, the leader agent, renders the
same commands for the same directories run after run)."""

_RenderKey: TypeAlias = tuple[
    "str | tuple[str, ...]", "str | None", "tuple[tuple[str, str], ...]", "tuple[str, ...]"
]


def _render_key(
    command: LogicalCommand,
    cwd: str | None,
    env: Mapping[str, str] | None,
    path_prepend: Sequence[str],
) -> _RenderKey | None:
    """What a rendering depends on, hashable; None when some part is not (no caching)."""
    try:
        key: _RenderKey = (
            command if isinstance(command, str) else tuple(command),
            cwd,
            tuple((env or {}).items()),
            tuple(path_prepend),
        )
        hash(key)
    except TypeError:
        return None
    return key


class _RenderCache:
    """Rendering is a pure function of its arguments: results are kept (bounded), errors
    are not (they are raised again each time)."""

    def __init__(self) -> None:
        self.rendered: dict[_RenderKey, str] = {}
        self.warm: dict[_RenderKey, WarmCommand | None] = {}

    @staticmethod
    def keep(table: dict[_RenderKey, _V], key: _RenderKey, value: _V) -> _V:
        if len(table) >= _RENDER_CACHE_SIZE:
            table.clear()
        table[key] = value
        return value


class AdapterError(DomainValidationError):
    """A command, environment or path that cannot be rendered for the follower's OS."""

    kind = "commandAdapter"


class PathOutsideWorkspaceError(AdapterError):
    """A leader path that is not inside the synced workspace."""

    kind = "pathOutsideWorkspace"


def _reject_nul(value: str, what: str) -> None:
    if "\x00" in value:
        raise AdapterError(
            f"{what} {value!r} contains a NUL character, which no command line can carry",
            details={"value": value},
        )


def posix_quote(word: str) -> str:
    """Quote ``word`` as one literal POSIX shell word (``'...'`` with ``'\\''`` for ``'``)."""
    _reject_nul(word, "argument")
    return "'" + word.replace("'", "'\\''") + "'"


def powershell_quote(word: str) -> str:
    """Quote ``word`` as a PowerShell single-quoted string literal (verbatim contents)."""
    _reject_nul(word, "argument")
    return "'" + "".join(c + c if c in POWERSHELL_SINGLE_QUOTES else c for c in word) + "'"


def display_command(command: LogicalCommand) -> str:
    """A human-readable one-line form of ``command`` (for summaries and events)."""
    if isinstance(command, str):
        return command
    return " ".join(
        arg if arg and re.fullmatch(r"[A-Za-z0-9_@%+=:,./-]+", arg) else posix_quote(arg)
        for arg in command
    )


def _check_command(command: LogicalCommand) -> None:
    if isinstance(command, str):
        _reject_nul(command, "command")
        if not command.strip():
            raise AdapterError("empty command: expected a program or shell snippet")
        return
    if not command:
        raise AdapterError("empty argv: expected at least the program name")
    if not command[0]:
        raise AdapterError("empty program name: argv[0] must be non-empty")
    for arg in command:
        _reject_nul(arg, "argument")


def _check_env(env: Mapping[str, str]) -> None:
    for name, value in env.items():
        if not _ENV_NAME.fullmatch(name):
            raise AdapterError(
                f"invalid environment variable name {name!r}: expected a letter or '_' "
                "followed by letters, digits or '_'",
                details={"name": name},
            )
        if name.upper() == "PATH":
            raise AdapterError(
                "PATH cannot be set through env: use path_prepend so the follower's own "
                "PATH is kept",
                details={"name": name},
            )
        _reject_nul(value, f"value of environment variable {name}")


class CommandAdapter(Protocol):
    """Renders logical commands for one follower OS."""

    os: OsKind

    def render(
        self,
        command: LogicalCommand,
        *,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
        path_prepend: Sequence[str] = (),
    ) -> str:
        """The string to send as the SSH ``exec`` request."""
        ...

    def script(
        self,
        command: LogicalCommand,
        *,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
        path_prepend: Sequence[str] = (),
    ) -> str:
        """The script the follower's shell runs (before the outer wrapping)."""
        ...

    def warm_command(
        self,
        command: LogicalCommand,
        *,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
        path_prepend: Sequence[str] = (),
    ) -> WarmCommand | None:
        """The same command in structured form for the SSH bridge's warm executor (argv or
        shell script, cwd, env), or None where it has none (Windows: exec channels)."""
        ...


class PosixShellAdapter:
    """bash (Linux) or zsh (macOS); see the module docstring."""

    def __init__(self, os: OsKind, shell: str) -> None:
        self.os = os
        self.shell = shell
        self._cache = _RenderCache()

    def script(
        self,
        command: LogicalCommand,
        *,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
        path_prepend: Sequence[str] = (),
    ) -> str:
        _check_command(command)
        env = env or {}
        _check_env(env)
        lines = [f"export {name}={posix_quote(value)}" for name, value in env.items()]
        if path_prepend:
            for entry in path_prepend:
                _reject_nul(entry, "PATH entry")
                if ":" in entry or not entry:
                    raise AdapterError(
                        f"PATH entry {entry!r} for {self.os.value} must be non-empty and "
                        "contain no ':' (the PATH separator)",
                        details={"value": entry},
                    )
            joined = posix_quote(":".join(path_prepend))
            lines.append(f'export PATH={joined}"${{PATH:+:$PATH}}"')
        if cwd is not None:
            _reject_nul(cwd, "working directory")
            if not cwd.startswith("/"):
                raise AdapterError(
                    f"working directory {cwd!r} for {self.os.value} must be an absolute "
                    "path (a relative one would depend on CDPATH and the login directory)",
                    details={"value": cwd},
                )
            lines.append(f"cd -- {posix_quote(cwd)} || exit 1")
        if isinstance(command, str):
            lines.append(command)
        else:
            lines.append(" ".join(posix_quote(arg) for arg in command))
        return "\n".join(lines)

    def render(
        self,
        command: LogicalCommand,
        *,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
        path_prepend: Sequence[str] = (),
    ) -> str:
        key = _render_key(command, cwd, env, path_prepend)
        found = self._cache.rendered.get(key) if key is not None else None
        if found is not None:
            return found
        rendered = self._render(command, cwd=cwd, env=env, path_prepend=path_prepend)
        if key is None:
            return rendered
        return self._cache.keep(self._cache.rendered, key, rendered)

    def _render(
        self,
        command: LogicalCommand,
        *,
        cwd: str | None,
        env: Mapping[str, str] | None,
        path_prepend: Sequence[str],
    ) -> str:
        script = self.script(command, cwd=cwd, env=env, path_prepend=path_prepend)
        rendered = f"{self.shell} -lc {posix_quote(script)}"
        size = len(rendered.encode("utf-8", errors="surrogatepass"))
        if size > MAX_POSIX_COMMAND_BYTES:
            raise AdapterError(
                f"command for {self.os.value} renders to {size} bytes; the limit for one "
                f"exec argument is {MAX_POSIX_COMMAND_BYTES}",
                details={"bytes": str(size)},
            )
        return rendered

    def warm_command(
        self,
        command: LogicalCommand,
        *,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
        path_prepend: Sequence[str] = (),
    ) -> WarmCommand | None:
        """What :meth:`render` runs, for the warm executor: same checks, same meaning,
        except that a shell string runs as ``<shell> -c`` in the login environment the
        executor read once, so the profile's functions and aliases are not defined."""
        # The checks (and the size limit) are the rendered form's: fallback must be possible.
        self.render(command, cwd=cwd, env=env, path_prepend=path_prepend)
        key = _render_key(command, cwd, env, path_prepend)
        found = self._cache.warm.get(key) if key is not None else None
        if found is not None:
            return found  # frozen, and nobody changes its env: shared
        argv = None if isinstance(command, str) else tuple(command)
        warm = WarmCommand(
            shell=self.shell,
            argv=argv,
            script=command if isinstance(command, str) else None,
            cwd=cwd,
            env=dict(env or {}),
            path_prepend=tuple(path_prepend),
        )
        if key is None:
            return warm
        return self._cache.keep(self._cache.warm, key, warm)


class PowerShellAdapter:
    """Windows PowerShell via ``-EncodedCommand``; see the module docstring."""

    os = OsKind.WINDOWS
    executable = "powershell"

    def script(
        self,
        command: LogicalCommand,
        *,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
        path_prepend: Sequence[str] = (),
    ) -> str:
        _check_command(command)
        env = env or {}
        _check_env(env)
        # UTF-8 on the wire so the leader decodes output the same way on every OS.
        lines = [
            "[Console]::OutputEncoding = [System.Text.Encoding]::UTF8",
            "$OutputEncoding = [System.Text.Encoding]::UTF8",
        ]
        lines += [f"$env:{name} = {powershell_quote(value)}" for name, value in env.items()]
        if path_prepend:
            for entry in path_prepend:
                _reject_nul(entry, "PATH entry")
                if ";" in entry or not entry:
                    raise AdapterError(
                        f"PATH entry {entry!r} for windows must be non-empty and contain "
                        "no ';' (the PATH separator)",
                        details={"value": entry},
                    )
            joined = powershell_quote(";".join(path_prepend) + ";")
            lines.append(f"$env:PATH = {joined} + $env:PATH")
        if cwd is not None:
            _reject_nul(cwd, "working directory")
            if not PureWindowsPath(cwd).is_absolute():
                raise AdapterError(
                    f"working directory {cwd!r} for windows must be absolute "
                    r"(a drive letter path like C:\ws or a UNC path \\server\share\ws)",
                    details={"value": cwd},
                )
            quoted = powershell_quote(cwd)
            message = powershell_quote(f"ah: cannot enter working directory {cwd}: ")
            lines.append(
                f"try {{ Set-Location -LiteralPath {quoted} -ErrorAction Stop }} "
                f"catch {{ [Console]::Error.WriteLine({message} + $_); exit 1 }}"
            )
        if isinstance(command, str):
            lines.append(command)
        else:
            lines.append("& " + " ".join(powershell_quote(arg) for arg in command))
        # PowerShell's own exit status is only 0/1; carry the native program's code over.
        lines.append(
            "$ahOk = $?; $ahCode = $LASTEXITCODE; "
            "if ($ahOk) { exit 0 } elseif ($ahCode) { exit $ahCode } else { exit 1 }"
        )
        return "\n".join(lines)

    def render(
        self,
        command: LogicalCommand,
        *,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
        path_prepend: Sequence[str] = (),
    ) -> str:
        script = self.script(command, cwd=cwd, env=env, path_prepend=path_prepend)
        try:
            payload = script.encode("utf-16-le")
        except UnicodeEncodeError as exc:
            raise AdapterError(
                f"command for windows contains a lone surrogate ({exc.reason}); "
                "expected valid Unicode text"
            ) from exc
        encoded = base64.b64encode(payload).decode("ascii")
        rendered = f"{self.executable} -NoLogo -NoProfile -NonInteractive -EncodedCommand {encoded}"
        if len(rendered) > MAX_WINDOWS_COMMAND_CHARS:
            raise AdapterError(
                f"command for windows renders to {len(rendered)} characters; cmd.exe "
                f"accepts at most {MAX_WINDOWS_COMMAND_CHARS} (the script is sent as "
                "UTF-16LE base64, ~2.7 characters per script character)",
                details={"chars": str(len(rendered))},
            )
        return rendered

    def warm_command(
        self,
        command: LogicalCommand,
        *,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
        path_prepend: Sequence[str] = (),
    ) -> WarmCommand | None:
        """None: PowerShell commands always use exec channels."""
        return None


_ADAPTERS: dict[OsKind, CommandAdapter] = {
    OsKind.LINUX: PosixShellAdapter(OsKind.LINUX, "bash"),
    OsKind.MACOS: PosixShellAdapter(OsKind.MACOS, "zsh"),
    OsKind.WINDOWS: PowerShellAdapter(),
}


def adapter_for(os: OsKind) -> CommandAdapter:
    """The adapter for followers running ``os``."""
    return _ADAPTERS[OsKind(os)]


# ---- working-directory mapping ---------------------------------------------------------

_WINDOWS_FORBIDDEN = re.compile(r'[<>:"/\\|?*\x00-\x1f]')
_WINDOWS_RESERVED = frozenset(
    ["CON", "PRN", "AUX", "NUL", "CONIN$", "CONOUT$"]
    + [f"{dev}{n}" for dev in ("COM", "LPT") for n in [*"123456789", "\u00b9", "\u00b2", "\u00b3"]]
)
"""Device names Windows reserves in every directory, with or without an extension."""


def _flavour(os: OsKind) -> type[PurePath]:
    return PureWindowsPath if os is OsKind.WINDOWS else PurePosixPath


def _is_absolute(path: str, os: OsKind) -> bool:
    if os is OsKind.WINDOWS:
        return PureWindowsPath(path).is_absolute()
    return path.startswith("/")  # what PurePosixPath.is_absolute() means


def _posix_normal(path: str) -> str:
    """``str(_normalise(path, LINUX))`` for an absolute path: ``normpath`` leaves no ``.``,
    ``..`` or empty components, and keeps two leading slashes exactly when pathlib does."""
    return posixpath.normpath(path)


def _normalise(path: str, os: OsKind) -> PurePath:
    """Lexically normalised absolute path (``.`` and ``..`` resolved) in ``os``'s flavour."""
    normpath = ntpath.normpath if os is OsKind.WINDOWS else posixpath.normpath
    return _flavour(os)(normpath(path))


class PathMapping(msgspec.Struct, frozen=True, rename="camel"):
    """Maps paths inside the leader's workspace to the same place in a follower's copy.

    ``leader_root`` is interpreted in ``leader_os``'s path flavour (POSIX unless the leader
    is Windows); ``follower_root`` in ``follower_os``'s. Windows results use backslashes and
    keep the drive letter or UNC share of ``follower_root`` (``C:/ws`` is accepted and
    written ``C:\\ws``). Mapping is lexical: ``..`` is resolved, symlinks are not.
    """

    leader_root: str
    follower_root: str
    follower_os: OsKind
    leader_os: OsKind = OsKind.LINUX

    def __post_init__(self) -> None:
        for what, root, os in (
            ("leader", self.leader_root, self.leader_os),
            ("follower", self.follower_root, self.follower_os),
        ):
            _reject_nul(root, f"{what} workspace root")
            if not _is_absolute(root, os):
                raise AdapterError(
                    f"{what} workspace root {root!r} must be an absolute {os.value} path",
                    details={"value": root},
                )

    def relative_parts(self, leader_path: str) -> tuple[str, ...]:
        """The components of ``leader_path`` below the leader root; error when outside."""
        _reject_nul(leader_path, "leader path")
        if not _is_absolute(leader_path, self.leader_os):
            raise PathOutsideWorkspaceError(
                f"leader path {leader_path!r} must be absolute (inside the workspace "
                f"{self.leader_root!r})",
                details={"path": leader_path, "workspace": self.leader_root},
            )
        if self.leader_os is not OsKind.WINDOWS:
            # Plain strings (pathlib is slow, and this runs per host per run): both are
            # normalised, so below the root means "the root, then '/'".
            root_text = _posix_normal(self.leader_root)
            path_text = _posix_normal(leader_path)
            if path_text == root_text:
                return ()
            prefix = root_text if root_text.endswith("/") else root_text + "/"
            # ``/`` and ``//`` are different anchors to pathlib: never below one another.
            same_anchor = (root_text[:2] == "//") == (path_text[:2] == "//")
            if same_anchor and path_text.startswith(prefix):
                return tuple(path_text[len(prefix) :].split("/"))
            raise PathOutsideWorkspaceError(
                f"leader path {leader_path!r} is outside the workspace {self.leader_root!r}; "
                "only paths inside the synced tree exist on the followers",
                details={"path": leader_path, "workspace": self.leader_root},
            )
        root = _normalise(self.leader_root, self.leader_os)
        path = _normalise(leader_path, self.leader_os)
        try:
            relative = path.relative_to(root)
        except ValueError:
            raise PathOutsideWorkspaceError(
                f"leader path {leader_path!r} is outside the workspace {self.leader_root!r}; "
                "only paths inside the synced tree exist on the followers",
                details={"path": leader_path, "workspace": self.leader_root},
            ) from None
        return relative.parts

    def to_follower(self, leader_path: str) -> str:
        """``leader_path`` (inside the workspace) as a path on the follower."""
        parts = self.relative_parts(leader_path)
        if self.follower_os is OsKind.WINDOWS:
            for part in parts:
                self._check_windows_component(part, leader_path)
        if self.follower_os is not OsKind.WINDOWS:
            root_text = _posix_normal(self.follower_root)
            if not parts:
                return root_text
            return (root_text if root_text.endswith("/") else root_text + "/") + "/".join(parts)
        root = _normalise(self.follower_root, self.follower_os)
        return str(root.joinpath(*parts))

    def _check_windows_component(self, part: str, leader_path: str) -> None:
        stem = part.split(".", 1)[0].rstrip(" ").upper()
        if (
            _WINDOWS_FORBIDDEN.search(part)
            or part.endswith((" ", "."))
            or stem in _WINDOWS_RESERVED
        ):
            raise AdapterError(
                f"leader path {leader_path!r} has a component {part!r} that cannot exist on "
                'Windows (reserved name, trailing dot/space, or one of <>:"/\\|?* or a '
                "control character)",
                details={"path": leader_path, "component": part},
            )
