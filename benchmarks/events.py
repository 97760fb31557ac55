"""Session events under load: a leader pushes N events/s while SSE clients follow the session.

A real access point (``ah-access-pointd init`` + ``serve`` in a temp dir) receives the events
from the leader's real sink (`ah_fleetctl.events.SessionEventSink`: QUIC, ``ah-leader/1``)
at a steady rate; ``--clients`` SSE clients (raw TLS sockets in a child process, so their
parsing does not compete with the leader's interpreter) follow the session from its start.

Reported: the rate the leader emitted at, the rate the access point acknowledged at, what
each client received (and how many ids were not the next one: a gap, duplicate or reordering,
must be 0), the end-to-end latency emit → receipt on a client (p50/p99/max over every event
and every client; an event counts as received when its whole frame has been read; both
stamps from the same monotonic clock), split into emit → stored (the access point's tsMs) and
stored → receipt, the p99/max per second of the run, the CPU of the access point, the leader
and the clients (from /proc; 100% = one core), the leader's QUIC losses, congestion window
and RTT, and UDP receive-buffer drops on the machine.

    uv run python benchmarks/events.py [--rate 5000] [--seconds 10] [--clients 10]
        [--leader-batches N] [--profile-ap FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import os
import re
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

_ID = re.compile(rb"\nid: (\d+)\n")
_TS = re.compile(rb'"tsMs":([0-9.e+]+)}\n')
_CLK_TCK = os.sysconf("SC_CLK_TCK")

Mark = tuple[int, int, int, float]
"""(highest id received so far, monotonic ns and wall-clock ns of the read that completed
it, the ``tsMs`` the access point stored that event with)"""


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of ``pid`` so far (Linux /proc)."""
    raw = Path(f"/proc/{pid}/stat").read_text()
    fields = raw[raw.rfind(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def runqueue_wait_ns(pid: int) -> int:
    """Nanoseconds the threads of ``pid`` have spent runnable but waiting for a CPU
    (``/proc/<pid>/task/*/schedstat``, second field): time lost to CPU contention."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError, IndexError, ValueError):  # the thread ended
            total += int((task / "schedstat").read_text().split()[1])
    return total


class RunQueueSampler(threading.Thread):
    """Once a second: how long each process waited for a CPU in that second."""

    def __init__(self, pids: dict[str, int], started: float) -> None:
        super().__init__(name="runqueue-sampler", daemon=True)
        self.pids = pids
        self.started = started
        self.stop = threading.Event()
        self.seconds: list[dict[str, float]] = []
        """Per second of the run: process name → milliseconds waited."""
        self.totals: dict[str, float] = dict.fromkeys(pids, 0.0)

    def _read(self) -> dict[str, int]:
        values = {}
        for name, pid in self.pids.items():
            try:
                values[name] = runqueue_wait_ns(pid)
            except OSError:
                values[name] = 0
        return values

    def run(self) -> None:
        last = self._read()
        first = dict(last)
        tick = 1
        while not self.stop.wait(max(0.0, self.started + tick - time.monotonic())):
            now = self._read()
            self.seconds.append({k: (now[k] - last[k]) / 1e6 for k in now})
            self.totals = {k: (now[k] - first[k]) / 1e6 for k in now}
            last = now
            tick += 1


def udp_receive_buffer_errors() -> int:
    """Datagrams this machine dropped for a full socket receive buffer so far (every process)."""
    lines = [
        line.split()
        for line in Path("/proc/net/snmp").read_text().splitlines()
        if line.startswith("Udp:")
    ]
    return int(lines[1][lines[0].index("RcvbufErrors")])


class QuicWatch:
    """What the leader's QUIC connection went through: packets declared lost (each one cuts
    the congestion window), and the window and smoothed RTT it ended with."""

    def __init__(self) -> None:
        from aioquic.quic.recovery import QuicPacketRecovery

        self.lost = 0
        self.recoveries: list[Any] = []
        watch = self
        original_lost = QuicPacketRecovery._on_packets_lost
        original_init = QuicPacketRecovery.__init__

        def on_packets_lost(recovery: Any, **kwargs: Any) -> None:
            packets = list(kwargs.pop("packets"))
            watch.lost += len(packets)
            original_lost(recovery, packets=packets, **kwargs)

        def init(recovery: Any, *args: Any, **kwargs: Any) -> None:
            original_init(recovery, *args, **kwargs)
            watch.recoveries.append(recovery)

        QuicPacketRecovery._on_packets_lost = on_packets_lost  # type: ignore[method-assign]
        QuicPacketRecovery.__init__ = init  # type: ignore[method-assign]

    def describe(self) -> str:
        if not self.recoveries:
            return "no connection"
        last = self.recoveries[-1]
        return (
            f"{len(self.recoveries)} connection(s), {self.lost} packets declared lost; "
            f"final congestion window {last.congestion_window / 1024:.0f} KiB, "
            f"smoothed RTT {last._rtt_smoothed * 1000:.1f} ms"
        )


def percentile(values: list[float], fraction: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(fraction * (len(ordered) - 1))))
    return ordered[index]


# --------------------------------------------------------------------------- SSE clients


async def _follow(
    host: str, port: int, ca_pem: str, token: str, session_id: str, expected: int,
    deadline: float, following: Any,
) -> tuple[list[Mark], int, int]:  # fmt: skip
    """One SSE client: a `Mark` per read that completed new events, how often it had to
    reconnect (resuming with Last-Event-ID, as any client must), and how many ids were not
    the one expected next (a gap, a duplicate or a reordering: must be 0)."""
    context = ssl.create_default_context(cadata=ca_pem)
    marks: list[Mark] = []
    highest = 0
    reconnects = -1
    disorder = 0
    while highest < expected and time.monotonic() < deadline:
        reconnects += 1
        reader, writer = await asyncio.open_connection(
            host, port, ssl=context, server_hostname="localhost"
        )
        writer.write(
            (
                f"GET /api/v1/sessions/{session_id}/events HTTP/1.1\r\nHost: localhost\r\n"
                f"Authorization: Bearer {token}\r\nAccept: text/event-stream\r\n"
                f"Last-Event-ID: {highest}\r\n\r\n"
            ).encode()
        )
        await writer.drain()
        tail = b""
        try:
            while highest < expected:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    chunk = await asyncio.wait_for(reader.read(1 << 16), remaining)
                except TimeoutError:
                    break
                if not chunk:
                    break  # the access point ended the stream: resume
                now, wall = time.monotonic_ns(), time.time_ns()
                # An event counts as received once its whole frame (up to the blank line
                # that ends it) is in; the rest waits for the next read (with the newline
                # before it, so that every id line is found as "\nid: ...\n").
                buffered = tail + chunk
                cut = buffered.rfind(b"\n\n") + 1
                data, tail = buffered[:cut], buffered[cut:]
                found = _ID.findall(data)
                if not found:
                    continue
                if highest == 0:
                    with following.get_lock():
                        following.value += 1  # has the warm-up event: it follows
                for raw in found:
                    number = int(raw)
                    if highest and number != highest + 1:
                        disorder += 1
                    highest = max(highest, number)
                stamp = _TS.search(data, data.rfind(b'"tsMs":'))
                marks.append((highest, now, wall, float(stamp[1]) if stamp else 0.0))
        except (ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()
    return marks, reconnects, disorder


def clients_main(
    host: str, port: int, ca_pem: str, token: str, session_id: str, clients: int,
    expected: int, timeout: float, following: Any, results: Any,
) -> None:  # fmt: skip
    async def main() -> list[tuple[list[Mark], int, int]]:
        deadline = time.monotonic() + timeout
        tasks = [
            asyncio.ensure_future(
                _follow(host, port, ca_pem, token, session_id, expected, deadline, following)
            )
            for _ in range(clients)
        ]
        return list(await asyncio.gather(*tasks))

    cpu0, wall0 = time.process_time(), time.monotonic()
    marks = asyncio.run(main())
    results.put((marks, time.process_time() - cpu0, time.monotonic() - wall0))


# --------------------------------------------------------------------------- the run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=int, default=5000, help="events per second to push")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--line", type=int, default=80, help="characters per event payload")
    parser.add_argument(
        "--profile-ap", type=Path, default=None, metavar="FILE",
        help="run the access point under cProfile, writing its stats to FILE",
    )  # fmt: skip
    parser.add_argument(
        "--leader-batches", type=int, default=None, metavar="N",
        help="batches the leader keeps unacknowledged at most (0: no bound; default: the "
        "leader's own, LEADER_MAX_BATCHES_IN_FLIGHT)",
    )  # fmt: skip
    parser.add_argument(
        "--leader-linger-ms", type=float, default=None, metavar="MS",
        help="how long the leader lets an event wait for others to join its batch "
        "(default: the leader's own, LEADER_LINGER_S)",
    )  # fmt: skip
    args = parser.parse_args()
    if args.leader_linger_ms is not None:
        from ah_connectivity import leader_push

        leader_push.LEADER_LINGER_S = args.leader_linger_ms / 1000
    if args.leader_batches is not None:
        from ah_connectivity import leader_push

        leader_push.LEADER_MAX_BATCHES_IN_FLIGHT = args.leader_batches or None  # type: ignore[assignment]

    from ah_access_pointd.state import load_state
    from ah_domain_types import HostLogEvent
    from ah_fleetctl.events import SessionEventSink
    from ah_harness_local import ProcessGroup, wait_for

    quic_watch = QuicWatch()
    env = {k: v for k, v in os.environ.items() if not k.startswith("AH_")}
    with (
        tempfile.TemporaryDirectory(prefix="ah-bench-events-") as tmp,
        ProcessGroup(Path(tmp) / "logs") as group,
    ):
        state_dir = Path(tmp) / "ap"
        subprocess.run(
            [sys.executable, "-m", "ah_access_pointd", "init", "--state-dir", str(state_dir)],
            env=env, check=True, capture_output=True, timeout=120,
        )  # fmt: skip
        ready_file = Path(tmp) / "ready.json"
        profile = ["-m", "cProfile", "-o", str(args.profile_ap)] if args.profile_ap else []
        ap = group.start(
            [
                sys.executable, *profile, "-m", "ah_access_pointd", "serve", "--state-dir", str(state_dir),
                "--ready-file", str(ready_file), "--log-level", "warning",
            ],
            name="ap",
            env=env,
        )  # fmt: skip
        ready = wait_for(
            lambda: json.loads(ready_file.read_text()) if ready_file.exists() else None,
            120,
            what="access point ready",
        )
        state = load_state(state_dir)
        token = state.signer.issue_user("bench", scopes=["exec", "read-logs"])
        ca_pem = state.ca.cert_pem.decode()
        api_url = f"https://127.0.0.1:{ready['apiPort']}"
        total = int(args.rate * args.seconds)

        sink = SessionEventSink(
            api_url=api_url,
            token=token,
            verify=ssl.create_default_context(cadata=ca_pem),
            ca_pem=ca_pem,
            local_copy_dir=Path(tmp) / "copies",
            close_timeout_s=60.0,
        )
        session_id = sink.start()
        # The session exists (and the push connection is up) before the clients follow it.
        sink.emit(sink.make(HostLogEvent, host="bench", stream="stdout", line="warm-up"))
        wait_for(lambda: sink.delivered >= 1, 60, what="the first event acknowledged")

        following: Any = multiprocessing.Value("i", 0)
        results: Any = multiprocessing.Queue()
        followers = multiprocessing.Process(
            target=clients_main,
            args=(
                "127.0.0.1", int(ready["apiPort"]), ca_pem, token, session_id, args.clients,
                total + 1, args.seconds + 120, following, results,
            ),
        )  # fmt: skip
        followers.start()
        wait_for(lambda: following.value >= args.clients, 60, what="every client following")

        payload = "x" * args.line
        emit_ns = [0] * (total + 2)  # by seq: the warm-up event is seq 1
        emit_wall_ns = [0] * (total + 2)
        tick = 0.01
        per_tick = args.rate * tick
        udp_drops0 = udp_receive_buffer_errors()
        ap_cpu0 = cpu_seconds(ap.pid)
        me_cpu0 = time.process_time()
        started = time.monotonic()
        sampler = RunQueueSampler(
            {"access point": ap.pid, "leader": os.getpid(), "clients": int(followers.pid or 0)},
            started,
        )
        sampler.start()
        emitted = 0
        credit = 0.0
        while emitted < total:
            credit += per_tick
            batch = min(int(credit), total - emitted)
            credit -= batch
            for _ in range(batch):
                emitted += 1
                emit_ns[emitted + 1] = time.monotonic_ns()
                emit_wall_ns[emitted + 1] = time.time_ns()
                sink.emit(
                    sink.make(
                        HostLogEvent, host="bench", stream="stdout", line=f"{emitted} {payload}"
                    )
                )
            next_tick = started + (emitted / args.rate)
            delay = next_tick - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        emit_seconds = time.monotonic() - started
        wait_for(lambda: sink.delivered >= total + 1, 120, what="every event acknowledged")
        ack_seconds = time.monotonic() - started
        per_client: list[tuple[list[Mark], int, int]]
        per_client, clients_cpu, clients_wall = results.get(timeout=args.seconds + 180)
        received_seconds = time.monotonic() - started
        ap_cpu = cpu_seconds(ap.pid) - ap_cpu0
        sampler.stop.set()
        sampler.join(5)
        me_cpu = time.process_time() - me_cpu0
        udp_drops = udp_receive_buffer_errors() - udp_drops0
        followers.join(30)
        report = sink.close()

    latencies: list[float] = []
    # Where the time goes, from the last event of each read: emit → the access point stored
    # it (the tsMs it assigned), and stored → receipt; each counted for every event of the read.
    stored_lag: list[float] = []
    fanout_lag: list[float] = []
    by_second: dict[int, list[float]] = {}
    counts = []
    reconnects = sum(r for _, r, _ in per_client)
    disorder = sum(d for _, _, d in per_client)
    for marks, _, _ in per_client:
        counts.append(marks[-1][0] if marks else 0)
        seq = 2
        for highest, at, wall, ts_ms in marks:
            first = seq
            while seq <= highest and seq <= total + 1:
                latency = (at - emit_ns[seq]) / 1e6
                latencies.append(latency)
                second = (emit_ns[seq] - emit_ns[2]) // 1_000_000_000
                by_second.setdefault(second, []).append(latency)
                seq += 1
            last = min(highest, total + 1)
            if last >= 2 and ts_ms:
                # Weighted by the events the read completed, as the latency above is.
                stored_lag += [ts_ms - emit_wall_ns[last] / 1e6] * (seq - first)
                fanout_lag += [wall / 1e6 - ts_ms] * (seq - first)
    print(f"events pushed:         {total} at a target of {args.rate}/s over {args.seconds:g} s")
    print(f"leader emit rate:      {total / emit_seconds:,.0f} events/s")
    print(f"access point acked:    {total / ack_seconds:,.0f} events/s sustained "
          f"(all {report.delivered - 1} acknowledged {ack_seconds - emit_seconds:.2f} s after the last emit)")  # fmt: skip
    print(f"SSE clients:           {args.clients}, each received "
          f"{min(counts) - 1}..{max(counts) - 1} of {total} events "
          f"(all delivered {received_seconds - emit_seconds:.2f} s after the last emit; "
          f"{reconnects} reconnects, {disorder} ids out of sequence)")  # fmt: skip
    print(f"latency emit→receipt:  p50 {percentile(latencies, 0.5):.1f} ms, "
          f"p99 {percentile(latencies, 0.99):.1f} ms, max {max(latencies, default=float('nan')):.1f} ms "
          f"over {len(latencies):,} deliveries")  # fmt: skip
    print(f"  emit→stored:         p50 {percentile(stored_lag, 0.5):.1f} ms, "
          f"p99 {percentile(stored_lag, 0.99):.1f} ms, max {max(stored_lag, default=float('nan')):.1f} ms "
          "(by the access point's tsMs of the last event of each read; wall clock)")  # fmt: skip
    print(f"  stored→receipt:      p50 {percentile(fanout_lag, 0.5):.1f} ms, "
          f"p99 {percentile(fanout_lag, 0.99):.1f} ms, max {max(fanout_lag, default=float('nan')):.1f} ms")  # fmt: skip
    waits = sampler.seconds

    def ap_wait(second: int) -> str:
        return f" (AP waited {waits[second]['access point']:.0f})" if second < len(waits) else ""

    print("  by second of emit:   " + ", ".join(
        f"{second}s p99 {percentile(values, 0.99):.0f}/max {max(values):.0f}{ap_wait(int(second))}"
        for second, values in sorted(by_second.items())))  # fmt: skip
    print("  (ms; 'AP waited': how long the access point was runnable but got no CPU that second)")
    print(f"access point CPU:      {100 * ap_cpu / received_seconds:.0f}% of one core "
          f"({ap_cpu:.1f} s over {received_seconds:.1f} s)")  # fmt: skip
    print(f"leader process CPU:    {100 * me_cpu / received_seconds:.0f}% of one core")
    print(f"SSE clients' process:  {100 * clients_cpu / clients_wall:.0f}% of one core "
          f"(all {args.clients} clients, TLS + parsing)")  # fmt: skip
    print("run-queue wait:        " + ", ".join(
        f"{name} {ms / received_seconds:.0f} ms/s" for name, ms in sampler.totals.items())
        + " (runnable but no CPU: contention with everything else on the machine)")  # fmt: skip
    print(f"leader's QUIC:         {quic_watch.describe()}")
    print(f"UDP receive drops:     {udp_drops} on this machine during the run (all processes)")
    print(f"machine:               {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
