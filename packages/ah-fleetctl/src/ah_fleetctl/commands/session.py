"""``ah-fleetctl session ...``: a session's info and its events, as the access point stored them."""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import click
import httpx
import msgspec

from ah_config import AhGroup, CliError, echo_json
from ah_domain_types import (
    EVENT_TYPES,
    Event,
    ExitCode,
    FenceResultEvent,
    FenceStartedEvent,
    FollowersCatalogEvent,
    HostExitedEvent,
    HostLogEvent,
    HostStartedEvent,
    NoteEvent,
    PathDegradedEvent,
    PathFailedEvent,
    PathFixedEvent,
    PathRestoredEvent,
    SessionInfo,
    SummaryEvent,
    decode_event_json,
    validate_session_id,
)

from ..context import FleetContext
from ..options import common_options
from ..output import format_age, render_table
from ..sse import SseParser

if TYPE_CHECKING:
    from ..client import ApiClient

__all__ = ["describe_event", "session"]

_FOLLOWER_HEADERS = ("NAME", "OS", "TAGS", "HEALTH", "PATH", "LAST HEARTBEAT")
_READ_TIMEOUT_S = 60.0
"""Without a byte (keep-alives included) for this long, a followed stream is re-opened."""


def _session_id(ctx: click.Context, param: click.Parameter, value: str) -> str:
    try:
        return validate_session_id(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), ctx=ctx, param=param) from None


@click.group("session", cls=AhGroup)
def session() -> None:
    """A session's info and events, as the access point stored them."""


@session.command("info")
@click.argument("session_id", metavar="ID", callback=_session_id)
@common_options
@click.pass_context
def info(ctx: click.Context, /, session_id: str, **_: object) -> None:
    """Leader, followers (OS, tags, health, fixed path, last heartbeat) and endpoints of the
    session. With --json: the access point's SessionInfo document."""
    app = FleetContext.of(ctx)
    with app.api_client() as api:
        found = api.session_info(session_id)
    if app.json:
        echo_json(found)
        return
    click.echo(_render_info(found, int(time.time() * 1000)))


def _render_info(found: SessionInfo, now_ms: int) -> str:
    last = (
        "none yet" if found.last_event_ms is None else format_age(int(found.last_event_ms), now_ms)
    )
    lines = [
        f"session     {found.id}",
        f"leader      {found.leader}",
        f"created     {_clock(found.created_ms, date=True)} ({format_age(found.created_ms, now_ms)})",
        f"events      {found.last_seq} (last {last})",
    ]
    lines += [f"{name:<11} {url}" for name, url in sorted(found.endpoints.items())]
    rows = [
        (
            f.info.name,
            f.info.os.value,
            ",".join(f"{k}={v}" for k, v in sorted(f.info.tags.items())) or "-",
            f.health.value,
            f.path.describe() if f.path is not None else "-",
            format_age(f.last_heartbeat_ms, now_ms),
        )
        for f in found.followers
    ]
    lines.append("")
    lines.append(render_table(_FOLLOWER_HEADERS, rows) if rows else "no followers named yet")
    return "\n".join(lines)


@session.command("events")
@click.argument("session_id", metavar="ID", callback=_session_id)
@click.option("--follow", "-f", is_flag=True, help="Keep printing new events as they arrive.")
@click.option(
    "--after",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    metavar="SEQ",
    help="Only events after this sequence number.",
)
@click.option(
    "--type",
    "types",
    multiple=True,
    type=click.Choice(EVENT_TYPES),
    help="Only events of this type (repeatable).",
)
@common_options
@click.pass_context
def events(
    ctx: click.Context,
    /,
    session_id: str,
    follow: bool,
    after: int,
    types: tuple[str, ...],
    **_: object,
) -> None:
    """Print the session's events, one per line (with --json: one JSON object per line).

    With --follow, stored events are printed first, then new ones as the access point receives
    them; a lost connection is re-opened by itself (said on stderr) and resumes right after
    the last event printed, so none is missed or printed twice. Stop it with Ctrl-C.
    """
    app = FleetContext.of(ctx)
    with app.api_client() as api:
        if follow:
            _follow(api, session_id, after, types, as_json=app.json)
        else:
            _history(api, session_id, after, types, as_json=app.json)


def _print(event: Event, raw: bytes | str | None, *, as_json: bool) -> None:
    if as_json:
        text = raw.decode() if isinstance(raw, bytes) else raw
        click.echo(text if text is not None else msgspec.json.encode(event).decode())
    else:
        click.echo(describe_event(event))


def _history(
    api: ApiClient, session_id: str, after: int, types: Sequence[str], *, as_json: bool
) -> None:
    page = 1
    while True:
        found = api.session_events(session_id, since=after, types=types, page=page)
        for event in found.events:
            _print(event, None, as_json=as_json)
        if page * found.per_page >= found.total or not found.events:
            return
        page += 1


def _follow(
    api: ApiClient, session_id: str, after: int, types: Sequence[str], *, as_json: bool
) -> None:
    last = after
    delay = 0.2
    connected_once = False
    url = f"{api.base_url}/api/v1/sessions/{session_id}/events"
    while True:
        reason = "the access point ended the stream"
        try:
            with api.event_stream(
                session_id, after=last, types=types, read_timeout_s=_READ_TIMEOUT_S
            ) as response:
                connected_once = True
                parser = SseParser()
                for chunk in response.iter_bytes():
                    for message in parser.feed(chunk):
                        try:
                            event = decode_event_json(message.data)
                        except msgspec.DecodeError as exc:
                            raise CliError(
                                ExitCode.NETWORK,
                                f"access point {api.base_url} sent an event that cannot be "
                                f"read (id {message.id}): {exc}",
                                kind="network",
                            ) from None
                        _print(event, message.data, as_json=as_json)
                        last = max(last, event.seq)
                        delay = 0.2
        except httpx.TimeoutException:
            reason = f"nothing received for {_READ_TIMEOUT_S:g} s"
        except httpx.TransportError as exc:
            if not connected_once:
                # Never got anywhere: that is an error (exit 5), not a hiccup.
                raise api.transport_error(exc, url) from None
            reason = str(exc) or type(exc).__name__
        click.echo(
            f"event stream of session {session_id} interrupted ({reason}); reconnecting "
            f"after seq {last} in {delay:.1f} s",
            err=True,
        )
        time.sleep(delay)
        delay = min(delay * 2, 5.0)


def _clock(ms: float, *, date: bool = False) -> str:
    moment = dt.datetime.fromtimestamp(ms / 1000, dt.UTC).astimezone()
    text = moment.strftime("%Y-%m-%d %H:%M:%S" if date else "%H:%M:%S")
    return f"{text}.{int(ms % 1000):03d}"


def describe_event(event: Event) -> str:
    """One line for people: ``#seq time type details``."""
    kind = type(event).__struct_config__.tag
    return f"#{event.seq:<5} {_clock(event.ts_ms)}  {kind!s:<22} {_details(event)}".rstrip()


def _details(event: Event) -> str:
    if isinstance(event, HostLogEvent):
        return f"{event.host} [{event.stream}] {event.line}"
    if isinstance(event, HostStartedEvent):
        return f"{event.host}: {event.command}"
    if isinstance(event, HostExitedEvent):
        result = event.result
        code = "" if result.exit_code is None else f" (exit {result.exit_code})"
        return f"{event.host}: {result.state.value}{code} in {result.took_ms} ms"
    if isinstance(event, FenceStartedEvent):
        return f"snapshot {event.snapshot_id} on {', '.join(event.hosts) or 'no hosts'}"
    if isinstance(event, FenceResultEvent):
        verdicts = ", ".join(f"{h}={r.state.value}" for h, r in sorted(event.hosts.items()))
        return f"snapshot {event.snapshot_id}: {verdicts}"
    if isinstance(event, SummaryEvent):
        return event.summary.line()
    if isinstance(event, NoteEvent):
        return f"[{event.level}] {event.message}"
    if isinstance(event, PathFixedEvent | PathRestoredEvent):
        return f"{event.host}: {event.path.describe()}"
    if isinstance(event, PathDegradedEvent):
        return f"{event.host}: {event.failures} failures ({event.error})"
    if isinstance(event, PathFailedEvent):
        return f"{event.host}: no path ({event.reason})"
    if isinstance(event, FollowersCatalogEvent):
        return ", ".join(f"{f.info.name}={f.health.value}" for f in event.followers)
    return ""
