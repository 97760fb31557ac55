"""The leader's session event sink: what ``run`` and ``fence`` call to publish their events.

.. code-block:: python

    sink = SessionEventSink.from_context(app)          # app: FleetContext
    session_id = sink.start(requested_session_id)      # None: a new s-<time>-<rand> id
    sink.emit(sink.make(FenceStartedEvent, snapshot_id=snap, hosts=names))
    ...
    report = sink.close()                              # flushes (bounded), never raises

`emit` never blocks and never fails: events go to a local copy (JSON lines, one event per
line, ``<log dir>/sessions/<session id>.events.jsonl``) and to an in-memory queue that a
background thread pushes to the access point over QUIC (``ah-leader/1``, authenticated by the
user's token, see ``ah_connectivity.leader_push``), in order, each exactly once, reconnecting
as needed. When the access point cannot be reached or refuses the token, the sink says so once
on stderr and the run goes on; `close` waits a bounded time for what is still unacknowledged.

The leader agent runs many short runs: it holds one `AgentEventPush` (one QUIC connection for
all its runs, on its own event loop, see ``ah_connectivity.leader_push.LeaderPushConnection``)
and gives each run an `AgentSessionSink` with the same meaning (``start``, ``make``, ``emit``,
an awaitable ``close``) and no thread, loop or handshake of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit

import click
import msgspec

from ah_domain_types import Event, encode_event_json, validate_session_id

if TYPE_CHECKING:
    import ssl

    from ah_connectivity.leader_push import (
        LeaderPushClient,
        LeaderPushConnection,
        LeaderPushSession,
        PushStatus,
    )

    from .context import FleetContext

__all__ = [
    "AgentEventPush",
    "AgentSessionSink",
    "PushTarget",
    "SessionEventSink",
    "SinkReport",
    "discover_push_target",
    "new_session_id",
]

E = TypeVar("E", bound=Event)
_R = TypeVar("_R")

DEFAULT_CLOSE_TIMEOUT_S = 5.0
DEFAULT_MAX_BUFFERED = 100_000
UNREACHABLE_CLOSE_TIMEOUT_S = 1.0
"""What `close` waits at most once the access point proved unreachable."""

PushTarget = tuple[str, int, str, str]
"""(host, QUIC port, trust domain, fleet CA PEM) of the access point's push endpoint."""


def new_session_id() -> str:
    """A fresh session id: ``s-<UTC time>-<6 hex>``."""
    from ah_connectivity.leader_push import new_session_id as make

    return make()


@dataclass(frozen=True)
class SinkReport:
    """What `SessionEventSink.close` achieved."""

    session_id: str
    emitted: int
    delivered: int
    """Events the access point acknowledged."""
    last_seq: int
    """The session's highest seq the access point reported (0: none)."""
    local_copy: Path | None
    error: str | None
    """Why events were not (all) delivered, if they were not."""

    @property
    def complete(self) -> bool:
        return self.delivered == self.emitted


def _stderr_warning(message: str) -> None:
    click.echo(f"warning: {message}", err=True)


class _SinkBase:
    """What every sink does the same way: the session id, the local copy, the counts, the
    warnings (each said once) and the report."""

    def __init__(
        self,
        *,
        local_copy_dir: Path | None,
        warn: Callable[[str], None],
        max_buffered: int,
    ) -> None:
        self.local_copy_dir = local_copy_dir
        self.max_buffered = max_buffered
        self._warn = warn
        self.session_id: str | None = None
        self.local_copy: Path | None = None
        self._file: Any = None
        self._warned: set[str] = set()
        self._emitted = 0
        self._dropped = 0
        self._error: str | None = None
        self._closed = False
        self._refused = False

    @property
    def emitted(self) -> int:
        return self._emitted

    def _begin(self, session_id: str | None, *, open_local: bool = True) -> str:
        session_id = validate_session_id(session_id) if session_id else new_session_id()
        self.session_id = session_id
        if open_local:
            self._open_local_copy()
        return session_id

    def _open_local_copy(self) -> None:
        if self.local_copy_dir is None or self.session_id is None:
            return
        path = self.local_copy_dir / f"{self.session_id}.events.jsonl"
        try:
            self.local_copy_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            self._file = os.fdopen(fd, "ab")
            self.local_copy = path
        except OSError as exc:
            self._warn_once("local", f"cannot keep a local copy of the session events: {exc}")

    def make(self, cls: type[E], **fields: Any) -> E:
        """An event of this session stamped now (the access point assigns the final seq and
        timestamp): ``sink.make(HostStartedEvent, host="lin-a", command="make")``."""
        if self.session_id is None:
            raise RuntimeError("start the sink before making events")
        fields.setdefault("session_id", self.session_id)
        fields.setdefault("ts_ms", time.time() * 1000)
        return cls(**fields)

    def _record(self, event: Event, *, write: bool = True) -> Event:
        """Count ``event`` and (unless ``write`` is False: the caller does it later) append
        it to the local copy (the caller holds the lock, if any); returns it with this
        session's id."""
        if self.session_id is None or self._closed:
            raise RuntimeError("emit needs a started, open sink")
        if event.session_id not in ("", self.session_id):
            event = msgspec.structs.replace(event, session_id=self.session_id)
        self._emitted += 1
        if write:
            self._write_local(event)
        return event

    def _write_local(self, event: Event) -> None:
        if self._file is not None:
            try:
                self._file.write(encode_event_json(event) + b"\n")
            except OSError as exc:
                self._file = None
                self._warn_once("local", f"cannot write the local copy {self.local_copy}: {exc}")

    def _queue(self, queue: deque[Event], event: Event) -> None:
        """Append ``event`` to ``queue``, dropping the oldest beyond `max_buffered`."""
        queue.append(event)
        if len(queue) > self.max_buffered:
            queue.popleft()
            self._dropped += 1
            self._warn_once(
                "dropped",
                f"more than {self.max_buffered} session events are waiting for the access "
                f"point; the oldest are only in the local copy {self.local_copy}",
            )

    def _close_local_copy(self) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = None

    def _final_report(self, delivered: int, last_seq: int) -> SinkReport:
        """The report of `close` (warning once when events did not get through)."""
        report = self._report_with(delivered, last_seq)
        if not report.complete and self._error is None:
            self._error = "the access point did not acknowledge every event before close"
            report = self._report_with(delivered, last_seq)
        if not report.complete:
            where = f"; they are in {report.local_copy}" if report.local_copy else ""
            self._warn_once(
                "undelivered",
                f"{report.emitted - report.delivered} of {report.emitted} events of session "
                f"{report.session_id} did not reach the access point ({report.error}){where}",
            )
        return report

    def _report_with(self, delivered: int, last_seq: int) -> SinkReport:
        return SinkReport(
            session_id=self.session_id or "",
            emitted=self._emitted,
            delivered=delivered,
            last_seq=last_seq,
            local_copy=self.local_copy,
            error=self._error,
        )

    def _warn_once(self, key: str, message: str) -> None:
        if key in self._warned:
            return
        self._warned.add(key)
        with contextlib.suppress(Exception):  # a warning must never break the run
            self._warn(message)

    def _local_note(self) -> str:
        return f" (a local copy is in {self.local_copy})" if self.local_copy else ""

    def _refused_by(self, reason: str) -> None:
        self._error = reason
        self._refused = True
        self._warn_once(
            "refused",
            f"the access point refused the session events ({reason}); going on without "
            f"them{self._local_note()}",
        )

    async def _until_reached(self, api_url: str, attempt: Callable[[], Awaitable[_R]]) -> _R | None:
        """``attempt()`` again and again (with backoff) until it gets through to the access
        point at ``api_url``; None when the access point refused us (said once, as is being
        unreachable)."""
        from ah_connectivity.backoff import Backoff

        backoff = Backoff(base_s=0.5, cap_s=10.0)
        while True:
            try:
                return await attempt()
            except _Refused as exc:
                self._refused_by(str(exc))
                return None
            except Exception as exc:
                self._error = f"cannot reach the access point {api_url}: {_describe(exc)}"
                self._warn_once(
                    "unreachable",
                    f"{self._error}; session events will be sent when it answers"
                    f"{self._local_note()}",
                )
                await asyncio.sleep(backoff.next_delay())

    def _on_push_status(self, status: PushStatus) -> None:
        if status.connected:
            if self._error is not None and "unreachable" in self._warned:
                self._warn_once("reconnected", "session events reach the access point again")
            self._error = None
        elif status.last_error:
            self._error = f"lost the access point: {status.last_error}"
            self._warn_once(
                "unreachable",
                f"{self._error}; session events will be sent when it answers{self._local_note()}",
            )


class SessionEventSink(_SinkBase):
    """Pushes one session's events to the access point from a background thread."""

    def __init__(
        self,
        *,
        api_url: str,
        token: str,
        verify: ssl.SSLContext,
        ca_pem: str | None = None,
        local_copy_dir: Path | None = None,
        connect_timeout_s: float = 5.0,
        close_timeout_s: float = DEFAULT_CLOSE_TIMEOUT_S,
        max_buffered: int = DEFAULT_MAX_BUFFERED,
        warn: Callable[[str], None] = _stderr_warning,
        client_version: str = "",
        push_target: PushTarget | None = None,
        connect_delay_s: float = 0.0,
    ) -> None:
        """``verify`` checks the API's TLS (the pinned fleet CA); ``ca_pem`` is the fleet CA
        that the QUIC handshake is checked against (fetched from the API when None)."""
        super().__init__(local_copy_dir=local_copy_dir, warn=warn, max_buffered=max_buffered)
        self.api_url = api_url.rstrip("/")
        self._token = token
        self._verify = verify
        self._ca_pem = ca_pem
        self.connect_timeout_s = connect_timeout_s
        self.close_timeout_s = close_timeout_s
        self.client_version = client_version
        self.push_target = push_target
        """(host, QUIC port, trust domain, fleet CA PEM) of the push endpoint: given, it
        spares the HTTPS discovery; set once discovered."""
        self.connect_delay_s = connect_delay_s
        """Wait this long (or until :meth:`close`) before connecting: a run that ends sooner
        is not slowed by the handshake; events are queued meanwhile and nothing is lost."""
        self._lock = threading.Lock()
        self._inbox: deque[Event] = deque()
        self._wake_scheduled = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._client: LeaderPushClient | None = None
        self._closing: asyncio.Event | None = None
        self._ready = threading.Event()
        self._close_budget = close_timeout_s
        self._client_ready: asyncio.Event | None = None

    @classmethod
    def from_context(cls, app: FleetContext, **kwargs: Any) -> SessionEventSink:
        """A sink for the configured access point, token and pinned CA; the local copy goes
        to ``<log dir>/sessions``."""
        from . import __version__
        from .client import tls_context
        from .commands.exec import runs_dir

        ca_file = app.ca_file()
        ca_pem: str | None = None
        if ca_file is not None:
            with contextlib.suppress(OSError):
                ca_pem = ca_file.read_text()
        kwargs.setdefault("local_copy_dir", runs_dir(app).parent / "sessions")
        kwargs.setdefault("connect_timeout_s", app.connect_timeout_s())
        kwargs.setdefault("client_version", f"ah-fleetctl {__version__}")
        return cls(
            api_url=app.access_point(),
            token=app.token(),
            verify=tls_context(ca_file),
            ca_pem=ca_pem,
            **kwargs,
        )

    # -- the caller's side -----------------------------------------------------------------

    def start(self, session_id: str | None = None) -> str:
        """Begin (or, with ``session_id``, join) a session; returns its id at once (the
        connection is made in the background)."""
        if self._thread is not None:
            raise RuntimeError("SessionEventSink.start called twice")
        session_id = self._begin(session_id)
        self._thread = threading.Thread(
            target=self._thread_main, name=f"ah-events-{session_id}", daemon=True
        )
        self._thread.start()
        # Not waiting for the thread's loop here: events emitted meanwhile queue in the inbox
        # (the loop drains it once up), and close() waits for it — the run starts sooner.
        return session_id

    def emit(self, event: Event) -> None:
        """Queue ``event`` for the access point and append it to the local copy; never blocks
        on the network, never raises."""
        schedule = False
        with self._lock:
            event = self._record(event)
            if self._refused:
                return  # the access point refused us: the local copy is all there is
            self._queue(self._inbox, event)
            if not self._wake_scheduled and self._loop is not None:
                self._wake_scheduled = schedule = True
        if schedule:
            assert self._loop is not None
            with contextlib.suppress(RuntimeError):  # the loop is gone: close() reports it
                self._loop.call_soon_threadsafe(self._drain)

    @property
    def delivered(self) -> int:
        client = self._client
        return client.sender.acked_lseq if client is not None else 0

    @property
    def connected(self) -> bool:
        client = self._client
        return client is not None and client.connected

    def close(self, timeout: float | None = None) -> SinkReport:
        """Flush what is queued (waiting at most ``timeout``, default ``close_timeout_s``,
        and only briefly when the access point is not connected), stop, and report."""
        if self._closed:
            return self._report()
        self._closed = True
        budget = self.close_timeout_s if timeout is None else timeout
        if self._thread is not None:
            self._ready.wait(5.0)  # the thread's loop is up (or the thread ended)
        loop, thread = self._loop, self._thread
        if loop is not None and thread is not None and thread.is_alive():
            closing = self._closing
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._drain)
                if closing is not None:
                    loop.call_soon_threadsafe(self._begin_close, budget)
            thread.join(budget + 5.0)
        with self._lock:
            self._close_local_copy()
        client = self._client
        return self._final_report(self.delivered, client.status.last_seq if client else 0)

    def __enter__(self) -> SessionEventSink:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _report(self) -> SinkReport:
        client = self._client
        return self._report_with(self.delivered, client.status.last_seq if client else 0)

    # -- the background thread -------------------------------------------------------------

    def _thread_main(self) -> None:
        try:
            asyncio.run(self._main())
        except Exception as exc:  # never let the sink take the run down
            self._error = f"{type(exc).__name__}: {exc}"
            self._warn_once("crash", f"session events stopped: {self._error}")
        finally:
            self._ready.set()

    async def _main(self) -> None:
        loop = asyncio.get_running_loop()
        self._closing = asyncio.Event()
        with self._lock:
            self._loop = loop
            if self._inbox:
                self._wake_scheduled = True
                loop.call_soon(self._drain)
        self._ready.set()
        client_ready = self._client_ready = asyncio.Event()
        push = asyncio.ensure_future(self._push())
        await self._closing.wait()
        start = loop.time()
        deadline = start + self._close_budget
        # While things work (or are still being set up) the whole budget is there for the
        # acks; once the access point proved unreachable, only a short last chance.
        if self._error is not None:
            deadline = min(deadline, start + min(UNREACHABLE_CLOSE_TIMEOUT_S, self._close_budget))
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(0.0, deadline - loop.time())):
                await client_ready.wait()
        client = self._client
        if client is not None and not push.done():
            self._drain()
            if not await client.flush(max(0.0, deadline - loop.time())) and self._error is None:
                status = client.status
                self._error = status.last_error or "not connected to the access point"
            await client.stop(timeout=max(0.1, deadline - loop.time()))
        elif client is None and self._error is None:
            self._error = "the push endpoint was not found before close"
        push.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await push

    def _begin_close(self, budget: float) -> None:
        self._close_budget = budget
        if self._closing is not None:
            self._closing.set()

    def _drain(self) -> None:
        client = self._client
        with self._lock:
            self._wake_scheduled = False
            if client is None:
                return
            events = list(self._inbox)
            self._inbox.clear()
        for event in events:
            client.emit(event)

    async def _push(self) -> None:
        """Discover the push endpoint, then keep the QUIC client running."""
        from ah_connectivity.leader_push import LeaderPushClient

        assert self.session_id is not None
        if self.connect_delay_s > 0 and self._closing is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.connect_delay_s):
                    await self._closing.wait()

        async def discover() -> tuple[str, int, str, str]:
            if self.push_target is None:
                self.push_target = await discover_push_target(
                    self.api_url, self._token, self._verify, self._ca_pem,
                    self.connect_timeout_s,
                )  # fmt: skip
            return self.push_target

        target = await self._until_reached(self.api_url, discover)
        if target is None:
            with self._lock:
                self._inbox.clear()
            return
        host, port, trust_domain, ca_pem = target
        client = LeaderPushClient(
            host=host,
            port=port,
            ca=ca_pem,
            trust_domain=trust_domain,
            token=self._token,
            session_id=self.session_id,
            client_version=self.client_version,
            connect_timeout_s=self.connect_timeout_s,
            on_status=self._on_push_status,
        )
        self._client = client
        if self._client_ready is not None:
            self._client_ready.set()
        self._drain()
        await client.run()
        refused = client.status.refused
        if refused is not None:
            self._refused_by(f"{refused.code.value}: {refused.message}")


# --------------------------------------------------------------------------- the agent's


class AgentEventPush:
    """The leader agent's session events: one `LeaderPushConnection` to the access point for
    all the agent's runs, on the agent's event loop (made by the first run that pushes, kept
    up between runs, re-made when lost). Each run gets an `AgentSessionSink` (`sink`)."""

    def __init__(
        self,
        *,
        api_url: str,
        token: str,
        verify: ssl.SSLContext,
        ca_pem: str | None = None,
        connect_timeout_s: float = 5.0,
        close_timeout_s: float = DEFAULT_CLOSE_TIMEOUT_S,
        client_version: str = "",
        release_delay_s: float = 0.25,
        answer_timeout_s: float = 3.0,
        push_target: PushTarget | None = None,
    ) -> None:
        """``release_delay_s``: a run's events wait in memory until the run is closed or
        this long (whichever comes first): a short run answers before any of its events
        compete with it for the CPU; a longer one streams them live from then on."""
        self.api_url = api_url.rstrip("/")
        self.token = token
        self._verify = verify
        self._ca_pem = ca_pem
        self.connect_timeout_s = connect_timeout_s
        self.close_timeout_s = close_timeout_s
        self.client_version = client_version
        self.release_delay_s = release_delay_s
        self.answer_timeout_s = answer_timeout_s
        self.push_target = push_target
        self.connection: LeaderPushConnection | None = None
        self._connections_before = 0
        """Connections made by connections replaced since (see `connections`)."""
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()

    @property
    def connections(self) -> int:
        """QUIC connections to the access point established so far (all runs)."""
        current = self.connection.status.connections if self.connection is not None else 0
        return self._connections_before + current

    def sink(
        self, local_copy_dir: Path | None, warn: Callable[[str], None] = _stderr_warning
    ) -> AgentSessionSink:
        """A sink for one run (``start`` it, ``emit``, then ``await close()``)."""
        return AgentSessionSink(self, local_copy_dir=local_copy_dir, warn=warn)

    async def connect(self) -> LeaderPushConnection:
        """The shared connection (discovering the push endpoint over HTTPS the first time).

        Raises:
            _Refused: the API refused the token; any other exception: unreachable.
        """
        async with self._lock:
            if self.connection is not None:
                return self.connection
            from ah_connectivity.backoff import Backoff
            from ah_connectivity.leader_push import LeaderPushConnection

            if self.push_target is None:
                self.push_target = await discover_push_target(
                    self.api_url, self.token, self._verify, self._ca_pem, self.connect_timeout_s
                )
            host, port, trust_domain, ca_pem = self.push_target
            connection = LeaderPushConnection(
                host=host,
                port=port,
                ca=ca_pem,
                trust_domain=trust_domain,
                backoff=Backoff(base_s=0.2, cap_s=5.0),
                connect_timeout_s=self.connect_timeout_s,
                answer_timeout_s=self.answer_timeout_s,
            )
            self.connection = connection
            self._task = asyncio.get_running_loop().create_task(
                connection.run(), name="ah-session-events"
            )
            return connection

    async def forget(self, connection: LeaderPushConnection) -> None:
        """``connection`` did not deliver a run's events and is not connected: the next run
        asks the API for the push endpoint again (the access point may have moved)."""
        if self.connection is not connection or connection.connected:
            return
        self.push_target = None
        self.connection = None
        self._connections_before += connection.status.connections
        await self._stop(connection, self._task, 1.0)

    async def close(self, timeout: float = 5.0) -> None:
        """Finish every session and close the connection (the agent is exiting)."""
        connection, task = self.connection, self._task
        self.connection = self._task = None
        if connection is not None:
            self._connections_before += connection.status.connections
            await self._stop(connection, task, timeout)

    @staticmethod
    async def _stop(
        connection: LeaderPushConnection, task: asyncio.Task[None] | None, timeout: float
    ) -> None:
        await connection.stop(timeout)
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


class AgentSessionSink(_SinkBase):
    """One run's session events in the leader agent (see `AgentEventPush`): the meaning of
    `SessionEventSink` (``emit`` never blocks or raises, a local copy of every event, a
    bounded flush at close, one warning when the access point is unreachable or refuses),
    on the agent's event loop and its shared connection."""

    def __init__(
        self,
        push: AgentEventPush,
        *,
        local_copy_dir: Path | None,
        warn: Callable[[str], None] = _stderr_warning,
        max_buffered: int = DEFAULT_MAX_BUFFERED,
    ) -> None:
        super().__init__(local_copy_dir=local_copy_dir, warn=warn, max_buffered=max_buffered)
        self.push = push
        self._held: deque[Event] = deque()
        """Events emitted before the release (see `AgentEventPush.release_delay_s`); they
        go to the local copy then too (file work after the run answered, like the push)."""
        self._released = False
        self._release_timer: asyncio.TimerHandle | None = None
        self._attaching: asyncio.Task[None] | None = None
        self._session: LeaderPushSession | None = None
        self._connection: LeaderPushConnection | None = None
        self._report_cache: SinkReport | None = None

    def start(self, session_id: str | None = None) -> str:
        """Begin (or join) a session; returns its id at once. Call on the agent's loop."""
        if self.session_id is not None:
            raise RuntimeError("AgentSessionSink.start called twice")
        session_id = self._begin(session_id, open_local=False)
        loop = asyncio.get_running_loop()
        self._release_timer = loop.call_later(self.push.release_delay_s, self._release)
        return session_id

    def emit(self, event: Event) -> None:
        """Append ``event`` to the local copy and queue it for the access point; never
        blocks, never raises. Call on the agent's event loop."""
        if not self._released:
            self._held.append(self._record(event, write=False))
            if len(self._held) >= self.max_buffered:
                self._release()  # to the local copy now, and the access point when it can
            return
        event = self._record(event)
        if self._refused:
            return
        session = self._session
        if session is not None:
            session.emit(event)
        else:
            self._queue(self._held, event)

    @property
    def delivered(self) -> int:
        session = self._session
        return session.sender.acked_lseq if session is not None else 0

    async def close(self, timeout: float | None = None) -> SinkReport:
        """Send what is held, wait (at most ``timeout``, default
        `AgentEventPush.close_timeout_s`, and only briefly when the access point proved
        unreachable) for the acks, finish the session and report. Never raises."""
        if self._report_cache is not None:
            return self._report_cache
        self._closed = True
        loop = asyncio.get_running_loop()
        budget = self.push.close_timeout_s if timeout is None else timeout
        deadline = loop.time() + budget
        self._release()
        attaching = self._attaching
        if attaching is not None and not attaching.done():
            with contextlib.suppress(Exception):  # TimeoutError; _attach reports the rest
                await asyncio.wait_for(asyncio.shield(attaching), self._remaining(deadline))
            if not attaching.done():
                attaching.cancel()
        session, connection = self._session, self._connection
        if session is not None and connection is not None:
            if not session.sender.all_acked and not connection.connected:
                deadline = min(deadline, loop.time() + UNREACHABLE_CLOSE_TIMEOUT_S)
            await session.close(self._remaining(deadline))
            if not session.sender.all_acked and self._error is None:
                self._error = session.status.last_error or "not connected to the access point"
            refused = session.status.refused
            if refused is not None:
                self._refused_by(f"{refused.code.value}: {refused.message}")
            if not session.sender.all_acked and not connection.connected:
                await self.push.forget(connection)
        elif self._error is None and not self._refused and self._emitted:
            self._error = "the push endpoint was not found before close"
        self._held.clear()
        self._close_local_copy()
        delivered = self.delivered if not self._refused else 0
        last_seq = session.core.last_seq if session is not None else 0
        self._report_cache = self._final_report(delivered, last_seq)
        return self._report_cache

    @staticmethod
    def _remaining(deadline: float) -> float:
        return max(0.0, deadline - asyncio.get_running_loop().time())

    def _release(self) -> None:
        """From now on the events go to the local copy and the access point (as soon as
        connected)."""
        if self._release_timer is not None:
            self._release_timer.cancel()
            self._release_timer = None
        if self._released or self.session_id is None:
            return
        self._released = True
        self._open_local_copy()
        for event in self._held:
            self._write_local(event)
        if not self._refused:
            self._attaching = asyncio.get_running_loop().create_task(self._attach())

    async def _attach(self) -> None:
        assert self.session_id is not None
        connection = await self._until_reached(self.push.api_url, self.push.connect)
        if connection is None:
            self._held.clear()
            return
        held, self._held = self._held, deque()
        # A run that already answered sends its hello, events and end in one flight.
        session = connection.open_session(
            token=self.push.token,
            session_id=self.session_id,
            client_version=self.push.client_version,
            on_status=self._on_push_status,
            events=held,
            closing=self._closed,
        )
        self._connection, self._session = connection, session


async def discover_push_target(
    api_url: str,
    token: str,
    verify: ssl.SSLContext,
    ca_pem: str | None,
    connect_timeout_s: float,
) -> PushTarget:
    """(host, QUIC port, trust domain, fleet CA PEM) of the push endpoint, from the API
    (``GET /api/v1/push``; the CA from ``/api/v1/ca`` unless ``ca_pem`` is given).

    Raises:
        _Refused: the API refused the token (401/403); httpx errors when unreachable.
    """
    import httpx

    from ah_api import PushEndpoint

    headers = {"Authorization": f"Bearer {token}", "Accept": "application/json"}
    async with httpx.AsyncClient(
        base_url=api_url,
        verify=verify,
        headers=headers,
        timeout=httpx.Timeout(10.0, connect=connect_timeout_s),
        trust_env=False,
    ) as http:
        response = await http.get("/api/v1/push")
        if response.status_code in (401, 403):
            raise _Refused(f"{response.status_code}: {_problem_detail(response)}")
        response.raise_for_status()
        endpoint = msgspec.json.decode(response.content, type=PushEndpoint)
        if ca_pem is None:
            ca = await http.get("/api/v1/ca", headers={"Accept": "text/plain"})
            ca.raise_for_status()
            ca_pem = ca.text
    # The host the API was reached at is reachable from here; the advertised one may not be.
    host = urlsplit(api_url).hostname or endpoint.host
    return host, endpoint.port, endpoint.trust_domain, ca_pem


class _Refused(Exception):
    pass


def _problem_detail(response: Any) -> str:
    try:
        return str(response.json().get("detail") or response.text)
    except ValueError:
        return str(response.text)[:200]


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
