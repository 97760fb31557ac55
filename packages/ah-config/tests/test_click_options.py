"""config_option / resolve_from_click: typed flags win, untyped flags never shadow config."""

from __future__ import annotations

from typing import Any

import click
import pytest
from ah_config_support import DEMO_DEFAULTS, Demo, World
from click.testing import CliRunner

from ah_config import (
    AhGroup,
    Layer,
    ResolvedConfig,
    config_file_option,
    config_option,
    global_options,
    resolve_from_click,
)


def _demo_cli(seen: dict[str, Any]) -> click.Group:
    @click.group(cls=AhGroup)
    @config_option("name", "--name")
    @config_option("verbose", "--verbose/--quiet")
    @config_file_option()
    def cli(**_: object) -> None:
        """Demo."""

    @cli.command()
    @config_option("net.retries", "--retries", type=int)
    @config_option("tags", "--tag", multiple=True)
    @click.pass_context
    def show(ctx: click.Context, /, **_: object) -> None:
        resolved = resolve_from_click(ctx, schema=Demo, defaults=DEMO_DEFAULTS)
        seen["resolved"] = resolved
        click.echo(f"name={resolved.get('name')}")

    return cli


def _run(args: list[str]) -> tuple[ResolvedConfig[Demo], str]:
    seen: dict[str, Any] = {}
    result = CliRunner().invoke(_demo_cli(seen), args)
    assert result.exit_code == 0, (result.stdout, result.stderr)
    resolved: ResolvedConfig[Demo] = seen["resolved"]
    return resolved, result.stdout


def test_untyped_option_does_not_shadow_configured_value(isolated_process_env: World) -> None:
    world = isolated_process_env
    world.write(world.repo_file, {"name": "from-repo", "verbose": True, "net": {"retries": 9}})
    resolved, stdout = _run(["show"])
    assert stdout == "name=from-repo\n"
    assert resolved.get("verbose") is True
    assert resolved.get("net.retries") == 9
    assert resolved.get("tags") == ["d"]  # default, since --tag was not typed
    origin = resolved.origin("name")
    assert origin is not None and origin.layer is Layer.REPO
    assert resolved.where("name") == f"repo {world.repo_file}"
    assert resolved.where("net.connect-timeout") == "net.connect-timeout"  # set by nothing
    assert resolved.where("net.connect-timeout", unset="config [net]") == "config [net]"


def test_typed_options_become_the_flag_layer(isolated_process_env: World) -> None:
    world = isolated_process_env
    world.write(world.repo_file, {"name": "from-repo", "verbose": True, "net": {"retries": 9}})
    resolved, stdout = _run(
        ["--name", "cli", "--quiet", "show", "--retries", "2", "--tag", "a", "--tag", "b"]
    )
    assert stdout == "name=cli\n"
    assert resolved.get("verbose") is False
    assert resolved.get("net.retries") == 2
    assert resolved.get("tags") == ["a", "b"]
    origins = {key: resolved.origin(key) for key in ("name", "verbose", "net.retries", "tags")}
    assert {k: (o.layer, o.source) for k, o in origins.items() if o} == {
        "name": (Layer.FLAG, "--name"),
        "verbose": (Layer.FLAG, "--quiet"),
        "net.retries": (Layer.FLAG, "--retries"),
        "tags": (Layer.FLAG, "--tag"),
    }


def test_flags_beat_config_file_and_env(
    isolated_process_env: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    world = isolated_process_env
    explicit = world.write(world.root / "explicit.toml", {"name": "explicit"})
    monkeypatch.setenv("AH_NAME", "env")
    assert _run(["show"])[1] == "name=env\n"
    assert _run(["--config", str(explicit), "show"])[1] == "name=explicit\n"
    assert _run(["--config", str(explicit), "--name", "flag", "show"])[1] == "name=flag\n"


def test_config_option_rejects_a_default() -> None:
    with pytest.raises(TypeError, match="shadow"):
        config_option("name", "--name", default="x")
    with pytest.raises(TypeError, match="AH_"):
        config_option("name", "--name", envvar="NAME")
    with pytest.raises(TypeError, match="required"):
        config_option("name", "--name", required=True)
    with pytest.raises(ValueError, match="invalid configuration key"):
        config_option("bad key!", "--name")
    # Explicit None is the same as no default and is accepted.
    config_option("name", "--name", default=None)


def test_a_plain_click_default_would_have_shadowed(isolated_process_env: World) -> None:
    """The failure config_option prevents: a click default reported as the value."""
    world = isolated_process_env
    world.write(world.repo_file, {"name": "from-repo"})

    @click.command()
    @click.option("--name", default="click-default")
    @config_option("name", "--config-name")
    @click.pass_context
    def cmd(ctx: click.Context, name: str, config_name: str | None) -> None:
        resolved = resolve_from_click(ctx, schema=Demo)
        click.echo(f"{name} {config_name} {resolved.get('name')}")

    result = CliRunner().invoke(cmd, [])
    assert result.stdout == "click-default None from-repo\n"


def test_bad_flag_value_is_a_usage_error_naming_the_flag(isolated_process_env: World) -> None:
    @click.command(cls=AhGroup.command_class)
    @config_option("net.retries", "--retries")
    @click.pass_context
    def cmd(ctx: click.Context, retries: str | None) -> None:
        resolve_from_click(ctx, schema=Demo)

    result = CliRunner().invoke(cmd, ["--retries", "many"])
    assert result.exit_code == 2
    assert "--retries" in result.stderr
    assert result.stdout == ""


def test_global_options_feed_remote_server_and_token(
    isolated_process_env: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    world = isolated_process_env
    world.write(world.user_file, {"remote-server": "https://user", "token": "user-token"})

    @click.group(cls=AhGroup)
    @global_options
    def cli(**_: object) -> None:
        pass

    @cli.command()
    @click.pass_context
    def where(ctx: click.Context) -> None:
        resolved = resolve_from_click(ctx)
        origin = resolved.origin("remote-server")
        assert origin is not None
        click.echo(f"{resolved.typed.remote_server} {resolved.typed.token} {origin.layer}")

    runner = CliRunner()
    assert runner.invoke(cli, ["where"]).stdout == "https://user user-token user\n"
    monkeypatch.setenv("AH_ACCESS_POINT", "https://alias")
    monkeypatch.setenv("AH_TOKEN", "env-token")
    assert runner.invoke(cli, ["where"]).stdout == "https://alias env-token env\n"
    result = runner.invoke(cli, ["--access-point", "https://flag", "where"])
    assert result.stdout == "https://flag env-token flag\n"
