"""The follower's pure parts: host-key fingerprints, Hello facts, RPC answers, state checks."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from ah_connectivity import CA_CERT_FILE, FleetCA
from ah_domain_types import ExecRequest, ExecResult, Heartbeat, OsKind, StreamError
from ah_followerd.agent import (
    ExecMode,
    HostKeyError,
    answer_rpc,
    build_info,
    host_key_fingerprint,
    mock_stdout,
)
from ah_followerd.state import FollowerStateError, load_follower_state


@pytest.mark.parametrize("key_type", ["ed25519", "ecdsa", "rsa"])
def test_host_key_fingerprint_matches_ssh_keygen(tmp_path: Path, key_type: str) -> None:
    key = tmp_path / f"host_{key_type}"
    subprocess.run(["ssh-keygen", "-q", "-t", key_type, "-N", "", "-f", str(key)], check=True)
    listed = subprocess.run(
        ["ssh-keygen", "-lf", f"{key}.pub"], capture_output=True, text=True, check=True
    ).stdout.split()[1]
    assert host_key_fingerprint(Path(f"{key}.pub")) == listed


def test_host_key_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(HostKeyError, match=r"cannot read the sshd host public key .*missing\.pub"):
        host_key_fingerprint(tmp_path / "missing.pub")
    bad = tmp_path / "bad.pub"
    bad.write_text("ssh-ed25519 not*base64\n")
    with pytest.raises(HostKeyError, match=r"bad\.pub is not an OpenSSH public key line"):
        host_key_fingerprint(bad)


def test_mock_answers_are_distinct_per_host_and_name_the_command() -> None:
    request = ExecRequest(request_id="7", command=["make", "test; rm -rf /"])
    a = answer_rpc("lin-a", ExecMode.MOCK, 0, request)
    b = answer_rpc("lin-b", ExecMode.MOCK, 5, request)
    assert isinstance(a, ExecResult) and isinstance(b, ExecResult)
    assert (
        a.stdout
        == "mock exec on lin-a: make 'test; rm -rf /'\n"
        == mock_stdout("lin-a", request.command)
    )
    assert a.stdout != b.stdout and (a.exit_code, b.exit_code) == (0, 5)
    assert a.request_id == b.request_id == "7"

    noop = answer_rpc("lin-a", ExecMode.NOOP, 5, request)
    assert isinstance(noop, ExecResult)
    assert (noop.exit_code, noop.stdout, noop.stderr) == (0, "", "")

    real = answer_rpc("lin-a", ExecMode.REAL, 0, request)
    assert isinstance(real, StreamError) and "SSH" in real.message

    other = answer_rpc("lin-a", ExecMode.MOCK, 0, Heartbeat(seq=1, sent_ms=0))
    assert isinstance(other, StreamError) and "Heartbeat" in other.message


def test_build_info_reports_overrides() -> None:
    info = build_info(
        name="mac-1",
        tags={"role": "x"},
        host_key_fingerprint="SHA256:abc",
        direct_address=None,
        workspace="/ws",
        os_kind=OsKind.MACOS,
    )
    assert (info.name, info.os, info.tags, info.workspace) == (
        "mac-1",
        OsKind.MACOS,
        {"role": "x"},
        "/ws",
    )
    assert info.arch and info.resources.cpus >= 1


def test_state_checks_name_the_file_at_fault(tmp_path: Path, fake_fleet: Any) -> None:
    with pytest.raises(FollowerStateError, match="does not exist"):
        load_follower_state(tmp_path / "none")
    state_dir = fake_fleet.write_state(tmp_path / "s", "lin-1", {})
    assert load_follower_state(state_dir).name == "lin-1"
    (state_dir / CA_CERT_FILE).write_bytes(FleetCA.generate("other.fleet").cert_pem)
    with pytest.raises(FollowerStateError, match=r"fleet-ca\.pem has fingerprint .* pins"):
        load_follower_state(state_dir)
    (state_dir / CA_CERT_FILE).unlink()
    with pytest.raises(FollowerStateError, match=r"not enrolled: missing fleet-ca\.pem"):
        load_follower_state(state_dir)
