"""Session events through the leader's real parts: `SessionEventSink` pushing over QUIC to a
real access point, and ``ah-fleetctl session info|events [--follow]`` reading them back over
HTTPS/SSE, including across an access-point restart."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from ah_connectivity import FleetCA
from ah_domain_types import (
    Event,
    FenceHostResult,
    FenceHostState,
    FenceResultEvent,
    FenceStartedEvent,
    HostExitedEvent,
    HostResult,
    HostStartedEvent,
    HostState,
    NoteEvent,
    OsKind,
    PathFixedEvent,
    PathRecord,
    RunSummary,
    SummaryEvent,
    TransportMethod,
)
from ah_fleetctl.events import AgentEventPush, SessionEventSink

if TYPE_CHECKING:
    from conftest import Cli, RealFleet

CLI = [sys.executable, "-m", "ah_fleetctl"]


def realistic_events(sink: SessionEventSink, hosts: list[str]) -> list[Event]:
    """What a fenced run on three hosts publishes, in order."""
    paths = {
        hosts[0]: PathRecord(
            method=TransportMethod.DIRECT, target="127.0.0.1:2201", relay=None, rtt_estimate_ms=0.4
        ),
        hosts[1]: PathRecord(
            method=TransportMethod.CONNECT, target=f"{hosts[1]}:22", relay=None, rtt_estimate_ms=2.5
        ),
        hosts[2]: PathRecord(
            method=TransportMethod.RELAY,
            target=f"{hosts[2]}:22",
            relay="ap-2",
            rtt_estimate_ms=20.0,
        ),
    }
    events: list[Event] = [sink.make(PathFixedEvent, host=h, path=paths[h]) for h in hosts]
    events.append(sink.make(FenceStartedEvent, snapshot_id="snap-9", hosts=hosts))
    events.append(
        sink.make(
            FenceResultEvent,
            snapshot_id="snap-9",
            hosts={h: FenceHostResult(state=FenceHostState.CONSISTENT, took_ms=80) for h in hosts},
        )
    )
    results = []
    for host in hosts:
        events.append(sink.make(HostStartedEvent, host=host, command="make check"))
        result = HostResult(
            host=host, os=OsKind.LINUX, state=HostState.OK, exit_code=0, took_ms=300,
            log_path=None, command="make check",
        )  # fmt: skip
        results.append(result)
        events.append(sink.make(HostExitedEvent, host=host, result=result))
    events.append(sink.make(SummaryEvent, summary=RunSummary.from_results(results)))
    return events


def make_sink(
    api_url: str, token: str, ca_path: Path, local_dir: Path, warnings: list[str], **kw: Any
) -> SessionEventSink:
    return SessionEventSink(
        api_url=api_url,
        token=token,
        verify=ssl.create_default_context(cafile=str(ca_path)),
        ca_pem=ca_path.read_text(),
        local_copy_dir=local_dir,
        warn=warnings.append,
        **kw,
    )


def test_a_run_pushed_by_the_sink_reads_back_through_the_cli(
    real_fleet: RealFleet, tmp_path: Path
) -> None:
    fleet, cli = real_fleet.fleet, real_fleet.cli
    warnings: list[str] = []
    sink = make_sink(fleet.api_url, fleet.user_token, fleet.ca_path, tmp_path, warnings)
    session_id = sink.start()
    hosts = ["alpha", "bravo", "charlie"]
    pushed = realistic_events(sink, hosts)
    for event in pushed:
        sink.emit(event)
    report = sink.close(timeout=20)
    assert report.complete and report.delivered == len(pushed) == 12, (report, warnings)
    assert report.last_seq == len(pushed)
    assert warnings == []
    local = [json.loads(line) for line in report.local_copy.read_text().splitlines()]  # type: ignore[union-attr]
    assert [e["type"] for e in local] == [type(e).__struct_config__.tag for e in pushed]

    lines = cli("--json", "session", "events", session_id)
    assert lines.returncode == 0, lines
    got = [json.loads(line) for line in lines.stdout.splitlines()]
    assert [e["type"] for e in got] == [e["type"] for e in local]
    assert [e["seq"] for e in got] == list(range(1, 13))
    stamps = [e["tsMs"] for e in got]
    assert stamps == sorted(stamps)
    assert all(e["sessionId"] == session_id for e in got)
    only = cli("session", "events", session_id, "--type", "hostExited", "--after", "7")
    assert only.returncode == 0, only
    assert [line.split()[0] for line in only.stdout.splitlines()] == ["#9", "#11"]
    assert "bravo: ok (exit 0)" in only.stdout

    info = cli("--json", "session", "info", session_id)
    assert info.returncode == 0, info
    document = info.json()
    assert document["leader"] == "harness" and document["lastSeq"] == 12
    followers = {f["info"]["name"]: f for f in document["followers"]}
    assert sorted(followers) == hosts
    assert followers["alpha"]["path"]["method"] == "direct"
    assert followers["charlie"]["path"] == {
        "method": "relay", "target": "charlie:22", "relay": "ap-2", "rttEstimateMs": 20.0,
    }  # fmt: skip
    assert all(f["health"] == "healthy" for f in followers.values())
    assert followers["charlie"]["info"]["os"] == "macos"
    table = cli("session", "info", session_id)
    assert table.returncode == 0, table
    assert "relay charlie:22 via ap-2" in table.stdout and "harness" in table.stdout

    unknown = cli("session", "info", "s-does-not-exist")
    assert unknown.returncode == 7, unknown
    assert "s-does-not-exist" in unknown.stderr


def test_the_sink_never_holds_up_the_run_when_the_access_point_is_unreachable(
    tmp_path: Path,
) -> None:
    # A port nothing listens on (bound, never listening): connections are refused.
    with socket.socket() as placeholder:
        placeholder.bind(("127.0.0.1", 0))
        port = placeholder.getsockname()[1]
        ca = tmp_path / "ca.pem"
        ca.write_bytes(FleetCA.generate("nowhere.fleet").cert_pem)
        warnings: list[str] = []
        sink = make_sink(f"https://127.0.0.1:{port}", "t", ca, tmp_path, warnings)
        started = time.monotonic()
        session_id = sink.start()
        for i in range(2000):
            sink.emit(sink.make(NoteEvent, message=f"n{i}"))
        emitted_in = time.monotonic() - started
        report = sink.close(timeout=1.0)
        closed_in = time.monotonic() - started
    assert emitted_in < 2.0, f"start + 2000 emits took {emitted_in:.2f} s"
    assert closed_in < 8.0, f"close took {closed_in:.2f} s"
    assert report.delivered == 0 and not report.complete
    assert report.session_id == session_id
    unreachable = [w for w in warnings if w.startswith("cannot reach the access point")]
    assert len(unreachable) == 1, warnings  # said once, not per event
    assert any("2000 of 2000 events" in w and str(report.local_copy) in w for w in warnings)
    assert report.local_copy is not None
    assert len(report.local_copy.read_text().splitlines()) == 2000


def test_a_refused_token_is_reported_once_and_the_run_goes_on(
    real_fleet: RealFleet, tmp_path: Path
) -> None:
    fleet = real_fleet.fleet
    reader = fleet.signer.issue_user("reader", scopes=["read-logs"])
    warnings: list[str] = []
    sink = make_sink(fleet.api_url, reader, fleet.ca_path, tmp_path, warnings)
    sink.start("s-refused-1")
    for i in range(50):
        sink.emit(sink.make(NoteEvent, message=f"n{i}"))
    report = sink.close(timeout=5)
    assert report.delivered == 0 and "403" in (report.error or "")
    assert sum("refused the session events" in w for w in warnings) == 1, warnings
    assert report.local_copy is not None
    assert len(report.local_copy.read_text().splitlines()) == 50


# --------------------------------------------------------------------------- restart


@dataclass
class PrivateAp:
    """An access point of our own (no followers) that the test may restart."""

    state_dir: Path
    group: Any
    env: dict[str, str]
    ready: dict[str, Any]
    process: Any = None

    @property
    def api_url(self) -> str:
        return f"https://127.0.0.1:{self.ready['apiPort']}"

    @property
    def ca_path(self) -> Path:
        return self.state_dir / "fleet-ca.pem"

    def serve(self, same_ports: bool = False) -> None:
        from ah_harness_local import wait_for

        ready_file = self.state_dir.parent / "ready.json"
        ready_file.unlink(missing_ok=True)
        ports = []
        if same_ports:
            ports = [
                "--quic-port",
                str(self.ready["quicPort"]),
                "--api-port",
                str(self.ready["apiPort"]),
            ]
        self.process = self.group.start(
            [
                sys.executable, "-m", "ah_access_pointd", "serve",
                "--state-dir", str(self.state_dir), "--ready-file", str(ready_file),
                "--sse-keepalive", "300ms", *ports,
            ],
            name="ap",
            env=self.env,
        )  # fmt: skip

        def ready() -> dict[str, Any] | None:
            assert self.process.is_running, self.process.log_text()
            try:
                data: dict[str, Any] = json.loads(ready_file.read_text())
            except (OSError, ValueError):
                return None
            return data if data.get("pid") == self.process.pid else None

        self.ready = wait_for(ready, 60, what="access point ready file")


@pytest.fixture
def private_ap(tmp_path: Path) -> Iterator[PrivateAp]:
    from ah_harness_local import ProcessGroup

    env = {k: v for k, v in os.environ.items() if not k.startswith("AH_")}
    state_dir = tmp_path / "ap" / "state"
    init = subprocess.run(
        [sys.executable, "-m", "ah_access_pointd", "init", "--state-dir", str(state_dir)],
        env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert init.returncode == 0, init.stderr
    with ProcessGroup(tmp_path / "logs") as group:
        ap = PrivateAp(state_dir, group, env, {})
        ap.serve()
        yield ap


def test_follow_reconnects_across_an_access_point_restart_without_loss(
    private_ap: PrivateAp, cli: Cli, tmp_path: Path
) -> None:
    from ah_access_pointd.state import load_state

    ap = private_ap
    token = load_state(ap.state_dir).signer.issue_user("lead", scopes=["exec", "read-logs"])
    env = {
        **cli.env,
        "AH_REMOTE_SERVER": ap.api_url,
        "AH_TOKEN": token,
        "AH_CA_FILE": str(ap.ca_path),
    }
    warnings: list[str] = []
    sink = make_sink(ap.api_url, token, ap.ca_path, tmp_path / "copies", warnings)
    session_id = sink.start()
    for i in range(100):
        sink.emit(sink.make(NoteEvent, message=f"before {i}"))

    follower = subprocess.Popen(
        [*CLI, "--json", "session", "events", session_id, "--follow"],
        env=env, cwd=cli.cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    lines: list[str] = []
    stderr: list[str] = []
    readers = [
        threading.Thread(
            target=lambda: lines.extend(iter(follower.stdout.readline, "")), daemon=True
        ),  # type: ignore[union-attr]
        threading.Thread(
            target=lambda: stderr.extend(iter(follower.stderr.readline, "")), daemon=True
        ),  # type: ignore[union-attr]
    ]
    for reader in readers:
        reader.start()
    try:

        def wait_lines(count: int, what: str) -> None:
            deadline = time.monotonic() + 60
            while len(lines) < count:
                assert follower.poll() is None, "".join(stderr)
                assert time.monotonic() < deadline, f"{what}: {len(lines)} lines; {''.join(stderr)}"
                time.sleep(0.02)

        wait_lines(100, "first batch")
        # Restart the access point on the same ports, while the CLI follows the session.
        assert ap.process.terminate(10) == 0
        for i in range(100):
            sink.emit(sink.make(NoteEvent, message=f"during {i}"))  # queued, never blocking
        ap.serve(same_ports=True)
        for i in range(100):
            sink.emit(sink.make(NoteEvent, message=f"after {i}"))
        wait_lines(300, "after the restart")
        report = sink.close(timeout=20)
    finally:
        os.killpg(follower.pid, 2)
        follower.wait(10)
    assert report.complete, (report, warnings)
    assert follower.returncode == 130  # Ctrl-C: the CLI's "interrupted" exit
    documents = [json.loads(line) for line in lines]
    assert documents[-1]["error"]["kind"] == "interrupted"
    events = documents[:-1]
    assert [e["seq"] for e in events] == list(range(1, 301))
    assert [e["message"] for e in events] == [
        *(f"before {i}" for i in range(100)),
        *(f"during {i}" for i in range(100)),
        *(f"after {i}" for i in range(100)),
    ]
    said = "".join(stderr)
    assert f"event stream of session {session_id} interrupted" in said
    assert "reconnecting after seq 100" in said


# --------------------------------------------------------------------------- the agent's sinks


def agent_push(api_url: str, token: str, ca_path: Path, **kw: Any) -> AgentEventPush:
    return AgentEventPush(
        api_url=api_url,
        token=token,
        verify=ssl.create_default_context(cafile=str(ca_path)),
        ca_pem=ca_path.read_text(),
        **kw,
    )


def read_back(cli: Cli, session_id: str, env: dict[str, str] | None = None) -> list[dict[str, Any]]:
    listed = cli("--json", "session", "events", session_id, env=env)
    assert listed.returncode == 0, listed
    return [json.loads(line) for line in listed.stdout.splitlines()]


def test_the_agent_s_runs_share_one_connection_and_push_after_they_answered(
    real_fleet: RealFleet, tmp_path: Path
) -> None:
    from ah_harness_local import wait_for_async

    fleet, cli = real_fleet.fleet, real_fleet.cli
    hosts = ["alpha", "bravo", "charlie"]
    warnings: list[str] = []
    sessions: list[tuple[str, list[Event]]] = []

    async def body() -> None:
        # Held until the run closes (the release delay is an hour).
        push = agent_push(fleet.api_url, fleet.user_token, fleet.ca_path, release_delay_s=3600.0)
        for _ in range(3):
            sink = push.sink(tmp_path, warnings.append)
            session_id = sink.start()
            pushed = realistic_events(sink, hosts)
            for event in pushed:
                sink.emit(event)
            assert push.connection is None or push.connection.sessions == []
            report = await sink.close(20.0)
            assert report.complete and report.delivered == len(pushed), (report, warnings)
            sessions.append((session_id, pushed))
        # Two runs at once, their events interleaved.
        pair = [push.sink(tmp_path, warnings.append) for _ in range(2)]
        pair_events = [(sink.start(), realistic_events(sink, hosts)) for sink in pair]
        for events in zip(*(e for _, e in pair_events), strict=True):
            for sink, event in zip(pair, events, strict=True):
                sink.emit(event)
        reports = await asyncio.gather(*(sink.close(20.0) for sink in pair))
        assert all(r.complete for r in reports), (reports, warnings)
        sessions.extend(pair_events)
        # A long run: its events go out after the release delay, before it closes.
        push.release_delay_s = 0.05
        sink = push.sink(tmp_path, warnings.append)
        session_id = sink.start()
        pushed = realistic_events(sink, hosts)
        for event in pushed:
            sink.emit(event)
        await wait_for_async(
            lambda: sink.delivered == len(pushed), 20.0, what="the long run's events"
        )
        assert (await sink.close(20.0)).complete
        sessions.append((session_id, pushed))
        assert push.connections == 1, push.connection.status.history if push.connection else None
        assert push.connection is not None and push.connection.status.streams == 6
        await push.close()

    asyncio.run(body())
    assert warnings == []
    for session_id, pushed in sessions:
        got = read_back(cli, session_id)
        assert [e["seq"] for e in got] == list(range(1, len(pushed) + 1))
        assert [e["type"] for e in got] == [type(e).__struct_config__.tag for e in pushed]
        local = (tmp_path / f"{session_id}.events.jsonl").read_text().splitlines()
        assert [json.loads(line)["type"] for line in local] == [e["type"] for e in got]


def test_an_agent_sink_without_access_point_warns_once_and_keeps_the_local_copy(
    tmp_path: Path,
) -> None:
    with socket.socket() as placeholder:  # bound, never listening: connections are refused
        placeholder.bind(("127.0.0.1", 0))
        port = placeholder.getsockname()[1]
        ca = tmp_path / "ca.pem"
        ca.write_bytes(FleetCA.generate("nowhere.fleet").cert_pem)
        warnings: list[str] = []

        async def body() -> Any:
            push = agent_push(f"https://127.0.0.1:{port}", "t", ca, release_delay_s=0.0)
            sink = push.sink(tmp_path, warnings.append)
            sink.start()
            for i in range(500):
                sink.emit(sink.make(NoteEvent, message=f"n{i}"))
            report = await sink.close(1.0)
            await push.close()
            return report

        report = asyncio.run(body())
    assert report.delivered == 0 and not report.complete
    unreachable = [w for w in warnings if w.startswith("cannot reach the access point")]
    assert len(unreachable) == 1, warnings
    assert any("500 of 500 events" in w for w in warnings), warnings
    assert report.local_copy is not None
    assert len(report.local_copy.read_text().splitlines()) == 500


def test_an_agent_sink_with_a_refused_token_warns_once_and_the_others_go_on(
    real_fleet: RealFleet, tmp_path: Path
) -> None:
    fleet = real_fleet.fleet
    reader = fleet.signer.issue_user("reader", scopes=["read-logs"])
    warnings: list[str] = []

    async def body() -> None:
        push = agent_push(fleet.api_url, reader, fleet.ca_path, release_delay_s=0.0)
        sink = push.sink(tmp_path, warnings.append)
        sink.start("s-agent-refused-1")
        for i in range(20):
            sink.emit(sink.make(NoteEvent, message=f"n{i}"))
        report = await sink.close(5.0)
        assert report.delivered == 0 and "403" in (report.error or ""), report
        await push.close()

    asyncio.run(body())
    assert sum("refused the session events" in w for w in warnings) == 1, warnings


def test_the_agent_s_connection_is_made_again_after_the_access_point_restarted(
    private_ap: PrivateAp, cli: Cli, tmp_path: Path
) -> None:
    from ah_access_pointd.state import load_state

    ap = private_ap
    token = load_state(ap.state_dir).signer.issue_user("lead", scopes=["exec", "read-logs"])
    warnings: list[str] = []
    done: list[str] = []

    async def run_once(push: AgentEventPush, word: str) -> None:
        sink = push.sink(tmp_path, warnings.append)
        done.append(sink.start())
        for i in range(30):
            sink.emit(sink.make(NoteEvent, message=f"{word} {i}"))
        report = await sink.close(20.0)
        assert report.complete, (report, warnings)

    async def body() -> None:
        push = agent_push(ap.api_url, token, ap.ca_path, release_delay_s=3600.0)
        await run_once(push, "before")
        # Restarted between two runs, on the same ports.
        assert await asyncio.to_thread(ap.process.terminate, 10) == 0
        await asyncio.to_thread(ap.serve, True)
        await run_once(push, "after")
        await run_once(push, "later")
        assert push.connections == 2, push.connection.status.history if push.connection else None
        await push.close()

    asyncio.run(body())
    env = {"AH_REMOTE_SERVER": ap.api_url, "AH_TOKEN": token, "AH_CA_FILE": str(ap.ca_path)}
    for session_id, word in zip(done, ["before", "after", "later"], strict=True):
        got = read_back(cli, session_id, env)
        assert [e["message"] for e in got] == [f"{word} {i}" for i in range(30)]
        assert [e["seq"] for e in got] == list(range(1, 31))
