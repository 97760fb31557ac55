"""The shared click option callbacks: durations and ``--tag K=V`` lists."""

from __future__ import annotations

import click
import pytest
from click.testing import CliRunner

from ah_config import duration_callback, tags_callback


@click.command()
@click.option("--timeout", callback=duration_callback)
@click.option("--tag", "tags", multiple=True, callback=tags_callback)
def show(timeout: float | None, tags: dict[str, str]) -> None:
    click.echo(f"timeout={timeout} tags={sorted(tags.items())}")


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        ([], "timeout=None tags=[]"),
        (["--timeout", "1m30s"], "timeout=90.0 tags=[]"),
        (["--timeout", "250ms", "--tag", "os=linux"], "timeout=0.25 tags=[('os', 'linux')]"),
        (["--tag", "os=linux", "--tag", "os=macos"], "timeout=None tags=[('os', 'macos')]"),
        (["--tag", "a=1", "--tag", "b=2"], "timeout=None tags=[('a', '1'), ('b', '2')]"),
    ],
)
def test_good_values_are_parsed(argv: list[str], expected: str) -> None:
    result = CliRunner().invoke(show, argv)
    assert result.exit_code == 0, result.output
    assert result.output.strip() == expected


@pytest.mark.parametrize(
    ("argv", "names"),
    [
        (["--timeout", "0s"], ("--timeout", "'0s' must be longer than 0")),
        (["--timeout", "soon"], ("--timeout", "soon")),
        (["--tag", "novalue"], ("--tag", "novalue")),
        (["--tag", "=x"], ("--tag",)),
    ],
)
def test_bad_values_are_usage_errors_naming_the_option(
    argv: list[str], names: tuple[str, ...]
) -> None:
    result = CliRunner().invoke(show, argv)
    assert result.exit_code == 2
    for name in names:
        assert name in result.output
