"""A local fleet whose followers each live in their own network namespace.

`NamespacedFleet` is `ah_harness_local.LocalFleet` with a `NetworkLab` under it: the access
point listens on the lab's host address (and has it in its server certificate); every
follower's sshd and daemon run inside the follower's namespace (``ip netns exec``), the sshd
on port 22 of the follower's own address. So the leader reaches a follower's sshd directly
only across the lab's bridge, a follower reaches the access point only across it, and
`NamespacedFleet.partition` cuts one follower off the network for real: no process is
stopped, its packets just stop arriving.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ah_harness_containers.netlab import NetworkLab
from ah_harness_local.fleet import FollowerSpec, LocalFleet
from ah_harness_local.sshd import DEFAULT_START_TIMEOUT, RunningSshd, start_sshd

__all__ = ["NamespacedFleet"]

_SSH_PORT = 22


class NamespacedFleet(LocalFleet):
    """See the module docstring; use as a context manager, like `LocalFleet`.

    The lab is made on construction and removed by `close` (after every process stopped).
    """

    def __init__(self, followers: Sequence[FollowerSpec], **options: Any) -> None:
        lab = NetworkLab().open()
        try:
            for spec in followers:
                lab.add(spec.name)
            super().__init__(followers, bind=lab.host_address, **options)
        except BaseException:
            lab.close()
            raise
        self.lab = lab

    def start_follower_sshd(
        self, spec: FollowerSpec, *, port: int = 0, timeout: float = DEFAULT_START_TIMEOUT
    ) -> RunningSshd:
        member = self.lab.member(spec.name)
        return start_sshd(
            self.base_dir / "sshd" / spec.name,
            port=port or _SSH_PORT,
            listen=member.address,
            group=self.group,
            authorized_keys=[self.leader_public_key],
            timeout=timeout,
            wrap=self.lab.wrap(spec.name),
        )

    def follower_wrap(self, name: str) -> list[str]:
        return self.lab.wrap(name)

    def address(self, name: str) -> str:
        """Follower `name`'s address in the lab."""
        return self.lab.member(name).address

    def partition(self, name: str) -> None:
        """Cut follower `name` off the network (see `NetworkLab.partition`)."""
        self.lab.partition(name)

    def heal(self, name: str) -> None:
        self.lab.heal(name)

    def close(self) -> None:
        try:
            super().close()
        finally:
            self.lab.close()
