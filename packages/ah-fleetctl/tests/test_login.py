"""``ah-fleetctl login`` against a real HTTPS API: CA pinning, token check, user config."""

from __future__ import annotations

import os
import pty
import tomllib
from typing import TYPE_CHECKING

import pytest

from ah_connectivity.pki import FleetCA
from ah_connectivity.pki import ca_fingerprint as pki_fingerprint
from ah_connectivity.tokens import TokenSigner
from ah_fleetctl.commands.login import ca_fingerprint, normalize_fingerprint

if TYPE_CHECKING:
    from conftest import Cli, RunningApi


def test_fingerprint_matches_the_pki_definition_and_accepts_common_spellings() -> None:
    ca = FleetCA.generate("fingerprint.test")
    expected = pki_fingerprint(ca.cert_pem)
    assert ca_fingerprint(ca.cert_pem.decode()) == expected
    hex_digits = expected.removeprefix("sha256:")
    colons = ":".join(hex_digits[i : i + 2] for i in range(0, 64, 2)).upper()
    for spelling in (expected, hex_digits, f"SHA256:{colons}", f"  {expected.upper()} "):
        assert normalize_fingerprint(spelling) == expected
    for bad in ("sha256:", "sha1:" + hex_digits, hex_digits[:-2], hex_digits + "00", "sha256:zz"):
        with pytest.raises(ValueError, match="64 hex digits"):
            normalize_fingerprint(bad)


def test_login_refuses_a_ca_whose_fingerprint_does_not_match(cli: Cli, api: RunningApi) -> None:
    wrong = "sha256:" + "ab" * 32
    token = api.token("read-logs")
    result = cli("login", "--access-point", api.url, "--token", token, "--ca-fingerprint", wrong)
    assert result.returncode == 4, result
    assert result.stdout == ""
    assert wrong in result.stderr and api.fingerprint in result.stderr, result
    assert "nothing was stored" in result.stderr
    assert token not in result.stderr
    assert not cli.ah_home.exists() or not any(cli.ah_home.iterdir())


def test_login_refuses_a_token_the_access_point_rejects(cli: Cli, api: RunningApi) -> None:
    forged = TokenSigner.generate("fleetctl-test.fleet").issue_user("mallory", scopes=["exec"])
    result = cli(
        "--json",
        "login",
        "--access-point",
        api.url,
        "--token",
        forged,
        "--ca-fingerprint",
        api.fingerprint,
    )
    assert result.returncode == 4, result
    error = result.json()["error"]
    assert error["kind"] == "auth" and error["exitCode"] == 4
    assert error["details"]["problemType"] == "urn:ah:problem:token-forged"
    assert "rejected the token (401)" in error["message"]
    assert forged not in result.stderr and forged not in result.stdout
    assert not (cli.ah_home / "config.toml").exists()


def test_interactive_login_shows_the_fingerprint_and_asks(cli: Cli, api: RunningApi) -> None:
    # A real terminal on stdin (a pty) so that the confirmation prompt is allowed.
    controller, terminal = pty.openpty()
    try:
        os.write(controller, b"y\n")
        done = cli("login", "--access-point", api.url, "--token", api.token("exec"), stdin=terminal)
    finally:
        os.close(terminal)
        os.close(controller)
    assert done.returncode == 0, done
    assert api.fingerprint in done.stderr
    assert "Trust this CA and log in?" in done.stderr
    assert f"Fleet CA {api.fingerprint} pinned in {cli.ah_home / 'fleet-ca.pem'}" in done.stdout
    stored = tomllib.loads((cli.ah_home / "config.toml").read_text())
    assert stored["remote-server"] == api.url
