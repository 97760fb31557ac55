"""How the warm server starts commands, on every path it has (real sshd, real processes):
``posix_spawn`` (Python 3.8+), ``subprocess.Popen`` (forced by ``AH_WARM_PLAIN=spawn`` in the
login environment) and Popen on a Python 3.6 follower. Each must give a command the same
world: its argv byte for byte, its env and PATH, its cwd, its own process group, only 0/1/2,
default SIGPIPE, and the shell's errors when it cannot start. And how the server notices a
login-file edit: inotify once idle, stat'ing every file without it (``AH_WARM_PLAIN=watch``)."""

from __future__ import annotations

import asyncio
import contextlib
import glob
import os
import shlex
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from ssh_bridge_support import open_transport, pid_gone, read_pids, sleeper

from ah_harness_local import RunningSshd, wait_for_async
from ah_harness_local.pytest_plugin import SshdFactory
from ah_ssh_bridge import SshTransport, WarmCommand

Run = Callable[..., Any]

NOT_WARM = "echo 'ran on an exec channel, not the warm executor' >&2; exit 99"

PY36 = sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.6.*/bin/python3.6")))


def sh(script: str, **kwargs: Any) -> WarmCommand:
    return WarmCommand(shell="bash", script=script, **kwargs)


def argv(*words: str, **kwargs: Any) -> WarmCommand:
    return WarmCommand(shell="bash", argv=words, **kwargs)


@dataclass
class Follower:
    sshd: RunningSshd
    flavor: str
    home: Path
    server_bin: Path
    """A directory in the server's own (login) PATH, in no command's explicit PATH."""
    work: Path


def _profile(follower_dir: Path, flavor: str) -> tuple[str, Path]:
    server_bin = follower_dir / "server-bin"
    server_bin.mkdir()
    lines = [
        f"export PATH={shlex.quote(str(server_bin))}:$PATH",
        # A descriptor the login shell leaves open (not close-on-exec) in the server: no
        # command may inherit it.
        "exec 7</dev/null",
        # SIGCHLD ignored is inherited through exec: the server must not let the kernel
        # reap its children (their exit status would be lost).
        "trap '' CHLD",
    ]
    if flavor == "popen":
        lines.append("export AH_WARM_PLAIN=spawn")
    elif flavor == "python3.6":
        (server_bin / "python3").symlink_to(PY36[0])
    return "\n".join(lines) + "\n", server_bin


@pytest.fixture(
    params=[
        "posix_spawn",
        "popen",
        pytest.param(
            "python3.6",
            marks=pytest.mark.skipif(
                not PY36,
                # RHEL 8's platform python is 3.6; this machine's pyenv has one (so CI runs
                # this), a developer machine without one cannot check it here.
                reason="no Python 3.6 interpreter on this machine",
            ),
        ),
    ]
)
def follower(
    request: pytest.FixtureRequest, sshd_factory: SshdFactory, tmp_path: Path
) -> Iterator[Follower]:
    flavor: str = request.param
    running = sshd_factory(base_dir=tmp_path / "sshd")
    try:
        home = running.home_dir
        assert home is not None
        profile, server_bin = _profile(tmp_path, flavor)
        (home / ".profile").write_text(profile)
        work = tmp_path / "work"
        work.mkdir()
        yield Follower(running, flavor, home, server_bin, work)
    finally:
        running.stop()


def hello(t: SshTransport) -> dict[str, object]:
    server = t._warm  # the greeting is not public API; the tests must know the path taken
    assert server is not None and server.hello is not None
    return server.hello


def expect_flavor(t: SshTransport, flavor: str) -> None:
    greeting = hello(t)
    if flavor == "posix_spawn":
        assert greeting["spawn"] == "posix_spawn"
    elif flavor == "popen":
        assert greeting["spawn"] == "popen"
    else:
        assert str(greeting["python"]).startswith("3.6.") and greeting["spawn"] == "popen"


def tool(directory: Path, name: str, body: str, mode: int = 0o755) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text(body)
    path.chmod(mode)
    return path


async def run_warm(
    t: SshTransport, command: WarmCommand, **kwargs: Any
) -> tuple[Any, list[str], list[str]]:
    out: list[str] = []
    err: list[str] = []
    outcome = await t.run(
        NOT_WARM, on_stdout=out.append, on_stderr=err.append, warm=command, **kwargs
    )
    return outcome, out, err


# Printed by a Python that may be 3.6: every argument as hex of its bytes.
SHOW_ARGS = "import os, sys; print(' '.join(os.fsencode(a).hex() for a in sys.argv[1:]))"
TRICKY_ARGS = (
    "",
    "two words",
    'it\'s "quoted"',
    "$HOME `id` $(id) *",
    "line\nbreak\ttab",
    "-c",
    "ünïcødé ✓",
    "\udcff\udcfe raw bytes",  # not UTF-8 on the wire: surrogate escapes, bytes on exec
    "trailing backslash \\",
)


def test_commands_get_their_argv_env_path_and_cwd(follower: Follower, run: Run) -> None:
    work = follower.work
    tool(follower.server_bin, "ah-server-only-tool", "#!/bin/sh\necho server path\n")
    early = work / "early-bin"
    late = work / "late-bin"
    tool(early, "ah-layered", "#!/bin/sh\necho not executable\n", mode=0o644)
    (early / "ah-dir-named").mkdir()
    tool(late, "ah-layered", '#!/bin/sh\necho "late in $(pwd) with [$GREETING] [$OTHER]"\n')
    tool(late, "ah-dir-named", "#!/bin/sh\necho the file, not the directory\n")
    tool(early, "ah-only-unrunnable", "#!/bin/sh\necho never\n", mode=0o644)
    only_env = work / "env-bin"
    tool(only_env, "ah-env-path-tool", "#!/bin/sh\necho found through the command PATH\n")
    (work / "a-file").write_text("")

    async def body() -> None:
        async with await open_transport(follower.sshd) as t:
            # The server's own directory: where a command without cwd runs, before and after
            # commands that had one.
            outcome, home_pwd, _ = await run_warm(t, argv("pwd"))
            assert outcome.exit_code == 0 and len(home_pwd) == 1
            expect_flavor(t, follower.flavor)
            pid = t.warm_server_pid

            # argv reaches the program byte for byte.
            outcome, out, err = await run_warm(t, argv("python3", "-c", SHOW_ARGS, *TRICKY_ARGS))
            assert (outcome.exit_code, err) == (0, [])
            expected = " ".join(os.fsencode(a).hex() for a in TRICKY_ARGS)
            assert out == [expected]

            # env (the command's and the transport's) and pathPrepend; the PATH search
            # passes over a non-executable file and a directory of the same name.
            outcome, out, err = await run_warm(
                t,
                argv(
                    "ah-layered",
                    env={"GREETING": "hi there"},
                    path_prepend=(str(early), str(late)),
                    cwd=str(work),
                ),
                env={"OTHER": "x y"},
            )
            assert (outcome.exit_code, out, err) == (
                0,
                [f"late in {work} with [hi there] [x y]"],
                [],
            )
            outcome, out, _ = await run_warm(
                t, argv("ah-dir-named", path_prepend=(str(early), str(late)))
            )
            assert (outcome.exit_code, out) == (0, ["the file, not the directory"])
            # The PATH searched is the command's: its own PATH finds what the server's does
            # not, and what only the server's PATH has is not found.
            outcome, out, _ = await run_warm(
                t, argv("ah-env-path-tool", env={"PATH": str(only_env)})
            )
            assert (outcome.exit_code, out) == (0, ["found through the command PATH"])
            outcome, out, _ = await run_warm(t, argv("ah-server-only-tool"))
            assert (outcome.exit_code, out) == (0, ["server path"])
            outcome, _, err = await run_warm(
                t, argv("ah-server-only-tool", env={"PATH": "/usr/bin:/bin"})
            )
            assert (outcome.exit_code, err) == (
                127,
                ["ah-warm-exec: ah-server-only-tool: command not found"],
            )

            # What the shell would say when the command cannot start.
            outcome, _, err = await run_warm(t, argv("ah-no-such-tool-x"))
            assert (outcome.exit_code, err) == (
                127,
                ["ah-warm-exec: ah-no-such-tool-x: command not found"],
            )
            outcome, _, err = await run_warm(
                t, argv("ah-only-unrunnable", path_prepend=(str(early),))
            )
            assert (outcome.exit_code, err) == (
                126,
                ["ah-warm-exec: ah-only-unrunnable: Permission denied"],
            )
            unrunnable = str(early / "ah-layered")
            outcome, _, err = await run_warm(t, argv(unrunnable))
            assert (outcome.exit_code, err) == (
                126,
                [f"ah-warm-exec: {unrunnable}: Permission denied"],
            )
            missing = str(work / "missing")
            outcome, _, err = await run_warm(t, argv("true", cwd=missing))
            assert (outcome.exit_code, err) == (
                1,
                [f"ah-warm-exec: cd: {missing}: No such file or directory"],
            )
            not_dir = str(work / "a-file")
            outcome, _, err = await run_warm(t, sh("true", cwd=not_dir))
            assert (outcome.exit_code, err) == (
                1,
                [f"ah-warm-exec: cd: {not_dir}: Not a directory"],
            )

            # cwd applies to scripts too; the server itself stayed where it was.
            outcome, out, _ = await run_warm(t, sh("pwd; cd /; pwd", cwd=str(work)))
            assert (outcome.exit_code, out) == (0, [str(work), "/"])
            outcome, out, _ = await run_warm(t, argv("pwd"))
            assert (outcome.exit_code, out) == (0, home_pwd)
            assert t.warm_server_pid == pid  # all of it on the one server

    run(body(), timeout=60)


def test_commands_get_a_clean_process(follower: Follower, run: Run) -> None:
    """Own session and process group, only 0/1/2, default SIGPIPE, stdin as asked."""
    inspect = (
        "import os\n"
        "fds = sorted(int(n) for n in os.listdir('/proc/self/fd'))\n"  # includes the listing's
        "print('fds', ' '.join(map(str, fds[:-1])))\n"
        "print('session', os.getsid(0) == os.getpid(), os.getpgid(0) == os.getpid())\n"
        "print('stdin', os.readlink('/proc/self/fd/0'))\n"
    )

    async def body() -> None:
        async with await open_transport(follower.sshd) as t:
            outcome, out, err = await run_warm(t, argv("python3", "-I", "-c", inspect))
            assert (outcome.exit_code, err) == (0, [])
            expect_flavor(t, follower.flavor)
            # The point of the fd check: the server does hold the profile's descriptor 7.
            server = t.warm_server_pid
            assert server is not None
            assert os.readlink(f"/proc/{server}/fd/7") == "/dev/null"
            assert out == ["fds 0 1 2", "session True True", "stdin /dev/null"]
            # A pipeline's writer dies of SIGPIPE (141), it does not see EPIPE (an ignored
            # SIGPIPE would be inherited through exec).
            outcome, out, _ = await run_warm(t, sh('yes | head -n 1; echo "${PIPESTATUS[0]}"'))
            assert (outcome.exit_code, out) == (0, ["y", "141"])
            # stdin as a pipe: passed and closed.
            outcome, out, _ = await run_warm(t, argv("cat"), stdin=[b"a\nb", b"c\n"])
            assert (outcome.exit_code, out) == (0, ["a", "bc"])
            outcome, out, _ = await run_warm(
                t, sh("head -c 3; echo; cat >/dev/null; echo done"), stdin=[b"x" * 300_000]
            )
            assert (outcome.exit_code, out) == (0, ["xxx", "done"])
            # Killed by a signal: no exit status.
            outcome, _, _ = await run_warm(t, sh("kill -KILL $$"))
            assert outcome.exit_code is None and not outcome.timed_out

    run(body(), timeout=60)


def test_timeout_and_cancel_kill_the_whole_group(
    follower: Follower, run: Run, pid_files: Callable[[str], Path]
) -> None:
    by_timeout = pid_files("timeout")
    by_cancel = pid_files("cancel")

    async def body() -> None:
        async with await open_transport(follower.sshd) as t:
            out: list[str] = []
            outcome = await t.run(
                NOT_WARM,
                on_stdout=out.append,
                timeout=1.5,
                warm=sh(sleeper(by_timeout, ignore_term=True), cwd=str(follower.work)),
            )
            assert outcome.timed_out and outcome.exit_code is None and out == ["started"]
            expect_flavor(t, follower.flavor)
            cancel = asyncio.Event()
            outcome = await asyncio.wait_for(
                t.run(
                    NOT_WARM,
                    on_stdout=lambda _: cancel.set(),
                    cancel=cancel,
                    warm=sh(sleeper(by_cancel)),
                ),
                20,
            )
            assert outcome.cancelled and outcome.exit_code is None
            pids = read_pids(by_timeout) + read_pids(by_cancel)
            assert len(pids) == 6
            await wait_for_async(lambda: all(pid_gone(p) for p in pids), 10, what=f"{pids} to end")
            _, after, _ = await run_warm(t, argv("echo", "after"))
            assert after == ["after"]

    run(body(), timeout=60)


def _pidfds(pid: int) -> int:
    count = 0
    for name in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            count += os.readlink(f"/proc/{pid}/fd/{name}") == "anon_inode:[pidfd]"
    return count


def test_a_command_that_closes_its_output_is_still_waited_for(
    follower: Follower, run: Run, tmp_path: Path, pid_files: Callable[[str], Path]
) -> None:
    """Its end is not its output's end: the server waits for the process itself (a pidfd,
    or SIGCHLD where there are none), to exit or to be killed."""
    gate = tmp_path / "gate"
    pid_file = pid_files("closer")
    closer = (
        f"echo $$ > {pid_file}; exec >&- 2>&-; while [ ! -e {gate} ]; do sleep 0.02; done; exit 3"
    )

    async def body() -> None:
        async with await open_transport(follower.sshd) as t:
            await run_warm(t, argv("true"))
            expect_flavor(t, follower.flavor)
            server = t.warm_server_pid
            assert server is not None
            pidfd = follower.flavor != "python3.6"
            task = asyncio.ensure_future(run_warm(t, sh(closer)))
            await wait_for_async(lambda: read_pids(pid_file), 10, what="the command to start")
            if pidfd:
                await wait_for_async(lambda: _pidfds(server) == 1, 10, what="the server's pidfd")
            assert not task.done()
            gate.write_text("")
            outcome, out, err = await asyncio.wait_for(task, 10)
            assert (outcome.exit_code, out, err) == (3, [], [])
            assert _pidfds(server) == 0
            # Killed at its timeout while its output is closed.
            gate.unlink()
            pid_file.unlink()
            outcome, _, _ = await run_warm(t, sh(closer), timeout=1.0)
            assert outcome.timed_out and outcome.exit_code is None
            pids = read_pids(pid_file)
            assert len(pids) == 1
            await wait_for_async(lambda: pid_gone(pids[0]), 10, what="the command to end")
            assert _pidfds(server) == 0

    run(body(), timeout=60)


# --------------------------------------------------------------------------- login files


def _inotify_fds(pid: int) -> list[str]:
    found = []
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{name}") == "anon_inode:inotify":
                found.append(name)
        except OSError:
            pass
    return found


@pytest.fixture
def plain_sshd(sshd_factory: SshdFactory, tmp_path: Path) -> Iterator[RunningSshd]:
    running = sshd_factory(base_dir=tmp_path / "sshd")
    try:
        yield running
    finally:
        running.stop()


async def _mark(t: SshTransport) -> str:
    _, out, _ = await run_warm(t, sh('echo "[$AH_PROFILE_MARK]"'))
    return out[0]


@pytest.mark.parametrize("watch", ["inotify", "stat"])
def test_login_file_changes_are_seen_with_and_without_inotify(
    plain_sshd: RunningSshd, run: Run, tmp_path: Path, watch: str
) -> None:
    home = plain_sshd.home_dir
    assert home is not None
    plain = "" if watch == "inotify" else "export AH_WARM_PLAIN=watch\n"
    # ~/.profile is a symlink (as dotfile managers make it): its target is elsewhere.
    dotfiles = tmp_path / "dotfiles"
    dotfiles.mkdir()
    (dotfiles / "profile").write_text(plain)
    (home / ".profile").unlink()
    (home / ".profile").symlink_to(dotfiles / "profile")

    async def body() -> None:
        async with await open_transport(plain_sshd) as t:
            assert await _mark(t) == "[]"
            first = t.warm_server_pid
            assert first is not None
            if watch == "inotify":
                # Set up on the server's first idle moment.
                await wait_for_async(
                    lambda: _inotify_fds(first), 10, what="the server's inotify watch"
                )
            else:
                assert not _inotify_fds(first)
            # A file the server does not care about changes nothing.
            (home / "unrelated.txt").write_text("x")
            assert await _mark(t) == "[]"
            assert t.warm_server_pid == first
            # An edit through the symlink (its target is not in a watched directory).
            (dotfiles / "profile").write_text(plain + "export AH_PROFILE_MARK=one\n")
            assert await _mark(t) == "[one]"
            second = t.warm_server_pid
            assert second not in (None, first)
            if watch == "inotify":
                await wait_for_async(lambda: _inotify_fds(second), 10, what="the new watch")
            # A login file that did not exist appears (bash -l reads it instead of .profile).
            (home / ".bash_profile").write_text(plain + "export AH_PROFILE_MARK=two\n")
            assert await _mark(t) == "[two]"
            third = t.warm_server_pid
            assert third not in (None, first, second)
            if watch == "inotify":
                await wait_for_async(lambda: _inotify_fds(third), 10, what="the third watch")
            # Replaced by rename, as editors save.
            (home / ".bash_profile.new").write_text(plain + "export AH_PROFILE_MARK=three\n")
            os.replace(home / ".bash_profile.new", home / ".bash_profile")
            assert await _mark(t) == "[three]"
            assert t.warm_server_pid not in (None, first, second, third)

    run(body(), timeout=60)


def test_a_profile_edit_while_commands_run_retires_the_server_after_them(
    plain_sshd: RunningSshd, run: Run, tmp_path: Path
) -> None:
    home = plain_sshd.home_dir
    assert home is not None
    profile = home / ".profile"
    gate = tmp_path / "gate"

    async def body() -> None:
        async with await open_transport(plain_sshd) as t:
            assert await _mark(t) == "[]"
            first = t.warm_server_pid
            assert first is not None
            await wait_for_async(lambda: _inotify_fds(first), 10, what="the server's inotify watch")
            started = asyncio.Event()
            out: list[str] = []

            def line(text: str) -> None:
                out.append(text)
                started.set()

            running = asyncio.ensure_future(
                t.run(
                    NOT_WARM,
                    on_stdout=line,
                    warm=sh(
                        f'echo go; while [ ! -e {gate} ]; do sleep 0.02; done; echo "[$AH_PROFILE_MARK]"'
                    ),
                )
            )
            await asyncio.wait_for(started.wait(), 10)
            profile.write_text(profile.read_text() + "export AH_PROFILE_MARK=edited\n")
            assert await _mark(t) == "[edited]"  # a fresh server took it
            assert t.warm_server_pid not in (None, first)
            assert not pid_gone(first)  # the old one still runs its command
            gate.write_text("")
            outcome = await asyncio.wait_for(running, 20)
            # The old one finished what it had, in the old environment, then exited.
            assert outcome.exit_code == 0 and out == ["go", "[]"]
            await wait_for_async(lambda: pid_gone(first), 10, what="the retired server to exit")

    run(body(), timeout=60)


def test_a_command_cwd_never_moves_the_server(plain_sshd: RunningSshd, run: Run) -> None:
    """The server enters a command's cwd around the spawn and comes back: a command without
    cwd runs where the server started, whatever the one before it asked for (even a cwd
    that failed)."""

    async def body() -> None:
        async with await open_transport(plain_sshd) as t:
            _, home_pwd, _ = await run_warm(t, argv("pwd"))
            assert len(home_pwd) == 1
            for cwd in ("/", "/proc/self", "/tmp", "/nonexistent", "/etc/passwd"):
                outcome, out, _ = await run_warm(t, argv("pwd", cwd=cwd))
                assert outcome.exit_code == (1 if cwd in ("/nonexistent", "/etc/passwd") else 0)
                _, out, _ = await run_warm(t, argv("pwd"))
                assert out == home_pwd, cwd

    run(body(), timeout=60)


def test_waits_leave_nothing_behind(plain_sshd: RunningSshd, run: Run) -> None:
    """Many short commands at once: every one reaped (no zombie left under the server)."""

    async def body() -> None:
        async with await open_transport(plain_sshd) as t:
            results = await asyncio.gather(
                *(run_warm(t, argv("sh", "-c", f"exit {n % 5}")) for n in range(40))
            )
            assert [r[0].exit_code for r in results] == [n % 5 for n in range(40)]
            server = t.warm_server_pid
            assert server is not None

            def children() -> list[str]:
                found = []
                for name in os.listdir("/proc"):
                    if name.isdigit():
                        try:
                            stat = Path(f"/proc/{name}/stat").read_text()
                        except OSError:
                            continue
                        if int(stat[stat.rfind(")") + 2 :].split()[1]) == server:
                            found.append(name)
                return found

            await wait_for_async(lambda: not children(), 10, what="no children left")

    run(body(), timeout=60)
