"""The run engine over a real executor: every "host" is a real local process
(``/bin/sh -c <rendered>``, as sshd would run it) with its own ``AH_HOST``. Faults are
injected by wrapping that executor (a connection dying mid-command kills the real process
and raises ``HostConnectionLost``), never by faking command results."""

from __future__ import annotations

import asyncio
import contextlib
import io
import itertools
import os
import subprocess
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Coroutine, Mapping
from pathlib import Path
from typing import Any, TypeVar

import pytest

from ah_domain_types import (
    DomainValidationError,
    EmptySelectionError,
    Event,
    ExitCode,
    HostExitedEvent,
    HostLogEvent,
    HostStartedEvent,
    HostState,
    OsKind,
    RunEnvelope,
    SummaryEvent,
)
from ah_run_everywhere import (
    AdapterError,
    ExecOutcome,
    ExecOutcomeLike,
    HostConnectionLost,
    HostUnreachable,
    LinePrinter,
    LocalProcessExecutor,
    OutputCallback,
    RunDirectory,
    RunEngine,
    TargetHost,
)

T = TypeVar("T")
DEADLINE = 20.0


def run_async(coro: Coroutine[Any, Any, T], deadline: float = DEADLINE) -> T:
    """Run a scenario; a hang fails the test at ``deadline`` instead of blocking."""

    async def bounded() -> T:
        async with asyncio.timeout(deadline):
            return await coro

    return asyncio.run(bounded())


def linux(*names: str) -> list[TargetHost]:
    return [TargetHost(name=n, os=OsKind.LINUX) for n in names]


@pytest.fixture
def executor(tmp_path: Path) -> LocalProcessExecutor:
    home = tmp_path / "home"
    home.mkdir()
    return LocalProcessExecutor(
        base_env={"PATH": os.environ["PATH"], "HOME": str(home), "LC_ALL": "C.UTF-8"},
        host_env=lambda host: {"AH_HOST": host},
    )


def live_group_members(pgid: int) -> list[int]:
    """Non-zombie processes in process group ``pgid`` (from /proc)."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rpartition(")")[2].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(entry.name))
    return members


def assert_group_ends(pgid: int, deadline: float = 5.0) -> None:
    """Every process of the group is gone (a SIGKILLed child may take a moment to die)."""
    limit = time.monotonic() + deadline
    while live_group_members(pgid):
        assert time.monotonic() < limit, f"process group {pgid} still alive"
        time.sleep(0.02)


class Recording:
    """Records when each command ran on each host (monotonic start/end)."""

    def __init__(self, inner: LocalProcessExecutor) -> None:
        self.inner = inner
        self.intervals: list[tuple[str, float, float]] = []

    async def run(
        self,
        host: str,
        command: str,
        *,
        on_stdout: OutputCallback,
        on_stderr: OutputCallback,
        timeout: float | None,
    ) -> ExecOutcomeLike:
        start = time.monotonic()
        try:
            return await self.inner.run(
                host, command, on_stdout=on_stdout, on_stderr=on_stderr, timeout=timeout
            )
        finally:
            self.intervals.append((host, start, time.monotonic()))


class LosesConnection:
    """For ``victim``: once the command printed ``marker``, the "connection" dies — the
    real process is killed (as sshd does when the channel goes) and the executor raises
    ``HostConnectionLost``, like the SSH bridge does."""

    def __init__(self, inner: LocalProcessExecutor, victim: str, marker: bytes) -> None:
        self.inner = inner
        self.victim = victim
        self.marker = marker

    async def run(
        self,
        host: str,
        command: str,
        *,
        on_stdout: OutputCallback,
        on_stderr: OutputCallback,
        timeout: float | None,
    ) -> ExecOutcomeLike:
        if host != self.victim:
            return await self.inner.run(
                host, command, on_stdout=on_stdout, on_stderr=on_stderr, timeout=timeout
            )
        seen = asyncio.Event()

        def watch(chunk: bytes | str) -> None:
            on_stdout(chunk)
            if self.marker in (chunk if isinstance(chunk, bytes) else chunk.encode()):
                seen.set()

        job = asyncio.ensure_future(
            self.inner.run(host, command, on_stdout=watch, on_stderr=on_stderr, timeout=timeout)
        )
        waiter = asyncio.ensure_future(seen.wait())
        done, _ = await asyncio.wait({job, waiter}, return_when=asyncio.FIRST_COMPLETED)
        if job in done:
            waiter.cancel()
            return job.result()
        job.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await job
        raise HostConnectionLost(host, "SSH channel closed by peer")


class UnreachableHost:
    """``victim`` cannot be reached at all; the others run for real."""

    def __init__(self, inner: LocalProcessExecutor, victim: str) -> None:
        self.inner = inner
        self.victim = victim

    async def run(
        self,
        host: str,
        command: str,
        *,
        on_stdout: OutputCallback,
        on_stderr: OutputCallback,
        timeout: float | None,
    ) -> ExecOutcomeLike:
        if host == self.victim:
            raise HostUnreachable(host, "no path: direct refused, connect 502")
        return await self.inner.run(
            host, command, on_stdout=on_stdout, on_stderr=on_stderr, timeout=timeout
        )


class IgnoresTimeout:
    """An executor that does not honour ``timeout`` (the engine must still stop it)."""

    def __init__(self, inner: LocalProcessExecutor) -> None:
        self.inner = inner

    async def run(
        self,
        host: str,
        command: str,
        *,
        on_stdout: OutputCallback,
        on_stderr: OutputCallback,
        timeout: float | None,
    ) -> ExecOutcomeLike:
        return await self.inner.run(
            host, command, on_stdout=on_stdout, on_stderr=on_stderr, timeout=None
        )


def lines_by_host(printed: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = defaultdict(list)
    for line in printed.splitlines():
        host, sep, text = line.partition(" | ")
        assert sep, line
        out[host.rstrip()].append(text)
    return out


# ---- results and aggregation -------------------------------------------------------------


def test_one_failing_host_fails_the_run_and_keeps_every_result(
    executor: LocalProcessExecutor, tmp_path: Path
) -> None:
    hosts = linux("alpha", "bravo", "charlie")
    stream = io.StringIO()
    events: list[Event] = []
    run_dir = RunDirectory(tmp_path / "state")
    engine = RunEngine(
        executor,
        hosts,
        ['echo "hello from $AH_HOST"; echo "warn $AH_HOST" >&2; [ "$AH_HOST" != bravo ]'],
        printer=LinePrinter(stream, [h.name for h in hosts]),
        run_dir=run_dir,
        sink=events.append,
        session_id="s-1",
    )
    envelope = run_async(engine.run())

    assert envelope.exit_code is ExitCode.HOSTS_FAILED
    states = {r.host: (r.state, r.exit_code) for r in envelope.hosts}
    assert states == {
        "alpha": (HostState.OK, 0),
        "bravo": (HostState.FAILED, 1),
        "charlie": (HostState.OK, 0),
    }
    assert envelope.summary.line() == "2 succeeded, 1 failed, 0 unreachable"
    assert envelope.run_dir == str(run_dir.path) and envelope.session_id == "s-1"
    printed = lines_by_host(stream.getvalue())
    for host in ("alpha", "bravo", "charlie"):
        assert sorted(printed[host]) == sorted([f"hello from {host}", f"warn {host}"])
        log = Path(run_dir.path / f"{host}.log").read_text()
        assert f"out | hello from {host}\n" in log and f"err | warn {host}\n" in log
        assert {r.log_path for r in envelope.hosts if r.host == host} == {
            str(run_dir.path / f"{host}.log")
        }
    # Events: started/exited per host, summary last, timestamps never going backwards.
    assert [type(e) for e in events].count(HostStartedEvent) == 3
    exited = [e for e in events if isinstance(e, HostExitedEvent)]
    assert sorted(e.host for e in exited) == ["alpha", "bravo", "charlie"]
    assert isinstance(events[-1], SummaryEvent) and events[-1].summary == envelope.summary
    assert all(e.session_id == "s-1" for e in events)
    stamps = [e.ts_ms for e in events]
    assert stamps == sorted(stamps)


def test_every_host_ok_is_exit_zero(executor: LocalProcessExecutor) -> None:
    envelope = run_async(RunEngine(executor, linux("a", "b"), [["true"]]).run())
    assert envelope.exit_code is ExitCode.OK
    assert [r.state for r in envelope.hosts] == [HostState.OK, HostState.OK]
    assert envelope.commands == ["true"]


def test_a_command_that_cannot_be_rendered_stops_everything_before_any_start(
    executor: LocalProcessExecutor,
) -> None:
    hosts = [*linux("a"), TargetHost(name="w", os=OsKind.WINDOWS, cwd="not\\absolute")]
    with pytest.raises(AdapterError, match="must be absolute"):
        RunEngine(executor, hosts, [["touch", "x"]])
    assert executor.pids == {}


def test_empty_selection_and_bad_host_names_are_validation_errors(
    executor: LocalProcessExecutor,
) -> None:
    with pytest.raises(EmptySelectionError) as info:
        RunEngine(executor, [], [["true"]])
    assert info.value.exit_code is ExitCode.VALIDATION
    with pytest.raises(DomainValidationError, match=r"invalid host name '\.\./x'"):
        TargetHost(name="../x", os=OsKind.LINUX)


def test_working_directory_is_mapped_into_each_hosts_workspace(
    executor: LocalProcessExecutor, tmp_path: Path
) -> None:
    leader, follower = tmp_path / "leader", tmp_path / "follower"
    (leader / "sub").mkdir(parents=True)
    (follower / "sub").mkdir(parents=True)
    host = TargetHost.in_workspace(
        "a",
        OsKind.LINUX,
        leader_root=str(leader),
        follower_root=str(follower),
        leader_cwd=str(leader / "sub"),
    )
    stream = io.StringIO()
    envelope = run_async(
        RunEngine(executor, [host], [["pwd"]], printer=LinePrinter(stream, ["a"])).run()
    )
    assert envelope.exit_code is ExitCode.OK
    assert stream.getvalue() == f"a | {follower / 'sub'}\n"


# ---- host loss, timeouts, cancellation -----------------------------------------------------


def test_connection_lost_mid_command_is_unreachable_and_others_finish(
    executor: LocalProcessExecutor,
) -> None:
    faulty = LosesConnection(executor, victim="bravo", marker=b"ready")
    command = 'if [ "$AH_HOST" = bravo ]; then echo ready; sleep 30; else echo "done $AH_HOST"; fi'
    started = time.monotonic()
    envelope = run_async(RunEngine(faulty, linux("alpha", "bravo", "charlie"), [command]).run())
    assert time.monotonic() - started < DEADLINE
    by_host = {r.host: r for r in envelope.hosts}
    assert by_host["alpha"].state is HostState.OK and by_host["charlie"].state is HostState.OK
    lost = by_host["bravo"]
    assert lost.state is HostState.UNREACHABLE and lost.exit_code is None
    assert lost.error is not None and "SSH channel closed by peer" in lost.error
    assert envelope.summary.line() == "2 succeeded, 0 failed, 1 unreachable"
    assert envelope.exit_code is ExitCode.HOSTS_FAILED
    (pid,) = executor.pids["bravo"]
    assert_group_ends(pid)


def test_unreachable_host_queue_moves_to_the_other_host_of_its_os(
    executor: LocalProcessExecutor,
) -> None:
    commands = [f"echo job-{i}" for i in range(4)]
    envelope = run_async(RunEngine(UnreachableHost(executor, "x"), linux("x", "y"), commands).run())
    outcome = [(r.command, r.host, r.state) for r in envelope.hosts]
    assert outcome == [
        ("echo job-0", "x", HostState.UNREACHABLE),  # it was "running" there: not re-run
        ("echo job-1", "y", HostState.OK),
        ("echo job-2", "y", HostState.OK),  # was queued on x, moved to y
        ("echo job-3", "y", HostState.OK),
    ]
    assert envelope.summary.line() == "3 succeeded, 0 failed, 1 unreachable"


def test_timeouts_run_in_parallel(executor: LocalProcessExecutor) -> None:
    started = time.monotonic()
    envelope = run_async(
        RunEngine(executor, linux("a", "b", "c"), [["sleep", "30"]], timeout=1.0).run()
    )
    elapsed = time.monotonic() - started
    assert elapsed < 10, f"three 1 s timeouts took {elapsed:.1f} s: not parallel"
    assert [r.state for r in envelope.hosts] == [HostState.TIMEOUT] * 3
    assert all(r.error == "timed out after 1 s" for r in envelope.hosts)
    assert envelope.summary.line() == "0 succeeded, 0 failed, 0 unreachable, 3 timed out"
    assert envelope.exit_code is ExitCode.HOSTS_FAILED
    for pids in executor.pids.values():
        for pid in pids:
            assert_group_ends(pid)


def test_engine_enforces_the_timeout_when_the_executor_ignores_it(
    executor: LocalProcessExecutor,
) -> None:
    engine = RunEngine(
        IgnoresTimeout(executor), linux("a"), [["sleep", "30"]], timeout=0.5, timeout_grace=0.5
    )
    started = time.monotonic()
    envelope = run_async(engine.run())
    assert time.monotonic() - started < 10
    (result,) = envelope.hosts
    assert result.state is HostState.TIMEOUT
    assert result.error is not None and "did not stop it" in result.error
    (pid,) = executor.pids["a"]
    assert_group_ends(pid)


@pytest.mark.parametrize("how", ["cancel-task", "engine.cancel"])
def test_cancellation_stops_remote_commands_and_still_reports(
    executor: LocalProcessExecutor, how: str
) -> None:
    async def scenario() -> RunEnvelope:
        both_started = asyncio.Event()
        started_hosts: set[str] = set()

        def sink(event: Event) -> None:
            if isinstance(event, HostLogEvent) and event.line == "started":
                started_hosts.add(event.host)
                if len(started_hosts) == 2:
                    both_started.set()

        commands = [f"echo started; sleep 30; echo never-{i}" for i in range(3)]
        # once-per-os over two hosts: jobs 0 and 1 run, job 2 queues behind job 0.
        engine = RunEngine(executor, linux("l1", "l2"), commands, sink=sink)
        task = asyncio.create_task(engine.run())
        await both_started.wait()
        if how == "cancel-task":
            task.cancel()  # what Ctrl-C does to the main task under asyncio.run
        else:
            engine.cancel("stopped by test")
        return await task

    started = time.monotonic()
    envelope = run_async(scenario())
    assert time.monotonic() - started < 10
    assert [(r.host, r.state) for r in envelope.hosts] == [
        ("l1", HostState.CANCELLED),
        ("l2", HostState.CANCELLED),
        ("l1", HostState.CANCELLED),
    ]
    assert envelope.hosts[2].error is not None
    assert "before it started" in envelope.hosts[2].error
    assert envelope.summary.line() == "0 succeeded, 0 failed, 0 unreachable, 3 cancelled"
    assert envelope.exit_code is ExitCode.HOSTS_FAILED
    assert sorted(executor.pids) == ["l1", "l2"]  # the queued job never started
    for pids in executor.pids.values():
        for pid in pids:
            assert_group_ends(pid)


# ---- sharding over two OSes ----------------------------------------------------------------


def test_six_commands_over_two_oses_run_once_per_os_never_overlapping(
    tmp_path: Path,
) -> None:
    # macOS hosts render `zsh -lc '...'`; zsh is not installed here, so their PATH holds a
    # `zsh` that execs bash (same -lc interface) and marks that it was used.
    shim_dir = tmp_path / "shim"
    shim_dir.mkdir()
    shim = shim_dir / "zsh"
    shim.write_text('#!/bin/sh\nAH_VIA=zsh-shim exec bash "$@"\n')
    shim.chmod(0o755)
    home = tmp_path / "home"
    home.mkdir()
    oses = {
        "lin-1": OsKind.LINUX,
        "lin-2": OsKind.LINUX,
        "mac-1": OsKind.MACOS,
        "mac-2": OsKind.MACOS,
    }

    def host_env(host: str) -> Mapping[str, str]:
        env = {"AH_HOST": host}
        if oses[host] is OsKind.MACOS:
            env["PATH"] = f"{shim_dir}:{os.environ['PATH']}"
        return env

    recording = Recording(
        LocalProcessExecutor(
            base_env={"PATH": os.environ["PATH"], "HOME": str(home)}, host_env=host_env
        )
    )
    commands = [f'echo "cmd-{i} ${{AH_VIA:-bash}}"; sleep 0.1' for i in range(6)]
    stream = io.StringIO()
    hosts = [TargetHost(name=n, os=o) for n, o in oses.items()]
    envelope = run_async(
        RunEngine(recording, hosts, commands, printer=LinePrinter(stream, list(oses))).run()
    )

    assert envelope.exit_code is ExitCode.OK
    assert len(envelope.hosts) == 12
    per_os = Counter((r.os, r.command) for r in envelope.hosts)
    assert per_os == Counter(
        (os_kind, c) for os_kind in (OsKind.LINUX, OsKind.MACOS) for c in commands
    )
    assert Counter(r.host for r in envelope.hosts) == dict.fromkeys(oses, 3)
    intervals: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for host, start, end in recording.intervals:
        intervals[host].append((start, end))
    for host, spans in intervals.items():
        spans.sort()
        for (_, end), (next_start, _) in itertools.pairwise(spans):
            assert end <= next_start, f"two jobs overlapped on {host}"
    printed = lines_by_host(stream.getvalue())
    for host, os_kind in oses.items():
        shell = "zsh-shim" if os_kind is OsKind.MACOS else "bash"
        assert len(printed[host]) == 3 and all(t.endswith(" " + shell) for t in printed[host])
    ran = sorted(t.split()[0] for host in oses for t in printed[host])
    assert ran == sorted([f"cmd-{i}" for i in range(6)] * 2)


# ---- output integrity ----------------------------------------------------------------------


def test_no_output_line_is_lost_with_several_runs_in_flight(
    executor: LocalProcessExecutor, tmp_path: Path
) -> None:
    count = 2000
    command = (
        f'i=0; while [ $i -lt {count} ]; do echo "out $AH_HOST $i"; '
        f'echo "err $AH_HOST $i" >&2; i=$((i+1)); done; printf "tail $AH_HOST"'
    )
    runs = {"r1": linux("a1", "a2", "a3"), "r2": linux("b1", "b2", "b3")}
    streams = {name: io.StringIO() for name in runs}
    dirs = {name: RunDirectory(tmp_path / name) for name in runs}
    events: list[Event] = []

    async def both() -> list[RunEnvelope]:
        engines = [
            RunEngine(
                executor,
                hosts,
                [command],
                printer=LinePrinter(streams[name], [h.name for h in hosts]),
                run_dir=dirs[name],
                sink=events.append,
            )
            for name, hosts in runs.items()
        ]
        return list(await asyncio.gather(*(e.run() for e in engines)))

    envelopes = run_async(both())
    assert all(e.exit_code is ExitCode.OK for e in envelopes)
    logged: dict[tuple[str, str], list[str]] = defaultdict(list)
    for event in events:
        if isinstance(event, HostLogEvent):
            logged[(event.host, event.stream)].append(event.line)
    for name, hosts in runs.items():
        printed = lines_by_host(streams[name].getvalue())
        assert set(printed) == {h.name for h in hosts}
        for host in (h.name for h in hosts):
            expected_out = [f"out {host} {i}" for i in range(count)] + [f"tail {host}"]
            expected_err = [f"err {host} {i}" for i in range(count)]
            # Per stream, every line arrives, in order, whole.
            assert [t for t in printed[host] if not t.startswith("err")] == expected_out
            assert [t for t in printed[host] if t.startswith("err")] == expected_err
            assert logged[(host, "stdout")] == expected_out
            assert logged[(host, "stderr")] == expected_err
            log_lines = (dirs[name].path / f"{host}.log").read_text().splitlines()
            assert [ln[6:] for ln in log_lines if ln.startswith("out | ")] == expected_out
            assert [ln[6:] for ln in log_lines if ln.startswith("err | ")] == expected_err


def test_chunks_split_inside_utf8_characters_and_lines_are_reassembled(
    executor: LocalProcessExecutor,
) -> None:
    class Rechunking:
        """Delivers the real output one byte at a time (as a slow channel might)."""

        async def run(
            self,
            host: str,
            command: str,
            *,
            on_stdout: OutputCallback,
            on_stderr: OutputCallback,
            timeout: float | None,
        ) -> ExecOutcome:
            def bytewise(chunk: bytes | str) -> None:
                data = chunk if isinstance(chunk, bytes) else chunk.encode()
                for i in range(len(data)):
                    on_stdout(data[i : i + 1])

            return await executor.run(
                host, command, on_stdout=bytewise, on_stderr=on_stderr, timeout=timeout
            )

    stream = io.StringIO()
    envelope = run_async(
        RunEngine(
            Rechunking(),
            linux("a"),
            ["printf 'h\\303\\251llo \\344\\270\\255\\r\\nbad \\377\\n'"],
            printer=LinePrinter(stream, ["a"]),
        ).run()
    )
    assert envelope.exit_code is ExitCode.OK
    assert stream.getvalue() == "a | h\u00e9llo \u4e2d\na | bad \ufffd\n"


class ThreadedExecutor:
    """Like the SSH bridge (paramiko in a thread executor): the real process is read in
    worker threads, and the output callbacks are called from those threads."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = env

    def _blocking_run(
        self, host: str, command: str, on_stdout: OutputCallback, on_stderr: OutputCallback
    ) -> int:
        proc = subprocess.Popen(
            ["/bin/sh", "-c", command],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={**self.env, "AH_HOST": host},
        )
        assert proc.stdout is not None and proc.stderr is not None

        def pump(fd: int, callback: OutputCallback) -> None:
            while chunk := os.read(fd, 4096):
                callback(chunk)

        readers = [
            threading.Thread(target=pump, args=(proc.stdout.fileno(), on_stdout)),
            threading.Thread(target=pump, args=(proc.stderr.fileno(), on_stderr)),
        ]
        for reader in readers:
            reader.start()
        for reader in readers:
            reader.join()
        proc.stdout.close()
        proc.stderr.close()
        return proc.wait()

    async def run(
        self,
        host: str,
        command: str,
        *,
        on_stdout: OutputCallback,
        on_stderr: OutputCallback,
        timeout: float | None,
    ) -> ExecOutcome:
        code = await asyncio.to_thread(self._blocking_run, host, command, on_stdout, on_stderr)
        return ExecOutcome(exit_code=code)


def test_output_from_executor_threads_is_complete_and_attributed(tmp_path: Path) -> None:
    count = 1500
    command = (
        f'i=0; while [ $i -lt {count} ]; do echo "out $AH_HOST $i"; '
        f'echo "err $AH_HOST $i" >&2; i=$((i+1)); done; printf "tail $AH_HOST"'
    )
    hosts = linux("t1", "t2", "t3")
    stream = io.StringIO()
    executor = ThreadedExecutor({"PATH": os.environ["PATH"], "HOME": str(tmp_path)})
    envelope = run_async(
        RunEngine(
            executor, hosts, [command], printer=LinePrinter(stream, [h.name for h in hosts])
        ).run()
    )
    assert envelope.exit_code is ExitCode.OK
    printed = lines_by_host(stream.getvalue())
    for host in ("t1", "t2", "t3"):
        expected_out = [f"out {host} {i}" for i in range(count)] + [f"tail {host}"]
        assert [t for t in printed[host] if not t.startswith("err")] == expected_out
        assert [t for t in printed[host] if t.startswith("err")] == [
            f"err {host} {i}" for i in range(count)
        ]


def test_hosts_unreachable_from_the_start_never_get_a_job(
    executor: LocalProcessExecutor,
) -> None:
    """Sharded: their jobs go to a reachable host of the same OS. One command: they are
    reported unreachable with the reason, and nothing runs there."""
    sharded = run_async(
        RunEngine(
            executor,
            linux("a", "b"),
            ["echo 1", "echo 2", "echo 3"],
            unreachable={"b": "no route to b"},
        ).run()
    )
    assert [(r.host, r.state) for r in sharded.hosts] == [("a", HostState.OK)] * 3 + [
        ("b", HostState.UNREACHABLE)  # named, never silently dropped: the run fails
    ]
    assert sharded.hosts[-1].error == "no route to b"
    assert sharded.exit_code is ExitCode.HOSTS_FAILED
    assert executor.pids.keys() == {"a"}

    every = run_async(
        RunEngine(executor, linux("a", "b"), ["true"], unreachable={"b": "no route to b"}).run()
    )
    b = next(r for r in every.hosts if r.host == "b")
    assert b.state is HostState.UNREACHABLE and b.exit_code is None
    assert b.error == (
        "host 'b' became unreachable before this command started and the command belongs "
        "to that host: no route to b"
    )
    assert every.exit_code is ExitCode.HOSTS_FAILED
    assert executor.pids.keys() == {"a"}
    with pytest.raises(ValueError, match="not among the run's hosts"):
        RunEngine(executor, linux("a"), ["true"], unreachable={"zz": "?"})


def test_a_host_a_sharded_run_has_no_command_for_is_idle_and_does_not_fail_it(
    executor: LocalProcessExecutor,
) -> None:
    envelope = run_async(
        RunEngine(executor, linux("a", "b", "c"), ["echo 1", "echo 2"], mode="once-per-os").run()
    )
    assert [(r.host, r.state) for r in envelope.hosts] == [
        ("a", HostState.OK),
        ("b", HostState.OK),
        ("c", HostState.IDLE),
    ]
    assert envelope.exit_code is ExitCode.OK
    assert envelope.summary.line() == "2 succeeded, 0 failed, 0 unreachable, 1 idle"
    assert executor.pids.keys() == {"a", "b"}
