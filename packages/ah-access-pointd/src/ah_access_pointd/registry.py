"""The fleet registry: enrolled followers and consumed enrollment tokens, in SQLite (WAL).

It survives restarts: a follower stays listed (``offline``) until it reconnects, and a one-time
token stays used until it would have expired anyway.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import msgspec
from loguru import logger

from ah_domain_types import FollowerInfo

__all__ = ["FleetRegistry", "FollowerRecord", "RegistryError"]

_log = logger.bind(component="ah-access-pointd.registry")

SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS followers (
    name TEXT PRIMARY KEY,
    enrolled_tags TEXT NOT NULL,
    info TEXT,
    enrolled_ms INTEGER NOT NULL,
    last_seen_ms INTEGER
);
CREATE TABLE IF NOT EXISTS used_enroll_tokens (
    jti TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    expires_at INTEGER NOT NULL,
    used_ms INTEGER NOT NULL
);
"""

_TAGS_DECODER = msgspec.json.Decoder(dict[str, str])
_INFO_DECODER = msgspec.json.Decoder(FollowerInfo)


class RegistryError(Exception):
    """The registry database cannot be opened or has an unknown schema."""


class FollowerRecord(msgspec.Struct, frozen=True):
    """One enrolled follower as stored."""

    name: str
    enrolled_tags: dict[str, str]
    """Tags granted at enrollment (the token's, plus any extra the follower asked for)."""
    info: FollowerInfo | None
    """The FollowerInfo of its last accepted Hello; None until it first connects."""
    enrolled_ms: int
    last_seen_ms: int | None
    """Wall-clock ms of its last Hello or heartbeat that was persisted."""


def _now_ms() -> int:
    return int(time.time() * 1000)


class FleetRegistry:
    """SQLite-backed registry; safe to call from any thread (one connection behind a lock)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        try:
            self._db = sqlite3.connect(
                self.path, isolation_level=None, check_same_thread=False, timeout=10.0
            )
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            version = int(self._db.execute("PRAGMA user_version").fetchone()[0])
            if version not in (0, SCHEMA_VERSION):
                raise RegistryError(
                    f"{self.path}: fleet registry schema version {version}, this access point "
                    f"understands {SCHEMA_VERSION}"
                )
            self._db.executescript(_SCHEMA)
            self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        except sqlite3.Error as exc:
            raise RegistryError(f"{self.path}: cannot open the fleet registry: {exc}") from exc
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- enrollment ------------------------------------------------------------------------

    def mark_used(self, jti: str, expires_at: int) -> bool:
        """``UsedTokenStore``: record `jti`; False if it was already used."""
        with self._lock:
            return self._mark_used(jti, "", expires_at, _now_ms())

    def _mark_used(self, jti: str, name: str, expires_at: int, now_ms: int) -> bool:
        # Ids of tokens that expired long ago cannot be replayed (verification fails first).
        self._db.execute(
            "DELETE FROM used_enroll_tokens WHERE expires_at < ?", (now_ms // 1000 - 3600,)
        )
        cursor = self._db.execute(
            "INSERT OR IGNORE INTO used_enroll_tokens (jti, name, expires_at, used_ms) "
            "VALUES (?, ?, ?, ?)",
            (jti, name, expires_at, now_ms),
        )
        return cursor.rowcount == 1

    def enroll(
        self, name: str, tags: dict[str, str], jti: str, expires_at: int, now_ms: int | None = None
    ) -> bool:
        """Consume token `jti` and record follower `name` with `tags`, atomically.

        Returns False (and changes nothing) when the token was already used. Enrolling a name
        again (a new token for the same follower) replaces its tags and keeps its last info.
        """
        now = _now_ms() if now_ms is None else now_ms
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                if not self._mark_used(jti, name, expires_at, now):
                    self._db.execute("ROLLBACK")
                    return False
                self._db.execute(
                    "INSERT INTO followers (name, enrolled_tags, info, enrolled_ms, last_seen_ms) "
                    "VALUES (?, ?, NULL, ?, NULL) "
                    "ON CONFLICT(name) DO UPDATE SET enrolled_tags = excluded.enrolled_tags, "
                    "enrolled_ms = excluded.enrolled_ms",
                    (name, msgspec.json.encode(tags).decode(), now),
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return True

    # -- connections -----------------------------------------------------------------------

    def record_hello(self, name: str, info: FollowerInfo, now_ms: int) -> None:
        """Store the facts of an accepted Hello."""
        with self._lock:
            self._db.execute(
                "UPDATE followers SET info = ?, last_seen_ms = ? WHERE name = ?",
                (msgspec.json.encode(info).decode(), now_ms, name),
            )

    def touch(self, name: str, last_seen_ms: int) -> None:
        self.touch_many([(name, last_seen_ms)])

    def touch_many(self, seen: Sequence[tuple[str, int]]) -> None:
        """Record when each named follower was last seen, in one transaction (never moving a
        last-seen time backwards)."""
        if not seen:
            return
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany(
                    "UPDATE followers SET last_seen_ms = MAX(COALESCE(last_seen_ms, 0), ?) "
                    "WHERE name = ?",
                    [(last_seen_ms, name) for name, last_seen_ms in seen],
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    # -- reading ---------------------------------------------------------------------------

    def _record(self, row: tuple[str, str, str | None, int, int | None]) -> FollowerRecord:
        name, tags_text, info_text, enrolled_ms, last_seen_ms = row
        info: FollowerInfo | None = None
        if info_text is not None:
            try:
                info = _INFO_DECODER.decode(info_text)
            except msgspec.DecodeError as exc:
                # Written by an older daemon with other rules: forget it until the next Hello.
                _log.warning("{}: ignoring stored facts of follower {!r}: {}", self.path, name, exc)
        return FollowerRecord(
            name=name,
            enrolled_tags=_TAGS_DECODER.decode(tags_text),
            info=info,
            enrolled_ms=enrolled_ms,
            last_seen_ms=last_seen_ms,
        )

    def get(self, name: str) -> FollowerRecord | None:
        with self._lock:
            row = self._db.execute(
                "SELECT name, enrolled_tags, info, enrolled_ms, last_seen_ms FROM followers "
                "WHERE name = ?",
                (name,),
            ).fetchone()
        return None if row is None else self._record(row)

    def followers(self) -> list[FollowerRecord]:
        """Every enrolled follower, sorted by name."""
        with self._lock:
            rows = self._db.execute(
                "SELECT name, enrolled_tags, info, enrolled_ms, last_seen_ms FROM followers "
                "ORDER BY name"
            ).fetchall()
        return [self._record(row) for row in rows]
