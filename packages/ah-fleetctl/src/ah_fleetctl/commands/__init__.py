"""One module per command group; :data:`COMMANDS` is what the root group mounts, in order.

A new command lives in its own module here and is added to :data:`COMMANDS`.
"""

from __future__ import annotations

import click

from .config import config
from .exec import exec_command
from .fleet import fleet
from .login import login

__all__ = ["COMMANDS"]

COMMANDS: tuple[click.Command, ...] = (login, fleet, exec_command, config)
