"""A whole fleet on this machine: the machinery behind ``ah-fleetctl demo`` and the test harness.

- :mod:`.ports`: free ports and condition waits with deadlines (``wait_for``).
- :mod:`.processes`: subprocesses in their own process groups that are always cleaned up
  (``ManagedProcess``, ``ProcessGroup``, a watchdog that outlives a killed parent).
- :mod:`.sshd`: private, real OpenSSH servers on loopback (``start_sshd``).
- :mod:`.fleet`: ``LocalFleet``, an access point and N followers as local processes, each
  follower with its own sshd (imported on demand: it loads the daemons' packages).

It lives in ``ah-fleetctl`` (not in ``ah-harness-local``, which adds the pytest fixtures on
top) so that ``pip install ah-fleetctl`` gives a working ``ah-fleetctl demo``; nothing here
imports pytest.
"""

from ah_fleetctl.localfleet.ports import (
    free_tcp_port,
    free_udp_port,
    tcp_accepts,
    wait_for,
    wait_for_tcp,
)
from ah_fleetctl.localfleet.processes import (
    DetachedProcess,
    ManagedProcess,
    ProcessGroup,
    stop_detached,
    terminate_all,
)
from ah_fleetctl.localfleet.sshd import (
    RunningSshd,
    SshdInstance,
    SshdStartError,
    find_sshd,
    prepare_sshd,
    start_many_sshd,
    start_sshd,
)

__all__ = [
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
    "wait_for_tcp",
]
