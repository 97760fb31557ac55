"""CPU per pushed session: what publishing one short run's session events costs the leader
and the access point.

A real access point (``ah-access-pointd init`` + ``serve`` in a temp dir, its own process)
receives N sessions one after the other, each with the 33 events of ``run -- true`` on 16
hosts (16 ``hostStarted``, 16 ``hostExited``, one ``summary``), pushed by the leader's real
sinks:

* ``agent``: one `ah_fleetctl.events.AgentEventPush` (the leader agent's: one QUIC connection
  for every session, an `AgentSessionSink` per session on one event loop);
* ``cli``: a `ah_fleetctl.events.SessionEventSink` per session (the full CLI's: a thread, an
  event loop and a QUIC connection with its handshake per session; the push endpoint is
  discovered once and reused, as the agent did before it had one connection).

Reported per session: the leader's CPU (this process), the access point's CPU (from /proc)
and the wall time of ``start`` → ``close`` done; the load average before and after.

    uv run python benchmarks/push_sessions.py [--sessions 300] [--mode agent|cli|both]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

_TICK = os.sysconf("SC_CLK_TCK")
_WARM_UP = 5


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def _run_events(sink: Any) -> list[Any]:
    from ah_domain_types import (
        HostExitedEvent,
        HostResult,
        HostStartedEvent,
        HostState,
        OsKind,
        RunSummary,
        SummaryEvent,
    )

    hosts = [f"f{i:02d}" for i in range(16)]
    events = [sink.make(HostStartedEvent, host=h, command="true") for h in hosts]
    results = [
        HostResult(
            host=h,
            os=OsKind.LINUX,
            state=HostState.OK,
            exit_code=0,
            took_ms=12,
            log_path=f"/tmp/ah/runs/20261128T000000Z-000000/{h}.log",
            command="true",
        )
        for h in hosts
    ]
    events += [sink.make(HostExitedEvent, host=r.host, result=r) for r in results]
    events.append(sink.make(SummaryEvent, summary=RunSummary.from_results(results)))
    return events


class _AccessPoint:
    def __init__(self, work: Path) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("AH_")}
        self.state = work / "state"
        subprocess.run(
            [sys.executable, "-m", "ah_access_pointd", "init", "--state-dir", str(self.state)],
            env=env, check=True, capture_output=True,
        )  # fmt: skip
        ready = work / "ready.json"
        with open(work / "ap.log", "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "ah_access_pointd", "serve",
                 "--state-dir", str(self.state), "--ready-file", str(ready)],
                env=env, stdout=subprocess.DEVNULL, stderr=log,
            )  # fmt: skip
        deadline = time.monotonic() + 60
        while True:
            try:
                info = json.loads(ready.read_text())
                break
            except (OSError, ValueError):
                if self.process.poll() is not None or time.monotonic() > deadline:
                    log = work / "ap.log"
                    raise RuntimeError(f"the access point did not start (log: {log})") from None
                time.sleep(0.05)
        self.api_url = f"https://127.0.0.1:{info['apiPort']}"
        self.ca_path = self.state / "fleet-ca.pem"

    def token(self) -> str:
        from ah_access_pointd.state import load_state

        return load_state(self.state).signer.issue_user("bench", scopes=["exec"])

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)


def _measure(ap: _AccessPoint, sessions: int, one: Callable[[], None]) -> tuple[float, ...]:
    for _ in range(_WARM_UP):
        one()
    leader0, ap0, wall0 = time.process_time(), _cpu_s(ap.process.pid), time.perf_counter()
    for _ in range(sessions):
        one()
    leader1, ap1, wall1 = time.process_time(), _cpu_s(ap.process.pid), time.perf_counter()
    return (
        (leader1 - leader0) / sessions * 1000,
        (ap1 - ap0) / sessions * 1000,
        (wall1 - wall0) / sessions * 1000,
    )


def _cli_mode(ap: _AccessPoint, sessions: int, copies: Path) -> tuple[float, ...]:
    from ah_fleetctl.events import PushTarget, SessionEventSink

    token = ap.token()
    verify = ssl.create_default_context(cafile=str(ap.ca_path))
    target: list[PushTarget] = []

    def one() -> None:
        sink = SessionEventSink(
            api_url=ap.api_url, token=token, verify=verify, ca_pem=ap.ca_path.read_text(),
            local_copy_dir=copies, push_target=target[0] if target else None,
        )  # fmt: skip
        sink.start()
        for event in _run_events(sink):
            sink.emit(event)
        report = sink.close(10.0)
        if not report.complete:
            raise RuntimeError(f"session not delivered: {report}")
        if sink.push_target is not None and not target:
            target.append(sink.push_target)

    return _measure(ap, sessions, one)


def _agent_mode(ap: _AccessPoint, sessions: int, copies: Path) -> tuple[float, ...]:
    from ah_fleetctl.events import AgentEventPush

    loop = asyncio.new_event_loop()
    push = AgentEventPush(
        api_url=ap.api_url,
        token=ap.token(),
        verify=ssl.create_default_context(cafile=str(ap.ca_path)),
        ca_pem=ap.ca_path.read_text(),
    )

    async def session() -> None:
        sink = push.sink(copies)
        sink.start()
        for event in _run_events(sink):
            sink.emit(event)
        report = await sink.close(10.0)
        if not report.complete:
            raise RuntimeError(f"session not delivered: {report}")

    try:
        result = _measure(ap, sessions, lambda: loop.run_until_complete(session()))
        if push.connections != 1:
            raise RuntimeError(f"{push.connections} connections for {sessions} sessions")
        loop.run_until_complete(push.close())
    finally:
        loop.close()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=300)
    parser.add_argument("--mode", choices=["agent", "cli", "both"], default="both")
    args = parser.parse_args()
    from loguru import logger

    logger.remove()
    logger.add(sys.stderr, level="WARNING")
    before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="ah-push-sessions-") as tmp:
        work = Path(tmp)
        ap = _AccessPoint(work)
        try:
            modes = ["agent", "cli"] if args.mode == "both" else [args.mode]
            for mode in modes:
                measure = _agent_mode if mode == "agent" else _cli_mode
                leader, access_point, wall = measure(ap, args.sessions, work / "copies")
                print(
                    f"{mode:5s}: leader {leader:5.2f} ms CPU/session, access point "
                    f"{access_point:5.2f} ms CPU/session, {wall:5.1f} ms wall/session "
                    f"({args.sessions} sessions of 33 events)"
                )
        finally:
            ap.stop()
    after = os.getloadavg()
    print(
        "load average before {:.2f} {:.2f} {:.2f}, after {:.2f} {:.2f} {:.2f}".format(
            *before, *after
        )
    )


if __name__ == "__main__":
    main()
