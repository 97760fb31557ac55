"""Process exit codes shared by every Agent Harbor fleet CLI."""

from __future__ import annotations

import enum

__all__ = ["ExitCode"]


class ExitCode(enum.IntEnum):
    """Exit status of every CLI (see the spec's "Exit codes" section)."""

    OK = 0
    """Every selected host ran and returned 0."""
    HOSTS_FAILED = 1
    """One or more selected hosts failed, timed out or never answered."""
    USAGE = 2
    """Malformed command line; the message is on stderr."""
    AUTH = 4
    """Authentication or authorisation failed."""
    NETWORK = 5
    """Network error: an endpoint was unreachable."""
    VALIDATION = 7
    """Bad config value, bad selector, or an empty selection."""
    CONFIGURATION = 8
    """Configuration missing or inconsistent (e.g. no access point configured)."""
    INTERACTION_NEEDED = 10
    """A prompt would be needed but ``--non-interactive`` was given."""
