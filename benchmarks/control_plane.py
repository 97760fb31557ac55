"""Control-plane scale: one real access point holding N followers over real QUIC.

What runs:

1. ``ah-access-pointd init`` + ``serve`` in a temp state directory (a real process, its own
   process group; optionally under ``python -m cProfile``).
2. N enrollment tokens minted in this process with the access point's signing key, N keys and
   CSRs, and N ``POST /api/v1/enroll`` over the real HTTPS API (bounded concurrency).
3. N `ControlClient`s (real QUIC over UDP loopback) spread over P worker processes, each an
   asyncio loop with N/P clients. They dial together (a thundering herd, as after an access
   point restart), say Hello and heartbeat at the interval the access point tells them.
4. Once every follower got its Welcome and a warm-up passed, a steady window of ``--duration``
   in which the heartbeat RTT samples (Heartbeat -> Ack, from the client's own state machine,
   1 ms resolution), the access point's CPU (``/proc/<pid>/stat`` utime+stime) and the load
   average are taken. Then ``GET /api/v1/followers`` (user token) counts the healthy ones and
   ``VmHWM`` gives the access point's peak RSS.

The spec target is 500 followers on a 2-core machine with heartbeat p99 under 200 ms; the
verdict is printed, the exit code is 0 either way (this is a measurement).

    uv run python benchmarks/control_plane.py --followers 500 --processes 4 \
        --heartbeat 5s --duration 30s [--profile ap.prof] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import http.client
import json
import multiprocessing
import multiprocessing.process
import multiprocessing.queues
import multiprocessing.synchronize
import os
import platform
import pstats
import queue
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from types import FrameType
from typing import Any

import msgspec
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from loguru import logger

from ah_connectivity import (
    Backoff,
    ControlClient,
    Identity,
    TokenSigner,
    ca_fingerprint,
    generate_private_key,
    load_ca_certificate,
    make_csr,
)
from ah_domain_types import (
    ControlMessage,
    EnrollRequest,
    EnrollResponse,
    FollowerInfo,
    OsKind,
    Resources,
    StreamError,
    StreamErrorCode,
    Welcome,
    parse_duration,
)
from ah_harness_local import ProcessGroup, wait_for

TRUST_DOMAIN = "bench.fleet"
TARGET_FOLLOWERS = 500
TARGET_P99_MS = 200.0
AP_MODULE = "ah_access_pointd"
_CLK_TCK = os.sysconf("SC_CLK_TCK")


# ------------------------------------------------------------------------------ wire shapes


class _ReadyFile(msgspec.Struct, frozen=True, rename="camel"):
    pid: int
    quic_port: int
    api_port: int
    ca_fingerprint: str


class _ListedInfo(msgspec.Struct, frozen=True):
    name: str


class _ListedFollower(msgspec.Struct, frozen=True):
    info: _ListedInfo
    health: str


class _FollowerList(msgspec.Struct, frozen=True):
    followers: list[_ListedFollower]


# ------------------------------------------------------------------------------ small helpers


def _percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted sequence (NaN when empty)."""
    if not sorted_values:
        return float("nan")
    rank = max(1, min(len(sorted_values), round(q / 100 * len(sorted_values) + 0.5)))
    return float(sorted_values[rank - 1])


def _cpu_seconds(pid: int) -> float:
    """utime + stime of every thread of `pid`, in seconds."""
    raw = Path(f"/proc/{pid}/stat").read_text()
    fields = raw[raw.rfind(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def _status_kb(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1])
    raise KeyError(f"/proc/{pid}/status has no {key} line")


def _loadavg() -> tuple[float, float, float]:
    return os.getloadavg()


def _udp_socket_drops(port: int) -> int:
    """Datagrams dropped at the UDP socket bound to local `port` (``/proc/net/udp`` drops)."""
    total = 0
    for table in ("/proc/net/udp", "/proc/net/udp6"):
        with contextlib.suppress(FileNotFoundError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if int(fields[1].rsplit(":", 1)[1], 16) == port:
                    total += int(fields[-1])
    return total


def _udp_receive_buffer_drops() -> int:
    """Datagrams the kernel dropped for a full socket receive buffer, machine-wide."""
    lines = [line.split() for line in Path("/proc/net/snmp").read_text().splitlines()]
    header, values = (line for line in lines if line[0] == "Udp:")
    return int(values[header.index("RcvbufErrors")])


def _ap_env() -> dict[str, str]:
    # The access point must not pick up the caller's AH_* configuration.
    return {k: v for k, v in os.environ.items() if not k.startswith("AH_")}


def _pinned_context(ca_pem: bytes) -> ssl.SSLContext:
    context = ssl.create_default_context(cadata=ca_pem.decode())
    # Identified by the pinned CA, not by the address dialled (as ah-followerd does).
    context.check_hostname = False
    return context


def _fake_host_key_fingerprint(name: str) -> str:
    digest = hashlib.sha256(f"bench-host-key:{name}".encode()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def _follower_info(name: str) -> FollowerInfo:
    return FollowerInfo(
        name=name,
        os=OsKind.LINUX,
        arch=platform.machine() or "unknown",
        tags={"bench": "control-plane"},
        resources=Resources(cpus=1, memory_mb=1024),
        host_key_fingerprint=_fake_host_key_fingerprint(name),
        direct_address=None,
        workspace="/srv/bench",
        version="0.0.0+bench",
    )


# ------------------------------------------------------------------------------ access point


@dataclass
class AccessPoint:
    state_dir: Path
    pid: int
    quic_port: int
    api_port: int
    ca_pem: bytes
    signer: TokenSigner

    @cached_property
    def ssl_context(self) -> ssl.SSLContext:
        return _pinned_context(self.ca_pem)

    def request(
        self, method: str, path: str, *, body: bytes | None = None, token: str | None = None
    ) -> tuple[int, bytes]:
        conn = http.client.HTTPSConnection(
            "127.0.0.1", self.api_port, timeout=60, context=self.ssl_context
        )
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = "application/json"
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        try:
            conn.request(method, f"/api/v1{path}", body=body, headers=headers)
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()


def start_access_point(
    group: ProcessGroup, work: Path, heartbeat: str, profile: Path | None
) -> AccessPoint:
    state_dir = work / "ap-state"
    init = subprocess.run(
        [sys.executable, "-m", AP_MODULE, "init", "--state-dir", str(state_dir),
         "--trust-domain", TRUST_DOMAIN],
        capture_output=True, text=True, env=_ap_env(), stdin=subprocess.DEVNULL, timeout=120,
    )  # fmt: skip
    if init.returncode != 0:
        raise RuntimeError(f"ah-access-pointd init failed ({init.returncode}):\n{init.stderr}")
    ready_file = work / "ap-ready.json"
    python = [sys.executable]
    if profile is not None:
        python += ["-m", "cProfile", "-o", str(profile)]
    process = group.start(
        [*python, "-m", AP_MODULE, "serve", "--state-dir", str(state_dir),
         "--quic-port", "0", "--api-port", "0", "--ready-file", str(ready_file),
         "--heartbeat-interval", heartbeat],
        name="access-point", env=_ap_env(),
    )  # fmt: skip

    def ready() -> _ReadyFile | None:
        if not process.is_running:
            raise RuntimeError(
                f"access point exited {process.returncode} before it was ready:\n"
                f"{process.log_text()[-4000:]}"
            )
        try:
            found = msgspec.json.decode(ready_file.read_bytes(), type=_ReadyFile)
        except (OSError, msgspec.DecodeError):
            return None
        return found if found.pid == process.pid else None

    info: _ReadyFile = wait_for(ready, 60, what=f"access point ready file {ready_file}")
    return AccessPoint(
        state_dir=state_dir,
        pid=process.pid,
        quic_port=info.quic_port,
        api_port=info.api_port,
        ca_pem=(state_dir / "fleet-ca.pem").read_bytes(),
        signer=TokenSigner.load(state_dir / "token-signing.key", TRUST_DOMAIN),
    )


# ------------------------------------------------------------------------------ enrollment


@dataclass(frozen=True)
class Credentials:
    name: str
    key_pem: bytes
    cert_pem: bytes


@dataclass(frozen=True)
class _Pending:
    name: str
    key_pem: bytes
    request: bytes


def prepare_enrollments(ap: AccessPoint, names: Sequence[str]) -> list[_Pending]:
    """Keys, CSRs and one-time tokens, minted here with the access point's signing key."""
    fingerprint = ca_fingerprint(load_ca_certificate(ap.ca_pem))
    pending: list[_Pending] = []
    for name in names:
        key = generate_private_key()
        token = ap.signer.issue_enroll(name, ca_fingerprint=fingerprint, ttl="1h")
        request = EnrollRequest(
            token=token, name=name, csr_pem=make_csr(key, name).decode(), tags={}
        )
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        pending.append(_Pending(name, key_pem, msgspec.json.encode(request)))
    return pending


def enroll_all(ap: AccessPoint, pending: Sequence[_Pending], concurrency: int) -> list[Credentials]:
    """POST /api/v1/enroll for every follower, `concurrency` at a time (one TLS connection
    each, like a real follower)."""

    def one(item: _Pending) -> Credentials:
        status, body = ap.request("POST", "/enroll", body=item.request)
        if status != 200:
            raise RuntimeError(
                f"enrollment of {item.name!r} answered HTTP {status}: {body[:300]!r}"
            )
        answer = msgspec.json.decode(body, type=EnrollResponse)
        return Credentials(item.name, item.key_pem, answer.certificate_pem.encode())

    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        return list(pool.map(one, pending))


# ------------------------------------------------------------------------------ workers


@dataclass(frozen=True)
class WorkerConfig:
    index: int
    host: str
    port: int
    trust_domain: str
    ca_pem: bytes
    credentials: list[Credentials]
    log_file: Path
    ramp_s: float


@dataclass
class WorkerResult:
    index: int
    rtt_samples: list[tuple[float, int]] = field(default_factory=list)
    """(monotonic time the Ack arrived, RTT in ms)."""
    loop_lag: list[tuple[float, float]] = field(default_factory=list)
    """(monotonic time, how late a 50 ms sleep woke up, in ms)."""
    stop_errors: int = 0


class _MeasuredClient(ControlClient):
    """A ControlClient that keeps every heartbeat RTT sample with the time it arrived."""

    def __init__(self, samples: list[tuple[float, int]], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._samples = samples

    def _rtt(self, rtt_ms: int) -> None:
        self._samples.append((time.monotonic(), rtt_ms))
        super()._rtt(rtt_ms)


async def _refuse_rpc(request: ControlMessage) -> ControlMessage:
    return StreamError(
        code=StreamErrorCode.UNEXPECTED_MESSAGE,
        message=f"benchmark follower does not serve {type(request).__name__}",
    )


async def _worker_main(
    config: WorkerConfig,
    events: multiprocessing.queues.Queue[Any],
    go: multiprocessing.synchronize.Event,
    stop: multiprocessing.synchronize.Event,
) -> WorkerResult:
    loop = asyncio.get_running_loop()
    result = WorkerResult(config.index)
    ca_cert = load_ca_certificate(config.ca_pem)
    clients: list[_MeasuredClient] = []
    for slot, cred in enumerate(config.credentials):
        key = serialization.load_pem_private_key(cred.key_pem, password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise TypeError(f"follower {cred.name!r}: expected an EC key, got {type(key).__name__}")
        identity = Identity(key=key, cert=x509.load_pem_x509_certificate(cred.cert_pem))

        def on_connected(welcome: Welcome, slot: int = slot) -> None:
            events.put(("welcome", config.index, slot, time.monotonic()))

        def on_disconnected(reason: str, slot: int = slot) -> None:
            events.put(("lost", config.index, slot, time.monotonic(), reason))

        clients.append(
            _MeasuredClient(
                result.rtt_samples,
                host=config.host,
                port=config.port,
                identity=identity,
                ca=ca_cert,
                trust_domain=config.trust_domain,
                info=_follower_info(cred.name),
                on_rpc=_refuse_rpc,
                backoff=Backoff(base_s=0.2, cap_s=5.0),
                on_connected=on_connected,
                on_disconnected=on_disconnected,
                tunnel_policy=None,
            )
        )
    events.put(("ready", config.index))
    while not go.is_set():
        if stop.is_set():
            return result
        await asyncio.sleep(0.01)

    async def lag_monitor() -> None:
        while True:
            before = loop.time()
            await asyncio.sleep(0.05)
            result.loop_lag.append((time.monotonic(), (loop.time() - before - 0.05) * 1000))

    monitor = asyncio.create_task(lag_monitor())
    runs: list[asyncio.Task[None]] = []
    step = config.ramp_s / len(clients) if clients else 0.0
    for client in clients:
        runs.append(asyncio.create_task(client.run()))
        if step:
            await asyncio.sleep(step)
    while not stop.is_set():
        await asyncio.sleep(0.1)
    monitor.cancel()
    stops = await asyncio.gather(
        *(client.stop("benchmark over") for client in clients), return_exceptions=True
    )
    result.stop_errors = sum(1 for outcome in stops if isinstance(outcome, BaseException))
    for run in runs:
        run.cancel()
    await asyncio.gather(*runs, return_exceptions=True)
    return result


def worker_process(
    config: WorkerConfig,
    events: multiprocessing.queues.Queue[Any],
    go: multiprocessing.synchronize.Event,
    stop: multiprocessing.synchronize.Event,
) -> None:
    """Entry point of one load-generator process."""
    # Ctrl-C reaches the whole foreground process group; the parent decides when we stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logger.remove()
    logger.add(config.log_file, level="WARNING", enqueue=False)
    try:
        result = asyncio.run(_worker_main(config, events, go, stop))
    except BaseException as exc:
        events.put(("error", config.index, f"{type(exc).__name__}: {exc}"))
        raise
    events.put(("result", config.index, result))


# ------------------------------------------------------------------------------ measurement


@dataclass
class Report:
    followers: int
    processes: int
    heartbeat_s: float
    duration_s: float
    prepare_s: float
    enroll_s: float
    connect_all_s: float | None
    connected: int
    warmup_s: float
    window_s: float
    rtt_samples: int
    rtt_expected: int
    rtt_p50_ms: float
    rtt_p99_ms: float
    rtt_max_ms: float
    rtt_ramp_p99_ms: float
    rtt_ramp_max_ms: float
    ap_cpu_percent: float
    ap_peak_rss_mb: float
    ap_rss_mb: float
    workers_cpu_percent: float
    worker_lag_p99_ms: float
    worker_lag_max_ms: float
    disconnects_total: int
    disconnects_in_window: int
    listed: int
    healthy: int
    loadavg_before: tuple[float, float, float]
    loadavg_window_end: tuple[float, float, float]
    udp_drops_total: int
    udp_drops_in_window: int
    ap_socket_drops: int
    profile: str | None
    passed: bool
    verdict: list[str]


def _drain(events: multiprocessing.queues.Queue[Any], timeout: float) -> Iterator[tuple[Any, ...]]:
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return
        try:
            yield events.get(timeout=min(remaining, 0.2))
        except queue.Empty:
            continue


def run(args: argparse.Namespace, work: Path) -> Report:
    heartbeat_s = parse_duration(args.heartbeat)
    duration_s = parse_duration(args.duration)
    warmup_s = parse_duration(args.warmup) if args.warmup else max(2 * heartbeat_s, 5.0)
    n, p = args.followers, max(1, min(args.processes, args.followers))
    profile: Path | None = Path(args.profile).resolve() if args.profile else None
    log = _progress
    log(f"work dir {work}; {os.cpu_count()} cores; load average {_loadavg()}")

    with ProcessGroup(work / "logs", terminate_timeout=15.0) as group:
        ap = start_access_point(group, work, args.heartbeat, profile)
        log(f"access point pid {ap.pid}: QUIC :{ap.quic_port}/udp, API :{ap.api_port}")

        names = [f"bench-{i:04d}" for i in range(n)]
        started = time.monotonic()
        pending = prepare_enrollments(ap, names)
        prepare_s = time.monotonic() - started
        started = time.monotonic()
        creds = enroll_all(ap, pending, args.enroll_concurrency)
        enroll_s = time.monotonic() - started
        log(
            f"enrolled {len(creds)} followers in {enroll_s:.2f} s "
            f"({len(creds) / enroll_s:.0f}/s, {args.enroll_concurrency} at a time; keys, "
            f"CSRs and tokens took {prepare_s:.2f} s beforehand)"
        )

        context = multiprocessing.get_context("spawn")
        events: multiprocessing.queues.Queue[Any] = context.Queue()
        go, stop = context.Event(), context.Event()
        workers: list[multiprocessing.process.BaseProcess] = []

        def stop_workers() -> None:
            """Let the workers say Goodbye and exit (20 s in all), then kill what is left.
            Their queue is drained meanwhile: a process exits only once what it put there
            reached the pipe, and nobody else reads it on this path."""
            stop.set()
            deadline = time.monotonic() + 20
            while any(w.is_alive() for w in workers) and time.monotonic() < deadline:
                with contextlib.suppress(queue.Empty):
                    events.get(timeout=0.1)
            for worker in workers:
                if worker.is_alive():
                    worker.kill()
                if worker.pid is not None:  # started
                    worker.join(timeout=5)

        group.add_cleanup(stop_workers)
        ramp_s = parse_duration(args.ramp)
        for index in range(p):
            config = WorkerConfig(
                index=index,
                host="127.0.0.1",
                port=ap.quic_port,
                trust_domain=TRUST_DOMAIN,
                ca_pem=ap.ca_pem,
                credentials=creds[index::p],
                log_file=work / "logs" / f"worker-{index}.log",
                ramp_s=ramp_s,
            )
            worker = context.Process(
                target=worker_process, args=(config, events, go, stop), name=f"bench-worker-{index}"
            )
            workers.append(worker)
            worker.start()

        ready: set[int] = set()
        for event in _drain(events, 120):
            if event[0] == "error":
                raise RuntimeError(f"worker {event[1]} failed: {event[2]}")
            if event[0] == "ready":
                ready.add(event[1])
                if len(ready) == p:
                    break
        if len(ready) < p:
            raise RuntimeError(f"only {len(ready)} of {p} workers started within 120 s")

        welcomed: dict[tuple[int, int], float] = {}
        lost: list[tuple[float, str]] = []
        load_before = _loadavg()
        udp_drops_0 = _udp_receive_buffer_drops()
        t_go = time.monotonic()
        go.set()
        deadline = t_go + parse_duration(args.connect_timeout)
        last_print = t_go
        for event in _drain(events, deadline - t_go):
            kind = event[0]
            if kind == "welcome":
                welcomed.setdefault((event[1], event[2]), event[3])
            elif kind == "lost":
                lost.append((event[3], event[4]))
            elif kind == "error":
                raise RuntimeError(f"worker {event[1]} failed: {event[2]}")
            if len(welcomed) == n:
                break
            if time.monotonic() - last_print >= 5:
                last_print = time.monotonic()
                log(f"  {len(welcomed)}/{n} connected after {last_print - t_go:.0f} s")
        connect_all_s = max(welcomed.values()) - t_go if len(welcomed) == n else None
        connected_in_time = len(welcomed)
        log(
            f"{len(welcomed)}/{n} connected"
            + (f" after {connect_all_s:.2f} s" if connect_all_s is not None else " (timed out)")
            + f"; {len(lost)} disconnects on the way"
        )

        def pump(seconds: float) -> None:
            for event in _drain(events, seconds):
                if event[0] == "welcome":
                    welcomed.setdefault((event[1], event[2]), event[3])
                elif event[0] == "lost":
                    lost.append((event[3], event[4]))

        log(f"warm-up {warmup_s:g} s, then a steady window of {duration_s:g} s")
        pump(warmup_s)
        worker_pids = [w.pid for w in workers if w.pid is not None]
        window_start = time.monotonic()
        ap_cpu_0 = _cpu_seconds(ap.pid)
        udp_drops_1 = _udp_receive_buffer_drops()
        workers_cpu_0 = sum(_cpu_seconds(pid) for pid in worker_pids)
        pump(duration_s)
        window_end = time.monotonic()
        ap_cpu_1 = _cpu_seconds(ap.pid)
        workers_cpu_1 = sum(_cpu_seconds(pid) for pid in worker_pids)
        load_end = _loadavg()
        udp_drops_2 = _udp_receive_buffer_drops()
        ap_socket_drops = _udp_socket_drops(ap.quic_port)
        window_s = window_end - window_start

        user_token = ap.signer.issue_user("bench", scopes=["read-logs"], ttl="10m")
        status, body = ap.request("GET", "/followers", token=user_token)
        if status != 200:
            raise RuntimeError(f"GET /api/v1/followers answered HTTP {status}: {body[:300]!r}")
        listed = msgspec.json.decode(body, type=_FollowerList).followers
        healthy = sum(1 for f in listed if f.health == "healthy")
        peak_rss_kb = _status_kb(ap.pid, "VmHWM")
        rss_kb = _status_kb(ap.pid, "VmRSS")

        stop.set()
        results: dict[int, WorkerResult] = {}
        for event in _drain(events, 60):
            if event[0] == "result":
                results[event[1]] = event[2]
            elif event[0] == "lost":
                lost.append((event[3], event[4]))
            if len(results) == p:
                break
        stop_workers()
        if len(results) < p:
            log(f"WARNING: only {len(results)} of {p} workers reported back")
        # Goodbye to the access point comes from group.close (SIGTERM; cProfile then writes).

    in_window = sorted(
        rtt
        for r in results.values()
        for (t, rtt) in r.rtt_samples
        if window_start <= t <= window_end
    )
    ramp = sorted(rtt for r in results.values() for (t, rtt) in r.rtt_samples if t < window_start)
    if args.samples:
        _write_samples(Path(args.samples), results, window_start)
    lags = sorted(
        lag for r in results.values() for (t, lag) in r.loop_lag if window_start <= t <= window_end
    )
    disconnects_in_window = sum(1 for t, _ in lost if window_start <= t <= window_end)
    expected = round(n * window_s / heartbeat_s)
    p99 = _percentile(in_window, 99)
    verdict: list[str] = []
    if len(welcomed) < n:
        verdict.append(f"only {len(welcomed)}/{n} followers ever connected")
    if healthy < n:
        verdict.append(f"the access point lists {healthy}/{n} followers as healthy")
    if not in_window or p99 >= TARGET_P99_MS:
        verdict.append(f"heartbeat p99 {p99:.0f} ms is not under {TARGET_P99_MS:.0f} ms")
    if disconnects_in_window:
        verdict.append(f"{disconnects_in_window} disconnects in the steady window")
    report = Report(
        followers=n,
        processes=p,
        heartbeat_s=heartbeat_s,
        duration_s=duration_s,
        prepare_s=prepare_s,
        enroll_s=enroll_s,
        connect_all_s=connect_all_s,
        connected=connected_in_time,
        warmup_s=warmup_s,
        window_s=window_s,
        rtt_samples=len(in_window),
        rtt_expected=expected,
        rtt_p50_ms=_percentile(in_window, 50),
        rtt_p99_ms=p99,
        rtt_max_ms=float(in_window[-1]) if in_window else float("nan"),
        rtt_ramp_p99_ms=_percentile(ramp, 99),
        rtt_ramp_max_ms=float(ramp[-1]) if ramp else float("nan"),
        ap_cpu_percent=100 * (ap_cpu_1 - ap_cpu_0) / window_s,
        ap_peak_rss_mb=peak_rss_kb / 1024,
        ap_rss_mb=rss_kb / 1024,
        workers_cpu_percent=100 * (workers_cpu_1 - workers_cpu_0) / window_s,
        worker_lag_p99_ms=_percentile(lags, 99),
        worker_lag_max_ms=lags[-1] if lags else float("nan"),
        disconnects_total=len(lost),
        disconnects_in_window=disconnects_in_window,
        listed=len(listed),
        healthy=healthy,
        loadavg_before=load_before,
        loadavg_window_end=load_end,
        udp_drops_total=udp_drops_2 - udp_drops_0,
        ap_socket_drops=ap_socket_drops,
        udp_drops_in_window=udp_drops_2 - udp_drops_1,
        profile=str(profile) if profile else None,
        passed=not verdict,
        verdict=verdict,
    )
    if lost:
        reasons: dict[str, int] = {}
        for _, reason in lost:
            reasons[reason] = reasons.get(reason, 0) + 1
        for reason, count in sorted(reasons.items(), key=lambda kv: -kv[1])[:5]:
            log(f"  disconnect x{count}: {reason}")
    return report


def _write_samples(path: Path, results: dict[int, WorkerResult], window_start: float) -> None:
    """Every RTT sample and loop-lag reading as CSV, time relative to the steady window."""
    rows = [
        (t - window_start, "rtt", index, float(rtt))
        for index, r in results.items()
        for t, rtt in r.rtt_samples
    ]
    rows += [
        (t - window_start, "lag", index, lag)
        for index, r in results.items()
        for t, lag in r.loop_lag
    ]
    rows.sort()
    with path.open("w") as out:
        out.write("seconds,kind,worker,ms\n")
        out.writelines(f"{t:.4f},{kind},{index},{ms:.2f}\n" for t, kind, index, ms in rows)


def _progress(line: str) -> None:
    """Progress goes to stderr: stdout holds the report (or the JSON document)."""
    print(line, file=sys.stderr, flush=True)


def print_report(report: Report) -> None:
    def ms(value: float) -> str:
        return "n/a" if value != value else f"{value:.0f} ms"

    connect = "timed out" if report.connect_all_s is None else f"{report.connect_all_s:.2f} s"
    lines = [
        f"control plane: {report.followers} followers in {report.processes} processes, "
        f"heartbeat {report.heartbeat_s:g} s, steady window {report.window_s:.1f} s",
        f"  enroll all (HTTPS, real API)   {report.enroll_s:.2f} s "
        f"({report.followers / report.enroll_s:.0f}/s)",
        f"  all connected (Welcome)        {connect} ({report.connected}/{report.followers})",
        f"  heartbeat RTT p50/p99/max      {ms(report.rtt_p50_ms)} / {ms(report.rtt_p99_ms)} / "
        f"{ms(report.rtt_max_ms)}  ({report.rtt_samples} samples, ~{report.rtt_expected} expected)",
        f"  RTT before the window p99/max  {ms(report.rtt_ramp_p99_ms)} / {ms(report.rtt_ramp_max_ms)}"
        "  (connect storm + warm-up)",
        f"  access point CPU               {report.ap_cpu_percent:.1f} % of one core",
        f"  access point RSS peak / now    {report.ap_peak_rss_mb:.0f} MB / {report.ap_rss_mb:.0f} MB",
        f"  load generator CPU             {report.workers_cpu_percent:.1f} % "
        f"(loop lag p99 {ms(report.worker_lag_p99_ms)}, max {ms(report.worker_lag_max_ms)})",
        f"  listed healthy by the AP       {report.healthy}/{report.listed}",
        f"  disconnects total / in window  {report.disconnects_total} / {report.disconnects_in_window}",
        f"  UDP rcvbuf drops total / window {report.udp_drops_total} / "
        f"{report.udp_drops_in_window} (machine-wide); at the AP's socket {report.ap_socket_drops}",
        f"  load average before / at end   {_fmt_load(report.loadavg_before)} / "
        f"{_fmt_load(report.loadavg_window_end)} ({os.cpu_count()} cores)",
    ]
    target = f"all followers healthy, heartbeat p99 < {TARGET_P99_MS:.0f} ms"
    if report.followers < TARGET_FOLLOWERS:
        target += f"; NOTE {report.followers} followers is below the spec's {TARGET_FOLLOWERS}"
    if report.passed:
        lines.append(f"PASS ({target})")
    else:
        lines.append(f"FAIL ({target}): " + "; ".join(report.verdict))
    print("\n".join(lines), flush=True)


def _fmt_load(load: tuple[float, float, float]) -> str:
    return " ".join(f"{x:.2f}" for x in load)


def print_profile(path: Path, limit: int) -> None:
    if not path.exists():
        print(f"(no profile written at {path})", file=sys.stderr)
        return
    stats = pstats.Stats(str(path), stream=sys.stderr)
    stats.strip_dirs()
    print(f"\n--- access point profile {path}: top {limit} by own time ---", file=sys.stderr)
    stats.sort_stats("tottime").print_stats(limit)
    print(f"--- top {limit} by cumulative time ---", file=sys.stderr)
    stats.sort_stats("cumulative").print_stats(limit)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Hold N followers on one real access point and measure the control plane."
    )
    parser.add_argument("--followers", type=int, default=TARGET_FOLLOWERS)
    parser.add_argument("--processes", type=int, default=4, help="load-generator processes")
    parser.add_argument("--heartbeat", default="5s", help="heartbeat interval the AP announces")
    parser.add_argument("--duration", default="30s", help="steady measurement window")
    parser.add_argument(
        "--warmup",
        default=None,
        help="settle time after all connected (default: 2 heartbeats, >= 5 s)",
    )
    parser.add_argument("--ramp", default="0s", help="spread each worker's dials over this long")
    parser.add_argument(
        "--connect-timeout", default="180s", help="give up waiting for all Welcomes"
    )
    parser.add_argument("--enroll-concurrency", type=int, default=16)
    parser.add_argument(
        "--profile", default=None, metavar="FILE",
        help="run the access point under cProfile, write FILE, print its hot spots",
    )  # fmt: skip
    parser.add_argument("--profile-lines", type=int, default=30)
    parser.add_argument("--json", action="store_true", help="print the report as one JSON document")
    parser.add_argument("--keep", action="store_true", help="keep the work dir (logs, state)")
    parser.add_argument(
        "--samples", default=None, metavar="CSV", help="write every RTT and loop-lag sample here"
    )
    args = parser.parse_args(argv)
    if args.followers < 1 or args.processes < 1 or args.enroll_concurrency < 1:
        parser.error("--followers, --processes and --enroll-concurrency must be at least 1")
    for option in ("heartbeat", "duration", "ramp", "connect_timeout"):
        try:
            parse_duration(getattr(args, option))
        except ValueError as exc:
            parser.error(f"--{option.replace('_', '-')}: {exc}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logger.remove()  # ah_connectivity logs through loguru; this process only reports

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_sigterm)
    work = Path(tempfile.mkdtemp(prefix="ah-bench-control-plane-"))
    try:
        report = run(args, work)
    except KeyboardInterrupt:
        print("interrupted; every process was stopped", file=sys.stderr)
        return 130
    finally:
        if args.keep:
            print(f"kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps(asdict(report), indent=2))
    else:
        print_report(report)
    if report.profile:
        print_profile(Path(report.profile), args.profile_lines)
    return 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
