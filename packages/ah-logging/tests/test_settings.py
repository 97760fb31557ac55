"""LogSettings precedence, per-kind defaults, standard locations and the click flags."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st

from ah_logging import (
    DirectiveError,
    LogSettings,
    default_log_dir,
    default_log_file,
    default_settings,
    log_options,
    log_settings_from_click,
)


def test_merged_takes_flag_then_config_then_default() -> None:
    flags = LogSettings(level="debug")
    configured = LogSettings(level="error", format="json", dir="/var/log/ah")
    merged = LogSettings.merged(flags, configured, "daemon")
    assert merged == LogSettings(level="debug", format="json", dir="/var/log/ah")
    assert LogSettings.merged(LogSettings(), None, "cli") == LogSettings(level="info")
    assert LogSettings.merged(LogSettings(), configured, "cli") == configured


def test_file_and_dir_move_together() -> None:
    configured = LogSettings(file="/var/log/ah/custom.log")
    merged = LogSettings.merged(LogSettings(dir="/tmp/logs"), configured, "daemon")
    assert (merged.file, merged.dir) == (None, "/tmp/logs")
    merged = LogSettings.merged(LogSettings(file="/tmp/x.log"), LogSettings(dir="/d"), "cli")
    assert (merged.file, merged.dir) == ("/tmp/x.log", None)


optional_levels = st.none() | st.sampled_from(["trace", "debug", "info", "warning", "a=debug"])
optional_paths = st.none() | st.sampled_from(["/a", "/b/c", "rel/x"])
optional_formats = st.none() | st.sampled_from(["text", "json"])
settings_strategy = st.builds(
    LogSettings,
    level=optional_levels,
    file=optional_paths,
    dir=optional_paths,
    format=optional_formats,
)


@given(settings_strategy, st.none() | settings_strategy, st.sampled_from(["cli", "daemon"]))
def test_merged_precedence_property(
    flags: LogSettings, configured: LogSettings | None, kind: Any
) -> None:
    merged = LogSettings.merged(flags, configured, kind)
    layers = [flags] if configured is None else [flags, configured]
    for name, default in (("level", "info"), ("format", None)):
        given_values = [getattr(layer, name) for layer in layers if getattr(layer, name)]
        assert getattr(merged, name) == (given_values[0] if given_values else default)
    with_destination = [layer for layer in layers if layer.file or layer.dir]
    expected = with_destination[0] if with_destination else LogSettings()
    assert (merged.file, merged.dir) == (expected.file, expected.dir)


def test_from_config_accepts_sections_and_mappings() -> None:
    @dataclass(frozen=True)
    class LogConfig:  # the shape of ah-config's [log] section
        level: str | None = None
        format: str | None = None
        file: str | None = None
        dir: str | None = None

    assert LogSettings.from_config(None) is None
    assert LogSettings.from_config(LogConfig(level="debug", dir="/d")) == LogSettings(
        level="debug", dir="/d"
    )
    assert LogSettings.from_config({"format": "json"}) == LogSettings(format="json")
    with pytest.raises(ValueError, match="unknown log setting"):
        LogSettings.from_config({"levle": "debug"})
    with pytest.raises(DirectiveError, match="'loud'"):
        LogSettings.from_config(LogConfig(level="loud"))


def test_validation_is_loud() -> None:
    assert LogSettings(format="JSON").format == "json"  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown log format 'xml'"):
        LogSettings(format="xml")  # type: ignore[arg-type]
    with pytest.raises(DirectiveError, match="'loud'"):
        LogSettings(level="loud")
    with pytest.raises(ValueError, match="log file is an empty path"):
        LogSettings(file=" ")


def test_sink_formats_per_kind() -> None:
    assert default_settings("cli").sink_formats("cli") == ("text", "text")
    assert default_settings("daemon").sink_formats("daemon") == ("text", "json")
    assert LogSettings(format="text").sink_formats("daemon") == ("text", "text")
    assert LogSettings(format="json").sink_formats("cli") == ("json", "json")
    with pytest.raises(ValueError, match="unknown binary kind 'tui'"):
        default_settings("tui")  # type: ignore[arg-type]


def test_log_file_path(tmp_path: Path) -> None:
    assert LogSettings().log_file_path("ah-fleetctl") is None
    assert LogSettings(dir=str(tmp_path)).log_file_path("ah-followerd") == (
        tmp_path / "ah-followerd.log"
    )
    both = LogSettings(dir=str(tmp_path), file=str(tmp_path / "x.log"))
    assert both.log_file_path("ah-followerd") == tmp_path / "x.log"
    assert LogSettings(file="~/x.log").log_file_path("b") == Path.home() / "x.log"
    with pytest.raises(ValueError, match="binary name"):
        LogSettings(dir=str(tmp_path)).log_file_path("../evil")


@pytest.mark.parametrize(
    ("platform", "env", "expected_parts"),
    [
        (
            "linux",
            {"HOME": "/home/u"},
            ("/", "home", "u", ".local", "state", "agent-harbor", "logs"),
        ),
        (
            "linux",
            {"HOME": "/home/u", "XDG_STATE_HOME": "/xdg"},
            ("/", "xdg", "agent-harbor", "logs"),
        ),
        (
            "linux",
            {"HOME": "/home/u", "XDG_STATE_HOME": "rel"},
            ("/", "home", "u", ".local", "state", "agent-harbor", "logs"),
        ),
        (
            "freebsd14",
            {"HOME": "/home/u"},
            ("/", "home", "u", ".local", "state", "agent-harbor", "logs"),
        ),
        ("darwin", {"HOME": "/Users/u"}, ("/", "Users", "u", "Library", "Logs", "agent-harbor")),
        (
            "win32",
            {"LOCALAPPDATA": "/c/Users/u/AppData/Local"},
            ("/", "c", "Users", "u", "AppData", "Local", "agent-harbor", "logs"),
        ),
        (
            "win32",
            {"USERPROFILE": "/c/Users/u"},
            ("/", "c", "Users", "u", "AppData", "Local", "agent-harbor", "logs"),
        ),
        ("darwin", {"HOME": "/Users/u", "AH_HOME": "/opt/ah"}, ("/", "opt", "ah", "logs")),
        ("win32", {"AH_HOME": "/opt/ah"}, ("/", "opt", "ah", "logs")),
    ],
)
def test_default_log_dir(
    platform: str, env: dict[str, str], expected_parts: tuple[str, ...]
) -> None:
    assert default_log_dir("ah-followerd", platform, env).parts == expected_parts
    assert default_log_file("ah-followerd", platform, env) == (
        Path(*expected_parts) / "ah-followerd.log"
    )


# -- click -----------------------------------------------------------------------------


def _command(kind: Any) -> click.Command:
    @click.command()
    @log_options(kind)
    @click.pass_context
    def command(ctx: click.Context, /, **kwargs: Any) -> None:
        from_kwargs = log_settings_from_click(kwargs)
        from_ctx = log_settings_from_click(ctx)
        assert from_kwargs == from_ctx
        click.echo(repr(from_ctx))

    return command


def test_flags_have_no_default() -> None:
    result = CliRunner().invoke(_command("cli"), [])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == repr(LogSettings())


def test_flags_are_parsed(tmp_path: Path) -> None:
    args = [
        "--log-level",
        "DEBUG",
        "--log-file",
        str(tmp_path / "f.log"),
        "--log-dir",
        str(tmp_path),
        "--log-format",
        "JSON",
    ]
    result = CliRunner().invoke(_command("daemon"), args)
    assert result.exit_code == 0, result.output
    expected = LogSettings(
        level="DEBUG", file=str(tmp_path / "f.log"), dir=str(tmp_path), format="json"
    )
    assert result.stdout.strip() == repr(expected)
    directive = CliRunner().invoke(
        _command("cli"), ["--log-level", "ah_connectivity::quic=trace,warn"]
    )
    assert directive.exit_code == 0, directive.output
    assert "ah_connectivity::quic=trace,warn" in directive.stdout


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--log-level", "loud"], "'loud'"),
        (["--log-level", "ah=loud,info"], "'ah=loud'"),
        (["--log-format", "xml"], "xml"),
    ],
)
def test_bad_flags_are_usage_errors(args: list[str], fragment: str) -> None:
    result = CliRunner().invoke(_command("cli"), args)
    assert result.exit_code == 2
    assert fragment in result.stderr
    assert result.stdout == ""


def test_help_documents_per_kind_defaults() -> None:
    daemon_help = CliRunner().invoke(_command("daemon"), ["--help"]).output
    cli_help = CliRunner().invoke(_command("cli"), ["--help"]).output
    for text in (daemon_help, cli_help):
        for flag in ("--log-level", "--log-file", "--log-dir", "--log-format"):
            assert flag in text
    assert "JSON lines in a log file" in " ".join(daemon_help.split())
    assert "JSON lines" not in " ".join(cli_help.split())


def test_group_and_subcommand_flags_innermost_wins() -> None:
    seen: list[LogSettings] = []

    @click.group()
    @log_options("cli")
    def group(**_: Any) -> None:
        pass

    @group.command()
    @log_options("cli")
    @click.pass_context
    def sub(ctx: click.Context, /, **_: Any) -> None:
        seen.append(log_settings_from_click(ctx))

    args = [
        "--log-level",
        "debug",
        "--log-dir",
        "/g",
        "--log-format",
        "json",
        "sub",
        "--log-level",
        "trace",
        "--log-file",
        "/s.log",
    ]
    result = CliRunner().invoke(group, args)
    assert result.exit_code == 0, result.output
    assert seen == [LogSettings(level="trace", file="/s.log", format="json")]
