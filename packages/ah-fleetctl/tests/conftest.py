"""Run the real ``ah-fleetctl`` console script against a real HTTPS API server.

``api`` is a real ``ah_api.ApiServer`` (uvicorn, TLS, 127.0.0.1:0) over an in-memory fleet
whose followers and mock-exec answers each test sets; ``cli`` runs the installed console
script in a subprocess with a private, hermetic environment (``AH_HOME``, ``HOME``, a
non-existent system config, no inherited ``AH_*``/``RUST_LOG``) and stdin closed.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Coroutine, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest

from ah_api import ApiServer, EnrollmentRefused, HostExec, JwtAuthenticator, create_app
from ah_connectivity.pki import FleetCA, issue_server_cert
from ah_connectivity.tokens import TokenSigner, user_audience
from ah_domain_types import (
    EnrollRequest,
    EnrollResponse,
    FollowerHealth,
    FollowerInfo,
    FollowerStatus,
    OsKind,
    Resources,
)
from ah_harness_local import CliResult

TRUST_DOMAIN = "fleetctl-test.fleet"
CLI_TIMEOUT_S = 60.0

_T = TypeVar("_T")


def _console_script() -> list[str]:
    script = Path(sys.executable).parent / "ah-fleetctl"
    if script.is_file():
        return [str(script)]
    found = shutil.which("ah-fleetctl")
    return [found] if found else [sys.executable, "-m", "ah_fleetctl"]


CLI = _console_script()


def hermetic_env(home: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """An environment that sees no configuration but what the test writes."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("AH_") and k not in ("RUST_LOG", "XDG_CONFIG_HOME", "XDG_STATE_HOME")
    }
    env.update(
        HOME=str(home),
        AH_HOME=str(home / "ah-home"),
        AH_SYSTEM_CONFIG=str(home / "no-system-config.toml"),
        NO_COLOR="1",
        PYTHONUNBUFFERED="1",
    )
    env.update(extra or {})
    return env


@dataclass
class Cli:
    """Runs the console script with ``env`` in ``cwd`` (a directory outside any repo)."""

    env: dict[str, str]
    cwd: Path

    @property
    def ah_home(self) -> Path:
        return Path(self.env["AH_HOME"])

    def __call__(
        self,
        *args: str,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        unset: Sequence[str] = (),
        stdin: int = subprocess.DEVNULL,
    ) -> CliResult:
        """Run ``ah-fleetctl ARGS``; stdin is closed unless a file descriptor is given."""
        run_env = {**self.env, **(env or {})}
        for name in unset:
            run_env.pop(name, None)
        done = subprocess.run(
            [*CLI, *args],
            env=run_env,
            cwd=cwd or self.cwd,
            stdin=stdin,
            capture_output=True,
            text=True,
            timeout=CLI_TIMEOUT_S,
            check=False,
        )
        return CliResult(tuple(args), done.returncode, done.stdout, done.stderr)

    def many(self, *calls: Sequence[str], **kwargs: Any) -> list[CliResult]:
        """Run independent invocations concurrently (each pays the interpreter start-up);
        results in the order of ``calls``."""
        with ThreadPoolExecutor(max_workers=len(calls)) as pool:
            return list(pool.map(lambda args: self(*args, **kwargs), calls))


@pytest.fixture
def cli(tmp_path: Path) -> Cli:
    home = tmp_path / "home"
    work = tmp_path / "work"
    home.mkdir()
    work.mkdir()
    return Cli(env=hermetic_env(home), cwd=work)


# --------------------------------------------------------------------------- API server


def follower(
    name: str,
    os: OsKind = OsKind.LINUX,
    arch: str = "x86_64",
    tags: dict[str, str] | None = None,
    health: FollowerHealth = FollowerHealth.HEALTHY,
    last_heartbeat_ms: int | None = 1_700_000_000_000,
) -> FollowerStatus:
    info = FollowerInfo(
        name=name,
        os=os,
        arch=arch,
        tags=tags or {},
        resources=Resources(cpus=2, memory_mb=4096),
        host_key_fingerprint="SHA256:uNiVztksCsDhcc0u9e8BujQXVUpKZIDTMczCvj3tD2s",
        direct_address=None,
        workspace=f"/srv/{name}/ws",
        version="0.1.0",
    )
    return FollowerStatus(
        info=info,
        health=health,
        last_heartbeat_ms=last_heartbeat_ms,
        connected_since_ms=None,
    )


@dataclass
class InMemoryFleet:
    """The access point's fleet state for the API (implements ``ah_api.FleetBackend``).

    Mock exec answers ``HOST: ARGV`` on stdout and exit code ``exit_codes[host]`` (0 when
    absent); offline followers are unreachable.
    """

    ca: FleetCA
    followers: list[FollowerStatus] = field(default_factory=list)
    exit_codes: dict[str, int] = field(default_factory=dict)
    exec_calls: list[tuple[list[str], list[str], int | None]] = field(default_factory=list)

    def list_followers(self) -> list[FollowerStatus]:
        return list(self.followers)

    async def exec_mock(
        self, hosts: list[str], command: list[str], timeout_ms: int | None
    ) -> list[HostExec]:
        self.exec_calls.append((hosts, command, timeout_ms))
        health = {f.info.name: f.health for f in self.followers}
        results = []
        for host in hosts:
            if health[host] is FollowerHealth.OFFLINE:
                results.append(
                    HostExec(
                        host=host,
                        state="unreachable",
                        exit_code=None,
                        stdout="",
                        stderr="",
                        took_ms=0,
                        error=f"{host} is offline",
                    )
                )
                continue
            code = self.exit_codes.get(host, 0)
            results.append(
                HostExec(
                    host=host,
                    state="ok" if code == 0 else "failed",
                    exit_code=code,
                    stdout=f"{host}: {' '.join(command)}\n",
                    stderr="" if code == 0 else f"{host}: exiting with {code}\n",
                    took_ms=2,
                )
            )
        return results

    async def enroll(self, req: EnrollRequest) -> EnrollResponse:
        raise EnrollmentRefused("unknown", "enrollment is not part of these tests")

    def ca_pem(self) -> str:
        return self.ca.cert_pem.decode()

    def ca_fingerprint(self) -> str:
        return self.ca.fingerprint

    def is_ready(self) -> bool:
        return True


class LoopThread:
    """An asyncio loop in a daemon thread so synchronous tests can drive the server."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, _T], timeout: float = 30.0) -> _T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


@dataclass
class RunningApi:
    url: str
    port: int
    fleet: InMemoryFleet
    ca: FleetCA
    ca_file: Path
    signer: TokenSigner

    @property
    def fingerprint(self) -> str:
        return self.ca.fingerprint

    def token(self, *scopes: str, hosts: str = "*", ttl: str = "1h") -> str:
        return self.signer.issue_user("tester", scopes=scopes or ("exec",), hosts=hosts, ttl=ttl)

    def env(self, token: str | None = None) -> dict[str, str]:
        """Variables pointing ah-fleetctl at this server with a full-scope token."""
        return {
            "AH_REMOTE_SERVER": self.url,
            "AH_TOKEN": token or self.token("exec", "read-logs"),
            "AH_CA_FILE": str(self.ca_file),
        }


@pytest.fixture(scope="session")
def _api_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningApi]:
    directory = tmp_path_factory.mktemp("fleetctl-api")
    ca = FleetCA.generate(TRUST_DOMAIN)
    certfile, keyfile, ca_file = directory / "api.pem", directory / "api.key", directory / "ca.pem"
    issue_server_cert(ca).write(certfile, keyfile)
    ca_file.write_bytes(ca.cert_pem)
    signer = TokenSigner.generate(TRUST_DOMAIN)
    fleet = InMemoryFleet(ca=ca)
    app = create_app(
        fleet, JwtAuthenticator(signer.verifier(), user_audience(TRUST_DOMAIN)), version="test"
    )
    server = ApiServer(app, certfile=certfile, keyfile=keyfile)
    loop = LoopThread()
    try:
        port = loop.run(server.start("127.0.0.1", 0))
        try:
            yield RunningApi(f"https://127.0.0.1:{port}", port, fleet, ca, ca_file, signer)
        finally:
            loop.run(server.stop())
    finally:
        loop.close()


def default_followers() -> list[FollowerStatus]:
    return [
        follower("lin-a", OsKind.LINUX, "x86_64", {"pool": "ci"}),
        follower("lin-b", OsKind.LINUX, "arm64", {"pool": "ci", "gpu": "yes"}),
        follower("mac-1", OsKind.MACOS, "arm64", {"pool": "dev"}, FollowerHealth.UNHEALTHY),
    ]


@pytest.fixture
def api(_api_server: RunningApi) -> RunningApi:
    """The session's server with its fleet reset to three followers (lin-a, lin-b, mac-1)."""
    _api_server.fleet.followers = default_followers()
    _api_server.fleet.exit_codes = {}
    _api_server.fleet.exec_calls.clear()
    return _api_server


# --------------------------------------------------------------------------- LocalFleet


@dataclass
class RealFleet:
    """A LocalFleet (real access point + followers) and a Cli pointed at it by AH_HOME."""

    fleet: Any  # ah_harness_local.fleet.LocalFleet
    cli: Cli


FLEET_SPECS: tuple[tuple[str, dict[str, str], str | None, int], ...] = (
    # name, tags, OS override, mock exit code
    ("alpha", {"pool": "ci"}, None, 0),
    ("bravo", {"pool": "ci", "gpu": "yes"}, None, 0),
    ("charlie", {"pool": "dev"}, "macos", 3),
)


@pytest.fixture(scope="session")
def real_fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealFleet]:
    """One fleet for the session: alpha and bravo (pool=ci) answer 0, charlie (pool=dev,
    reporting macOS) answers 3 to every mock exec."""
    from ah_harness_local.fleet import FollowerSpec, LocalFleet

    base = tmp_path_factory.mktemp("fleet")
    specs = [
        FollowerSpec(name, tags=tags, os=os_name, mock_exit_code=code)
        for name, tags, os_name, code in FLEET_SPECS
    ]
    with LocalFleet(specs, base_dir=base) as fleet:
        work = base / "work"
        work.mkdir()
        env = {**fleet.env(), "NO_COLOR": "1", "HOME": str(base)}
        env.pop("RUST_LOG", None)
        yield RealFleet(fleet=fleet, cli=Cli(env=env, cwd=work))
