"""A real click program in a subprocess: flags, exit codes, stdout kept for command output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

PROGRAM = textwrap.dedent(
    """
    import json
    import logging

    import click
    from loguru import logger

    from ah_logging import LogSettings, configure_logging, log_options, log_settings_from_click

    CONFIGURED = LogSettings(level="warning")  # what ah-config would have produced


    @click.group()
    @log_options("daemon")
    @click.pass_context
    def main(ctx: click.Context, **_: object) -> None:
        settings = LogSettings.merged(log_settings_from_click(ctx), CONFIGURED, "daemon")
        try:
            configure_logging("ah-followerd", "daemon", settings)
        except ValueError as error:
            raise click.UsageError(str(error)) from None


    @main.command()
    def work() -> None:
        logger.debug("debug line")
        logger.info("info line")
        logger.bind(token="tok-SECRET-1").warning("warning line")
        logging.getLogger("paramiko.transport").warning("from paramiko")
        click.echo(json.dumps({"result": "ok"}))


    main()
    """
)


@pytest.fixture
def program(tmp_path: Path) -> Path:
    path = tmp_path / "prog.py"
    path.write_text(PROGRAM, encoding="utf-8")
    return path


def run(program: Path, *args: str, rust_log: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RUST_LOG", "NO_COLOR")}
    if rust_log is not None:
        env["RUST_LOG"] = rust_log
    return subprocess.run(
        [sys.executable, str(program), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )


def test_flags_config_and_file_in_a_real_process(program: Path, tmp_path: Path) -> None:
    log_dir = tmp_path / "logs"
    done = run(program, "--log-dir", str(log_dir), "--log-level", "info", "work")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"result": "ok"}  # stdout holds only command output
    lines = done.stderr.splitlines()
    assert [line.split(": ", 1)[1] for line in lines] == [
        "info line",
        "warning line token=***",
        "from paramiko",
    ]
    records = [json.loads(line) for line in (log_dir / "ah-followerd.log").read_text().splitlines()]
    assert [(r["logger"], r["message"]) for r in records] == [
        ("__main__", "info line"),
        ("__main__", "warning line"),
        ("paramiko.transport", "from paramiko"),
    ]
    assert records[1]["token"] == "***"
    assert "tok-SECRET-1" not in done.stderr


def test_configured_level_applies_without_flags_and_rust_log_overrides(program: Path) -> None:
    configured = run(program, "work")
    assert configured.returncode == 0, configured.stderr
    assert "info line" not in configured.stderr and "warning line" in configured.stderr
    overridden = run(program, "--log-format", "json", "work", rust_log="__main__=debug")
    assert overridden.returncode == 0, overridden.stderr
    messages = [json.loads(line)["message"] for line in overridden.stderr.splitlines()]
    assert messages == ["debug line", "info line", "warning line", "from paramiko"]


@pytest.mark.parametrize(
    ("args", "rust_log", "fragment"),
    [
        (["--log-level", "chatty", "work"], None, "'chatty'"),
        (["work"], "ah=chatty", "RUST_LOG: invalid log directive 'ah=chatty'"),
    ],
)
def test_bad_levels_exit_with_usage_error(
    program: Path, args: list[str], rust_log: str | None, fragment: str
) -> None:
    done = run(program, *args, rust_log=rust_log)
    assert done.returncode == 2
    assert fragment in done.stderr
    assert done.stdout == ""
