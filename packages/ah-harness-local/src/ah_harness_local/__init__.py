"""Agent Harbor fleet local test harness: managed processes, real sshd instances, fixtures.

The processes, sshd and fleet machinery live in `ah_fleetctl.localfleet` (so that
`ah-fleetctl demo` works from a plain `pip install ah-fleetctl`); this package re-exports them
and adds the pytest fixtures (`pytest_plugin`).
"""

from ah_harness_local.cli_result import CliResult
from ah_harness_local.ports import (
    free_tcp_port,
    free_udp_port,
    tcp_accepts,
    wait_for,
    wait_for_async,
    wait_for_tcp,
)
from ah_harness_local.processes import (
    DetachedProcess,
    ManagedProcess,
    ProcessGroup,
    stop_detached,
    terminate_all,
)
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
    "CliResult",
    "DetachedProcess",
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
    "stop_detached",
    "tcp_accepts",
    "terminate_all",
    "wait_for",
    "wait_for_async",
    "wait_for_tcp",
]
