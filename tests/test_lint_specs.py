"""The status-file lint accepts the committed file and rejects each kind of breakage."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent
STATUS = ROOT / "specs" / "Multi-OS-Testing.status.md"


def _load_lint() -> ModuleType:
    spec = importlib.util.spec_from_file_location("lint_specs", ROOT / "tools" / "lint_specs.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["lint_specs"] = module
    spec.loader.exec_module(module)
    return module


lint_specs = _load_lint()


def _write(tmp_path: Path, text: str) -> Path:
    assert text != STATUS.read_text(), "the edit did not apply: the status file changed"
    path = tmp_path / "status.md"
    path.write_text(text)
    return path


def test_committed_status_file_passes_the_lint() -> None:
    assert lint_specs.lint(STATUS, ROOT) == []


def test_missing_milestone_is_reported(tmp_path: Path) -> None:
    text = STATUS.read_text().replace("## M4 — ", "## Milestone four — ")
    problems = lint_specs.lint(_write(tmp_path, text), ROOT)
    assert any("M0..M10 in order" in p for p in problems), problems


def test_ticked_box_without_a_test_reference_is_reported(tmp_path: Path) -> None:
    text = STATUS.read_text().replace(
        "  - [ ] Host-key mismatch rejected with an explicit error.",
        "  - [x] Host-key mismatch rejected with an explicit error.",
    )
    problems = lint_specs.lint(_write(tmp_path, text), ROOT)
    assert any("names no test" in p for p in problems), problems


def test_ticked_box_naming_a_missing_test_is_reported(tmp_path: Path) -> None:
    text = STATUS.read_text().replace(
        "  - [ ] Host-key mismatch rejected with an explicit error.",
        "  - [x] Host-key mismatch rejected `tests/test_lint_specs.py::test_that_does_not_exist`.",
    )
    problems = lint_specs.lint(_write(tmp_path, text), ROOT)
    assert any("test_that_does_not_exist does not exist" in p for p in problems), problems


def test_a_missing_test_named_in_outstanding_tasks_is_reported(tmp_path: Path) -> None:
    text = STATUS.read_text().replace(
        "### Outstanding Tasks\n",
        "### Outstanding Tasks\n- [x] Done: `tests/test_lint_specs.py::test_not_there`.\n",
        1,
    )
    problems = lint_specs.lint(_write(tmp_path, text), ROOT)
    assert any("test_lint_specs.py::test_not_there does not exist" in p for p in problems), problems


def test_complete_milestone_needs_all_boxes_and_subsections(tmp_path: Path) -> None:
    start = STATUS.read_text().index("## M10 — ")
    m10 = STATUS.read_text()[start:]
    broken = m10.replace("- **Status**: not started", "- **Status**: complete").replace(
        "- **Status**: in progress", "- **Status**: complete"
    )
    for heading in lint_specs.REQUIRED_SUBSECTIONS:
        broken = broken.replace(f"### {heading}", "### Something else")
    text = STATUS.read_text()[:start] + broken
    problems = lint_specs.lint(_write(tmp_path, text), ROOT)
    for heading in lint_specs.REQUIRED_SUBSECTIONS:
        assert any(f"missing '### {heading}'" in p for p in problems), (heading, problems)


def test_missing_status_line_is_reported(tmp_path: Path) -> None:
    text = STATUS.read_text().replace(
        "## M7 — run-everywhere Scheduler\n\n- **Status**:",
        "## M7 — run-everywhere Scheduler\n\n- Status:",
    )
    problems = lint_specs.lint(_write(tmp_path, text), ROOT)
    assert any("M7: missing '- **Status**" in p for p in problems), problems


@pytest.mark.parametrize("argv", [[], [str(STATUS)]])
def test_main_exit_code_is_zero_on_the_committed_file(argv: list[str]) -> None:
    assert lint_specs.main(argv) == 0
