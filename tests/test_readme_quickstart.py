"""The README's quick-start command works as written: a private fleet, a fenced run, teardown."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _readme_demo_command() -> list[str]:
    match = re.search(
        r"uv run python -m ah_harness_local\.demo[^\n]*", (ROOT / "README.md").read_text()
    )
    assert match, "the README quick start no longer names the demo command"
    return match.group(0).split()


def test_readme_demo_runs_on_three_followers_against_the_current_tree(tmp_path: Path) -> None:
    assert _readme_demo_command()[:5] == ["uv", "run", "python", "-m", "ah_harness_local.demo"]
    (tmp_path / "hello.txt").write_text("fresh from the leader\n")
    result = subprocess.run(
        [sys.executable, "-m", "ah_harness_local.demo", "--", "cat", "hello.txt"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if "fresh from the leader" in line]
    assert sorted(line.split("|")[0].strip() for line in lines) == ["demo-1", "demo-2", "demo-3"]
    assert "3 succeeded, 0 failed, 0 unreachable" in result.stdout + result.stderr


def test_readme_demo_exit_code_is_non_zero_when_the_command_fails(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "ah_harness_local.demo", "--followers", "2", "--", "false"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert result.returncode == 1, result.stderr
    assert "0 succeeded, 2 failed" in result.stdout + result.stderr
