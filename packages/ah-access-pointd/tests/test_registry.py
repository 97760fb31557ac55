"""The SQLite fleet registry: one-time tokens, persistence across reopening."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest

from ah_access_pointd.registry import FleetRegistry, RegistryError
from ah_domain_types import FollowerInfo, OsKind, Resources


def _info(name: str, tags: dict[str, str]) -> FollowerInfo:
    return FollowerInfo(
        name=name,
        os=OsKind.LINUX,
        arch="x86_64",
        tags=tags,
        resources=Resources(cpus=2, memory_mb=512),
        host_key_fingerprint="SHA256:dGVzdA",
        direct_address="127.0.0.1:2222",
        workspace="/ws",
        version="0.1.0",
    )


def test_enroll_consumes_the_token_once_and_survives_reopening(tmp_path: Path) -> None:
    path = tmp_path / "fleet.db"
    registry = FleetRegistry(path)
    assert registry.enroll("lin-1", {"role": "a"}, "jti-1", expires_at=2**31, now_ms=1000)
    assert not registry.enroll("lin-1", {"role": "changed"}, "jti-1", expires_at=2**31)
    assert not registry.mark_used("jti-1", 2**31)
    assert registry.mark_used("jti-2", 2**31)
    assert not registry.enroll("lin-2", {}, "jti-2", expires_at=2**31)
    assert registry.get("lin-2") is None  # a refused enrollment records nothing

    record = registry.get("lin-1")
    assert record is not None and record.enrolled_tags == {"role": "a"} and record.info is None
    registry.record_hello("lin-1", _info("lin-1", {"x": "1"}), now_ms=5000)
    registry.touch("lin-1", 4000)  # never moves last-seen backwards
    registry.close()

    reopened = FleetRegistry(path)
    [stored] = reopened.followers()
    assert stored.name == "lin-1"
    assert stored.info == _info("lin-1", {"x": "1"})
    assert stored.last_seen_ms == 5000 and stored.enrolled_ms == 1000
    assert not reopened.enroll("lin-1", {}, "jti-1", expires_at=2**31)
    # A new token for the same name replaces the tags and keeps the facts.
    assert reopened.enroll("lin-1", {"role": "b"}, "jti-3", expires_at=2**31)
    again = reopened.get("lin-1")
    assert again is not None and again.enrolled_tags == {"role": "b"} and again.info is not None
    journal = sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0]
    assert journal == "wal"
    reopened.close()


def test_concurrent_use_of_one_token_succeeds_exactly_once(tmp_path: Path) -> None:
    registry = FleetRegistry(tmp_path / "fleet.db")
    results: list[bool] = []
    barrier = threading.Barrier(8)

    def attempt(i: int) -> None:
        barrier.wait()
        results.append(registry.enroll(f"lin-{i}", {}, "same-jti", expires_at=2**31))

    threads = [threading.Thread(target=attempt, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert sorted(results) == [False] * 7 + [True]
    assert len(registry.followers()) == 1
    registry.close()


def test_unknown_schema_version_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "fleet.db"
    db = sqlite3.connect(path)
    db.execute("PRAGMA user_version = 99")
    db.close()
    with pytest.raises(RegistryError, match=r"schema version 99"):
        FleetRegistry(path)
