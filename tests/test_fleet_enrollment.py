"""Enrollment end to end: the real ``ah-followerd enroll`` against the real access point.

Every refusal exits 4 and says which refusal it was; a refused follower leaves no state.
"""

from __future__ import annotations

import json
import stat
import subprocess
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ah_connectivity import FleetCA, Identity, TokenSigner, peer_spiffe_id, spiffe_id_for_follower
from ah_harness_local.fleet import daemon_argv


def _enroll(
    fleet: Any, state_dir: Path, token: str, *extra: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            *daemon_argv("ah-followerd"),
            "enroll",
            "--access-point",
            f"127.0.0.1:{fleet.api_port}",
            "--token",
            token,
            "--state-dir",
            str(state_dir),
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=fleet.daemon_env,
        stdin=subprocess.DEVNULL,
    )


def _parallel(fleet: Any, runs: dict[str, tuple[Path, str, Sequence[str]]]) -> dict[str, Any]:
    with ThreadPoolExecutor(max_workers=len(runs)) as pool:
        futures = {k: pool.submit(_enroll, fleet, d, t, *e) for k, (d, t, e) in runs.items()}
        return {k: f.result() for k, f in futures.items()}


def test_enrollment_succeeds_once_and_every_bad_token_is_refused(
    local_fleet: Any, tmp_path: Path
) -> None:
    fleet = local_fleet
    signer: TokenSigner = fleet.signer
    fingerprint = fleet.ca_fingerprint
    other_ca = FleetCA.generate(fleet.trust_domain)
    reuse_token = fleet.enrollment_token("enr-reuse")
    runs = {
        "ok": (tmp_path / "ok", fleet.enrollment_token("enr-ok", {"role": "z"}), ["--tag", "extra=1", "--tag", "role=mine", "--json"]),
        "first-use": (tmp_path / "first", reuse_token, []),
        "expired": (tmp_path / "expired",
                    signer.issue_enroll("enr-exp", ca_fingerprint=fingerprint, ttl=60, now=time.time() - 3600), []),
        "forged": (tmp_path / "forged",
                   TokenSigner.generate(fleet.trust_domain).issue_enroll("enr-forged", ca_fingerprint=fingerprint), []),
        "wrong-name": (tmp_path / "wrong", fleet.enrollment_token("enr-right"), ["--name", "enr-wrong"]),
        "pin-mismatch": (tmp_path / "pin",
                         signer.issue_enroll("enr-pin", ca_fingerprint=other_ca.fingerprint), []),
    }  # fmt: skip
    results = _parallel(fleet, runs)
    results["reused"] = _enroll(fleet, tmp_path / "again", reuse_token)

    ok = results["ok"]
    assert ok.returncode == 0, ok.stderr
    document = json.loads(ok.stdout)
    assert document["name"] == "enr-ok"
    assert document["quicAddress"] == f"127.0.0.1:{fleet.quic_port}"
    assert document["caFingerprint"] == fingerprint
    assert document["tags"] == {"extra": "1", "role": "z"}, "the token's tags win"
    state = tmp_path / "ok"
    assert stat.S_IMODE((state / "follower.key").stat().st_mode) == 0o600
    identity = Identity.load(state / "follower.pem", state / "follower.key")
    assert peer_spiffe_id(identity.cert) == spiffe_id_for_follower(fleet.trust_domain, "enr-ok")
    assert (state / "fleet-ca.pem").read_bytes() == fleet.ca_path.read_bytes()
    assert results["first-use"].returncode == 0, results["first-use"].stderr

    refusals = {
        "reused": "token reused",
        "expired": "token expired",
        "forged": "token forged",
        "wrong-name": "token wrong-name",
    }
    for case, words in refusals.items():
        result = results[case]
        assert result.returncode == 4, (case, result.stderr)
        assert "refused to enroll" in result.stderr and words in result.stderr, (
            case,
            result.stderr,
        )
    assert "'enr-right', not 'enr-wrong'" in results["wrong-name"].stderr

    mismatch = results["pin-mismatch"]
    assert mismatch.returncode == 4, mismatch.stderr
    assert "fingerprint mismatch" in mismatch.stderr
    assert other_ca.fingerprint in mismatch.stderr and fingerprint in mismatch.stderr

    for case in (*refusals, "pin-mismatch"):
        assert not (runs.get(case, (tmp_path / "again",))[0] / "follower.toml").exists(), case
    # Enrolled but never connected followers have no facts to list yet.
    names = {f["info"]["name"] for f in fleet.list_followers()}
    assert {"lin-a", "lin-b", "lin-c"} <= names and "enr-ok" not in names
    ap_log = fleet.access_point.stderr_text()
    assert "enrolled follower 'enr-ok'" in ap_log
    assert "refused enrollment of 'enr-forged': token forged" in ap_log
