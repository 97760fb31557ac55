"""``ah-fleetctl fleet ...``: the fleet as the access point sees it."""

from __future__ import annotations

import time
from collections.abc import Sequence

import click

from ah_config import AhGroup, echo_json
from ah_domain_types import FollowerStatus, Selector

from ..context import FleetContext
from ..options import common_options, selector_from_options, selector_options
from ..output import format_age, render_table

__all__ = ["fleet", "select_followers"]

_HEADERS = ("NAME", "OS", "ARCH", "TAGS", "HEALTH", "LAST HEARTBEAT")


def select_followers(
    selector: Selector, followers: Sequence[FollowerStatus], *, allow_empty_fleet: bool = False
) -> list[FollowerStatus]:
    """The followers ``selector`` picks, in the access point's order.

    Unknown ``--host`` names and host/tag mismatches are ``SelectorError``s and an empty
    result an ``EmptySelectionError`` (both exit 7). With ``allow_empty_fleet``, no selector
    over an empty fleet selects nothing instead of failing (a listing, not a run).
    """
    if allow_empty_fleet and selector.selects_everything and not followers:
        return []
    by_name = {f.info.name: f for f in followers}
    chosen = selector.resolve([f.info for f in followers])
    return [by_name[info.name] for info in chosen]


def _tags_cell(status: FollowerStatus) -> str:
    tags = status.info.tags
    return ",".join(f"{k}={tags[k]}" for k in sorted(tags)) or "-"


@click.group("fleet", cls=AhGroup)
def fleet() -> None:
    """The fleet as the access point sees it."""


@fleet.command("list")
@selector_options
@common_options
@click.pass_context
def list_(
    ctx: click.Context, /, hosts: tuple[str, ...], tags: tuple[str, ...], all_: bool, **_: object
) -> None:
    """List followers: name, OS, arch, tags, health and last heartbeat.

    With --json: {"followers": [...]} holding each follower's status as the access point
    reports it. No selector lists every follower; a selector that matches nothing is an
    error (exit 7).
    """
    selector = selector_from_options(hosts, tags, all_)
    app = FleetContext.of(ctx)
    with app.api_client() as api:
        everyone = api.followers().followers
    chosen = select_followers(selector, everyone, allow_empty_fleet=True)
    if app.json:
        from ah_api import FollowersResponse  # after the request: see FleetContext.api_client

        echo_json(FollowersResponse(followers=chosen))
        return
    if not chosen:
        click.echo("no followers enrolled", err=True)
        return
    now_ms = int(time.time() * 1000)
    rows = [
        (
            f.info.name,
            f.info.os.value,
            f.info.arch,
            _tags_cell(f),
            f.health.value,
            format_age(f.last_heartbeat_ms, now_ms),
        )
        for f in chosen
    ]
    click.echo(render_table(_HEADERS, rows))
