"""Real OpenSSH servers: login, refused auth, host-key pinning, parallel start, stop, pause."""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

from ah_harness_local import (
    ManagedProcess,
    ProcessGroup,
    RunningSshd,
    free_tcp_port,
    start_many_sshd,
    start_sshd,
    tcp_accepts,
    wait_for,
)
from ah_harness_local.pytest_plugin import SshdFactory

SSH = shutil.which("ssh") or "ssh"
SSH_KEYGEN = shutil.which("ssh-keygen") or "ssh-keygen"


def _ssh(argv: list[str], timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
    )


def _pid_gone(pid: int) -> bool:
    """Gone means no such process, or a zombie nobody has reaped yet."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat[stat.rfind(")") + 2] in "ZX"


def test_real_ssh_runs_a_command(sshd: RunningSshd) -> None:
    result = _ssh(sshd.ssh_command("echo", "hello"))
    assert result.returncode == 0, result.stderr
    assert result.stdout == "hello\n"
    assert sshd.process.is_running


def test_sessions_get_a_private_home_and_no_heavy_rc_files(sshd: RunningSshd) -> None:
    assert sshd.home_dir is not None
    result = sshd.run('printf "%s\\n%s\\n" "$HOME" "$PATH"')
    assert result.returncode == 0, result.stderr
    home, path = result.stdout.splitlines()
    assert Path(home) == sshd.home_dir
    assert ".pyenv" not in path  # what the real root ~/.bashrc on this machine would add
    # Debian's bash reads $HOME/.bashrc for ssh commands (SSH_SOURCE_BASHRC): it is the
    # private one that gets read, so the real one is not.
    (sshd.home_dir / ".bashrc").write_text("echo from-private-bashrc\n")
    result = sshd.run("echo", "body")
    assert result.returncode == 0, result.stderr
    if Path("/etc/debian_version").exists():
        assert result.stdout == "from-private-bashrc\nbody\n"
    else:
        assert result.stdout.endswith("body\n")


def test_password_authentication_is_refused(sshd: RunningSshd) -> None:
    base = [
        SSH, "-v", "-F", "/dev/null",
        "-o", "StrictHostKeyChecking=yes",
        "-o", f"UserKnownHostsFile={sshd.known_hosts_path}",
        "-o", "BatchMode=yes",
        "-o", "ConnectTimeout=10",
        "-p", str(sshd.port),
    ]  # fmt: skip
    refused = _ssh([*base, "-o", "PreferredAuthentications=password", sshd.destination, "true"])
    assert refused.returncode == 255
    assert "Permission denied" in refused.stderr
    offered = re.findall(r"Authentications that can continue: (\S+)", refused.stderr)
    assert offered, refused.stderr
    assert all("password" not in methods.split(",") for methods in offered)
    assert all("keyboard-interactive" not in methods.split(",") for methods in offered)
    # Control: the same client with the key does get in, so the refusal is about passwords.
    accepted = _ssh([*base, "-i", str(sshd.client_key_path), sshd.destination, "true"])
    assert accepted.returncode == 0, accepted.stderr


def test_a_wrong_or_unknown_host_key_is_refused(sshd: RunningSshd, tmp_path: Path) -> None:
    impostor = tmp_path / "impostor_key"
    subprocess.run([SSH_KEYGEN, "-q", "-t", "ed25519", "-N", "", "-f", impostor], check=True)
    line = sshd.known_hosts_path.read_text().split()[0]
    wrong = tmp_path / "known_hosts_wrong"
    wrong.write_text(f"{line} {impostor.with_suffix('.pub').read_text()}")
    empty = tmp_path / "known_hosts_empty"
    empty.write_text("")

    def attempt(known_hosts: Path) -> subprocess.CompletedProcess[str]:
        argv = sshd.ssh_command("echo", "got-in")
        argv = [a.replace(str(sshd.known_hosts_path), str(known_hosts)) for a in argv]
        return _ssh(argv)

    changed = attempt(wrong)
    assert changed.returncode == 255
    assert "got-in" not in changed.stdout
    assert "Host key verification failed" in changed.stderr
    unknown = attempt(empty)
    assert unknown.returncode == 255
    assert "got-in" not in unknown.stdout
    assert "Host key verification failed" in unknown.stderr
    assert attempt(sshd.known_hosts_path).stdout == "got-in\n"


def test_fingerprint_matches_ssh_keygen_and_the_key_the_server_presents(
    sshd: RunningSshd,
) -> None:
    listed = subprocess.run(
        [SSH_KEYGEN, "-lf", f"{sshd.host_key_path}.pub"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert listed[1] == sshd.host_key_fingerprint
    assert sshd.host_key_fingerprint.startswith("SHA256:")
    assert (
        sshd.host_public_key.split()[:2]
        == Path(f"{sshd.host_key_path}.pub").read_text().split()[:2]
    )
    verbose = _ssh([SSH, "-v", *sshd.ssh_command("true")[1:]])
    assert verbose.returncode == 0, verbose.stderr
    presented = re.search(r"Server host key: ssh-ed25519 (SHA256:\S+)", verbose.stderr)
    assert presented is not None, verbose.stderr
    assert presented.group(1) == sshd.host_key_fingerprint
    # fast_kex: the post-quantum exchange is off, curve25519 is what gets negotiated.
    assert "kex: algorithm: curve25519-sha256" in verbose.stderr


def test_four_start_in_parallel_and_each_answers(tmp_path: Path) -> None:
    with ProcessGroup(tmp_path) as group:
        fleet = start_many_sshd(tmp_path / "fleet", 4, group=group)
        assert len(fleet) == 4
        assert len({s.port for s in fleet}) == 4
        assert len({s.host_key_fingerprint for s in fleet}) == 4
        for server in fleet:
            result = server.run('echo "$HOME"')
            assert result.returncode == 0, result.stderr
            assert Path(result.stdout.strip()) == server.home_dir
        # Keys are per instance: one server's client key does not open another.
        crossed = fleet[0].ssh_command("true")
        crossed[crossed.index(str(fleet[0].client_key_path))] = str(fleet[1].client_key_path)
        assert _ssh(crossed).returncode == 255
    for server in fleet:
        assert _pid_gone(server.pid)


def test_stop_leaves_no_process_and_frees_the_port(tmp_path: Path) -> None:
    with ProcessGroup(tmp_path) as group:
        server = start_sshd(tmp_path / "sshd", group=group)
        # A session that is still running when sshd stops: sshd detaches it (setsid), so
        # only the tree walk can find it.
        session = group.start(server.ssh_command("sleep", "300"), name="ssh-session")
        wait_for(
            lambda: any("sleep 300" in _cmdline(pid) for pid in server.process.tree_pids()),
            10,
            what="the remote sleep to start under sshd",
        )
        tree = server.process.tree_pids()
        assert len(tree) >= 3, tree  # listener, per-connection sshd(s), the shell's sleep
        server.stop()
        assert not server.is_running
        for pid in tree:
            assert _pid_gone(pid), f"pid {pid} ({_cmdline(pid)}) survived stop()"
        wait_for(lambda: not session.is_running, 10, what="the ssh client to see the hang-up")
    assert not tcp_accepts(server.listen, server.port)
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((server.listen, server.port))
    server.stop()  # idempotent


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except FileNotFoundError:
        return ""


def test_a_paused_sshd_does_not_answer_until_resumed(sshd: RunningSshd) -> None:
    assert sshd.login_works(timeout=30)
    sshd.pause()
    try:
        with pytest.raises(TimeoutError, match="paused sshd to answer"):
            wait_for(lambda: sshd.login_works(timeout=1.0), 2.0, what="the paused sshd to answer")
    finally:
        sshd.resume()
    wait_for(sshd.login_works, 15, what="the resumed sshd to answer")


def test_an_explicit_port_that_is_taken_fails_loudly(tmp_path: Path) -> None:
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        with pytest.raises(RuntimeError, match=rf"127\.0\.0\.1:{port}.*exited"):
            start_sshd(tmp_path / "sshd", port=port, timeout=15)


def test_restart_keeps_the_host_key(tmp_path: Path) -> None:
    port = free_tcp_port()
    first = start_sshd(tmp_path / "sshd", port=port)
    fingerprint = first.host_key_fingerprint
    first.stop()
    second = start_sshd(tmp_path / "sshd", port=port)
    try:
        assert second.host_key_fingerprint == fingerprint
        assert second.run("echo", "again").stdout == "again\n"
    finally:
        second.stop()


def test_sshd_factory_owns_what_it_starts(sshd_factory: SshdFactory) -> None:
    pair = sshd_factory.many(2)
    single = sshd_factory()
    for server in [*pair, single]:
        assert server in sshd_factory.instances
        assert server.run("echo", "ok").stdout == "ok\n"
        server.stop()
        assert _pid_gone(server.pid)


def test_managed_sshd_log_names_the_listener(sshd: RunningSshd) -> None:
    assert f"Server listening on 127.0.0.1 port {sshd.port}" in sshd.log_text()
    assert isinstance(sshd.process, ManagedProcess)


def test_session_env_reaches_the_session(tmp_path: Path) -> None:
    server = start_sshd(tmp_path / "sshd", session_env={"AH_PROBE": "two words/and:more"})
    try:
        result = server.run('printf "%s|%s" "$AH_PROBE" "$HOME"')
        assert result.stdout == f"two words/and:more|{server.home_dir}"
    finally:
        server.stop()


def test_unusable_settings_are_refused_with_the_value_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a valid environment variable name"):
        start_sshd(tmp_path / "a", session_env={"BAD-NAME": "x"})
    with pytest.raises(ValueError, match="quote, backslash or newline"):
        start_sshd(tmp_path / "b", session_env={"OK": 'has "quotes"'})
    with pytest.raises(ValueError, match="has space"):
        start_sshd(tmp_path / "has space")


def test_extra_authorized_keys_may_log_in(sshd_factory: SshdFactory, tmp_path: Path) -> None:
    leader = tmp_path / "leader"
    stranger = tmp_path / "stranger"
    for key in (leader, stranger):
        subprocess.run([SSH_KEYGEN, "-q", "-t", "ed25519", "-N", "", "-f", key], check=True)
    running = sshd_factory(base_dir=tmp_path / "sshd", authorized_keys=[Path(f"{leader}.pub")])
    try:

        def login_with(key: Path) -> subprocess.CompletedProcess[str]:
            argv = running.ssh_command("echo", "in")
            argv[argv.index(str(running.client_key_path))] = str(key)
            return _ssh(argv)

        assert login_with(leader).stdout == "in\n"
        assert login_with(running.client_key_path).stdout == "in\n"  # its own key still works
        assert login_with(stranger).returncode == 255
    finally:
        running.stop()
    with pytest.raises(ValueError, match="exactly one OpenSSH public-key line"):
        sshd_factory(base_dir=tmp_path / "bad", authorized_keys=[leader])  # a private key
