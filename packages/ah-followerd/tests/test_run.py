"""The real ``ah-followerd run`` against a real QUIC control server (in-process, real UDP)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from ah_domain_types import ExecRequest, ExecResult, Goodbye, Heartbeat, Hello, OsKind
from ah_harness_local import ManagedProcess, wait_for

FOLLOWERD_RUN = ["-m", "ah_followerd", "run"]


def _ssh_keygen_fingerprint(public_key: Path) -> str:
    out = subprocess.run(
        ["ssh-keygen", "-lf", str(public_key)], capture_output=True, text=True, check=True
    ).stdout
    return out.split()[1]


def test_run_says_hello_answers_rpcs_and_says_goodbye_on_sigterm(
    tmp_path: Path, fake_fleet: Any, followerd_env: dict[str, str]
) -> None:
    state_dir = fake_fleet.write_state(tmp_path / "state", "win-7", {"pool": "ci"})
    host_key = tmp_path / "ssh_host_ed25519_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(host_key)], check=True)
    ready_file = tmp_path / "ready.json"
    workspace = tmp_path / "ws"
    process = ManagedProcess(
        [
            sys.executable,
            *FOLLOWERD_RUN,
            "--state-dir",
            str(state_dir),
            "--ssh-host-key-file",
            f"{host_key}.pub",
            "--direct-address",
            "127.0.0.1:2222",
            "--workspace",
            str(workspace),
            "--os",
            "windows",
            "--tag",
            "gpu=none",
            "--tag",
            "pool=ignored-by-nobody",
            "--exec",
            "mock",
            "--mock-exit-code",
            "3",
            "--ready-file",
            str(ready_file),
        ],
        log_dir=tmp_path / "logs",
        name="followerd",
        env=followerd_env,
    )
    try:
        ready = wait_for(
            lambda: json.loads(ready_file.read_text()) if ready_file.exists() else None,
            30,
            what="the follower's ready file",
        )
        assert ready == {"pid": process.pid, "name": "win-7"}

        [hello] = [m for m in fake_fleet.recorder.of("message") if isinstance(m, Hello)]
        info = hello.info
        assert info.name == "win-7"
        assert info.os is OsKind.WINDOWS
        # Flags add tags and override the enrolled ones in Hello (the access point decides
        # which wins when it lists the follower).
        assert info.tags == {"pool": "ignored-by-nobody", "gpu": "none"}
        assert info.host_key_fingerprint == _ssh_keygen_fingerprint(Path(f"{host_key}.pub"))
        assert info.direct_address == "127.0.0.1:2222"
        assert info.workspace == str(workspace) and workspace.is_dir()
        assert info.version == "0.1.0"
        assert info.resources.cpus >= 1 and info.resources.memory_mb > 0

        # Heartbeats keep coming at the interval the server asked for (100 ms).
        wait_for(
            lambda: sum(isinstance(m, Heartbeat) for m in fake_fleet.recorder.of("message")) >= 3,
            10,
            what="three heartbeats",
        )
        conn = fake_fleet.recorder.conns["win-7"]
        reply = fake_fleet.loop.run(
            conn.open_rpc(ExecRequest(request_id="r1", command=["echo", "a b"]), timeout=10)
        )
        assert isinstance(reply, ExecResult)
        assert reply.request_id == "r1"
        assert reply.exit_code == 3
        assert reply.stdout == "mock exec on win-7: echo 'a b'\n"

        assert process.terminate(10) == 0
        goodbyes = [m for m in fake_fleet.recorder.of("message") if isinstance(m, Goodbye)]
        assert len(goodbyes) == 1 and "SIGTERM" in goodbyes[0].reason
        [reason] = fake_fleet.recorder.of("disconnected")
        assert "said goodbye" in reason
        assert not ready_file.exists(), "a stopped follower must not leave its ready file"
    finally:
        process.terminate(5)
