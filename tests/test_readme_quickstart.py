"""The README's quick start works as written: its demo command, parsed from the README and run
as is from the checkout, gives per-host results from three followers and tears down; its test
command is the one CI runs."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_RESULT = re.compile(
    r"^(demo-\d+) \| (?P<host>[^:]+): (?P<os>Linux [^;]+); (?P<files>\d+) files in (?P<cwd>\S+)$"
)


def quick_start_commands() -> list[str]:
    """The shell commands of the README's "Quick start" section, in order (one per code block)."""
    text = (ROOT / "README.md").read_text()
    section = re.search(r"^## Quick start\n(.*?)^## ", text, re.MULTILINE | re.DOTALL)
    assert section, "README.md has no '## Quick start' section"
    blocks = re.findall(r"^```sh\n(.*?)^```", section.group(1), re.MULTILINE | re.DOTALL)
    return [block.strip() for block in blocks]


def test_the_quick_start_is_two_commands_one_for_the_demo_one_for_the_tests() -> None:
    commands = quick_start_commands()
    assert len(commands) == 2, commands
    assert all("\n" not in c for c in commands), commands
    demo, tests = commands
    assert "ah-fleetctl demo" in demo, demo
    # CI runs the same test command the README gives (after lint and type checks).
    test_command = tests.split("&&")[-1].strip()
    assert test_command == "uv run pytest", tests
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_command in ci, f"{test_command!r} is not a line of .ci/run"
    assert "bash scripts/install-system-deps.sh" in ci


def test_the_readme_demo_command_gives_three_per_host_results_and_tears_down() -> None:
    # No skip: the README's commands need uv, and `.ci/run` installs it when it is missing.
    assert shutil.which("uv"), "the README's quick start needs uv on PATH"
    demo = quick_start_commands()[0]
    env = {k: v for k, v in os.environ.items() if not k.startswith("AH_")}
    done = subprocess.run(
        ["bash", "-c", demo],
        cwd=ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done
    results = [m for m in map(_RESULT.match, done.stdout.splitlines()) if m]
    assert sorted(m.group(1) for m in results) == ["demo-1", "demo-2", "demo-3"], done.stdout
    directory = re.search(r"^demo: starting an access point and 3 followers in (\S+)$",
                          done.stderr, re.MULTILINE)  # fmt: skip
    assert directory, done.stderr
    for match in results:
        # Each follower ran in its own workspace of the demo's temp directory, and holds the
        # same synced tree: this checkout, minus what the fence ignores (.venv, .git...).
        assert match.group("cwd") == f"{directory.group(1)}/followers/{match.group(1)}/workspace"
    counts = {int(m.group("files")) for m in results}
    tracked = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=False
    ).stdout.splitlines()
    assert len(counts) == 1 and counts.pop() >= len(tracked) > 100, (counts, len(tracked))
    assert done.stdout.splitlines()[-1] == "3 succeeded, 0 failed, 0 unreachable", done.stdout
    assert re.search(r"^demo: run exit 0, first result after \d+\.\ds$", done.stderr, re.MULTILINE)
    assert not Path(directory.group(1)).exists(), "the demo's directory is removed at the end"
