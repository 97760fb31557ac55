"""``fleet list`` and ``exec --mock`` through the real console script against a real HTTPS
API server over an in-memory fleet (the follower daemons are covered by the LocalFleet tests)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec
import pytest

from ah_api import HostExec
from ah_domain_types import (
    EmptySelectionError,
    FollowerHealth,
    HostState,
    OsKind,
    RunEnvelope,
    Selector,
    SelectorError,
)
from ah_fleetctl.commands.exec import host_result
from ah_fleetctl.commands.fleet import select_followers
from ah_fleetctl.output import format_age, render_table

if TYPE_CHECKING:
    from conftest import Cli, RunningApi


# --------------------------------------------------------------------------- pure helpers


def test_select_followers_keeps_order_and_reports_selector_faults(api: RunningApi) -> None:
    fleet = api.fleet.followers
    names = lambda chosen: [f.info.name for f in chosen]  # noqa: E731
    assert names(select_followers(Selector(), fleet)) == ["lin-a", "lin-b", "mac-1"]
    assert names(select_followers(Selector.from_cli([], ["arch=arm64"], False), fleet)) == [
        "lin-b",
        "mac-1",
    ]
    assert names(select_followers(Selector.from_cli(["mac-1", "lin-a"], [], False), fleet)) == [
        "lin-a",
        "mac-1",
    ]
    with pytest.raises(SelectorError, match="unknown host 'ghost'"):
        select_followers(Selector.from_cli(["ghost"], [], False), fleet)
    with pytest.raises(SelectorError, match="host 'lin-a' does not match tag pool=dev"):
        select_followers(Selector.from_cli(["lin-a"], ["pool=dev"], False), fleet)
    with pytest.raises(EmptySelectionError, match="no follower matches --tag os=windows"):
        select_followers(Selector.from_cli([], ["os=windows"], False), fleet)
    # Listing an empty fleet is not an error; running on one is.
    assert select_followers(Selector(), [], allow_empty_fleet=True) == []
    with pytest.raises(EmptySelectionError, match="no followers enrolled"):
        select_followers(Selector(), [])
    with pytest.raises(EmptySelectionError):
        select_followers(Selector.from_cli([], ["pool=ci"], False), [], allow_empty_fleet=True)


@pytest.mark.parametrize(
    ("state", "expected"),
    [
        ("ok", HostState.OK),
        ("failed", HostState.FAILED),
        ("unreachable", HostState.UNREACHABLE),
        ("timeout", HostState.TIMEOUT),
    ],
)
def test_host_exec_maps_to_host_result(api: RunningApi, state: str, expected: HostState) -> None:
    raw = HostExec(host="mac-1", state=state, exit_code=None, stdout="", stderr="", took_ms=7)  # type: ignore[arg-type]
    result = host_result(raw, api.fleet.followers[2], command="make test", log_path="/l/mac-1.log")
    assert result.state is expected
    assert (result.host, result.os, result.took_ms) == ("mac-1", OsKind.MACOS, 7)
    assert (result.command, result.log_path) == ("make test", "/l/mac-1.log")


def test_ages_and_tables() -> None:
    now = 1_000_000_000
    assert format_age(None, now) == "never"
    assert format_age(now - 400, now) == "just now"
    assert format_age(now - 42_000, now) == "42s ago"
    assert format_age(now - 90_000, now) == "1m ago"
    assert format_age(now - 3 * 3_600_000, now) == "3h ago"
    assert format_age(now - 2 * 86_400_000, now) == "2d ago"
    assert render_table(("A", "LONG"), [("xyz", "1"), ("q", "")]) == "A    LONG\nxyz  1\nq"


# --------------------------------------------------------------------------- fleet list


def test_fleet_list_table(cli: Cli, api: RunningApi) -> None:
    now_ms = int(time.time() * 1000)
    lin_a, lin_b, mac = api.fleet.followers
    api.fleet.followers = [
        msgspec.structs.replace(lin_a, last_heartbeat_ms=now_ms - 90_000),
        msgspec.structs.replace(lin_b, last_heartbeat_ms=None),
        mac,
    ]
    result = cli("fleet", "list", env=api.env())
    assert result.returncode == 0, result
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["NAME", "OS", "ARCH", "TAGS", "HEALTH", "LAST", "HEARTBEAT"]
    rows = [line.split(None, 5) for line in lines[1:]]
    assert rows[0][:5] == ["lin-a", "linux", "x86_64", "pool=ci", "healthy"]
    assert rows[0][5] in ("1m ago", "2m ago")
    assert rows[1] == ["lin-b", "linux", "arm64", "gpu=yes,pool=ci", "healthy", "never"]
    assert rows[2][:5] == ["mac-1", "macos", "arm64", "pool=dev", "unhealthy"]
    assert rows[2][5].endswith("d ago")
    assert result.stderr == ""


# --------------------------------------------------------------------------- exec --mock


def test_exec_mock_prints_per_host_output_and_summary(
    cli: Cli, api: RunningApi, tmp_path: Path
) -> None:
    # Option parsing stops at CMD: --json and --timeout after it belong to the command.
    log_file = tmp_path / "logs" / "fleetctl.log"
    env = api.env()
    result = cli(
        "exec",
        "--mock",
        "--tag",
        "pool=ci",
        "--timeout",
        "2.5s",
        "--log-level",
        "debug",
        "--log-file",
        str(log_file),
        "make",
        "a b",
        "--json",
        "--timeout",
        "x",
        env=env,
    )
    assert result.returncode == 0, result
    argv = ["make", "a b", "--json", "--timeout", "x"]
    assert api.fleet.exec_calls == [(["lin-a", "lin-b"], argv, 2500)]
    assert result.stdout.splitlines() == [
        "lin-a | lin-a: make a b --json --timeout x",
        "lin-b | lin-b: make a b --json --timeout x",
        "2 succeeded, 0 failed, 0 unreachable",
    ]
    # Logs (debug here) go to stderr and the log file, never to stdout, never the token.
    logged = log_file.read_text()
    assert "exec --mock make 'a b' --json --timeout x on lin-a, lin-b" in logged
    assert f"TLS verified against the fleet CA {api.ca_file}" in logged
    assert "exec --mock" in result.stderr
    assert env["AH_TOKEN"] not in logged + result.stderr
    runs = list((cli.ah_home / "logs" / "runs").iterdir())
    assert len(runs) == 1
    assert (runs[0] / "lin-b.log").read_text() == "lin-b: make a b --json --timeout x\n"


def test_exec_mock_failures_give_exit_1_and_a_run_envelope(cli: Cli, api: RunningApi) -> None:
    lin_a, lin_b, mac = api.fleet.followers
    api.fleet.followers = [
        lin_a,
        lin_b,
        msgspec.structs.replace(mac, health=FollowerHealth.OFFLINE),
    ]
    api.fleet.exit_codes = {"lin-b": 3}
    result = cli("exec", "--mock", "--json", "--", "sh", "-c", "exit 3", env=api.env())
    assert result.returncode == 1, result
    envelope = msgspec.json.decode(result.stdout.encode(), type=RunEnvelope)
    assert envelope.commands == ["sh -c 'exit 3'"]
    assert envelope.session_id is None
    by_host = {h.host: h for h in envelope.hosts}
    assert [h.host for h in envelope.hosts] == ["lin-a", "lin-b", "mac-1"]
    assert (by_host["lin-a"].state, by_host["lin-a"].exit_code) == (HostState.OK, 0)
    assert (by_host["lin-b"].state, by_host["lin-b"].exit_code) == (HostState.FAILED, 3)
    assert by_host["mac-1"].state is HostState.UNREACHABLE
    assert by_host["mac-1"].error == "mac-1 is offline"
    assert (envelope.summary.succeeded, envelope.summary.failed, envelope.summary.unreachable) == (
        1,
        1,
        1,
    )
    assert envelope.summary.line() == "1 succeeded, 1 failed, 1 unreachable"
    assert envelope.run_dir is not None
    run_dir = Path(envelope.run_dir)
    assert run_dir.parent == cli.ah_home / "logs" / "runs"
    assert by_host["lin-b"].log_path == str(run_dir / "lin-b.log")
    assert Path(by_host["lin-b"].log_path).read_text() == (
        "lin-b: sh -c exit 3\nlin-b: exiting with 3\n"
    )
