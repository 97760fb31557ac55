"""Throughput and exec latency of ah-ssh-bridge against a local OpenSSH sshd.

    uv run --package ah-ssh-bridge python packages/ah-ssh-bridge/benchmarks/bench_ssh_bridge.py

Upload: 200 MB of stdin into ``cat > /dev/null``. Download: 200 MB of 100-character lines
from ``yes``, through the line splitter into a callback. Latency: ``true`` run sequentially
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


async def _latency(t: SshTransport, n: int = 100) -> tuple[float, float]:
    samples = []
    for _ in range(n):
        started = time.monotonic()
        await t.run("true")
        samples.append((time.monotonic() - started) * 1000)
    return statistics.median(samples), min(samples)


async def main(sshd: RunningSshd) -> None:
    for label, ciphers in (("paramiko default", ()), ("ah-ssh-bridge default", DEFAULT_CIPHERS)):
        async with await _transport(sshd, ciphers) as t:
            up = await _upload(t)
            down = await _download(t)
            median, best = await _latency(t)
            print(
                f"{label:22} {t.cipher:24} upload {up:6.1f} MB/s  download {down:6.1f} MB/s  "
                f"exec 'true' median {median:.1f} ms (min {best:.1f})"
            )


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        server = start_sshd(Path(tmp) / "sshd")
        try:
            asyncio.run(main(server))
        finally:
            server.stop()
