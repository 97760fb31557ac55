"""Option sets shared by the commands: the global options, selectors, durations."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import click

from ah_config import duration_callback, global_options
from ah_domain_types import Selector
from ah_logging import log_options

__all__ = [
    "common_options",
    "parse_duration_option",
    "selector_from_options",
    "selector_options",
]

FC = TypeVar("FC", bound=Callable[..., Any] | click.Command)


def common_options(f: FC) -> FC:
    """The global options (``--access-point``, ``--token``, ``--json``, ``--non-interactive``,
    ``--config``) and the four log flags. The root group has them, and so does every command,
    so they may be written before or after the command name (the innermost wins)."""
    return global_options(log_options("cli")(f))


def selector_options(f: FC) -> FC:
    """``--host NAME`` (repeatable), ``--tag K=V`` (repeatable, AND), ``--all``; the values
    arrive as ``hosts``, ``tags`` and ``all_`` and become a Selector through
    :func:`selector_from_options` (bad values are validation errors, exit 7)."""
    decorators: list[Callable[[FC], FC]] = [
        click.option(
            "--host",
            "hosts",
            multiple=True,
            metavar="NAME",
            help="Select this follower (repeatable).",
        ),
        click.option(
            "--tag",
            "tags",
            multiple=True,
            metavar="K=V",
            help="Select followers with this tag (repeatable; all must match). "
            "os and arch are implicit tags.",
        ),
        click.option(
            "--all",
            "all_",
            is_flag=True,
            default=False,
            help="Select every enrolled follower (not with --host or --tag).",
        ),
    ]
    for decorator in reversed(decorators):
        f = decorator(f)
    return f


def selector_from_options(hosts: tuple[str, ...], tags: tuple[str, ...], all_: bool) -> Selector:
    """The Selector for the parsed options (raises ``SelectorError``: exit 7)."""
    return Selector.from_cli(hosts, tags, all_)


parse_duration_option = duration_callback
"""Option callback: ``500ms``, ``30s``, ``1m30s``, ``2h`` or a number of seconds →
seconds (> 0); anything else is a usage error (exit 2) naming the option."""
