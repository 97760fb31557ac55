"""Throughput and exec latency of ah-ssh-bridge against a local OpenSSH sshd.

    uv run --package ah-ssh-bridge python packages/ah-ssh-bridge/benchmarks/bench_ssh_bridge.py

Upload: 200 MB of stdin into ``cat > /dev/null``. Download: 200 MB of 100-character lines
from ``yes``, through the line splitter into a callback; raw: 200 MB from ``/dev/zero`` read
but not decoded (no callback). Latency: ``true`` run sequentially
on one transport (channel open + exec + exit status). Each cipher is measured on its own
transport; "paramiko default" is paramiko's own preference order (aes128-ctr + hmac-sha2-256).
"""

from __future__ import annotations

import asyncio
import os
import statistics
import tempfile
import time
from pathlib import Path

from ah_harness_local import RunningSshd, start_sshd
from ah_ssh_bridge import DEFAULT_CIPHERS, SshOptions, SshTransport

TOTAL = 200 * 1024 * 1024
BLOCK = os.urandom(1024 * 1024)
LINE = "x" * 99


async def _transport(sshd: RunningSshd, ciphers: tuple[str, ...]) -> SshTransport:
    return await SshTransport.connect(
        sshd.listen,
        sshd.port,
        host="bench",
        username=sshd.user,
        key_path=sshd.client_key_path,
        expected_fingerprint=sshd.host_key_fingerprint,
        options=SshOptions(ciphers=ciphers),
    )


async def _upload(t: SshTransport) -> float:
    started = time.monotonic()
    outcome = await t.run("cat > /dev/null", stdin=(BLOCK for _ in range(TOTAL // len(BLOCK))))
    assert outcome.exit_code == 0, outcome
    return TOTAL / (time.monotonic() - started) / 1e6


async def _download(t: SshTransport) -> float:
    count = 0

    def take(line: str) -> None:
        nonlocal count
        count += len(line) + 1

    started = time.monotonic()
    outcome = await t.run(f"yes {LINE} | head -c {TOTAL}", on_stdout=take)
    assert outcome.exit_code == 0 and count == TOTAL, (outcome, count)
    return TOTAL / (time.monotonic() - started) / 1e6


async def _download_raw(t: SshTransport) -> float:
    started = time.monotonic()
    outcome = await t.run(f"head -c {TOTAL} /dev/zero")  # no callback: bytes are not decoded
    assert outcome.exit_code == 0, outcome
    return TOTAL / (time.monotonic() - started) / 1e6


async def _latency(t: SshTransport, n: int = 100) -> tuple[float, float]:
    samples = []
    for _ in range(n):
        started = time.monotonic()
        await t.run("true")
        samples.append((time.monotonic() - started) * 1000)
    return statistics.median(samples), min(samples)


ROUNDS = 3


async def main(sshd: RunningSshd) -> None:
    """Rounds alternate the ciphers so a noisy neighbour hurts both alike; medians reported."""
    setups = (("paramiko default", ()), ("ah-ssh-bridge default", DEFAULT_CIPHERS))
    results: dict[str, dict[str, list[float]]] = {
        label: {"up": [], "down": [], "raw": [], "lat": [], "best": []} for label, _ in setups
    }
    names: dict[str, str] = {}
    for _ in range(ROUNDS):
        for label, ciphers in setups:
            async with await _transport(sshd, ciphers) as t:
                names[label] = t.cipher
                results[label]["up"].append(await _upload(t))
                results[label]["down"].append(await _download(t))
                results[label]["raw"].append(await _download_raw(t))
                median, best = await _latency(t)
                results[label]["lat"].append(median)
                results[label]["best"].append(best)
    for label, _ in setups:
        r = results[label]
        print(
            f"{label:22} {names[label]:24} "
            f"upload {statistics.median(r['up']):6.1f} MB/s ({', '.join(f'{x:.0f}' for x in r['up'])})  "
            f"download {statistics.median(r['down']):5.1f} MB/s ({', '.join(f'{x:.0f}' for x in r['down'])})  "
            f"raw {statistics.median(r['raw']):5.1f} MB/s  "
            f"exec 'true' median {statistics.median(r['lat']):.1f} ms (min {min(r['best']):.1f})"
        )


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        server = start_sshd(Path(tmp) / "sshd")
        try:
            asyncio.run(main(server))
        finally:
            server.stop()
