"""Subprocesses that are always cleaned up: re-exported from `ah_fleetctl.localfleet.processes`
(the machinery lives in ah-fleetctl so that `ah-fleetctl demo` needs no test harness)."""

from ah_fleetctl.localfleet.processes import (
    DetachedProcess,
    ManagedProcess,
    ProcessGroup,
    stop_detached,
    terminate_all,
)

__all__ = ["DetachedProcess", "ManagedProcess", "ProcessGroup", "stop_detached", "terminate_all"]
