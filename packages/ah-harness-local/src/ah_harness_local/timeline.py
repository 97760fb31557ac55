"""Event-timeline assertions for scenarios: is a run's session event stream in a possible order?

Feed it the events as the API or ``ah-fleetctl --json session events`` gives them (camelCase
JSON objects with ``type``, ``seq``, ``tsMs``...). `run_timeline_problems` returns every
violation it finds (empty when the timeline is right); `assert_run_timeline` raises one
AssertionError listing them with the timeline itself, so a failing scenario shows what happened.

The rules for one fenced run of one command on ``hosts``:

- ``seq`` counts up by one without gaps; ``tsMs`` never goes back.
- ``fenceStarted`` (naming exactly ``hosts``) comes before ``fenceResult``, which gives every
  host a verdict (``consistent`` unless ``fence_states`` says otherwise), before any
  ``hostStarted``.
- Each host: exactly one ``hostStarted``, then its ``hostLog`` lines, then exactly one
  ``hostExited`` whose result names the host; no ``hostLog`` outside that window.
- Exactly one ``summary``, last, whose counts match the ``hostExited`` results.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Collection, Mapping, Sequence
from typing import Any

__all__ = ["assert_run_timeline", "format_timeline", "run_timeline_problems"]

_SUMMARY_FIELD_OF_STATE = {
    "ok": "succeeded",
    "failed": "failed",
    "unreachable": "unreachable",
    "timeout": "timedOut",
    "cancelled": "cancelled",
}


def format_timeline(events: Sequence[Mapping[str, Any]]) -> str:
    """One line per event: ``#seq type host``, for failure messages."""
    return "\n".join(
        f"#{e.get('seq')} {e.get('type')} {e.get('host') or ''}".rstrip() for e in events
    )


def run_timeline_problems(
    events: Sequence[Mapping[str, Any]],
    hosts: Collection[str],
    *,
    fenced: bool = True,
    fence_states: Mapping[str, str] | None = None,
) -> list[str]:
    """Every way ``events`` break the rules of the module docstring (empty: a valid run)."""
    problems: list[str] = []
    expected_hosts = set(hosts)
    if not events:
        return ["no events at all"]

    seqs = [e.get("seq") for e in events]
    first = seqs[0] if isinstance(seqs[0], int) else 1
    if seqs != list(range(first, first + len(events))):
        problems.append(f"seq is not consecutive: {seqs}")
    stamps = [e.get("tsMs") for e in events]
    numbers = [float(s) for s in stamps if isinstance(s, int | float)]
    if len(numbers) != len(stamps):
        problems.append("an event has no numeric tsMs")
    elif any(b < a for a, b in itertools.pairwise(numbers)):
        problems.append(f"tsMs goes back: {stamps}")

    index: dict[str, list[int]] = {}
    for position, event in enumerate(events):
        index.setdefault(str(event.get("type")), []).append(position)
    starts = index.get("hostStarted", [])
    first_start = min(starts) if starts else len(events)

    if fenced:
        started, results = index.get("fenceStarted", []), index.get("fenceResult", [])
        if len(started) != 1 or len(results) != 1:
            problems.append(
                f"expected one fenceStarted and one fenceResult, got {len(started)} and "
                f"{len(results)}"
            )
        else:
            begin, end = events[started[0]], events[results[0]]
            if not started[0] < results[0] < first_start:
                problems.append(
                    "fenceStarted, fenceResult and the first hostStarted are out of order "
                    f"(positions {started[0]}, {results[0]}, {first_start})"
                )
            if set(begin.get("hosts") or ()) != expected_hosts:
                problems.append(f"fenceStarted names {begin.get('hosts')}, not {sorted(hosts)}")
            if begin.get("snapshotId") != end.get("snapshotId"):
                problems.append(
                    f"fenceResult is for snapshot {end.get('snapshotId')}, the fence started "
                    f"{begin.get('snapshotId')}"
                )
            verdicts = {h: (r or {}).get("state") for h, r in (end.get("hosts") or {}).items()}
            wanted = {h: (fence_states or {}).get(h, "consistent") for h in expected_hosts}
            if verdicts != wanted:
                problems.append(f"fence verdicts {verdicts}, expected {wanted}")

    exited: dict[str, Mapping[str, Any]] = {}
    for host in sorted(expected_hosts):
        mine = [p for p, e in enumerate(events) if e.get("host") == host]
        kinds = [str(events[p].get("type")) for p in mine]
        if kinds.count("hostStarted") != 1 or kinds.count("hostExited") != 1:
            problems.append(f"{host}: expected one hostStarted and one hostExited, got {kinds}")
            continue
        start = mine[kinds.index("hostStarted")]
        stop = mine[kinds.index("hostExited")]
        if start > stop:
            problems.append(f"{host}: hostExited (#{seqs[stop]}) before hostStarted")
        stray = [
            seqs[p] for p in mine if events[p].get("type") == "hostLog" and not start < p < stop
        ]
        if stray:
            problems.append(f"{host}: hostLog outside its started..exited window: {stray}")
        result = events[stop].get("result") or {}
        if result.get("host") != host:
            problems.append(f"{host}: its hostExited result names {result.get('host')!r}")
        exited[host] = result
    strangers = {
        str(e.get("host")) for e in events if e.get("host") and e.get("host") not in expected_hosts
    }
    if strangers:
        problems.append(f"events for hosts that were not selected: {sorted(strangers)}")

    summaries = index.get("summary", [])
    if summaries != [len(events) - 1]:
        problems.append(f"expected exactly one summary, last; found at positions {summaries}")
    elif exited:
        summary = events[summaries[0]].get("summary") or {}
        counted = Counter(
            _SUMMARY_FIELD_OF_STATE.get(str(r.get("state")), str(r.get("state")))
            for r in exited.values()
        )
        for field in ("succeeded", "failed", "unreachable", "timedOut", "cancelled"):
            if summary.get(field, 0) != counted.get(field, 0):
                problems.append(
                    f"summary {field}={summary.get(field)} but the hostExited results give "
                    f"{counted.get(field, 0)}"
                )
        if summary.get("total") != len(expected_hosts):
            problems.append(f"summary total={summary.get('total')}, {len(expected_hosts)} hosts")
    return problems


def assert_run_timeline(
    events: Sequence[Mapping[str, Any]],
    hosts: Collection[str],
    *,
    fenced: bool = True,
    fence_states: Mapping[str, str] | None = None,
) -> None:
    """Raise AssertionError listing every problem `run_timeline_problems` finds."""
    problems = run_timeline_problems(events, hosts, fenced=fenced, fence_states=fence_states)
    if problems:
        raise AssertionError(
            "run timeline is wrong:\n- " + "\n- ".join(problems) + "\n" + format_timeline(events)
        )
