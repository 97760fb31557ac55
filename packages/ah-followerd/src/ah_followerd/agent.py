"""``run``: the follower's long-lived control connection and its RPC answers.

The facts reported in Hello (`build_info`) and the RPC answers (`answer_rpc`) are plain
functions; `run_agent` is the asyncio shell: a `ControlClient` that stays connected and
reconnects with backoff and jitter, a ready file once the first Welcome arrives, and Goodbye on
SIGTERM/SIGINT.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import enum
import hashlib
import os
import platform
import shlex
import signal
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
from loguru import logger

from ah_connectivity import Backoff, ControlClient, TunnelPolicy
from ah_domain_types import (
    ControlMessage,
    ExecRequest,
    ExecResult,
    ExitCode,
    FollowerInfo,
    OsKind,
    Resources,
    StreamError,
    StreamErrorCode,
    Welcome,
    parse_host_port,
)

from . import __version__
from .state import FollowerState

__all__ = [
    "DEFAULT_HOST_KEY_FILE",
    "ExecMode",
    "HostKeyError",
    "RunOptions",
    "answer_rpc",
    "build_info",
    "detect_os",
    "host_key_fingerprint",
    "mock_stdout",
    "run_agent",
]

_log = logger.bind(component="ah-followerd.agent")

DEFAULT_HOST_KEY_FILE = Path("/etc/ssh/ssh_host_ed25519_key.pub")
REAL_EXEC_REFUSAL = (
    "real commands are not run over the control plane: they run over SSH "
    "(ah-fleetctl run); this RPC serves --exec mock and noop only"
)


class ExecMode(enum.StrEnum):
    REAL = "real"
    MOCK = "mock"
    NOOP = "noop"


class HostKeyError(ValueError):
    """The sshd host public key file is missing or not an OpenSSH public key."""


def host_key_fingerprint(path: Path) -> str:
    """``SHA256:<unpadded base64>`` of the OpenSSH public key in `path` (as ``ssh-keygen -lf``
    prints it): what the leader pins when it logs in to this follower's sshd."""
    try:
        line = path.read_text().strip()
    except OSError as exc:
        raise HostKeyError(
            f"cannot read the sshd host public key {path}: {exc.strerror or exc} "
            "(pass --ssh-host-key-file PATH of the sshd's public host key)"
        ) from None
    fields = line.split()
    try:
        if len(fields) < 2:
            raise ValueError("expected '<type> <base64> [comment]'")
        blob = base64.b64decode(fields[1], validate=True)
    except ValueError as exc:
        raise HostKeyError(f"{path} is not an OpenSSH public key line: {exc}") from None
    digest = base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")
    return f"SHA256:{digest}"


def detect_os() -> OsKind:
    if sys.platform == "darwin":
        return OsKind.MACOS
    if sys.platform.startswith(("win32", "cygwin", "msys")):
        return OsKind.WINDOWS
    return OsKind.LINUX


def _memory_mb() -> int:
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // (1024 * 1024))
    except (AttributeError, ValueError, OSError):
        return 0


def build_info(
    *,
    name: str,
    tags: Mapping[str, str],
    host_key_fingerprint: str,
    direct_address: str | None,
    workspace: str,
    os_kind: OsKind | None = None,
) -> FollowerInfo:
    """The FollowerInfo this follower says about itself in Hello."""
    return FollowerInfo(
        name=name,
        os=os_kind or detect_os(),
        arch=platform.machine() or "unknown",
        tags=dict(tags),
        resources=Resources(cpus=os.cpu_count() or 1, memory_mb=_memory_mb()),
        host_key_fingerprint=host_key_fingerprint,
        direct_address=direct_address,
        workspace=workspace,
        version=__version__,
    )


def mock_stdout(name: str, command: list[str]) -> str:
    """Deterministic and distinct per host: names the host and the command."""
    return f"mock exec on {name}: {shlex.join(command)}\n"


def answer_rpc(
    name: str, mode: ExecMode, mock_exit_code: int, request: ControlMessage, took_ms: int = 0
) -> ControlMessage:
    """The reply to one RPC request."""
    if isinstance(request, ExecRequest):
        if mode is ExecMode.MOCK:
            return ExecResult(
                request_id=request.request_id,
                exit_code=mock_exit_code,
                stdout=mock_stdout(name, request.command),
                stderr="",
                took_ms=took_ms,
            )
        if mode is ExecMode.NOOP:
            return ExecResult(
                request_id=request.request_id, exit_code=0, stdout="", stderr="", took_ms=took_ms
            )
        return StreamError(code=StreamErrorCode.UNEXPECTED_MESSAGE, message=REAL_EXEC_REFUSAL)
    return StreamError(
        code=StreamErrorCode.UNEXPECTED_MESSAGE,
        message=f"follower {name!r} does not serve {type(request).__name__} RPCs",
    )


class _ReadyFile(msgspec.Struct, frozen=True):
    pid: int
    name: str


def _write_json_atomically(path: Path, value: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        temporary.write_bytes(msgspec.json.encode(value) + b"\n")
        os.replace(temporary, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()


def _ignore_further_signals(loop: asyncio.AbstractEventLoop) -> None:
    """We are stopping anyway: a repeated SIGTERM (a supervisor signalling the process group and
    then each process) must not turn a clean exit into death by signal. Taking the handlers off
    the loop first keeps loop.close() from restoring the default action."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.remove_signal_handler(sig)
        signal.signal(sig, signal.SIG_IGN)


def _remove_own_ready_file(path: Path) -> None:
    """A stale ready file would tell the next reader to wait on a dead process."""
    try:
        current = msgspec.json.decode(path.read_bytes(), type=_ReadyFile)
    except (OSError, msgspec.DecodeError):
        return
    if current.pid == os.getpid():
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


@dataclass(frozen=True)
class RunOptions:
    ssh_dst: str = "127.0.0.1:22"
    """Where tunnels go (the allow-list); reported facts come from the host key file."""
    ssh_user: str | None = None
    host_key_fingerprint: str = ""
    direct_address: str | None = None
    workspace: str = ""
    os_kind: OsKind | None = None
    tags: Mapping[str, str] = field(default_factory=dict)
    exec_mode: ExecMode = ExecMode.REAL
    mock_exit_code: int = 0
    ready_file: Path | None = None
    backoff_cap_s: float = 10.0


async def run_agent(state: FollowerState, options: RunOptions) -> int:
    """Stay connected until SIGTERM/SIGINT, then say Goodbye; return the exit code."""
    loop = asyncio.get_running_loop()
    name = state.name
    tags = {**state.settings.tags, **options.tags}
    info = build_info(
        name=name,
        tags=tags,
        host_key_fingerprint=options.host_key_fingerprint,
        direct_address=options.direct_address,
        workspace=options.workspace,
        os_kind=options.os_kind,
    )
    host, port = state.quic_host_port()

    async def on_rpc(request: ControlMessage) -> ControlMessage:
        started = time.monotonic()
        reply = answer_rpc(name, options.exec_mode, options.mock_exit_code, request)
        if isinstance(reply, ExecResult) and isinstance(request, ExecRequest):
            reply = msgspec.structs.replace(reply, took_ms=int((time.monotonic() - started) * 1000))
            _log.info(
                "exec ({}) {}: exit code {}",
                options.exec_mode.value,
                shlex.join(request.command),
                reply.exit_code,
            )
        elif isinstance(reply, StreamError):
            _log.warning("refused RPC {}: {}", type(request).__name__, reply.message)
        return reply

    ready_written = False

    def on_connected(welcome: Welcome) -> None:
        nonlocal ready_written
        if not ready_written and options.ready_file is not None:
            _write_json_atomically(options.ready_file, _ReadyFile(pid=os.getpid(), name=name))
            ready_written = True

    def on_disconnected(reason: str) -> None:
        _log.warning("disconnected from access point {}:{}: {}", host, port, reason)

    ssh_host, ssh_port = parse_host_port(options.ssh_dst, default_port=22)
    client = ControlClient(
        host=host,
        port=port,
        identity=state.identity,
        ca=state.ca_cert,
        trust_domain=state.settings.trust_domain,
        info=info,
        on_rpc=on_rpc,
        backoff=Backoff(base_s=0.1, cap_s=max(0.1, options.backoff_cap_s)),
        on_connected=on_connected,
        on_disconnected=on_disconnected,
        # Tunnels (CONNECT on the access point) reach only this sshd; "<follower>:22" means it.
        tunnel_policy=TunnelPolicy.for_sshd(ssh_host, ssh_port),
    )
    stopping: list[asyncio.Task[None]] = []

    def on_signal(sig: signal.Signals) -> None:
        if stopping:
            return
        _log.info("received {}: saying goodbye to the access point", sig.name)
        stopping.append(
            loop.create_task(client.stop(f"follower {name!r} shutting down ({sig.name})"))
        )

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    _log.info(
        "follower {!r} ({} {}, exec {}) connecting to access point {}:{}",
        name,
        info.os.value,
        info.arch,
        options.exec_mode.value,
        host,
        port,
    )
    try:
        await client.run()
        for task in stopping:
            await task
    finally:
        _ignore_further_signals(loop)
        if ready_written and options.ready_file is not None:
            _remove_own_ready_file(options.ready_file)
    _log.info("follower {!r} stopped", name)
    return int(ExitCode.OK)
