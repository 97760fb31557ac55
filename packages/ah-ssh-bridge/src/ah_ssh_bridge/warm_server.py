"""The warm executor's follower side: many commands over one SSH channel.

Shipped inline (with ``warm_codec.py``, see ``ah_ssh_bridge.warm.server_command``) and started
once per transport as ``<shell> -lc 'exec python3 -I -S -c <loader> <payload>'``, so it runs
with the account's login environment, read once. It imports only the standard library and
runs on Python 3.6 or later.

stdin carries frames from the leader, stdout frames to it (``warm_codec``). Every command
runs in its own session (``start_new_session``: its own process group) with its own pipes;
an argv is exec'd directly (``PATH`` from the login environment, plus the command's
``pathPrepend``), a script runs as ``<shell> -c SCRIPT``. Stopping a command sends SIGTERM
to its process group and SIGKILL after the grace period if anything of the group is left.
When the leader goes away (stdin ends, stdout breaks) every group still running gets the
same treatment and the server exits.

Login environment freshness: the mtimes of the login files are noted at start; a START
after one of them changed is answered STALE and the server retires (no new commands, exits
when its running ones end), so the leader starts a fresh one that reads the new profile.
"""

# ruff: noqa: UP037  (quoted annotations keep this file importable on Python 3.6)

import contextlib
import errno
import os
import selectors
import signal
import subprocess
import sys
import time

from ah_ssh_bridge.warm_codec import ERROR as ERROR_FRAME
from ah_ssh_bridge.warm_codec import (
    EXITED,
    HELLO,
    MAGIC,
    SIGNAL,
    STALE,
    START,
    STDERR,
    STDIN,
    STDIN_CLOSE,
    STDOUT,
    Decoder,
    FrameError,
    encode,
    encode_json,
)

VERSION = 1
_READ_BYTES = 65536
_SYSTEM_LOGIN_FILES = (
    "/etc/profile",
    "/etc/bash.bashrc",
    "/etc/bashrc",
    "/etc/environment",
    "/etc/zshenv",
    "/etc/zprofile",
    "/etc/zshrc",
    "/etc/zlogin",
    "/etc/zsh/zshenv",
    "/etc/zsh/zprofile",
    "/etc/zsh/zshrc",
    "/etc/zsh/zlogin",
)
_HOME_LOGIN_FILES = (
    ".profile",
    ".bash_profile",
    ".bash_login",
    ".bashrc",
    ".zshenv",
    ".zprofile",
    ".zshrc",
    ".zlogin",
)
_PROFILE_DIRS = ("/etc/profile.d",)


def login_files(home: "str | None") -> "list[str]":
    """Every file whose change can change what a login shell sets up."""
    paths = list(_SYSTEM_LOGIN_FILES)
    for directory in _PROFILE_DIRS:
        paths.append(directory)  # its mtime changes when a file is added or removed
        try:
            names = sorted(os.listdir(directory))
        except OSError:
            names = []
        paths.extend(os.path.join(directory, name) for name in names)
    if home:
        paths.extend(os.path.join(home, name) for name in _HOME_LOGIN_FILES)
    return paths


def snapshot(paths: "list[str]") -> "dict[str, int | None]":
    """mtime (ns) and size folded into one number per path; None for a missing file."""
    result: "dict[str, int | None]" = {}
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:
            result[path] = None
        else:
            result[path] = st.st_mtime_ns * 1000003 + st.st_size + st.st_ino
    return result


class Command:
    """One running command."""

    def __init__(self, id: int, process: "subprocess.Popen[bytes]") -> None:
        self.id = id
        self.process = process
        self.pgid = process.pid
        self.open_streams = 2
        self.stdin_pending = bytearray()
        self.stdin_close = False
        self.kill_at: "float | None" = None


class Server:
    def __init__(self, shell: str) -> None:
        self.shell = shell
        self.selector = selectors.DefaultSelector()
        self.decoder = Decoder()
        self.commands: "dict[int, Command]" = {}
        self.accepting = True
        self.leader_gone = False
        self.home = os.environ.get("HOME")
        self.login_paths = login_files(self.home)
        self.login_state = snapshot(self.login_paths)
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_r, False)
        os.set_blocking(wake_w, False)
        self.wake_r = wake_r
        signal.set_wakeup_fd(wake_w)
        signal.signal(signal.SIGCHLD, lambda signum, frame: None)
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
        self.selector.register(wake_r, selectors.EVENT_READ, ("wake", None))
        self.selector.register(0, selectors.EVENT_READ, ("leader", None))

    # ---- output to the leader

    def send(self, data: bytes) -> None:
        if self.leader_gone:
            return
        view = memoryview(data)
        while view:
            try:
                written = os.write(1, view)
            except InterruptedError:
                continue
            except OSError:
                self.leader_gone = True
                return
            view = view[written:]

    def hello(self) -> None:
        self.send(MAGIC)
        self.send(
            encode_json(
                HELLO,
                0,
                {
                    "version": VERSION,
                    "pid": os.getpid(),
                    "python": "{}.{}.{}".format(*sys.version_info[:3]),
                    "shell": self.shell,
                },
            )
        )

    # ---- commands

    def stale_reason(self) -> "str | None":
        now = snapshot(self.login_paths)
        changed = [path for path in self.login_paths if now.get(path) != self.login_state.get(path)]
        if not changed:
            return None
        return "login file(s) changed since the warm executor started: " + ", ".join(changed)

    def start(self, id: int, spec: "dict[str, object]") -> None:
        if id in self.commands:
            self.send(encode(ERROR_FRAME, id, b"duplicate command id"))
            return
        stale = self.stale_reason()
        if stale is not None or not self.accepting:
            self.accepting = False
            self.send(encode(STALE, id, (stale or "retiring").encode("utf-8")))
            return
        env = dict(os.environ)
        extra = spec.get("env") or {}
        if isinstance(extra, dict):
            env.update({str(k): str(v) for k, v in extra.items()})
        prepend = spec.get("pathPrepend") or []
        if isinstance(prepend, list) and prepend:
            joined = ":".join(str(p) for p in prepend)
            current = env.get("PATH")
            env["PATH"] = joined + (":" + current if current else "")
        argv = spec.get("argv")
        if argv is None:
            argv = [str(spec.get("shell") or self.shell), "-c", str(spec.get("script"))]
        if not isinstance(argv, list) or not argv:
            self.send(encode(ERROR_FRAME, id, b"start: expected a non-empty argv or a script"))
            return
        argv = [str(a) for a in argv]
        cwd = spec.get("cwd")
        wants_stdin = bool(spec.get("stdin"))
        try:
            process = subprocess.Popen(
                argv,
                stdin=subprocess.PIPE if wants_stdin else subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                cwd=str(cwd) if cwd is not None else None,
                env=env,
                start_new_session=True,
                close_fds=True,
            )
        except OSError as exc:
            self.refused(id, argv[0], None if cwd is None else str(cwd), exc)
            return
        command = Command(id, process)
        self.commands[id] = command
        for stream, kind in ((process.stdout, STDOUT), (process.stderr, STDERR)):
            assert stream is not None
            os.set_blocking(stream.fileno(), False)
            self.selector.register(stream.fileno(), selectors.EVENT_READ, ("out", (command, kind)))
        if process.stdin is not None:
            os.set_blocking(process.stdin.fileno(), False)

    def refused(self, id: int, program: str, cwd: "str | None", exc: OSError) -> None:
        """Report a command that could not start like the shell would, as its own output."""
        reason = exc.strerror or str(exc)
        if cwd is not None and exc.filename == cwd:
            message, code = f"cd: {cwd}: {reason}", 1
        elif exc.errno == errno.ENOENT:
            message, code = f"{program}: command not found", 127
        else:
            message, code = f"{program}: {reason}", 126
        self.send(encode(STDERR, id, ("ah-warm-exec: " + message + "\n").encode("utf-8")))
        self.send(encode_json(EXITED, id, {"code": code}))

    def stop(self, id: int, grace: float) -> None:
        command = self.commands.get(id)
        if command is None:
            return
        self.signal_group(command, signal.SIGTERM)
        deadline = time.monotonic() + max(0.0, grace)
        if command.kill_at is None or deadline < command.kill_at:
            command.kill_at = deadline

    @staticmethod
    def signal_group(command: Command, signum: int) -> None:
        with contextlib.suppress(OSError):
            os.killpg(command.pgid, signum)

    def stdin_data(self, id: int, data: bytes) -> None:
        command = self.commands.get(id)
        if command is None or command.process.stdin is None:
            return
        command.stdin_pending += data
        self.flush_stdin(command)

    def stdin_close(self, id: int) -> None:
        command = self.commands.get(id)
        if command is None or command.process.stdin is None:
            return
        command.stdin_close = True
        self.flush_stdin(command)

    def flush_stdin(self, command: Command) -> None:
        stdin = command.process.stdin
        if stdin is None:
            return
        fd = stdin.fileno()
        while command.stdin_pending:
            try:
                written = os.write(fd, command.stdin_pending)
            except BlockingIOError:
                break
            except OSError:  # the command closed its stdin: drop what it will never read
                command.stdin_pending = bytearray()
                command.stdin_close = True
                break
            del command.stdin_pending[:written]
        registered = fd in self.selector.get_map()
        if command.stdin_pending and not registered:
            self.selector.register(fd, selectors.EVENT_WRITE, ("in", command))
        elif not command.stdin_pending and registered:
            self.selector.unregister(fd)
        if command.stdin_close and not command.stdin_pending:
            stdin.close()
            command.process.stdin = None

    def read_output(self, fd: int, command: Command, kind: int) -> None:
        try:
            data = os.read(fd, _READ_BYTES)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            self.send(encode(kind, command.id, data))
            return
        self.selector.unregister(fd)
        stream = command.process.stdout if kind == STDOUT else command.process.stderr
        if stream is not None:
            stream.close()
        command.open_streams -= 1
        self.maybe_finished(command)

    def maybe_finished(self, command: Command) -> None:
        if command.open_streams or command.process.poll() is None:
            return
        del self.commands[command.id]
        stdin = command.process.stdin
        if stdin is not None:
            fd = stdin.fileno()
            if fd in self.selector.get_map():
                self.selector.unregister(fd)
            with contextlib.suppress(OSError):
                stdin.close()
        code = command.process.returncode
        if code is not None and code < 0:
            self.send(encode_json(EXITED, command.id, {"signal": -code}))
        else:
            self.send(encode_json(EXITED, command.id, {"code": code}))

    # ---- the loop

    def handle(self, data: bytes) -> None:
        try:
            frames = self.decoder.feed(data)
        except FrameError as exc:
            self.send(encode(ERROR_FRAME, 0, str(exc).encode("utf-8")))
            self.leader_gone = True
            return
        for frame in frames:
            if frame.kind == START:
                try:
                    spec = frame.json()
                except FrameError as exc:
                    self.send(encode(ERROR_FRAME, frame.id, str(exc).encode("utf-8")))
                    continue
                self.start(frame.id, spec)
            elif frame.kind == STDIN:
                self.stdin_data(frame.id, frame.payload)
            elif frame.kind == STDIN_CLOSE:
                self.stdin_close(frame.id)
            elif frame.kind == SIGNAL:
                grace = 2.0
                try:
                    value = frame.json().get("grace", grace)
                    if isinstance(value, (int, float)):
                        grace = float(value)
                except FrameError:
                    pass
                self.stop(frame.id, grace)
            else:
                message = f"unexpected frame kind {frame.kind} from the leader"
                self.send(encode(ERROR_FRAME, frame.id, message.encode("utf-8")))

    def reap(self) -> None:
        for command in list(self.commands.values()):
            self.maybe_finished(command)

    def run(self, leaving_grace: float) -> None:
        self.hello()
        while not self.leader_gone:
            if not self.accepting and not self.commands:
                return
            now = time.monotonic()
            timeout = None
            for command in list(self.commands.values()):
                if command.kill_at is not None:
                    if command.kill_at <= now:
                        self.signal_group(command, signal.SIGKILL)
                        command.kill_at = None
                    else:
                        left = command.kill_at - now
                        timeout = left if timeout is None else min(timeout, left)
            for key, _ in self.selector.select(timeout):
                role, extra = key.data
                if role == "leader":
                    try:
                        data = os.read(0, _READ_BYTES)
                    except InterruptedError:
                        continue
                    except OSError:
                        data = b""
                    if not data:
                        self.leader_gone = True
                        break
                    self.handle(data)
                elif role == "out":
                    command, kind = extra
                    if command.id in self.commands:
                        self.read_output(key.fd, command, kind)
                elif role == "in":
                    self.flush_stdin(extra)
                else:
                    try:
                        while os.read(self.wake_r, 512):
                            pass
                    except OSError:
                        pass
            self.reap()
        self.abandon(leaving_grace)

    def abandon(self, grace: float) -> None:
        """The leader is gone: stop every command still running, then exit."""
        for command in self.commands.values():
            self.signal_group(command, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(
            _group_alive(c.pgid) for c in self.commands.values()
        ):
            time.sleep(0.02)
        for command in self.commands.values():
            self.signal_group(command, signal.SIGKILL)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except OSError:
        return False
    # Reap the leader if it exited, so a zombie does not keep the group "alive".
    with contextlib.suppress(OSError):
        os.waitpid(pgid, os.WNOHANG)
    try:
        os.killpg(pgid, 0)
    except OSError:
        return False
    return True


def main(argv: "list[str]") -> int:
    shell = argv[0] if argv else "bash"
    grace = float(argv[1]) if len(argv) > 1 else 2.0
    # The channel's stdin/stdout must stay ours alone: no child inherits them.
    os.set_inheritable(0, False)
    os.set_inheritable(1, False)
    server = Server(shell)
    server.run(grace)
    return 0
