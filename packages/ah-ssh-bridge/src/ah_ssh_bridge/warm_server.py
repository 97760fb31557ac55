"""The warm executor's follower side: many commands over one SSH channel.

Shipped inline (with ``warm_codec.py``, see ``ah_ssh_bridge.warm.server_command``) and started
once per transport as ``<shell> -lc 'exec python3 -I -S -c <loader> <payload>'``, so it runs
with the account's login environment, read once. It imports only the standard library and
runs on Python 3.6 or later.

stdin carries frames from the leader, stdout frames to it (``warm_codec``). Every command
runs in its own session (its own process group) with its own pipes; an argv is exec'd
directly (``PATH`` from the command's environment: the login one plus the command's ``env``
and ``pathPrepend``), a script runs as ``<shell> -c SCRIPT``. Stopping a command sends
SIGTERM to its process group and SIGKILL after the grace period if anything of the group is
left. When the leader goes away (stdin ends, stdout breaks) every group still running gets
the same treatment and the server exits.

How a command starts (the per-command cost is most of a warm fan-out's CPU on a follower):

* **posix_spawn** (Python 3.8+ where the C library can ``setsid`` in it: glibc 2.26+,
  macOS 10.15+): the spawn costs the server about a third of ``subprocess.Popen``'s CPU
  and half its latency (Popen's child closes descriptors before its exec, which the server
  waits for; here none are left to close). What Popen's child would do
  is done here instead: the ``PATH`` search over the command's own ``PATH`` (as
  ``subprocess`` does it: the first error other than "not there" wins), the ``cwd`` by
  changing the server's directory around the spawn (single-threaded; it returns to its own
  directory through a descriptor, and retires if it ever cannot), ``SIGPIPE``/``SIGXFSZ``
  back to their defaults, nothing but 0/1/2 inherited (every other descriptor of the server
  is close-on-exec: those it inherited are marked so at start, Python makes its own so).
* **subprocess.Popen** everywhere else (Python 3.6/3.7, no ``setsid`` in ``posix_spawn``,
  no ``/proc/self/fd`` or ``/dev/fd`` to find inherited descriptors), and when the login
  environment sets ``AH_WARM_PLAIN`` to a list containing ``spawn``. The ``cwd`` is entered
  the same way (so its errors are reported the same on every Python).

Arguments, environment and cwd are passed as UTF-8 bytes (surrogate escapes back to the
bytes they stand for), as an exec channel would pass them, whatever the follower Python's
file system encoding (ASCII for a Python 3.6 in the C locale).

How a command's end is noticed: its output ends with it, and it is collected right then
(``waitpid``); if it has not quite exited yet, or goes on with its output closed, a pidfd
(Linux 5.3+, Python 3.9+) wakes the loop when it does, else SIGCHLD through a pipe. So
where pidfds exist there is no signal per command. The exit status follows all of its output.

Errors are reported as the shell would, as the command's own stderr and exit status: a
``cwd`` that cannot be entered ``cd: DIR: REASON`` (1), a program not found (127), one that
cannot be executed (126).

Login environment freshness: the mtimes of the login files are noted at start; a START
after one of them changed is answered STALE and the server retires (no new commands, exits
when its running ones end), so the leader starts a fresh one that reads the new profile.
Stat-ing every login file per command (some 20) costs about as much as the spawn, so on Linux, once the server is first idle, inotify watches their directories and the files
are compared only when an event names one of them (or the queue overflowed). A login file
that inotify could miss a change of (a symlink or a path through one, a hard-linked file, a
network or FUSE filesystem) is still stat-ed for every command; without inotify (or with
``watch`` in ``AH_WARM_PLAIN``) every file is.
"""

# ruff: noqa: UP037  (quoted annotations keep this file importable on Python 3.6)

import contextlib
import errno
import os
import select
import selectors
import signal
import stat
import struct
import subprocess
import sys
import time

from ah_ssh_bridge.warm_codec import ERROR as ERROR_FRAME
from ah_ssh_bridge.warm_codec import (
    EXITED,
    HEADER,
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
_FLUSH_BYTES = 1 << 18
"""Output to the leader is gathered over one loop turn (one write, one SSH packet for a
command's last output and its EXITED) unless this much is waiting."""
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
_NOT_THERE = (errno.ENOENT, errno.ENOTDIR)
# What Popen's child resets (restore_signals): Python ignores these, a command must not.
_DEFAULT_SIGNALS = tuple(
    getattr(signal, name) for name in ("SIGPIPE", "SIGXFZ", "SIGXFSZ") if hasattr(signal, name)
)


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


def plain_features() -> "frozenset[str]":
    """What ``AH_WARM_PLAIN`` (in the login environment) turns off: ``spawn`` (posix_spawn:
    Popen instead), ``watch`` (inotify: stat every login file per command instead)."""
    value = os.environ.get("AH_WARM_PLAIN", "")
    return frozenset(word.strip() for word in value.replace(",", " ").split())


def readable(fd: int) -> bool:
    """Whether ``fd`` has something to read (or is at its end), without waiting."""
    probe = select.poll()
    probe.register(fd, select.POLLIN)
    return bool(probe.poll(0))


# --------------------------------------------------------------------------- freshness

_IN_MODIFY = 0x2
_IN_ATTRIB = 0x4
_IN_CLOSE_WRITE = 0x8
_IN_MOVED_FROM = 0x40
_IN_MOVED_TO = 0x80
_IN_CREATE = 0x100
_IN_DELETE = 0x200
_IN_DELETE_SELF = 0x400
_IN_MOVE_SELF = 0x800
_IN_UNMOUNT = 0x2000
_IN_Q_OVERFLOW = 0x4000
_IN_IGNORED = 0x8000
_IN_ONLYDIR = 0x1000000
_IN_NONBLOCK = 0o4000
_IN_CLOEXEC = 0o2000000
_WATCH_MASK = (
    _IN_MODIFY | _IN_CLOSE_WRITE | _IN_ATTRIB | _IN_MOVED_FROM | _IN_MOVED_TO | _IN_CREATE
    | _IN_DELETE | _IN_DELETE_SELF | _IN_MOVE_SELF | _IN_ONLYDIR
)  # fmt: skip
_WATCH_GONE = _IN_DELETE_SELF | _IN_MOVE_SELF | _IN_UNMOUNT | _IN_IGNORED | _IN_Q_OVERFLOW
_EVENT = struct.Struct("iIII")
_LOCAL_FILESYSTEMS = frozenset(
    (
        "ext2",
        "ext3",
        "ext4",
        "xfs",
        "btrfs",
        "tmpfs",
        "ramfs",
        "f2fs",
        "bcachefs",
        "jfs",
        "reiserfs",
        "zfs",
        "overlay",
    )
)
"""Filesystems whose every change is made by this kernel (so inotify hears of it); on any
other (NFS, FUSE...) a login file is stat-ed for every command."""


def _mounts() -> "list[tuple[str, str]]":
    """(mount point, filesystem type) from ``/proc/self/mountinfo``, in mount order."""
    with open("/proc/self/mountinfo", "rb") as handle:
        lines = handle.read().decode("utf-8", "surrogateescape").splitlines()
    result = []
    for line in lines:
        left, _, right = line.partition(" - ")
        fields = left.split()
        if len(fields) < 5 or not right:
            continue
        mount = fields[4]
        for escape, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
            mount = mount.replace(escape, char)
        result.append((mount, right.split()[0]))
    return result


def _filesystem_type(mounts: "list[tuple[str, str]]", path: str) -> "str | None":
    best, found = -1, None
    for mount, kind in mounts:
        inside = path == mount or path.startswith(mount.rstrip("/") + "/")
        if inside and len(mount) >= best:  # later mounts over the same point win
            best, found = len(mount), kind
    return found


class LoginWatch:
    """inotify on the directories of the login files (Linux, through ctypes).

    :meth:`plan` watches, for every login file, the deepest existing directory on its path
    and notes the name there that leads to it (the file's own name, or that of the missing
    directory it would be in); a login directory (``/etc/profile.d``) is watched itself, for
    any name. Files it cannot vouch for are returned to be stat-ed every time. The watches
    are added before the caller compares the files, so a change is either seen by that
    comparison or queued as an event."""

    def __init__(self) -> None:
        import ctypes  # only here: the import costs a few ms, on the first idle moment

        libc = ctypes.CDLL(None, use_errno=True)
        self._ctypes = ctypes
        self._add = libc.inotify_add_watch
        self._add.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
        fd = libc.inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC)
        if fd < 0:
            code = ctypes.get_errno()
            raise OSError(code, "inotify_init1: " + os.strerror(code))
        self.fd = int(fd)
        self.names: "dict[int, set[str] | None]" = {}
        """Per watch: the names in it that matter (None: any)."""

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)

    def _watch(self, directory: str, name: "str | None") -> None:
        wd = self._add(self.fd, os.fsencode(directory), _WATCH_MASK)
        if wd < 0:
            code = self._ctypes.get_errno()
            raise OSError(code, "inotify_add_watch: " + os.strerror(code), directory)
        if name is None:
            self.names[wd] = None
        else:
            names = self.names.get(wd, set())
            if names is not None:
                names.add(name)
                self.names[wd] = names

    def plan(self, paths: "list[str]", directories: "frozenset[str]") -> "list[str]":
        """Watch what tells of a change of ``paths``; the paths that must be stat-ed anyway.
        ``directories``: the paths that are directories whose entries matter. Raises
        OSError when a watch cannot be added (then nothing can be vouched for)."""
        mounts = _mounts()
        always: "list[str]" = []
        for path in paths:
            if not os.path.isabs(path) or os.path.realpath(path) != os.path.normpath(path):
                always.append(path)  # a symlink on the way: its target's changes are elsewhere
                continue
            try:
                st = os.stat(path)
            except OSError:
                st = None
            if st is not None and stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
                always.append(path)  # written through another link, no watch of ours hears
                continue
            directory, name = os.path.split(path)
            while not os.path.isdir(directory):
                directory, name = os.path.split(directory)
            if _filesystem_type(mounts, directory) not in _LOCAL_FILESYSTEMS:
                always.append(path)
                continue
            self._watch(directory, name)
            if path in directories and st is not None and stat.S_ISDIR(st.st_mode):
                self._watch(path, None)
        return always

    def relevant_events(self) -> bool:
        """Drain the queue; whether any event may concern a login file."""
        if not readable(self.fd):
            return False  # (the common case: checked without an exception)
        found = False
        while True:
            try:
                data = os.read(self.fd, 65536)
            except (BlockingIOError, InterruptedError):
                return found
            if not data:
                return found
            if found:
                continue
            offset = 0
            size = _EVENT.size
            while offset + size <= len(data):
                wd, mask, _cookie, length = _EVENT.unpack_from(data, offset)
                if mask & _WATCH_GONE:
                    found = True
                    break
                names = self.names.get(wd, ())
                if names is None:
                    found = True
                    break
                if names:
                    raw = data[offset + size : offset + size + length].rstrip(b"\0")
                    if os.fsdecode(raw) in names:
                        found = True
                        break
                offset += size + length


class Freshness:
    """Whether the login environment the server started with is still what a login shell
    would set up (see the module docstring)."""

    def __init__(self, home: "str | None", watch: bool) -> None:
        self.paths = login_files(home)
        self.directories = frozenset(_PROFILE_DIRS)
        self.reference = snapshot(self.paths)
        self.always = self.paths
        """Stat-ed for every command (all of them until inotify is up)."""
        self.watch: "LoginWatch | None" = None
        self.may_watch = watch and sys.platform.startswith("linux")
        self.changed: "list[str]" = []

    def _compare(self, paths: "list[str]") -> None:
        reference = self.reference
        for path in paths:
            try:
                st = os.stat(path)
            except OSError:
                now = None
            else:
                now = st.st_mtime_ns * 1000003 + st.st_size + st.st_ino
            if now != reference.get(path) and path not in self.changed:
                self.changed.append(path)

    def start_watching(self) -> None:
        """Set up inotify (once; quietly nothing when it cannot be)."""
        self.may_watch = False
        try:
            watch = LoginWatch()
        except Exception:  # no ctypes, no inotify, no instance left: stat every time
            return
        try:
            always = watch.plan(self.paths, self.directories)
        except Exception:
            watch.close()
            return
        self.watch = watch
        self.always = always
        # Whatever changed before the watches were there.
        self._compare(self.paths)

    def stale_reason(self) -> "str | None":
        if not self.changed:
            watch = self.watch
            if watch is not None and watch.relevant_events():
                try:
                    self.always = watch.plan(self.paths, self.directories)
                except Exception:
                    watch.close()
                    self.watch = None
                    self.always = self.paths
                self._compare(self.paths)
            elif self.always:
                self._compare(self.always)
        if not self.changed:
            return None
        return "login file(s) changed since the warm executor started: " + ", ".join(self.changed)


# --------------------------------------------------------------------------- polling


class Poller:
    """``select.epoll`` used directly where there is one (a few microseconds less per
    descriptor than ``selectors``), a ``selectors`` selector elsewhere."""

    def __init__(self) -> None:
        self.data: "dict[int, object]" = {}
        self.touched: "set[int]" = set()
        """Descriptors added or removed since the last :meth:`poll`: what that poll said of
        them is stale (the number may be another file's by now)."""
        self.epoll = getattr(select, "epoll", None)
        if self.epoll is not None:
            self._epoll = self.epoll()
            self._selector = None
        else:
            self._selector = selectors.DefaultSelector()

    def add(self, fd: int, write: bool, data: object) -> None:
        self.data[fd] = data
        self.touched.add(fd)
        if self._selector is None:
            self._epoll.register(fd, select.EPOLLOUT if write else select.EPOLLIN)
        else:
            self._selector.register(fd, selectors.EVENT_WRITE if write else selectors.EVENT_READ)

    def remove(self, fd: int) -> None:
        if self.data.pop(fd, None) is None:
            return
        self.touched.add(fd)
        try:
            if self._selector is None:
                self._epoll.unregister(fd)
            else:
                self._selector.unregister(fd)
        except (OSError, KeyError, ValueError):
            pass

    def __contains__(self, fd: int) -> bool:
        return fd in self.data

    def poll(self, timeout: "float | None") -> "list[int]":
        """The descriptors that are ready."""
        self.touched.clear()
        if self._selector is None:
            return [fd for fd, _ in self._epoll.poll(-1 if timeout is None else timeout)]
        return [key.fd for key, _ in self._selector.select(timeout)]


# --------------------------------------------------------------------------- commands


class Command:
    """One running command."""

    __slots__ = (
        "err_fd",
        "id",
        "in_fd",
        "kill_at",
        "open_streams",
        "out_fd",
        "pid",
        "popen",
        "status",
        "stdin_close",
        "stdin_pending",
    )

    def __init__(self, id: int, pid: int, out_fd: int, err_fd: int, in_fd: "int | None") -> None:
        self.id = id
        self.pid = pid  # also its process group (its own session)
        self.popen: "subprocess.Popen[bytes] | None" = None
        self.out_fd = out_fd
        self.err_fd = err_fd
        self.in_fd = in_fd
        self.open_streams = 2
        self.status: "int | None" = None
        """Its wait status once reaped."""
        self.stdin_pending = bytearray()
        self.stdin_close = False
        self.kill_at: "float | None" = None


class Refused(Exception):
    """A command could not start; reported as its own stderr and exit status: ``message``,
    else ``<program>: <reason>``."""

    def __init__(self, code: int, message: str = "", reason: str = "") -> None:
        super().__init__(message or reason)
        self.code = code
        self.message = message
        self.reason = reason


def _exec_error(code: int) -> Refused:
    if code == errno.ENOENT:
        return Refused(127, reason="command not found")
    return Refused(126, reason=os.strerror(code))


def _bytes(text: str) -> bytes:
    """What an exec channel would carry: UTF-8, with undecodable bytes (surrogate escapes)
    back as they were. Not the follower's file system encoding: a Python 3.6 in the C locale
    would say ASCII."""
    return text.encode("utf-8", "surrogateescape")


def _search_path(env: "dict[bytes, bytes]") -> "list[bytes]":
    path = env.get(b"PATH")
    return (_bytes(os.defpath) if path is None else path).split(b":")


def _search_error(candidates: "list[bytes]", tried: "dict[bytes, int]") -> int:
    """The error subprocess's PATH search reports when nothing could be executed: the first
    one other than "not there" (ENOENT, ENOTDIR), else the last one."""
    first = 0
    last = errno.ENOENT
    for candidate in candidates:
        code = tried.get(candidate)
        if code is None:
            try:
                os.stat(candidate)
            except OSError as exc:
                code = exc.errno or errno.ENOENT
            else:
                code = errno.ENOENT  # appeared since the search: it was not there then
        if code not in _NOT_THERE and not first:
            first = code
        last = code
    return first or last


def _mark_inherited_close_on_exec() -> bool:
    """Make every descriptor above 2 close-on-exec; False if they cannot be listed."""
    for listing in ("/proc/self/fd", "/dev/fd"):
        try:
            names = os.listdir(listing)
        except OSError:
            continue
        for name in names:
            if name.isdigit() and int(name) > 2:
                with contextlib.suppress(OSError):  # the listing's own, closed by now
                    os.set_inheritable(int(name), False)
        return True
    return False


def _pidfd_works() -> bool:
    if not hasattr(os, "pidfd_open"):
        return False
    try:
        os.close(os.pidfd_open(os.getpid()))
    except OSError:  # ENOSYS: a kernel before 5.3
        return False
    return True


def _fast_spawn_possible(plain: "frozenset[str]") -> bool:
    if "spawn" in plain or sys.version_info < (3, 8) or not hasattr(os, "posix_spawn"):
        return False
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            return False  # a pipe of ours could become 0-2 and would not be dup'ed right
    return _mark_inherited_close_on_exec()


class Server:
    def __init__(self, shell: str) -> None:
        self.shell = shell
        plain = plain_features()
        self.fast_spawn = _fast_spawn_possible(plain)
        self.poller = Poller()
        self.decoder = Decoder()
        self.commands: "dict[int, Command]" = {}
        self.by_pid: "dict[int, Command]" = {}
        self.stopping = 0
        """Commands with a SIGKILL deadline."""
        self.accepting = True
        self.retire_reason: "str | None" = None
        self.leader_gone = False
        self.out = bytearray()
        self.started = 0
        self.freshness = Freshness(os.environ.get("HOME"), "watch" not in plain)
        # The login environment, fixed for the server's life: copied once, not per command.
        self.base_env = dict(os.environb)
        self.base_path = _search_path(self.base_env)
        self.devnull = os.open(os.devnull, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        self.home_fd = self.own_directory()
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
        # How a command's end is noticed: almost always its output ends with it, and it is
        # collected right then (waitpid). When it has not quite exited yet, or keeps running
        # with its output closed, a pidfd (Linux 5.3+, Python 3.9+) says when it does: no
        # SIGCHLD handler, whose signal would interrupt the loop once per command. Without
        # pidfds, SIGCHLD wakes the loop through a pipe.
        self.use_pidfd = _pidfd_works()
        self.wake_r = -1
        if self.use_pidfd:
            # Not SIG_IGN, should whoever started us have left it so: children would be
            # reaped by the kernel, their exit status lost.
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        else:
            wake_r, wake_w = os.pipe()
            os.set_blocking(wake_r, False)
            os.set_blocking(wake_w, False)
            self.wake_r = wake_r
            signal.set_wakeup_fd(wake_w)
            signal.signal(signal.SIGCHLD, lambda signum, frame: None)
            self.poller.add(wake_r, False, "wake")
        self.poller.add(0, False, "leader")

    @staticmethod
    def own_directory() -> "int | None":
        """A descriptor of the server's directory, to return to after a command's cwd."""
        flags = getattr(os, "O_PATH", os.O_RDONLY) | getattr(os, "O_DIRECTORY", 0)
        try:
            return os.open(".", flags | getattr(os, "O_CLOEXEC", 0))
        except OSError:
            return None

    # ---- output to the leader

    def send(self, data: bytes) -> None:
        self.out += data
        if len(self.out) >= _FLUSH_BYTES:
            self.flush()

    def flush(self) -> None:
        if not self.out:
            return
        if self.leader_gone:
            self.out = bytearray()
            return
        view = memoryview(self.out)
        try:
            while view:
                try:
                    written = os.write(1, view)
                except InterruptedError:
                    continue
                except OSError:
                    self.leader_gone = True
                    return
                view = view[written:]
        finally:
            view.release()
            self.out = bytearray()

    def frame(self, kind: int, id: int, payload: bytes) -> None:
        """A frame whose header and payload are known to be valid (ids come from the leader,
        output chunks are at most _READ_BYTES)."""
        self.send(HEADER.pack(kind, id, len(payload)) + payload)

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
                    "spawn": "posix_spawn" if self.fast_spawn else "popen",
                },
            )
        )
        self.flush()

    # ---- commands

    def stale_reason(self) -> "str | None":
        if not self.accepting:
            return self.retire_reason or "retiring"
        return self.freshness.stale_reason()

    def start(self, id: int, spec: "dict[str, object]") -> None:
        if id in self.commands:
            self.send(encode(ERROR_FRAME, id, b"duplicate command id"))
            return
        stale = self.stale_reason()
        if stale is not None:
            self.accepting = False
            self.send(encode(STALE, id, stale.encode("utf-8")))
            return
        argv = spec.get("argv")
        if argv is None:
            argv = [str(spec.get("shell") or self.shell), "-c", str(spec.get("script"))]
        if not isinstance(argv, list) or not argv:
            self.send(encode(ERROR_FRAME, id, b"start: expected a non-empty argv or a script"))
            return
        program = str(argv[0])
        try:
            self.spawn(id, [_bytes(str(a)) for a in argv], spec)
        except Refused as exc:
            message = "ah-warm-exec: " + (exc.message or program + ": " + exc.reason) + "\n"
            self.frame(STDERR, id, _bytes(message))
            self.frame(EXITED, id, b'{"code":%d}' % exc.code)
        except (ValueError, TypeError) as exc:  # a NUL byte, a bad variable name...
            self.send(encode(ERROR_FRAME, id, _bytes("start: " + str(exc))))

    def environment(self, spec: "dict[str, object]") -> "tuple[dict[bytes, bytes], list[bytes]]":
        """The command's environment and the PATH directories to search in it (what
        ``os.get_exec_path`` would say)."""
        extra = spec.get("env")
        prepend = spec.get("pathPrepend")
        if not extra and not prepend:
            return self.base_env, self.base_path
        env = dict(self.base_env)
        if isinstance(extra, dict):
            env.update((_bytes(str(k)), _bytes(str(v))) for k, v in extra.items())
        if isinstance(prepend, list) and prepend:
            joined = b":".join(_bytes(str(p)) for p in prepend)
            current = env.get(b"PATH")
            env[b"PATH"] = joined + (b":" + current if current else b"")
        return env, _search_path(env)

    def spawn(self, id: int, argv: "list[bytes]", spec: "dict[str, object]") -> None:
        cwd = spec.get("cwd")
        entered = False
        if cwd is not None:
            cwd = str(cwd)
            if self.home_fd is None:
                # Nowhere to come back to: let Popen's child enter it.
                self.spawn_popen(id, argv, spec, cwd)
                return
            try:
                os.chdir(_bytes(cwd))
            except OSError as exc:
                raise Refused(1, message=f"cd: {cwd}: {exc.strerror or exc}") from None
            entered = True
        try:
            if self.fast_spawn:
                try:
                    self.spawn_fast(id, argv, spec)
                    return
                except NotImplementedError:  # no setsid in this C library's posix_spawn
                    self.fast_spawn = False
            self.spawn_popen(id, argv, spec, None)
        finally:
            if entered:
                self.return_home()

    def return_home(self) -> None:
        try:
            os.fchdir(self.home_fd)  # type: ignore[arg-type]
        except OSError as exc:
            # Every later command would run in the wrong directory: take no more.
            self.accepting = False
            self.retire_reason = f"cannot return to the server's directory: {exc}"

    def pipes(self, wants_stdin: bool) -> "tuple[int, int, int, int, int, int | None]":
        """(child stdin, child stdout, child stderr, our stdout end, our stderr end, our
        stdin end); every descriptor close-on-exec (the spawn dup's the child's to 0-2)."""
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        if wants_stdin:
            in_r, in_w = os.pipe()
            os.set_blocking(in_w, False)
        else:
            in_r, in_w = self.devnull, None
        os.set_blocking(out_r, False)
        os.set_blocking(err_r, False)
        return in_r, out_w, err_w, out_r, err_r, in_w

    def close_child_ends(self, in_r: int, out_w: int, err_w: int) -> None:
        if in_r != self.devnull:
            os.close(in_r)
        os.close(out_w)
        os.close(err_w)

    def close_our_ends(self, out_r: int, err_r: int, in_w: "int | None") -> None:
        for fd in (out_r, err_r, in_w):
            if fd is not None:
                os.close(fd)

    def spawn_fast(self, id: int, argv: "list[bytes]", spec: "dict[str, object]") -> None:
        env, path = self.environment(spec)
        program = argv[0]
        # subprocess's search: a name with a slash as is, else each PATH directory in turn;
        # the first error other than "not there" is the one reported.
        candidates = [program] if b"/" in program else [os.path.join(d, program) for d in path]
        in_r, out_w, err_w, out_r, err_r, in_w = self.pipes(bool(spec.get("stdin")))
        actions = [
            (os.POSIX_SPAWN_DUP2, in_r, 0),
            (os.POSIX_SPAWN_DUP2, out_w, 1),
            (os.POSIX_SPAWN_DUP2, err_w, 2),
        ]
        pid = None
        tried: "dict[bytes, int]" = {}
        try:
            for candidate in candidates:
                # access() first: a miss costs a system call, not a spawn, and no exception
                if not os.access(candidate, os.F_OK):
                    continue
                try:
                    pid = os.posix_spawn(
                        candidate,
                        argv,
                        env,
                        file_actions=actions,
                        setsid=True,
                        setsigdef=_DEFAULT_SIGNALS,
                    )
                    break
                except OSError as exc:
                    tried[candidate] = exc.errno or errno.ENOEXEC
        except BaseException:
            self.close_child_ends(in_r, out_w, err_w)
            self.close_our_ends(out_r, err_r, in_w)
            raise
        self.close_child_ends(in_r, out_w, err_w)
        if pid is None:
            self.close_our_ends(out_r, err_r, in_w)
            raise _exec_error(_search_error(candidates, tried))
        self.track(Command(id, pid, out_r, err_r, in_w))

    def spawn_popen(
        self, id: int, argv: "list[bytes]", spec: "dict[str, object]", cwd: "str | None"
    ) -> None:
        env, _ = self.environment(spec)
        in_r, out_w, err_w, out_r, err_r, in_w = self.pipes(bool(spec.get("stdin")))
        try:
            process = subprocess.Popen(
                argv,
                stdin=in_r,
                stdout=out_w,
                stderr=err_w,
                cwd=None if cwd is None else _bytes(cwd),
                env=env,
                start_new_session=True,
                close_fds=True,
            )
        except OSError as exc:
            self.close_our_ends(out_r, err_r, in_w)
            if cwd is not None and (
                exc.filename in (cwd, _bytes(cwd)) or not os.path.isdir(_bytes(cwd))
            ):
                raise Refused(1, message=f"cd: {cwd}: {exc.strerror or exc}") from None
            raise _exec_error(exc.errno or errno.ENOEXEC) from None
        except BaseException:
            self.close_our_ends(out_r, err_r, in_w)
            raise
        finally:
            self.close_child_ends(in_r, out_w, err_w)
        command = Command(id, process.pid, out_r, err_r, in_w)
        command.popen = process
        self.track(command)

    def track(self, command: Command) -> None:
        self.started += 1
        self.commands[command.id] = command
        self.by_pid[command.pid] = command
        self.poller.add(command.out_fd, False, (command, STDOUT))
        self.poller.add(command.err_fd, False, (command, STDERR))

    def stop(self, id: int, grace: float) -> None:
        command = self.commands.get(id)
        if command is None:
            return
        self.signal_group(command, signal.SIGTERM)
        deadline = time.monotonic() + max(0.0, grace)
        if command.kill_at is None:
            self.stopping += 1
            command.kill_at = deadline
        elif deadline < command.kill_at:
            command.kill_at = deadline

    @staticmethod
    def signal_group(command: Command, signum: int) -> None:
        with contextlib.suppress(OSError):
            os.killpg(command.pid, signum)

    def stdin_data(self, id: int, data: bytes) -> None:
        command = self.commands.get(id)
        if command is None or command.in_fd is None:
            return
        command.stdin_pending += data
        self.flush_stdin(command)

    def stdin_close(self, id: int) -> None:
        command = self.commands.get(id)
        if command is None or command.in_fd is None:
            return
        command.stdin_close = True
        self.flush_stdin(command)

    def flush_stdin(self, command: Command) -> None:
        fd = command.in_fd
        if fd is None:
            return
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
        registered = fd in self.poller
        if command.stdin_pending and not registered:
            self.poller.add(fd, True, command)
        elif not command.stdin_pending and registered:
            self.poller.remove(fd)
        if command.stdin_close and not command.stdin_pending:
            self.close_stdin(command)

    def close_stdin(self, command: Command) -> None:
        fd = command.in_fd
        if fd is None:
            return
        command.in_fd = None
        self.poller.remove(fd)
        with contextlib.suppress(OSError):
            os.close(fd)

    def read_output(self, fd: int, command: Command, kind: int) -> None:
        try:
            data = os.read(fd, _READ_BYTES)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            self.frame(kind, command.id, data)
            return
        self.poller.remove(fd)
        os.close(fd)
        command.open_streams -= 1
        if command.open_streams:
            # Both usually end together (the command exited): see to the other one now
            # rather than after another wait.
            other, other_kind = (
                (command.err_fd, STDERR) if kind == STDOUT else (command.out_fd, STDOUT)
            )
            if readable(other):
                self.read_output(other, command, other_kind)
            return
        if command.status is None:
            # Most likely it has exited: collect it now.
            if not self.collect(command) and self.use_pidfd:
                try:
                    pidfd = os.pidfd_open(command.pid)
                except OSError:  # gone meanwhile (cannot be: it is our unreaped child)
                    self.collect(command)
                else:
                    self.poller.add(pidfd, False, (command, 0))
            return
        self.finish(command)

    def collect(self, command: Command) -> bool:
        """waitpid without waiting; whether it had exited (and is finished if it can be)."""
        try:
            pid, status = os.waitpid(command.pid, os.WNOHANG)
        except ChildProcessError:
            pid, status = command.pid, 255 << 8  # reaped by someone else: status unknown
        if pid != command.pid:
            return False
        del self.by_pid[pid]
        self.exited(command, status)
        return True

    def pidfd_ready(self, pidfd: int, command: Command) -> None:
        if self.collect(command):
            self.poller.remove(pidfd)
            os.close(pidfd)

    def reap(self) -> None:
        """Collect every child that ended (woken by SIGCHLD)."""
        while self.by_pid:  # (none left: no call that can only fail with ECHILD)
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            except InterruptedError:
                continue
            if pid == 0:
                return
            command = self.by_pid.pop(pid, None)
            if command is not None:  # else a child the login shell left us
                self.exited(command, status)

    def exited(self, command: Command, status: int) -> None:
        command.status = status
        if command.popen is not None:
            # So Popen never waits for the pid again (it could be another's by then).
            command.popen.returncode = self.exit_code(status)
        if not command.open_streams:
            self.finish(command)

    @staticmethod
    def exit_code(status: int) -> int:
        if os.WIFSIGNALED(status):
            return -os.WTERMSIG(status)
        if os.WIFEXITED(status):
            return os.WEXITSTATUS(status)
        return -1

    def finish(self, command: Command) -> None:
        del self.commands[command.id]
        self.close_stdin(command)
        if command.kill_at is not None:
            command.kill_at = None
            self.stopping -= 1
        code = self.exit_code(command.status or 0)
        if code < 0:
            self.frame(EXITED, command.id, b'{"signal":%d}' % -code)
        else:
            self.frame(EXITED, command.id, b'{"code":%d}' % code)

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

    def kill_timeout(self) -> "float | None":
        """SIGKILL the groups whose grace is over; seconds until the next one is due."""
        now = time.monotonic()
        timeout = None
        for command in list(self.commands.values()):
            if command.kill_at is not None:
                if command.kill_at <= now:
                    self.signal_group(command, signal.SIGKILL)
                    command.kill_at = None
                    self.stopping -= 1
                else:
                    left = command.kill_at - now
                    timeout = left if timeout is None else min(timeout, left)
        return timeout

    def run(self, leaving_grace: float) -> None:
        self.hello()
        poller = self.poller
        data_of = poller.data
        while not self.leader_gone:
            self.flush()
            if self.leader_gone:
                break
            if not self.accepting and not self.commands:
                return
            timeout = self.kill_timeout() if self.stopping else None
            if self.freshness.may_watch and self.started and not self.commands:
                ready = poller.poll(0)
                if not ready:
                    # The first idle moment: the watch is set up off any command's path.
                    self.freshness.start_watching()
                    continue
            else:
                ready = poller.poll(timeout)
            woken = False
            touched = poller.touched
            for fd in ready:
                if fd in touched:
                    continue  # closed (and maybe reused) while handling an earlier one
                role = data_of.get(fd)
                if role is None:
                    continue
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
                elif role == "wake":
                    woken = True
                elif isinstance(role, tuple):
                    command, kind = role
                    if kind:
                        self.read_output(fd, command, kind)
                    else:
                        self.pidfd_ready(fd, command)
                else:
                    self.flush_stdin(role)  # type: ignore[arg-type]
            if woken:
                with contextlib.suppress(OSError):
                    os.read(self.wake_r, 4096)
                self.reap()
        self.flush()
        self.abandon(leaving_grace)

    def abandon(self, grace: float) -> None:
        """The leader is gone: stop every command still running, then exit."""
        for command in self.commands.values():
            self.signal_group(command, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(
            _group_alive(c.pid) for c in self.commands.values()
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
