"""The fence against bare rsync, on a real local fleet.

What runs:

1. A generated leader tree (``--files`` files, ~``--mb`` MB, mixed sizes: mostly a few KB,
   some tens of KB, a few of 0.1-8 MB; random content, seeded) in a temp dir marked as a
   repo (``.git/``).
2. A ``LocalFleet`` with ``--followers`` followers (real access point, real followerd, one
   real sshd each), and the leader's SSH links to them (``ah_fleetctl.dataplane``), whose
   OpenSSH config (one ControlMaster per follower) both contestants use.
3. Three scenarios, each measured for the fence (``ah_fleetctl.fencing.fence_selected``
   with the rsync engine, in this process: snapshot + sync + verify on every follower) and,
   side by side in the same run, for bare ``rsync -a --delete`` to every follower in
   parallel (into a sibling directory of the follower's workspace):
   - ``first``: empty followers;
   - ``one-file change``: one file's content edited (``--repeat`` rounds, median);
   - ``no change``: nothing edited (``--repeat`` rounds, median).
4. For reference, the wall time of the whole ``ah-fleetctl fence`` command (interpreter
   start, API call, SSH links, fence) for the no-change case.
5. ``ah-fleetctl run -- true`` (fenced), CLI wall time: the full CLI against the thin path
   through a warm leader agent, no change and one-file change (``cli_run_via_agent``).

Targets: one-file-change fence < 300 ms and <= 1.5 x bare rsync. The verdict is printed; the
exit code is 0 either way (this is a measurement).

    uv run python benchmarks/fence.py [--files 10000] [--mb 200] [--followers 4]
        [--repeat 5] [--profile fence.prof]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import os
import pstats
import random
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import msgspec

from ah_config import ResolvedConfig, load_config
from ah_domain_types import ConfigFile, FollowerStatus
from ah_fleetctl.dataplane import DirectConnector, FleetLinks, ssh_alias, stop_control_masters
from ah_fleetctl.fencing import fence_selected, keep_digest_sessions
from ah_harness_local.fleet import FollowerSpec, LocalFleet


@dataclass(frozen=True)
class Invocation:
    """What ``fence_selected`` needs of an invocation: the resolved configuration."""

    config: ResolvedConfig[ConfigFile]


def generate_tree(root: Path, files: int, megabytes: int, seed: int = 7) -> int:
    """Write ``files`` files of mixed sizes totalling about ``megabytes`` MB; returns bytes."""
    rng = random.Random(seed)
    sizes: list[int] = []
    for _ in range(files):
        pick = rng.random()
        if pick < 0.70:
            sizes.append(rng.randint(200, 8_000))
        elif pick < 0.97:
            sizes.append(rng.randint(8_000, 64_000))
        else:
            sizes.append(rng.randint(100_000, 8_000_000))
    big = [i for i, size in enumerate(sizes) if size >= 100_000]
    small_total = sum(sizes) - sum(sizes[i] for i in big)
    big_target = max(0, megabytes * 1_000_000 - small_total)
    big_total = sum(sizes[i] for i in big) or 1
    for i in big:  # hit the total by scaling the large files only
        sizes[i] = max(100_000, int(sizes[i] * big_target / big_total))
    (root / ".git").mkdir(parents=True, exist_ok=True)
    written = 0
    pool = os.urandom(8_000_000)
    for index, size in enumerate(sizes):
        directory = root / f"pkg{index % 50:02d}" / f"mod{(index // 50) % 20:02d}"
        directory.mkdir(parents=True, exist_ok=True)
        start = rng.randrange(0, len(pool) - min(size, len(pool)) + 1)
        data = pool[start : start + size]
        if len(data) < size:
            data = (data * (size // max(1, len(data)) + 1))[:size]
        path = directory / f"f{index:05d}.dat"
        # A per-file header keeps files distinct even when they share a slice of the pool.
        path.write_bytes(f"{index}\n".encode() + data)
        written += size
    return written


async def bare_rsync(links: FleetLinks, config: Path, leader: Path) -> float:
    """``rsync -a --delete`` to every linked follower in parallel over the same OpenSSH
    config (ControlMaster); returns wall seconds."""
    started = time.perf_counter()

    async def one(name: str) -> None:
        destination = links.workspace(name).rstrip("/") + "-bare/"
        proc = await asyncio.create_subprocess_exec(
            "rsync",
            "-a",
            "--delete",
            "-e",
            shlex.join(["ssh", "-F", str(config)]),
            f"{leader}/",
            f"{ssh_alias(name)}:{destination}",
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        _, stderr = await proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"bare rsync to {name}: {proc.returncode}: {stderr.decode()}")

    await asyncio.gather(*(one(n) for n in links.linked))
    return time.perf_counter() - started


HOST_MS: dict[str, list[int]] = {}
"""Per host, the took_ms of each fence of the current scenario (reset by ``measure``)."""


async def timed_fence(
    invocation: Invocation, links: FleetLinks, cache_root: Path
) -> tuple[float, int]:
    started = time.perf_counter()
    metadata = await fence_selected(
        invocation, links, links.linked, engine="rsync", cache_root=cache_root
    )
    took = time.perf_counter() - started
    lagging = metadata.lagging_hosts()
    if lagging:
        raise RuntimeError(f"fence not consistent on {lagging}: {metadata}")
    for host, result in metadata.hosts.items():
        HOST_MS.setdefault(host, []).append(result.took_ms)
    return took, metadata.took_ms


def edit_one_file(leader: Path, round_: int) -> None:
    target = leader / "pkg07" / "mod01" / "f01057.dat"  # see generate_tree's layout
    if not target.is_file():
        raise FileNotFoundError(target)
    with target.open("ab") as handle:
        handle.write(f"edit {round_}\n".encode())


async def measure(
    label: str,
    rounds: int,
    before: Callable[[int], None],
    fence: Callable[[], Awaitable[tuple[float, int]]],
    rsync: Callable[[], Awaitable[float]],
) -> tuple[str, float, float, float]:
    fences: list[float] = []
    inner: list[int] = []
    bares: list[float] = []
    HOST_MS.clear()
    for index in range(rounds):
        before(index)
        took, took_ms = await fence()
        fences.append(took)
        inner.append(took_ms)
        bares.append(await rsync())
    per_host = ", ".join(f"{h} {statistics.median(v):.0f}" for h, v in sorted(HOST_MS.items()))
    print(f"{label}: per host (median took_ms, after the snapshot): {per_host}", flush=True)
    return (
        label,
        statistics.median(fences) * 1000,
        statistics.median(inner),
        statistics.median(bares) * 1000,
    )


async def run(args: argparse.Namespace, fleet: LocalFleet, leader: Path, scratch: Path) -> None:
    env = fleet.env()
    invocation = Invocation(load_config(cwd=leader, env=env))
    followers = msgspec.convert(fleet.list_followers(), list[FollowerStatus])
    connector = DirectConnector(fleet.ssh_user, fleet.leader_key)
    links = await FleetLinks.open(followers, connector, leader_root=leader)
    if args.sessions != "off":
        # This process fences again and again: keep one warm digest server per follower.
        keep_digest_sessions(links, inotify=args.sessions == "inotify")
    config = links.ssh_config(scratch / "bench_ssh_config")
    cache_root = scratch / "cache"
    try:
        rows = [
            await measure(
                "first (empty followers)",
                1,
                lambda _: None,
                lambda: timed_fence(invocation, links, cache_root),
                lambda: bare_rsync(links, config, leader),
            ),
            await measure(
                "one-file change",
                args.repeat,
                lambda i: edit_one_file(leader, i),
                lambda: timed_fence(invocation, links, cache_root),
                lambda: bare_rsync(links, config, leader),
            ),
            await measure(
                "no change",
                args.repeat,
                lambda _: None,
                lambda: timed_fence(invocation, links, cache_root),
                lambda: bare_rsync(links, config, leader),
            ),
        ]
        if args.profile:
            edit_one_file(leader, 999)
            profiler = cProfile.Profile()
            profiler.enable()
            await timed_fence(invocation, links, cache_root)
            profiler.disable()
            profiler.dump_stats(args.profile)
            pstats.Stats(args.profile).sort_stats("cumulative").print_stats(25)
    finally:
        await links.close()
    cli_times = []
    for _ in range(3):
        started = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-m", "ah_fleetctl", "fence"],
            cwd=leader,
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        cli_times.append(time.perf_counter() - started)
        if done.returncode != 0:
            raise RuntimeError(f"ah-fleetctl fence failed: {done.stdout}{done.stderr}")
    stop_control_masters(config, links.names)

    print()
    print(f"{'scenario':<26}{'fence ms':>10}{'(inner)':>9}{'bare rsync ms':>15}{'ratio':>8}")
    for label, fence_ms, inner_ms, bare_ms in rows:
        print(
            f"{label:<26}{fence_ms:>10.0f}{inner_ms:>9.0f}{bare_ms:>15.0f}{fence_ms / bare_ms:>8.2f}"
        )
    print(f"{'ah-fleetctl fence (CLI)':<26}{statistics.median(cli_times) * 1000:>10.0f}")
    one = rows[1]
    ok_abs = one[1] < 300
    ok_rel = one[1] <= 1.5 * one[3]
    print(
        f"\none-file change: {one[1]:.0f} ms (target < 300 ms: {'met' if ok_abs else 'MISSED'}), "
        f"{one[1] / one[3]:.2f} x bare rsync (target <= 1.5: {'met' if ok_rel else 'MISSED'})"
    )


def cli_run_via_agent(fleet: LocalFleet, leader: Path, scratch: Path, repeat: int) -> None:
    """``ah-fleetctl run -- true`` (fenced, the default) as a user types it, CLI wall time:
    the full CLI (no agent: every run imports the stack, links and fences cold) against the
    thin path through a warm leader agent (ah_fleetctl.thin_fence), for no change and a
    one-file change, ``repeat`` rounds each (median)."""
    # Short: ControlMaster socket paths (<runtime>/agent-harbor/cm/<40 hex>.<16>) must fit
    # in a sockaddr_un.
    runtime = Path(tempfile.mkdtemp(prefix="ahb-", dir="/tmp"))
    env_full = fleet.env()  # LocalFleet's config turns the agent off
    env_agent = {
        **env_full,
        "AH_AGENT_ENABLED": "true",
        "AH_AGENT_IDLE": "300s",
        "XDG_RUNTIME_DIR": str(runtime),
    }

    def cli(env: dict[str, str], *args: str) -> float:
        started = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-m", "ah_fleetctl", *args],
            cwd=leader,
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            check=False,
        )
        took = time.perf_counter() - started
        if done.returncode != 0:
            raise RuntimeError(f"ah-fleetctl {' '.join(args)}: {done.stdout}{done.stderr}")
        return took

    rows: list[tuple[str, float, float]] = []
    try:
        cli(env_agent, "run", "--no-fence", "--", "true")  # starts the agent, records the index
        cli(env_agent, "run", "--", "true")  # the agent's first fence: links, full proofs
        index = runtime / "agent-harbor" / "thin"
        if not list(index.glob("*.marshal")):
            raise RuntimeError(f"no thin index entry in {index}: the agent path is not taken")
        for label, edit in (("no change", False), ("one-file change", True)):
            timings: dict[str, list[float]] = {"full": [], "agent": []}
            for round_ in range(repeat):
                for kind, env in (("full", env_full), ("agent", env_agent)):
                    if edit:
                        edit_one_file(leader, 10_000 + round_ * 2 + (kind == "agent"))
                    timings[kind].append(cli(env, "run", "--", "true"))
            rows.append(
                (label, statistics.median(timings["full"]), statistics.median(timings["agent"]))
            )
    finally:
        from ah_fleetctl.agent import AgentClient

        for sock in (runtime / "agent-harbor" / "agents").glob("*.sock"):
            with contextlib.suppress(OSError):
                asyncio.run(AgentClient(sock).shutdown())
        shutil.rmtree(runtime, ignore_errors=True)
    print()
    print(f"{'ah run -- true (fenced)':<26}{'full CLI ms':>12}{'via agent ms':>14}{'speed-up':>10}")
    for label, full, agent in rows:
        print(f"{label:<26}{full * 1000:>12.0f}{agent * 1000:>14.0f}{full / agent:>9.1f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=10_000)
    parser.add_argument("--mb", type=int, default=200)
    parser.add_argument("--followers", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--profile", metavar="FILE", help="cProfile one one-file-change fence")
    parser.add_argument(
        "--sessions",
        choices=["inotify", "walk", "off"],
        default="inotify",
        help="warm digest sessions on the followers: inotify (default), a full stat walk per "
        "digest, or none (a digest process per fence, as the CLI does)",
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ah-fence-bench-") as tmp:
        scratch = Path(tmp)
        leader = scratch / "leader"
        started = time.perf_counter()
        total = generate_tree(leader, args.files, args.mb)
        print(
            f"tree: {args.files} files, {total / 1e6:.0f} MB "
            f"(generated in {time.perf_counter() - started:.1f}s)"
        )
        specs = [FollowerSpec(f"bench-{i}") for i in range(args.followers)]
        with LocalFleet(specs, base_dir=scratch / "fleet") as fleet:
            print(f"fleet: {args.followers} followers up in {fleet.startup_seconds:.1f}s")
            print(f"machine: {os.cpu_count()} cores, load {os.getloadavg()[0]:.2f}")
            asyncio.run(run(args, fleet, leader, scratch))
            cli_run_via_agent(fleet, leader, scratch, args.repeat)
            print(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
