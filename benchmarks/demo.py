"""How long `ah-fleetctl demo` takes: start to "followers connected", to the first per-host result,
and to the end (teardown included).

    uv run python benchmarks/demo.py [--runs 3] [--followers 3] [--tree PATH] [-- CMD...]

Runs the real `ah-fleetctl demo` (this environment's console script) `--runs` times, one after the
other, from `--tree` (default: the checkout, as the README's quick start does), timing its output
lines as they arrive: "connected" is the demo's `N followers connected` line on stderr, "first
result" the first `host | ...` line on stdout, "total" the process exit. Reports each run, the
median, and PASS/FAIL against the issue's target: per-host results from three followers within a
minute. Exit code 0 either way (a failed demo run is reported and exits 1).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

ROOT = Path(__file__).resolve().parent.parent
TARGET_FIRST_RESULT_S = 60.0


@dataclass
class Timing:
    connected_s: float | None = None
    first_result_s: float | None = None
    total_s: float | None = None
    exit_code: int | None = None
    results: int = 0
    demo_reported_startup_s: float | None = None


def _pump(stream: IO[str], on_line: Callable[[str], None]) -> None:
    for line in stream:
        on_line(line.rstrip("\n"))


def run_once(argv: list[str], cwd: Path, followers: int, bytecode: bool) -> Timing:
    timing = Timing()
    env = {k: v for k, v in os.environ.items() if not k.startswith("AH_")}
    if bytecode:
        env.pop("PYTHONDONTWRITEBYTECODE", None)
    started = time.monotonic()
    proc = subprocess.Popen(
        argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stdout is not None and proc.stderr is not None
    connected = re.compile(r"^demo: \d+ followers? connected in ([\d.]+)s")
    stderr_lines: list[str] = []

    def on_out(line: str) -> None:
        if re.match(r"^demo-\d+ \| ", line):
            timing.results += 1
            if timing.first_result_s is None:
                timing.first_result_s = time.monotonic() - started

    def on_err(line: str) -> None:
        stderr_lines.append(line)
        match = connected.match(line)
        if match and timing.connected_s is None:
            timing.connected_s = time.monotonic() - started
            timing.demo_reported_startup_s = float(match.group(1))

    threads = [
        threading.Thread(target=_pump, args=(proc.stdout, on_out), daemon=True),
        threading.Thread(target=_pump, args=(proc.stderr, on_err), daemon=True),
    ]
    for thread in threads:
        thread.start()
    timing.exit_code = proc.wait(timeout=600)
    timing.total_s = time.monotonic() - started
    for thread in threads:
        thread.join(10)
    if timing.exit_code != 0 or timing.results < followers:
        print("\n".join(stderr_lines[-30:]), file=sys.stderr)
    return timing


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}s"


def _uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--followers", type=int, default=3)
    parser.add_argument("--tree", type=Path, default=ROOT, help="directory the demo fences")
    parser.add_argument(
        "--no-bytecode",
        action="store_true",
        help="keep PYTHONDONTWRITEBYTECODE if set (by default it is dropped: an installed tool "
        "has its bytecode cached, and without it every daemon compiles ~600 modules afresh)",
    )
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    script = Path(sys.executable).parent / "ah-fleetctl"
    binary = str(script) if script.is_file() else shutil.which("ah-fleetctl") or "ah-fleetctl"
    command = [c for c in args.command if c != "--"]
    argv = [
        binary,
        "demo",
        "--followers",
        str(args.followers),
        *(["--", *command] if command else []),
    ]
    bytecode = "as set" if args.no_bytecode else "unset"
    print(f"# {' '.join(argv)}  (in {args.tree}; PYTHONDONTWRITEBYTECODE {bytecode})")
    print(f"# before: {_uptime()}")
    timings: list[Timing] = []
    for index in range(1, args.runs + 1):
        timing = run_once(argv, args.tree, args.followers, bytecode=not args.no_bytecode)
        timings.append(timing)
        print(
            f"run {index}: exit {timing.exit_code}, {timing.results} results; connected "
            f"{_fmt(timing.connected_s)} (demo says fleet up in "
            f"{_fmt(timing.demo_reported_startup_s)}), first result {_fmt(timing.first_result_s)}, "
            f"total {_fmt(timing.total_s)}  [{_uptime()}]"
        )
    print(f"# after: {_uptime()}")
    ok = [t for t in timings if t.exit_code == 0 and t.results >= args.followers]
    if not ok:
        print("FAIL: no run gave a result from every follower")
        return 1

    def median(values: list[float | None]) -> float:
        return statistics.median(v for v in values if v is not None)

    first = median([t.first_result_s for t in ok])
    print(
        f"median of {len(ok)}: connected {median([t.connected_s for t in ok]):.1f}s, "
        f"first result {first:.1f}s, total {median([t.total_s for t in ok]):.1f}s"
    )
    worst = max(t.first_result_s or 0.0 for t in ok)
    verdict = "PASS" if worst <= TARGET_FIRST_RESULT_S and len(ok) == len(timings) else "FAIL"
    print(
        f"{verdict}: per-host results from {args.followers} followers within "
        f"{TARGET_FIRST_RESULT_S:.0f}s (slowest first result {worst:.1f}s)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
