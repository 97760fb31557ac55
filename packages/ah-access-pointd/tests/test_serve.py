"""``serve``: ready file, TLS API, graceful stop, and the errors it exits with."""

from __future__ import annotations

import json
import os
import shutil
import socket
import ssl
import urllib.request
from pathlib import Path
from typing import Any

from ah_connectivity import SERVE_SPIFFE, verify_peer


def _get(url: str, context: ssl.SSLContext) -> tuple[int, Any]:
    with urllib.request.urlopen(url, context=context, timeout=10) as response:
        return response.status, json.loads(response.read())


def test_ready_file_names_every_listener_and_they_answer(serving_ap: Any) -> None:
    ready = serving_ap.ready
    assert set(ready) == {
        "pid", "bind", "quicPort", "apiPort", "connectPort", "caFingerprint", "trustDomain",
    }  # fmt: skip
    assert ready["pid"] == serving_ap.process.pid
    assert ready["bind"] == "127.0.0.1"
    assert 0 < ready["connectPort"] < 65536
    assert ready["caFingerprint"] == serving_ap.state.ca.fingerprint
    assert ready["trustDomain"] == serving_ap.state.trust_domain
    assert 0 < ready["quicPort"] < 65536 and 0 < ready["apiPort"] < 65536

    context = serving_ap.ssl_context()
    assert _get(f"{serving_ap.api_url}/api/v1/readyz", context) == (
        200, {"status": "ready", "version": "0.1.0"},
    )  # fmt: skip
    # The API presents the server identity, checked by name against the fleet CA.
    with (
        socket.create_connection(("127.0.0.1", ready["apiPort"]), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    assert verify_peer(der, serving_ap.state.ca, SERVE_SPIFFE(ready["trustDomain"]))
    # The CONNECT listener is TLS with the same identity, and tells its port to leaders.
    with (
        socket.create_connection(("127.0.0.1", ready["connectPort"]), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    assert verify_peer(der, serving_ap.state.ca, SERVE_SPIFFE(ready["trustDomain"]))
    # The QUIC port is bound (UDP): binding it again fails.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.bind(("127.0.0.1", ready["quicPort"]))
        except OSError:
            pass
        else:
            raise AssertionError(f"QUIC port {ready['quicPort']} is not bound by the daemon")


def test_sigterm_stops_gracefully_and_serve_restarts_on_the_same_ports(
    tmp_path: Path, cli: Any, cli_many: Any, start_ap: Any
) -> None:
    state_dir = tmp_path / "ap"
    assert cli("init", "--state-dir", str(state_dir)).returncode == 0
    first = start_ap(state_dir, name="serve-1")
    assert first.process.terminate(10) == 0
    assert not first.ready_file.exists(), "a stopped daemon must not leave its ready file"
    assert "access point stopped" in first.process.stderr_text()

    ports = ["--quic-port", str(first.ready["quicPort"]), "--api-port", str(first.ready["apiPort"])]
    second = start_ap(state_dir, ports, name="serve-2")
    assert (second.ready["quicPort"], second.ready["apiPort"]) == (
        first.ready["quicPort"], first.ready["apiPort"],
    )  # fmt: skip
    assert second.ready["caFingerprint"] == first.ready["caFingerprint"]
    status, _ = _get(f"{second.api_url}/api/v1/healthz", second.ssl_context())
    assert status == 200

    # Ports taken (by the running daemon): exit 5 naming the port, no ready file.
    ready_file = tmp_path / "third.json"
    clash, quic_clash = cli_many(
        ["serve", "--state-dir", str(state_dir), "--api-port", str(second.ready["apiPort"]),
         "--ready-file", str(ready_file)],
        ["serve", "--state-dir", str(state_dir), "--quic-port", str(second.ready["quicPort"])],
    )  # fmt: skip
    assert clash.returncode == 5, clash.stderr
    assert f"127.0.0.1:{second.ready['apiPort']}" in clash.stderr
    assert not ready_file.exists()
    assert quic_clash.returncode == 5, quic_clash.stderr
    assert (
        f"cannot listen for QUIC on 127.0.0.1:{second.ready['quicPort']}/udp" in quic_clash.stderr
    )
    assert second.process.terminate(10) == 0


def test_serve_without_state_exits_8(tmp_path: Path, serving_ap: Any, cli_many: Any) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(serving_ap.state_dir, broken)
    os.remove(broken / "server.key")
    missing, incomplete = cli_many(
        ["serve", "--state-dir", str(tmp_path / "missing")],
        ["serve", "--state-dir", str(broken)],
    )
    assert missing.returncode == 8
    assert "does not exist" in missing.stderr and missing.stdout == ""
    assert incomplete.returncode == 8
    assert "server.key" in incomplete.stderr


def test_endpoints_tell_leaders_the_connect_port(serving_ap: Any) -> None:
    request = urllib.request.Request(
        f"{serving_ap.api_url}/api/v1/endpoints",
        headers={"Authorization": f"Bearer {serving_ap.user_token()}"},
    )
    with urllib.request.urlopen(request, context=serving_ap.ssl_context(), timeout=10) as answer:
        body = json.loads(answer.read())
    assert body["connectPort"] == serving_ap.ready["connectPort"]
    assert body["quicPort"] == serving_ap.ready["quicPort"]
    assert body["trustDomain"] == serving_ap.ready["trustDomain"]
