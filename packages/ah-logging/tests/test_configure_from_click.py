"""``configure_logging_from_click``: flag over configured over default, usage errors, closing."""

from __future__ import annotations

from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from loguru import logger

from ah_logging import LogSettings, configure_logging_from_click, log_options


def _command(configured: LogSettings | None) -> click.Command:
    @click.command()
    @log_options("daemon")
    @click.pass_context
    def command(ctx: click.Context, **_: object) -> None:
        configure_logging_from_click(ctx, "ah-followerd", "daemon", configured)
        logger.debug("debug line")
        logger.info("info line")

    return command


def test_configured_level_applies_when_no_flag_is_given(tmp_path: Path) -> None:
    log = tmp_path / "d.log"
    result = CliRunner().invoke(_command(LogSettings(level="debug", file=str(log))), [])
    assert result.exit_code == 0, result.output
    text = log.read_text()
    assert "debug line" in text and "info line" in text


def test_flag_wins_over_configured(tmp_path: Path) -> None:
    log = tmp_path / "d.log"
    result = CliRunner().invoke(
        _command(LogSettings(level="debug", file=str(log))), ["--log-level", "warning"]
    )
    assert result.exit_code == 0, result.output
    assert "info line" not in log.read_text()


def test_default_is_info_for_a_daemon(tmp_path: Path) -> None:
    log = tmp_path / "d.log"
    result = CliRunner().invoke(_command(None), ["--log-file", str(log)])
    assert result.exit_code == 0, result.output
    text = log.read_text()
    assert "info line" in text and "debug line" not in text


def test_bad_rust_log_is_a_usage_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RUST_LOG", "ah=notalevel")
    result = CliRunner().invoke(_command(None), [])
    assert result.exit_code == 2
    assert "notalevel" in result.output


def test_sinks_close_with_the_context(tmp_path: Path) -> None:
    log = tmp_path / "d.log"
    result = CliRunner().invoke(_command(None), ["--log-file", str(log)])
    assert result.exit_code == 0, result.output
    size = log.stat().st_size
    logger.info("after the command")  # its file sink is gone: nothing more reaches the file
    assert log.stat().st_size == size


def test_unusable_log_file_is_a_configuration_error(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    result = CliRunner().invoke(_command(None), ["--log-file", str(blocker / "d.log")])
    assert result.exit_code == 8
    assert str(blocker / "d.log") in result.output
