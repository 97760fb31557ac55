"""The CLI contract: exit codes, stderr messages, the --json error document, interaction."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import click
import pytest
from ah_config_support import World
from click.testing import CliRunner, Result

import ah_config.cli
from ah_config import (
    AhGroup,
    CliError,
    confirm,
    echo_json,
    global_options,
    require_interaction,
    resolve_from_click,
)
from ah_domain_types import DomainValidationError, ExitCode


def _cli() -> click.Group:
    @click.group(cls=AhGroup)
    @global_options
    def cli(**_: object) -> None:
        """Test CLI."""

    @cli.command()
    @click.argument("count", type=int)
    @click.pass_context
    def ok(ctx: click.Context, count: int) -> None:
        if ah_config.is_json(ctx):
            echo_json({"count": count})
        else:
            click.echo(f"count={count}")

    @cli.command()
    @click.pass_context
    def load(ctx: click.Context) -> None:
        resolve_from_click(ctx)

    @cli.command()
    @click.option("--code", type=int, required=True)
    def fail(code: int) -> None:
        raise CliError(ExitCode(code), f"failed with {code}", details={"host": "h1"})

    @cli.command()
    def invalid() -> None:
        raise DomainValidationError("bad selector 'x'", details={"value": "x"})

    @cli.command()
    def boom() -> None:
        raise RuntimeError("kaput")

    @cli.command()
    def interrupt() -> None:
        raise KeyboardInterrupt

    @cli.command()
    def hosts_failed() -> int:
        return ExitCode.HOSTS_FAILED

    @cli.command()
    @click.pass_context
    def ask(ctx: click.Context) -> None:
        answer = confirm(ctx, "Delete everything?")
        click.echo(f"answer={answer}")

    @cli.command()
    @click.pass_context
    def needs(ctx: click.Context) -> None:
        require_interaction(ctx, "choosing a host")
        click.echo("would prompt")

    return cli


def _invoke(args: list[str], **kwargs: object) -> Result:
    return CliRunner().invoke(_cli(), args, **kwargs)  # type: ignore[arg-type]


def _one_json_document(stdout: str) -> dict[str, object]:
    lines = stdout.splitlines()
    assert len(lines) == 1, stdout
    document = json.loads(lines[0])
    assert isinstance(document, dict)
    return document


def test_success_exit_zero(isolated_process_env: World) -> None:
    result = _invoke(["ok", "3"])
    assert (result.exit_code, result.stdout, result.stderr) == (0, "count=3\n", "")
    result = _invoke(["--json", "ok", "3"])
    assert _one_json_document(result.stdout) == {"count": 3}


@pytest.mark.parametrize(
    "args",
    [["--bogus"], ["ok"], ["ok", "three"], ["nosuchcommand"], ["fail"], []],
)
def test_usage_errors_exit_2_with_message_on_stderr(
    isolated_process_env: World, args: list[str]
) -> None:
    result = _invoke(args)
    assert result.exit_code == 2
    assert result.stdout == ""
    assert "Usage:" in result.stderr
    if args:
        assert "Error:" in result.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["--json", "--bogus"],
        ["--json", "ok"],
        ["--json", "ok", "three"],
        ["--json", "nosuchcommand"],
    ],
)
def test_usage_errors_with_json_print_one_error_document(
    isolated_process_env: World, args: list[str]
) -> None:
    result = _invoke(args)
    assert result.exit_code == 2
    document = _one_json_document(result.stdout)
    assert set(document) == {"error"}
    error = document["error"]
    assert isinstance(error, dict)
    assert error["kind"] == "usage"
    assert error["exitCode"] == 2
    assert error["message"]
    assert "Error:" in result.stderr


def test_json_after_double_dash_is_not_the_json_flag(isolated_process_env: World) -> None:
    result = _invoke(["--bogus", "--", "--json"])
    assert result.exit_code == 2
    assert result.stdout == ""


@pytest.mark.parametrize(
    "code",
    [
        ExitCode.HOSTS_FAILED,
        ExitCode.AUTH,
        ExitCode.NETWORK,
        ExitCode.VALIDATION,
        ExitCode.CONFIGURATION,
    ],
)
def test_cli_error_exit_codes(isolated_process_env: World, code: ExitCode) -> None:
    result = _invoke(["fail", "--code", str(int(code))])
    assert result.exit_code == code
    assert result.stderr == f"Error: failed with {int(code)}\n"
    assert result.stdout == ""
    result = _invoke(["--json", "fail", "--code", str(int(code))])
    assert _one_json_document(result.stdout) == {
        "error": {
            "kind": ah_config.cli._camel(code.name),
            "message": f"failed with {int(code)}",
            "exitCode": int(code),
            "details": {"host": "h1"},
        }
    }


def test_domain_validation_error_exits_7(isolated_process_env: World) -> None:
    result = _invoke(["--json", "invalid"])
    assert result.exit_code == 7
    error = _one_json_document(result.stdout)["error"]
    assert isinstance(error, dict)
    assert (error["kind"], error["details"]) == ("validation", {"value": "x"})


def test_configuration_error_exits_8_naming_file_and_line(isolated_process_env: World) -> None:
    world = isolated_process_env
    world.write(world.repo_file, "remote-server = \n")
    result = _invoke(["load"])
    assert result.exit_code == 8
    assert str(world.repo_file) in result.stderr
    assert "line 1" in result.stderr
    assert result.stdout == ""
    result = _invoke(["--json", "load"])
    assert result.exit_code == 8
    error = _one_json_document(result.stdout)["error"]
    assert isinstance(error, dict)
    assert error["kind"] == "configuration"
    assert error["exitCode"] == 8
    assert error["details"] == {
        "source": str(world.repo_file),
        "expected": "valid TOML",
        "line": "1",
        "column": "17",
        "layer": "repo",
    }


def test_schema_invalid_config_exits_8(isolated_process_env: World) -> None:
    world = isolated_process_env
    world.write(world.user_file, {"concurrency": {"transfer": "lots"}})
    result = _invoke(["load"])
    assert result.exit_code == 8
    assert str(world.user_file) in result.stderr
    assert "'concurrency.transfer'" in result.stderr
    assert "integer" in result.stderr


def test_ah_json_env_enables_json_errors(
    isolated_process_env: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AH_JSON", "1")
    result = _invoke(["fail", "--code", "5"])
    assert result.exit_code == 5
    assert _one_json_document(result.stdout)["error"]


def test_unexpected_exception_is_one_line_exit_1(
    isolated_process_env: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    result = _invoke(["boom"])
    assert result.exit_code == 1
    assert result.stderr.count("\n") == 1
    assert "RuntimeError: kaput" in result.stderr
    assert "Traceback" not in result.stderr
    monkeypatch.setenv("AH_DEBUG", "1")
    result = _invoke(["boom"])
    assert result.exit_code == 1
    assert "Traceback" in result.stderr


def test_keyboard_interrupt_exits_130(isolated_process_env: World) -> None:
    result = _invoke(["--json", "interrupt"])
    assert result.exit_code == 130
    error = _one_json_document(result.stdout)["error"]
    assert isinstance(error, dict) and error["kind"] == "interrupted"


def test_callback_may_return_an_exit_code(isolated_process_env: World) -> None:
    assert _invoke(["hosts-failed"]).exit_code == 1


def test_non_interactive_never_prompts(
    isolated_process_env: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ah_config.cli, "_stdin_is_tty", lambda: True)
    result = _invoke(["--non-interactive", "ask"], input="y\n")
    assert result.exit_code == 10
    assert "Delete everything?" in result.stderr  # named in the error...
    assert "[y/N]" not in result.output  # ...but never asked
    assert "--non-interactive" in result.stderr

    result = _invoke(["--json", "--non-interactive", "needs"])
    assert result.exit_code == 10
    error = _one_json_document(result.stdout)["error"]
    assert isinstance(error, dict)
    assert error["kind"] == "interactionNeeded"
    assert error["message"] == "choosing a host needs interaction but --non-interactive is set"


def test_confirm_without_a_terminal_does_not_prompt(isolated_process_env: World) -> None:
    result = _invoke(["ask"], input="y\n")
    assert result.exit_code == 10
    assert "not a terminal" in result.stderr
    assert "[y/N]" not in result.output


def test_confirm_prompts_on_a_terminal(
    isolated_process_env: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ah_config.cli, "_stdin_is_tty", lambda: True)
    result = _invoke(["ask"], input="y\n")
    assert result.exit_code == 0
    assert result.stdout == "answer=True\n"
    assert "Delete everything? [y/N]" in result.stderr
    assert _invoke(["needs"]).stdout == "would prompt\n"


def test_real_process_exit_codes_and_streams(tmp_path: Path, world: World) -> None:
    script = tmp_path / "tool.py"
    script.write_text(
        textwrap.dedent(
            """
            import click
            from ah_config import AhGroup, global_options

            @click.group(cls=AhGroup)
            @global_options
            def cli(**_):
                pass

            @cli.command()
            def hello():
                click.echo("hello")

            if __name__ == "__main__":
                cli.main(prog_name="tool")
            """
        ),
        encoding="utf-8",
    )
    env = {**world.env, "PATH": "/usr/bin:/bin"}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, str(script), *args],
            capture_output=True,
            text=True,
            env=env,
            cwd=world.cwd,
            timeout=60,
            check=False,
        )

    done = run("hello")
    assert (done.returncode, done.stdout, done.stderr) == (0, "hello\n", "")
    done = run("--json", "--nope")
    assert done.returncode == 2
    assert json.loads(done.stdout)["error"]["exitCode"] == 2
    assert "Usage: tool" in done.stderr
