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

Every CLI row runs the venv's console script (``.venv/bin/ah-fleetctl``) directly, not
through ``uv run`` (which adds its own start-up), with bytecode cached as an installed tool
has it (``PYTHONDONTWRITEBYTECODE`` is removed for those processes; a first, uncounted round
writes the cache). ``--no-fence`` everywhere: the peers do not sync or verify a tree first.

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

parallel-ssh and ansible-core are installed into a throwaway virtual environment this script
creates with ``uv venv`` under ``--venv-dir`` (default: the user cache), never into the
workspace. Host keys: ah and OpenSSH pin them; parallel-ssh does not check them (its
default); ansible uses a known_hosts file written from the verified keys.

Also printed, not compared: the floor of any CLI row (``python -c pass`` with the same
interpreter and site) and how many modules the thin path imported (``-X importtime``).

By default the ah CLI rows are measured twice, once reaching the followers directly (as the
peers do) and once only through the access point's CONNECT tunnel (``--path both``; the
issue's setting: followers behind NAT are reached that way); the target is checked for each.

    uv run python benchmarks/fanout.py [--followers 16] [--rounds 5] [--path direct|connect|both]
        [--skip-peers] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

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


def ensure_peer_venv(venv: Path) -> Path:
    """A throwaway venv with parallel-ssh and ansible-core; returns its python."""
    python = venv / "bin" / "python"
    if not python.exists():
        subprocess.run(["uv", "venv", "--quiet", "--python", sys.executable, str(venv)], check=True)
    probe = subprocess.run(
        [str(python), "-c", "import pssh, ansible"], capture_output=True, check=False
    )
    if probe.returncode != 0:
        subprocess.run(
            ["uv", "pip", "install", "--quiet", "--python", str(python), *PEER_PACKAGES],
            check=True,
        )
    return python


def median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1000.0


# --------------------------------------------------------------------------- ah


def fleetctl_argv() -> list[str]:
    script = Path(sys.executable).parent / "ah-fleetctl"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "ah_fleetctl"]


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
        [sys.executable, "-X", "importtime", *argv],
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


def python_floor(rounds: int) -> list[float]:
    samples = []
    for _ in range(rounds):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], check=True)
        samples.append(time.perf_counter() - started)
    return samples


async def ah_library(
    followers: list[FollowerStatus], connector: DirectConnector, rounds: int
) -> tuple[list[float], list[float]]:
    targets = [TargetHost(name=f.info.name, os=OsKind.LINUX) for f in followers]

    async def once(links: FleetLinks, *, warm: bool = True) -> None:
        executor = SshExecutor(links.transports, warm=warm)
        envelope = await RunEngine(executor, targets, [["true"]]).run()
        if envelope.summary.succeeded != len(targets):
            raise RuntimeError(f"library run failed: {envelope.summary}")

    cold: list[float] = []
    for _ in range(rounds):
        started = time.perf_counter()
        links = await FleetLinks.open(followers, connector, connect_timeout=30)
        try:
            if links.unreachable:
                raise RuntimeError(f"unreachable: {links.unreachable}")
            await once(links, warm=False)  # one run per transport: exec channels, as the CLI
        finally:
            await links.close()
        cold.append(time.perf_counter() - started)
    warm: list[float] = []
    async with await FleetLinks.open(followers, connector, connect_timeout=30) as links:
        await once(links)  # not counted: the first channel of each transport
        for _ in range(rounds):
            started = time.perf_counter()
            await once(links)
            warm.append(time.perf_counter() - started)
    return cold, warm


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


async def openssh(config: Path, names: list[str], rounds: int) -> tuple[list[float], list[float]]:
    no_master = ["-o", "ControlMaster=no", "-o", "ControlPath=none"]
    cold = [await openssh_round(config, names, no_master) for _ in range(rounds)]
    await openssh_round(config, names, [])  # establishes the masters (not counted)
    warm = [await openssh_round(config, names, []) for _ in range(rounds)]
    return cold, warm


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

    cold = []
    for _ in range(spec["rounds"]):
        t = time.perf_counter(); c = client(); once(c); cold.append(time.perf_counter() - t)
        del c
    c = client(); once(c)
    warm = []
    for _ in range(spec["rounds"]):
        t = time.perf_counter(); once(c); warm.append(time.perf_counter() - t)
    print(json.dumps({"cold": cold, "warm": warm}))
    """
)


def parallel_ssh(python: Path, fleet: LocalFleet, rounds: int) -> tuple[list[float], list[float]]:
    spec = {
        "ports": [f.sshd.port for f in fleet.followers.values()],
        "user": fleet.ssh_user,
        "key": str(fleet.leader_key),
        "rounds": rounds,
    }
    done = subprocess.run(
        [str(python), "-c", PSSH_SCRIPT, json.dumps(spec)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"parallel-ssh failed: {done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return result["cold"], result["warm"]


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
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    python = None if args.skip_peers else ensure_peer_venv(args.venv_dir)
    logger.remove()  # the library's debug lines would drown the table
    logger.add(sys.stderr, level="WARNING")
    load_before = os.getloadavg()
    rows: dict[str, list[float]] = {}
    specs = [FollowerSpec(f"f{i:02d}") for i in range(args.followers)]
    with tempfile.TemporaryDirectory(prefix="ah-fanout-") as tmp:
        scratch = Path(tmp)
        started = time.perf_counter()
        with LocalFleet(specs, base_dir=scratch / "fleet", heartbeat_interval="2s",
                        start_timeout=180) as fleet:  # fmt: skip
            print(f"fleet of {args.followers} up in {time.perf_counter() - started:.1f}s",
                  file=sys.stderr)  # fmt: skip
            work = scratch / "leader"
            work.mkdir()
            followers = msgspec.convert(fleet.list_followers(), list[FollowerStatus])
            connector = DirectConnector(fleet.ssh_user, fleet.leader_key)
            names = [f.info.name for f in followers]

            thin_modules: list[str] = []
            methods: dict[str, dict[str, int]] = {}
            for path in ("direct", "connect") if args.path == "both" else (args.path,):
                policy = {"AH_PATH_POLICY_ALLOW_DIRECT": "false"} if path == "connect" else {}
                via = " via CONNECT" if path == "connect" else ""
                env = cli_env(fleet, policy)
                ah_cli_round(env, work, args.followers)  # warm-up: bytecode, page cache
                rows[f"ah run (CLI){via}, cold"] = [
                    ah_cli_round(env, work, args.followers) for _ in range(args.rounds)
                ]
                # The leader agent: private runtime dir (its socket, the thin index), short
                # path for sockaddr_un; the first run starts it and records the thin index.
                # The path policy is part of the agent's key: each path gets its own agent.
                runtime = Path(tempfile.mkdtemp(prefix="ahf-", dir="/tmp"))
                agent_env = cli_env(
                    fleet,
                    {
                        "AH_AGENT_ENABLED": "true",
                        "AH_AGENT_IDLE": "300s",
                        "XDG_RUNTIME_DIR": str(runtime),
                        **policy,
                    },
                )
                try:
                    ah_cli_round(agent_env, work, args.followers)  # starts the agent
                    thin_modules = thin_path_imports(agent_env, work)
                    ah_cli_round(agent_env, work, args.followers)  # not counted
                    rows[f"ah run (CLI){via}, warm via agent"] = [
                        ah_cli_round(agent_env, work, args.followers) for _ in range(args.rounds)
                    ]
                    methods[path] = agent_path_methods(agent_env, work)
                finally:
                    stop_agents(runtime)
                    shutil.rmtree(runtime, ignore_errors=True)
            floor = python_floor(args.rounds)
            cold, warm = asyncio.run(ah_library(followers, connector, args.rounds))
            rows["ah library, cold (in-process)"] = cold
            rows["ah library, warm transports (in-process)"] = warm

            async def ssh_config() -> Path:
                async with await FleetLinks.open(followers, connector) as links:
                    return links.ssh_config(scratch / "ssh_config")

            config = asyncio.run(ssh_config())
            try:
                cold, warm = asyncio.run(openssh(config, names, args.rounds))
                rows["OpenSSH parallel, cold"] = cold
                rows["OpenSSH ControlMaster parallel, warm"] = warm
            finally:
                stop_control_masters(config, names)
            if python is not None:
                cold, warm = parallel_ssh(python, fleet, args.rounds)
                rows["parallel-ssh, cold"] = cold
                rows["parallel-ssh, warm client"] = warm
                known = config.with_name(config.name + ".known_hosts")
                rows["ansible -m raw (CLI)"] = ansible(python, fleet, known, scratch, args.rounds)

    medians = {name: median_ms(samples) for name, samples in rows.items()}
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
                          "agentPaths": methods,
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
        "start-up or imports); OpenSSH rows are 16 ssh processes in parallel."
    )
    print(f"the agent's paths to the followers: {methods}")
    print(f"floor of every CLI row: `python -c pass` {median_ms(floor):.0f} ms; beyond it the "
          f"warm run imported {len(thin_modules)} modules ({', '.join(thin_modules)}); "
          f"{bytecode}")  # fmt: skip


if __name__ == "__main__":
    main()
