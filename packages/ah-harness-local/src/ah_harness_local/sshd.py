"""Private, real OpenSSH servers: re-exported from `ah_fleetctl.localfleet.sshd` (the machinery
lives in ah-fleetctl so that `ah-fleetctl demo` needs no test harness)."""

from ah_fleetctl.localfleet.sshd import (
    DEFAULT_START_TIMEOUT,
    RunningSshd,
    SshdInstance,
    SshdStartError,
    find_sshd,
    prepare_sshd,
    start_many_sshd,
    start_sshd,
)
from ah_fleetctl.localfleet.sshd import _generate_key as _generate_key

__all__ = [
    "DEFAULT_START_TIMEOUT",
    "RunningSshd",
    "SshdInstance",
    "SshdStartError",
    "find_sshd",
    "prepare_sshd",
    "start_many_sshd",
    "start_sshd",
]
