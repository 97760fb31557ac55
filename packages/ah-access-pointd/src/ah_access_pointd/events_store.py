"""The session event store: SQLite (``<state-dir>/events.db``, WAL).

Tables::

    sessions(id, leader, created_ms, last_event_ms, last_seq)
    events(session_id, seq, ts_ms, type, body)        body: the event as JSON (seq/tsMs set)
    producers(session_id, producer, last_lseq)         what each leader process pushed

The store assigns every event its session's next ``seq`` (1, 2, 3...; the counter is the
session row's ``last_seq``, so it continues across restarts) and a ``tsMs`` that never goes
back within a session: ``max(previous tsMs, now)``. Events, the new ``last_seq`` and the
producer's ``last_lseq`` are written in one transaction: a batch is either stored with its
lseq bookkeeping or not at all, which is what makes the leader's resend exactly-once.

Durability: ``synchronous=NORMAL`` in WAL mode: a committed batch survives a crash of the
daemon; a power loss may lose the last batches (the leader still has them only while it runs).

All calls run on the daemon's event loop thread; SQLite work per batch is a fraction of a
millisecond, because commits in WAL mode do not sync. The one slow operation, the WAL
checkpoint (which syncs the database file), would stall the loop for tens of milliseconds
every few megabytes: it is switched off on the loop's connection and done by a background
thread on its own connection (``PRAGMA wal_checkpoint(PASSIVE)``, which never blocks the
writer), about once a second while events arrive.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

import msgspec
from loguru import logger

from ah_api import SessionSummary, StoredEvent
from ah_domain_types import (
    EVENT_CLASSES,
    EVENT_TYPES,
    Event,
    FenceResultEvent,
    FenceStartedEvent,
    FollowersCatalogEvent,
    HostExitedEvent,
    HostStartedEvent,
    PathDegradedEvent,
    PathFailedEvent,
    PathFixedEvent,
    PathRecord,
    PathRestoredEvent,
    decode_event_json,
    encode_event_json,
)

__all__ = [
    "EVENTS_DB_FILE",
    "EventStore",
    "EventStoreError",
    "SessionHosts",
]

EVENTS_DB_FILE = "events.db"
SCHEMA_VERSION = 1

_log = logger.bind(component="ah-access-pointd.events")

_TYPE_OF: dict[type, str] = dict(zip(EVENT_CLASSES, EVENT_TYPES, strict=True))

_MEMBERSHIP_TYPES = (
    "followersCatalog",
    "fenceStarted",
    "fenceResult",
    "hostStarted",
    "hostExited",
    "connect.path.fixed",
    "connect.path.degraded",
    "connect.path.restored",
    "connect.path.failed",
)
"""Event types that name a session's followers (hostLog does too, but always after a
hostStarted, and there are far too many of them to scan)."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    id            TEXT PRIMARY KEY,
    leader        TEXT NOT NULL,
    created_ms    INTEGER NOT NULL,
    last_event_ms REAL,
    last_seq      INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS events (
    session_id TEXT NOT NULL,
    seq        INTEGER NOT NULL,
    ts_ms      REAL NOT NULL,
    type       TEXT NOT NULL,
    body       BLOB NOT NULL,
    PRIMARY KEY (session_id, seq)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS events_by_type ON events (session_id, type, seq);
CREATE TABLE IF NOT EXISTS producers (
    session_id TEXT NOT NULL,
    producer   TEXT NOT NULL,
    last_lseq  INTEGER NOT NULL,
    PRIMARY KEY (session_id, producer)
) WITHOUT ROWID;
"""


class EventStoreError(Exception):
    """The store cannot be opened or written; the message names the file."""


@dataclass(frozen=True)
class SessionHosts:
    """The followers a session's events name, with the path its latest ``connect.path.*``
    event left for each (None: never fixed, or degraded and not restored)."""

    paths: dict[str, PathRecord | None]


@dataclass
class _Head:
    last_seq: int
    last_ts: float


def _now_ms() -> float:
    return round(time.time() * 1000, 3)


class EventStore:
    """Sessions and their events in one SQLite file."""

    def __init__(self, path: Path, *, clock: Callable[[], float] | None = None) -> None:
        """``clock``: wall-clock milliseconds (tests pass one that goes backwards)."""
        self.path = Path(path)
        self._clock = _now_ms if clock is None else clock
        try:
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("PRAGMA busy_timeout=5000")
            version = int(self._db.execute("PRAGMA user_version").fetchone()[0])
            if version > SCHEMA_VERSION:
                raise EventStoreError(
                    f"{self.path}: event store schema version {version} is newer than this "
                    f"access point understands ({SCHEMA_VERSION}); upgrade ah-access-pointd"
                )
            self._db.executescript(_SCHEMA)
            self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            self._db.execute("PRAGMA wal_autocheckpoint=0")
        except sqlite3.Error as exc:
            raise EventStoreError(f"{self.path}: cannot open the event store: {exc}") from None
        self._heads: dict[str, _Head] = {}
        self._written = threading.Event()
        self._stopping = threading.Event()
        self._checkpointer = threading.Thread(
            target=self._checkpoint_loop, name="events-checkpoint", daemon=True
        )
        self._checkpointer.start()

    def close(self) -> None:
        self._stopping.set()
        self._written.set()
        self._checkpointer.join(10.0)
        try:
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error as exc:
            _log.warning("{}: final checkpoint failed: {}", self.path, exc)
        self._db.close()

    def _checkpoint_loop(self, interval_s: float = 1.0) -> None:
        try:
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            _log.error("{}: no background checkpoints: {}", self.path, exc)
            return
        try:
            db.execute("PRAGMA busy_timeout=1000")
            while not self._stopping.is_set():
                self._written.wait()
                if self._stopping.wait(interval_s):
                    return
                self._written.clear()
                try:
                    db.execute("PRAGMA wal_checkpoint(PASSIVE)")
                except sqlite3.Error as exc:
                    _log.warning("{}: background checkpoint failed: {}", self.path, exc)
        finally:
            db.close()

    def now_ms(self) -> float:
        return float(self._clock())

    # -- writing ---------------------------------------------------------------------------

    def open_session(self, session_id: str, leader: str, producer: str) -> tuple[int, int]:
        """Create the session if new (``leader`` is recorded then); return (the producer's
        last stored lseq, the session's last seq)."""
        try:
            self._db.execute(
                "INSERT OR IGNORE INTO sessions (id, leader, created_ms, last_seq) "
                "VALUES (?, ?, ?, 0)",
                (session_id, leader, int(self.now_ms())),
            )
            row = self._db.execute(
                "SELECT last_lseq FROM producers WHERE session_id = ? AND producer = ?",
                (session_id, producer),
            ).fetchone()
        except sqlite3.Error as exc:
            raise EventStoreError(
                f"{self.path}: cannot open session {session_id!r}: {exc}"
            ) from None
        return (int(row[0]) if row else 0), self._head(session_id).last_seq

    def append(
        self, session_id: str, producer: str, first_lseq: int, events: Sequence[Event]
    ) -> list[StoredEvent]:
        """Store ``events`` (lseqs ``first_lseq``.. of ``producer``) as the session's next
        seqs; returns them as stored. The producer must have stored exactly up to
        ``first_lseq - 1``."""
        if not events:
            return []
        head = self._head(session_id)
        now = self.now_ms()
        seq, ts = head.last_seq, head.last_ts
        stored: list[StoredEvent] = []
        rows: list[tuple[str, int, float, str, bytes]] = []
        for event in events:
            seq += 1
            ts = max(ts, now)
            final = msgspec.structs.replace(event, session_id=session_id, seq=seq, ts_ms=ts)
            kind = _TYPE_OF[type(final)]
            body = encode_event_json(final)
            rows.append((session_id, seq, ts, kind, body))
            stored.append(StoredEvent(seq, kind, ts, body))
        last_lseq = first_lseq + len(events) - 1
        db = self._db
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                row = db.execute(
                    "SELECT last_lseq FROM producers WHERE session_id = ? AND producer = ?",
                    (session_id, producer),
                ).fetchone()
                stored_lseq = int(row[0]) if row else 0
                if stored_lseq != first_lseq - 1:
                    raise EventStoreError(
                        f"session {session_id!r} producer {producer}: batch starts at lseq "
                        f"{first_lseq} but lseq {stored_lseq} is the last stored"
                    )
                db.executemany(
                    "INSERT INTO events (session_id, seq, ts_ms, type, body) VALUES (?, ?, ?, ?, ?)",
                    rows,
                )
                updated = db.execute(
                    "UPDATE sessions SET last_seq = ?, last_event_ms = ? WHERE id = ? AND last_seq = ?",
                    (seq, ts, session_id, head.last_seq),
                ).rowcount
                if updated != 1:
                    raise EventStoreError(
                        f"session {session_id!r} changed under the store (another writer?)"
                    )
                db.execute(
                    "INSERT INTO producers (session_id, producer, last_lseq) VALUES (?, ?, ?) "
                    "ON CONFLICT (session_id, producer) DO UPDATE SET last_lseq = excluded.last_lseq",
                    (session_id, producer, last_lseq),
                )
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                self._heads.pop(session_id, None)
                raise
        except sqlite3.Error as exc:
            raise EventStoreError(
                f"{self.path}: cannot store {len(events)} events of session {session_id!r}: {exc}"
            ) from None
        head.last_seq, head.last_ts = seq, ts
        self._written.set()
        return stored

    def _head(self, session_id: str) -> _Head:
        head = self._heads.get(session_id)
        if head is None:
            row = self._db.execute(
                "SELECT last_seq, last_event_ms FROM sessions WHERE id = ?", (session_id,)
            ).fetchone()
            if row is None:
                raise EventStoreError(f"no session {session_id!r} in {self.path}")
            head = self._heads[session_id] = _Head(int(row[0]), float(row[1] or 0.0))
        return head

    # -- reading ---------------------------------------------------------------------------

    def get_session(self, session_id: str) -> SessionSummary | None:
        row = self._db.execute(
            "SELECT id, leader, created_ms, last_event_ms, last_seq FROM sessions WHERE id = ?",
            (session_id,),
        ).fetchone()
        return _summary(row) if row else None

    def list_sessions(self) -> list[SessionSummary]:
        rows = self._db.execute(
            "SELECT id, leader, created_ms, last_event_ms, last_seq FROM sessions "
            "ORDER BY created_ms DESC, id"
        ).fetchall()
        return [_summary(row) for row in rows]

    def _where(
        self,
        session_id: str,
        after: int,
        until: int | None,
        types: Collection[str] | None,
    ) -> tuple[str, list[object]]:
        clauses = ["session_id = ?", "seq > ?"]
        params: list[object] = [session_id, after]
        if until is not None:
            clauses.append("seq <= ?")
            params.append(until)
        if types:
            kinds = sorted(types)
            clauses.append(f"type IN ({', '.join('?' * len(kinds))})")
            params += kinds
        return " AND ".join(clauses), params

    def read(
        self,
        session_id: str,
        *,
        after: int = 0,
        until: int | None = None,
        types: Collection[str] | None = None,
        limit: int,
        offset: int = 0,
        descending: bool = False,
    ) -> list[StoredEvent]:
        where, params = self._where(session_id, after, until, types)
        order = "DESC" if descending else "ASC"
        rows = self._db.execute(
            f"SELECT seq, type, ts_ms, body FROM events WHERE {where} "
            f"ORDER BY seq {order} LIMIT ? OFFSET ?",
            [*params, limit, offset],
        ).fetchall()
        return [
            StoredEvent(int(seq), str(kind), float(ts), bytes(body)) for seq, kind, ts, body in rows
        ]

    def count(
        self,
        session_id: str,
        *,
        after: int = 0,
        until: int | None = None,
        types: Collection[str] | None = None,
    ) -> int:
        where, params = self._where(session_id, after, until, types)
        return int(
            self._db.execute(f"SELECT COUNT(*) FROM events WHERE {where}", params).fetchone()[0]
        )

    def session_hosts(self, session_id: str) -> SessionHosts:
        """Followers the session's events name, and each one's latest path."""
        paths: dict[str, PathRecord | None] = {}
        for stored in self.read(session_id, types=_MEMBERSHIP_TYPES, limit=-1):
            event = decode_event_json(stored.data)
            if isinstance(event, FollowersCatalogEvent):
                for status in event.followers:
                    paths.setdefault(status.info.name, status.path)
            elif isinstance(event, FenceStartedEvent | FenceResultEvent):
                for host in event.hosts:
                    paths.setdefault(host, None)
            elif isinstance(event, HostStartedEvent | HostExitedEvent):
                paths.setdefault(event.host, None)
            elif isinstance(event, PathFixedEvent | PathRestoredEvent):
                paths[event.host] = event.path
            elif isinstance(event, PathDegradedEvent | PathFailedEvent):
                paths[event.host] = None
        return SessionHosts(paths)


def _summary(row: tuple[object, ...]) -> SessionSummary:
    session_id, leader, created_ms, last_event_ms, last_seq = row
    return SessionSummary(
        id=str(session_id),
        leader=str(leader),
        created_ms=int(str(created_ms)),
        last_event_ms=None if last_event_ms is None else float(str(last_event_ms)),
        last_seq=int(str(last_seq)),
    )
