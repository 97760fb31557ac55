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
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from collections import deque
from collections.abc import Callable
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

    from ah_connectivity.leader_push import LeaderPushClient

    from .context import FleetContext

__all__ = ["SessionEventSink", "SinkReport", "new_session_id"]

E = TypeVar("E", bound=Event)

DEFAULT_CLOSE_TIMEOUT_S = 5.0
DEFAULT_MAX_BUFFERED = 100_000


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


class SessionEventSink:
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
        push_target: tuple[str, int, str, str] | None = None,
        connect_delay_s: float = 0.0,
    ) -> None:
        """``verify`` checks the API's TLS (the pinned fleet CA); ``ca_pem`` is the fleet CA
        that the QUIC handshake is checked against (fetched from the API when None)."""
        self.api_url = api_url.rstrip("/")
        self._token = token
        self._verify = verify
        self._ca_pem = ca_pem
        self.local_copy_dir = local_copy_dir
        self.connect_timeout_s = connect_timeout_s
        self.close_timeout_s = close_timeout_s
        self.max_buffered = max_buffered
        self._warn = warn
        self.client_version = client_version
        self.push_target = push_target
        self.connect_delay_s = connect_delay_s
        """Wait this long (or until :meth:`close`) before connecting: a run that ends sooner
        is not slowed by the handshake (the leader agent's short runs); events are queued
        meanwhile and nothing is lost."""
        """(host, QUIC port, trust domain, fleet CA PEM) of the push endpoint: given, it
        spares the HTTPS discovery (the leader agent reuses the last one that worked); set
        once discovered."""
        self.session_id: str | None = None
        self.local_copy: Path | None = None
        self._file: Any = None
        self._lock = threading.Lock()
        self._inbox: deque[Event] = deque()
        self._wake_scheduled = False
        self._warned: set[str] = set()
        self._emitted = 0
        self._dropped = 0
        self._error: str | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._client: LeaderPushClient | None = None
        self._closing: asyncio.Event | None = None
        self._ready = threading.Event()
        self._closed = False
        self._refused = False
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
        session_id = validate_session_id(session_id) if session_id else new_session_id()
        self.session_id = session_id
        if self.local_copy_dir is not None:
            path = self.local_copy_dir / f"{session_id}.events.jsonl"
            try:
                self.local_copy_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
                self._file = os.fdopen(fd, "ab")
                self.local_copy = path
            except OSError as exc:
                self._warn_once("local", f"cannot keep a local copy of the session events: {exc}")
        self._thread = threading.Thread(
            target=self._thread_main, name=f"ah-events-{session_id}", daemon=True
        )
        self._thread.start()
        # Not waiting for the thread's loop here: events emitted meanwhile queue in the inbox
        # (the loop drains it once up), and close() waits for it — the run starts sooner.
        return session_id

    def make(self, cls: type[E], **fields: Any) -> E:
        """An event of this session stamped now (the access point assigns the final seq and
        timestamp): ``sink.make(HostStartedEvent, host="lin-a", command="make")``."""
        if self.session_id is None:
            raise RuntimeError("start the sink before making events")
        fields.setdefault("session_id", self.session_id)
        fields.setdefault("ts_ms", time.time() * 1000)
        return cls(**fields)

    def emit(self, event: Event) -> None:
        """Queue ``event`` for the access point and append it to the local copy; never blocks
        on the network, never raises."""
        if self.session_id is None or self._closed:
            raise RuntimeError("emit needs a started, open sink")
        if event.session_id not in ("", self.session_id):
            event = msgspec.structs.replace(event, session_id=self.session_id)
        line = encode_event_json(event) + b"\n"
        schedule = False
        with self._lock:
            self._emitted += 1
            if self._file is not None:
                try:
                    self._file.write(line)
                except OSError as exc:
                    self._file = None
                    self._warn_once(
                        "local", f"cannot write the local copy {self.local_copy}: {exc}"
                    )
            if self._refused:
                return  # the access point refused us: the local copy is all there is
            self._inbox.append(event)
            if len(self._inbox) > self.max_buffered:
                self._inbox.popleft()
                self._dropped += 1
                self._warn_once(
                    "dropped",
                    f"more than {self.max_buffered} session events are waiting for the access "
                    f"point; the oldest are only in the local copy {self.local_copy}",
                )
            if not self._wake_scheduled and self._loop is not None:
                self._wake_scheduled = schedule = True
        if schedule:
            assert self._loop is not None
            with contextlib.suppress(RuntimeError):  # the loop is gone: close() reports it
                self._loop.call_soon_threadsafe(self._drain)

    @property
    def emitted(self) -> int:
        return self._emitted

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
            if self._file is not None:
                with contextlib.suppress(OSError):
                    self._file.close()
                self._file = None
        report = self._report()
        if not report.complete and self._error is None:
            self._error = "the access point did not acknowledge every event before close"
            report = self._report()
        if not report.complete:
            where = f"; they are in {report.local_copy}" if report.local_copy else ""
            self._warn_once(
                "undelivered",
                f"{report.emitted - report.delivered} of {report.emitted} events of session "
                f"{report.session_id} did not reach the access point ({report.error}){where}",
            )
        return report

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
        return SinkReport(
            session_id=self.session_id or "",
            emitted=self._emitted,
            delivered=self.delivered,
            last_seq=client.status.last_seq if client is not None else 0,
            local_copy=self.local_copy,
            error=self._error,
        )

    def _warn_once(self, key: str, message: str) -> None:
        if key in self._warned:
            return
        self._warned.add(key)
        with contextlib.suppress(Exception):  # a warning must never break the run
            self._warn(message)

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
            deadline = min(deadline, start + min(1.0, self._close_budget))
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
        from ah_connectivity.backoff import Backoff
        from ah_connectivity.leader_push import LeaderPushClient

        assert self.session_id is not None
        backoff = Backoff(base_s=0.5, cap_s=10.0)
        if self.connect_delay_s > 0 and self._closing is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.connect_delay_s):
                    await self._closing.wait()
        while True:
            try:
                host, port, trust_domain, ca_pem = await self._discover()
                break
            except _Refused as exc:
                self._error = str(exc)
                self._refused = True
                self._warn_once(
                    "refused",
                    f"the access point refused the session events ({exc}); going on without "
                    f"them{self._local_note()}",
                )
                with self._lock:
                    self._inbox.clear()
                return
            except Exception as exc:
                self._error = f"cannot reach the access point {self.api_url}: {_describe(exc)}"
                self._warn_once(
                    "unreachable",
                    f"{self._error}; session events will be sent when it answers"
                    f"{self._local_note()}",
                )
                await asyncio.sleep(backoff.next_delay())
        client = LeaderPushClient(
            host=host,
            port=port,
            ca=ca_pem,
            trust_domain=trust_domain,
            token=self._token,
            session_id=self.session_id,
            client_version=self.client_version,
            connect_timeout_s=self.connect_timeout_s,
            on_status=self._on_status,
        )
        self._client = client
        if self._client_ready is not None:
            self._client_ready.set()
        self._drain()
        await client.run()
        refused = client.status.refused
        if refused is not None:
            self._refused = True
            self._error = f"{refused.code.value}: {refused.message}"
            self._warn_once(
                "refused",
                f"the access point refused the session events ({self._error}); going on "
                f"without them{self._local_note()}",
            )

    def _on_status(self, status: Any) -> None:
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

    def _local_note(self) -> str:
        return f" (a local copy is in {self.local_copy})" if self.local_copy else ""

    async def _discover(self) -> tuple[str, int, str, str]:
        """(host, QUIC port, trust domain, fleet CA PEM) of the push endpoint."""
        if self.push_target is not None:
            return self.push_target
        self.push_target = await self._discover_over_https()
        return self.push_target

    async def _discover_over_https(self) -> tuple[str, int, str, str]:
        import httpx

        from ah_api import PushEndpoint

        headers = {"Authorization": f"Bearer {self._token}", "Accept": "application/json"}
        async with httpx.AsyncClient(
            base_url=self.api_url,
            verify=self._verify,
            headers=headers,
            timeout=httpx.Timeout(10.0, connect=self.connect_timeout_s),
            trust_env=False,
        ) as http:
            response = await http.get("/api/v1/push")
            if response.status_code in (401, 403):
                raise _Refused(f"{response.status_code}: {_problem_detail(response)}")
            response.raise_for_status()
            endpoint = msgspec.json.decode(response.content, type=PushEndpoint)
            ca_pem = self._ca_pem
            if ca_pem is None:
                ca = await http.get("/api/v1/ca", headers={"Accept": "text/plain"})
                ca.raise_for_status()
                ca_pem = ca.text
        # The host the API was reached at is reachable from here; the advertised one may not be.
        host = urlsplit(self.api_url).hostname or endpoint.host
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
