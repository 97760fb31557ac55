"""A fleet on this machine in one command, until `ah-fleetctl demo` (issue 8) lands.

    uv run python -m ah_harness_local.demo [--followers N] [-- CMD...]

Starts a private access point and N followers (each with its own real sshd on loopback) in a temp
dir, fences the current directory to them, runs the command everywhere with `ah-fleetctl run`,
and tears everything down, also on failure and Ctrl-C. The exit code is `ah-fleetctl run`'s.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence

from .fleet import FollowerSpec, LocalFleet

DEFAULT_COMMAND = ["sh", "-c", 'echo "$(uname -sm) in $(pwd): $(find . -type f | wc -l) files"']


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ah_harness_local.demo", description=__doc__)
    parser.add_argument("--followers", type=int, default=3, help="how many followers (default 3)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="command to run (after --)")
    args = parser.parse_args(argv)
    if args.followers < 1:
        parser.error("--followers must be at least 1")
    command = [c for c in args.command if c != "--"] or DEFAULT_COMMAND
    missing = [tool for tool in ("ssh", "ssh-keygen", "rsync") if shutil.which(tool) is None]
    if not os.path.exists("/usr/sbin/sshd"):
        missing.append("sshd")
    if missing:
        print(
            f"missing: {', '.join(missing)}; install them with `bash scripts/install-system-deps.sh` "
            "(Debian: openssh-server openssh-client rsync)",
            file=sys.stderr,
        )
        return 8
    started = time.monotonic()
    specs = [
        FollowerSpec(name=f"demo-{i + 1}", tags={"role": f"r{i + 1}"})
        for i in range(args.followers)
    ]
    with LocalFleet(specs) as fleet:
        print(f"fleet of {args.followers} up in {time.monotonic() - started:.1f}s", file=sys.stderr)
        env = {**os.environ, **fleet.env()}
        fleetctl = shutil.which("ah-fleetctl") or "ah-fleetctl"
        result = subprocess.run([fleetctl, "run", "--", *command], env=env, check=False)
    print(f"total {time.monotonic() - started:.1f}s", file=sys.stderr)
    return result.returncode


if __name__ == "__main__":
    raise SystemExit(main())
