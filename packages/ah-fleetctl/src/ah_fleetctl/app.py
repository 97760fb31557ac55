"""The full ``ah-fleetctl`` CLI: the root group and its global options (``ah_fleetctl.cli``
is the entry point; it tries the thin ``run`` path before importing this)."""

from __future__ import annotations

import click

from ah_config import AhGroup

from . import __version__
from .commands import COMMANDS
from .options import common_options

__all__ = ["cli", "main"]


@click.group("ah-fleetctl", cls=AhGroup)
@common_options
@click.version_option(__version__, prog_name="ah-fleetctl")
def cli(**_: object) -> None:
    """Agent Harbor fleet: the leader's CLI.

    The global options may be given before or after the command name and each also comes
    from configuration (--access-point: remote-server / AH_REMOTE_SERVER; --token: token /
    AH_TOKEN; see `ah-fleetctl config show --show-origin`).

    Exit codes: 0 ok, 1 a host failed, 2 usage, 4 auth, 5 network, 7 validation (bad or empty
    selection), 8 configuration, 10 interaction needed under --non-interactive. With --json,
    stdout holds exactly one JSON document (errors as {"error": {...}}).
    """


for _command in COMMANDS:
    cli.add_command(_command)


def main() -> None:
    """Console-script entry point (exits with the documented exit code)."""
    cli.main(prog_name="ah-fleetctl")
