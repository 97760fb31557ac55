"""When connected followers were last seen reaches the registry in one transaction per interval,
not one per heartbeat (real QUIC over UDP, the real SQLite registry)."""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path

import pytest

from ah_access_pointd import fleet as fleet_module
from ah_access_pointd.fleet import AccessPointFleet
from ah_access_pointd.registry import FleetRegistry
from ah_access_pointd.state import init_state
from ah_connectivity import (
    Backoff,
    ControlClient,
    ControlServer,
    Identity,
    generate_private_key,
    issue_from_csr,
    make_csr,
    spiffe_id_for_follower,
)
from ah_domain_types import (
    ControlMessage,
    FollowerInfo,
    OsKind,
    Resources,
    StreamError,
    StreamErrorCode,
)

PERSIST_MS = 200
HEARTBEAT_MS = 50
NAMES = ["seen-1", "seen-2", "seen-3"]


def _info(name: str) -> FollowerInfo:
    return FollowerInfo(
        name=name,
        os=OsKind.LINUX,
        arch="x86_64",
        tags={},
        resources=Resources(cpus=1, memory_mb=64),
        host_key_fingerprint="SHA256:bGFzdC1zZWVu",
        direct_address=None,
        workspace="/nowhere",
        version="0.1.0",
    )


async def _no_rpc(msg: ControlMessage) -> ControlMessage:
    return StreamError(code=StreamErrorCode.UNEXPECTED_MESSAGE, message="no RPCs here")


def _write_transactions(statements: list[str]) -> int:
    """Explicit transactions plus UPDATEs that ran as their own (autocommit) transaction."""
    count, inside = 0, False
    for statement in statements:
        verb = statement.split(None, 1)[0].upper()
        if verb == "BEGIN":
            count, inside = count + 1, True
        elif verb in ("COMMIT", "ROLLBACK"):
            inside = False
        elif verb == "UPDATE" and not inside:
            count += 1
    return count


def test_last_seen_is_written_once_per_interval_for_all_followers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fleet_module, "_PERSIST_EVERY_MS", PERSIST_MS)
    state = init_state(tmp_path / "ap", trust_domain="seen.fleet")
    registry = FleetRegistry(state.db_path)
    identities: dict[str, Identity] = {}
    for name in NAMES:
        assert registry.enroll(name, {}, f"jti-{name}", expires_at=2**31)
        key = generate_private_key()
        cert = issue_from_csr(
            state.ca, make_csr(key, name), spiffe_id_for_follower(state.trust_domain, name)
        )
        identities[name] = Identity(key=key, cert=cert)
    statements: list[str] = []
    registry._db.set_trace_callback(statements.append)
    fleet = AccessPointFleet(state, registry, heartbeat_interval_ms=HEARTBEAT_MS)

    def last_seen() -> dict[str, int]:
        return {r.name: r.last_seen_ms or 0 for r in registry.followers()}

    async def body() -> tuple[int, float, dict[str, int], dict[str, int]]:
        server = ControlServer(
            identity=state.identity,
            ca=state.ca,
            trust_domain=state.trust_domain,
            handler=fleet,
            heartbeat_interval_ms=HEARTBEAT_MS,
        )
        async with server:
            port = await server.start()
            clients = [
                ControlClient(
                    host="127.0.0.1",
                    port=port,
                    identity=identities[name],
                    ca=state.ca.cert,
                    trust_domain=state.trust_domain,
                    info=_info(name),
                    on_rpc=_no_rpc,
                    backoff=Backoff(base_s=0.05, cap_s=0.3, rng=random.Random(i)),
                )
                for i, name in enumerate(NAMES)
            ]
            tasks = [asyncio.create_task(c.run()) for c in clients]
            for client in clients:
                await client.wait_connected(10)
            at_hello = last_seen()
            statements.clear()
            started = time.monotonic()
            # Wait until every follower's stored last-seen time moved on by 3 intervals.
            async with asyncio.timeout(15):
                while not all(
                    seen >= at_hello[name] + 3 * PERSIST_MS for name, seen in last_seen().items()
                ):
                    await asyncio.sleep(0.02)
            elapsed_ms = (time.monotonic() - started) * 1000
            transactions = _write_transactions(statements)
            for client in clients:
                await client.stop()
            await asyncio.gather(*tasks)
        return transactions, elapsed_ms, at_hello, last_seen()

    try:
        transactions, elapsed_ms, at_hello, final = asyncio.run(body())
    finally:
        fleet.close()
        registry.close()
    # One write per interval covers all three followers (one per follower per interval would
    # be three times as many).
    assert 1 <= transactions <= elapsed_ms / PERSIST_MS + 1, (transactions, elapsed_ms)
    assert all(final[name] > at_hello[name] for name in NAMES)


def test_touch_many_updates_each_follower_and_never_goes_back(tmp_path: Path) -> None:
    registry = FleetRegistry(tmp_path / "fleet.db")
    for name in NAMES:
        assert registry.enroll(name, {}, f"jti-{name}", expires_at=2**31)
    registry.touch_many([("seen-1", 5000), ("seen-2", 7000), ("nobody", 9000)])
    registry.touch_many([("seen-1", 4000), ("seen-2", 8000)])
    registry.touch_many([])
    assert {r.name: r.last_seen_ms for r in registry.followers()} == {
        "seen-1": 5000,
        "seen-2": 8000,
        "seen-3": None,
    }
    registry.close()
