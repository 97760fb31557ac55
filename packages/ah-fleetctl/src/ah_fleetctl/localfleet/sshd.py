"""Private, real OpenSSH servers on loopback: one sshd per follower, on a random local port.

Used by `ah-fleetctl demo` and, through ah-harness-local, by the tests.

Each instance lives in its own directory: an ed25519 host key, an ed25519 client key,
`authorized_keys` for that client key, a `known_hosts` pinning the host key, an `sshd_config`
and the logs. Only public-key login works; password and keyboard-interactive are off.

Shell startup files: sshd starts every session through the user's login shell, and Debian's
bash reads `~/.bashrc` even for `ssh host cmd` (it is built with SSH_SOURCE_BASHRC). We run as
root, whose real `~/.bashrc` here runs `pyenv init` — half a second per command, a different
PATH, and anything it prints would corrupt rsync's protocol stream. So by default each instance
gives its sessions a private HOME (`<base_dir>/home`, with empty `.bashrc` and `.profile`) via
sshd's own `SetEnv`: shells find no heavy rc files, `~` points into the test's temp dir, and
nothing in the real home is read or written. The login shell itself is unchanged, and PATH is
sshd's built-in default. The working directory a session starts in is still the account's
real home (sshd always changes there), so commands that care must `cd` explicitly.
Pass `isolated_home=False` to keep the real HOME.
"""

from __future__ import annotations

import base64
import contextlib
import getpass
import hashlib
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from ah_fleetctl.localfleet.ports import free_tcp_port, tcp_accepts, wait_for
from ah_fleetctl.localfleet.processes import ManagedProcess, ProcessGroup

__all__ = [
    "RunningSshd",
    "SshdInstance",
    "SshdStartError",
    "find_sshd",
    "prepare_sshd",
    "start_many_sshd",
    "start_sshd",
]

DEFAULT_START_TIMEOUT = 30.0
_SSHD_SEARCH = ("/usr/sbin/sshd", "/usr/local/sbin/sshd", "/opt/homebrew/sbin/sshd", "/sbin/sshd")
_PRIVSEP_DIR = Path("/run/sshd")
_UNSAFE_PATH = re.compile(r"[\s\"'%~\\]")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_BIND_FAILURE = ("Address already in use", "Cannot bind any address")
_PORT_ATTEMPTS = 5


class SshdStartError(RuntimeError):
    """sshd did not come up; the message carries its log."""


def find_sshd() -> Path:
    """The absolute path of sshd (it must be absolute: sshd re-executes itself)."""
    candidates = [shutil.which("sshd"), *_SSHD_SEARCH]
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            return Path(candidate).resolve()
    raise FileNotFoundError(
        f"sshd not found on PATH nor at {', '.join(_SSHD_SEARCH)}; "
        "install openssh-server (scripts/install-system-deps.sh)"
    )


def _find_tool(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name} not found on PATH; install openssh-client")
    return found


def _fingerprint(public_key_line: str, source: Path) -> str:
    """The SHA256 fingerprint exactly as `ssh-keygen -lf` prints it (unpadded base64)."""
    fields = public_key_line.split()
    if len(fields) < 2:
        raise ValueError(f"{source}: not an OpenSSH public key line: {public_key_line!r}")
    blob = base64.b64decode(fields[1], validate=True)
    digest = base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")
    return f"SHA256:{digest}"


def _generate_key(path: Path, comment: str) -> None:
    if path.exists() and path.with_name(path.name + ".pub").exists():
        return  # a restarted instance keeps its identity
    subprocess.run(
        [_find_tool("ssh-keygen"), "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", path],
        check=True,
        capture_output=True,
        stdin=subprocess.DEVNULL,
    )


def _read_public_key(path: Path) -> str:
    """The one OpenSSH public-key line in ``path`` (a ``*.pub`` file)."""
    lines = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    if len(lines) != 1 or len(lines[0].split()) < 2:
        raise ValueError(
            f"authorized_keys: {path} must hold exactly one OpenSSH public-key line "
            f"(ssh-ed25519 AAAA... comment), found {len(lines)} line(s)"
        )
    return lines[0]


def _ensure_privsep_dir() -> None:
    # Debian's sshd refuses to start without its privilege-separation directory, which lives
    # on a tmpfs (/run) and so is missing after boot unless the service ran once.
    if not sys.platform.startswith("linux") or os.geteuid() != 0:
        return
    _PRIVSEP_DIR.mkdir(mode=0o755, parents=True, exist_ok=True)


def _known_hosts_host(listen: str, port: int) -> str:
    return listen if port == 22 else f"[{listen}]:{port}"


def _quote_setenv(name: str, value: str) -> str:
    if not _ENV_NAME.fullmatch(name):
        raise ValueError(f"session_env: {name!r} is not a valid environment variable name")
    if any(c in value for c in '"\\\n\r'):
        raise ValueError(
            f"session_env[{name!r}]: value {value!r} contains a quote, backslash or newline, "
            "which sshd_config cannot carry"
        )
    return f'"{name}={value}"'


@dataclass(frozen=True)
class SshdInstance:
    """An sshd prepared on disk (keys, config, known_hosts) but not necessarily running."""

    base_dir: Path
    listen: str
    port: int
    user: str
    sshd_path: Path
    config_path: Path
    host_key_path: Path
    host_public_key: str
    host_key_fingerprint: str
    client_key_path: Path
    authorized_keys_path: Path
    known_hosts_path: Path
    pid_file: Path
    log_dir: Path
    home_dir: Path | None

    @property
    def destination(self) -> str:
        return f"{self.user}@{self.listen}"

    def ssh_options(self, *, connect_timeout: float = 10.0) -> list[str]:
        """ssh client options that pin this server's host key and use only the client key.

        No user or system ssh_config, no agent, no password prompts, no trust on first use.
        """
        return [
            "-F", "/dev/null",
            "-i", str(self.client_key_path),
            "-o", "IdentitiesOnly=yes",
            "-o", "IdentityAgent=none",
            "-o", "StrictHostKeyChecking=yes",
            "-o", f"UserKnownHostsFile={self.known_hosts_path}",
            "-o", "GlobalKnownHostsFile=/dev/null",
            "-o", "UpdateHostKeys=no",
            "-o", "BatchMode=yes",
            "-o", f"ConnectTimeout={max(1, round(connect_timeout))}",
            "-o", "LogLevel=ERROR",
            "-p", str(self.port),
        ]  # fmt: skip

    def ssh_command(self, *remote_args: str, connect_timeout: float = 10.0) -> list[str]:
        """A ready-to-run ssh argv logging into this server and running `remote_args`.

        Like ssh itself, the remote arguments are joined with spaces and run by the login
        shell; quote them (shlex.join) when they must arrive as literal words. With no
        remote arguments the argv opens a login session.
        """
        return [
            _find_tool("ssh"),
            *self.ssh_options(connect_timeout=connect_timeout),
            # "--" keeps a remote argument starting with "-" from being read as an ssh option.
            "--",
            self.destination,
            *remote_args,
        ]

    def start(
        self,
        *,
        timeout: float = DEFAULT_START_TIMEOUT,
        group: ProcessGroup | None = None,
        wrap: Sequence[str] = (),
    ) -> RunningSshd:
        """Start sshd and return once a real ssh login succeeds. ``wrap`` goes before sshd's
        command line (``ip netns exec NS``: an sshd in another network namespace).

        Raises:
            SshdStartError: with sshd's log, if it exits or does not accept a login in time.
        """
        _ensure_privsep_dir()
        process = ManagedProcess(
            [*wrap, self.sshd_path, "-D", "-e", "-f", self.config_path],
            log_dir=self.log_dir,
            name="sshd",
        )
        if group is not None:
            group.adopt(process)
        running = RunningSshd(self, process)
        try:
            running._wait_ready(timeout)
        except BaseException:
            process.terminate()
            raise
        return running


def prepare_sshd(
    base_dir: Path,
    *,
    port: int = 0,
    user: str | None = None,
    listen: str = "127.0.0.1",
    isolated_home: bool = True,
    session_env: Mapping[str, str] | None = None,
    fast_kex: bool = True,
    sshd_path: Path | None = None,
    authorized_keys: Sequence[Path] = (),
) -> SshdInstance:
    """Write keys, authorized_keys, known_hosts and sshd_config under `base_dir`.

    Keys already present in `base_dir` are kept, so a re-prepared instance has the same
    host key. `port=0` picks a free port. `fast_kex` drops the post-quantum sntrup761 key
    exchange, which costs OpenSSH 9.x ~0.1 s of CPU per connection (40% of a login here);
    what remains is curve25519 first, which every client (OpenSSH, paramiko) speaks.
    `authorized_keys` names further public-key files (``*.pub``) whose keys may log in
    besides the instance's own client key (e.g. one leader key for a whole fleet).
    """
    base_dir = base_dir.resolve()
    if _UNSAFE_PATH.search(str(base_dir)):
        # sshd_config and `ssh -o` split on whitespace and expand % and ~ in these paths.
        raise ValueError(
            f"sshd base_dir {str(base_dir)!r} contains whitespace, a quote, '%' or '~'; "
            "sshd_config and ssh -o options cannot carry it"
        )
    base_dir.mkdir(parents=True, exist_ok=True)
    user = user or getpass.getuser()
    port = port or free_tcp_port(listen)
    sshd = sshd_path or find_sshd()
    host_key = base_dir / "ssh_host_ed25519_key"
    client_key = base_dir / "id_ed25519"
    _generate_key(host_key, f"ah-harness-local host {base_dir.name}")
    _generate_key(client_key, f"ah-harness-local client {base_dir.name}")
    host_pub_path = host_key.with_name(host_key.name + ".pub")
    host_public_key = host_pub_path.read_text().strip()
    client_public_key = client_key.with_name(client_key.name + ".pub").read_text().strip()

    extra_keys = [_read_public_key(path) for path in authorized_keys]
    authorized_keys_path = base_dir / "authorized_keys"
    authorized_keys_path.write_text("".join(f"{key}\n" for key in [client_public_key, *extra_keys]))
    known_hosts = base_dir / "known_hosts"
    known_hosts.write_text(f"{_known_hosts_host(listen, port)} {host_public_key}\n")

    env: dict[str, str] = {}
    home_dir: Path | None = None
    if isolated_home:
        home_dir = base_dir / "home"
        home_dir.mkdir(exist_ok=True)
        for rc in (".bashrc", ".profile"):
            (home_dir / rc).write_text("# ah-harness-local: intentionally empty\n")
        env["HOME"] = str(home_dir)
    env.update(session_env or {})

    pid_file = base_dir / "sshd.pid"
    lines = [
        f"ListenAddress {listen}",
        f"Port {port}",
        f"HostKey {host_key}",
        f"PidFile {pid_file}",
        f"AuthorizedKeysFile {authorized_keys_path}",
        f"AllowUsers {user}",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "PubkeyAuthentication yes",
        "PermitRootLogin prohibit-password",
        "UsePAM no",
        "StrictModes no",
        # A ~/.ssh/rc in the real home would run before every command.
        "PermitUserRC no",
        "Subsystem sftp internal-sftp",
        "MaxSessions 64",
        "MaxStartups 100:30:200",
        "AcceptEnv none",
        "PrintMotd no",
        "PrintLastLog no",
        "LogLevel VERBOSE",
    ]
    if fast_kex:
        lines.append("KexAlgorithms -sntrup*")
    if env:
        # sshd honours only the first SetEnv line, so every variable goes on one line.
        lines.append("SetEnv " + " ".join(_quote_setenv(k, v) for k, v in env.items()))
    config = base_dir / "sshd_config"
    config.write_text("\n".join(lines) + "\n")

    return SshdInstance(
        base_dir=base_dir,
        listen=listen,
        port=port,
        user=user,
        sshd_path=sshd,
        config_path=config,
        host_key_path=host_key,
        host_public_key=host_public_key,
        host_key_fingerprint=_fingerprint(host_public_key, host_pub_path),
        client_key_path=client_key,
        authorized_keys_path=authorized_keys_path,
        known_hosts_path=known_hosts,
        pid_file=pid_file,
        log_dir=base_dir / "logs",
        home_dir=home_dir,
    )


class _PortTaken(SshdStartError):
    pass


class RunningSshd:
    """A started sshd: the prepared `instance` plus its `process`."""

    def __init__(self, instance: SshdInstance, process: ManagedProcess) -> None:
        self.instance = instance
        self.process = process

    def __repr__(self) -> str:
        return f"<RunningSshd {self.destination}:{self.port} pid={self.process.pid}>"

    def __enter__(self) -> RunningSshd:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def port(self) -> int:
        return self.instance.port

    @property
    def listen(self) -> str:
        return self.instance.listen

    @property
    def user(self) -> str:
        return self.instance.user

    @property
    def destination(self) -> str:
        return self.instance.destination

    @property
    def base_dir(self) -> Path:
        return self.instance.base_dir

    @property
    def host_key_path(self) -> Path:
        return self.instance.host_key_path

    @property
    def host_public_key(self) -> str:
        return self.instance.host_public_key

    @property
    def host_key_fingerprint(self) -> str:
        return self.instance.host_key_fingerprint

    @property
    def client_key_path(self) -> Path:
        return self.instance.client_key_path

    @property
    def known_hosts_path(self) -> Path:
        return self.instance.known_hosts_path

    @property
    def home_dir(self) -> Path | None:
        return self.instance.home_dir

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def is_running(self) -> bool:
        return self.process.is_running

    def ssh_options(self, *, connect_timeout: float = 10.0) -> list[str]:
        return self.instance.ssh_options(connect_timeout=connect_timeout)

    def ssh_command(self, *remote_args: str, connect_timeout: float = 10.0) -> list[str]:
        return self.instance.ssh_command(*remote_args, connect_timeout=connect_timeout)

    def run(
        self, *remote_args: str, timeout: float = 30.0, check: bool = False
    ) -> subprocess.CompletedProcess[str]:
        """Run `ssh_command(*remote_args)` and capture its output as text."""
        argv = self.ssh_command(*remote_args, connect_timeout=min(timeout, 10.0))
        return subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=check,
            stdin=subprocess.DEVNULL,
        )

    def login_works(self, timeout: float = 5.0) -> bool:
        """True if `ssh ... true` logs in and exits 0 within `timeout` seconds."""
        try:
            return self.run("true", timeout=timeout).returncode == 0
        except subprocess.TimeoutExpired:
            return False

    def log_text(self) -> str:
        return self.process.log_text()

    def pause(self) -> None:
        """SIGSTOP sshd and its sessions (new logins hang until `resume`)."""
        self.process.pause()

    def resume(self) -> None:
        self.process.resume()

    def stop(self, timeout: float = 5.0) -> None:
        """Terminate sshd and every session it started; idempotent."""
        self.process.terminate(timeout)

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        where = f"sshd {self.listen}:{self.port} ({self.instance.config_path})"

        def listening() -> bool:
            if not self.process.is_running:
                log = self.process.stderr_text()
                kind = _PortTaken if any(m in log for m in _BIND_FAILURE) else SshdStartError
                raise kind(
                    f"{where} exited with status {self.process.returncode} before listening:\n"
                    + self.log_text()
                )
            # Seeing our own sshd say it bound the port rules out a stranger on that port.
            return "Server listening on" in self.process.stderr_text()

        last_error = ""

        def login() -> bool:
            nonlocal last_error
            if not tcp_accepts(self.listen, self.port):
                last_error = "TCP connect refused"
                return False
            remaining = max(1.0, deadline - time.monotonic())
            try:
                result = self.run("true", timeout=remaining)
            except subprocess.TimeoutExpired:
                last_error = f"ssh did not finish within {remaining:.1f}s"
                return False
            last_error = result.stderr.strip() or f"ssh exit status {result.returncode}"
            return result.returncode == 0

        try:
            wait_for(listening, timeout, what=f"{where} to listen")
            wait_for(
                login,
                max(0.0, deadline - time.monotonic()),
                interval=0.05,
                what=f"ssh login to {where}",
            )
        except TimeoutError as exc:
            raise SshdStartError(
                f"{exc} (last ssh error: {last_error or 'none'})\n" + self.log_text()
            ) from None


def start_sshd(
    base_dir: Path,
    *,
    port: int = 0,
    user: str | None = None,
    listen: str = "127.0.0.1",
    isolated_home: bool = True,
    session_env: Mapping[str, str] | None = None,
    fast_kex: bool = True,
    timeout: float = DEFAULT_START_TIMEOUT,
    group: ProcessGroup | None = None,
    authorized_keys: Sequence[Path] = (),
    wrap: Sequence[str] = (),
) -> RunningSshd:
    """Prepare an sshd under `base_dir` (see `prepare_sshd`), start it (after `wrap`, see
    `SshdInstance.start`), wait for a login.

    With `port=0` a free port is picked, and picked again if another process takes it
    between the pick and sshd's bind.
    """
    attempts = 1 if port else _PORT_ATTEMPTS
    for attempt in range(1, attempts + 1):
        instance = prepare_sshd(
            base_dir,
            port=port,
            user=user,
            listen=listen,
            isolated_home=isolated_home,
            session_env=session_env,
            fast_kex=fast_kex,
            authorized_keys=authorized_keys,
        )
        try:
            return instance.start(timeout=timeout, group=group, wrap=wrap)
        except _PortTaken:
            if attempt == attempts:
                raise
    raise AssertionError("unreachable")


def start_many_sshd(
    base_dir: Path,
    n: int,
    *,
    user: str | None = None,
    listen: str = "127.0.0.1",
    isolated_home: bool = True,
    session_env: Mapping[str, str] | None = None,
    fast_kex: bool = True,
    timeout: float = DEFAULT_START_TIMEOUT,
    group: ProcessGroup | None = None,
    authorized_keys: Sequence[Path] = (),
) -> list[RunningSshd]:
    """Start `n` sshd instances concurrently, in `base_dir/sshd-0` … `sshd-{n-1}`.

    All or nothing: if any fails, the others are stopped and the first error is raised.
    """
    if n < 0:
        raise ValueError(f"start_many_sshd: n must be >= 0, got {n}")
    if n == 0:
        return []
    with ThreadPoolExecutor(max_workers=n, thread_name_prefix="start-sshd") as pool:
        futures: list[Future[RunningSshd]] = [
            pool.submit(
                start_sshd,
                base_dir / f"sshd-{i}",
                user=user,
                listen=listen,
                isolated_home=isolated_home,
                session_env=session_env,
                fast_kex=fast_kex,
                timeout=timeout,
                group=group,
                authorized_keys=authorized_keys,
            )
            for i in range(n)
        ]
    started: list[RunningSshd] = []
    errors: list[BaseException] = []
    for future in futures:
        error = future.exception()
        if error is None:
            started.append(future.result())
        else:
            errors.append(error)
    if errors:
        for running in started:
            with contextlib.suppress(Exception):
                running.stop()
        raise errors[0]
    return started
