"""``ah-followerd`` exit codes for the failures that need no access point."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ah_connectivity import FleetCA, TokenSigner
from ah_harness_local import free_tcp_port


def test_cli_errors_have_their_exit_codes(tmp_path: Path, followerd: Any, fake_fleet: Any) -> None:
    signer = TokenSigner.generate("follower-test.fleet")
    token = signer.issue_enroll("lin-1", ca_fingerprint=FleetCA.generate("x.fleet").fingerprint)
    closed_port = free_tcp_port()
    enrolled = fake_fleet.write_state(tmp_path / "enrolled", "lin-1", {})
    cases = {
        "not enrolled": (8, ["run", "--state-dir", str(tmp_path / "nothing")]),
        "no host key": (8, ["run", "--state-dir", str(enrolled),
                            "--ssh-host-key-file", str(tmp_path / "none.pub")]),
        "malformed token": (4, ["enroll", "--access-point", "127.0.0.1:1", "--token", "abc",
                                "--state-dir", str(tmp_path / "m")]),
        "unreachable": (5, ["enroll", "--access-point", f"127.0.0.1:{closed_port}", "--token",
                            token, "--state-dir", str(tmp_path / "u"), "--json"]),
        "bad address": (2, ["enroll", "--access-point", "nowhere", "--token", token,
                            "--state-dir", str(tmp_path / "b")]),
        "already enrolled": (8, ["enroll", "--access-point", "127.0.0.1:1", "--token", token,
                                 "--state-dir", str(enrolled)]),
    }  # fmt: skip
    with ThreadPoolExecutor(max_workers=len(cases)) as pool:
        results = dict(
            zip(cases, pool.map(lambda c: followerd(*c[1]), cases.values()), strict=True)
        )
    for what, (code, _) in cases.items():
        assert results[what].returncode == code, (what, results[what].stderr)

    assert "nothing does not exist" in results["not enrolled"].stderr
    assert "none.pub" in results["no host key"].stderr
    assert "enrollment token" in results["malformed token"].stderr
    unreachable = results["unreachable"]
    assert f"cannot reach access point https://127.0.0.1:{closed_port}" in unreachable.stderr
    assert json.loads(unreachable.stdout)["error"]["exitCode"] == 5
    assert not (tmp_path / "u").exists(), "a failed enrollment must not leave a state directory"
    assert "expected HOST:PORT" in results["bad address"].stderr
    assert "already holds an enrolled follower" in results["already enrolled"].stderr
