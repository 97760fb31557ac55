"""Lint the milestone status file (the plan's M10 `lint-specs`).

Checks, for `specs/Multi-OS-Testing.status.md`:
- milestones M0..M10 appear once each, in order, as `## M<n> — <title>`;
- each milestone has a `**Status**:` line (`not started`, `in progress` or `complete`),
  a `- **Deliverables**` list and a `- **Verification**` list of `- [ ]` / `- [x]` boxes;
- a ticked box names the test that proves it (`` `path/to/test_x.py::test_name` ``) and that
  file exists and defines that test;
- a `complete` milestone has every box ticked and the subsections `Implementation Details`,
  `Key Source Files` (every listed path exists) and `Outstanding Tasks`;
- an `in progress` milestone has at least one ticked box.

Exit 0 when clean, 1 with one line per problem otherwise.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

MILESTONE_RE = re.compile(r"^## (M(\d+)) — (.+)$")
STATUS_RE = re.compile(r"^- \*\*Status\*\*: (not started|in progress|complete)\s*$")
BOX_RE = re.compile(r"^\s+- \[( |x)\] (.+)$")
TEST_REF_RE = re.compile(r"`([\w./-]+\.py)::(\w+)`")
PATH_REF_RE = re.compile(r"^\s*- `([^`]+)`")
REQUIRED_SUBSECTIONS = ("Implementation Details", "Key Source Files", "Outstanding Tasks")
MILESTONE_COUNT = 11


@dataclass
class Milestone:
    key: str
    number: int
    line: int
    status: str | None = None
    lines: list[tuple[int, str]] = field(default_factory=list)


def split_milestones(text: str) -> tuple[list[Milestone], list[str]]:
    problems: list[str] = []
    milestones: list[Milestone] = []
    current: Milestone | None = None
    for lineno, line in enumerate(text.splitlines(), start=1):
        match = MILESTONE_RE.match(line)
        if match:
            current = Milestone(key=match.group(1), number=int(match.group(2)), line=lineno)
            milestones.append(current)
            continue
        if line.startswith("## "):
            current = None
            continue
        if current is not None:
            current.lines.append((lineno, line))
    numbers = [m.number for m in milestones]
    if numbers != list(range(MILESTONE_COUNT)):
        problems.append(f"milestones must be M0..M{MILESTONE_COUNT - 1} in order, found {numbers}")
    return milestones, problems


def _section_lines(m: Milestone, heading: str) -> list[tuple[int, str]] | None:
    """Lines under `- **<heading>**` (or `### <heading>`) up to the next such heading."""
    inside = False
    collected: list[tuple[int, str]] = []
    found = False
    for lineno, line in m.lines:
        is_heading = bool(re.match(r"^(- \*\*[^*]+\*\*|### .+)\s*$", line))
        if is_heading:
            if inside:
                break
            if line.strip() in (f"- **{heading}**", f"### {heading}"):
                inside, found = True, True
            continue
        if inside:
            collected.append((lineno, line))
    return collected if found else None


def _test_exists(root: Path, ref_path: str, name: str) -> bool:
    path = root / ref_path
    if not path.is_file():
        return False
    return re.search(rf"^\s*(async\s+)?def {re.escape(name)}\(", path.read_text(), re.M) is not None


def lint_milestone(m: Milestone, root: Path, rel: str) -> list[str]:
    problems: list[str] = []
    where = f"{rel}:{m.line} {m.key}"
    for _lineno, line in m.lines:
        status = STATUS_RE.match(line)
        if status:
            m.status = status.group(1)
    if m.status is None:
        problems.append(f"{where}: missing '- **Status**: not started|in progress|complete'")
    if _section_lines(m, "Deliverables") is None:
        problems.append(f"{where}: missing '- **Deliverables**' list")
    verification = _section_lines(m, "Verification")
    if verification is None:
        problems.append(f"{where}: missing '- **Verification**' list")
        return problems
    boxes = [(n, BOX_RE.match(text)) for n, text in verification]
    boxes_found = [(n, b) for n, b in boxes if b is not None]
    if not boxes_found:
        problems.append(f"{where}: Verification has no '- [ ]' / '- [x]' boxes")
    ticked = 0
    for lineno, box in boxes_found:
        if box.group(1) != "x":
            continue
        ticked += 1
        refs = TEST_REF_RE.findall(box.group(2))
        if not refs:
            problems.append(f"{rel}:{lineno}: ticked box names no test (`path.py::test_name`)")
        for ref_path, name in refs:
            if not _test_exists(root, ref_path, name):
                problems.append(f"{rel}:{lineno}: test {ref_path}::{name} does not exist")
    checked = {ref for _n, box in boxes_found if box.group(1) == "x"
               for ref in TEST_REF_RE.findall(box.group(2))}  # fmt: skip
    # A test named anywhere else in the milestone (outstanding tasks, details) must exist too.
    for lineno, line in m.lines:
        for ref_path, name in TEST_REF_RE.findall(line):
            if (ref_path, name) not in checked and not _test_exists(root, ref_path, name):
                problems.append(f"{rel}:{lineno}: test {ref_path}::{name} does not exist")
    if m.status == "complete":
        if ticked != len(boxes_found):
            problems.append(f"{where}: complete but {len(boxes_found) - ticked} box(es) unticked")
        for heading in REQUIRED_SUBSECTIONS:
            if _section_lines(m, heading) is None:
                problems.append(f"{where}: complete but missing '### {heading}'")
        for lineno, line in _section_lines(m, "Key Source Files") or []:
            ref = PATH_REF_RE.match(line)
            if ref and not (root / ref.group(1)).exists():
                problems.append(f"{rel}:{lineno}: key source file {ref.group(1)} does not exist")
    if m.status == "in progress" and ticked == 0:
        problems.append(f"{where}: in progress but no verification box ticked")
    return problems


def lint(path: Path, root: Path) -> list[str]:
    rel = str(path.relative_to(root)) if path.is_relative_to(root) else str(path)
    milestones, problems = split_milestones(path.read_text())
    for m in milestones:
        problems.extend(lint_milestone(m, root, rel))
    return problems


def main(argv: list[str]) -> int:
    root = Path(__file__).resolve().parent.parent
    path = Path(argv[0]) if argv else root / "specs" / "Multi-OS-Testing.status.md"
    problems = lint(path.resolve(), root)
    for problem in problems:
        print(problem, file=sys.stderr)
    if not problems:
        print(f"lint-specs: {path.name} ok")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
