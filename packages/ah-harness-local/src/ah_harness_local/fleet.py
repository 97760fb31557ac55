"""A whole local fleet (access point + followers, each with its own sshd): re-exported from
`ah_fleetctl.localfleet.fleet` (the machinery lives in ah-fleetctl so that `ah-fleetctl demo`
needs no test harness)."""

from ah_fleetctl.localfleet.fleet import (
    DEFAULT_HEARTBEAT_INTERVAL,
    CommandFailed,
    FollowerHandle,
    FollowerSpec,
    LocalFleet,
    daemon_argv,
)

__all__ = [
    "DEFAULT_HEARTBEAT_INTERVAL",
    "CommandFailed",
    "FollowerHandle",
    "FollowerSpec",
    "LocalFleet",
    "daemon_argv",
]
