"""A whole local fleet: a real access point and N real followers, each with its own real sshd.

`LocalFleet` runs the daemons exactly as an operator would: ``ah-access-pointd init`` and
``serve`` (ports 0, ready file), an sshd per follower, ``ah-followerd enroll`` with a one-time
token, then ``ah-followerd run``; it waits (with a deadline) until the REST API lists every
follower as healthy. Everything runs in parallel where the order allows, in a temp directory,
as process groups that are torn down on `close` (also when start-up fails).

Layout under `base_dir`::

    ap/                      access point state directory (CA, keys, fleet.db)
    ap-ready.json            its ready file
    followers/<name>/state   follower state directory; .../ready.json its ready file
    sshd/<name>/             the follower's sshd (keys, config, logs)
    home/                    AH_HOME for ah-fleetctl (config.toml: remote-server, token, ca-file,
                             ssh.user, ssh.identity-file)
    leader/id_ed25519[.pub]  the leader's SSH key, authorized on every follower's sshd
    logs/                    stdout/stderr of every daemon
"""

from __future__ import annotations

import json
import os
import shutil
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import msgspec

from ah_access_pointd.state import IDENTITY_FILES, TOKEN_KEY_FILE
from ah_config import write_user_config
from ah_connectivity import CA_CERT_FILE, TokenSigner, ca_fingerprint
from ah_fleetctl.localfleet.ports import wait_for
from ah_fleetctl.localfleet.processes import ManagedProcess, ProcessGroup
from ah_fleetctl.localfleet.sshd import (
    DEFAULT_START_TIMEOUT,
    RunningSshd,
    _generate_key,
    start_sshd,
)
from ah_followerd.state import SETTINGS_FILE, FollowerSettings

__all__ = [
    "DEFAULT_HEARTBEAT_INTERVAL",
    "CommandFailed",
    "FollowerHandle",
    "FollowerSpec",
    "LocalFleet",
    "daemon_argv",
]

DEFAULT_HEARTBEAT_INTERVAL = "200ms"
DEFAULT_TRUST_DOMAIN = "harness.local"
_CLI_TIMEOUT_S = 60.0
_POLL_S = 0.05


def daemon_argv(binary: str, interpreter: Path | None = None) -> list[str]:
    """argv prefix running `binary` (``ah-access-pointd``, ``ah-followerd``, ``ah-fleetctl``)
    from ``interpreter``'s environment (default: this one), as its console script would."""
    return [str(interpreter or sys.executable), "-m", binary.replace("-", "_")]


def _clean_env() -> dict[str, str]:
    """The caller's environment without AH_* variables (a stray AH_JSON or AH_TOKEN would
    change what the daemons and ah-fleetctl do)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AH_")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


class CommandFailed(RuntimeError):
    """A CLI step of the fleet set-up failed; the message carries its output."""


@dataclass(frozen=True)
class FollowerSpec:
    """One follower of a `LocalFleet`."""

    name: str
    tags: Mapping[str, str] = field(default_factory=dict)
    """Tags granted by the enrollment token."""
    os: str | None = None
    """``--os`` override (linux, macos, windows) to simulate cross-OS fleets."""
    exec_mode: str = "mock"
    mock_exit_code: int = 0
    run_args: tuple[str, ...] = ()
    """Extra ``ah-followerd run`` arguments."""


def _run_cli(argv: Sequence[str], *, env: Mapping[str, str], what: str) -> str:
    try:
        result = subprocess.run(
            list(argv),
            capture_output=True,
            text=True,
            env=dict(env),
            timeout=_CLI_TIMEOUT_S,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired as exc:
        raise CommandFailed(f"{what}: {' '.join(argv)} did not finish in {exc.timeout}s") from None
    if result.returncode != 0:
        raise CommandFailed(
            f"{what}: exit {result.returncode}\n--- stdout ---\n{result.stdout}"
            f"--- stderr ---\n{result.stderr}"
        )
    return result.stdout


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _wait_ready_file(process: ManagedProcess, path: Path, timeout: float) -> dict[str, Any]:
    def ready() -> dict[str, Any] | None:
        if not process.is_running:
            raise CommandFailed(
                f"{process.name} exited with status {process.returncode} before writing "
                f"{path}:\n{process.log_text()}"
            )
        found = _read_json(path)
        return found if found is not None and found.get("pid") == process.pid else None

    try:
        return wait_for(ready, timeout, interval=_POLL_S, what=f"{process.name} ready file {path}")
    except TimeoutError as exc:
        raise TimeoutError(f"{exc}\n{process.log_text()}") from None


class FollowerHandle:
    """One follower of a running `LocalFleet`: its sshd, state directory and daemon."""

    def __init__(self, fleet: LocalFleet, spec: FollowerSpec, sshd: RunningSshd) -> None:
        self.fleet = fleet
        self.spec = spec
        self.sshd = sshd
        self.dir = fleet.base_dir / "followers" / spec.name
        self.state_dir = self.dir / "state"
        self.ready_file = self.dir / "ready.json"
        self.workspace = self.dir / "workspace"
        self.process: ManagedProcess | None = None

    @property
    def name(self) -> str:
        return self.spec.name

    def __repr__(self) -> str:
        return f"<FollowerHandle {self.name} {self.process!r}>"

    def run_argv(self) -> list[str]:
        spec, sshd = self.spec, self.sshd
        argv = [
            *daemon_argv("ah-followerd", self.fleet.interpreter),
            "run",
            "--state-dir", str(self.state_dir),
            "--ssh-dst", f"{sshd.listen}:{sshd.port}",
            "--ssh-user", sshd.user,
            "--ssh-host-key-file", f"{sshd.host_key_path}.pub",
            "--direct-address", f"{sshd.listen}:{sshd.port}",
            "--workspace", str(self.workspace),
            "--exec", spec.exec_mode,
            "--mock-exit-code", str(spec.mock_exit_code),
            "--ready-file", str(self.ready_file),
            "--backoff-cap", self.fleet.backoff_cap,
        ]  # fmt: skip
        if spec.os is not None:
            argv += ["--os", spec.os]
        return argv + list(spec.run_args)

    def enroll(self, *, force: bool = False) -> None:
        """``ah-followerd enroll`` with a fresh one-time token (`force`: over an existing
        enrollment, as after a reinstall)."""
        token = self.fleet.enrollment_token(self.name, self.spec.tags)
        _run_cli(
            [
                *daemon_argv("ah-followerd", self.fleet.interpreter),
                "enroll",
                "--access-point",
                f"{self.fleet.bind}:{self.fleet.api_port}",
                "--token",
                token,
                "--state-dir",
                str(self.state_dir),
                *(["--force"] if force else []),
            ],
            env=self.fleet.daemon_env,
            what=f"enroll follower {self.name}",
        )

    def start(self) -> ManagedProcess:
        """Start ``ah-followerd run`` (not waiting for it: see `wait_ready`)."""
        if self.process is not None and self.process.is_running:
            raise RuntimeError(f"follower {self.name} is already running")
        self.ready_file.unlink(missing_ok=True)
        self.process = self.fleet.group.start(
            [*self.fleet.follower_wrap(self.name), *self.run_argv()],
            name=f"ah-followerd-{self.name}",
            log_dir=self.fleet.log_dir,
            env=self.fleet.daemon_env,
        )
        return self.process

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Until the daemon got its first Welcome (its ready file)."""
        assert self.process is not None, f"follower {self.name} was never started"
        _wait_ready_file(self.process, self.ready_file, timeout)

    def kill(self) -> None:
        """SIGKILL the daemon: no Goodbye, the QUIC connection just goes silent."""
        if self.process is not None:
            self.process.kill()

    def terminate(self, timeout: float = 10.0) -> int | None:
        """SIGTERM: the daemon says Goodbye and exits (its exit status is returned)."""
        if self.process is None:
            return None
        return self.process.terminate(timeout)

    def pause(self) -> None:
        assert self.process is not None
        self.process.pause()

    def resume(self) -> None:
        assert self.process is not None
        self.process.resume()

    def restart(self, timeout: float = 30.0) -> None:
        """Terminate (if running), start again and wait for its first Welcome."""
        if self.process is not None and self.process.is_running:
            self.process.terminate()
        self.start()
        self.wait_ready(timeout)

    def log_text(self) -> str:
        return self.process.log_text() if self.process is not None else ""

    def kill_sshd(self) -> None:
        """SIGKILL the follower's sshd and every session it started (the SSH server dies;
        the follower daemon stays connected to the access point)."""
        self.sshd.process.kill()

    def start_sshd(self, timeout: float = 30.0) -> RunningSshd:
        """Start the follower's sshd again after `kill_sshd`: same directory, port and host
        key, so what the follower advertises stays true."""
        if self.sshd.is_running:
            raise RuntimeError(f"the sshd of follower {self.name} is already running")
        self.sshd = self.fleet.start_follower_sshd(self.spec, port=self.sshd.port, timeout=timeout)
        return self.sshd

    def settings(self) -> FollowerSettings:
        """What enrollment stored in the follower's ``follower.toml``."""
        return msgspec.toml.decode(
            (self.state_dir / SETTINGS_FILE).read_bytes(), type=FollowerSettings
        )


class LocalFleet:
    """An access point and followers as local processes; use as a context manager.

    ``heartbeat_interval`` is short by default (200 ms) so health changes show within a
    second: unhealthy after 3 missed heartbeats, offline after 6.
    """

    def __init__(
        self,
        followers: Sequence[FollowerSpec],
        *,
        base_dir: Path | None = None,
        heartbeat_interval: str = DEFAULT_HEARTBEAT_INTERVAL,
        trust_domain: str = DEFAULT_TRUST_DOMAIN,
        backoff_cap: str = "1s",
        start_timeout: float = 60.0,
        interpreter: Path | None = None,
        bind: str = "127.0.0.1",
    ) -> None:
        """``interpreter``: the Python whose environment the daemons run from (default: this
        one; a benchmark runs them from the environment its CLI is installed in). ``bind``:
        the address the access point listens on and everyone dials it at (also in its
        server certificate); a follower in another network namespace cannot reach the
        host's loopback."""
        names = [f.name for f in followers]
        if len(set(names)) != len(names):
            raise ValueError(f"follower names must be distinct, got {names}")
        self._own_dir: tempfile.TemporaryDirectory[str] | None = None
        if base_dir is None:
            self._own_dir = tempfile.TemporaryDirectory(prefix="ah-fleet-")
            base_dir = Path(self._own_dir.name)
        self.base_dir = Path(base_dir).resolve()
        self.base_dir.mkdir(parents=True, exist_ok=True)
        self.specs = tuple(followers)
        self.heartbeat_interval = heartbeat_interval
        self.trust_domain = trust_domain
        self.backoff_cap = backoff_cap
        self.start_timeout = start_timeout
        self.interpreter = interpreter
        self.bind = bind
        self.ap_dir = self.base_dir / "ap"
        self.ap_ready_file = self.base_dir / "ap-ready.json"
        self.home = self.base_dir / "home"
        self.leader_key = self.base_dir / "leader" / "id_ed25519"
        """The leader's private SSH key (``ssh.identity-file`` of `env`), authorized on
        every follower's sshd."""
        self.log_dir = self.base_dir / "logs"
        self.group = ProcessGroup(self.log_dir)
        # The daemons read [log] from the layered configuration: point its user and system
        # files at paths that do not exist, so a developer's own config cannot steer them.
        self.daemon_env = {
            **_clean_env(),
            "AH_HOME": str(self.base_dir / "daemon-home"),
            "AH_SYSTEM_CONFIG": str(self.base_dir / "daemon-home" / "no-system-config.toml"),
        }
        self.access_point: ManagedProcess | None = None
        self.ready: dict[str, Any] = {}
        """The access point's ready file (pid, bind, quicPort, apiPort, caFingerprint...)."""
        self.followers: dict[str, FollowerHandle] = {}
        self.user_token = ""
        self.startup_seconds: float | None = None
        """Wall time `start` took, for reports."""
        self._signer: TokenSigner | None = None
        self._ssl: ssl.SSLContext | None = None

    # -- lifecycle -------------------------------------------------------------------------

    def __enter__(self) -> LocalFleet:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def start(self) -> LocalFleet:
        started = time.monotonic()
        workers = max(2, len(self.specs) + 1)
        self.leader_key.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        _generate_key(self.leader_key, "ah-harness-local leader")
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="local-fleet") as pool:
            init = pool.submit(self._init_access_point)
            sshds = {spec.name: pool.submit(self.start_follower_sshd, spec) for spec in self.specs}
            init.result()
            self.start_access_point()
            for spec in self.specs:
                self.followers[spec.name] = FollowerHandle(self, spec, sshds[spec.name].result())
            for future in [pool.submit(f.enroll) for f in self.followers.values()]:
                future.result()
        for follower in self.followers.values():
            follower.start()
        self.wait_health({name: "healthy" for name in self.followers}, timeout=self.start_timeout)
        self._write_fleetctl_config()
        self.startup_seconds = time.monotonic() - started
        return self

    def close(self) -> None:
        """Terminate every process (followers say Goodbye first) and remove the temp dir."""
        try:
            self.group.close()
        finally:
            if self._own_dir is not None:
                self._own_dir.cleanup()
                self._own_dir = None

    # -- how followers run (overridden by harnesses that place them elsewhere) ---------------

    def start_follower_sshd(
        self, spec: FollowerSpec, *, port: int = 0, timeout: float = DEFAULT_START_TIMEOUT
    ) -> RunningSshd:
        """Start the sshd of follower `spec` (again, on `port`, after `kill_sshd`): here, on
        127.0.0.1 in this network namespace."""
        return start_sshd(
            self.base_dir / "sshd" / spec.name,
            port=port,
            group=self.group,
            authorized_keys=[self.leader_public_key],
            timeout=timeout,
        )

    def follower_wrap(self, name: str) -> list[str]:
        """What goes before follower `name`'s daemon command line (here: nothing)."""
        return []

    # -- access point ----------------------------------------------------------------------

    def _init_access_point(self) -> None:
        _run_cli(
            [
                *daemon_argv("ah-access-pointd", self.interpreter),
                "init",
                "--state-dir",
                str(self.ap_dir),
                "--trust-domain",
                self.trust_domain,
                *(["--san", self.bind] if self.bind != "127.0.0.1" else []),
            ],
            env=self.daemon_env,
            what="ah-access-pointd init",
        )
        self._signer = TokenSigner.load(self.ap_dir / TOKEN_KEY_FILE, self.trust_domain)
        self.user_token = self._signer.issue_user(
            "harness", scopes=("exec", "ssh", "read-logs"), ttl="24h"
        )
        self._ssl = ssl.create_default_context(cafile=str(self.ca_path))

    def start_access_point(self, *, same_ports: bool = False, timeout: float = 60.0) -> None:
        """``ah-access-pointd serve`` (ports 0 the first time; the previous ports with
        `same_ports`), waiting for its ready file."""
        if self.access_point is not None and self.access_point.is_running:
            raise RuntimeError("the access point is already running")
        quic_port = self.ready.get("quicPort", 0) if same_ports else 0
        api_port = self.ready.get("apiPort", 0) if same_ports else 0
        connect_port = (self.ready.get("connectPort") or 0) if same_ports else 0
        self.ap_ready_file.unlink(missing_ok=True)
        self.access_point = self.group.start(
            [
                *daemon_argv("ah-access-pointd", self.interpreter),
                "serve",
                "--state-dir",
                str(self.ap_dir),
                "--bind",
                self.bind,
                "--quic-port",
                str(quic_port),
                "--api-port",
                str(api_port),
                "--connect-port",
                str(connect_port),
                "--ready-file",
                str(self.ap_ready_file),
                "--heartbeat-interval",
                self.heartbeat_interval,
            ],
            name="ah-access-pointd",
            env=self.daemon_env,
        )
        self.ready = _wait_ready_file(self.access_point, self.ap_ready_file, timeout)

    def stop_access_point(self, timeout: float = 10.0) -> int | None:
        """SIGTERM the access point (graceful: Goodbye to every follower); its exit status."""
        if self.access_point is None:
            return None
        return self.access_point.terminate(timeout)

    def restart_access_point(self, timeout: float = 60.0) -> int | None:
        """Stop the access point gracefully and serve again on the same ports; returns the
        old process's exit status. Followers reconnect by themselves."""
        status = self.stop_access_point()
        self.start_access_point(same_ports=True, timeout=timeout)
        return status

    def start_relay_access_point(
        self, name: str = "relay-ap", timeout: float = 60.0
    ) -> dict[str, Any]:
        """A second access point of this fleet (a copy of the first's identity: same CA, server
        certificate and token key; no followers of its own), which relays
        ``CONNECT <follower>@<home-ap>:22`` to the first. Returns its ready file (the bound
        ports); it stops with the fleet."""
        state = self.base_dir / name
        state.mkdir()
        for file in IDENTITY_FILES:
            shutil.copy2(self.ap_dir / file, state / file)
        ready_file = self.base_dir / f"{name}-ready.json"
        argv = [
            *daemon_argv("ah-access-pointd", self.interpreter),
            "serve",
            "--state-dir",
            str(state),
            "--bind",
            self.bind,
        ]
        for port in ("--quic-port", "--api-port", "--connect-port"):
            argv += [port, "0"]
        process = self.group.start(
            [*argv, "--ready-file", str(ready_file)],
            name=f"ah-access-pointd-{name}",
            env=self.daemon_env,
        )
        return _wait_ready_file(process, ready_file, timeout)

    # -- facts -----------------------------------------------------------------------------

    @property
    def api_port(self) -> int:
        return int(self.ready["apiPort"])

    @property
    def quic_port(self) -> int:
        return int(self.ready["quicPort"])

    @property
    def connect_port(self) -> int:
        """TCP port of the access point's TLS CONNECT listener."""
        return int(self.ready["connectPort"])

    @property
    def api_url(self) -> str:
        return f"https://{self.bind}:{self.api_port}"

    @property
    def leader_public_key(self) -> Path:
        return self.leader_key.with_name(self.leader_key.name + ".pub")

    @property
    def ssh_user(self) -> str:
        """The account every follower's sshd lets the leader log in as."""
        return next(iter(self.followers.values())).sshd.user if self.followers else ""

    @property
    def ca_path(self) -> Path:
        return self.ap_dir / CA_CERT_FILE

    @property
    def ca_fingerprint(self) -> str:
        return ca_fingerprint(self.ca_path.read_bytes())

    @property
    def signer(self) -> TokenSigner:
        """The access point's token-signing key (for minting tokens in tests)."""
        assert self._signer is not None, "the access point was not initialised"
        return self._signer

    def follower(self, name: str) -> FollowerHandle:
        return self.followers[name]

    def enrollment_token(
        self, name: str, tags: Mapping[str, str] | None = None, ttl: str | float = "10m"
    ) -> str:
        """A fresh one-time enrollment token from the access point's own key."""
        return self.signer.issue_enroll(
            name,
            ca_fingerprint=self.ca_fingerprint,
            tags=dict(tags or {}),
            ttl=ttl,
            access_point=f"{self.bind}:{self.api_port}" if self.ready else None,
        )

    def env(self) -> dict[str, str]:
        """Environment for running ``ah-fleetctl`` against this fleet without flags: AH_HOME
        holds a user config with ``remote-server``, ``token``, ``ca-file``, ``ssh.user``
        and ``ssh.identity-file`` (the leader key every follower's sshd authorizes)."""
        return {
            **_clean_env(),
            "AH_HOME": str(self.home),
            "AH_SYSTEM_CONFIG": str(self.home / "no-system-config.toml"),
        }

    def _write_fleetctl_config(self) -> None:
        write_user_config(
            {
                "remote-server": self.api_url,
                "token": self.user_token,
                "ca-file": str(self.ca_path),
                "ssh.user": self.ssh_user,
                "ssh.identity-file": str(self.leader_key),
                # No background leader agent unless a test asks for one (AH_AGENT_ENABLED):
                # it would outlive the test's processes.
                "agent.enabled": False,
            },
            env={"AH_HOME": str(self.home)},
        )

    # -- REST ------------------------------------------------------------------------------

    def api(
        self, method: str, path: str, body: object = None, *, token: str | None = None
    ) -> tuple[int, Any]:
        """One REST call (``path`` under ``/api/v1``); returns (status, decoded JSON or text)."""
        assert self._ssl is not None
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            f"{self.api_url}/api/v1{path}",
            data=data,
            method=method,
            headers={
                "Authorization": f"Bearer {self.user_token if token is None else token}",
                **({"Content-Type": "application/json"} if data is not None else {}),
            },
        )
        try:
            with urllib.request.urlopen(request, context=self._ssl, timeout=30) as response:
                status, raw = response.status, response.read()
        except urllib.error.HTTPError as exc:
            status, raw = exc.code, exc.read()
        try:
            return status, json.loads(raw)
        except ValueError:
            return status, raw.decode(errors="replace")

    def list_followers(self, tags: Sequence[str] = ()) -> list[dict[str, Any]]:
        """``GET /followers`` (``tags``: ``K=V`` filters); raises on a non-200 answer."""
        query = "&".join(f"tag={urllib.parse.quote(t)}" for t in tags)
        status, body = self.api("GET", "/followers" + (f"?{query}" if query else ""))
        if status != 200:
            raise RuntimeError(f"GET /followers answered {status}: {body}")
        followers: list[dict[str, Any]] = body["followers"]
        return followers

    def health(self) -> dict[str, str]:
        """Follower name → health as the access point reports it (empty while it is down)."""
        try:
            return {f["info"]["name"]: f["health"] for f in self.list_followers()}
        except (OSError, RuntimeError):
            return {}

    def wait_health(self, expected: Mapping[str, str], timeout: float = 30.0) -> dict[str, str]:
        """Until every named follower has the expected health; returns the last snapshot."""
        last: dict[str, str] = {}

        def matches() -> bool:
            nonlocal last
            last = self.health()
            return all(last.get(name) == health for name, health in expected.items())

        try:
            wait_for(matches, timeout, interval=_POLL_S, what=f"follower health {dict(expected)}")
        except TimeoutError as exc:
            logs = "\n".join(
                f.log_text()[-3000:] for f in self.followers.values() if f.name in expected
            )
            ap_log = self.access_point.log_text()[-5000:] if self.access_point else ""
            raise TimeoutError(f"{exc}; last seen {last}\n{ap_log}\n{logs}") from None
        return last

    def wait_until(
        self, predicate: Callable[[dict[str, str]], bool], timeout: float, what: str
    ) -> dict[str, str]:
        """Until `predicate(health snapshot)` holds; returns that snapshot."""
        found: list[dict[str, str]] = []

        def check() -> bool:
            snapshot = self.health()
            if predicate(snapshot):
                found.append(snapshot)
                return True
            return False

        wait_for(check, timeout, interval=_POLL_S, what=what)
        return found[-1]

    def exec_mock(
        self, hosts: Sequence[str], command: Sequence[str], timeout_ms: int | None = None
    ) -> dict[str, dict[str, Any]]:
        """``POST /exec``; host name → its HostExec JSON."""
        body: dict[str, Any] = {"hosts": list(hosts), "command": list(command)}
        if timeout_ms is not None:
            body["timeoutMs"] = timeout_ms
        status, answer = self.api("POST", "/exec", body)
        if status != 200:
            raise RuntimeError(f"POST /exec answered {status}: {answer}")
        return {h["host"]: h for h in answer["hosts"]}
