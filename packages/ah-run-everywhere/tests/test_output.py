"""LinePrinter (whole lines, no interleaving, colour rules), RunDirectory, format_summary."""

from __future__ import annotations

import datetime as dt
import io
import os
import re
import threading
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ah_domain_types import DomainValidationError, HostResult, HostState, OsKind, RunSummary
from ah_run_everywhere import LinePrinter, RunDirectory, SpareRunDirectory, format_summary


class RecordingStream(io.StringIO):
    """A text stream that records each write and notices overlapping writers."""

    def __init__(self, tty: bool = False) -> None:
        super().__init__()
        self.tty = tty
        self.writes: list[str] = []
        self.overlaps = 0
        self._busy = False

    def write(self, s: str) -> int:
        if self._busy:
            self.overlaps += 1
        self._busy = True
        try:
            # Yield the CPU mid-write so an unlocked second writer would get in here.
            os.sched_yield()
            self.writes.append(s)
            return super().write(s)
        finally:
            self._busy = False

    def isatty(self) -> bool:
        return self.tty


def test_concurrent_hosts_never_interleave_mid_line() -> None:
    hosts = [f"host-{i}" for i in range(6)] + ["a-much-longer-host-name"]
    stream = RecordingStream()
    printer = LinePrinter(stream, hosts, colour=False)
    lines_per_host = 300
    barrier = threading.Barrier(len(hosts))

    def worker(host: str) -> None:
        barrier.wait()
        for i in range(lines_per_host):
            printer.line(host, f"{host} says {i} " + "x" * (i % 50))

    threads = [threading.Thread(target=worker, args=(h,)) for h in hosts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert stream.overlaps == 0
    assert all(w.endswith("\n") and w.count("\n") == 1 for w in stream.writes)
    width = len("a-much-longer-host-name")
    seen: dict[str, list[int]] = {h: [] for h in hosts}
    for line in stream.getvalue().splitlines():
        match = re.fullmatch(rf"(.{{{width}}}) \| (\S+) says (\d+) x*", line)
        assert match, line
        host = match.group(1).rstrip()
        assert host == match.group(2)
        seen[host].append(int(match.group(3)))
    assert seen == {h: list(range(lines_per_host)) for h in hosts}


def test_multi_line_text_is_written_as_prefixed_lines_in_one_write() -> None:
    stream = RecordingStream()
    LinePrinter(stream, ["a", "bbb"], colour=False).line("a", "one\r\ntwo\nthree")
    assert stream.writes == ["a   | one\na   | two\na   | three\n"]


@pytest.mark.parametrize(
    ("tty", "environ", "coloured"),
    [
        (True, {}, True),
        (True, {"NO_COLOR": "1"}, False),
        (True, {"NO_COLOR": ""}, True),  # no-color.org: only a non-empty value disables
        (False, {}, False),
    ],
)
def test_colour_only_on_a_tty_without_no_color(
    tty: bool, environ: dict[str, str], coloured: bool
) -> None:
    stream = RecordingStream(tty=tty)
    printer = LinePrinter(stream, ["h1", "h2"], environ=environ)
    printer.line("h1", "x")
    printer.line("h2", "y")
    assert printer.colour is coloured
    assert ("\x1b[" in stream.getvalue()) is coloured
    if coloured:
        first, second = stream.writes
        assert first.startswith("\x1b[36mh1\x1b[0m | ") and second.startswith("\x1b[33mh2")


def test_run_directory_layout_and_tagged_logs(tmp_path: Path) -> None:
    now = dt.datetime(2024, 5, 6, 7, 8, 9, tzinfo=dt.UTC)
    run = RunDirectory(tmp_path, run_id="abc123", now=now)
    assert run.path == tmp_path / "runs" / "20240506T070809Z-abc123"
    log = run.open_log("lin-1")
    assert run.open_log("lin-1") is log
    log.write_note("job 0 started: make")
    log.write_line("stdout", "hello")
    log.write_line("stderr", "oops")
    run.close()
    run.open_log("lin-1").write_line("stdout", "appended after close")
    run.close()
    assert run.log_paths() == {"lin-1": run.path / "lin-1.log"}
    assert (run.path / "lin-1.log").read_text() == (
        "== job 0 started: make\nout | hello\nerr | oops\nout | appended after close\n"
    )
    with pytest.raises(FileExistsError, match="abc123"):
        RunDirectory(tmp_path, run_id="abc123", now=now)


def test_a_spare_run_directory_is_renamed_into_place_once(tmp_path: Path) -> None:
    spare = SpareRunDirectory(tmp_path, ["lin-1", "lin-2"])
    made = spare.path
    assert made is not None and made.parent == tmp_path / "runs"
    assert sorted(p.name for p in made.iterdir()) == ["lin-1.log", "lin-2.log"]
    now = dt.datetime(2024, 5, 6, 7, 8, 9, tzinfo=dt.UTC)
    run = RunDirectory(tmp_path, run_id="r1", now=now, spare=spare)
    assert run.path == tmp_path / "runs" / "20240506T070809Z-r1"
    assert not made.exists()
    for host in ("lin-1", "lin-2"):
        run.open_log(host).write_line("stdout", f"from {host}")
    run.close()
    assert (run.path / "lin-2.log").read_text() == "out | from lin-2\n"
    # Used up: the next run makes its own directory; discarding it is then a no-op.
    again = RunDirectory(tmp_path, run_id="r2", now=now, spare=spare)
    assert list(again.path.iterdir()) == []
    spare.discard()
    # A spare for another base is not taken, and discard removes an unused one.
    other = SpareRunDirectory(tmp_path / "elsewhere", ["lin-1"])
    third = RunDirectory(tmp_path, run_id="r3", now=now, spare=other)
    assert list(third.path.iterdir()) == []
    assert other.path is not None and other.path.exists()
    unused = other.path
    other.discard()
    assert not unused.exists()


def test_run_directories_never_collide(tmp_path: Path) -> None:
    now = dt.datetime(2024, 1, 1, tzinfo=dt.UTC)
    paths = {RunDirectory(tmp_path, now=now).path for _ in range(20)}
    assert len(paths) == 20


@pytest.mark.parametrize("bad", ["../escape", "a/b", "", ".hidden"])
def test_log_names_cannot_escape_the_run_directory(tmp_path: Path, bad: str) -> None:
    run = RunDirectory(tmp_path)
    with pytest.raises(DomainValidationError):
        run.log_path(bad)


results_strategy = st.lists(
    st.builds(
        HostResult,
        host=st.from_regex(r"[a-z][a-z0-9-]{0,10}", fullmatch=True),
        os=st.sampled_from(list(OsKind)),
        state=st.sampled_from(list(HostState)),
        exit_code=st.none() | st.integers(0, 255),
        took_ms=st.integers(0, 10_000),
        log_path=st.none(),
        error=st.none() | st.text("abc xyz:", min_size=1, max_size=20),
        command=st.none() | st.sampled_from(["make", "pytest -q"]),
    ),
    max_size=8,
)


@given(results=results_strategy)
def test_summary_names_every_non_ok_host_and_always_counts(results: list[HostResult]) -> None:
    text = format_summary(results)
    lines = text.split("\n")
    assert lines[-1] == RunSummary.from_results(results).line()
    assert re.match(r"\d+ succeeded, \d+ failed, \d+ unreachable", lines[-1])
    bad = [r for r in results if r.state is not HostState.OK]
    assert len(lines) == len(bad) + 1
    for line, result in zip(lines, bad, strict=False):  # the count line is extra
        assert line.startswith(result.host)
        assert f" {result.state.value}" in line
        if result.error:
            assert result.error.strip() in line


def test_summary_example() -> None:
    results = [
        HostResult("lin-1", OsKind.LINUX, HostState.OK, 0, 10, None),
        HostResult("lin-2", OsKind.LINUX, HostState.FAILED, 2, 10, None, command="make"),
        HostResult(
            "win-1",
            OsKind.WINDOWS,
            HostState.UNREACHABLE,
            None,
            0,
            None,
            error="connection lost: EOF",
        ),
    ]
    assert format_summary(results) == (
        "lin-2  failed       [make]  exit 2\n"
        "win-1  unreachable  connection lost: EOF\n"
        "1 succeeded, 1 failed, 1 unreachable"
    )


def _log_writers() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "ah-run-logs"]


def test_run_directories_share_one_writer_thread(tmp_path: Path) -> None:
    """A long-lived process (the leader agent) makes a run directory per run: a writer
    thread per run directory would be started (and, left waiting, pile up) each time."""
    for index in range(5):
        run = RunDirectory(tmp_path, run_id=f"t{index}")
        run.open_log("lin-1").write_note(f"job {index} started: true")
        run.close()
        # Reopened after close (appending): still written.
        run.open_log("lin-1").write_note(f"job {index} ended")
        run.close()
        assert (run.path / "lin-1.log").read_text() == (
            f"== job {index} started: true\n== job {index} ended\n"
        )
    assert len(_log_writers()) == 1
