"""The CLI contract through the real console script: exit codes, stderr vs stdout, --json
errors as exactly one document, --non-interactive never prompting."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:  # conftest is not importable at run time under --import-mode=importlib
    from conftest import Cli, CliResult, RunningApi


def assert_usage_error(result: CliResult, *needles: str, code: int = 2) -> None:
    assert result.returncode == code, result
    assert result.stdout == "", result
    for needle in needles:
        assert needle in result.stderr, result


def assert_json_error(result: CliResult, code: int, kind: str) -> dict[str, object]:
    assert result.returncode == code, result
    document = json.loads(result.stdout)  # exactly one document: json.loads rejects extra data
    assert set(document) == {"error"}, document
    error = document["error"]
    assert error["exitCode"] == code, document
    assert error["kind"] == kind, document
    assert error["message"], document
    assert "Error:" in result.stderr, result
    return error


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["fleet", "list", "--bogus"], ["No such option", "--bogus"]),
        (["--bogus", "fleet", "list"], ["No such option", "--bogus"]),
        (["fleet", "list", "--host"], ["--host", "requires an argument"]),
        (["fleet", "nope"], ["No such command", "nope"]),
        (["exec", "--mock", "--timeout", "5x", "--", "true"], ["--timeout", "invalid duration"]),
        (["exec", "--mock", "--timeout", "0s", "--", "true"], ["--timeout", "longer than 0"]),
        (["exec", "--mock"], ["Missing argument"]),
        (["exec", "--", "echo", "hi"], ["--mock", "ah-fleetctl run"]),
        (["login", "--ca-fingerprint", "md5:abc"], ["--ca-fingerprint", "64 hex digits"]),
        (["--log-level", "loud", "config", "show"], ["--log-level"]),
    ],
    ids=[
        "unknown-option",
        "unknown-global-option",
        "missing-value",
        "unknown-command",
        "bad-timeout",
        "zero-timeout",
        "missing-command",
        "exec-without-mock",
        "bad-fingerprint",
        "bad-log-level",
    ],
)
def test_malformed_arguments_exit_2_with_the_error_on_stderr_only(
    cli: Cli, args: list[str], needles: list[str]
) -> None:
    assert_usage_error(cli(*args), *needles)


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["fleet", "list", "--tag", "pool"], ["invalid tag selector 'pool'", "KEY=VALUE"]),
        (["fleet", "list", "--tag", "=ci"], ["empty key"]),
        (["fleet", "list", "--all", "--host", "lin-a"], ["--all cannot be combined"]),
        (["exec", "--mock", "--host", "-bad-", "--", "true"], ["invalid host name"]),
    ],
    ids=["tag-without-equals", "tag-empty-key", "all-with-host", "bad-host-name"],
)
def test_selector_validation_errors_exit_7(cli: Cli, args: list[str], needles: list[str]) -> None:
    # Selectors are checked before any configuration or network is needed.
    assert_usage_error(cli(*args), *needles, code=7)


def test_json_usage_error_is_exactly_one_json_document(cli: Cli) -> None:
    result = cli("--json", "fleet", "list", "--bogus")
    error = assert_json_error(result, 2, "usage")
    assert "--bogus" in str(error["message"])


def test_json_flag_after_the_command_also_gives_a_json_error(cli: Cli) -> None:
    error = assert_json_error(cli("fleet", "list", "--tag", "pool", "--json"), 7, "selector")
    assert error["details"] == {"value": "pool"}


def test_ah_json_variable_gives_json_errors(cli: Cli) -> None:
    assert_json_error(cli("exec", "--mock", env={"AH_JSON": "1"}), 2, "usage")


def test_missing_access_point_is_a_configuration_error(cli: Cli) -> None:
    result = cli("--json", "fleet", "list")
    error = assert_json_error(result, 8, "configuration")
    assert "--access-point" in str(error["message"])
    assert "ah-fleetctl login" in result.stderr


def test_missing_token_is_a_configuration_error(cli: Cli, api: RunningApi) -> None:
    result = cli("fleet", "list", "--access-point", api.url)
    assert_usage_error(result, "no user token configured", "AH_TOKEN", code=8)


def test_malformed_access_point_url_names_its_source(cli: Cli) -> None:
    result = cli("fleet", "list", env={"AH_REMOTE_SERVER": "http://plain:80", "AH_TOKEN": "t"})
    assert_usage_error(result, "env AH_REMOTE_SERVER", "https://HOST[:PORT]", code=8)


@pytest.mark.parametrize(
    "how",
    [["--non-interactive"], ["login", "--non-interactive"], "AH_NON_INTERACTIVE"],
    ids=["global-flag", "command-flag", "environment"],
)
def test_non_interactive_login_without_fingerprint_exits_10_without_prompting(
    cli: Cli, how: list[str] | str
) -> None:
    # The access point is unreachable on purpose: the check happens before any network use.
    target = ["--access-point", "https://127.0.0.1:9", "--token", "secret-token-value"]
    if how == "AH_NON_INTERACTIVE":
        result = cli("login", *target, env={"AH_NON_INTERACTIVE": "1"})
    elif how[0] == "login":
        result = cli(*how, *target)
    else:
        result = cli(*how, "login", *target)
    assert_usage_error(result, "--non-interactive", "--ca-fingerprint", code=10)
    assert "secret-token-value" not in result.stderr
    assert not (cli.ah_home / "config.toml").exists()


def test_login_without_a_terminal_refuses_to_prompt(cli: Cli, api: RunningApi) -> None:
    # Not --non-interactive, but stdin is closed: asking is impossible, so exit 10, no hang.
    result = cli("login", "--access-point", api.url, "--token", api.token("read-logs"))
    assert result.returncode == 10, result
    assert api.fingerprint in result.stderr  # shown before the question that cannot be asked
    assert "not a terminal" in result.stderr
    assert not (cli.ah_home / "config.toml").exists()


def test_unwritable_log_file_is_a_configuration_error(cli: Cli) -> None:
    result = cli("fleet", "list", "--log-file", "/proc/no-such-dir/fleetctl.log")
    assert_usage_error(result, "cannot open log file /proc/no-such-dir/fleetctl.log", code=8)


def test_bad_configured_log_level_is_a_configuration_error(cli: Cli) -> None:
    result = cli("fleet", "list", env={"AH_LOG_LEVEL": "loud"})
    assert_usage_error(result, "env AH_LOG_LEVEL", "'loud'", code=8)


def test_bad_rust_log_is_a_usage_error(cli: Cli) -> None:
    result = cli("fleet", "list", env={"RUST_LOG": "ah_api=loud"})
    assert_usage_error(result, "RUST_LOG", "loud")


def test_help_and_version(cli: Cli) -> None:
    result = cli("--help")
    assert result.returncode == 0, result
    for command in ("login", "fleet", "exec", "config"):
        assert command in result.stdout
    version = cli("--version")
    assert version.returncode == 0 and "0.1.0" in version.stdout, version
