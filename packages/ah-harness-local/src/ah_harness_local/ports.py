"""Free ports and condition waits with deadlines: re-exported from `ah_fleetctl.localfleet.ports`
(the machinery lives in ah-fleetctl so that `ah-fleetctl demo` needs no test harness)."""

from ah_fleetctl.localfleet.ports import (
    free_tcp_port,
    free_udp_port,
    tcp_accepts,
    wait_for,
    wait_for_async,
    wait_for_tcp,
)

__all__ = [
    "free_tcp_port",
    "free_udp_port",
    "tcp_accepts",
    "wait_for",
    "wait_for_async",
    "wait_for_tcp",
]
