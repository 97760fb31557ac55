"""Run results: counting, exit code and the summary line."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from ah_domain_types import ExitCode, HostResult, HostState, OsKind, RunEnvelope, RunSummary


def result(host: str, state: HostState) -> HostResult:
    return HostResult(
        host=host,
        os=OsKind.LINUX,
        state=state,
        exit_code=0 if state is HostState.OK else None,
        took_ms=10,
        log_path=None,
    )


def test_counts_and_line() -> None:
    states = [HostState.OK] * 3 + [HostState.FAILED, HostState.UNREACHABLE]
    summary = RunSummary.from_results(result(f"h{i}", s) for i, s in enumerate(states))
    assert summary == RunSummary(
        total=5, succeeded=3, failed=1, unreachable=1, timed_out=0, cancelled=0
    )
    assert summary.line() == "3 succeeded, 1 failed, 1 unreachable"
    assert summary.exit_code is ExitCode.HOSTS_FAILED


def test_line_mentions_timeouts_and_cancellations_only_when_present() -> None:
    states = [HostState.OK, HostState.TIMEOUT, HostState.TIMEOUT, HostState.CANCELLED]
    summary = RunSummary.from_results(result(f"h{i}", s) for i, s in enumerate(states))
    assert summary.line() == "1 succeeded, 0 failed, 0 unreachable, 2 timed out, 1 cancelled"


def test_all_ok_is_ok() -> None:
    summary = RunSummary.from_results([result("a", HostState.OK), result("b", HostState.OK)])
    assert summary.exit_code is ExitCode.OK
    assert summary.line() == "2 succeeded, 0 failed, 0 unreachable"


def test_nothing_ran_is_not_ok() -> None:
    summary = RunSummary.from_results([])
    assert summary.total == 0
    assert summary.exit_code is ExitCode.HOSTS_FAILED


def test_envelope_exit_code_follows_summary() -> None:
    hosts = [result("a", HostState.OK), result("b", HostState.CANCELLED)]
    envelope = RunEnvelope(
        session_id=None,
        commands=["make test"],
        hosts=hosts,
        summary=RunSummary.from_results(hosts),
        run_dir="/tmp/run",
    )
    assert envelope.exit_code is ExitCode.HOSTS_FAILED


@settings(max_examples=50, deadline=None)
@given(st.lists(st.sampled_from(HostState), max_size=12))
def test_exit_ok_iff_something_ran_and_every_host_ok_or_idle(states: list[HostState]) -> None:
    summary = RunSummary.from_results(result(f"h{i}", s) for i, s in enumerate(states))
    assert summary.total == len(states)
    assert (
        summary.succeeded
        + summary.failed
        + summary.unreachable
        + summary.timed_out
        + summary.cancelled
        + summary.idle
        == summary.total
    )
    assert summary.idle == states.count(HostState.IDLE)
    assert summary.succeeded == states.count(HostState.OK)
    expected_ok = HostState.OK in states and all(
        s in (HostState.OK, HostState.IDLE) for s in states
    )
    assert (summary.exit_code is ExitCode.OK) == expected_ok
    assert summary.line().startswith(
        f"{summary.succeeded} succeeded, {summary.failed} failed, {summary.unreachable} unreachable"
    )
