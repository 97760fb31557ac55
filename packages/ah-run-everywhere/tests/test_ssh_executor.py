"""The engine over real SSH: ``SshExecutor`` on transports to a real sshd."""

from __future__ import annotations

import asyncio
import io
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest

from ah_domain_types import HostState, OsKind
from ah_harness_local import RunningSshd
from ah_harness_local.pytest_plugin import SshdFactory
from ah_run_everywhere import (
    HostConnectionLost,
    HostUnreachable,
    LinePrinter,
    RunDirectory,
    RunEngine,
    TargetHost,
)
from ah_run_everywhere.ssh_executor import SshExecutor
from ah_ssh_bridge import SshTransport

T = TypeVar("T")


def run_async(coro: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
    async def bounded() -> T:
        async with asyncio.timeout(timeout):
            return await coro

    return asyncio.run(bounded())


async def connect(sshd: RunningSshd, name: str) -> SshTransport:
    return await SshTransport.connect(
        sshd.listen,
        sshd.port,
        host=name,
        username=sshd.user,
        key_path=sshd.client_key_path,
        expected_fingerprint=sshd.host_key_fingerprint,
    )


@pytest.fixture(scope="module")
def shared_sshd(sshd_factory: SshdFactory) -> RunningSshd:
    return sshd_factory(name="executor-shared")


def test_output_lines_exit_codes_and_an_unreachable_host(
    shared_sshd: RunningSshd, tmp_path: Path
) -> None:
    script = "printf 'one\\ntwo\\n'; printf 'warn\\n' >&2; printf 'héllo, no newline'"

    async def body() -> tuple[Any, str, str]:
        left = await connect(shared_sshd, "left")
        right = await connect(shared_sshd, "right")
        try:
            executor = SshExecutor(
                {"left": left, "right": right}, unreachable={"gone": "no path to gone (test)"}
            )
            out = io.StringIO()
            hosts = [
                TargetHost(name="left", os=OsKind.LINUX, cwd=str(tmp_path)),
                TargetHost(name="right", os=OsKind.LINUX, cwd=str(tmp_path)),
                TargetHost(name="gone", os=OsKind.LINUX),
            ]
            engine = RunEngine(
                executor,
                hosts,
                [script],
                printer=LinePrinter(out, [h.name for h in hosts]),
                run_dir=RunDirectory(tmp_path / "logs"),
            )
            envelope = await engine.run()
            failing = await executor.run(
                "right",
                "exit 7",
                on_stdout=lambda chunk: None,
                on_stderr=lambda chunk: None,
                timeout=10,
            )
            return envelope, out.getvalue(), str(failing.exit_code)
        finally:
            await left.close()
            await right.close()

    envelope, printed, failing_code = run_async(body())
    states = {h.host: h.state for h in envelope.hosts}
    assert states == {"left": HostState.OK, "right": HostState.OK, "gone": HostState.UNREACHABLE}
    gone = next(h for h in envelope.hosts if h.host == "gone")
    assert gone.error is not None and gone.error.endswith("HostUnreachable: no path to gone (test)")
    assert failing_code == "7"
    for host in ("left ", "right"):
        lines = [line for line in printed.splitlines() if line.startswith(host)]
        assert sorted(lines) == sorted(
            f"{host} | {text}" for text in ("one", "two", "warn", "héllo, no newline")
        ), printed
    log = Path(envelope.hosts[0].log_path or "").read_text()
    assert "out | one\nout | two\n" in log and "err | warn\n" in log
    assert "out | héllo, no newline\n" in log


def test_a_host_without_transport_raises_unreachable() -> None:
    async def body() -> None:
        await SshExecutor({}).run("nowhere", "true", on_stdout=print, on_stderr=print, timeout=None)

    with pytest.raises(HostUnreachable, match="no SSH transport to nowhere"):
        run_async(body())


def test_a_connection_lost_mid_command_is_host_connection_lost(sshd: RunningSshd) -> None:
    async def body() -> None:
        transport = await connect(sshd, "victim")
        started = asyncio.Event()

        def on_stdout(chunk: bytes | str) -> None:
            if chunk == "started\n":
                started.set()

        try:
            executor = SshExecutor({"victim": transport})
            job = asyncio.ensure_future(
                executor.run(
                    "victim",
                    "echo started; sleep 30",
                    on_stdout=on_stdout,
                    on_stderr=on_stdout,
                    timeout=60,
                )
            )
            await asyncio.wait_for(started.wait(), 20)
            await asyncio.to_thread(sshd.process.kill)
            await asyncio.wait_for(job, 20)
        finally:
            await transport.close()

    with pytest.raises(HostConnectionLost, match="SSH connection to victim lost"):
        run_async(body())


# --------------------------------------------------------------------------- warm executor

WARM_CASES: list[tuple[str, Any]] = [
    ("argv", ["printf", "%s|", "a b", "it's", '"q"', "$HOME", "*", "tab\there", ""]),
    ("script", "printf 'x\\ny\\n' | wc -l; echo \"$AH_GREETING\"; echo err >&2; exit 4"),
    ("path", "ah-warm-tool; command -v ah-warm-tool"),
]


@pytest.mark.parametrize(("label", "command"), WARM_CASES, ids=[c[0] for c in WARM_CASES])
def test_the_warm_executor_gives_what_exec_channels_give(
    shared_sshd: RunningSshd, tmp_path: Path, label: str, command: Any
) -> None:
    """The same run over exec channels and over the warm executor: same lines, same
    states and exit codes; and the warm one really ran warm."""
    tools = tmp_path / "tools"
    tools.mkdir()
    (tools / "ah-warm-tool").write_text('#!/bin/sh\necho "tool in $(pwd)"\n')
    (tools / "ah-warm-tool").chmod(0o755)
    workdir = tmp_path / "work dir"
    workdir.mkdir()

    async def once(warm: bool) -> tuple[Any, str, int | None]:
        transport = await connect(shared_sshd, "box")
        try:
            out = io.StringIO()
            engine = RunEngine(
                SshExecutor({"box": transport}, warm=warm),
                [TargetHost(name="box", os=OsKind.LINUX, cwd=str(workdir))],
                [command],
                env={"AH_GREETING": "hello there"},
                path_prepend=[str(tools)],
                printer=LinePrinter(out, ["box"]),
            )
            envelope = await engine.run()
            return envelope, out.getvalue(), transport.warm_server_pid
        finally:
            await transport.close()

    cold, cold_printed, cold_pid = run_async(once(False))
    warm, warm_printed, warm_pid = run_async(once(True))
    assert cold_pid is None and warm_pid is not None

    # stdout and stderr travel on separate pipes, so only each stream's own order is
    # defined: where the stderr line falls among stdout lines depends on scheduling.
    def stdout_lines(printed: str) -> list[str]:
        return [line for line in printed.splitlines() if line != "box | err"]

    assert stdout_lines(warm_printed) == stdout_lines(cold_printed)
    assert sorted(warm_printed.splitlines()) == sorted(cold_printed.splitlines())
    assert [(h.state, h.exit_code) for h in warm.hosts] == [
        (h.state, h.exit_code) for h in cold.hosts
    ]
    expected = {
        "argv": 'box | a b|it\'s|"q"|$HOME|*|tab\there||',
        "script": "box | 2\nbox | hello there\nbox | err",
        "path": f"box | tool in {workdir}\nbox | {tools}/ah-warm-tool",
    }[label]
    assert sorted(warm_printed.splitlines()) == sorted(expected.splitlines())


def test_a_follower_killed_mid_command_is_unreachable_on_the_warm_path(
    sshd: RunningSshd,
) -> None:
    async def body() -> Any:
        transport = await connect(sshd, "victim")
        try:
            started = asyncio.Event()

            class Watch(io.StringIO):
                def write(self, text: str) -> int:
                    if "started" in text:
                        started.set()
                    return super().write(text)

            engine = RunEngine(
                SshExecutor({"victim": transport}),
                [TargetHost(name="victim", os=OsKind.LINUX)],
                ["echo started; sleep 30"],
                printer=LinePrinter(Watch(), ["victim"]),
            )
            run = asyncio.ensure_future(engine.run())
            await asyncio.wait_for(started.wait(), 20)
            assert transport.warm_server_pid is not None
            await asyncio.to_thread(sshd.process.kill)
            return await asyncio.wait_for(run, 20)
        finally:
            await transport.close()

    envelope = run_async(body())
    (victim,) = envelope.hosts
    assert victim.state == HostState.UNREACHABLE
    assert victim.error is not None and "victim" in victim.error
