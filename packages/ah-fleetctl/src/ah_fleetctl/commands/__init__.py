"""One module per command group; :data:`COMMANDS` is what the root group mounts, in order.

A new command lives in its own module here and is added to :data:`COMMANDS`.
"""

from __future__ import annotations

import click

from .config import config
from .demo import demo_command
from .exec import exec_command
from .fence import fence_command
from .fleet import fleet
from .login import login
from .paths import agent_command, paths_command, proxy_command, ssh_config_command
from .run import run_command
from .session import session
from .slurp import slurp_command

__all__ = ["COMMANDS"]

COMMANDS: tuple[click.Command, ...] = (
    login,
    fleet,
    run_command,
    fence_command,
    slurp_command,
    exec_command,
    session,
    paths_command,
    proxy_command,
    ssh_config_command,
    agent_command,
    config,
    demo_command,
)
