"""SshTransport against real OpenSSH servers (ah-harness-local)."""

from __future__ import annotations

import asyncio
import os
import re
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paramiko  # type: ignore[import-untyped]
import pytest
from paramiko.common import cMSG_CHANNEL_DATA  # type: ignore[import-untyped]
from ssh_bridge_support import FAST, open_transport, pid_gone, read_pids, sleeper

from ah_harness_local import RunningSshd, wait_for, wait_for_async
from ah_harness_local.pytest_plugin import SshdFactory
from ah_ssh_bridge import (
    IDLE_READ_TIMEOUT_S,
    HostKeyMismatch,
    SshAuthError,
    SshConnectError,
    SshConnectionLost,
    SshOptions,
    SshPool,
    SshTransport,
    WarmCommand,
)

Run = Callable[..., Any]

# The 2 s keepalive deadline of FAST is about dead peers; dozens of busy channels on a loaded
# 2-core machine can delay one keepalive reply past it, which is not what those tests are about.
PATIENT = SshOptions(keepalive_interval_s=5.0, keepalive_timeout_s=30.0, kill_grace_s=0.5)

# --------------------------------------------------------------------------- basics


def test_echo_stdout_stderr_and_exit_codes(shared_sshd: RunningSshd, run: Run) -> None:
    async def body() -> None:
        async with await open_transport(shared_sshd) as t:
            assert t.cipher == "aes128-gcm@openssh.com"
            assert t.auth_method == "publickey"
            result = await t.capture("echo hello; echo oops >&2; echo world; exit 3")
            assert result.stdout == ["hello", "world"]
            assert result.stderr == ["oops"]
            assert result.outcome.exit_code == 3
            assert not result.outcome.timed_out and not result.outcome.cancelled
            assert not result.outcome.ok
            ok = await t.capture("true")
            assert ok.outcome.exit_code == 0 and ok.outcome.ok
            assert ok.stdout == [] and ok.stderr == []
            assert (await t.capture("exit 255")).outcome.exit_code == 255

    run(body())


def test_env_stdin_partial_last_line_and_utf8(shared_sshd: RunningSshd, run: Run) -> None:
    async def body() -> None:
        async with await open_transport(shared_sshd) as t:
            env = await t.capture(
                'printf "%s|%s\\n" "$GREETING" "$OTHER"',
                env={"GREETING": "hello 'quoted' $world", "OTHER": "x"},
            )
            assert env.stdout == ["hello 'quoted' $world|x"]
            piped = await t.capture("tee /dev/stderr | wc -c", stdin=b"abc\ndef")
            assert piped.stdout == ["7"] and piped.stderr == ["abc", "def"]
            chunks = await t.capture("cat", stdin=iter([b"one ", b"two\n", b"three"]))
            assert chunks.stdout == ["one two", "three"]
            partial = await t.capture("printf 'a\\r\\nb\\n\\nlast'")
            assert partial.stdout == ["a", "b", "", "last"]
            text = await t.capture("printf '\\303\\251t\\303\\251 \\377\\n'")
            assert text.stdout == ["été \ufffd"]
            with pytest.raises(ValueError, match="not a valid environment variable name"):
                await t.run("true", env={"BAD-NAME": "x"})

    run(body())


def test_lines_stream_while_the_command_runs(
    shared_sshd: RunningSshd, run: Run, tmp_path: Path
) -> None:
    """A line arrives before the command ends; a line is never delivered in pieces."""
    gate = tmp_path / "gate"
    command = (
        "echo first; printf 'par'; echo marker >&2; "
        f"while [ ! -e {gate} ]; do sleep 0.02; done; printf 'tial\\n'; echo last"
    )

    async def body() -> None:
        seen: list[tuple[str, str]] = []
        async with await open_transport(shared_sshd) as t:
            task = asyncio.ensure_future(
                t.run(
                    command,
                    on_stdout=lambda line: seen.append(("out", line)),
                    on_stderr=lambda line: seen.append(("err", line)),
                    timeout=20,
                )
            )
            await wait_for_async(lambda: ("err", "marker") in seen, 10, what="the marker line")
            # 'par' was written before the marker, yet no stdout piece of it was delivered.
            assert [line for stream, line in seen if stream == "out"] == ["first"]
            assert not task.done()
            gate.touch()
            outcome = await task
        assert outcome.exit_code == 0
        assert [line for stream, line in seen if stream == "out"] == ["first", "partial", "last"]

    run(body())


def test_fifty_concurrent_commands_over_one_transport_lose_no_line(
    sshd_max10: RunningSshd, run: Run
) -> None:
    """50 commands at once against an sshd with MaxSessions 10: queued, none refused,
    every line of every command in order."""
    lines_per_command = 300

    async def body() -> None:
        async with await open_transport(sshd_max10, options=PATIENT) as t:
            outputs: dict[int, list[str]] = {n: [] for n in range(50)}
            errors: dict[int, list[str]] = {n: [] for n in range(50)}

            async def one(n: int) -> int | None:
                outcome = await t.run(
                    f'i=1; while [ $i -le {lines_per_command} ]; do echo "cmd{n} line $i"; '
                    f'i=$((i+1)); done; echo "cmd{n} done" >&2; exit {n % 7}',
                    on_stdout=outputs[n].append,
                    on_stderr=errors[n].append,
                    timeout=60,
                )
                return outcome.exit_code

            codes = await asyncio.gather(*(one(n) for n in range(50)))
            assert codes == [n % 7 for n in range(50)]
            for n in range(50):
                assert outputs[n] == [f"cmd{n} line {i}" for i in range(1, lines_per_command + 1)]
                assert errors[n] == [f"cmd{n} done"]
            assert t.peak_channels <= t.options.max_sessions
            assert t.peak_channels >= 2  # they really ran side by side
            assert t.open_channels == 0

    run(body(), timeout=60)


def test_commands_exiting_without_reading_their_stdin_leave_the_connection_up(
    shared_sshd: RunningSshd, run: Run
) -> None:
    """sshd drops the whole connection when data or EOF names a channel it has freed, so
    stdin still streaming into a command that exited must stop before our CLOSE, never
    after it (before the fix, every round of this lost the connection)."""

    def endless_stdin() -> Iterator[bytes]:
        block = b"x" * 16384  # 64 MB in all: still sending when ``exit 3`` is long gone
        for _ in range(4096):
            yield block

    async def body() -> None:
        async with await open_transport(shared_sshd, options=PATIENT) as t:
            limit = asyncio.Semaphore(20)

            async def one() -> int | None:
                async with limit:
                    outcome = await t.run("exit 3", stdin=endless_stdin(), timeout=30)
                    return outcome.exit_code

            codes = await asyncio.gather(*(one() for _ in range(100)))
            assert codes == [3] * 100
            assert t.is_active
            assert (await t.capture("echo still here")).stdout == ["still here"]

    run(body(), timeout=90)


def test_a_server_disconnect_is_reported_with_its_reason(
    shared_sshd: RunningSshd, run: Run
) -> None:
    async def body() -> None:
        async with await open_transport(shared_sshd) as t:
            # Data for a channel that never existed: sshd disconnects and says why.
            bogus = paramiko.Message()
            bogus.add_byte(cMSG_CHANNEL_DATA)
            bogus.add_int(4242)
            bogus.add_string(b"x")
            t._transport._send_user_message(bogus)
            await wait_for_async(lambda: not t.is_active, 10, what="sshd to drop the connection")
            with pytest.raises(
                SshConnectionLost,
                match=r"follower-1 lost: the server disconnected \(code \d+\): .*channel 4242",
            ):
                await t.run("true")

    run(body())


# --------------------------------------------------------------------------- stopping


@pytest.mark.parametrize("ignore_term", [False, True], ids=["term", "term-ignored"])
def test_timeout_kills_the_remote_processes(
    shared_sshd: RunningSshd, run: Run, pid_files: Callable[[str], Path], ignore_term: bool
) -> None:
    pid_file = pid_files("pids")

    async def body() -> None:
        async with await open_transport(shared_sshd) as t:
            out: list[str] = []
            outcome = await t.run(
                sleeper(pid_file, ignore_term=ignore_term), on_stdout=out.append, timeout=1.5
            )
            assert outcome.timed_out and outcome.exit_code is None and not outcome.cancelled
            assert out == ["started"]
            # The transport is still usable afterwards.
            assert (await t.capture("echo after")).stdout == ["after"]

    run(body())
    pids = read_pids(pid_file)
    assert len(pids) == 3
    wait_for(lambda: all(pid_gone(p) for p in pids), 10, what=f"remote processes {pids} to end")


def test_asyncio_cancel_kills_the_remote_processes(
    shared_sshd: RunningSshd, run: Run, pid_files: Callable[[str], Path]
) -> None:
    pid_file = pid_files("pids")

    async def body() -> None:
        async with await open_transport(shared_sshd) as t:
            started = asyncio.Event()
            task = asyncio.ensure_future(
                t.run(sleeper(pid_file), on_stdout=lambda line: started.set())
            )
            await asyncio.wait_for(started.wait(), 10)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            pids = read_pids(pid_file)
            assert len(pids) == 3
            await wait_for_async(lambda: all(pid_gone(p) for p in pids), 10, what=f"{pids} to end")
            assert t.open_channels == 0

    run(body())


def test_cancel_event_and_failing_callback_stop_the_command(
    shared_sshd: RunningSshd, run: Run, pid_files: Callable[[str], Path]
) -> None:
    async def body() -> None:
        async with await open_transport(shared_sshd) as t:
            pid_file = pid_files("pids-event")
            cancel = asyncio.Event()
            outcome = await t.run(sleeper(pid_file), on_stdout=lambda _: cancel.set(),
                                  cancel=cancel)  # fmt: skip
            assert outcome.cancelled and not outcome.timed_out and outcome.exit_code is None
            pids = read_pids(pid_file)
            await wait_for_async(lambda: all(pid_gone(p) for p in pids), 10, what=f"{pids} to end")

            pid_file = pid_files("pids-callback")

            def explode(line: str) -> None:
                raise RuntimeError(f"callback failed on {line!r}")

            with pytest.raises(RuntimeError, match="callback failed on 'started'"):
                await t.run(sleeper(pid_file), on_stdout=explode)
            pids = read_pids(pid_file)
            await wait_for_async(lambda: all(pid_gone(p) for p in pids), 10, what=f"{pids} to end")

    run(body())


# --------------------------------------------------------------------------- security


def test_host_key_mismatch_names_both_fingerprints(
    shared_sshd: RunningSshd, sshd_max10: RunningSshd, run: Run
) -> None:
    wrong = sshd_max10.host_key_fingerprint
    assert wrong != shared_sshd.host_key_fingerprint

    async def body() -> None:
        with pytest.raises(HostKeyMismatch) as caught:
            await SshTransport.connect(
                shared_sshd.listen,
                shared_sshd.port,
                host="follower-7",
                username=shared_sshd.user,
                key_path=shared_sshd.client_key_path,
                expected_fingerprint=wrong,
                options=FAST,
            )
        message = str(caught.value)
        assert wrong in message
        assert shared_sshd.host_key_fingerprint in message
        assert "follower-7" in message
        assert caught.value.kind == "host-key"

    run(body())


def test_only_public_key_auth_is_used(sshd_factory: SshdFactory, run: Run, tmp_path: Path) -> None:
    sshd = sshd_factory(base_dir=tmp_path / "sshd")
    other_key = tmp_path / "unauthorised_ed25519"
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other_key)],
        check=True,
        stdin=subprocess.DEVNULL,
    )

    async def body() -> None:
        async with await open_transport(sshd) as t:
            assert (await t.capture("true")).outcome.ok
        started = time.monotonic()
        with pytest.raises(SshAuthError) as caught:
            await SshTransport.connect(
                sshd.listen,
                sshd.port,
                host="follower-8",
                username=sshd.user,
                key_path=other_key,
                expected_fingerprint=sshd.host_key_fingerprint,
                options=FAST,
            )
        assert time.monotonic() - started < 10  # fails on the server's answer, no retries
        assert "follower-8" in str(caught.value) and str(other_key) in str(caught.value)
        with pytest.raises(SshAuthError, match="does not exist"):
            await SshTransport.connect(
                sshd.listen,
                sshd.port,
                username=sshd.user,
                key_path=tmp_path / "missing-key",
                expected_fingerprint=sshd.host_key_fingerprint,
            )

    try:
        run(body())
        wait_for(lambda: "Accepted publickey" in sshd.log_text(), 5, what="the accepted login")
        wait_for(lambda: "Failed publickey" in sshd.log_text(), 5, what="the refused key")
        log = sshd.log_text()
        # The server only ever saw public-key requests: no password, no keyboard-interactive.
        methods = set(re.findall(r"(?:Accepted|Failed) (\w[\w-]*) for", log))
        assert methods == {"publickey"}, log
        assert "password" not in log.lower(), log
    finally:
        sshd.stop()


def test_transport_over_a_socket_the_caller_connected(shared_sshd: RunningSshd, run: Run) -> None:
    async def body() -> None:
        sock = socket.create_connection((shared_sshd.listen, shared_sshd.port), timeout=5)
        t = await SshTransport.open(
            sock,
            host="follower-sock",
            username=shared_sshd.user,
            key_path=shared_sshd.client_key_path,
            expected_fingerprint=shared_sshd.host_key_fingerprint,
            options=FAST,
        )
        try:
            assert (await t.capture("echo over-socket")).stdout == ["over-socket"]
        finally:
            await t.close()
        assert not t.is_active
        with pytest.raises(SshConnectionLost, match="closed"):
            await t.run("true")

    run(body())


def test_an_idle_transport_reads_with_a_long_timeout_and_closing_ends_its_thread_at_once(
    shared_sshd: RunningSshd, run: Run
) -> None:
    """paramiko's own 0.1 s read timeout would wake each idle connection's thread ten times
    a second; ours is IDLE_READ_TIMEOUT_S, and close() must not wait that long for the
    thread (it shuts the socket down, which ends the read)."""

    async def body() -> Any:
        t = await open_transport(shared_sshd, host="follower-idle")
        assert (await t.capture("echo up")).stdout == ["up"]
        reader = t._transport  # paramiko's Transport is the reading thread
        assert reader.sock.gettimeout() == IDLE_READ_TIMEOUT_S
        assert reader.is_alive()
        await t.close()
        return reader

    reader = run(body())
    # Well under the read timeout: the thread did not sit out its recv().
    wait_for(lambda: not reader.is_alive(), IDLE_READ_TIMEOUT_S / 2, interval=0.02,
             what="the transport thread to end after close()")  # fmt: skip


def test_connect_refused_is_classified(run: Run) -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    listener.close()  # nothing listens on the port now

    async def body() -> None:
        with pytest.raises(SshConnectError) as caught:
            await SshTransport.connect(
                "127.0.0.1",
                port,
                host="follower-9",
                username="nobody",
                key_path="/nonexistent",
                expected_fingerprint="SHA256:" + "A" * 43,
            )
        assert caught.value.kind == "refused" and "follower-9" in str(caught.value)

    run(body())


# --------------------------------------------------------------------------- liveness


def test_probe_reports_uname_and_uid(shared_sshd: RunningSshd, run: Run) -> None:
    async def body() -> None:
        async with await open_transport(shared_sshd) as t:
            result = await t.probe()
            assert result.ok, result.error
            assert result.uname is not None and result.uname.startswith(os.uname().sysname)
            assert os.uname().nodename in result.uname
            assert result.uid == os.getuid()
            assert result.rtt_ms is not None and result.rtt_ms > 0
            assert result.error is None

    run(body())


@pytest.fixture
def private_sshd(sshd_factory: SshdFactory, tmp_path: Path) -> Iterator[RunningSshd]:
    running = sshd_factory(base_dir=tmp_path / "sshd")
    try:
        yield running
    finally:
        running.stop()


def test_killed_peer_fails_running_and_new_commands(
    private_sshd: RunningSshd, run: Run, pid_files: Callable[[str], Path]
) -> None:
    async def body() -> None:
        t = await open_transport(private_sshd)
        try:
            started = asyncio.Event()
            task = asyncio.ensure_future(
                t.run(sleeper(pid_files("pids")), on_stdout=lambda _: started.set())
            )
            await asyncio.wait_for(started.wait(), 10)
            private_sshd.process.kill()  # SIGKILL sshd and every session it started
            with pytest.raises(SshConnectionLost, match="follower-1"):
                await asyncio.wait_for(task, 10)
            with pytest.raises(SshConnectionLost):
                await t.run("true")
            assert not t.is_active
            probe = await t.probe()
            assert not probe.ok and probe.error is not None and "lost" in probe.error
        finally:
            await t.close()

    run(body())


def test_paused_peer_is_declared_lost_by_keepalive(
    private_sshd: RunningSshd, run: Run, pid_files: Callable[[str], Path]
) -> None:
    options = SshOptions(keepalive_interval_s=0.2, keepalive_timeout_s=1.0, kill_grace_s=0.5)
    # The connection is gone, so nobody can stop this command remotely: pid_files reaps it.
    pid_file = pid_files("pids")

    async def body() -> None:
        t = await open_transport(private_sshd, options=options)
        try:
            assert (await t.capture("true")).outcome.ok
            task = asyncio.ensure_future(t.run(f"sleep 1000 & echo $! > {pid_file}; wait"))
            await wait_for_async(lambda: read_pids(pid_file), 10, what="the command to start")
            private_sshd.pause()  # SIGSTOP: the TCP connection stays up but nothing answers
            with pytest.raises(SshConnectionLost, match="keepalive"):
                await asyncio.wait_for(task, 10)
            with pytest.raises(SshConnectionLost, match="keepalive"):
                await t.run("true")
        finally:
            private_sshd.resume()
            await t.close()

    run(body())


def test_a_peer_gone_quiet_under_a_command_is_found_by_a_liveness_check_not_the_keepalive(
    private_sshd: RunningSshd, run: Run
) -> None:
    # Keepalive every 60 s (then 30 s to answer): only the liveness check, sent when a
    # command has run 0.2 s with no sign of life, can find the paused peer in time.
    options = SshOptions(
        keepalive_interval_s=60.0,
        keepalive_timeout_s=30.0,
        connect_timeout_s=2.0,
        liveness_quiet_s=0.2,
        kill_grace_s=0.5,
    )

    async def body() -> None:
        t = await open_transport(private_sshd, options=options)
        try:
            # Warm commands: frames on a channel already open, so nothing but the check
            # notices the silence (an exec command's own channel open times out instead).
            # A live server answers the check: a command longer than the quiet time is fine.
            out: list[str] = []
            slow = await t.run(
                "unused",
                on_stdout=out.append,
                warm=WarmCommand(shell="bash", script="sleep 1; echo slow"),
            )
            assert slow.exit_code == 0 and out == ["slow"]
            private_sshd.pause()  # SIGSTOP: the TCP connection stays up but nothing answers
            began = time.monotonic()
            with pytest.raises(SshConnectionLost, match=r"no answer to a liveness check within 2s"):
                await asyncio.wait_for(
                    t.run("unused", warm=WarmCommand(shell="bash", argv=("echo", "never"))), 20
                )
            assert time.monotonic() - began < 15  # the keepalive would take 60 + 30 s
        finally:
            private_sshd.resume()
            await t.close()

    run(body())


def test_probe_of_a_paused_peer_answers_at_its_deadline(
    private_sshd: RunningSshd, run: Run
) -> None:
    """Without keepalives, opening the probe's channel alone would block for
    connect_timeout_s (10 s); the probe still answers at its own 0.5 s deadline."""
    options = SshOptions(keepalive_interval_s=0, kill_grace_s=0.5)

    async def body() -> None:
        async with await open_transport(private_sshd, options=options) as t:
            assert (await t.probe()).ok
            private_sshd.pause()
            try:
                result = await asyncio.wait_for(t.probe(timeout=0.5), 5)
                assert not result.ok and result.error is not None
                assert "timed out after 0.5s" in result.error
            finally:
                private_sshd.resume()
            after = await t.probe(timeout=10)
            assert after.ok, after.error

    run(body())


# --------------------------------------------------------------------------- sftp, pool


def test_sftp_fetches_a_file(shared_sshd: RunningSshd, run: Run, tmp_path: Path) -> None:
    remote = tmp_path / "remote.bin"
    remote.write_bytes(os.urandom(100_000))
    local = tmp_path / "local.bin"

    async def body() -> None:
        async with await open_transport(shared_sshd) as t, t.sftp() as sftp:
            await asyncio.to_thread(sftp.get, str(remote), str(local))

    run(body())
    assert local.read_bytes() == remote.read_bytes()


def test_pool_dials_each_follower_once_and_reuses_it(
    shared_sshd: RunningSshd, sshd_max10: RunningSshd, run: Run
) -> None:
    servers = {"alpha": shared_sshd, "beta": sshd_max10}
    dialled: list[str] = []

    async def dial(name: str) -> socket.socket:
        dialled.append(name)
        server = servers[name]
        return await asyncio.to_thread(socket.create_connection, (server.listen, server.port), 5)

    async def body() -> None:
        assert shared_sshd.client_key_path.read_bytes() != sshd_max10.client_key_path.read_bytes()
        async with SshPool(
            dial,
            username=shared_sshd.user,
            key_path=shared_sshd.client_key_path,
            fingerprint={n: s.host_key_fingerprint for n, s in servers.items()},
            options=FAST,
        ) as pool:
            results = await asyncio.gather(*(pool.capture("alpha", f"echo {n}") for n in range(5)))
            assert [r.stdout for r in results] == [[str(n)] for n in range(5)]
            assert dialled == ["alpha"]
            assert (await pool.probe("alpha")).ok
            # beta only authorises its own client key: the pool's key is refused there.
            beta = await pool.probe("beta")
            assert not beta.ok and beta.error is not None and "rejected" in beta.error
            assert pool.names == ["alpha"]
            await pool.discard("alpha")
            assert (await pool.capture("alpha", "echo again")).stdout == ["again"]
            assert dialled == ["alpha", "beta", "alpha"]
        with pytest.raises(SshConnectionLost, match="pool is closed"):
            await pool.get("alpha")

    run(body())


# --------------------------------------------------------------------------- bulk


def test_bulk_upload_through_cat(shared_sshd: RunningSshd, run: Run) -> None:
    """200 MB of stdin into ``cat > /dev/null``; throughput is printed, not asserted."""
    total = 200 * 1024 * 1024
    block = os.urandom(1024 * 1024)

    async def body() -> None:
        async with await open_transport(shared_sshd) as t:
            started = time.monotonic()
            result = await t.capture(
                "cat > /dev/null; echo done", stdin=(block for _ in range(total // len(block)))
            )
            seconds = time.monotonic() - started
            assert result.outcome.exit_code == 0 and result.stdout == ["done"]
            print(f"\nbulk: {total / seconds / 1e6:.1f} MB/s over {t.cipher} ({seconds:.2f} s)")

    run(body(), timeout=90)
