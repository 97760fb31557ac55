"""The network lab itself: members reach each other and the host across the bridge, a
partition drops packets silently (a connect times out, nothing refuses it), heal undoes it,
two labs at once do not share names or subnets, and close leaves nothing behind."""

from __future__ import annotations

import ipaddress
import socket
import subprocess
import sys
from collections.abc import Iterator

import pytest

from ah_harness_containers import NetworkLab, NetworkLabError

# Listens on port 7 of every address of its namespace, says "up", answers each connection
# with "hello" and closes it.
SERVER = (
    "import socket\n"
    "s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
    "s.bind(('0.0.0.0', 7)); s.listen(); print('up', flush=True)\n"
    "while True:\n"
    "    c, _ = s.accept(); c.sendall(b'hello'); c.close()\n"
)


def _ip_state() -> tuple[str, str]:
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True)
    spaces = subprocess.run(["ip", "netns"], capture_output=True, text=True, check=True)
    return links.stdout, spaces.stdout


def _greeting(address: str, timeout: float) -> bytes:
    with socket.create_connection((address, 7), timeout=timeout) as conn:
        return conn.recv(16)


@pytest.fixture
def server_lab() -> Iterator[NetworkLab]:
    with NetworkLab() as lab:
        lab.add("a")
        lab.add("b")
        server = subprocess.Popen(
            [*lab.wrap("a"), sys.executable, "-c", SERVER], stdout=subprocess.PIPE, text=True
        )
        try:
            assert server.stdout is not None
            assert server.stdout.readline().strip() == "up"
            yield lab
        finally:
            server.kill()
            server.wait()


def test_members_reach_each_other_and_the_host_across_the_bridge(server_lab: NetworkLab) -> None:
    lab = server_lab
    a, b = lab.member("a"), lab.member("b")
    subnet = ipaddress.IPv4Network(str(lab.subnet))
    assert {ipaddress.IPv4Address(x) for x in (lab.host_address, a.address, b.address)} <= set(
        subnet
    )
    assert len({lab.host_address, a.address, b.address}) == 3
    assert _greeting(a.address, 5.0) == b"hello"
    from_b = subprocess.run(
        [*lab.wrap("b"), sys.executable, "-c",
         f"import socket; c = socket.create_connection(('{a.address}', 7), timeout=5); print(c.recv(16).decode())"],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert from_b.stdout.strip() == "hello", from_b.stderr


def test_a_partition_drops_packets_silently_and_heal_undoes_it(server_lab: NetworkLab) -> None:
    lab = server_lab
    address = lab.member("a").address
    lab.partition("a")
    with pytest.raises(TimeoutError):  # no reset, no ICMP error: the packets just vanish
        _greeting(address, 1.5)
    lab.heal("a")
    assert _greeting(address, 10.0) == b"hello"


def test_two_labs_at_once_share_nothing_and_close_leaves_nothing() -> None:
    with NetworkLab() as one, NetworkLab() as two:
        one.add("x")
        two.add("x")
        assert one.bridge != two.bridge
        assert one.member("x").namespace != two.member("x").namespace
        assert one.subnet is not None and two.subnet is not None
        assert not one.subnet.overlaps(two.subnet)
        with pytest.raises(ValueError, match="already has a member named 'x'"):
            one.add("x")
        with pytest.raises(KeyError, match="no member 'y'"):
            one.wrap("y")
        made = [
            one.bridge, two.bridge, one.member("x").host_link, two.member("x").host_link,
            one.member("x").namespace, two.member("x").namespace,
        ]  # fmt: skip
        links, spaces = _ip_state()
        assert all(name in links + spaces for name in made)
    # Only what these labs made: a parallel test run may be building labs of its own.
    links, spaces = _ip_state()
    assert [name for name in made if name in links + spaces] == []


def test_a_member_of_a_closed_lab_cannot_be_added() -> None:
    lab = NetworkLab()
    with pytest.raises(NetworkLabError, match="not open"):
        lab.add("a")
