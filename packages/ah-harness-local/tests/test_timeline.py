"""The run-timeline assertions: every valid interleaving passes, each broken rule is named."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ah_harness_local.timeline import assert_run_timeline, run_timeline_problems

HOSTS = ["demo-1", "demo-2", "demo-3"]


def _result(host: str, state: str = "ok") -> dict[str, Any]:
    return {"host": host, "os": "linux", "state": state, "exitCode": 0 if state == "ok" else 1}


def _number(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    for seq, event in enumerate(events, start=1):
        event["seq"] = seq
        event["tsMs"] = 1000.0 + seq
    return events


def _summary(states: dict[str, str]) -> dict[str, Any]:
    field = {"ok": "succeeded", "failed": "failed", "unreachable": "unreachable",
             "timeout": "timedOut", "cancelled": "cancelled"}  # fmt: skip
    counts = dict.fromkeys(field.values(), 0)
    for state in states.values():
        counts[field[state]] += 1
    return {"type": "summary", "summary": {"total": len(states), **counts}}


def fenced_run(
    order: list[str] | None = None, states: dict[str, str] | None = None
) -> list[dict[str, Any]]:
    """A fenced run on HOSTS: hosts start in order, then each logs one line and exits in
    `order` (default: HOSTS)."""
    states = states or dict.fromkeys(HOSTS, "ok")
    events: list[dict[str, Any]] = [
        {"type": "fenceStarted", "snapshotId": "snap-1", "hosts": list(HOSTS)},
        {"type": "fenceResult", "snapshotId": "snap-1",
         "hosts": {h: {"state": "consistent", "tookMs": 5} for h in HOSTS}},
    ]  # fmt: skip
    events += [{"type": "hostStarted", "host": h, "command": "echo hi"} for h in HOSTS]
    for host in order or HOSTS:
        events.append({"type": "hostLog", "host": host, "stream": "stdout", "line": "hi"})
        events.append({"type": "hostExited", "host": host, "result": _result(host, states[host])})
    events.append(_summary(states))
    return _number(events)


def test_a_real_shaped_run_passes() -> None:
    assert run_timeline_problems(fenced_run(["demo-1", "demo-3", "demo-2"]), HOSTS) == []
    failing = fenced_run(states={"demo-1": "ok", "demo-2": "failed", "demo-3": "timeout"})
    assert_run_timeline(failing, HOSTS)


@given(
    st.permutations(HOSTS),
    st.lists(st.sampled_from(["ok", "failed", "timeout"]), min_size=3, max_size=3),
)
def test_any_exit_order_and_outcome_passes(order: list[str], outcomes: list[str]) -> None:
    states = dict(zip(HOSTS, outcomes, strict=True))
    assert run_timeline_problems(fenced_run(order, states), HOSTS) == []


def _move(events: list[dict[str, Any]], src: int, dst: int) -> list[dict[str, Any]]:
    moved = copy.deepcopy(events)
    moved.insert(dst, moved.pop(src))
    return _number(moved)


@pytest.mark.parametrize(
    ("mutate", "needle"),
    [
        (lambda ev: _move(ev, 1, 4), "out of order"),  # fenceResult after a hostStarted
        (lambda ev: _number([e for e in ev if not (e["type"] == "hostExited" and e["host"] == "demo-2")]),
         "demo-2: expected one hostStarted and one hostExited"),
        (lambda ev: _move(ev, 5, 7), "demo-1: hostLog outside"),  # its log after its exit
        (lambda ev: [*ev[:3], *({**e, "seq": e["seq"] + 1} for e in ev[3:])], "seq is not consecutive"),
        (lambda ev: [*ev[:-1], {**ev[-1], "summary": {**ev[-1]["summary"], "failed": 1}}], "summary failed=1"),
        (lambda ev: _move(ev, len(ev) - 1, 5), "exactly one summary, last"),
        (lambda ev: [*ev[:2], {**ev[2], "host": "demo-9"}, *ev[3:]], "not selected"),
        (lambda ev: [ev[0], {**ev[1], "hosts": {**ev[1]["hosts"], "demo-2": {"state": "timeout"}}}, *ev[2:]],
         "fence verdicts"),
        (lambda ev: [*ev[:6], {**ev[6], "tsMs": 0.0}, *ev[7:]], "tsMs goes back"),
    ],
    ids=["fence-after-start", "missing-exit", "log-after-exit", "seq-gap", "summary-count",
         "summary-not-last", "stranger-host", "fence-verdict", "clock-back"],
)  # fmt: skip
def test_each_broken_rule_is_named(mutate: Any, needle: str) -> None:
    events = mutate(fenced_run())
    problems = run_timeline_problems(events, HOSTS)
    assert any(needle in p for p in problems), problems
    with pytest.raises(AssertionError, match="run timeline is wrong"):
        assert_run_timeline(events, HOSTS)


def test_an_expected_fence_failure_and_an_unfenced_run() -> None:
    events = fenced_run()
    events[1]["hosts"]["demo-3"] = {"state": "timeout", "tookMs": 9}
    assert run_timeline_problems(events, HOSTS, fence_states={"demo-3": "timeout"}) == []
    unfenced = _number(fenced_run()[2:])
    assert run_timeline_problems(unfenced, HOSTS, fenced=False) == []
    assert any("fenceStarted" in p for p in run_timeline_problems(unfenced, HOSTS))
    assert run_timeline_problems([], HOSTS) == ["no events at all"]
