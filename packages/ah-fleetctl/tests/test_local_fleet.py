"""ah-fleetctl against a real fleet (LocalFleet: a real access point and three real followers,
each with its own sshd), including the golden JSON envelopes of ``fleet list`` and ``exec``.

Golden files live in ``tests/golden/``. Volatile fields (timestamps, ports, durations, temp
paths, host keys, machine facts) are normalised before comparing. After an intended change
of the output, regenerate them with::

    AH_UPDATE_GOLDEN=1 uv run --package ah-fleetctl pytest packages/ah-fleetctl -k golden

and review the diff.
"""

from __future__ import annotations

import json
import os
import re
import stat
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from ah_domain_types import HOST_KEY_FINGERPRINT_PATTERN

if TYPE_CHECKING:
    from conftest import CliResult, RealFleet

GOLDEN_DIR = Path(__file__).parent / "golden"
UPDATE_GOLDEN = os.environ.get("AH_UPDATE_GOLDEN", "") == "1"

_RUN_ID = re.compile(r"exec-\d{8}T\d{6}Z-[0-9a-f]{6}")
_TIMESTAMP_KEYS = frozenset({"lastHeartbeatMs", "connectedSinceMs"})
_PATH_KEYS = frozenset({"workspace", "logPath", "runDir"})


def normalize(value: Any, base_dir: Path) -> Any:
    """Replace what differs between runs and machines with placeholders, after checking that
    each replaced value has the expected shape."""
    if isinstance(value, list):
        return [normalize(v, base_dir) for v in value]
    if not isinstance(value, dict):
        return value
    out: dict[str, Any] = {}
    for key, item in value.items():
        if key in _TIMESTAMP_KEYS and item is not None:
            assert isinstance(item, int) and item > 1_600_000_000_000, (key, item)
            out[key] = "<timestamp-ms>"
        elif key == "tookMs":
            assert isinstance(item, int) and item >= 0, (key, item)
            out[key] = "<ms>"
        elif key in _PATH_KEYS and item is not None:
            assert item.startswith(str(base_dir) + os.sep), (key, item)
            out[key] = _RUN_ID.sub("exec-<run-id>", "<fleet>" + item[len(str(base_dir)) :])
        elif key == "directAddress" and item is not None:
            assert re.fullmatch(r"127\.0\.0\.1:\d{1,5}", item), (key, item)
            out[key] = "127.0.0.1:<port>"
        elif key == "hostKeyFingerprint":
            assert re.fullmatch(HOST_KEY_FINGERPRINT_PATTERN, item), (key, item)
            out[key] = "SHA256:<host-key>"
        elif key == "resources":
            assert item["cpus"] > 0 and item["memoryMb"] > 0, item
            out[key] = {"cpus": "<cpus>", "memoryMb": "<memory-mb>"}
        elif key == "arch":
            assert isinstance(item, str) and item, item
            out[key] = "<arch>"
        else:
            out[key] = normalize(item, base_dir)
    return out


def check_golden(name: str, document: Any) -> None:
    path = GOLDEN_DIR / name
    rendered = json.dumps(document, indent=2, sort_keys=True) + "\n"
    if UPDATE_GOLDEN:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(rendered)
        # A regeneration run must not pass silently as if it had compared anything.
        pytest.fail(f"regenerated {path}; review the diff and rerun without AH_UPDATE_GOLDEN")
    assert path.is_file(), f"{path} is missing; create it with AH_UPDATE_GOLDEN=1"
    assert json.loads(path.read_text()) == document, (
        f"{name} differs from the golden file; if the change is intended, regenerate with "
        f"AH_UPDATE_GOLDEN=1 and review the diff.\nnow:\n{rendered}"
    )


def names(result: CliResult) -> list[str]:
    return [f["info"]["name"] for f in result.json()["followers"]]


def test_fleet_list_json_golden(real_fleet: RealFleet) -> None:
    result = real_fleet.cli("fleet", "list", "--json")
    assert result.returncode == 0, result
    document = result.json()
    assert names(result) == ["alpha", "bravo", "charlie"]
    assert {f["info"]["name"]: f["info"]["tags"] for f in document["followers"]} == {
        "alpha": {"pool": "ci"},
        "bravo": {"pool": "ci", "gpu": "yes"},
        "charlie": {"pool": "dev"},
    }
    assert {f["health"] for f in document["followers"]} == {"healthy"}
    check_golden("fleet-list.json", normalize(document, real_fleet.fleet.base_dir))


def test_exec_mock_json_golden_three_distinct_results_and_a_failure(
    real_fleet: RealFleet,
) -> None:
    result = real_fleet.cli("exec", "--mock", "--json", "--", "echo", "hello fleet")
    assert result.returncode == 1, result  # charlie answers 3
    document = result.json()
    hosts = {h["host"]: h for h in document["hosts"]}
    assert [h["host"] for h in document["hosts"]] == ["alpha", "bravo", "charlie"]
    assert [(h["state"], h["exitCode"]) for h in hosts.values()] == [
        ("ok", 0),
        ("ok", 0),
        ("failed", 3),
    ]
    outputs = {name: Path(h["logPath"]).read_text() for name, h in hosts.items()}
    assert len(set(outputs.values())) == 3, outputs
    for name, output in outputs.items():
        assert name in output and "hello fleet" in output, outputs
    assert document["summary"] == {
        "total": 3,
        "succeeded": 2,
        "failed": 1,
        "unreachable": 0,
        "timedOut": 0,
        "cancelled": 0,
        "idle": 0,
    }
    check_golden("exec-mock.json", normalize(document, real_fleet.fleet.base_dir))


def test_tag_selection_failing_host_and_empty_selection(real_fleet: RealFleet) -> None:
    listing, run, failed, empty = real_fleet.cli.many(
        ["fleet", "list", "--tag", "pool=ci"],
        ["exec", "--mock", "--tag", "os=linux", "--", "uname", "-a"],
        ["exec", "--mock", "--host", "charlie", "--", "false"],
        ["--json", "exec", "--mock", "--tag", "pool=gpu", "--", "true"],
    )
    assert listing.returncode == 0, listing
    assert [line.split()[0] for line in listing.stdout.splitlines()] == ["NAME", "alpha", "bravo"]

    assert run.returncode == 0, run
    lines = run.stdout.splitlines()
    assert [line.split(" | ")[0].strip() for line in lines[:-1]] == ["alpha", "bravo"]
    assert all("uname -a" in line for line in lines[:-1]), run
    assert lines[-1] == "2 succeeded, 0 failed, 0 unreachable"

    assert failed.returncode == 1, failed
    assert failed.stdout.splitlines()[-1] == "0 succeeded, 1 failed, 0 unreachable"
    assert "charlie ! failed (exit code 3)" in failed.stderr

    assert empty.returncode == 7, empty
    assert empty.json()["error"]["kind"] == "emptySelection"
    assert "no follower matches --tag pool=gpu; 3 followers enrolled" in empty.stderr


def test_login_pins_the_real_ca_and_stores_the_user_config(
    real_fleet: RealFleet, tmp_path: Path
) -> None:
    fleet = real_fleet.fleet
    home = tmp_path / "fresh-home"
    env = {"AH_HOME": str(home)}
    result = real_fleet.cli(
        "login",
        "--json",
        "--access-point",
        fleet.api_url.removeprefix("https://"),  # the scheme is optional
        "--token",
        fleet.user_token,
        "--ca-fingerprint",
        fleet.ca_fingerprint.upper().replace("SHA256:", "sha256:"),
        "--log-level",
        "debug",  # even debug logging must not show the token
        env=env,
    )
    assert result.returncode == 0, result
    assert fleet.user_token not in result.stdout + result.stderr

    config_file, ca_file = home / "config.toml", home / "fleet-ca.pem"
    assert result.json() == {
        "accessPoint": fleet.api_url,
        "caFingerprint": fleet.ca_fingerprint,
        "caFile": str(ca_file),
        "configFile": str(config_file),
        "followersVisible": 3,
    }
    assert stat.S_IMODE(config_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(home.stat().st_mode) == 0o700
    assert tomllib.loads(config_file.read_text()) == {
        "remote-server": fleet.api_url,
        "token": fleet.user_token,
        "ca-file": str(ca_file),
    }
    assert ca_file.read_bytes().strip() == fleet.ca_path.read_bytes().strip()

    # Afterwards the stored settings are enough: no flags, no AH_* but AH_HOME.
    listing = real_fleet.cli("fleet", "list", "--json", "--host", "bravo", env=env)
    assert listing.returncode == 0, listing
    assert names(listing) == ["bravo"]
