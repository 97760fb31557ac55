"""Agent Harbor fleet test harness, followers on their own networks: `NetworkLab` (network
namespaces joined by a bridge, with partitions) and `NamespacedFleet` (a local fleet whose
followers live in them). Containers are not used: network namespaces give the same network
isolation without a container runtime, and need only iproute2 and root."""

from ah_harness_containers.fleet import NamespacedFleet
from ah_harness_containers.netlab import LabMember, NetworkLab, NetworkLabError, unavailable_reason
from ah_harness_local.fleet import FollowerSpec

__all__ = [
    "FollowerSpec",
    "LabMember",
    "NamespacedFleet",
    "NetworkLab",
    "NetworkLabError",
    "unavailable_reason",
]
