"""One persistent, host-key-pinned paramiko Transport per follower, with an asyncio API.

Threads: paramiko's own transport thread reads packets; every blocking paramiko call
(handshake, channel open, exec, reading a channel, sending stdin, closing) runs on this
transport's thread pool; callbacks and results are delivered on the event loop that called
:meth:`SshTransport.run`. Each command is a new ``session`` channel, except commands given
in structured form (``run(..., warm=WarmCommand(...))``), which run on the transport's warm
executor when it is up (``ah_ssh_bridge.warm``: one long-lived server channel, read on the
event loop; it holds one command slot for its life). Concurrency stays within
the server's ``MaxSessions``: ``max_sessions - 2`` slots for commands, one for liveness work
(probe, keepalive) so a probe is never stuck behind long-running commands, and one for
killing stopped commands (never waiting on the slot of the command it kills).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import select
import socket
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal, TypeVar

import msgspec
import paramiko  # type: ignore[import-untyped]
from loguru import logger

from ah_ssh_bridge.channel_send import send_data, send_eof
from ah_ssh_bridge.errors import (
    HostKeyMismatch,
    SshAuthError,
    SshChannelError,
    SshConnectError,
    SshConnectionLost,
    SshError,
    SshKeyFileError,
)
from ah_ssh_bridge.lines import DEFAULT_MAX_LINE_CHARS, LineSplitter
from ah_ssh_bridge.remote import kill_group_script, parse_marker, wrap_command
from ah_ssh_bridge.warm import (
    ServerGone,
    StaleServer,
    WarmCommand,
    WarmServer,
    server_command,
)

__all__ = [
    "DEFAULT_CIPHERS",
    "IDLE_READ_TIMEOUT_S",
    "PROBE_COMMAND",
    "CommandOutput",
    "ExecOutcome",
    "OutputCallback",
    "ProbeResult",
    "SshOptions",
    "SshTransport",
    "StdinData",
    "fingerprint_of_key_blob",
    "normalize_fingerprint",
    "tcp_connect",
]

_T = TypeVar("_T")

DEFAULT_CIPHERS: tuple[str, ...] = (
    "aes128-gcm@openssh.com",
    "aes256-gcm@openssh.com",
    "aes128-ctr",
    "aes192-ctr",
    "aes256-ctr",
)
"""Cipher preference. AES-GCM first: one AEAD pass instead of AES-CTR plus a separate HMAC
(measured in the package README). No CBC or 3DES."""

PROBE_COMMAND = "uname -a && id -u"

# How often blocked worker threads re-check for a stop request or a dead transport. Every
# wake-up that matters (data, EOF, channel closed) arrives through the channel's pipe at once;
# this is only the safety net.
_POLL_S = 0.5
_RECV_BYTES = 65536
_SEND_BYTES = 32768
# Channel-open retries after "no more sessions" (SSH2_OPEN_CONNECT_FAILED from sshd).
_OPEN_CONNECT_FAILED = 2
_OPEN_RETRY_FIRST_S = 0.005
_OPEN_RETRY_MAX_S = 0.2
# How long to wait for the server's own channel close after the exit status; sshd sends it
# right away once the command's pipes are drained.
_SERVER_CLOSE_WAIT_S = 1.0
# After a channel closes without an exit status, how long to let the transport thread notice
# a dead connection before concluding the command really ended without a status (a signal).
_LOSS_SETTLE_S = 0.2
# paramiko's transport thread reads the socket with a 0.1 s timeout, only to look at its own
# "closed" flag: ten wake-ups a second per idle connection (a leader agent holding 16
# followers spent ~12 ms of CPU a second doing nothing, 200 followers would be ~15 % of a
# core, and each wake-up takes the interpreter lock from whoever works). Once logged in the
# timeout is this instead; close() shuts the socket's reading side down first, which wakes
# the thread at once, so closing does not wait for it. (Liveness is our keepalive's job,
# not paramiko's.)
IDLE_READ_TIMEOUT_S = 5.0

StdinData = bytes | bytearray | memoryview | Iterable[bytes]
OutputCallback = Callable[[str], None]
StopReason = Literal["timeout", "cancel", "callback"]


class SshOptions(msgspec.Struct, frozen=True, kw_only=True):
    """Tuning of one transport; the defaults suit a fleet on a LAN or behind an access point."""

    connect_timeout_s: float = 10.0
    """TCP connect, banner, key exchange, authentication, and each channel open."""
    keepalive_interval_s: float = 15.0
    """Seconds between liveness pings (a channel open the server must answer); 0 disables."""
    keepalive_timeout_s: float = 30.0
    """A ping unanswered for this long declares the connection lost."""
    liveness_quiet_s: float = 1.0
    """A command still running this long after it started, with no sign of life from the
    server since (a command ending, a ping answered), starts a liveness check: a ping that
    must be answered within ``min(connect_timeout_s, keepalive_timeout_s)``. A follower that
    dropped off the network just before or during a command is then found within that, not
    within the keepalive's interval plus its timeout (45 s by default). Commands that end
    sooner (most) cost no ping. ``keepalive_interval_s=0`` turns these checks off too."""
    max_sessions: int = 10
    """The server's ``MaxSessions`` (OpenSSH default 10): channels open at once, at most."""
    ciphers: tuple[str, ...] = DEFAULT_CIPHERS
    """Cipher preference order; empty keeps paramiko's own order."""
    kill_grace_s: float = 2.0
    """After SIGTERM to a stopped command's process group, SIGKILL follows this much later."""
    process_control: bool = True
    """Wrap commands for a POSIX login shell so timeouts and cancellation can kill the remote
    process group. Turn off for non-POSIX followers (then stopping a command only closes its
    channel, and ``env`` is sent as SSH ``env`` requests, which sshd may refuse)."""
    max_line_chars: int = DEFAULT_MAX_LINE_CHARS
    warm_exec: bool = True
    """Run commands given in structured form (``run(..., warm=...)``) through the warm
    executor (``ah_ssh_bridge.warm``): one long-lived server per transport instead of one
    channel and one login shell per command. Falls back to exec channels if the server
    cannot start (no ``python3``, not POSIX)."""

    def __post_init__(self) -> None:
        if self.connect_timeout_s <= 0 or self.keepalive_timeout_s <= 0:
            raise ValueError(
                f"connect_timeout_s ({self.connect_timeout_s}) and keepalive_timeout_s "
                f"({self.keepalive_timeout_s}) must be positive"
            )
        if self.liveness_quiet_s < 0:
            raise ValueError(f"liveness_quiet_s must be >= 0, got {self.liveness_quiet_s}")
        if self.keepalive_interval_s < 0:
            raise ValueError(
                f"keepalive_interval_s must be >= 0 (0 disables), got {self.keepalive_interval_s}"
            )
        if self.max_sessions < 3:
            raise ValueError(
                f"max_sessions must be >= 3 (one slot each is kept for probes and for "
                f"killing stopped commands), got {self.max_sessions}"
            )
        if self.kill_grace_s < 0:
            raise ValueError(f"kill_grace_s must be >= 0, got {self.kill_grace_s}")
        unknown = [c for c in self.ciphers if c not in paramiko.Transport._cipher_info]
        if unknown:
            known = ", ".join(sorted(paramiko.Transport._cipher_info))
            raise ValueError(f"unknown cipher(s) {', '.join(unknown)}; paramiko knows: {known}")


class ExecOutcome(msgspec.Struct, frozen=True):
    """How one command ended. ``exit_code`` is None when it was stopped (timeout, cancel) or
    ended without an exit status (killed by a signal)."""

    exit_code: int | None
    timed_out: bool
    cancelled: bool
    took_ms: float

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.timed_out and not self.cancelled


class CommandOutput(msgspec.Struct, frozen=True):
    """A command's outcome with its whole output, line by line."""

    outcome: ExecOutcome
    stdout: list[str]
    stderr: list[str]


class ProbeResult(msgspec.Struct, frozen=True):
    """Result of the liveness probe (``uname -a && id -u``)."""

    ok: bool
    rtt_ms: float | None
    """Wall time of the whole probe (channel open, exec, exit status)."""
    uname: str | None
    uid: int | None
    error: str | None


def fingerprint_of_key_blob(blob: bytes) -> str:
    """``SHA256:<base64>`` without padding, exactly as ``ssh-keygen -l`` prints it."""
    digest = base64.b64encode(hashlib.sha256(blob).digest()).decode("ascii").rstrip("=")
    return f"SHA256:{digest}"


def normalize_fingerprint(text: str) -> str:
    """Check an OpenSSH SHA256 fingerprint and drop base64 padding."""
    value = text.strip()
    body = value.removeprefix("SHA256:")
    if body == value or not body:
        raise ValueError(
            f"host key fingerprint {text!r} is not an OpenSSH SHA256 fingerprint "
            "(expected SHA256:<base64>, as printed by ssh-keygen -l)"
        )
    try:
        raw = base64.b64decode(body + "=" * (-len(body) % 4), validate=True)
    except ValueError:
        raise ValueError(f"host key fingerprint {text!r}: {body!r} is not valid base64") from None
    if len(raw) != hashlib.sha256().digest_size:
        raise ValueError(
            f"host key fingerprint {text!r}: decodes to {len(raw)} bytes, a SHA256 has 32"
        )
    return "SHA256:" + body.rstrip("=")


def _load_private_key(host: str, key_path: Path, passphrase: str | None) -> Any:
    try:
        return paramiko.PKey.from_path(key_path, passphrase)
    except FileNotFoundError:
        raise SshKeyFileError(host, f"SSH private key {key_path} does not exist") from None
    except PermissionError:
        raise SshKeyFileError(host, f"SSH private key {key_path} is not readable") from None
    except paramiko.PasswordRequiredException:
        raise SshKeyFileError(
            host, f"SSH private key {key_path} is encrypted and no passphrase was given"
        ) from None
    except (paramiko.SSHException, ValueError, TypeError) as exc:
        raise SshKeyFileError(
            host,
            f"cannot load SSH private key {key_path}: {exc} "
            "(expected an OpenSSH or PEM ed25519, ecdsa or rsa key)",
        ) from None


class _Transport(paramiko.Transport):  # type: ignore[misc]
    """paramiko's Transport, keeping what the server said when it disconnected.

    paramiko only logs the SSH_MSG_DISCONNECT reason; without it a lost connection reads
    "connection closed" where sshd said exactly why ("data packet referred to nonexistent
    channel 2").
    """

    server_disconnect: str | None = None

    def _parse_disconnect(self, m: Any) -> None:
        code = m.get_int()
        description = m.get_text()
        self.server_disconnect = f"the server disconnected (code {code}): {description}"
        self._log(paramiko.common.INFO, self.server_disconnect)


def _close_channel(channel: Any) -> None:
    """Close ``channel``; on a connection that died under the close, quietly: whatever is
    being raised or returned already says so, and a CLOSE cannot matter to a gone server."""
    with contextlib.suppress(OSError, EOFError, paramiko.SSHException):
        channel.close()


def _describe(exc: BaseException) -> str:
    text = str(exc)
    if isinstance(exc, EOFError) or not text:
        return "connection closed by the peer" if isinstance(exc, EOFError) else type(exc).__name__
    return text


class _Job:
    """State of one command, shared between the event loop and its worker thread."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        *,
        text: str,
        nonce: str | None,
        env_requests: Mapping[str, str] | None,
        on_stdout: OutputCallback | None,
        on_stderr: OutputCallback | None,
        stdin: StdinData | None,
        max_line_chars: int,
    ) -> None:
        self.loop = loop
        self.text = text
        self.nonce = nonce
        self.env_requests = env_requests
        self.on_stdout = on_stdout
        self.on_stderr = on_stderr
        self.stdin = stdin
        self.stdout_lines = LineSplitter(max_line_chars)
        self.stderr_lines = LineSplitter(max_line_chars)
        self.lock = threading.Lock()
        self.channel: Any = None
        self.exec_started = False
        self.stopping = False
        self.pgid: int | None = None
        self.pgid_seen = asyncio.Event()
        self.callback_error: BaseException | None = None
        self.on_callback_error: Callable[[], None] | None = None
        """Wakes whoever waits for the job (set while :meth:`SshTransport._wait_job` runs)."""
        self._loop_thread = threading.get_ident()

    # -- worker thread side --

    def attach(self, channel: Any) -> bool:
        """Remember the channel; False if a stop was requested before it opened."""
        with self.lock:
            if self.stopping:
                return False
            self.channel = channel
            self.exec_started = True
            return True

    def emit_stdout(self, lines: list[str]) -> None:
        if self.nonce is not None and self.pgid is None and lines:
            for index, line in enumerate(lines):
                pgid = parse_marker(line, self.nonce)
                if pgid is not None:
                    self.pgid = pgid
                    self._call(self.pgid_seen.set)
                    lines = lines[:index] + lines[index + 1 :]
                    break
        self._emit(self.on_stdout, lines)

    def emit_stderr(self, lines: list[str]) -> None:
        self._emit(self.on_stderr, lines)

    def _emit(self, callback: OutputCallback | None, lines: list[str]) -> None:
        if lines and callback is not None:
            self._call(self._deliver, callback, lines)

    def _call(self, fn: Callable[..., object], *args: object) -> None:
        try:
            if threading.get_ident() == self._loop_thread:
                # The warm executor's reader runs on the loop: no need to wake it up.
                self.loop.call_soon(fn, *args)
            else:
                self.loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            self.stopping = True

    # -- event loop side --

    def _deliver(self, callback: OutputCallback, lines: list[str]) -> None:
        if self.callback_error is not None:
            return
        for line in lines:
            try:
                callback(line)
            except Exception as exc:
                self.callback_error = exc
                if self.on_callback_error is not None:
                    self.on_callback_error()
                return

    def request_stop(self) -> None:
        with self.lock:
            self.stopping = True

    def close_channel(self) -> None:
        with self.lock:
            self.stopping = True
            channel = self.channel
        if channel is not None:
            _close_channel(channel)  # a connection that died meanwhile: the worker reports it


class SshTransport:
    """An authenticated SSH connection to one follower; every command gets a new channel.

    Create with :meth:`open` (over a socket the caller connected: TCP, TLS tunnel, ...) or
    :meth:`connect` (TCP to ``address:port``). Close with :meth:`close` or ``async with``.
    """

    def __init__(
        self,
        host: str,
        transport: Any,
        *,
        options: SshOptions,
        executor: ThreadPoolExecutor,
        host_key_fingerprint: str,
        username: str,
    ) -> None:
        # Use open()/connect(); this only wires up an already authenticated transport.
        self.host = host
        self.options = options
        self.username = username
        self.host_key_fingerprint = host_key_fingerprint
        self._transport = transport
        self._executor = executor
        self._command_slots = asyncio.Semaphore(options.max_sessions - 2)
        self._control_slot = asyncio.Semaphore(1)
        self._kill_slot = asyncio.Semaphore(1)
        self._background: set[asyncio.Future[Any]] = set()
        self._closed = False
        self._lost_reason: str | None = None
        self._channels_lock = threading.Lock()
        self._open_channels = 0
        self._peak_channels = 0
        self._keepalive: asyncio.Task[None] | None = None
        self._alive_at = time.monotonic()
        """When the server last showed it is there (login, a command's end, a ping)."""
        self._liveness: asyncio.Task[bool] | None = None
        self._warm: WarmServer | None = None
        self._warm_start: asyncio.Future[WarmServer | None] | None = None
        self._warm_disabled: str | None = None
        if options.keepalive_interval_s > 0:
            self._keepalive = asyncio.get_running_loop().create_task(
                self._keepalive_loop(), name=f"ssh-keepalive-{host}"
            )

    # ------------------------------------------------------------------ opening

    @classmethod
    async def open(
        cls,
        sock: socket.socket,
        *,
        host: str,
        username: str,
        key_path: str | Path,
        expected_fingerprint: str,
        passphrase: str | None = None,
        options: SshOptions | None = None,
    ) -> SshTransport:
        """Run SSH over ``sock`` (already connected: TCP, TLS, a CONNECT tunnel; any
        ``socket.socket``), verify the host key against ``expected_fingerprint`` and log in
        as ``username`` with the private key at ``key_path``. Only public-key authentication
        is ever attempted. ``host`` names the follower in errors and logs.

        Takes ownership of ``sock`` (it is closed on failure and by :meth:`close`).

        Raises:
            HostKeyMismatch, SshAuthError (SshKeyFileError), SshConnectError.
        """
        opts = options or SshOptions()
        expected = normalize_fingerprint(expected_fingerprint)
        executor = ThreadPoolExecutor(
            max_workers=2 * opts.max_sessions + 4, thread_name_prefix=f"ssh-{host}"
        )
        loop = asyncio.get_running_loop()
        handshake = loop.run_in_executor(
            executor,
            _handshake,
            sock,
            host,
            username,
            Path(key_path),
            passphrase,
            expected,
            opts,
        )
        try:
            transport = await asyncio.shield(handshake)
        except BaseException:
            # On cancellation the handshake thread still finishes; close what it produced.
            handshake.add_done_callback(_close_transport_result)
            executor.shutdown(wait=False)
            with contextlib.suppress(OSError):
                sock.close()
            raise
        logger.debug(
            "ssh {}: connected as {} (cipher {}, host key {})",
            host,
            username,
            transport.local_cipher,
            expected,
        )
        return cls(
            host,
            transport,
            options=opts,
            executor=executor,
            host_key_fingerprint=expected,
            username=username,
        )

    @classmethod
    async def connect(
        cls,
        address: str,
        port: int,
        *,
        host: str | None = None,
        username: str,
        key_path: str | Path,
        expected_fingerprint: str,
        passphrase: str | None = None,
        options: SshOptions | None = None,
    ) -> SshTransport:
        """TCP-connect to ``address:port`` and :meth:`open` over it."""
        opts = options or SshOptions()
        name = host or f"{address}:{port}"
        sock = await asyncio.get_running_loop().run_in_executor(
            None, tcp_connect, name, address, port, opts.connect_timeout_s
        )
        return await cls.open(
            sock,
            host=name,
            username=username,
            key_path=key_path,
            expected_fingerprint=expected_fingerprint,
            passphrase=passphrase,
            options=opts,
        )

    # ------------------------------------------------------------------ state

    @property
    def is_active(self) -> bool:
        """True while the connection is up and not closed."""
        return not self._closed and self._lost_reason is None and bool(self._transport.is_active())

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called (a lost connection is not "closed")."""
        return self._closed

    @property
    def cipher(self) -> str:
        """The negotiated cipher (client to server)."""
        return str(self._transport.local_cipher)

    @property
    def server_version(self) -> str:
        return str(self._transport.remote_version)

    @property
    def host_public_key(self) -> str:
        """The server's host key as an OpenSSH public-key line (``ssh-ed25519 AAAA...``).

        It is the key the handshake verified against ``host_key_fingerprint``, so it may be
        written to a ``known_hosts`` file for OpenSSH clients (rsync, mutagen) that must
        reach the same server."""
        key = self._transport.get_remote_server_key()
        return f"{key.get_name()} {key.get_base64()}"

    @property
    def auth_method(self) -> str:
        """How this transport authenticated: always ``publickey``."""
        return "publickey"

    @property
    def open_channels(self) -> int:
        """Channels this client has open right now (commands, probes, kills, sftp)."""
        return self._open_channels

    @property
    def warm_server_pid(self) -> int | None:
        """The warm executor's process id on the follower while one is up (else None)."""
        server = self._warm
        return server.pid if server is not None and server.usable else None

    @property
    def warm_disabled_reason(self) -> str | None:
        """Why this transport runs structured commands on exec channels (None: it does not)."""
        return self._warm_disabled

    @property
    def peak_channels(self) -> int:
        """The most channels that were open at once; never above ``options.max_sessions``."""
        return self._peak_channels

    def _open_session(self, timeout: float) -> Any:
        """Blocking: open a session channel, counted until :meth:`_release_channel`.

        sshd frees a session slot only in the main-loop pass after both sides closed its
        channel, so an open sent right behind a close can still meet "no more sessions"
        (open failure code 2) although we never exceed MaxSessions: retry that briefly.
        """
        deadline = time.monotonic() + timeout
        delay = _OPEN_RETRY_FIRST_S
        while True:
            try:
                channel = self._transport.open_session(
                    timeout=max(0.1, deadline - time.monotonic())
                )
                break
            except paramiko.SSHException as exc:
                if not _may_be_session_limit(exc) or time.monotonic() + delay >= deadline:
                    raise
                if self._transport_dead():
                    raise
                time.sleep(delay)
                delay = min(delay * 2, _OPEN_RETRY_MAX_S)
        with self._channels_lock:
            self._open_channels += 1
            self._peak_channels = max(self._peak_channels, self._open_channels)
        return channel

    def _release_channel(self, channel: Any) -> None:
        try:
            _close_channel(channel)
        finally:
            with self._channels_lock:
                self._open_channels -= 1

    def _lost_error(self) -> SshConnectionLost:
        if self._lost_reason is not None:
            reason = self._lost_reason
        else:
            # paramiko also parks channel-open failures there; only a transport error counts.
            saved = getattr(self._transport, "saved_exception", None)
            disconnect = getattr(self._transport, "server_disconnect", None)
            if disconnect is not None:
                reason = disconnect
            elif saved is None or isinstance(saved, paramiko.ChannelException):
                reason = "connection closed"
            else:
                reason = _describe(saved)
        return SshConnectionLost(self.host, f"SSH connection to {self.host} lost: {reason}")

    def _transport_dead(self) -> bool:
        return self._lost_reason is not None or not self._transport.is_active()

    def _check_usable(self) -> None:
        if self._closed and self._lost_reason is None:
            raise SshConnectionLost(self.host, f"SSH transport to {self.host} is closed")
        if self._transport_dead():
            raise self._lost_error()

    async def _in_thread(self, fn: Callable[..., _T], *args: Any) -> _T:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, fn, *args)
        except RuntimeError as exc:
            if "shutdown" in str(exc):
                raise SshConnectionLost(
                    self.host, f"SSH transport to {self.host} is closed"
                ) from None
            raise

    # ------------------------------------------------------------------ commands

    async def run(
        self,
        command: str,
        *,
        on_stdout: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
        timeout: float | None = None,
        env: Mapping[str, str] | None = None,
        stdin: StdinData | None = None,
        cancel: asyncio.Event | None = None,
        warm: WarmCommand | None = None,
    ) -> ExecOutcome:
        """Run ``command`` on a new channel; stream its output line by line.

        With ``warm`` (the same command in structured form, see :class:`WarmCommand`) the
        command runs on this transport's warm executor instead, when it is up (started on
        first use); ``command`` is then only the fallback. Outcomes, callbacks, timeouts,
        cancellation and errors are the same either way.

        Callbacks run on the event loop, in order per stream, with lines decoded as UTF-8
        (invalid bytes replaced) and without terminators; a final unterminated line is
        delivered at EOF. ``timeout`` counts from the moment a channel slot is free (commands
        beyond the session limit queue). On timeout, when ``cancel`` is set, or when this
        coroutine is cancelled, the remote process group gets SIGTERM (then SIGKILL after
        ``kill_grace_s``) before the channel closes; asyncio cancellation is re-raised after
        that, the other two return an outcome with ``timed_out``/``cancelled`` set.
        ``stdin`` (bytes or an iterable of byte chunks) is sent then closed; without it the
        command sees an empty stdin. A callback that raises stops the command and the error
        is re-raised here.

        Raises:
            SshConnectionLost: the connection died before or while the command ran.
            SshChannelError: the server refused the channel or the command.
        """
        return await self._run(
            command,
            on_stdout=on_stdout,
            on_stderr=on_stderr,
            timeout=timeout,
            env=env,
            stdin=stdin,
            cancel=cancel,
            control=False,
            warm=warm,
        )

    async def capture(
        self,
        command: str,
        *,
        timeout: float | None = None,
        env: Mapping[str, str] | None = None,
        stdin: StdinData | None = None,
    ) -> CommandOutput:
        """:meth:`run` collecting the output lines in lists."""
        out: list[str] = []
        err: list[str] = []
        outcome = await self.run(
            command,
            on_stdout=out.append,
            on_stderr=err.append,
            timeout=timeout,
            env=env,
            stdin=stdin,
        )
        return CommandOutput(outcome, out, err)

    async def probe(self, timeout: float = 1.0) -> ProbeResult:
        """Liveness probe: ``uname -a && id -u`` with a short timeout. Never raises."""
        out: list[str] = []
        err: list[str] = []
        started = time.monotonic()
        attempt = asyncio.ensure_future(
            self._run(
                PROBE_COMMAND,
                on_stdout=out.append,
                on_stderr=err.append,
                timeout=None,
                env=None,
                stdin=None,
                cancel=None,
                control=True,
            )
        )
        # The deadline covers everything, waiting for the slot and opening the channel
        # included, and the answer comes at the deadline: stopping the probe (kill, close)
        # carries on in the background.
        done, _ = await asyncio.wait({attempt}, timeout=timeout)
        if not done:
            attempt.cancel()
            self._background.add(attempt)
            attempt.add_done_callback(self._forget_background)
            return ProbeResult(
                False, None, None, None, f"probe of {self.host} timed out after {timeout}s"
            )
        try:
            outcome = attempt.result()
        except SshError as exc:
            return ProbeResult(False, None, None, None, str(exc))
        rtt_ms = (time.monotonic() - started) * 1000.0
        if outcome.exit_code != 0:
            detail = "; ".join(err[-3:]) or "no stderr"
            return ProbeResult(
                False,
                rtt_ms,
                None,
                None,
                f"probe of {self.host} exited with status {outcome.exit_code}: {detail}",
            )
        lines = [line for line in out if line.strip()]
        if len(lines) < 2 or not lines[-1].strip().isdigit():
            return ProbeResult(
                False,
                rtt_ms,
                None,
                None,
                f"probe of {self.host}: unexpected output {out!r} "
                "(expected the uname -a line, then the numeric uid)",
            )
        return ProbeResult(True, rtt_ms, lines[-2].strip(), int(lines[-1].strip()), None)

    def _forget_background(self, task: asyncio.Future[Any]) -> None:
        self._background.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved; a stopped probe's error is of no interest

    async def _run(
        self,
        command: str,
        *,
        on_stdout: OutputCallback | None,
        on_stderr: OutputCallback | None,
        timeout: float | None,
        env: Mapping[str, str] | None,
        stdin: StdinData | None,
        cancel: asyncio.Event | None,
        control: bool,
        warm: WarmCommand | None = None,
    ) -> ExecOutcome:
        if timeout is not None and timeout <= 0:
            raise ValueError(f"timeout must be positive or None, got {timeout}")
        self._check_usable()
        if self._keepalive is not None:
            asyncio.get_running_loop().call_later(
                self.options.liveness_quiet_s, self._liveness_due, time.monotonic()
            )
        if warm is not None and self.options.warm_exec and self.options.process_control:
            for _attempt in range(3):
                server = await self._warm_server(warm.shell)
                if server is None:
                    break
                try:
                    return await self._run_warm(
                        server,
                        warm,
                        on_stdout=on_stdout,
                        on_stderr=on_stderr,
                        timeout=timeout,
                        env=env,
                        stdin=stdin,
                        cancel=cancel,
                    )
                except (StaleServer, ServerGone) as exc:
                    # Not started: a fresh server (new login environment) takes it.
                    logger.debug("ssh {}: warm executor retired ({}); restarting", self.host, exc)
                    self._retire_warm(server)
                    self._check_usable()
        if self.options.process_control:
            wrapped = wrap_command(command, env=env)
            text, nonce, env_requests = wrapped.text, wrapped.nonce, None
        else:
            text, nonce, env_requests = command, None, env
        loop = asyncio.get_running_loop()
        job = _Job(
            loop,
            text=text,
            nonce=nonce,
            env_requests=env_requests,
            on_stdout=on_stdout,
            on_stderr=on_stderr,
            stdin=stdin,
            max_line_chars=self.options.max_line_chars,
        )
        slots = self._control_slot if control else self._command_slots
        await slots.acquire()
        try:
            self._check_usable()
            started = time.monotonic()
            worker = loop.run_in_executor(self._executor, self._exec_blocking, job)
        except BaseException:
            slots.release()
            raise

        def finished(future: asyncio.Future[int | None]) -> None:
            # The slot frees only when the channel is really gone, so a command stopped
            # early never lets one channel too many open.
            slots.release()
            if not future.cancelled():
                future.exception()  # retrieved: no "never retrieved" noise when stopped

        worker.add_done_callback(finished)
        return await self._outcome(
            worker, job, timeout, cancel, started, lambda: self._stop_job(job, worker)
        )

    async def _outcome(
        self,
        worker: asyncio.Future[int | None],
        job: _Job,
        timeout: float | None,
        cancel: asyncio.Event | None,
        started: float,
        stop: Callable[[], Awaitable[None]],
    ) -> ExecOutcome:
        """Wait for a started command (exec channel or warm server alike); ``stop`` ends it
        when it timed out, was cancelled, or this task is."""
        try:
            reason = await self._wait_job(worker, job, timeout, cancel)
        except asyncio.CancelledError:
            stopper = asyncio.ensure_future(stop())
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(stopper)
            raise
        if reason is not None:
            await stop()
        took_ms = (time.monotonic() - started) * 1000.0
        if job.callback_error is not None:
            raise job.callback_error
        if reason is None:
            exit_code = worker.result()
            self._alive_at = time.monotonic()
            return ExecOutcome(exit_code, False, False, took_ms)
        failure = worker.exception() if worker.done() and not worker.cancelled() else None
        if isinstance(failure, SshConnectionLost):
            raise failure
        return ExecOutcome(None, reason == "timeout", reason == "cancel", took_ms)

    @staticmethod
    async def _wait_job(
        worker: asyncio.Future[int | None],
        job: _Job,
        timeout: float | None,
        cancel: asyncio.Event | None,
    ) -> StopReason | None:
        # One future woken by whichever comes first (the job's end, a failed callback, the
        # cancel event, the timeout): no task per job for the rare cases.
        def ended() -> tuple[bool, StopReason | None]:
            """(decided, why it stopped: None when the job itself ended)."""
            if worker.done():
                return True, None
            if job.callback_error is not None:
                return True, "callback"
            if cancel is not None and cancel.is_set():
                return True, "cancel"
            return False, None

        decided, reason = ended()
        if decided:
            return reason
        loop = asyncio.get_running_loop()
        woken: asyncio.Future[None] = loop.create_future()

        def wake(_: object = None) -> None:
            if not woken.done():
                woken.set_result(None)

        worker.add_done_callback(wake)
        job.on_callback_error = wake
        cancelled = None
        if cancel is not None:
            cancelled = asyncio.ensure_future(cancel.wait())
            cancelled.add_done_callback(wake)
        timer = loop.call_later(timeout, wake) if timeout is not None else None
        try:
            await woken
        finally:
            worker.remove_done_callback(wake)
            job.on_callback_error = None
            if cancelled is not None:
                cancelled.cancel()
            if timer is not None:
                timer.cancel()
        decided, reason = ended()
        return reason if decided else "timeout"

    async def _stop_job(self, job: _Job, worker: asyncio.Future[int | None]) -> None:
        """Kill the command's remote process group, then make sure its channel is closed."""
        job.request_stop()
        if worker.done():
            return
        grace = self.options.kill_grace_s
        if job.nonce is not None and job.exec_started and job.pgid is None:
            # The marker is the first thing the command prints; give it a moment to arrive.
            seen: asyncio.Future[Any] = asyncio.ensure_future(job.pgid_seen.wait())
            waiters: set[asyncio.Future[Any]] = {seen, worker}
            try:
                await asyncio.wait(
                    waiters, timeout=max(grace, 1.0), return_when=asyncio.FIRST_COMPLETED
                )
            finally:
                seen.cancel()
        if job.pgid is not None and not worker.done():
            try:
                async with self._kill_slot:
                    await self._in_thread(self._kill_group_blocking, job.pgid)
            except SshError as exc:
                logger.warning(
                    "ssh {}: could not kill process group {}: {}", self.host, job.pgid, exc
                )
            else:
                # SIGTERM is out (SIGKILL follows after the grace period): the channel ends
                # by itself once the last process holding its pipes is gone.
                await asyncio.wait({worker}, timeout=grace + self.options.connect_timeout_s)
        if not worker.done():
            with contextlib.suppress(SshError):
                await self._in_thread(job.close_channel)
            await asyncio.wait({worker}, timeout=self.options.connect_timeout_s)

    # ------------------------------------------------------------------ warm executor

    async def _warm_server(self, shell: str) -> WarmServer | None:
        """The running warm server, started on first use; None when it cannot run here."""
        if self._warm_disabled is not None:
            return None
        if self.options.max_sessions < 4:
            # The server holds a command slot for good; with one slot only, sftp and exec
            # commands would wait for it forever.
            self._disable_warm(
                f"max_sessions {self.options.max_sessions} leaves no command slot beside it"
            )
            return None
        server = self._warm
        if server is not None and server.usable:
            return server
        if self._warm_start is None:
            self._warm_start = asyncio.ensure_future(self._start_warm(shell))
        starting = self._warm_start
        result = await asyncio.shield(starting)
        if self._warm_start is starting:
            self._warm_start = None
        # A server that ended right after its greeting: this command takes an exec channel.
        return result if result is not None and result.usable else None

    async def _start_warm(self, shell: str) -> WarmServer | None:
        # The server's channel holds one command slot for its whole life.
        await self._command_slots.acquire()
        loop = asyncio.get_running_loop()
        try:
            channel = await self._in_thread(self._open_session, self.options.connect_timeout_s)
        except Exception as exc:
            self._command_slots.release()
            if self._transport_dead():
                return None  # the command itself reports the lost connection
            self._disable_warm(f"could not open its channel: {_describe(exc)}")
            return None
        server = WarmServer(
            self.host,
            channel,
            loop=loop,
            transport_dead=self._transport_dead,
            lost_error=self._lost_error,
            on_end=self._warm_ended,
        )
        text = server_command(shell, grace_s=self.options.kill_grace_s)
        try:
            await self._in_thread(self._start_warm_blocking, server, text)
            await server.start(max(self.options.connect_timeout_s, 10.0))
        except Exception as exc:
            if not server.reader_started:
                # Otherwise the reader's end (_warm_ended) frees the channel and the slot.
                with contextlib.suppress(Exception):
                    await self._in_thread(self._release_channel, channel)
                self._command_slots.release()
            if self._transport_dead():
                return None
            self._disable_warm(str(exc))
            return None
        self._warm = server
        logger.debug(
            "ssh {}: warm executor up (pid {}, python {})",
            self.host,
            server.pid,
            (server.hello or {}).get("python"),
        )
        return server

    def _start_warm_blocking(self, server: WarmServer, text: str) -> None:
        try:
            server.channel.fileno()  # creates the pipe the loop watches
            server.channel.exec_command(text)
        except Exception as exc:
            raise self._channel_failure(exc, "start the warm executor") from None

    def _disable_warm(self, reason: str) -> None:
        if self._warm_disabled is None:
            self._warm_disabled = reason
            logger.warning(
                "ssh {}: warm executor unavailable, commands use one exec channel each "
                "(slower, same results): {}",
                self.host,
                reason,
            )

    def _warm_ended(self, server: WarmServer) -> None:
        """On the loop, once the server's channel ended: free its channel and slot."""
        if self._warm is server:
            self._warm = None
        with self._channels_lock:
            self._open_channels -= 1
        self._command_slots.release()
        if server.hello is not None:
            logger.debug("ssh {}: warm executor ended: {}", self.host, server.end_reason)

    def _retire_warm(self, server: WarmServer) -> None:
        server.retiring = True
        if self._warm is server:
            self._warm = None

    async def _run_warm(
        self,
        server: WarmServer,
        warm: WarmCommand,
        *,
        on_stdout: OutputCallback | None,
        on_stderr: OutputCallback | None,
        timeout: float | None,
        env: Mapping[str, str] | None,
        stdin: StdinData | None,
        cancel: asyncio.Event | None,
    ) -> ExecOutcome:
        loop = asyncio.get_running_loop()
        job = _Job(
            loop,
            text="",
            nonce=None,
            env_requests=None,
            on_stdout=on_stdout,
            on_stderr=on_stderr,
            stdin=None,
            max_line_chars=self.options.max_line_chars,
        )
        chunks: list[bytes] | None = None
        if stdin is not None:
            chunks = (
                [bytes(stdin)]
                if isinstance(stdin, bytes | bytearray | memoryview)
                else [bytes(c) for c in stdin]
            )
        spec = warm.start_payload(env, stdin=chunks is not None)
        done: asyncio.Future[int | None] = loop.create_future()
        started = time.monotonic()
        if chunks is None:
            # One small frame: written from the loop itself (no thread hop; paramiko blocks
            # only when the server's window is full, which a command server never lets
            # happen for long: it reads its stdin all the time).
            command_id = server.submit_blocking(job, done, spec, None)
        else:
            command_id = await self._in_thread(server.submit_blocking, job, done, spec, chunks)
        return await self._outcome(
            done, job, timeout, cancel, started,
            lambda: self._stop_warm(server, command_id, job, done),
        )  # fmt: skip

    async def _stop_warm(
        self,
        server: WarmServer,
        command_id: int,
        job: _Job,
        done: asyncio.Future[int | None],
    ) -> None:
        """SIGTERM the command's process group (SIGKILL after the grace) and wait its end."""
        job.request_stop()
        if done.done():
            return
        grace = self.options.kill_grace_s
        with contextlib.suppress(SshError):
            await self._in_thread(server.stop_blocking, command_id, grace)
        await asyncio.wait({done}, timeout=grace + self.options.connect_timeout_s)
        if not done.done():
            server.forget(command_id)
            done.cancel()
        elif not done.cancelled():
            done.exception()  # retrieved

    # -- blocking parts (run in the executor) --

    def _channel_failure(self, exc: BaseException, doing: str) -> SshError:
        if self._transport_dead() or isinstance(exc, EOFError | OSError):
            return self._lost_error()
        if isinstance(exc, paramiko.ChannelException):
            return SshChannelError(
                self.host,
                f"{self.host} refused to {doing}: {exc} (more than the server's MaxSessions "
                f"channels open? this transport allows {self.options.max_sessions})",
            )
        return SshChannelError(self.host, f"could not {doing} on {self.host}: {_describe(exc)}")

    def _exec_blocking(self, job: _Job) -> int | None:
        transport = self._transport
        try:
            channel = self._open_session(self.options.connect_timeout_s)
        except Exception as exc:
            if job.stopping:
                return None
            raise self._channel_failure(exc, "open a session channel") from None
        if not job.attach(channel):
            self._release_channel(channel)
            return None
        try:
            channel.fileno()  # creates the pipe that select() waits on
            try:
                for name, value in (job.env_requests or {}).items():
                    channel.set_environment_variable(name, value)
                channel.exec_command(job.text)
            except Exception as exc:
                if job.stopping:
                    return None
                raise self._channel_failure(exc, "start a command") from None
            if job.stdin is None:
                send_eof(channel)
            else:
                try:
                    self._executor.submit(self._send_stdin, channel, job)
                except RuntimeError:  # the executor is shut down: we are closing
                    raise self._lost_error() from None
            self._pump(channel, job)
            while not channel.status_event.wait(_POLL_S):
                if job.stopping or self._transport_dead():
                    break
            if channel.status_event.is_set() and channel.exit_status >= 0:
                _wait_server_close(channel, _SERVER_CLOSE_WAIT_S)
                return int(channel.exit_status)
            if job.stopping:
                return None
            # Closed without an exit status: either the connection died (the transport
            # thread unlinks every channel just before it marks itself inactive) or the
            # command was killed by a signal (paramiko ignores ``exit-signal``).
            transport.join(_LOSS_SETTLE_S)
            if self._transport_dead():
                raise self._lost_error()
            return None
        finally:
            self._release_channel(channel)

    def _pump(self, channel: Any, job: _Job) -> None:
        """Read stdout and stderr until EOF, handing out complete lines as they arrive."""
        fd = channel.fileno()
        while True:
            select.select([fd], [], [], _POLL_S)
            at_end = channel.eof_received or channel.closed
            # Output nobody listens to is read (to keep the window open) but not decoded,
            # once the process-group marker has been found on stdout.
            need_stdout = job.on_stdout is not None or (job.nonce is not None and job.pgid is None)
            job.emit_stdout(
                _drain(channel.recv_ready, channel.recv, job.stdout_lines if need_stdout else None)
            )
            job.emit_stderr(
                _drain(
                    channel.recv_stderr_ready,
                    channel.recv_stderr,
                    job.stderr_lines if job.on_stderr is not None else None,
                )
            )
            if at_end:
                break
            if not channel.closed and self._transport_dead():
                break
        job.emit_stdout(job.stdout_lines.finish())
        job.emit_stderr(job.stderr_lines.finish())

    @staticmethod
    def _send_stdin(channel: Any, job: _Job) -> None:
        data = job.stdin
        chunks: Iterable[bytes | bytearray | memoryview]
        if isinstance(data, bytes | bytearray | memoryview):
            chunks = (data,)
        else:
            assert data is not None
            chunks = data
        try:
            for chunk in chunks:
                view = memoryview(chunk).cast("B")
                while view:
                    if job.stopping:
                        return
                    sent = send_data(channel, view[:_SEND_BYTES])
                    if sent <= 0:
                        return  # the remote closed its stdin or the channel ended
                    view = view[sent:]
            send_eof(channel)
        except (OSError, EOFError, paramiko.SSHException):
            return  # the command exited without reading all of its stdin

    def _kill_group_blocking(self, pgid: int) -> None:
        script = kill_group_script(pgid, grace_s=self.options.kill_grace_s)
        timeout = self.options.connect_timeout_s
        try:
            channel = self._open_session(timeout)
        except Exception as exc:
            raise self._channel_failure(exc, "open a channel to stop a command") from None
        try:
            channel.exec_command(script)
            send_eof(channel)
            if not channel.status_event.wait(timeout):
                raise SshChannelError(
                    self.host,
                    f"stopping process group {pgid} on {self.host} did not finish "
                    f"within {timeout}s",
                )
        except SshError:
            raise
        except Exception as exc:
            raise self._channel_failure(exc, f"stop process group {pgid}") from None
        finally:
            self._release_channel(channel)
        logger.debug("ssh {}: sent SIGTERM to process group {}", self.host, pgid)

    # ------------------------------------------------------------------ sftp

    @contextlib.asynccontextmanager
    async def sftp(self) -> AsyncIterator[Any]:
        """An SFTP session (``paramiko.SFTPClient``) on its own channel, holding one command
        slot while open. Its methods block: call them through ``asyncio.to_thread``."""
        self._check_usable()
        await self._command_slots.acquire()
        try:
            client, channel = await self._in_thread(self._open_sftp_blocking)
            try:
                yield client
            finally:
                await self._in_thread(self._close_sftp_blocking, client, channel)
        finally:
            self._command_slots.release()

    def _open_sftp_blocking(self) -> tuple[Any, Any]:
        try:
            channel = self._open_session(self.options.connect_timeout_s)
        except Exception as exc:
            raise self._channel_failure(exc, "open an sftp channel") from None
        try:
            channel.invoke_subsystem("sftp")
            return paramiko.SFTPClient(channel), channel
        except Exception as exc:
            self._release_channel(channel)
            raise self._channel_failure(exc, "start the sftp subsystem") from None

    def _close_sftp_blocking(self, client: Any, channel: Any) -> None:
        try:
            client.close()
        finally:
            self._release_channel(channel)

    # ------------------------------------------------------------------ liveness, close

    async def _keepalive_loop(self) -> None:
        interval = self.options.keepalive_interval_s
        timeout = self.options.keepalive_timeout_s
        while True:
            await asyncio.sleep(interval)
            if self._closed or self._lost_reason is not None:
                return
            if not await self._confirm_alive(timeout, "a keepalive"):
                return

    async def _confirm_alive(self, timeout: float, what: str, why: str = "") -> bool:
        """Ping the server (on the control slot); answered: note it alive, True. Not
        answered within ``timeout``: the connection is lost, naming ``what`` asked (and
        ``why``), False."""
        try:
            async with self._control_slot:
                await self._in_thread(self._ping_blocking, timeout)
        except Exception as exc:
            if not self._closed:
                await self._lose(f"no answer to {what} within {timeout:g}s{why} ({exc})")
            return False
        self._alive_at = time.monotonic()
        return True

    def _liveness_due(self, command_started: float) -> None:
        """A command started ``liveness_quiet_s`` ago: check the server is there, unless it
        showed it since (that command or another ended, a ping was answered), or a check or
        keepalive ping is already waiting for it (that one decides)."""
        if self._alive_at >= command_started or self._closed or self._lost_reason is not None:
            return
        if self._liveness is not None and not self._liveness.done():
            return
        if self._control_slot.locked():
            return
        timeout = min(self.options.connect_timeout_s, self.options.keepalive_timeout_s)
        why = (
            f", sent when a command had run {self.options.liveness_quiet_s:g}s with no sign "
            "of life from the server"
        )
        self._liveness = asyncio.get_running_loop().create_task(
            self._confirm_alive(timeout, "a liveness check", why), name=f"ssh-liveness-{self.host}"
        )

    def _ping_blocking(self, timeout: float) -> None:
        """One round trip the server must answer: open a session channel, close it."""
        self._release_channel(self._open_session(timeout))

    async def _lose(self, reason: str) -> None:
        if self._lost_reason is None:
            self._lost_reason = reason
            logger.warning("ssh {}: {}", self.host, reason)
        with contextlib.suppress(Exception):
            await self._in_thread(self._transport.close)

    async def close(self) -> None:
        """Close the connection; running commands fail with SshConnectionLost. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._lost_reason is None:
            self._lost_reason = "the transport was closed by this client"
        tasks: tuple[asyncio.Task[Any] | None, ...] = (self._keepalive, self._liveness)
        for task in tasks:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        with contextlib.suppress(Exception):
            await asyncio.get_running_loop().run_in_executor(self._executor, self._close_blocking)
        self._executor.shutdown(wait=False)

    def _close_blocking(self) -> None:
        # The transport thread may be in recv() for up to IDLE_READ_TIMEOUT_S: shutting the
        # reading side down ends that read (EOF) so the thread leaves now, not at its next
        # timeout; the connection itself closes as paramiko always closed it.
        with contextlib.suppress(OSError):
            self._transport.sock.shutdown(socket.SHUT_RD)
        self._transport.close()

    async def __aenter__(self) -> SshTransport:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


def _drain(
    ready: Callable[[], bool], recv: Callable[[int], bytes], lines: LineSplitter | None
) -> list[str]:
    out: list[str] = []
    while ready():
        data = recv(_RECV_BYTES)
        if not data:
            break
        if lines is not None:
            out.extend(lines.feed(data))
    return out


def _may_be_session_limit(exc: BaseException) -> bool:
    """True for sshd's "no more sessions" refusal (open failure code 2). paramiko keeps
    the refusal in one transport-wide slot, so with several opens in flight another thread
    may take it and this one only sees the generic "Unable to open channel."."""
    if isinstance(exc, paramiko.ChannelException):
        return bool(exc.code == _OPEN_CONNECT_FAILED)
    return type(exc) is paramiko.SSHException and str(exc) == "Unable to open channel."


def _wait_server_close(channel: Any, timeout: float) -> None:
    """Wait until the server closed ``channel`` too, so its session slot is being freed
    before ours is (paramiko notifies ``out_buffer_cv`` when the channel closes)."""
    deadline = time.monotonic() + timeout
    with channel.out_buffer_cv:
        while not channel.closed:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            channel.out_buffer_cv.wait(remaining)


def _close_transport_result(future: asyncio.Future[Any]) -> None:
    if not future.cancelled() and future.exception() is None:
        future.result().close()


def tcp_connect(host: str, address: str, port: int, timeout: float) -> socket.socket:
    """A connected TCP socket with Nagle off (interactive SSH needs it); errors classified."""
    try:
        sock = socket.create_connection((address, port), timeout=timeout)
    except ConnectionRefusedError:
        raise SshConnectError(
            host, f"{host}: TCP connection to {address}:{port} refused", kind="refused"
        ) from None
    except TimeoutError:
        raise SshConnectError(
            host,
            f"{host}: TCP connect to {address}:{port} timed out after {timeout}s",
            kind="timeout",
        ) from None
    except OSError as exc:
        raise SshConnectError(
            host,
            f"{host}: cannot reach {address}:{port}: {exc.strerror or exc}",
            kind="unreachable",
        ) from None
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _handshake(
    sock: socket.socket,
    host: str,
    username: str,
    key_path: Path,
    passphrase: str | None,
    expected: str,
    options: SshOptions,
) -> Any:
    """Blocking: key exchange, host-key check, public-key login. Returns the Transport."""
    key = _load_private_key(host, key_path, passphrase)
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    timeout = options.connect_timeout_s
    transport = _Transport(sock)
    try:
        transport.banner_timeout = timeout
        transport.handshake_timeout = timeout
        transport.auth_timeout = timeout
        if options.ciphers:
            transport.get_security_options().ciphers = options.ciphers
        try:
            transport.start_client(timeout=timeout)
        except Exception as exc:
            raise SshConnectError(
                host,
                f"SSH handshake with {host} failed: {_describe(exc)}",
                kind="timeout" if isinstance(exc, TimeoutError) else "protocol",
            ) from None
        if not transport.is_active() or not transport.initial_kex_done:
            # start_client returns quietly when its timeout passes mid-handshake.
            raise SshConnectError(
                host,
                f"SSH key exchange with {host} did not finish within {timeout}s",
                kind="timeout",
            )
        server_key = transport.get_remote_server_key()
        actual = fingerprint_of_key_blob(server_key.asbytes())
        if actual != expected:
            raise HostKeyMismatch(
                host, expected=expected, actual=actual, key_type=server_key.get_name()
            )
        client_fp = fingerprint_of_key_blob(key.asbytes())
        try:
            further = transport.auth_publickey(username, key)
        except paramiko.BadAuthenticationType as exc:
            raise SshAuthError(
                host,
                f"{host} does not accept public-key authentication for {username!r} "
                f"(it offers: {', '.join(exc.allowed_types) or 'nothing'}); "
                "password authentication is never attempted",
            ) from None
        except paramiko.AuthenticationException as exc:
            raise SshAuthError(
                host,
                f"{host} rejected public-key login as {username!r} with key {key_path} "
                f"({key.get_name()} {client_fp}): {exc}",
            ) from None
        except Exception as exc:
            raise SshConnectError(
                host, f"SSH authentication with {host} failed: {_describe(exc)}"
            ) from None
        if further or not transport.is_authenticated():
            raise SshAuthError(
                host,
                f"{host} wants further authentication after the public key "
                f"({', '.join(further) or 'unspecified'}); only public keys are used",
            )
        sock.settimeout(IDLE_READ_TIMEOUT_S)  # see IDLE_READ_TIMEOUT_S
        return transport
    except BaseException:
        transport.close()
        raise
