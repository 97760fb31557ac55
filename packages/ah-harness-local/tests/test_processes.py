"""ManagedProcess and ProcessGroup with real processes: logs, pause, escalation, cleanup."""

from __future__ import annotations

import signal
import socket
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from ah_harness_local import (
    ManagedProcess,
    ProcessGroup,
    free_tcp_port,
    free_udp_port,
    wait_for,
    wait_for_tcp,
)

PY = sys.executable


def _state(pid: int) -> str:
    """The /proc state letter, "gone" if the process no longer exists."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return "gone"
    return stat[stat.rfind(")") + 2]


def _gone(pid: int) -> bool:
    return _state(pid) in ("gone", "Z", "X")


def _tree_has(proc: ManagedProcess, n: int) -> Callable[[], bool]:
    return lambda: len(proc.tree_pids()) == n


def test_wait_for_returns_the_value_or_times_out_naming_what() -> None:
    calls: list[int] = []

    def third_time() -> int | None:
        calls.append(1)
        return len(calls) if len(calls) >= 3 else None

    assert wait_for(third_time, 5, interval=0.001) == 3
    with pytest.raises(TimeoutError, match=r"^timed out after 0\.05s waiting for the moon$"):
        wait_for(lambda: False, 0.05, what="the moon")


def test_free_ports_are_bindable() -> None:
    tcp, udp = free_tcp_port(), free_udp_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", tcp))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", udp))


def test_wait_for_tcp_sees_a_listener_and_times_out_without_one() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        wait_for_tcp("127.0.0.1", listener.getsockname()[1], 5)
    port = free_tcp_port()
    with pytest.raises(TimeoutError, match=f"127.0.0.1:{port}"):
        wait_for_tcp("127.0.0.1", port, 0.2)


def test_output_goes_to_log_files(tmp_path: Path) -> None:
    proc = ManagedProcess(
        [PY, "-c", "import sys; print('to-out'); print('to-err', file=sys.stderr)"],
        log_dir=tmp_path,
        name="echoer",
    )
    assert proc.wait(30) == 0
    assert proc.stdout_text() == "to-out\n"
    assert proc.stderr_text() == "to-err\n"
    assert "to-out" in proc.log_text() and "to-err" in proc.log_text()
    again = ManagedProcess([PY, "-c", "pass"], log_dir=tmp_path, name="echoer")
    assert again.stdout_path != proc.stdout_path
    again.wait(30)
    assert proc.pgid == proc.pid


def test_pause_stops_the_whole_group_and_resume_continues_it(tmp_path: Path) -> None:
    with ProcessGroup(tmp_path) as group:
        proc = group.start(["sh", "-c", "sleep 300 & wait"], name="parent")
        wait_for(lambda: len(proc.tree_pids()) == 2, 10, what="sh and its sleep")
        tree = proc.tree_pids()
        proc.pause()
        assert proc.is_paused and proc.is_running
        wait_for(
            lambda: all(_state(p) == "T" for p in tree), 15, what="every process to be stopped"
        )
        proc.resume()
        assert not proc.is_paused
        wait_for(lambda: all(_state(p) == "S" for p in tree), 15, what="every process to run again")


def test_terminate_escalates_to_sigkill(tmp_path: Path) -> None:
    stubborn = ManagedProcess(
        [
            PY,
            "-c",
            "import signal, sys, time\n"
            "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
            "print('ready', flush=True)\n"
            "while True: time.sleep(1)\n",
        ],
        log_dir=tmp_path,
        name="stubborn",
    )
    wait_for(lambda: stubborn.stdout_text() == "ready\n", 30, what="SIGTERM to be ignored")
    assert stubborn.terminate(timeout=0.3) == -signal.SIGKILL
    assert _gone(stubborn.pid)


def test_terminate_reaches_detached_descendants(tmp_path: Path) -> None:
    # setsid takes the grandchild out of the process group, as sshd does for each connection.
    proc = ManagedProcess(
        ["sh", "-c", "setsid sleep 300 & wait"], log_dir=tmp_path, name="detacher"
    )
    wait_for(lambda: len(proc.tree_pids()) == 2, 10, what="the detached sleep")
    tree = proc.tree_pids()
    proc.terminate()
    assert not proc.is_running
    for pid in tree:
        assert _gone(pid)


def test_a_paused_process_still_terminates(tmp_path: Path) -> None:
    proc = ManagedProcess(["sleep", "300"], log_dir=tmp_path)
    proc.pause()
    wait_for(lambda: _state(proc.pid) == "T", 15, what="sleep to stop")
    assert proc.terminate(timeout=15) == -signal.SIGTERM


def test_process_group_cleans_up_on_exception(tmp_path: Path) -> None:
    pids: list[int] = []
    cleaned: list[str] = []
    with pytest.raises(RuntimeError, match="boom"), ProcessGroup(tmp_path) as group:
        for i in range(3):
            proc = group.start(["sh", "-c", "sleep 300 & sleep 300"], name=f"worker-{i}")
            wait_for(_tree_has(proc, 3), 10, what=f"both sleeps of worker-{i}")
            pids.extend(proc.tree_pids())
        group.add_cleanup(lambda: cleaned.append("first"))
        group.add_cleanup(lambda: cleaned.append("second"))
        raise RuntimeError("boom")
    assert cleaned == ["second", "first"]
    assert len(pids) == 9
    for pid in pids:
        assert _gone(pid), f"pid {pid} survived the group"
    with pytest.raises(RuntimeError, match="closed"):
        group.start(["true"])


def test_kill_is_immediate(tmp_path: Path) -> None:
    proc = ManagedProcess(["sleep", "300"], log_dir=tmp_path)
    assert proc.kill() == -signal.SIGKILL
    assert _gone(proc.pid)


@pytest.mark.parametrize("death", ["os._exit", "SIGKILL"])
def test_children_die_with_a_test_process_that_dies_without_cleanup(
    tmp_path: Path, death: str
) -> None:
    # pytest-timeout's thread method leaves through os._exit, and CI may SIGKILL a runner:
    # neither runs atexit, so the watchdog must do the cleanup.
    record = tmp_path / "pids"
    script = f"""
import os, signal, sys
from pathlib import Path
from ah_harness_local import ManagedProcess, wait_for
proc = ManagedProcess(["sh", "-c", "setsid sleep 300 & sleep 300"], log_dir=Path({str(tmp_path)!r}))
wait_for(lambda: len(proc.tree_pids()) == 3, 10, what="the sleeps")
Path({str(record)!r}).write_text(" ".join(map(str, proc.tree_pids())))
if {death!r} == "os._exit":
    os._exit(3)
os.kill(os.getpid(), signal.SIGKILL)
"""
    runner = ManagedProcess([PY, "-c", script], log_dir=tmp_path, name="doomed-runner")
    try:
        runner.wait(60)
        pids = [int(p) for p in record.read_text().split()]
        assert len(pids) == 3, runner.log_text()
        wait_for(lambda: all(_gone(p) for p in pids), 15, what=f"orphans of {pids} to die")
    finally:
        runner.terminate()
