"""The warm executor against real OpenSSH servers (ah-harness-local): one server process per
transport running every structured command (``SshTransport.run(..., warm=...)``)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ssh_bridge_support import open_transport, pid_gone, read_pids, sleeper

from ah_harness_local import RunningSshd, wait_for, wait_for_async
from ah_harness_local.pytest_plugin import SshdFactory
from ah_ssh_bridge import SshConnectionLost, SshOptions, SshTransport, WarmCommand

Run = Callable[..., Any]
T = TypeVar("T")


def sh(script: str, **kwargs: Any) -> WarmCommand:
    return WarmCommand(shell="bash", script=script, **kwargs)


def argv(*words: str, **kwargs: Any) -> WarmCommand:
    return WarmCommand(shell="bash", argv=words, **kwargs)


# The exec-channel text given alongside: a command that would fail loudly, so a test passes
# only if the warm executor really ran the structured command.
NOT_WARM = "echo 'ran on an exec channel, not the warm executor' >&2; exit 99"


@pytest.fixture
def private_sshd(sshd_factory: SshdFactory, tmp_path: Path) -> Iterator[RunningSshd]:
    running = sshd_factory(base_dir=tmp_path / "sshd")
    try:
        yield running
    finally:
        running.stop()


# --------------------------------------------------------------------------- basics


def test_commands_run_warm_with_exit_codes_env_cwd_and_path(
    shared_sshd: RunningSshd, run: Run, tmp_path: Path
) -> None:
    async def body() -> None:
        async with await open_transport(shared_sshd) as t:
            out: list[str] = []
            err: list[str] = []
            outcome = await t.run(
                NOT_WARM,
                on_stdout=out.append,
                on_stderr=err.append,
                warm=sh('echo "$GREETING"; pwd; echo oops >&2; exit 3', env={"GREETING": "hi"}),
                env={"OTHER": "x"},
            )
            assert (outcome.exit_code, out, err) == (3, ["hi", str(Path.home())], ["oops"])
            pid = t.warm_server_pid
            assert pid is not None and t.warm_disabled_reason is None
            # Argv is exec'd directly; cwd, env (the transport's too) and path_prepend apply.
            bin_dir = tmp_path / "bin"
            bin_dir.mkdir()
            tool = bin_dir / "ah-test-tool"
            tool.write_text('#!/bin/sh\necho "tool in $(pwd) with $OTHER"\n')
            tool.chmod(0o755)
            capture: list[str] = []
            outcome = await t.run(
                NOT_WARM,
                on_stdout=capture.append,
                warm=argv("ah-test-tool", cwd=str(tmp_path), path_prepend=(str(bin_dir),)),
                env={"OTHER": "x"},
            )
            assert outcome.exit_code == 0
            assert capture == [f"tool in {tmp_path} with x"]
            # The shell's own errors, as bash would have reported them.
            missing: list[str] = []
            outcome = await t.run(NOT_WARM, on_stderr=missing.append, warm=argv("no-such-tool-x"))
            assert outcome.exit_code == 127 and missing == [
                "ah-warm-exec: no-such-tool-x: command not found"
            ]
            bad_cwd: list[str] = []
            outcome = await t.run(
                NOT_WARM, on_stderr=bad_cwd.append, warm=argv("true", cwd=str(tmp_path / "nope"))
            )
            assert outcome.exit_code == 1 and "No such file or directory" in bad_cwd[0]
            # Killed by a signal: no exit status, as on an exec channel.
            outcome = await t.run(NOT_WARM, warm=sh("kill -KILL $$"))
            assert outcome.exit_code is None and not outcome.timed_out
            # stdin is passed and closed.
            cat: list[str] = []
            outcome = await t.run(
                NOT_WARM, on_stdout=cat.append, stdin=[b"a\nb", b"c\n"], warm=argv("cat")
            )
            assert (outcome.exit_code, cat) == (0, ["a", "bc"])
            assert t.warm_server_pid == pid  # all on the one server

    run(body())


def test_many_concurrent_commands_lose_no_line_and_keep_streams_apart(
    shared_sshd: RunningSshd, run: Run
) -> None:
    lines = 400
    count = 60

    async def body() -> None:
        async with await open_transport(
            shared_sshd,
            options=SshOptions(keepalive_interval_s=0),  # no keepalive channel either
        ) as t:
            outputs: dict[int, list[str]] = {n: [] for n in range(count)}
            errors: dict[int, list[str]] = {n: [] for n in range(count)}

            async def one(n: int) -> int | None:
                outcome = await t.run(
                    NOT_WARM,
                    on_stdout=outputs[n].append,
                    on_stderr=errors[n].append,
                    timeout=60,
                    warm=sh(
                        f'i=1; while [ $i -le {lines} ]; do echo "cmd{n} out $i"; '
                        f'echo "cmd{n} err $i" >&2; i=$((i+1)); done; exit {n % 7}'
                    ),
                )
                return outcome.exit_code

            codes = await asyncio.gather(*(one(n) for n in range(count)))
            assert codes == [n % 7 for n in range(count)]
            for n in range(count):
                assert outputs[n] == [f"cmd{n} out {i}" for i in range(1, lines + 1)]
                assert errors[n] == [f"cmd{n} err {i}" for i in range(1, lines + 1)]
            # 60 commands at once, one channel: the warm server's.
            assert t.peak_channels == 1

    run(body(), timeout=90)


# --------------------------------------------------------------------------- stopping


@pytest.mark.parametrize("ignore_term", [False, True], ids=["term", "term-ignored"])
def test_timeout_kills_the_whole_process_group(
    shared_sshd: RunningSshd, run: Run, pid_files: Callable[[str], Path], ignore_term: bool
) -> None:
    pid_file = pid_files("pids")

    async def body() -> None:
        async with await open_transport(shared_sshd) as t:
            out: list[str] = []
            outcome = await t.run(
                NOT_WARM,
                on_stdout=out.append,
                timeout=1.5,
                warm=sh(sleeper(pid_file, ignore_term=ignore_term)),
            )
            assert outcome.timed_out and outcome.exit_code is None and not outcome.cancelled
            assert out == ["started"]
            assert t.warm_disabled_reason is None
            after: list[str] = []
            await t.run(NOT_WARM, on_stdout=after.append, warm=argv("echo", "after"))
            assert after == ["after"]

    run(body())
    pids = read_pids(pid_file)
    assert len(pids) == 3
    wait_for(lambda: all(pid_gone(p) for p in pids), 10, what=f"remote processes {pids} to end")


def test_cancel_event_and_asyncio_cancel_kill_the_whole_process_group(
    shared_sshd: RunningSshd, run: Run, pid_files: Callable[[str], Path]
) -> None:
    by_event = pid_files("event")
    by_task = pid_files("task")

    async def body() -> None:
        async with await open_transport(shared_sshd) as t:
            cancel = asyncio.Event()
            outcome_task = asyncio.ensure_future(
                t.run(
                    NOT_WARM,
                    on_stdout=lambda _: cancel.set(),
                    cancel=cancel,
                    warm=sh(sleeper(by_event)),
                )
            )
            outcome = await asyncio.wait_for(outcome_task, 20)
            assert outcome.cancelled and outcome.exit_code is None
            started = asyncio.Event()
            task = asyncio.ensure_future(
                t.run(NOT_WARM, on_stdout=lambda _: started.set(), warm=sh(sleeper(by_task)))
            )
            await asyncio.wait_for(started.wait(), 10)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            pids = read_pids(by_event) + read_pids(by_task)
            assert len(pids) == 6
            await wait_for_async(lambda: all(pid_gone(p) for p in pids), 10, what=f"{pids} to end")

    run(body())


def test_killed_server_fails_the_running_command_then_a_new_server_starts(
    shared_sshd: RunningSshd, run: Run, pid_files: Callable[[str], Path]
) -> None:
    async def body() -> None:
        async with await open_transport(shared_sshd) as t:
            started = asyncio.Event()
            task = asyncio.ensure_future(
                t.run(
                    NOT_WARM,
                    on_stdout=lambda _: started.set(),
                    warm=sh(sleeper(pid_files("pids"))),
                )
            )
            await asyncio.wait_for(started.wait(), 10)
            pid = t.warm_server_pid
            assert pid is not None
            os.kill(pid, signal.SIGKILL)
            with pytest.raises(SshConnectionLost, match="warm executor on follower-1 ended"):
                await asyncio.wait_for(task, 10)
            # The transport is fine; the next command gets a fresh server.
            out: list[str] = []
            await t.run(NOT_WARM, on_stdout=out.append, warm=argv("echo", "again"))
            assert out == ["again"]
            assert t.warm_server_pid not in (None, pid)

    run(body())


def test_killed_sshd_fails_the_running_command_as_connection_lost(
    private_sshd: RunningSshd, run: Run, pid_files: Callable[[str], Path]
) -> None:
    pid_file = pid_files("pids")

    async def body() -> None:
        t = await open_transport(private_sshd)
        try:
            started = asyncio.Event()
            task = asyncio.ensure_future(
                t.run(NOT_WARM, on_stdout=lambda _: started.set(), warm=sh(sleeper(pid_file)))
            )
            await asyncio.wait_for(started.wait(), 10)
            server = t.warm_server_pid
            private_sshd.process.kill()  # SIGKILL sshd and its session processes
            with pytest.raises(SshConnectionLost, match="follower-1"):
                await asyncio.wait_for(task, 10)
            with pytest.raises(SshConnectionLost):
                await t.run(NOT_WARM, warm=argv("true"))
            assert server is not None
        finally:
            await t.close()

    run(body())
    # The server saw its channel end and stopped what it had started.
    pids = read_pids(pid_file)
    assert len(pids) == 3
    wait_for(lambda: all(pid_gone(p) for p in pids), 10, what=f"remote processes {pids} to end")


def test_closing_the_transport_stops_the_server_and_its_commands(
    shared_sshd: RunningSshd, run: Run, pid_files: Callable[[str], Path]
) -> None:
    pid_file = pid_files("pids")
    server_pids: list[int] = []

    async def body() -> None:
        t = await open_transport(shared_sshd)
        started = asyncio.Event()
        task = asyncio.ensure_future(
            t.run(NOT_WARM, on_stdout=lambda _: started.set(), warm=sh(sleeper(pid_file)))
        )
        await asyncio.wait_for(started.wait(), 10)
        pid = t.warm_server_pid
        assert pid is not None
        server_pids.append(pid)
        await t.close()
        with pytest.raises(SshConnectionLost):
            await asyncio.wait_for(task, 10)

    run(body())
    pids = read_pids(pid_file) + server_pids
    assert len(pids) == 4
    wait_for(lambda: all(pid_gone(p) for p in pids), 10, what=f"remote processes {pids} to end")


# --------------------------------------------------------------------------- login environment


def test_a_profile_edit_is_seen_by_the_next_command(private_sshd: RunningSshd, run: Run) -> None:
    home = private_sshd.home_dir
    assert home is not None
    profile = home / ".profile"

    async def body() -> None:
        async with await open_transport(private_sshd) as t:
            first: list[str] = []
            await t.run(NOT_WARM, on_stdout=first.append, warm=sh('echo "[$AH_PROFILE_MARK]"'))
            assert first == ["[]"]
            old_pid = t.warm_server_pid
            profile.write_text(profile.read_text() + "export AH_PROFILE_MARK=edited\n")
            second: list[str] = []
            await t.run(NOT_WARM, on_stdout=second.append, warm=sh('echo "[$AH_PROFILE_MARK]"'))
            assert second == ["[edited]"]
            assert t.warm_server_pid not in (None, old_pid)

    run(body())


def test_without_python3_commands_fall_back_to_exec_channels(
    private_sshd: RunningSshd, run: Run, tmp_path: Path
) -> None:
    home = private_sshd.home_dir
    assert home is not None
    bare = tmp_path / "bare-bin"
    bare.mkdir()
    (bare / "ah-test-tool").write_text("#!/bin/sh\necho tool ran\n")
    (bare / "ah-test-tool").chmod(0o755)
    # The login PATH has no python3 (nor anything else but our tool).
    (home / ".profile").write_text(f"export PATH={bare}\n")

    async def body() -> None:
        async with await open_transport(private_sshd) as t:
            out: list[str] = []
            outcome = await t.run(
                "bash -lc 'ah-test-tool'", on_stdout=out.append, warm=argv("ah-test-tool")
            )
            assert (outcome.exit_code, out) == (0, ["tool ran"])
            reason = t.warm_disabled_reason
            assert reason is not None and "python3" in reason and "127" in reason
            assert t.warm_server_pid is None
            again: list[str] = []
            await t.run("bash -lc 'ah-test-tool'", on_stdout=again.append, warm=argv("x"))
            assert again == ["tool ran"]

    run(body())


# --------------------------------------------------------------------------- quoting


class LoopThread:
    """An event loop on its own thread, so one transport serves many hypothesis examples."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture(scope="module")
def warm_transport(shared_sshd: RunningSshd) -> Iterator[tuple[LoopThread, SshTransport]]:
    loop = LoopThread()
    transport = loop.call(open_transport(shared_sshd, options=SshOptions()))
    try:
        yield loop, transport
    finally:
        loop.call(transport.close())
        loop.stop()


ARG = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=30)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.lists(ARG, max_size=6))
def test_arguments_reach_the_program_exactly(
    warm_transport: tuple[LoopThread, SshTransport], words: list[str]
) -> None:
    loop, t = warm_transport
    out: list[str] = []
    program = "import sys, json; print(json.dumps(sys.argv[1:]))"
    outcome = loop.call(
        t.run(NOT_WARM, on_stdout=out.append, warm=argv("python3", "-c", program, *words))
    )
    assert outcome.exit_code == 0
    assert json.loads(out[0]) == words
    assert t.warm_disabled_reason is None


@pytest.mark.parametrize(
    "options",
    [SshOptions(warm_exec=False), SshOptions(max_sessions=3)],
    ids=["warm_exec-off", "max_sessions-3"],
)
def test_structured_commands_use_exec_channels_when_the_warm_executor_is_off(
    shared_sshd: RunningSshd, run: Run, options: SshOptions
) -> None:
    async def body() -> None:
        async with await open_transport(shared_sshd, options=options) as t:
            out: list[str] = []
            outcome = await t.run("echo exec-channel", on_stdout=out.append, warm=argv("x"))
            assert (outcome.exit_code, out) == (0, ["exec-channel"])
            assert t.warm_server_pid is None
            assert t.open_channels == 0

    run(body())
