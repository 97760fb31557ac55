"""Server-sent events of a session: live fan-out, the per-client pump, and its response.

* `StoredEvent`: one stored event as the store hands it out (seq, type, tsMs, JSON body); its
  SSE frame ``id: <seq>\\nevent: <type>\\ndata: <json>\\n\\n`` is built once and shared by
  every client.
* `EventHub`: in-process fan-out. `publish` never blocks: each `Subscription` has a bounded
  queue; a subscriber whose queue would overflow is marked overflowed and gets nothing more
  (its client is disconnected and resumes with ``Last-Event-ID``); others are unaffected.
* `SsePump`: one client. Subscribes first, replays history after the client's last id in
  pages, then follows live (`ah_api.merge.ReplayLiveMerge` makes the seam exact), and sends a
  ``: ka`` comment whenever it was idle for ``keepalive_s``.
* `EventStreamResponse`: streams a pump; when the pump's subscription overflows while the
  client is not even reading (the write is stuck), the connection is closed at once instead
  of waiting for the client to drain.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import AsyncIterator, Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from litestar.enums import MediaType
from litestar.response import Stream
from litestar.response.streaming import ASGIStreamingResponse

from .merge import ReplayLiveMerge

if TYPE_CHECKING:
    from litestar import Litestar, Request
    from litestar.background_tasks import BackgroundTask, BackgroundTasks
    from litestar.datastructures import Cookie
    from litestar.response.base import ASGIResponse
    from litestar.types import Receive, Send, TypeEncodersMap

__all__ = [
    "EVENT_STREAM_MEDIA_TYPE",
    "EventHub",
    "EventStreamResponse",
    "SsePump",
    "SseSettings",
    "StoredEvent",
    "Subscription",
]

EVENT_STREAM_MEDIA_TYPE = "text/event-stream"
KEEPALIVE = b": ka\n\n"

_log = logging.getLogger("ah_api")


@dataclass(frozen=True)
class SseSettings:
    keepalive_s: float = 15.0
    """An idle stream gets a ``: ka`` comment this often (proxies and clients see it alive)."""
    queue_size: int = 10_000
    """Live events a client may lag behind before it is disconnected."""
    history_page: int = 500
    """Events read from the store per replay step."""
    retry_ms: int = 1000
    """Reconnection delay suggested to EventSource clients (the stream's first line)."""

    def __post_init__(self) -> None:
        if self.keepalive_s <= 0 or self.queue_size < 1 or self.history_page < 1:
            raise ValueError(f"invalid SSE settings {self}")


@dataclass(eq=False, slots=True)
class StoredEvent:
    """One stored event of a session."""

    seq: int
    type: str
    ts_ms: float
    data: bytes
    """The event as JSON (with its ``seq`` and ``tsMs``), one line."""
    _frame: bytes | None = field(default=None, repr=False)

    @property
    def frame(self) -> bytes:
        """The event as one SSE message."""
        frame = self._frame
        if frame is None:
            frame = self._frame = b"id: %d\nevent: %s\ndata: %s\n\n" % (
                self.seq,
                self.type.encode(),
                self.data,
            )
        return frame


class PublishedBatch:
    """Events published together (ascending seqs), offered to every subscriber as one
    object: their SSE frames are joined once, by the first client that sends them whole,
    and every other client sends the same bytes."""

    __slots__ = ("_frames", "events")

    def __init__(self, events: Sequence[StoredEvent]) -> None:
        self.events = events
        self._frames: bytes | None = None

    @property
    def frames(self) -> bytes:
        frames = self._frames
        if frames is None:
            frames = self._frames = b"".join([e.frame for e in self.events])
        return frames


class Subscription:
    """Live events of one session for one client (event-loop thread only)."""

    def __init__(self, hub: EventHub, session_id: str, max_queue: int) -> None:
        self.hub = hub
        self.session_id = session_id
        self.max_queue = max_queue
        self.queue: deque[PublishedBatch] = deque()
        """Published batches not yet taken (whole: offer never splits one)."""
        self.queued = 0
        """Events in `queue`."""
        self.overflowed = False
        self.closed = False
        self.on_overflow: Callable[[], None] | None = None
        self._waiter: asyncio.Future[bool] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._deadline = 0.0

    def offer(self, events: Sequence[StoredEvent] | PublishedBatch) -> None:
        if self.overflowed or self.closed:
            return
        batch = events if isinstance(events, PublishedBatch) else PublishedBatch(events)
        if self.queued + len(batch.events) > self.max_queue:
            self.overflowed = True
            self.queue.clear()
            self.queued = 0
            self._wake(True)
            if self.on_overflow is not None:
                self.on_overflow()
            return
        self.queue.append(batch)
        self.queued += len(batch.events)
        self._wake(True)

    def take_batches(self) -> list[PublishedBatch]:
        """Everything queued, as published."""
        batches = list(self.queue)
        self.queue.clear()
        self.queued = 0
        return batches

    def take(self) -> list[StoredEvent]:
        """Everything queued, one event after the other."""
        return [event for batch in self.take_batches() for event in batch.events]

    def reset(self) -> None:
        """Forget the overflow (and everything queued): only while the client is still
        replaying history, which covers whatever was dropped."""
        self.overflowed = False
        self.queue.clear()
        self.queued = 0

    async def wait(self, timeout: float) -> bool:
        """Until something is queued, the queue overflowed or the hub closed (True), or
        ``timeout`` (False).

        A client that keeps receiving events waits here once per batch: instead of a timer
        per wait, one timer per subscription is moved forward lazily (when it fires before
        the latest deadline, it re-arms for that deadline), so it fires about once per
        ``timeout`` however many waits there were."""
        if self.queue or self.overflowed or self.closed:
            return True
        loop = asyncio.get_running_loop()
        self._deadline = deadline = loop.time() + timeout
        timer = self._timer
        if timer is None or timer.when() > deadline:
            if timer is not None:
                timer.cancel()
            self._timer = loop.call_at(deadline, self._on_timer)
        waiter: asyncio.Future[bool] = loop.create_future()
        self._waiter = waiter
        try:
            return await waiter
        finally:
            self._waiter = None

    def _wake(self, value: bool) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(value)

    def _on_timer(self) -> None:
        self._timer = None
        waiter = self._waiter
        if waiter is None or waiter.done():
            return  # nobody waits: the next wait arms a timer of its own
        loop = waiter.get_loop()
        if loop.time() + _TIMER_SLACK_S >= self._deadline:
            waiter.set_result(False)
        else:
            self._timer = loop.call_at(self._deadline, self._on_timer)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self._wake(True)
            self.hub._remove(self)


_TIMER_SLACK_S = 0.001
"""A keep-alive timer that fires this close to its deadline counts as expired."""


class EventHub:
    """Fan-out of newly stored events to live subscribers, per session."""

    def __init__(self) -> None:
        self._subscribers: dict[str, set[Subscription]] = {}
        self.overflows = 0
        """Subscribers disconnected for lagging, since start."""

    def subscribe(self, session_id: str, max_queue: int) -> Subscription:
        subscription = Subscription(self, session_id, max_queue)
        self._subscribers.setdefault(session_id, set()).add(subscription)
        return subscription

    def publish(self, session_id: str, events: Sequence[StoredEvent]) -> None:
        """Offer ``events`` (ascending seqs, just stored) to every subscriber; never blocks."""
        subscribers = self._subscribers.get(session_id)
        if not subscribers or not events:
            return
        batch = PublishedBatch(events)
        for subscription in list(subscribers):
            was = subscription.overflowed
            subscription.offer(batch)
            if subscription.overflowed and not was:
                self.overflows += 1

    def close(self) -> None:
        """End every subscription (the server is stopping): their streams end cleanly and
        their clients resume elsewhere or later with Last-Event-ID."""
        for subscribers in list(self._subscribers.values()):
            for subscription in list(subscribers):
                subscription.close()

    def subscriber_count(self, session_id: str | None = None) -> int:
        if session_id is not None:
            return len(self._subscribers.get(session_id, ()))
        return sum(len(s) for s in self._subscribers.values())

    def _remove(self, subscription: Subscription) -> None:
        subscribers = self._subscribers.get(subscription.session_id)
        if subscribers is not None:
            subscribers.discard(subscription)
            if not subscribers:
                del self._subscribers[subscription.session_id]


class EventSource(Protocol):
    """What a pump reads: the session's store and its live feed."""

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
    ) -> list[StoredEvent]: ...

    def subscribe(self, session_id: str, max_queue: int) -> Subscription: ...


class SsePump:
    """The byte chunks of one client's event stream (an async iterator)."""

    def __init__(
        self,
        source: EventSource,
        session_id: str,
        *,
        after: int,
        types: Collection[str] | None,
        settings: SseSettings,
    ) -> None:
        self.source = source
        self.session_id = session_id
        self.types = frozenset(types) if types else None
        self.settings = settings
        self._subscription: Subscription | None = None
        self.merge: ReplayLiveMerge[StoredEvent] = ReplayLiveMerge(after)
        self.abort = asyncio.Event()
        """Set when the client lags so far behind live events that it must be cut off."""
        self.on_abort: Callable[[], None] | None = None
        """Called when `abort` is set (the response abandons a write still pending)."""
        self.sent_events = 0
        self._started = False
        self._finished = False

    @property
    def subscription(self) -> Subscription:
        if self._subscription is None:
            raise RuntimeError("the pump has not started")
        return self._subscription

    def _overflowed(self) -> None:
        # Whoever is writing to a client that lets its queue overflow is stuck (or nearly):
        # a write still pending now is abandoned and the connection closed. If no write is
        # pending, a replaying pump just reads on (see `_replay_step`) and a live one ends
        # the stream at its next step.
        self.abort.set()
        if self.on_abort is not None:
            self.on_abort()

    def close(self) -> None:
        self._finished = True
        if self._subscription is not None:
            self._subscription.close()

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    async def __anext__(self) -> bytes:
        if self._finished:
            raise StopAsyncIteration
        if not self._started:
            self._started = True
            # Subscribe before the first history read: nothing committed after this point
            # can be missed, whatever the reads see (the merge drops the overlap).
            subscription = self.source.subscribe(self.session_id, self.settings.queue_size)
            subscription.on_overflow = self._overflowed
            self._subscription = subscription
            return b"retry: %d\n\n" % self.settings.retry_ms
        while not self.merge.live:
            if self.subscription.closed:
                self._finished = True
                raise StopAsyncIteration
            chunk = self._replay_step()
            if chunk:
                return chunk
        while True:
            subscription = self.subscription
            if subscription.closed:
                self._finished = True
                raise StopAsyncIteration
            if subscription.overflowed:
                self.close()
                _log.info(
                    "event stream of session %s: client lags more than %d events behind; "
                    "disconnecting it (it resumes with Last-Event-ID %d)",
                    self.session_id,
                    subscription.max_queue,
                    self.merge.cursor,
                )
                raise StopAsyncIteration
            batches = subscription.take_batches()
            if batches:
                if self.types is None and self.merge.pass_through(
                    batches[0].events[0].seq, batches[-1].events[-1].seq
                ):
                    # The common case: every event of the batches is new and wanted, so
                    # the client gets the frames every other client gets too.
                    self.sent_events += sum(len(batch.events) for batch in batches)
                    if len(batches) == 1:
                        return batches[0].frames
                    return b"".join([batch.frames for batch in batches])
                items = [event for batch in batches for event in batch.events]
                if self.types is not None:
                    items = [e for e in items if e.type in self.types]
                chunk = self._frames(self.merge.arrived_sorted(items, _seq))
                if chunk:
                    return chunk
                continue
            if not await subscription.wait(self.settings.keepalive_s):
                return KEEPALIVE

    def _replay_step(self) -> bytes:
        subscription = self.subscription
        if subscription.overflowed:
            # Still replaying: the dropped live events are in the store; read on.
            subscription.reset()
            self.merge.restart_history()
            self.abort.clear()
        limit = self.settings.history_page
        page = self.source.read_events(
            self.session_id, after=self.merge.cursor, types=self.types, limit=limit
        )
        return self._frames(
            self.merge.history(((e.seq, e) for e in page), exhausted=len(page) < limit)
        )

    def _frames(self, events: list[StoredEvent]) -> bytes:
        self.sent_events += len(events)
        return b"".join([e.frame for e in events])


def _seq(event: StoredEvent) -> int:
    return event.seq


class _StalledResponseLogFilter(logging.Filter):
    """uvicorn logs an error when an ASGI app returns before completing its response; for an
    event stream we cut off on purpose that is expected, so it becomes an info line."""

    message = "ASGI callable returned without completing response."

    def __init__(self) -> None:
        super().__init__()
        self.expected = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if self.expected and record.getMessage() == self.message:
            self.expected -= 1
            record.levelno, record.levelname = logging.INFO, "INFO"
            record.msg, record.args = "closed the connection of a stalled event-stream client", ()
        return True


_stalled_filter = _StalledResponseLogFilter()
logging.getLogger("uvicorn.error").addFilter(_stalled_filter)


class _EventStreamASGIResponse(ASGIStreamingResponse):
    """Streams an `SsePump`; a write still pending when the pump aborts is abandoned."""

    def __init__(self, *, pump: SsePump, **kwargs: Any) -> None:
        super().__init__(iterator=pump, **kwargs)
        self.pump = pump

    async def send_body(self, send: Send, receive: Receive) -> None:
        pump = self.pump
        streaming = asyncio.ensure_future(self._stream_abortable(send))
        listening = asyncio.ensure_future(_until_disconnect(receive))
        try:
            await asyncio.wait({streaming, listening}, return_when=asyncio.FIRST_COMPLETED)
            if streaming.done() and streaming.result():
                # Cut off: return without completing the response, so the server closes the
                # connection (and logs that it did, see _StalledResponseLogFilter).
                _stalled_filter.expected += 1
        finally:
            for task in (streaming, listening):
                task.cancel()
            await asyncio.gather(streaming, listening, return_exceptions=True)
            pump.close()

    async def _stream_abortable(self, send: Send) -> bool:
        """Send every chunk; True when the client was cut off mid-way.

        Writes are awaited directly (no task per write: this is the hot path, one write per
        pushed batch and client). The pump's abort hook runs synchronously when the client's
        queue overflows; if a write is pending then, the client is not reading: this task is
        cancelled out of the write and the connection closed."""
        pump = self.pump
        task = asyncio.current_task()
        assert task is not None
        writing = False
        cut = False

        def on_abort() -> None:
            nonlocal cut
            if writing and not cut:
                cut = True
                task.cancel()

        pump.on_abort = on_abort
        try:
            async for chunk in pump:
                message: Any = {"type": "http.response.body", "body": chunk, "more_body": True}
                writing = True
                try:
                    await send(message)
                finally:
                    writing = False
            # The end of the stream (a lagging client told to resume): it must not wait on a
            # client that does not read either.
            end: Any = {"type": "http.response.body", "body": b"", "more_body": False}
            give_up = asyncio.ensure_future(asyncio.sleep(pump.settings.keepalive_s))
            try:
                return not await self._write(send, end, give_up)
            finally:
                give_up.cancel()
        except asyncio.CancelledError:
            if not cut:
                raise
            task.uncancel()
            _log.info(
                "event stream of session %s: the client stopped reading and lags more "
                "than %d events behind; closing its connection",
                pump.session_id,
                pump.settings.queue_size,
            )
            return True
        finally:
            pump.on_abort = None

    @staticmethod
    async def _write(send: Send, message: Any, unless: asyncio.Future[Any]) -> bool:
        """Send ``message`` unless ``unless`` completes first (then the write is abandoned
        and False returned)."""
        writing = asyncio.ensure_future(send(message))
        await asyncio.wait({writing, unless}, return_when=asyncio.FIRST_COMPLETED)
        if writing.done():
            writing.result()
            return True
        writing.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await writing
        return False


async def _until_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


class EventStreamResponse(Stream):
    """The ``text/event-stream`` response of one `SsePump`."""

    def __init__(self, pump: SsePump, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(
            pump,
            media_type=EVENT_STREAM_MEDIA_TYPE,
            headers={
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",
                **(headers or {}),
            },
        )
        self.pump = pump

    def to_asgi_response(
        self,
        app: Litestar | None,
        request: Request[Any, Any, Any],
        *,
        background: BackgroundTask | BackgroundTasks | None = None,
        cookies: Iterable[Cookie] | None = None,
        encoded_headers: Iterable[tuple[bytes, bytes]] | None = None,
        headers: dict[str, str] | None = None,
        is_head_response: bool = False,
        media_type: MediaType | str | None = None,
        status_code: int | None = None,
        type_encoders: TypeEncodersMap | None = None,
    ) -> ASGIResponse:
        merged_headers = {**headers, **self.headers} if headers is not None else self.headers
        return _EventStreamASGIResponse(
            pump=self.pump,
            background=self.background or background,
            content_length=0,
            cookies=self.cookies if cookies is None else [*self.cookies, *cookies],
            encoded_headers=encoded_headers,
            encoding=self.encoding,
            headers=merged_headers,
            is_head_response=is_head_response,
            media_type=EVENT_STREAM_MEDIA_TYPE,
            status_code=self.status_code or status_code,
        )
