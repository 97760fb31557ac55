"""``ah-fleetctl fence``: sync the leader's tree to the selected followers and prove it arrived.

Order of work: resolve the selection (exit 7 when it is bad or empty) → link every selected
follower in parallel (:mod:`ah_fleetctl.dataplane`, as ``run`` does: each path method gets
``timeouts.connect``) → :func:`ah_fleetctl.fencing.fence_selected` (``--timeout`` /
``timeouts.fence`` bounds the snapshot, sync and verification) → per-host table (or one
``FenceMetadata`` document with ``--json``). A follower that cannot be reached is in the
result too: ``timeout`` when reaching it timed out, else ``error``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import TYPE_CHECKING

import click

from ah_config import AhCommand, echo_json
from ah_domain_types import ExitCode, FenceMetadata, FollowerStatus

from ..context import FleetContext
from ..options import (
    common_options,
    parse_duration_option,
    selector_from_options,
    selector_options,
)
from ..output import render_table
from .fleet import select_followers

if TYPE_CHECKING:
    from ..fencing import EngineName

__all__ = ["fence_command"]

_HEADERS = ("HOST", "STATE", "TOOK", "DETAIL")


async def _fence(
    app: FleetContext,
    selected: Sequence[FollowerStatus],
    timeout_s: float,
    engine: EngineName,
    session_id: str | None,
) -> FenceMetadata:
    from ..dataplane import open_links
    from ..fencing import fence_selected
    from .run import _event_sink, finish_agent_for_thin_runs, start_agent_for_thin_runs

    events = _event_sink(app)
    if events is not None:
        events.start(session_id)
    # As a fenced run: an agent started meanwhile lets the next fence or run here take the
    # thin path (ah_fleetctl.thin_fence).
    agent_for_next = start_agent_for_thin_runs(app)
    try:
        links = await open_links(app, selected)
        try:
            return await fence_selected(
                app,
                links,
                links.names,
                timeout=timeout_s,
                engine=engine,
                emit=events.emit if events is not None else None,
            )
        finally:
            await links.close()
    finally:
        if events is not None:
            # Bounded: waits a few seconds at most for the access point's acknowledgements.
            await asyncio.to_thread(events.close)
        if agent_for_next is not None:
            await finish_agent_for_thin_runs(app, agent_for_next)


def _render(metadata: FenceMetadata, engine: str) -> str:
    rows = [
        (
            name,
            result.state.value,
            f"{result.took_ms} ms",
            result.detail or "",
        )
        for name, result in metadata.hosts.items()
    ]
    consistent = len(metadata.hosts) - len(metadata.lagging_hosts())
    return (
        render_table(_HEADERS, rows)
        + f"\nsnapshot {metadata.snapshot_id}: {consistent} of {len(metadata.hosts)} hosts "
        f"consistent ({engine}, {metadata.took_ms} ms)"
    )


@click.command(
    "fence", cls=AhCommand, short_help="Sync the tree to the selected followers and verify it."
)
@selector_options
@click.option(
    "--timeout",
    "timeout_s",
    default=None,
    metavar="DURATION",
    callback=parse_duration_option,
    help="Deadline for snapshot, sync and verification (500ms, 30s, 1m30s...). Default: "
    "config timeouts.fence (120s). Reaching the followers is bounded by timeouts.connect.",
)
@click.option(
    "--session",
    "session_id",
    default=None,
    metavar="ID",
    help="Session the fence's events belong to (default: config session, else a new one).",
)
@common_options
@click.pass_context
def fence_command(
    ctx: click.Context,
    /,
    hosts: tuple[str, ...],
    tags: tuple[str, ...],
    all_: bool,
    timeout_s: float | None,
    session_id: str | None,
    **_: object,
) -> int:
    """Fence the selected followers: snapshot the leader's tree (the repo root of the
    current directory, minus sync-ignores and VCS metadata), sync it to every follower
    (Mutagen when installed, else rsync over SSH), and verify that each follower's tree has
    the snapshot's content id.

    Prints each host's state (consistent, timeout, error) and time, and the snapshot id.
    Exit 0 only when every selected host is consistent; 1 otherwise (the message names the
    lagging and failed hosts); 7 for a bad or empty selection. The events fenceStarted and
    fenceResult go to the session's event stream (--session, else a new session). With --json: one fence
    document ({"snapshotId", "hosts": {NAME: {"state", "tookMs", "detail"}}, "startedMs",
    "tookMs"}).
    """
    from ..fencing import configured_engine, fence_timeout_s
    from .run import _session_id

    selector = selector_from_options(hosts, tags, all_)
    app = FleetContext.of(ctx)
    session = _session_id(app, session_id)
    limit = fence_timeout_s(app.config.typed, timeout_s)
    with app.api_client() as api:
        selected = select_followers(selector, api.followers().followers)
    engine = configured_engine(app.config)
    metadata = asyncio.run(_fence(app, selected, limit, engine, session))
    if app.json:
        echo_json(metadata)
    else:
        click.echo(_render(metadata, engine))
    if metadata.lagging_hosts():
        from ah_mutagen_project import describe_fence_failure

        click.echo(f"error: {describe_fence_failure(metadata)}", err=True)
        return int(ExitCode.HOSTS_FAILED)
    return int(ExitCode.OK)
