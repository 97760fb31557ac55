"""Network namespaces on one host, joined by a bridge: the harness's stand-in for machines on
a network (spec: ``ah-harness-containers``, "network namespaces where not").

A `NetworkLab` makes a bridge on the host with the first address of a private /24 (the host,
and so the access point, is ``.1``) and, per member, a network namespace whose only link is
one end of a veth pair; the other end is a port of the bridge. Members get ``.2``, ``.3``...
on their ``eth0``. Everyone is on one subnet: no routing, forwarding or NAT is set up, and
nothing outside the lab changes.

Faults are made at the member's bridge port: `NetworkLab.partition` takes it down, so frames
to and from the member are dropped without a reset or an ICMP error — what a machine that
vanished from the network looks like; `NetworkLab.heal` brings it back.

Needs root (``CAP_NET_ADMIN`` and ``CAP_SYS_ADMIN`` for ``ip netns``) and iproute2;
`unavailable_reason` says why a host cannot. Names carry a random tag, and the subnet is one
no address or route of the host uses yet, so labs of parallel test runs do not meet.
"""

from __future__ import annotations

import ipaddress
import json
import os
import secrets
import shutil
import subprocess
from dataclasses import dataclass
from types import TracebackType

__all__ = ["LabMember", "NetworkLab", "NetworkLabError", "unavailable_reason"]

_IP_TIMEOUT_S = 30.0
_SUBNET_ATTEMPTS = 64


class NetworkLabError(RuntimeError):
    """An ``ip`` command of the lab failed; the message has the command and its output."""


@dataclass(frozen=True)
class LabMember:
    """One network namespace of a lab."""

    name: str
    namespace: str
    address: str
    """Its address on ``eth0`` (the lab's subnet)."""
    host_link: str
    """The host end of its veth pair: its port on the lab's bridge."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    argv = ["ip", *args]
    done = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=_IP_TIMEOUT_S,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    if check and done.returncode != 0:
        raise NetworkLabError(
            f"{' '.join(argv)}: exit {done.returncode}: {(done.stderr or done.stdout).strip()}"
        )
    return done


def _missing_prerequisite() -> str | None:
    if os.geteuid() != 0:
        return "network namespaces and veth links need root"
    if shutil.which("ip") is None:
        return "no `ip` command (iproute2)"
    return None


def unavailable_reason() -> str | None:
    """Why this host cannot run a lab (None: it can): not root, no iproute2, or the kernel
    refuses a network namespace (tried with a throw-away one)."""
    missing = _missing_prerequisite()
    if missing is not None:
        return missing
    probe = f"ah-probe-{secrets.token_hex(4)}"
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"cannot create a network namespace: {made.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return None


def _subnets_in_use() -> list[ipaddress.IPv4Network]:
    """Every IPv4 network the host has an address in or a route to (``ip -j``: JSON)."""
    used: list[ipaddress.IPv4Network] = []
    for link in json.loads(_ip("-4", "-j", "addr", "show").stdout or "[]"):
        for info in link.get("addr_info", []):
            used.append(ipaddress.IPv4Network(f"{info['local']}/{info['prefixlen']}", strict=False))
    for route in json.loads(_ip("-4", "-j", "route", "show", "table", "all").stdout or "[]"):
        if route.get("dst", "default") != "default":
            used.append(ipaddress.IPv4Network(route["dst"], strict=False))
    return used


def _free_subnet() -> ipaddress.IPv4Network:
    used = _subnets_in_use()
    for _ in range(_SUBNET_ATTEMPTS):
        candidate = ipaddress.IPv4Network(
            f"10.{64 + secrets.randbelow(190)}.{secrets.randbelow(256)}.0/24"
        )
        if not any(candidate.overlaps(other) for other in used):
            return candidate
    raise NetworkLabError(f"no free /24 in 10.64.0.0/10 after {_SUBNET_ATTEMPTS} tries")


class NetworkLab:
    """A bridge and member namespaces (see the module docstring); a context manager.

    ``with NetworkLab() as lab: lab.add("f1")`` — every namespace, link and the bridge are
    gone after the block (processes still inside a namespace must be stopped first: a
    namespace lives on while a process is in it).
    """

    def __init__(self) -> None:
        self.tag = secrets.token_hex(3)
        self.bridge = f"ahb{self.tag}"
        self.subnet: ipaddress.IPv4Network | None = None
        self.members: dict[str, LabMember] = {}
        self._opened = False

    # -- lifecycle ------------------------------------------------------------------------

    def __enter__(self) -> NetworkLab:
        self.open()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def open(self) -> NetworkLab:
        """Make the bridge, with the host's address on it; idempotent."""
        if self._opened:
            return self
        reason = _missing_prerequisite()  # (anything else fails in `ip`, which says why)
        if reason is not None:
            raise NetworkLabError(f"cannot build a network lab here: {reason}")
        self.subnet = _free_subnet()
        self._opened = True  # from here on, close() has something to undo
        try:
            _ip("link", "add", "name", self.bridge, "type", "bridge")
            _ip("addr", "add", f"{self.host_address}/{self.subnet.prefixlen}", "dev", self.bridge)
            _ip("link", "set", self.bridge, "up")
        except BaseException:
            self.close()
            raise
        return self

    @property
    def host_address(self) -> str:
        """The host's address in the lab (on the bridge): where members reach the host."""
        if self.subnet is None:
            raise NetworkLabError("the lab is not open")
        return str(self.subnet.network_address + 1)

    def add(self, name: str) -> LabMember:
        """A new member namespace linked to the bridge, with the next address."""
        if self.subnet is None:
            raise NetworkLabError("the lab is not open")
        if name in self.members:
            raise ValueError(f"the lab already has a member named {name!r}")
        index = len(self.members)
        if index + 2 >= self.subnet.num_addresses - 1:
            raise NetworkLabError(f"the lab's /24 is full ({index} members)")
        member = LabMember(
            name=name,
            namespace=f"ah-{self.tag}-{index}",
            address=str(self.subnet.network_address + 2 + index),
            host_link=f"ahh{self.tag}{index:02d}"[:15],
        )
        # Recorded first: close() removes what exists of it even if a step below fails.
        self.members[name] = member
        peer = f"ahp{self.tag}{index:02d}"[:15]
        ns = member.namespace
        _ip("netns", "add", ns)
        _ip("link", "add", member.host_link, "type", "veth", "peer", "name", peer)
        _ip("link", "set", peer, "netns", ns)
        _ip("-n", ns, "link", "set", peer, "name", "eth0")
        _ip("-n", ns, "addr", "add", f"{member.address}/{self.subnet.prefixlen}", "dev", "eth0")
        _ip("-n", ns, "link", "set", "lo", "up")
        _ip("-n", ns, "link", "set", "eth0", "up")
        _ip("link", "set", member.host_link, "master", self.bridge)
        _ip("link", "set", member.host_link, "up")
        return member

    def member(self, name: str) -> LabMember:
        try:
            return self.members[name]
        except KeyError:
            raise KeyError(
                f"no member {name!r} in the lab (members: {sorted(self.members)})"
            ) from None

    def wrap(self, name: str) -> list[str]:
        """The command prefix that runs a program inside member `name`'s namespace."""
        return ["ip", "netns", "exec", self.member(name).namespace]

    # -- faults ---------------------------------------------------------------------------

    def partition(self, name: str) -> None:
        """Cut member `name` off: its bridge port goes down; frames either way are dropped."""
        _ip("link", "set", self.member(name).host_link, "down")

    def heal(self, name: str) -> None:
        """Undo `partition`."""
        _ip("link", "set", self.member(name).host_link, "up")

    def close(self) -> None:
        """Remove every namespace, veth pair and the bridge; raise the first failure after
        trying them all."""
        if not self._opened:
            return
        errors: list[str] = []
        for member in self.members.values():
            # Deleting one end of a veth pair deletes both; a missing link is not an error.
            for args in (("link", "del", member.host_link), ("netns", "del", member.namespace)):
                done = _ip(*args, check=False)
                if (
                    done.returncode != 0
                    and "Cannot find" not in done.stderr
                    and "No such" not in done.stderr
                ):
                    errors.append(f"ip {' '.join(args)}: {done.stderr.strip()}")
        done = _ip("link", "del", self.bridge, check=False)
        if done.returncode != 0 and "Cannot find" not in done.stderr:
            errors.append(f"ip link del {self.bridge}: {done.stderr.strip()}")
        self.members.clear()
        self._opened = False
        if errors:
            raise NetworkLabError("; ".join(errors))
