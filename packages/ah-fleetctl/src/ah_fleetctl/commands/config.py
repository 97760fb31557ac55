"""``ah-fleetctl config ...``: the resolved configuration and where each value came from."""

from __future__ import annotations

import functools
from typing import Any

import click

from ah_config import AhGroup, make_config_show_command

from ..options import common_options

__all__ = ["config"]


def _accept_common_options(command: click.Command) -> click.Command:
    """Add the global options to a ready-made command whose callback does not take them; the
    command still sees them through its context (``--json``, ``--config``, flags)."""
    callback = command.callback
    if callback is None:
        raise TypeError(f"command {command.name!r} has no callback")
    before = {p.name for p in command.params}
    common_options(command)
    added = {p.name for p in command.params} - before

    @functools.wraps(callback)
    def without_common_options(*args: Any, **kwargs: Any) -> Any:
        for name in added:
            kwargs.pop(name, None)
        return callback(*args, **kwargs)

    command.callback = without_common_options
    return command


@click.group("config", cls=AhGroup)
def config() -> None:
    """Inspect the layered configuration (system, user, repo, AH_*, --config, flags)."""


config.add_command(_accept_common_options(make_config_show_command("show")))
