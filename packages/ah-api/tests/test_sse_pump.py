"""`SsePump` and `Subscription` without HTTP: live batches published while a client is busy
are coalesced into one chunk that still holds exactly the event list, and a subscription
that keeps receiving events keeps moving its keep-alive deadline (one lazy timer, not one
per wait)."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Collection

from ah_api import EventHub, SsePump, SseSettings, StoredEvent, Subscription

SESSION = "s-pump"
_ID = re.compile(rb"^id: (\d+)$", re.M)


class MemorySource:
    """A session store in memory with the hub the pump subscribes to; `store` stores and
    then publishes, as the access point does."""

    def __init__(self) -> None:
        self.hub = EventHub()
        self.events: list[StoredEvent] = []

    def store(self, count: int) -> list[StoredEvent]:
        first = len(self.events) + 1
        batch = [
            StoredEvent(seq, "note", float(seq), b'{"type":"note","seq":%d}' % seq)
            for seq in range(first, first + count)
        ]
        self.events += batch
        self.hub.publish(SESSION, batch)
        return batch

    def read_events(
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
        assert session_id == SESSION and until is None and not descending
        return [e for e in self.events if e.seq > after][offset : offset + limit]

    def subscribe(self, session_id: str, max_queue: int) -> Subscription:
        return self.hub.subscribe(session_id, max_queue)


def ids(chunk: bytes) -> list[int]:
    return [int(raw) for raw in _ID.findall(chunk)]


def test_live_batches_published_while_the_client_is_busy_arrive_in_one_chunk_exactly_once() -> None:
    async def scenario() -> None:
        source = MemorySource()
        source.store(5)
        pump = SsePump(source, SESSION, after=2, types=None, settings=SseSettings(history_page=2))
        assert (await pump.__anext__()).startswith(b"retry:")  # subscribed from here on
        source.store(3)  # committed after the subscription, before any history read
        received: list[int] = []
        while len(received) < 6:  # history 3..8 in pages of two, overlap with live dropped
            received += ids(await pump.__anext__())
        assert received == [3, 4, 5, 6, 7, 8]
        # The next step finds the history exhausted and waits for live events...
        step = asyncio.ensure_future(pump.__anext__())

        async def until_live() -> None:
            while not pump.merge.live:  # polled each loop turn, bounded by the wait_for below
                await asyncio.sleep(0)

        await asyncio.wait_for(until_live(), 30)
        assert not step.done()
        # ...while three batches are stored and published before it runs again...
        for size in (4, 1, 7):
            source.store(size)
        chunk = await asyncio.wait_for(step, 30)
        # ...and go out as one write with every event once, in order.
        assert ids(chunk) == list(range(9, 21))
        assert chunk.count(b"\n\n") == 12
        assert chunk == b"".join(e.frame for e in source.events[8:])
        assert pump.sent_events == 18
        pump.close()

    asyncio.run(scenario())


def test_a_busy_subscription_moves_its_keepalive_deadline_and_expires_once_idle() -> None:
    async def scenario() -> None:
        source = MemorySource()
        subscription = source.subscribe(SESSION, 100)
        loop = asyncio.get_running_loop()
        # A short wait answered by an event at once: its (short) timer stays armed...
        loop.call_soon(source.store, 1)
        assert await subscription.wait(0.05) is True
        assert [e.seq for e in subscription.take()] == [1]
        # ...and when it fires, a later wait with a long deadline must not expire with it.
        second = asyncio.ensure_future(subscription.wait(3600))
        # A negative check needs time to pass, but it is ordered, not a race: the loop runs
        # due timers by deadline, so the stale 0.05 s timer runs before this 0.2 s sleep ends.
        await asyncio.sleep(0.2)
        assert not second.done(), "a stale keep-alive timer ended a wait before its deadline"
        source.store(2)
        assert await second is True
        assert [e.seq for e in subscription.take()] == [2, 3]
        # Idle for the whole timeout: False (time for a keep-alive comment).
        assert await asyncio.wait_for(subscription.wait(0.05), 30) is False
        # Closing wakes a waiter and cancels the timer.
        third = asyncio.ensure_future(subscription.wait(3600))
        await asyncio.sleep(0)  # one loop turn: `third` runs up to its wait before the close
        subscription.close()
        assert await asyncio.wait_for(third, 30) is True
        assert subscription._timer is None

    asyncio.run(scenario())
