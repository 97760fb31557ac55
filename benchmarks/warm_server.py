"""The warm command server alone: its CPU per command, without SSH or a leader.

Starts ``warm_server.py`` exactly as the leader ships it (``ah_ssh_bridge.warm``'s loader and
payload) with the given Python, over plain pipes, and sends it ``--commands`` START frames
for ``true``, ``--batch`` at a time (the next batch once every EXITED of this one is back).
Reported: the server's own CPU per command and its children's (the ``true`` processes), from
``/proc/<pid>/stat``, and the wall time per command. ``--cwd`` gives every command a working
directory (as ``ah-fleetctl run`` does), ``--python`` another interpreter (a Python 3.6 takes
the ``subprocess.Popen`` path), ``--plain spawn`` forces Popen on any Python.

    flock /tmp/ah-bench.lock uv run python benchmarks/warm_server.py [--commands 3000]
        [--batch 1] [--cwd /tmp] [--python /usr/bin/python3] [--plain spawn]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time

from ah_ssh_bridge.warm import _LOADER, server_payload
from ah_ssh_bridge.warm_codec import EXITED, HELLO, START, Decoder, Frame, encode

# The server's environment is a small login environment, as on a follower.
ENV = {"HOME": "/tmp", "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}


def cpu_ticks(pid: int) -> tuple[int, int]:
    """(own utime+stime, children's cutime+cstime) in clock ticks."""
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12]), int(fields[13]) + int(fields[14])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--commands", type=int, default=3000)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--cwd", default=None)
    parser.add_argument("--python", default="/usr/bin/python3")
    parser.add_argument("--plain", default="", help="AH_WARM_PLAIN for the server")
    args = parser.parse_args()

    # What the leader's start command execs, with this interpreter (see server_command).
    server = subprocess.Popen(
        [args.python, "-I", "-S", "-c", _LOADER, server_payload(), "bash", "2"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=dict(ENV, AH_WARM_PLAIN=args.plain),
    )
    assert server.stdin is not None and server.stdout is not None
    decoder = Decoder(expect_magic=True)

    def frames() -> list[Frame]:
        assert server.stdout is not None
        data = os.read(server.stdout.fileno(), 65536)
        if not data:
            raise SystemExit("the server ended")
        return decoder.feed(data)

    hello: dict[str, object] = {}
    while not hello:
        hello = next((f.json() for f in frames() if f.kind == HELLO), {})
    spec: dict[str, object] = {"argv": ["true"]}
    if args.cwd:
        spec["cwd"] = args.cwd
    start = json.dumps(spec).encode()
    next_id = 1

    def batch() -> None:
        nonlocal next_id
        assert server.stdin is not None
        for _ in range(args.batch):
            server.stdin.write(encode(START, next_id, start))
            next_id += 1
        server.stdin.flush()
        left = args.batch
        while left:
            for frame in frames():
                if frame.kind == EXITED:
                    if frame.json() != {"code": 0}:
                        raise SystemExit(f"command {frame.id}: {frame.json()}")
                    left -= 1
                elif frame.kind != HELLO:
                    raise SystemExit(f"unexpected {frame!r}: {frame.payload!r}")

    for _ in range(20):  # warm-up (the login-file watch is set up on the first idle moment)
        batch()
    rounds = max(1, args.commands // args.batch)
    load_before = os.getloadavg()
    self0, children0 = cpu_ticks(server.pid)
    began = time.perf_counter()
    for _ in range(rounds):
        batch()
    wall = time.perf_counter() - began
    self1, children1 = cpu_ticks(server.pid)
    load_after = os.getloadavg()
    server.stdin.close()
    server.wait(10)
    count = rounds * args.batch
    tick_us = 1e6 / os.sysconf("SC_CLK_TCK")
    print(
        f"python {hello.get('python')} spawn={hello.get('spawn')} batch={args.batch} "
        f"cwd={args.cwd}: {count} commands; server CPU {(self1 - self0) * tick_us / count:.0f} "
        f"us/command, children {(children1 - children0) * tick_us / count:.0f} us/command, "
        f"wall {wall / count * 1e6:.0f} us/command (load {load_before[0]:.2f} -> "
        f"{load_after[0]:.2f})"
    )


if __name__ == "__main__":
    main()
