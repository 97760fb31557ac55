"""Where the CPU of a warm ``ah-fleetctl run -- true`` on 16 local followers goes.

``fanout.py`` gives wall times next to the peers; this script says which process spent the
machine's CPU in them. On a 2-core machine a warm round keeps both cores busy (the followers
are local), so a round ends sooner only when less CPU is spent in it: the per-process split
is what tells a change worth making from one that moves work around.

A real ``LocalFleet``, the ``ah-fleetctl`` of ``fanout.py``'s benchmark environment (this
checkout's wheels, not editable; ``--cli dev`` for the workspace's), a leader agent, then
``--rounds`` warm runs back to back. For every task (thread) alive through the rounds it
reads ``/proc/<pid>/task/<tid>/schedstat``: nanoseconds on a CPU and waiting on a run queue,
exact, unlike ``/proc/<pid>/stat``'s clock ticks (which credited the agent with ~13 ms per
round when it spent ~21). Short-lived processes have no such record: the CLI processes are
measured by ``getrusage`` (clock ticks), the commands (the runs of ``true``) are what the system's
busy time leaves over.

    uv run python benchmarks/fanout_cpu.py [--followers 16] [--rounds 100] [--path direct|connect]
        [--cli installed|dev] [--python PATH]
"""

from __future__ import annotations

import argparse
import collections
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

from loguru import logger

import fanout
from ah_harness_local.fleet import FollowerSpec, LocalFleet

_TICK = os.sysconf("SC_CLK_TCK")


def task_class(cmdline: bytes) -> str:
    """The row a process's CPU is counted in, from its command line."""
    words = cmdline.replace(b"\0", b" ")
    if b"ah_fleetctl agent" in words:
        return "leader agent"
    if b"ah_access_pointd" in words:
        return "access point"
    if b"ah_followerd" in words:
        return "follower daemons"
    if words.startswith(b"sshd") or b"/sshd " in words[:64]:
        return "sshd (the followers')"
    if b"python3 -I -S" in words:
        return "command servers (warm)"
    if Path(sys.argv[0]).name.encode() in words:
        return "this script"
    return "other" if words else "kernel threads"


def task_times() -> dict[tuple[str, str], tuple[str, int, int]]:
    """(pid, tid) → (class, ns on a CPU, ns waiting on a run queue) for every task now."""
    found: dict[tuple[str, str], tuple[str, int, int]] = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cls = task_class(Path(f"/proc/{pid}/cmdline").read_bytes())
            for tid in os.listdir(f"/proc/{pid}/task"):
                run, wait, _ = Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()
                if cls == "leader agent":  # its event loop, and the threads beside it
                    row = f"{cls}: {'main thread' if tid == pid else 'other threads'}"
                else:
                    row = cls
                found[(pid, tid)] = (row, int(run), int(wait))
        except OSError:  # it ended meanwhile
            continue
    return found


_BUSY_FIELDS = ("user", "nice", "system", "irq", "softirq", "steal")


def busy_ticks() -> dict[str, int]:
    """The whole machine's non-idle clock ticks by kind (user, nice, system, irq, softirq,
    steal): softirq is where loopback TCP's receive path runs, charged to no task."""
    fields = [int(f) for f in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return dict(zip(_BUSY_FIELDS, fields[:3] + fields[5:8], strict=True))


def packets_sent() -> tuple[int, int]:
    """TCP segments and UDP datagrams this machine sent (all of them cross loopback here):
    SSH and its tunnels are TCP, the control plane and session events QUIC over UDP."""
    lines = [line.split() for line in Path("/proc/net/snmp").read_text().splitlines()]
    tcp_names, tcp_values = (line for line in lines if line[0] == "Tcp:")
    udp_names, udp_values = (line for line in lines if line[0] == "Udp:")
    return (
        int(tcp_values[tcp_names.index("OutSegs")]),
        int(udp_values[udp_names.index("OutDatagrams")]),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--followers", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--path", choices=("direct", "connect"), default="direct")
    parser.add_argument("--cli", choices=("installed", "dev"), default="installed")
    parser.add_argument("--venv-dir", type=Path, default=fanout.default_venv_dir())
    parser.add_argument("--python", type=Path, default=None, help="as fanout.py's --python")
    parser.add_argument(
        "--scratch-dir",
        type=Path,
        default=fanout.default_scratch_dir(),
        help="as fanout.py's --scratch-dir (default: /dev/shm when there is one)",
    )
    args = parser.parse_args()
    if args.cli == "installed":
        python = fanout.ensure_bench_venv(args.venv_dir, peers=False, interpreter=args.python)
        fanout.install_ah_from_wheels(python)
        fanout.CLI_PYTHON = python
    logger.remove()
    logger.add(sys.stderr, level="WARNING")
    # As in fanout.py: the daemons run from the CLI's environment and interpreter.
    fleet_python = fanout.CLI_PYTHON if args.cli == "installed" else None

    specs = [FollowerSpec(f"f{i:02d}") for i in range(args.followers)]
    policy = {"AH_PATH_POLICY_ALLOW_DIRECT": "false"} if args.path == "connect" else {}
    with (
        tempfile.TemporaryDirectory(prefix="ah-fanout-cpu-", dir=args.scratch_dir) as tmp,
        LocalFleet(specs, base_dir=Path(tmp) / "fleet", heartbeat_interval="2s",
                   start_timeout=180, interpreter=fleet_python) as fleet,
    ):  # fmt: skip
        work = Path(tmp) / "leader"
        work.mkdir()
        runtime = Path(tempfile.mkdtemp(prefix="ahc-", dir="/tmp"))  # short: sockaddr_un
        env = fanout.cli_env(
            fleet,
            {
                "AH_AGENT_ENABLED": "true",
                "AH_AGENT_IDLE": "600s",
                "XDG_RUNTIME_DIR": str(runtime),
                **policy,
            },
        )
        try:
            for _ in range(5):  # starts the agent, records the thin index, warms up
                fanout.ah_cli_round(env, work, args.followers)
            before, children_before = task_times(), resource.getrusage(resource.RUSAGE_CHILDREN)
            ticks_before, packets_before = busy_ticks(), packets_sent()
            started = time.perf_counter()
            walls = [fanout.ah_cli_round(env, work, args.followers) for _ in range(args.rounds)]
            elapsed = time.perf_counter() - started
            ticks_after, packets_after = busy_ticks(), packets_sent()
            segments, datagrams = (
                a - b for a, b in zip(packets_after, packets_before, strict=True)
            )
            ticks = {kind: ticks_after[kind] - ticks_before[kind] for kind in _BUSY_FIELDS}
            after, children = task_times(), resource.getrusage(resource.RUSAGE_CHILDREN)
            agent_python = fanout.agent_interpreter(runtime)
        finally:
            fanout.stop_agents(runtime)
            shutil.rmtree(runtime, ignore_errors=True)

    ms = 1000.0 / args.rounds  # seconds in total -> milliseconds per round
    rows: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
    for key, (cls, run, wait) in after.items():
        _, run0, wait0 = before.get(key, (cls, 0, 0))
        rows[cls][0] += run - run0
        rows[cls][1] += wait - wait0
    cli_s = (children.ru_utime + children.ru_stime) - (
        children_before.ru_utime + children_before.ru_stime
    )
    busy_ms = sum(ticks.values()) / _TICK * ms
    tracked_ms = sum(run for run, _ in rows.values()) / 1e9 * ms
    walls.sort()
    print(
        f"warm `ah-fleetctl run --no-fence --json -- true` on {args.followers} followers "
        f"({args.path}), {args.rounds} rounds back to back; {os.cpu_count()} CPUs, load "
        f"{os.getloadavg()[0]:.1f} after; agent {agent_python}; fleet and leader state in "
        f"{args.scratch_dir}"
    )
    print(
        f"wall per round: median {walls[len(walls) // 2] * 1000:.1f} ms "
        f"(elapsed {elapsed * ms:.1f} ms); the machine was busy "
        f"{busy_ms:.1f} ms of CPU per round"
    )
    kinds = ", ".join(f"{kind} {n / _TICK * ms:.1f}" for kind, n in ticks.items() if n)
    print(
        f"  by kind (clock ticks): {kinds}; {segments / args.rounds:.0f} TCP segments and "
        f"{datagrams / args.rounds:.0f} UDP datagrams sent"
    )
    print(f"  {'CPU per round (ms)':34s} {'on a CPU':>9s} {'run-queue wait':>15s}")
    print(f"  {'the CLI processes (rusage)':34s} {cli_s * ms:9.2f} {'':>15s}")
    for cls, (run, wait) in sorted(rows.items(), key=lambda r: -r[1][0]):
        if run / 1e9 * ms >= 0.05:
            print(f"  {cls:34s} {run / 1e9 * ms:9.2f} {wait / 1e9 * ms:15.2f}")
    rest = busy_ms - tracked_ms - cli_s * ms
    print(f"  {'the commands and other short-lived':34s} {rest:9.2f}   (busy time minus the above)")


if __name__ == "__main__":
    main()
