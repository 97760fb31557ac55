"""Agent Harbor fleet local test harness: managed processes, real sshd instances, fixtures."""

from ah_harness_local.ports import (
    free_tcp_port,
    free_udp_port,
    tcp_accepts,
    wait_for,
    wait_for_tcp,
)
from ah_harness_local.processes import ManagedProcess, ProcessGroup, terminate_all
from ah_harness_local.sshd import (
    RunningSshd,
    SshdInstance,
    SshdStartError,
    find_sshd,
    prepare_sshd,
    start_many_sshd,
    start_sshd,
)

__all__ = [
    "ManagedProcess",
    "ProcessGroup",
    "RunningSshd",
    "SshdInstance",
    "SshdStartError",
    "find_sshd",
    "free_tcp_port",
    "free_udp_port",
    "prepare_sshd",
    "start_many_sshd",
    "start_sshd",
    "tcp_accepts",
    "terminate_all",
    "wait_for",
    "wait_for_tcp",
]
