"""ApiClient against a real HTTPS API server: every failure becomes the documented exit code
with the server's problem detail in the message."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from ah_api import ExecApiRequest
from ah_config import CliError
from ah_connectivity.pki import FleetCA
from ah_domain_types import ExitCode
from ah_fleetctl.client import ApiClient, tls_context
from ah_fleetctl.context import normalize_access_point

if TYPE_CHECKING:
    from conftest import RunningApi


def client(api: RunningApi, token: str | None, *, base_url: str | None = None) -> ApiClient:
    return ApiClient(
        base_url or api.url,
        token=token,
        verify=tls_context(api.ca_file),
        ca_description=f"the fleet CA {api.ca_file}",
        connect_timeout_s=5.0,
    )


def failure(call: object) -> CliError:
    assert callable(call)
    with pytest.raises(CliError) as caught:
        call()
    return caught.value


def test_followers_and_exec_round_trip(api: RunningApi) -> None:
    with client(api, api.token("exec")) as c:
        assert [f.info.name for f in c.followers().followers] == ["lin-a", "lin-b", "mac-1"]
        assert [f.info.name for f in c.followers(["pool=ci", "arch=arm64"]).followers] == ["lin-b"]
        answer = c.exec_mock(ExecApiRequest(hosts=["lin-b", "lin-a"], command=["id"]), wait_s=5)
        assert [(h.host, h.state, h.stdout) for h in answer.hosts] == [
            ("lin-b", "ok", "lin-b: id\n"),
            ("lin-a", "ok", "lin-a: id\n"),
        ]
        assert api.fleet.ca_pem() == c.ca_pem()


@pytest.mark.parametrize(
    ("token_kind", "problem"),
    [("none", "token-missing"), ("expired", "token-expired"), ("garbage", "token-malformed")],
)
def test_rejected_tokens_are_auth_errors(api: RunningApi, token_kind: str, problem: str) -> None:
    an_hour_ago = time.time() - 3600
    token = {
        "none": None,
        "expired": api.signer.issue_user("tester", scopes=["exec"], ttl="1m", now=an_hour_ago),
        "garbage": "not-a-jwt",
    }[token_kind]
    with client(api, token) as c:
        error = failure(c.followers)
    assert error.exit_code is ExitCode.AUTH
    assert error.kind == "auth"
    assert error.details["problemType"] == f"urn:ah:problem:{problem}"
    assert error.details["status"] == "401"
    assert api.url in error.message


def test_missing_scope_and_forbidden_host_are_auth_errors(api: RunningApi) -> None:
    with client(api, api.token("read-logs")) as c:
        error = failure(lambda: c.exec_mock(ExecApiRequest(hosts=["lin-a"], command=["id"])))
    assert error.exit_code is ExitCode.AUTH and error.kind == "forbidden"
    assert "lacks scope 'exec'" in error.message
    with client(api, api.token("exec", hosts="lin-*")) as c:
        error = failure(lambda: c.exec_mock(ExecApiRequest(hosts=["mac-1"], command=["id"])))
    assert error.exit_code is ExitCode.AUTH
    assert error.details["problemType"] == "urn:ah:problem:host-forbidden"
    assert "'mac-1'" in error.message


def test_unknown_host_is_a_validation_error(api: RunningApi) -> None:
    with client(api, api.token("exec")) as c:
        error = failure(lambda: c.exec_mock(ExecApiRequest(hosts=["ghost"], command=["id"])))
    assert error.exit_code is ExitCode.VALIDATION and error.kind == "unknownHost"
    assert error.message == "host 'ghost' is not an enrolled follower"


def test_bad_tag_is_a_validation_error(api: RunningApi) -> None:
    with client(api, api.token("exec")) as c:
        error = failure(lambda: c.followers(["no-equals"]))
    assert error.exit_code is ExitCode.VALIDATION
    assert "no-equals" in error.message


def test_wrong_base_path_is_a_configuration_error(api: RunningApi) -> None:
    with client(api, api.token("exec"), base_url=f"{api.url}/elsewhere") as c:
        error = failure(c.followers)
    assert error.exit_code is ExitCode.CONFIGURATION
    assert "remote-server" in error.message


def test_certificate_from_another_ca_is_an_auth_error(api: RunningApi, tmp_path: Path) -> None:
    other = tmp_path / "other-ca.pem"
    other.write_bytes(FleetCA.generate("other.fleet").cert_pem)
    with ApiClient(
        api.url,
        token=api.token("exec"),
        verify=tls_context(other),
        ca_description=f"the fleet CA {other}",
        connect_timeout_s=5.0,
    ) as c:
        error = failure(c.followers)
    assert error.exit_code is ExitCode.AUTH and error.kind == "tls"
    assert str(other) in error.message and "ah-fleetctl login" in error.message


def test_unreadable_ca_file_is_a_configuration_error(tmp_path: Path) -> None:
    missing = tmp_path / "missing.pem"
    error = failure(lambda: tls_context(missing))
    assert error.exit_code is ExitCode.CONFIGURATION
    assert str(missing) in error.message and "ca-file" in error.message


@pytest.fixture
def refusing_port() -> Iterator[int]:
    """A port that is bound but not listening: connections to it are refused."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that accepts TCP connections (backlog) but never answers TLS."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        yield sock.getsockname()[1]


def test_connection_refused_is_a_network_error(api: RunningApi, refusing_port: int) -> None:
    url = f"https://127.0.0.1:{refusing_port}"
    with client(api, "t", base_url=url) as c:
        error = failure(c.followers)
    assert error.exit_code is ExitCode.NETWORK and error.kind == "network"
    assert f"cannot reach access point {url}" in error.message


def test_silent_server_is_a_network_timeout(api: RunningApi, silent_port: int) -> None:
    url = f"https://127.0.0.1:{silent_port}"
    with ApiClient(
        url,
        token="t",
        verify=tls_context(api.ca_file),
        ca_description="test",
        connect_timeout_s=0.3,
        read_timeout_s=0.3,
    ) as c:
        error = failure(c.followers)
    assert error.exit_code is ExitCode.NETWORK
    assert "did not answer" in error.message and url in error.message


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("https://ap.example:8443", "https://ap.example:8443"),
        ("ap.example:8443/", "https://ap.example:8443"),
        ("https://ap.example/api/v1/", "https://ap.example"),
        (" https://[::1]:9 ", "https://[::1]:9"),
    ],
)
def test_access_point_urls_are_normalized(text: str, expected: str) -> None:
    assert normalize_access_point(text) == expected


@pytest.mark.parametrize("text", ["http://ap.example", "ftp://x", "https://", "https://h:99999"])
def test_bad_access_point_urls_are_configuration_errors(text: str) -> None:
    error = failure(lambda: normalize_access_point(text, source="env AH_REMOTE_SERVER"))
    assert error.exit_code is ExitCode.CONFIGURATION
    assert "env AH_REMOTE_SERVER" in error.message and repr(text) in error.message
