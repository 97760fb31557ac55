"""The SQLite event store: per-session seqs that continue across reopening, timestamps that
never go back, atomic batches with the producer's lseq, filters, and session membership."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ah_access_pointd.events_store import EventStore, EventStoreError
from ah_domain_types import (
    FenceStartedEvent,
    HostStartedEvent,
    NoteEvent,
    PathDegradedEvent,
    PathFixedEvent,
    PathRecord,
    PathRestoredEvent,
    TransportMethod,
    decode_event_json,
)


def notes(count: int, prefix: str = "n") -> list[NoteEvent]:
    return [NoteEvent(session_id="", ts_ms=0.0, message=f"{prefix}{i}") for i in range(count)]


class Clock:
    """Wall-clock milliseconds that tests move by hand (also backwards)."""

    def __init__(self, now: float = 1_700_000_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    plan=st.lists(
        st.tuples(
            st.integers(1, 20),  # batch size
            st.floats(-5_000, 5_000),  # clock step before the batch (may go back)
            st.booleans(),  # reopen the store before the batch (an access-point restart)
        ),
        min_size=1,
        max_size=12,
    )
)
def test_seqs_continue_and_timestamps_never_go_back_across_reopens(
    tmp_path_factory: pytest.TempPathFactory, plan: list[tuple[int, float, bool]]
) -> None:
    path = tmp_path_factory.mktemp("store") / "events.db"
    clock = Clock()
    store = EventStore(path, clock=clock)
    store.open_session("s-1", "alice", "p")
    lseq = 0
    try:
        for size, step, reopen in plan:
            clock.now += step
            if reopen:
                store.close()
                store = EventStore(path, clock=clock)
                acked, _ = store.open_session("s-1", "alice", "p")
                assert acked == lseq, "the producer's lseq survives the restart"
            stored = store.append("s-1", "p", lseq + 1, notes(size))
            lseq += size
            assert [e.seq for e in stored] == list(range(lseq - size + 1, lseq + 1))
        everything = store.read("s-1", limit=10_000)
    finally:
        store.close()
    assert [e.seq for e in everything] == list(range(1, lseq + 1))
    stamps = [e.ts_ms for e in everything]
    assert stamps == sorted(stamps)
    for stored in everything:
        event = decode_event_json(stored.data)
        assert (event.seq, event.ts_ms, event.session_id) == (stored.seq, stored.ts_ms, "s-1")


def test_a_batch_out_of_lseq_order_is_refused_and_nothing_is_stored(tmp_path: Path) -> None:
    store = EventStore(tmp_path / "events.db")
    try:
        store.open_session("s-1", "alice", "p")
        store.append("s-1", "p", 1, notes(3))
        with pytest.raises(EventStoreError, match="lseq 3 is the last stored"):
            store.append("s-1", "p", 3, notes(2))
        with pytest.raises(EventStoreError, match="lseq 3 is the last stored"):
            store.append("s-1", "p", 5, notes(2))
        assert store.count("s-1") == 3
        # A second producer has its own numbering, and the session's seqs go on.
        assert store.open_session("s-1", "bob", "q") == (0, 3)
        assert [e.seq for e in store.append("s-1", "q", 1, notes(2, "q"))] == [4, 5]
        assert [e.seq for e in store.append("s-1", "p", 4, notes(1, "p"))] == [6]
        summary = store.get_session("s-1")
        assert summary is not None and summary.leader == "alice" and summary.last_seq == 6
        with pytest.raises(EventStoreError, match="no session 's-2'"):
            store.append("s-2", "p", 1, notes(1))
    finally:
        store.close()


def test_a_batch_whose_transaction_fails_midway_is_stored_whole_on_the_retry(
    tmp_path: Path,
) -> None:
    """SQLite refuses the third row of a batch (a trigger stands in for a full disk): none of
    the batch is stored, and when the leader resends it (same lseqs), each event is stored
    exactly once with the seqs the failed attempt would have given."""
    store = EventStore(tmp_path / "events.db")
    try:
        store.open_session("s-1", "alice", "p")
        assert [e.seq for e in store.append("s-1", "p", 1, notes(2, "a"))] == [1, 2]
        store._db.execute(
            "CREATE TEMP TRIGGER refuse_third BEFORE INSERT ON events WHEN NEW.seq = 5 "
            "BEGIN SELECT RAISE(ABORT, 'injected failure'); END"
        )
        with pytest.raises(EventStoreError, match=r"cannot store 4 events .*injected failure"):
            store.append("s-1", "p", 3, notes(4, "b"))
        assert [e.seq for e in store.read("s-1", limit=100)] == [1, 2], "nothing of the batch"
        assert store.open_session("s-1", "alice", "p") == (2, 2), "lseq and seq unchanged"
        store._db.execute("DROP TRIGGER refuse_third")
        assert [e.seq for e in store.append("s-1", "p", 3, notes(4, "b"))] == [3, 4, 5, 6]
        assert [e.seq for e in store.append("s-1", "p", 7, notes(1, "c"))] == [7]
        messages = [decode_event_json(e.data) for e in store.read("s-1", limit=100)]
        assert [m.message for m in messages if isinstance(m, NoteEvent)] == [
            "a0", "a1", "b0", "b1", "b2", "b3", "c0",
        ]  # fmt: skip
    finally:
        store.close()


def test_reads_filter_page_sort_and_count(tmp_path: Path) -> None:
    clock = Clock()
    store = EventStore(tmp_path / "events.db", clock=clock)
    try:
        store.open_session("s-1", "alice", "p")
        clock.now += 1000
        store.open_session("s-2", "alice", "p")
        mixed = []
        for i in range(10):
            mixed.append(NoteEvent(session_id="", ts_ms=0, message=f"n{i}"))
            mixed.append(HostStartedEvent(session_id="", ts_ms=0, host="lin-a", command=f"c{i}"))
        store.append("s-1", "p", 1, mixed)
        store.append("s-2", "p", 1, notes(4))
        assert store.count("s-1") == 20 and store.count("s-2") == 4
        assert store.count("s-1", types=["hostStarted"]) == 10
        assert [e.seq for e in store.read("s-1", types=["hostStarted"], limit=3)] == [2, 4, 6]
        assert [e.seq for e in store.read("s-1", after=5, until=8, limit=50)] == [6, 7, 8]
        assert [e.seq for e in store.read("s-1", limit=3, offset=3, descending=True)] == [
            17,
            16,
            15,
        ]
        assert [s.id for s in store.list_sessions()] == ["s-2", "s-1"], "newest first"
        assert store.get_session("nope") is None
    finally:
        store.close()


def test_session_hosts_follow_the_latest_path_event(tmp_path: Path) -> None:
    direct = PathRecord(
        method=TransportMethod.DIRECT, target="10.0.0.5:22", relay=None, rtt_estimate_ms=1.5
    )
    via_ap = PathRecord(
        method=TransportMethod.CONNECT, target="lin-b:22", relay=None, rtt_estimate_ms=9.0
    )
    store = EventStore(tmp_path / "events.db")
    try:
        store.open_session("s-1", "alice", "p")
        store.append(
            "s-1",
            "p",
            1,
            [
                FenceStartedEvent(
                    session_id="", ts_ms=0, snapshot_id="x", hosts=["lin-a", "lin-b", "lin-c"]
                ),
                PathFixedEvent(session_id="", ts_ms=0, host="lin-a", path=direct),
                PathFixedEvent(session_id="", ts_ms=0, host="lin-b", path=direct),
                PathDegradedEvent(
                    session_id="", ts_ms=0, host="lin-b", path=direct, failures=3, error="timeout"
                ),
                PathRestoredEvent(session_id="", ts_ms=0, host="lin-b", path=via_ap),
                PathFixedEvent(session_id="", ts_ms=0, host="lin-c", path=direct),
                PathDegradedEvent(
                    session_id="", ts_ms=0, host="lin-c", path=direct, failures=3, error="reset"
                ),
                HostStartedEvent(session_id="", ts_ms=0, host="lin-d", command="make"),
            ],
        )
        assert store.session_hosts("s-1").paths == {
            "lin-a": direct,
            "lin-b": via_ap,
            "lin-c": None,
            "lin-d": None,
        }
    finally:
        store.close()


def test_a_newer_schema_or_an_unreadable_file_is_an_error_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "events.db"
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA user_version=99")
    with pytest.raises(EventStoreError, match=r"events\.db: event store schema version 99"):
        EventStore(path)
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"not a database at all" * 100)
    with pytest.raises(EventStoreError, match=r"garbage\.db: cannot open the event store"):
        EventStore(garbage)


def test_stored_bodies_are_the_json_of_the_final_event(tmp_path: Path) -> None:
    store = EventStore(tmp_path / "events.db", clock=Clock(1000.5))
    try:
        store.open_session("s-1", "alice", "p")
        (stored,) = store.append("s-1", "p", 1, notes(1))
        assert msgspec.json.decode(stored.data) == {
            "type": "note",
            "sessionId": "s-1",
            "seq": 1,
            "tsMs": 1000.5,
            "message": "n0",
            "level": "info",
        }
        assert stored.frame == b"id: 1\nevent: note\ndata: " + stored.data + b"\n\n"
    finally:
        store.close()
