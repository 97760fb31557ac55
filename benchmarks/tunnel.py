"""Data-plane paths side by side: SSH exec latency and bulk throughput per method.

A real local fleet (access point + one follower with its own sshd) plus a second access point
that relays. For each method (direct, connect, relay) the leader's own path selection fixes
a path and keeps one paramiko transport open (``ah_fleetctl.paths.PathConnector``); then:

* latency: median / p90 wall time of ``true`` on a new channel of that transport;
* bulk up: ``cat > /dev/null`` fed N MB on stdin; bulk down: ``head -c N /dev/zero``.

The same on OpenSSH with a ControlMaster over the direct path is the reference; ratios are
"ours / OpenSSH" for latency and "ours / OpenSSH" for MB/s.

    uv run python benchmarks/tunnel.py [--mb 200] [--runs 30]
"""

from __future__ import annotations

import argparse
import asyncio
import json
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

from ah_access_pointd.state import (
    CA_CERT_FILE,
    CA_KEY_FILE,
    SERVER_CERT_FILE,
    SERVER_KEY_FILE,
    SETTINGS_FILE,
    TOKEN_KEY_FILE,
)
from ah_domain_types import FollowerStatus, PathPolicyConfig, TransportMethod
from ah_fleetctl.dataplane import SshLogin
from ah_fleetctl.paths import AccessPointEndpoint, PathConnector, PathDialer, PathSettings
from ah_harness_local import wait_for
from ah_harness_local.fleet import FollowerSpec, LocalFleet, daemon_argv
from ah_ssh_bridge import SshOptions, SshTransport

CHUNK = 256 * 1024


def _relay(fleet: LocalFleet, base: Path) -> dict[str, Any]:
    state = base / "relay-ap"
    state.mkdir()
    for name in (
        CA_CERT_FILE,
        CA_KEY_FILE,
        SERVER_CERT_FILE,
        SERVER_KEY_FILE,
        TOKEN_KEY_FILE,
        SETTINGS_FILE,
    ):
        shutil.copy2(fleet.ap_dir / name, state / name)
    ready = base / "relay-ready.json"
    fleet.group.start(
        [
            *daemon_argv("ah-access-pointd"),
            "serve",
            "--state-dir",
            str(state),
            "--connect-port",
            "0",
            "--ready-file",
            str(ready),
        ],
        name="relay-ap",
        env=fleet.daemon_env,
    )

    def read() -> dict[str, Any] | None:
        try:
            value: dict[str, Any] = json.loads(ready.read_text())
        except (OSError, ValueError):
            return None
        return value

    return wait_for(read, 60.0, what="relay access point")


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


def _measure_openssh(fleet: LocalFleet, base: Path, runs: int, size: int) -> dict[str, float]:
    follower = next(iter(fleet.followers.values()))
    sshd = follower.sshd
    host_key = Path(f"{sshd.host_key_path}.pub").read_text().split()[:2]
    known = base / "known_hosts"
    known.write_text(f"[127.0.0.1]:{sshd.port} {' '.join(host_key)}\n")
    control = Path(tempfile.mkdtemp(prefix="ahb-", dir="/tmp"))
    ssh = [
        "ssh",
        "-p",
        str(sshd.port),
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
        "ControlMaster=auto",
        "-o",
        f"ControlPath={control}/%C",
        "-o",
        "ControlPersist=120",
        f"{fleet.ssh_user}@127.0.0.1",
    ]
    try:
        subprocess.run([*ssh, "true"], check=True, timeout=60)
        times = []
        for _ in range(runs):
            started = time.perf_counter()
            subprocess.run([*ssh, "true"], check=True, timeout=60)
            times.append((time.perf_counter() - started) * 1000)
        started = time.perf_counter()
        subprocess.run(
            f"head -c {size} /dev/zero | {' '.join(ssh)} 'cat > /dev/null'",
            shell=True,
            check=True,
            timeout=600,
        )
        up_s = time.perf_counter() - started
        started = time.perf_counter()
        subprocess.run(
            [*ssh, f"head -c {size} /dev/zero"],
            stdout=subprocess.DEVNULL,
            check=True,
            timeout=600,
        )
        down_s = time.perf_counter() - started
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=200, help="bulk size each way (MB)")
    parser.add_argument("--runs", type=int, default=30, help="exec latency samples")
    args = parser.parse_args()
    size = args.mb * 1_000_000
    results: dict[str, dict[str, float]] = {}
    failures: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="ah-bench-") as tmp:
        base = Path(tmp)
        with LocalFleet([FollowerSpec("bench-1")], base_dir=base / "fleet") as fleet:
            relay = _relay(fleet, base)
            results["openssh-cm direct"] = _measure_openssh(fleet, base, args.runs, size)
            for method in (TransportMethod.DIRECT, TransportMethod.CONNECT, TransportMethod.RELAY):
                try:
                    results[f"ah {method.value}"] = asyncio.run(
                        _ours(fleet, relay, method, args.runs, size)
                    )
                except Exception as exc:  # report the others anyway
                    failures[f"ah {method.value}"] = f"{type(exc).__name__}: {exc}"
    reference = results["openssh-cm direct"]
    header = f"{'path':<20}{'true p50 ms':>12}{'p90 ms':>9}{'up MB/s':>10}{'down MB/s':>11}"
    header += f"{'lat x':>8}{'up x':>7}{'down x':>8}"
    print(header)
    for name, r in results.items():
        print(
            f"{name:<20}{r['latency_ms_median']:>12.2f}{r['latency_ms_p90']:>9.2f}"
            f"{r['up_mb_s']:>10.1f}{r['down_mb_s']:>11.1f}"
            f"{r['latency_ms_median'] / reference['latency_ms_median']:>8.2f}"
            f"{r['up_mb_s'] / reference['up_mb_s']:>7.2f}"
            f"{r['down_mb_s'] / reference['down_mb_s']:>8.2f}"
        )
    for name, error in failures.items():
        print(f"{name:<20}FAILED: {error}")
    print(json.dumps(results, indent=1), file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
