"""The access point's CONNECT listener refuses what it must, with the right status, and opens
nothing then (a real access point and real followers: ``dataplane_fleet`` in conftest.py)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import pytest

from ah_connectivity.connect_client import ConnectRefused, open_connect_tunnel

if TYPE_CHECKING:
    from conftest import FleetCli


def _opened(cli: FleetCli) -> int:
    ap = cli.fleet.access_point
    assert ap is not None
    return sum(1 for line in ap.log_text().splitlines() if "tunnel" in line and " opened" in line)


def _connect(cli: FleetCli, token: str | None, target: str) -> ConnectRefused:
    fleet = cli.fleet
    with pytest.raises(ConnectRefused) as caught:
        sock = open_connect_tunnel(
            "127.0.0.1",
            fleet.connect_port,
            ca_pem=fleet.ca_path.read_bytes(),
            token=token,
            target=target,
            timeout=15.0,
        )
        sock.close()
    return caught.value


def test_connect_refusals_have_their_status_and_open_nothing(dataplane_fleet: FleetCli) -> None:
    cli = dataplane_fleet
    signer = cli.fleet.signer
    before = _opened(cli)
    expired = signer.issue_user("old", scopes=("ssh",), ttl=60, now=time.time() - 3600)
    other_hosts = signer.issue_user("narrow", scopes=("ssh",), hosts="mac-*")
    no_ssh_scope = signer.issue_user("reader", scopes=("read-logs",))
    good = cli.fleet.user_token
    cases = [
        (None, "lin-a:22", 407, "missing"),
        (expired, "lin-a:22", 407, "expired"),
        (other_hosts, "lin-a:22", 403, "does not allow host 'lin-a'"),
        (no_ssh_scope, "lin-a:22", 403, "ssh"),
        (good, "nobody-here:22", 404, "nobody-here"),
        (good, "lin-a:23", 502, ""),
    ]
    for token, target, status, words in cases:
        refused = _connect(cli, token, target)
        assert refused.status == status, (target, refused)
        assert words in refused.message, (target, refused.message)
    assert _opened(cli) == before

    # And the same listener does open an allowed one.
    sock = open_connect_tunnel(
        "127.0.0.1",
        cli.fleet.connect_port,
        ca_pem=cli.fleet.ca_path.read_bytes(),
        token=good,
        target="lin-a:22",
        timeout=15.0,
    )
    try:
        sock.settimeout(15.0)
        assert sock.recv(4).startswith(b"SSH-")
    finally:
        sock.close()
