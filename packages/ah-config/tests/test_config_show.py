"""``config show [KEY] [--show-origin]`` mounted under a CLI group."""

from __future__ import annotations

import json

import click
import pytest
from ah_config_support import World
from click.testing import CliRunner, Result

from ah_config import AhGroup, global_options, make_config_show_command


def _cli() -> click.Group:
    @click.group(cls=AhGroup)
    @global_options
    def cli(**_: object) -> None:
        pass

    @cli.group()
    def config() -> None:
        pass

    config.add_command(make_config_show_command())
    return cli


def _show(*args: str) -> Result:
    return CliRunner().invoke(_cli(), list(args))


@pytest.fixture
def configured(isolated_process_env: World, monkeypatch: pytest.MonkeyPatch) -> World:
    world = isolated_process_env
    world.write(world.user_file, {"remote-server": "https://user", "token": "s3cret"})
    world.write(world.repo_file, {"sync-ignores": ["dist"], "ssh": {"user": "ci"}})
    monkeypatch.setenv("AH_TIMEOUTS_CONNECT", "9s")
    return world


def test_show_lists_every_key_with_origin(configured: World) -> None:
    result = _show("--access-point", "https://flag", "config", "show", "--show-origin")
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert 'remote-server = "https://flag"  # flag --access-point' in lines
    assert 'token = "***"  # user ' + str(configured.user_file) in lines
    assert 'sync-ignores = ["dist"]  # repo ' + str(configured.repo_file) in lines
    assert 'timeouts.connect = "9s"  # env AH_TIMEOUTS_CONNECT' in lines
    assert "concurrency.transfer = 16  # default" in lines
    assert "s3cret" not in result.output


def test_show_without_origin_and_one_key(configured: World) -> None:
    result = _show("config", "show", "ssh.user")
    assert (result.exit_code, result.stdout) == (0, 'ssh.user = "ci"\n')
    result = _show("config", "show", "ssh")
    assert result.stdout == 'ssh.user = "ci"\n'


def test_show_json(configured: World) -> None:
    result = _show("--json", "config", "show", "token")
    assert result.exit_code == 0
    assert json.loads(result.stdout) == {
        "token": {"value": "***", "origin": {"layer": "user", "source": str(configured.user_file)}}
    }
    everything = json.loads(_show("--json", "config", "show").stdout)
    assert everything["concurrency.transfer"] == {
        "value": 16,
        "origin": {"layer": "default", "source": "default"},
    }


def test_show_unset_key(configured: World) -> None:
    result = _show("config", "show", "ca-file")
    assert (result.exit_code, result.stdout) == (0, "")
    assert "ca-file is not set" in result.stderr
    result = _show("--json", "config", "show", "ca-file")
    assert json.loads(result.stdout) == {"ca-file": {"value": None, "origin": None}}


def test_show_unknown_key_is_a_usage_error_with_suggestions(configured: World) -> None:
    result = _show("config", "show", "remote-servr")
    assert result.exit_code == 2
    assert result.stdout == ""
    assert "unknown configuration key 'remote-servr'" in result.stderr
    assert "remote-server" in result.stderr
    result = _show("--json", "config", "show", "ssh.usr")
    assert result.exit_code == 2
    assert json.loads(result.stdout)["error"]["kind"] == "usage"


def test_show_warns_about_unknown_ah_variables(
    configured: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AH_REMOTE_SERVR", "typo")
    result = _show("config", "show", "remote-server")
    assert result.exit_code == 0
    assert "AH_REMOTE_SERVR" in result.stderr
    assert result.stdout == 'remote-server = "https://user"\n'


def test_show_reports_broken_config_with_exit_8(configured: World) -> None:
    configured.write(configured.repo_user_file, "[ssh\n")
    result = _show("config", "show")
    assert result.exit_code == 8
    assert str(configured.repo_user_file) in result.stderr
    assert result.stdout == ""
