"""Data-plane paths side by side: SSH exec latency and bulk throughput per method.

A real local fleet (access point + one follower with its own sshd) plus a second access point
that relays. Rows:

* ``openssh direct|connect|relay`` — OpenSSH (``-c aes128-gcm@openssh.com`` by default) with a
  ControlMaster, straight to the sshd, or with ``ProxyCommand python -m
  ah_connectivity.connect_client`` (what ``ah-fleetctl ssh-config`` / ``proxy`` run) through
  the access point, or through the relaying access point to the home one. This is how the
  tunnel hops are measured: the 250 MB/s target of issue #4 is "tunnelled SSH bulk through
  the access point" with a fast SSH client at the ends.
* ``paramiko direct|connect|relay`` — the leader's own path selection fixes a path and keeps
  one paramiko transport open (``ah_fleetctl.paths.PathConnector``). paramiko itself tops out
  around its direct figure, whatever the tunnel does.

Per row: latency = median / p90 wall time of ``true`` (a new mux session / channel); bulk up =
``cat > /dev/null`` fed N MB on stdin; bulk down = ``head -c N /dev/zero``. Ratios are to
``openssh direct``. For the OpenSSH rows the CPU seconds each process of the path spent during
each bulk transfer are printed too, and the load average before/after every row.

    uv run python benchmarks/tunnel.py [--mb 200] [--runs 30] [--cipher C] [--only ROWS]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec

from ah_domain_types import FollowerStatus, PathPolicyConfig, TransportMethod
from ah_fleetctl.dataplane import SshLogin
from ah_fleetctl.paths import (
    AccessPointEndpoint,
    PathConnector,
    PathDialer,
    PathSettings,
    proxy_command_argv,
)
from ah_harness_local.fleet import FollowerSpec, LocalFleet
from ah_ssh_bridge import SshOptions, SshTransport

CHUNK = 256 * 1024


def _zeros(total: int) -> Iterator[bytes]:
    block = bytes(CHUNK)
    left = total
    while left > 0:
        yield block[: min(CHUNK, left)]
        left -= CHUNK


async def _measure_ours(transport: SshTransport, runs: int, size: int) -> dict[str, float]:
    await transport.run("true")  # warm-up
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        outcome = await transport.run("true")
        times.append((time.perf_counter() - started) * 1000)
        assert outcome.exit_code == 0
    started = time.perf_counter()
    up = await transport.run("cat > /dev/null", stdin=_zeros(size))
    up_s = time.perf_counter() - started
    assert up.exit_code == 0, up
    started = time.perf_counter()
    down = await transport.run(f"head -c {size} /dev/zero")
    down_s = time.perf_counter() - started
    assert down.exit_code == 0, down
    return _summary(times, size, up_s, down_s)


def _summary(times: list[float], size: int, up_s: float, down_s: float) -> dict[str, float]:
    times.sort()
    return {
        "latency_ms_median": statistics.median(times),
        "latency_ms_p90": times[int(0.9 * (len(times) - 1))],
        "up_mb_s": size / 1e6 / up_s,
        "down_mb_s": size / 1e6 / down_s,
    }


_TICKS = os.sysconf("SC_CLK_TCK")


def _cpu_by_process(*markers: str) -> dict[int, tuple[str, float]]:
    """CPU seconds (user+system), by pid, of every live descendant of this process and of
    processes whose command line holds one of `markers` (the daemonised ssh ControlMaster
    and its ProxyCommand, both reparented when the first ssh exits)."""
    table: dict[int, tuple[int, str, float]] = {}
    roots = {os.getpid()}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            raw = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        comm_end = raw.rindex(")")
        fields = raw[comm_end + 2 :].split()
        cmdline_text = [c.decode(errors="replace") for c in cmdline if c]
        label = _label(raw[raw.index("(") + 1 : comm_end], cmdline_text)
        table[int(entry.name)] = (
            int(fields[1]),
            label,
            (int(fields[11]) + int(fields[12])) / _TICKS,
        )
        if any(m in c for m in markers for c in cmdline_text):
            roots.add(int(entry.name))
    mine: dict[int, tuple[str, float]] = {}
    for pid, (_ppid, label, cpu) in table.items():
        ancestor = pid
        while ancestor not in roots and ancestor in table and ancestor > 1:
            ancestor = table[ancestor][0]
        if ancestor in roots:
            mine[pid] = (label, cpu)
    return mine


def _label(comm: str, argv: list[str]) -> str:
    text = " ".join(argv)
    for needle, label in (
        ("[mux]", "ssh"),
        ("connect_client", "proxy"),
        ("relay-ap", "relay access point"),
        ("ah-access-pointd", "access point"),
        ("ah_access_pointd", "access point"),
        ("ah-followerd", "follower"),
        ("ah_followerd", "follower"),
    ):
        if needle in text:
            return label
    return comm


def _cpu_delta(
    before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]]
) -> dict[str, float]:
    """CPU seconds spent between two snapshots, summed by process label."""
    spent: dict[str, float] = {}
    for pid, (label, cpu) in after.items():
        used = cpu - before.get(pid, (label, 0.0))[1]
        if used > 0.005:
            spent[label] = spent.get(label, 0.0) + used
    return spent


def _openssh_base(fleet: LocalFleet, base: Path, cipher: str) -> list[str]:
    """ssh options shared by every OpenSSH row (host key pinned under the alias ``bench``)."""
    follower = next(iter(fleet.followers.values()))
    host_key = Path(f"{follower.sshd.host_key_path}.pub").read_text().split()[:2]
    known = base / "known_hosts"
    known.write_text(f"bench {' '.join(host_key)}\n")
    options = [
        "-i",
        str(fleet.leader_key),
        "-o",
        "IdentitiesOnly=yes",
        "-o",
        "BatchMode=yes",
        "-o",
        f"UserKnownHostsFile={known}",
        "-o",
        "StrictHostKeyChecking=yes",
        "-o",
        "HostKeyAlias=bench",
    ]
    if cipher:
        options += ["-c", cipher]
    return options


def _openssh_routes(fleet: LocalFleet, base: Path, relay: dict[str, Any]) -> dict[str, list[str]]:
    """Per OpenSSH row: the options that route it (direct TCP, or a ProxyCommand)."""
    follower = next(iter(fleet.followers.values()))
    token_file = base / "token"
    token_file.write_text(fleet.user_token)
    token_file.chmod(0o600)

    def proxy(ap_port: int, target: str) -> list[str]:
        argv = proxy_command_argv(
            AccessPointEndpoint(url="", host="127.0.0.1", connect_port=ap_port),
            target,
            ca_file=fleet.ca_path,
            token_file=token_file,
        )
        return ["-o", "ProxyCommand=" + " ".join(argv), f"{fleet.ssh_user}@bench"]

    return {
        "direct": ["-p", str(follower.sshd.port), f"{fleet.ssh_user}@127.0.0.1"],
        "connect": proxy(fleet.connect_port, f"{follower.name}:22"),
        "relay": proxy(
            int(relay["connectPort"]), f"{follower.name}@127.0.0.1:{fleet.connect_port}:22"
        ),
    }


def _measure_openssh(
    ssh: list[str],
    runs: int,
    size: int,
    cpu: dict[str, dict[str, float]] | None = None,
    markers: tuple[str, ...] = (),
) -> dict[str, float]:
    """`ssh` (a full argv up to the destination) with a ControlMaster: exec latency on the
    master, then bulk each way through it (the mux hands the master our pipes)."""
    control = Path(tempfile.mkdtemp(prefix="ahb-", dir="/tmp"))
    ssh = [
        ssh[0],
        "-o",
        "ControlMaster=auto",
        "-o",
        f"ControlPath={control}/%C",
        "-o",
        "ControlPersist=120",
        *ssh[1:],
    ]
    try:
        subprocess.run([*ssh, "true"], check=True, timeout=60)
        times = []
        for _ in range(runs):
            started = time.perf_counter()
            subprocess.run([*ssh, "true"], check=True, timeout=60)
            times.append((time.perf_counter() - started) * 1000)
        cpu_before = _cpu_by_process(str(control), *markers)
        started = time.perf_counter()
        subprocess.run(
            f"head -c {size} /dev/zero | {shlex.join(ssh)} 'cat > /dev/null'",
            shell=True,
            check=True,
            timeout=600,
        )
        up_s = time.perf_counter() - started
        cpu_mid = _cpu_by_process(str(control), *markers)
        started = time.perf_counter()
        subprocess.run(
            [*ssh, f"head -c {size} /dev/zero"],
            stdout=subprocess.DEVNULL,
            check=True,
            timeout=600,
        )
        down_s = time.perf_counter() - started
        if cpu is not None:
            cpu["up"] = _cpu_delta(cpu_before, cpu_mid)
            cpu["down"] = _cpu_delta(cpu_mid, _cpu_by_process(str(control), *markers))
        return _summary(times, size, up_s, down_s)
    finally:
        subprocess.run([*ssh, "-O", "exit"], capture_output=True, timeout=30, check=False)
        shutil.rmtree(control, ignore_errors=True)


async def _ours(
    fleet: LocalFleet, relay: dict[str, Any], method: TransportMethod, runs: int, size: int
) -> dict[str, float]:
    raw = fleet.list_followers()
    (follower,) = msgspec.convert(raw, list[FollowerStatus])
    home = AccessPointEndpoint(url=fleet.api_url, host="127.0.0.1", connect_port=fleet.connect_port)
    relays = [
        AccessPointEndpoint(
            url=f"https://127.0.0.1:{relay['apiPort']}",
            host="127.0.0.1",
            connect_port=int(relay["connectPort"]),
        )
    ]
    dialer = PathDialer(
        login=SshLogin(user=fleet.ssh_user, identity_file=fleet.leader_key),
        options=SshOptions(connect_timeout_s=10),
        home=home,
        relays=relays,
        ca_pem=fleet.ca_path.read_bytes(),
        token=fleet.user_token,
    )
    connector = PathConnector(
        dialer, PathSettings(per_method_timeout_s=10), PathPolicyConfig(methods=[method])
    )
    try:
        transport = await connector.connect(follower)
        record = connector.record(follower.info.name)
        assert record is not None and record.method is method, record
        return await _measure_ours(transport, runs, size)
    finally:
        await connector.close()


TARGET_MB_S = 250.0
OPENSSH_METHODS = ("direct", "connect", "relay")
OURS_METHODS = (TransportMethod.DIRECT, TransportMethod.CONNECT, TransportMethod.RELAY)


def _load() -> tuple[str, str, str]:
    one, five, fifteen = Path("/proc/loadavg").read_text().split()[:3]
    return one, five, fifteen


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=200, help="bulk size each way (MB)")
    parser.add_argument("--runs", type=int, default=30, help="exec latency samples")
    parser.add_argument(
        "--cipher",
        default="aes128-gcm@openssh.com",
        help="OpenSSH cipher for the openssh rows ('' for ssh's default)",
    )
    parser.add_argument(
        "--only",
        default="",
        help="comma-separated rows to run, e.g. 'openssh direct,openssh connect' (default all)",
    )
    args = parser.parse_args()
    size = args.mb * 1_000_000
    wanted = {w.strip() for w in args.only.split(",") if w.strip()}

    def want(row: str) -> bool:
        return not wanted or row in wanted

    results: dict[str, dict[str, float]] = {}
    failures: dict[str, str] = {}
    loads: dict[str, tuple[tuple[str, str, str], tuple[str, str, str]]] = {}
    cpu: dict[str, dict[str, dict[str, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="ah-bench-") as tmp:
        base = Path(tmp)
        with LocalFleet([FollowerSpec("bench-1")], base_dir=base / "fleet") as fleet:
            relay = fleet.start_relay_access_point()
            ssh = ["ssh", *_openssh_base(fleet, base, args.cipher)]
            routes = _openssh_routes(fleet, base, relay)
            for name in OPENSSH_METHODS:
                row = f"openssh {name}"
                if not want(row):
                    continue
                before = _load()
                try:
                    cpu[row] = {}
                    results[row] = _measure_openssh(
                        [*ssh, *routes[name]], args.runs, size, cpu[row], (str(base),)
                    )
                except Exception as exc:  # report the others anyway
                    failures[row] = f"{type(exc).__name__}: {exc}"
                loads[row] = (before, _load())
            for method in OURS_METHODS:
                row = f"paramiko {method.value}"
                if not want(row):
                    continue
                before = _load()
                try:
                    results[row] = asyncio.run(_ours(fleet, relay, method, args.runs, size))
                except Exception as exc:  # report the others anyway
                    failures[row] = f"{type(exc).__name__}: {exc}"
                loads[row] = (before, _load())
    reference = results.get("openssh direct")
    print(
        f"bulk {args.mb} MB each way; openssh rows: ControlMaster, cipher "
        f"{args.cipher or 'default'}; paramiko rows: one persistent transport per path "
        "(aes128-gcm). Ratios are to 'openssh direct'."
    )
    header = f"{'path':<18}{'true p50 ms':>12}{'p90 ms':>9}{'up MB/s':>10}{'down MB/s':>11}"
    header += f"{'lat x':>8}{'up x':>7}{'down x':>8}   load before -> after"
    print(header)
    for name, r in results.items():
        ratios = (
            f"{r['latency_ms_median'] / reference['latency_ms_median']:>8.2f}"
            f"{r['up_mb_s'] / reference['up_mb_s']:>7.2f}"
            f"{r['down_mb_s'] / reference['down_mb_s']:>8.2f}"
            if reference
            else f"{'-':>8}{'-':>7}{'-':>8}"
        )
        before, after = loads[name]
        print(
            f"{name:<18}{r['latency_ms_median']:>12.2f}{r['latency_ms_p90']:>9.2f}"
            f"{r['up_mb_s']:>10.1f}{r['down_mb_s']:>11.1f}{ratios}   "
            f"{' '.join(before)} -> {' '.join(after)}"
        )
    for name, error in failures.items():
        print(f"{name:<18}FAILED: {error}")
    if cpu:
        print(
            "CPU seconds per process during the openssh bulk transfers (descendants of this "
            "benchmark: the ssh master, its ProxyCommand, access points, follower, sshd; the "
            "head/cat at the ends are not counted):"
        )
        for name, ways in cpu.items():
            for way, spent in ways.items():
                parts = ", ".join(
                    f"{k} {v:.2f}" for k, v in sorted(spent.items(), key=lambda kv: -kv[1])
                )
                print(f"  {name:<16} {way:<5} {parts}")
    through_ap = results.get("openssh connect")
    if through_ap is not None:
        slowest = min(through_ap["up_mb_s"], through_ap["down_mb_s"])
        verdict = "PASS" if slowest >= TARGET_MB_S else "MISS"
        print(
            f"target: tunnelled SSH bulk >= {TARGET_MB_S:g} MB/s through the access point, "
            f"measured with OpenSSH as the SSH endpoint ('openssh connect'; paramiko itself "
            f"tops out near its own direct figure): {verdict} ({slowest:.0f} MB/s the slower way)"
        )
    print(json.dumps(results, indent=1), file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
