"""Fan-out latency: ``true`` on 16 local followers, ah-fleetctl next to the usual tools.

A real fleet (``LocalFleet``: an access point and 16 followers, each with its own real
OpenSSH sshd on 127.0.0.1) and these ways of running ``true`` on all 16 at once, each
repeated ``--rounds`` times (median reported):

* **ah run (CLI), cold** — ``ah-fleetctl run --no-fence --json -- true`` as a fresh
  process with the leader agent off (the fleet's config): Python start-up and imports, the
  follower list over HTTPS, path selection and 16 new SSH transports (handshake, host-key
  check, public-key login), one exec channel each, the session's events pushed to the access
  point, summary.
* **ah run (CLI), warm via agent** — the same command typed again while the leader agent
  (``ah-fleetctl agent``, started by the first run) holds the transports: the process
  takes the thin path (:mod:`ah_fleetctl.thin`, standard library only), hands the run to
  the agent over its unix socket and prints what the agent streams. Process start to exit;
  this is what a user or a coding agent pays per invocation.
* **ah library, cold** — the same inside one process, without interpreter start-up or the
  REST call: ``FleetLinks.open`` (16 new transports) + ``RunEngine`` + close.
* **ah library, warm transports** — ``RunEngine`` over transports already open
  (``FleetLinks`` kept across rounds), in-process: no interpreter, no socket hop.

Every ah CLI row runs ``ah-fleetctl`` as a user has it after ``pip install ah-fleetctl``:
the script builds wheels of this checkout's packages and installs them (not editable) into
the benchmark environment (``--venv-dir``, next to the peers), then runs that venv's console
script directly, not through ``uv run`` (which adds its own start-up); the leader agent it
starts runs from there too. ``--cli dev`` runs the workspace's own ``.venv/bin/ah-fleetctl``
instead, where every package is an *editable* install: twelve ``.pth`` files (which CPython's
``site`` reads twice in a venv) and twelve more ``sys.path`` entries that every import
scans, ~2-3 ms more per process start that no user pays. Bytecode is cached as an installed
tool has it (``PYTHONDONTWRITEBYTECODE`` is removed for those processes; a first, uncounted
round writes the cache). ``--no-fence`` everywhere: the peers do not sync or verify a tree
first.

* **OpenSSH, cold** — 16 ``ssh ... true`` in parallel (asyncio subprocesses), each a new
  connection (``ControlMaster no``).
* **OpenSSH ControlMaster, warm** — the same through masters already established
  (``ControlMaster auto``/``ControlPersist``, the config ``FleetLinks.ssh_config`` writes).
* **parallel-ssh, cold / warm** — ``ParallelSSHClient`` inside one Python process that
  is already running (interpreter start-up and imports not counted): a fresh client per
  round (new connections), or one client reused (warm: connections kept),
  ``run_command("true")`` + ``join``.
* **ansible, -m raw** — ``ansible all -m raw -a true -f 16`` as a fresh process (ansible's
  own OpenSSH ControlPersist is on, so after the first round its connections are warm).

The cold rows (and ansible) run as one block of rounds each. The warm rows — both ``warm via
agent`` rows, the warm library, OpenSSH ControlMaster and parallel-ssh's reused client (kept
in a process of its own, asked for one round at a time) — take turns: in its turn a row runs
one uncounted round, then three counted ones back to back, and the order of the rows rotates
every cycle (`interleaved`). Back to back, each tool pays for its own leftovers (sshd sessions
ending, session events sent after the answer) as in repeated use; in turns, every ratio
compares rounds taken under the same conditions (on a shared 2-core VM a block measured a
minute later can be 10-20 % slower or faster, which moves a ratio more than most changes
do). Strictly alternating single rounds would charge each row with the previous row's
leftovers instead: measured that way, parallel-ssh's rounds (whose sshd sessions end after
its answer) looked 35 % faster and ah's 40 % slower.

parallel-ssh and ansible-core, and ah from this checkout's wheels, are installed into a
throwaway virtual environment this script creates with ``uv venv`` (the interpreter the script
runs with) under ``--venv-dir`` (default: the user cache), never into the workspace; ah's
wheels are rebuilt and reinstalled on every run, the peers and third-party packages only
installed once. The fleet's daemons (access point, followers) run from that environment too,
as on machines where ah is installed (``--cli dev``: from the workspace). Host keys: ah and
OpenSSH pin them; parallel-ssh does not check them (its
default); ansible uses a known_hosts file written from the verified keys.

Also printed, not compared: the floor of any CLI row (``python -c pass`` with the same
interpreter and site) and how many modules the thin path imported (``-X importtime``).

By default the ah CLI rows are measured twice, once reaching the followers directly (as the
peers do) and once only through the access point's CONNECT tunnel (``--path both``; the
issue's setting: followers behind NAT are reached that way); the target is checked for each.

    uv run python benchmarks/fanout.py [--followers 16] [--rounds 5] [--path direct|connect|both]
        [--cli installed|dev] [--skip-peers] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import email.parser
import functools
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import msgspec
from loguru import logger

from ah_domain_types import FollowerStatus, OsKind
from ah_fleetctl.dataplane import DirectConnector, FleetLinks, ssh_alias, stop_control_masters
from ah_harness_local.agent_fleet import HEAVY_MODULES
from ah_harness_local.fleet import FollowerSpec, LocalFleet
from ah_run_everywhere import RunEngine, TargetHost
from ah_run_everywhere.ssh_executor import SshExecutor

PEER_PACKAGES = ("parallel-ssh", "ansible-core")


def default_venv_dir() -> Path:
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "agent-harbor" / "bench-fanout-venv"


WORKSPACE = Path(__file__).resolve().parents[1]


def default_scratch_dir() -> Path:
    """Where the benchmark's fleet and the leader's state go: a tmpfs when there is one
    (``/dev/shm``), else the system's temporary directory. Why not the disk: see
    `run_dir_cost_ms` and the benchmarks README."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        return shm
    return Path(tempfile.gettempdir())


def run_dir_cost_ms(base: Path, hosts: int = 16, samples: int = 9) -> float:
    """Median CPU (ms) to create what the leader creates for every run under ``base``: a
    run directory with one log file per host. On a disk that behaves it is well under a
    millisecond; on the development VM's journal-less ext4 it was 10-20 ms for minutes
    after many files were deleted (a new inode skips every recently deleted one)."""
    base.mkdir(parents=True, exist_ok=True)
    costs = []
    with tempfile.TemporaryDirectory(prefix="ah-rundir-cost-", dir=base) as tmp:
        for i in range(samples):
            started = time.process_time()
            run = os.path.join(tmp, f"run{i}")
            os.mkdir(run)
            for h in range(hosts):
                os.close(os.open(os.path.join(run, f"h{h:02d}.log"), os.O_WRONLY | os.O_CREAT))
            costs.append(time.process_time() - started)
    return statistics.median(costs) * 1000.0


def base_interpreter(python: Path | str) -> tuple[str, str]:
    """The interpreter behind ``python`` (a venv's python resolves to the one it was made
    from) and its version: what the benchmark environment is keyed on."""
    script = "import os, sys; print(os.path.realpath(sys._base_executable), sys.version.split()[0])"
    done = subprocess.run(
        [str(python), "-c", script],
        capture_output=True,
        text=True,
        check=True,
    )
    path, version = done.stdout.split()
    return path, version


def ensure_bench_venv(venv: Path, *, peers: bool, interpreter: Path | None = None) -> Path:
    """The benchmark environment (made once per interpreter: ``interpreter``, default the
    one running this script; an environment made from another is made anew): with
    parallel-ssh and ansible-core when ``peers``; returns its python."""
    python = venv / "bin" / "python"
    wanted = base_interpreter(interpreter or sys.executable)
    if python.exists() and base_interpreter(python) != wanted:
        shutil.rmtree(venv)
    if not python.exists():
        subprocess.run(["uv", "venv", "--quiet", "--python", wanted[0], str(venv)], check=True)
    if peers:
        probe = subprocess.run(
            [str(python), "-c", "import pssh, ansible"], capture_output=True, check=False
        )
        if probe.returncode != 0:
            subprocess.run(
                ["uv", "pip", "install", "--quiet", "--python", str(python), *PEER_PACKAGES],
                check=True,
            )
    return python


def _wheel_requirements(wheel: Path) -> list[str]:
    """The distribution names a wheel requires (its METADATA's ``Requires-Dist``)."""
    name = wheel.name.split("-")[0]
    with zipfile.ZipFile(wheel) as archive:
        metadata = archive.read(f"{name}-{wheel.name.split('-')[1]}.dist-info/METADATA")
    message = email.parser.BytesParser().parsebytes(metadata)
    return [
        re.split(r"[\s;<>=!~\[(]", value, maxsplit=1)[0].lower().replace("_", "-")
        for value in message.get_all("Requires-Dist") or []
    ]


def install_ah_from_wheels(python: Path) -> list[str]:
    """Build this checkout's wheels and install ``ah-fleetctl`` and the ah packages it needs
    (not editable: as ``pip install ah-fleetctl`` gives it) with ``python``; returns them."""
    with tempfile.TemporaryDirectory(prefix="ah-fanout-wheels-") as out:
        subprocess.run(
            ["uv", "build", "--quiet", "--all-packages", "--wheel", "-o", out],
            cwd=WORKSPACE,
            check=True,
        )
        wheels = {w.name.split("-")[0].replace("_", "-"): w for w in Path(out).glob("*.whl")}
        needed: list[str] = []
        todo = ["ah-fleetctl"]
        while todo:
            name = todo.pop()
            if name in needed:
                continue
            needed.append(name)
            todo += [r for r in _wheel_requirements(wheels[name]) if r in wheels]
        reinstall = [arg for name in needed for arg in ("--reinstall-package", name)]
        subprocess.run(
            ["uv", "pip", "install", "--quiet", "--no-sources", "--python", str(python),
             *reinstall, *(str(wheels[name]) for name in needed)],
            check=True,
        )  # fmt: skip
    return sorted(needed)


def median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1000.0


# --------------------------------------------------------------------------- ah


CLI_PYTHON = Path(sys.executable)
"""The interpreter whose environment's ``ah-fleetctl`` the CLI rows run (``--cli``)."""


def fleetctl_argv() -> list[str]:
    script = CLI_PYTHON.parent / "ah-fleetctl"
    return [str(script)] if script.is_file() else [str(CLI_PYTHON), "-m", "ah_fleetctl"]


def cli_env(fleet: LocalFleet, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {**fleet.env(), "NO_COLOR": "1", **(extra or {})}
    # As installed: bytecode cached (a first, uncounted round writes it).
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def ah_cli_round(env: dict[str, str], work: Path, hosts: int) -> float:
    started = time.perf_counter()
    done = subprocess.run(
        [*fleetctl_argv(), "run", "--no-fence", "--json", "--", "true"],
        env=env,
        cwd=work,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    took = time.perf_counter() - started
    summary = json.loads(done.stdout)["summary"] if done.stdout.strip() else {}
    if done.returncode != 0 or summary.get("succeeded") != hosts:
        raise RuntimeError(f"ah-fleetctl run failed ({done.returncode}): {done.stderr[-2000:]}")
    return took


def _imported(argv: list[str], env: dict[str, str] | None, cwd: Path | None) -> list[str]:
    done = subprocess.run(
        [str(CLI_PYTHON), "-X", "importtime", *argv],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"{argv} failed ({done.returncode}): {done.stderr[-2000:]}")
    return [
        line.rsplit("|", 1)[-1].strip()
        for line in done.stderr.splitlines()
        if line.startswith("import time:") and "|" in line
    ]


def thin_path_imports(env: dict[str, str], work: Path) -> list[str]:
    """Modules a warm ``run`` (the console script) imported beyond interpreter start-up;
    fails if it was not the thin path."""
    script = fleetctl_argv()
    if len(script) != 1:
        script = ["-m", "ah_fleetctl"]
    modules = _imported([*script, "run", "--no-fence", "--", "true"], env, work)
    baseline = set(_imported(["-c", "pass"], env, work))
    heavy = HEAVY_MODULES & set(modules)
    if heavy:
        raise RuntimeError(f"the warm run did not take the thin path: it imported {heavy}")
    return [m for m in modules if m not in baseline]


def agent_path_methods(env: dict[str, str], work: Path) -> dict[str, int]:
    """How the agent reaches the followers (``paths --json``): method -> followers."""
    done = subprocess.run(
        [*fleetctl_argv(), "paths", "--json"],
        env=env,
        cwd=work,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"ah-fleetctl paths failed ({done.returncode}): {done.stderr[-2000:]}")
    methods: dict[str, int] = {}
    for path in json.loads(done.stdout)["paths"]:
        methods[str(path["method"])] = methods.get(str(path["method"]), 0) + 1
    return methods


def stop_agents(runtime: Path) -> None:
    from ah_fleetctl.agent import AgentClient

    async def stop(path: Path) -> None:
        with contextlib.suppress(OSError):
            await AgentClient(path).shutdown()

    for sock in (runtime / "agent-harbor" / "agents").glob("*.sock"):
        asyncio.run(stop(sock))


def agent_interpreter(runtime: Path) -> str:
    """The interpreter the leader agent under ``runtime`` runs (its argv[0], from its ping's
    pid): the CLI starts it with its own."""
    from ah_fleetctl.agent import AgentClient

    (sock,) = (runtime / "agent-harbor" / "agents").glob("*.sock")
    pid = asyncio.run(AgentClient(sock).ping()).pid
    return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()


def python_floor(rounds: int) -> list[float]:
    samples = []
    for _ in range(rounds):
        started = time.perf_counter()
        subprocess.run([str(CLI_PYTHON), "-c", "pass"], check=True)
        samples.append(time.perf_counter() - started)
    return samples


async def _library_once(links: FleetLinks, targets: list[TargetHost], *, warm: bool) -> None:
    executor = SshExecutor(links.transports, warm=warm)
    envelope = await RunEngine(executor, targets, [["true"]]).run()
    if envelope.summary.succeeded != len(targets):
        raise RuntimeError(f"library run failed: {envelope.summary}")


async def ah_library_cold(
    followers: list[FollowerStatus], connector: DirectConnector, rounds: int
) -> list[float]:
    targets = [TargetHost(name=f.info.name, os=OsKind.LINUX) for f in followers]
    cold: list[float] = []
    for _ in range(rounds):
        started = time.perf_counter()
        links = await FleetLinks.open(followers, connector, connect_timeout=30)
        try:
            if links.unreachable:
                raise RuntimeError(f"unreachable: {links.unreachable}")
            # One run per transport: exec channels, as the cold CLI.
            await _library_once(links, targets, warm=False)
        finally:
            await links.close()
        cold.append(time.perf_counter() - started)
    return cold


class LibraryWarm:
    """``RunEngine`` over transports kept open (its own event loop, kept across rounds)."""

    def __init__(self, followers: list[FollowerStatus], connector: DirectConnector) -> None:
        self.loop = asyncio.new_event_loop()
        self.targets = [TargetHost(name=f.info.name, os=OsKind.LINUX) for f in followers]
        self.links = self.loop.run_until_complete(
            FleetLinks.open(followers, connector, connect_timeout=30)
        )
        self.loop.run_until_complete(_library_once(self.links, self.targets, warm=True))

    def round(self) -> float:
        started = time.perf_counter()
        self.loop.run_until_complete(_library_once(self.links, self.targets, warm=True))
        return time.perf_counter() - started

    def close(self) -> None:
        self.loop.run_until_complete(self.links.close())
        self.loop.close()


# --------------------------------------------------------------------------- OpenSSH


async def openssh_round(config: Path, names: list[str], extra: list[str]) -> float:
    ssh = shutil.which("ssh") or "ssh"
    started = time.perf_counter()
    procs = [
        await asyncio.create_subprocess_exec(
            ssh,
            "-F",
            str(config),
            *extra,
            ssh_alias(name),
            "true",
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        for name in names
    ]
    results = await asyncio.gather(*(p.communicate() for p in procs))
    took = time.perf_counter() - started
    failed = [
        (n, p.returncode, r[1])
        for n, p, r in zip(names, procs, results, strict=True)
        if p.returncode
    ]
    if failed:
        raise RuntimeError(f"ssh failed: {failed[:3]}")
    return took


def openssh_cold(config: Path, names: list[str], rounds: int) -> list[float]:
    no_master = ["-o", "ControlMaster=no", "-o", "ControlPath=none"]
    return [asyncio.run(openssh_round(config, names, no_master)) for _ in range(rounds)]


class OpenSshWarm:
    """16 ``ssh`` processes through ControlMaster connections established first."""

    def __init__(self, config: Path, names: list[str]) -> None:
        self.config, self.names = config, names
        asyncio.run(openssh_round(config, names, []))  # establishes the masters

    def round(self) -> float:
        return asyncio.run(openssh_round(self.config, self.names, []))

    def close(self) -> None:
        stop_control_masters(self.config, self.names)


# --------------------------------------------------------------------------- parallel-ssh

PSSH_SCRIPT = textwrap.dedent(
    """
    import json, sys, time
    spec = json.loads(sys.argv[1])
    from pssh.clients import ParallelSSHClient
    from pssh.config import HostConfig

    def client():
        configs = [HostConfig(port=p, user=spec["user"], private_key=spec["key"]) for p in spec["ports"]]
        return ParallelSSHClient(["127.0.0.1"] * len(configs), host_config=configs,
                                 pool_size=len(configs), num_retries=1, timeout=30)

    def once(c):
        output = c.run_command("true")
        c.join(output)
        codes = [o.exit_code for o in output]
        if codes != [0] * len(codes):
            raise SystemExit(f"parallel-ssh: exit codes {codes} {[o.exception for o in output]}")

    if spec["mode"] == "cold":
        cold = []
        for _ in range(spec["rounds"]):
            t = time.perf_counter(); c = client(); once(c); cold.append(time.perf_counter() - t)
            del c
        print(json.dumps(cold))
    else:  # warm: one round per line on stdin, its time on stdout
        c = client(); once(c)
        print("ready", flush=True)
        for _ in sys.stdin:
            t = time.perf_counter(); once(c)
            print(time.perf_counter() - t, flush=True)
    """
)


def _pssh_spec(fleet: LocalFleet, mode: str, rounds: int = 0) -> str:
    return json.dumps({
        "ports": [f.sshd.port for f in fleet.followers.values()],
        "user": fleet.ssh_user, "key": str(fleet.leader_key), "mode": mode, "rounds": rounds,
    })  # fmt: skip


def parallel_ssh_cold(python: Path, fleet: LocalFleet, rounds: int) -> list[float]:
    done = subprocess.run(
        [str(python), "-c", PSSH_SCRIPT, _pssh_spec(fleet, "cold", rounds)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"parallel-ssh failed: {done.stderr[-3000:]}")
    return [float(x) for x in json.loads(done.stdout.strip().splitlines()[-1])]


class ParallelSshWarm:
    """One ``ParallelSSHClient`` kept in a process of its own; a round per request (its
    in-process time, as the client reports it)."""

    def __init__(self, python: Path, fleet: LocalFleet) -> None:
        self.proc = subprocess.Popen(
            [str(python), "-c", PSSH_SCRIPT, _pssh_spec(fleet, "warm")],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdin is not None and self.proc.stdout is not None
        if self.proc.stdout.readline().strip() != "ready":
            raise RuntimeError("parallel-ssh: the warm client did not start")

    def round(self) -> float:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("round\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"parallel-ssh: the warm client ended ({self.proc.wait()})")
        return float(line)

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(30)


class CliWarm:
    """``ah-fleetctl run`` as a new process each round, with a leader agent running: the
    first run of the turn starts the agent (the full CLI), the second takes the thin path;
    neither is counted. The agent stops at the end of the turn."""

    def __init__(self, env: dict[str, str], work: Path, hosts: int, runtime: Path) -> None:
        self.env, self.work, self.hosts, self.runtime = env, work, hosts, runtime
        ah_cli_round(env, work, hosts)  # starts the agent, records the thin index
        ah_cli_round(env, work, hosts)

    def round(self) -> float:
        return ah_cli_round(self.env, self.work, self.hosts)

    def close(self) -> None:
        stop_agents(self.runtime)


class WarmRow(Protocol):
    def round(self) -> float: ...
    def close(self) -> None: ...


INTERLEAVE_BLOCK = 3
"""Counted rounds per row in a row's turn (after its set-up and one uncounted round)."""


def interleaved(rows: dict[str, Callable[[], WarmRow]], rounds: int) -> dict[str, list[float]]:
    """At least ``rounds`` rounds of every row, taken in turns. In its turn a row sets up
    (connections, agent, client: nothing of another row is open meanwhile), runs one
    uncounted round, then `INTERLEAVE_BLOCK` counted ones back to back, and closes; the order
    of the rows rotates every cycle. Back to back, as a user repeating a command (or
    hyperfine) sees it: each tool pays for its own leftovers (sshd sessions ending, events
    sent after the answer). In turns, so every row meets the same machine (load, other
    tenants) over the same stretch of time, and a ratio does not depend on when each row
    ran."""
    names = list(rows)
    samples: dict[str, list[float]] = {name: [] for name in names}
    cycles = -(-rounds // INTERLEAVE_BLOCK)
    for i in range(cycles):
        shift = i % len(names)
        for name in names[shift:] + names[:shift]:
            row = rows[name]()
            try:
                row.round()
                samples[name] += [row.round() for _ in range(INTERLEAVE_BLOCK)]
            finally:
                row.close()
    return samples


# --------------------------------------------------------------------------- ansible


def ansible(
    python: Path, fleet: LocalFleet, known_hosts: Path, scratch: Path, rounds: int
) -> list[float]:
    inventory = scratch / "inventory.ini"
    lines = ["[fleet]"]
    for name, follower in fleet.followers.items():
        lines.append(
            f"{name} ansible_host=127.0.0.1 ansible_port={follower.sshd.port} "
            f"ansible_user={fleet.ssh_user} ansible_ssh_private_key_file={fleet.leader_key}"
        )
    inventory.write_text("\n".join(lines) + "\n")
    env = {
        **os.environ,
        "ANSIBLE_HOST_KEY_CHECKING": "True",
        "ANSIBLE_SSH_ARGS": (
            f"-o UserKnownHostsFile={known_hosts} -o GlobalKnownHostsFile=/dev/null "
            "-o IdentitiesOnly=yes -o ControlMaster=auto -o ControlPersist=60s"
        ),
        "ANSIBLE_SSH_CONTROL_PATH_DIR": str(scratch / "cp"),
        "ANSIBLE_LOCAL_TEMP": str(scratch / "tmp"),
        "ANSIBLE_HOME": str(scratch / "home"),
        "ANSIBLE_CONFIG": str(scratch / "none.cfg"),
    }
    argv = [
        str(python.parent / "ansible"), "all", "-i", str(inventory),
        "-m", "raw", "-a", "true", "-f", str(len(fleet.followers)), "-o",
    ]  # fmt: skip
    samples: list[float] = []
    for _ in range(rounds):
        started = time.perf_counter()
        done = subprocess.run(
            argv, env=env, capture_output=True, text=True, timeout=300, check=False
        )
        samples.append(time.perf_counter() - started)
        if done.returncode != 0:
            raise RuntimeError(f"ansible failed: {done.stdout[-2000:]}{done.stderr[-2000:]}")
    return samples


# --------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--followers", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--venv-dir", type=Path, default=default_venv_dir())
    parser.add_argument("--skip-peers", action="store_true", help="only ah and OpenSSH")
    parser.add_argument(
        "--path",
        choices=("direct", "connect", "both"),
        default="both",
        help="how the ah CLI rows reach the followers: direct TCP (as the peers do; the "
        "path policy's first choice for 127.0.0.1), only through the access point's "
        "CONNECT tunnel (direct disallowed), or both (default: one pair of rows each). "
        "The library rows always link directly.",
    )
    parser.add_argument(
        "--cli",
        choices=("installed", "dev"),
        default="installed",
        help="which ah-fleetctl the CLI rows run: this checkout's wheels installed into the "
        "benchmark environment (default: what pip install gives a user), or the workspace "
        "venv's editable install",
    )
    parser.add_argument(
        "--scratch-dir",
        type=Path,
        default=default_scratch_dir(),
        help="where the fleet (access point, followers, their sshd) and the leader's state "
        "(run logs, session-event copies) are made; default: /dev/shm when there is one. "
        "The leader creates a run directory with a log per host on every run; the report "
        "prints what that costs here and on the disk",
    )
    parser.add_argument(
        "--python",
        type=Path,
        default=None,
        help="the interpreter of the benchmark environment (the CLI rows, the leader agent, "
        "the fleet's daemons, parallel-ssh, ansible); default: the one running this script. "
        "Builds differ a lot (on the reference VM, Debian's static, optimised python3.11 "
        "starts in ~12 ms, a pyenv build with a shared libpython in ~15-21 ms, and runs "
        "Python code slower)",
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.python is not None and args.cli == "dev":
        parser.error(
            "--python applies to the benchmark environment; --cli dev runs the workspace's"
        )

    global CLI_PYTHON
    bench_python = None
    if args.cli == "installed" or not args.skip_peers:
        bench_python = ensure_bench_venv(
            args.venv_dir, peers=not args.skip_peers, interpreter=args.python
        )
    python = None if args.skip_peers else bench_python
    if args.cli == "installed":
        assert bench_python is not None
        installed = install_ah_from_wheels(bench_python)
        CLI_PYTHON = bench_python
        cli_what = (
            f"ah-fleetctl installed from this checkout's wheels ({len(installed)} ah packages, "
            f"not editable, as pip install gives it) into {args.venv_dir}"
        )
    else:
        cli_what = (
            f"the workspace venv's editable install ({Path(sys.executable).parent / 'ah-fleetctl'})"
        )
    # The daemons run from the CLI's environment: the same wheels and interpreter, as on a
    # machine where ah is installed (the workspace's interpreter may be another build).
    fleet_python = CLI_PYTHON if args.cli == "installed" else None
    logger.remove()  # the library's debug lines would drown the table
    logger.add(sys.stderr, level="WARNING")
    load_before = os.getloadavg()
    rows: dict[str, list[float]] = {}
    specs = [FollowerSpec(f"f{i:02d}") for i in range(args.followers)]
    disk = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "agent-harbor"
    run_dir_costs = {
        f"the scratch dir ({args.scratch_dir})": run_dir_cost_ms(args.scratch_dir),
        f"the disk ({disk})": run_dir_cost_ms(disk),
    }
    with tempfile.TemporaryDirectory(prefix="ah-fanout-", dir=args.scratch_dir) as tmp:
        scratch = Path(tmp)
        started = time.perf_counter()
        with LocalFleet(specs, base_dir=scratch / "fleet", heartbeat_interval="2s",
                        start_timeout=180, interpreter=fleet_python) as fleet:  # fmt: skip
            print(f"fleet of {args.followers} up in {time.perf_counter() - started:.1f}s",
                  file=sys.stderr)  # fmt: skip
            work = scratch / "leader"
            work.mkdir()
            followers = msgspec.convert(fleet.list_followers(), list[FollowerStatus])
            connector = DirectConnector(fleet.ssh_user, fleet.leader_key)
            names = [f.info.name for f in followers]

            thin_modules: list[str] = []
            methods: dict[str, dict[str, int]] = {}
            agent_python = ""
            runtimes: list[Path] = []
            warm_rows: dict[str, Callable[[], WarmRow]] = {}
            try:
                # Cold rows first, each a block of rounds; then every warm row, in turns.
                for path in ("direct", "connect") if args.path == "both" else (args.path,):
                    policy = {"AH_PATH_POLICY_ALLOW_DIRECT": "false"} if path == "connect" else {}
                    via = " via CONNECT" if path == "connect" else ""
                    env = cli_env(fleet, policy)
                    ah_cli_round(env, work, args.followers)  # warm-up: bytecode, page cache
                    rows[f"ah run (CLI){via}, cold"] = [
                        ah_cli_round(env, work, args.followers) for _ in range(args.rounds)
                    ]
                    # The leader agent: private runtime dir (its socket, the thin index),
                    # short path for sockaddr_un; the first run starts it and records the
                    # thin index. The path policy is part of the agent's key: each path gets
                    # its own agent, started anew in each of its turns.
                    runtime = Path(tempfile.mkdtemp(prefix="ahf-", dir="/tmp"))
                    runtimes.append(runtime)
                    agent_env = cli_env(
                        fleet,
                        {
                            "AH_AGENT_ENABLED": "true",
                            "AH_AGENT_IDLE": "600s",
                            "XDG_RUNTIME_DIR": str(runtime),
                            **policy,
                        },
                    )
                    ah_cli_round(agent_env, work, args.followers)  # starts the agent
                    ah_cli_round(agent_env, work, args.followers)  # not counted
                    thin_modules = thin_path_imports(agent_env, work)
                    methods[path] = agent_path_methods(agent_env, work)
                    agent_python = agent_interpreter(runtime)
                    stop_agents(runtime)
                    warm_rows[f"ah run (CLI){via}, warm via agent"] = functools.partial(
                        CliWarm, agent_env, work, args.followers, runtime
                    )
                floor = python_floor(args.rounds)
                rows["ah library, cold (in-process)"] = asyncio.run(
                    ah_library_cold(followers, connector, args.rounds)
                )

                async def ssh_config() -> Path:
                    async with await FleetLinks.open(followers, connector) as links:
                        return links.ssh_config(scratch / "ssh_config")

                config = asyncio.run(ssh_config())
                rows["OpenSSH parallel, cold"] = openssh_cold(config, names, args.rounds)
                if python is not None:
                    rows["parallel-ssh, cold"] = parallel_ssh_cold(python, fleet, args.rounds)
                    known = config.with_name(config.name + ".known_hosts")
                    rows["ansible -m raw (CLI)"] = ansible(
                        python, fleet, known, scratch, args.rounds
                    )
                warm_rows["ah library, warm transports (in-process)"] = functools.partial(
                    LibraryWarm, followers, connector
                )
                warm_rows["OpenSSH ControlMaster parallel, warm"] = functools.partial(
                    OpenSshWarm, config, names
                )
                if python is not None:
                    warm_rows["parallel-ssh, warm client"] = functools.partial(
                        ParallelSshWarm, python, fleet
                    )
                rows.update(interleaved(warm_rows, args.rounds))
            finally:
                for runtime in runtimes:
                    stop_agents(runtime)
                    shutil.rmtree(runtime, ignore_errors=True)

    order = [
        "ah run (CLI), cold", "ah run (CLI), warm via agent",
        "ah run (CLI) via CONNECT, cold", "ah run (CLI) via CONNECT, warm via agent",
        "ah library, cold (in-process)", "ah library, warm transports (in-process)",
        "OpenSSH parallel, cold", "OpenSSH ControlMaster parallel, warm",
        "parallel-ssh, cold", "parallel-ssh, warm client", "ansible -m raw (CLI)",
    ]  # fmt: skip
    medians = {name: median_ms(rows[name]) for name in order if name in rows}
    peers = {n: m for n, m in medians.items() if not n.startswith("ah ")}
    fastest_peer = min(peers, key=peers.__getitem__)
    load_after = os.getloadavg()
    bytecode = (
        f"PYTHONDONTWRITEBYTECODE={os.environ['PYTHONDONTWRITEBYTECODE']!r} in this "
        "environment, removed for the CLI rows (bytecode cached)"
        if "PYTHONDONTWRITEBYTECODE" in os.environ
        else "PYTHONDONTWRITEBYTECODE unset (bytecode cached)"
    )
    if args.json:
        print(json.dumps({"followers": args.followers, "rounds": args.rounds,
                          "medianMs": medians, "fastestPeer": fastest_peer,
                          "pythonFloorMs": median_ms(floor), "thinModules": thin_modules,
                          "agentPaths": methods, "cli": cli_what,
                          "agentPython": agent_python, "runDirCostMs": run_dir_costs,
                          "scratchDir": str(args.scratch_dir),
                          "interpreter": " ".join(base_interpreter(CLI_PYTHON)),
                          "loadBefore": load_before, "loadAfter": load_after,
                          "bytecode": bytecode}, indent=2))  # fmt: skip
        return
    print(f"`true` on {args.followers} local followers, median of {args.rounds} rounds "
          f"({os.cpu_count()} CPUs; load average before {load_before[0]:.2f} "
          f"{load_before[1]:.2f} {load_before[2]:.2f}, after {load_after[0]:.2f} "
          f"{load_after[1]:.2f} {load_after[2]:.2f}):")  # fmt: skip
    width = max(map(len, medians))
    for name, value in medians.items():
        ratio = value / peers[fastest_peer]
        print(f"  {name.ljust(width)}  {value:8.0f} ms  {ratio:5.2f}x fastest peer")
    print(f"  (fastest peer: {fastest_peer})")
    for name, value in medians.items():
        if name.endswith("warm via agent"):
            verdict = "MET" if value <= 0.5 * peers[fastest_peer] else "MISSED"
            print(f"target warm ah run <= 0.5x fastest peer ({name}): "
                  f"{value / peers[fastest_peer]:.2f}x ({verdict})")  # fmt: skip
    print(
        "what the rows measure: 'ah run (CLI)' rows and 'ansible' are whole processes "
        "(start to exit; the venv's console script, not uv run); 'ah library' and "
        "'parallel-ssh' rows run inside an already-started Python process (no interpreter "
        "start-up or imports); OpenSSH rows are 16 ssh processes in parallel. The warm rows "
        f"took turns (each set up alone, one uncounted and {INTERLEAVE_BLOCK} counted rounds "
        "back to back, closed; the order rotating), the cold rows and ansible ran one block "
        "each."
    )
    print(
        f"ah CLI rows: {cli_what}; the leader agent ran {agent_python}, built on "
        f"{' '.join(base_interpreter(CLI_PYTHON))} (--python picks another); the fleet's "
        f"daemons ran {fleet_python or sys.executable}"
    )
    print(f"the agent's paths to the followers: {methods}")
    print(f"floor of every CLI row: `python -c pass` {median_ms(floor):.0f} ms; beyond it the "
          f"warm run imported {len(thin_modules)} modules ({', '.join(thin_modules)}); "
          f"{bytecode}")  # fmt: skip
    print(
        f"a run directory with {args.followers} log files (the leader makes one per run) "
        "costs "
        + ", ".join(f"{cost:.1f} ms of CPU in {where}" for where, cost in run_dir_costs.items())
    )


if __name__ == "__main__":
    main()
