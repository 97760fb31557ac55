"""The thin ``run`` path: hand the whole run to the running leader agent.

``ah-fleetctl run ...`` typed again and again (by a user or a coding agent) should cost
little more than the remote commands. The full CLI imports click, the config resolver,
httpx, paramiko, msgspec... (~0.3 s of start-up on the development VM), asks the access
point for the follower list and starts a session-event connection; the leader agent already
holds all of that. So :func:`try_thin_run` — called by ``main()`` before anything else is
imported — does only this, with the standard library alone:

1. Only for ``run`` or ``fence`` given as the first argument, without ``AH_NO_AGENT``.
2. Find this invocation's agent in the *thin index*: a private (0700) directory of small
   JSON files, one per (working directory, relevant environment) key. The full ``run``
   writes the entry when it ran through the agent with no configuration flags; it records
   the agent's socket, every configuration file it consulted (with ``mtime``, size and
   inode, or absent) and the run settings that come from configuration (default timeout,
   session, workspace overrides, log directory, ``AH_JSON``). Any change to those files,
   the directory or the environment misses the index, and the full CLI runs (and rewrites
   the entry).
3. Send the raw arguments to the agent (4-byte length + :mod:`marshal` frames; the agent
   speaks msgpack to everyone else and tells the two apart by the payload's first byte). The agent parses them
   with the real click command, so the options mean exactly what they mean in the full
   CLI; anything it does not serve itself (``--help``, a usage error, a configuration flag
   such as ``--access-point``, a fence when the agent's ``PATH`` is not the CLI's) comes
   back as ``fallback`` *before anything ran*, and the full CLI handles it. A fenced run
   (the default) and ``fence`` are fenced by the agent (:mod:`ah_fleetctl.thin_fence`).
4. Write what the agent streams (host-prefixed lines, the summary, or the ``--json``
   envelope) to stdout/stderr and exit with its code. Ctrl-C sends ``cancel``: the agent
   stops the remote commands and still sends the summary (exit 130).

Failure handling: no index entry, an insecure index, a socket nobody answers on (a stale
socket of a dead agent) or the agent closing the connection before it *started* the run →
``None`` (the caller runs the full CLI, which starts a new agent). The agent going away
*after* it started the run is reported loudly (exit 1, the hosts' fate unknown) and never
retried, since the commands may have run.

The wire format is :class:`ah_fleetctl.agent_proto.ThinRunRequest` and the ``Thin*Reply``
Structs as plain dicts in :mod:`marshal` (the agent validates with msgspec). Why marshal and
not JSON: it is built into the interpreter and already loaded, while ``json`` pulls in ``re``,
and this module imports nothing that is not (``_socket`` and ``_signal`` are small C
modules; no ``typing``, ``collections``, ``socket``, ``signal``, ``hashlib``, not even
``zlib`` or ``__future__``: on an interpreter built with shared extension modules each
extension is a ``dlopen``). Both ends run the same interpreter (the agent is started with
the CLI's own), and the socket and the index are private to the user, so marshal's lack of
hardening against hostile input does not matter here. ``python -X importtime`` shows what
this path costs.
"""

# No ``from __future__ import annotations``: that statement imports the module (~0.4 ms
# of every warm run); the annotations naming typing-only names are strings instead.

import _signal  # type: ignore[import-not-found]  # (no stub; signal would load enum)
import _socket
import marshal
import os
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence
    from typing import Any

__all__ = [
    "INDEX_VERSION",
    "THIN_ENV_NAMES",
    "file_signature",
    "index_dir",
    "index_path",
    "relevant_env",
    "thin_key",
    "try_thin_run",
]

INDEX_VERSION = 2
THIN_ENV_NAMES = frozenset(
    {"HOME", "USERPROFILE", "APPDATA", "LOCALAPPDATA", "TMPDIR", "TEMP", "TMP"}
)
"""Besides every ``AH_*`` and ``XDG_*`` variable: what configuration and log paths read."""

_MAX_FRAME = 1 << 20
_INTERRUPTED = 130
_FAILED = 1


def relevant_env(environ: "Mapping[str, str]") -> dict[str, str]:
    """The variables that can change how the configuration resolves."""
    return {
        k: v
        for k, v in sorted(environ.items())
        if k.startswith(("AH_", "XDG_")) or k in THIN_ENV_NAMES
    }


_KEY_PRIMES = ((1 << 64) - 59, (1 << 62) - 57)
"""The largest primes below 2**64 and 2**62: the key is the invocation's bytes, read as one
integer, modulo each (a polynomial hash over 8-byte words; int arithmetic, no module), each
then multiplied by `_KEY_MIX` (so a one-byte change moves every digit of the name)."""
_KEY_MIX = 0x9E3779B97F4A7C15


def thin_key(cwd: str, environ: "Mapping[str, str]") -> str:
    """The index file name of an invocation (the entry itself holds the exact cwd and
    variables, compared on use, so this only needs to spread well and be the same in
    every process: not ``hash()``, which is salted per process)."""
    blob = repr((cwd, relevant_env(environ))).encode("utf-8", "surrogatepass")
    number = int.from_bytes(blob, "little")
    low, high = (number % prime * _KEY_MIX % prime for prime in _KEY_PRIMES)
    return f"{low:016x}{high:016x}{len(blob):x}"


def index_dir(environ: "Mapping[str, str] | None" = None) -> str:
    """Where the thin index lives: ``$XDG_RUNTIME_DIR/agent-harbor/thin`` when that is an
    absolute directory, else ``$TMPDIR`` (or ``/tmp``) ``/ah-<uid>/thin``."""
    env = os.environ if environ is None else environ
    runtime = env.get("XDG_RUNTIME_DIR", "")
    if runtime and os.path.isabs(runtime) and os.path.isdir(runtime):
        base = os.path.join(runtime, "agent-harbor")
    else:
        tmp = env.get("TMPDIR") or "/tmp"
        base = os.path.join(tmp, f"ah-{os.getuid() if hasattr(os, 'getuid') else 0}")
    return os.path.join(base, "thin")


def index_path(cwd: str, environ: "Mapping[str, str] | None" = None) -> str:
    env = os.environ if environ is None else environ
    return os.path.join(index_dir(env), f"{thin_key(cwd, env)}.marshal")


def file_signature(path: str) -> list[int] | None:
    """``[mtime_ns, size, inode]`` of ``path``, or None when it does not exist."""
    try:
        info = os.stat(path)
    except OSError:
        return None
    return [info.st_mtime_ns, info.st_size, info.st_ino]


def repo_root_of(start: str) -> str | None:
    """The nearest ancestor holding ``.agents/`` or ``.git`` (as ``ah_config`` finds it)."""
    current = os.path.realpath(start)
    while True:
        if os.path.isdir(os.path.join(current, ".agents")) or os.path.exists(
            os.path.join(current, ".git")
        ):
            return current
        parent = os.path.dirname(current)
        if parent == current:
            return None
        current = parent


def _private(path: str, *, directory: bool) -> bool:
    """Ours, not a symlink, and closed to group and others."""
    try:
        info = os.lstat(path)
    except OSError:
        return False
    kind = 0o040000 if directory else 0o100000  # S_IFDIR / S_IFREG
    uid = os.getuid() if hasattr(os, "getuid") else info.st_uid
    return (info.st_mode & 0o170000) == kind and info.st_uid == uid and not info.st_mode & 0o077


def _load_entry(cwd: str) -> "dict[str, Any] | None":
    path = index_path(cwd)
    if not (_private(os.path.dirname(path), directory=True) and _private(path, directory=False)):
        return None
    try:
        with open(path, "rb") as handle:
            entry = marshal.loads(handle.read())
    except (OSError, ValueError, EOFError, TypeError):
        return None
    if not isinstance(entry, dict) or entry.get("version") != INDEX_VERSION:
        return None
    if entry.get("cwd") != cwd or entry.get("env") != relevant_env(os.environ):
        return None
    if not isinstance(entry.get("socket"), str) or not isinstance(entry.get("defaults"), dict):
        return None
    files = entry.get("files")
    if not isinstance(files, list):
        return None
    for item in files:
        if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], str)):
            return None
        if file_signature(item[0]) != item[1]:
            return None  # a configuration file changed, appeared or went away
    if entry.get("repoRoot") != repo_root_of(cwd):
        return None  # a repository (and its config) appeared or went away around cwd
    return entry


def _colour() -> bool:
    if os.environ.get("NO_COLOR", ""):
        return False
    try:
        return os.isatty(1)
    except OSError:
        return False


class _Connection:
    def __init__(self, sock: _socket.socket) -> None:
        self.sock = sock
        self.buffer = bytearray()

    def send(self, message: "dict[str, Any]") -> None:
        payload = marshal.dumps(message)
        self.sock.sendall(len(payload).to_bytes(4, "big") + payload)

    def receive(self) -> "dict[str, Any] | None":
        """The next reply, or None at end of stream."""
        while True:
            if len(self.buffer) >= 4:
                length = int.from_bytes(self.buffer[:4], "big")
                if length > _MAX_FRAME:
                    raise ValueError(f"reply frame of {length} bytes is over the limit")
                if len(self.buffer) >= 4 + length:
                    payload = bytes(self.buffer[4 : 4 + length])
                    del self.buffer[: 4 + length]
                    reply = marshal.loads(payload)
                    if not isinstance(reply, dict):
                        raise ValueError(f"reply is not a dict: {reply!r}")
                    return reply
            try:
                data = self.sock.recv(1 << 16)
            except InterruptedError:
                continue
            if not data:
                return None
            self.buffer += data


def _write(fd: int, text: str) -> None:
    data = text.encode("utf-8", "surrogateescape")
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def try_thin_run(args: "Sequence[str]") -> int | None:
    """Run ``ah-fleetctl ARGS`` through the leader agent and return the exit code, or None
    when this invocation is not one the thin path serves (the caller runs the full CLI)."""
    if not args or args[0] not in ("run", "fence") or os.environ.get("AH_NO_AGENT"):
        return None
    try:
        cwd = os.getcwd()
    except OSError:
        return None
    entry = _load_entry(cwd)
    if entry is None:
        return None
    socket_path: str = entry["socket"]
    if not _private(os.path.dirname(socket_path), directory=True):
        return None
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        try:
            sock.connect(socket_path)
        except OSError:
            return None  # no agent there any more (a stale socket): the full CLI starts one
        return _converse(_Connection(sock), socket_path, entry, list(args), cwd)
    finally:
        sock.close()


def _converse(
    connection: _Connection,
    socket_path: str,
    entry: "dict[str, Any]",
    args: list[str],
    cwd: str,
) -> int | None:
    request = {
        "op": "thinRun",
        "version": INDEX_VERSION,
        "command": args[0],
        "args": args[1:],
        "cwd": cwd,
        "path": os.environ.get("PATH"),
        "colour": _colour(),
        "defaults": entry["defaults"],
    }
    started = False
    cancelled = False

    def on_sigint(_signum: int, _frame: object) -> None:
        nonlocal cancelled
        if cancelled:
            raise KeyboardInterrupt  # a second Ctrl-C: leave now (the agent cancels on EOF)
        cancelled = True
        try:  # noqa: SIM105 - contextlib is not loaded on this path
            connection.send({"op": "cancel"})
        except OSError:
            pass

    previous = _signal.signal(_signal.SIGINT, on_sigint)
    try:
        try:
            connection.send(request)
        except OSError:
            return None
        while True:
            try:
                reply = connection.receive()
            except (OSError, ValueError, EOFError, TypeError) as exc:
                if not started:
                    return None
                return _agent_lost(socket_path, f"{type(exc).__name__}: {exc}")
            if reply is None:
                if not started:
                    return None  # it stopped before running anything: safe to do it ourselves
                return _agent_lost(socket_path, "it closed the connection")
            op = reply.get("op")
            if op == "out":
                try:
                    _write(2 if reply.get("fd") == 2 else 1, str(reply.get("text", "")))
                except BrokenPipeError:
                    # The reader went away (``| head``): stop the run, as the full CLI does.
                    _silence_stdout()
                    return _FAILED
            elif op == "started":
                started = True
            elif op == "fallback":
                if started:
                    return _agent_lost(socket_path, "it declined a run it had started")
                return None
            elif op == "done":
                code = reply.get("code")
                return int(code) if isinstance(code, int) else _FAILED
    except KeyboardInterrupt:
        _write(2, "Interrupted.\n")
        return _INTERRUPTED
    finally:
        _signal.signal(_signal.SIGINT, previous)


def _agent_lost(socket_path: str, how: str) -> int:
    log = socket_path[: -len(".sock")] + ".log" if socket_path.endswith(".sock") else socket_path
    _write(
        2,
        f"Error: the leader agent at {socket_path} went away during the run ({how}); "
        f"the commands may have run but their results are unknown (agent log: {log})\n",
    )
    return _FAILED


def _silence_stdout() -> None:
    try:  # noqa: SIM105 - contextlib is not loaded on this path
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):
        pass
