"""Packaging contract: layering, declared dependencies, and wheels that install on their own."""

from __future__ import annotations

import ast
import importlib.metadata
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ROOT / "packages"

# The spec's package table, bottom-up: a package imports only packages listed before it.
LAYERS = [
    "ah-domain-types",
    "ah-config",
    "ah-logging",
    "ah-connectivity",
    "ah-ssh-bridge",
    "ah-mutagen-project",
    "ah-run-everywhere",
    "ah-api",
    "ah-followerd",
    "ah-access-pointd",
    "ah-fleetctl",
    "ah-harness-local",
    "ah-harness-containers",
    "ah-harness-vm",
]


def _packages() -> list[Path]:
    return sorted(p for p in PACKAGES.iterdir() if (p / "pyproject.toml").is_file())


def _pyproject(pkg: Path) -> dict[str, object]:
    return tomllib.loads((pkg / "pyproject.toml").read_text())


def _requirement_name(req: str) -> str:
    name = req
    for sep in ("[", "=", "<", ">", "!", "~", ";", " "):
        name = name.split(sep, 1)[0]
    return name.strip().lower().replace("_", "-")


def _imported_top_levels(pkg: Path) -> set[str]:
    names: set[str] = set()
    for source in (pkg / "src").rglob("*.py"):
        tree = ast.parse(source.read_text(), filename=str(source))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names


def _distributions_for(import_name: str) -> set[str]:
    mapping = importlib.metadata.packages_distributions()
    return {d.lower().replace("_", "-") for d in mapping.get(import_name, [])}


@pytest.mark.parametrize("pkg", _packages(), ids=lambda p: p.name)
def test_package_is_in_the_spec_table_and_has_src_layout(pkg: Path) -> None:
    assert pkg.name in LAYERS, f"{pkg.name} is not a package of the spec"
    module = pkg.name.replace("-", "_")
    assert (pkg / "src" / module / "__init__.py").is_file()
    assert (pkg / "src" / module / "py.typed").is_file()
    assert (pkg / "tests").is_dir() and any((pkg / "tests").glob("test_*.py"))


@pytest.mark.parametrize("pkg", _packages(), ids=lambda p: p.name)
def test_package_imports_only_lower_layers_and_declares_them(pkg: Path) -> None:
    project = _pyproject(pkg)["project"]
    assert isinstance(project, dict)
    declared = {_requirement_name(r) for r in project.get("dependencies", [])}
    imported = _imported_top_levels(pkg)
    own = pkg.name.replace("-", "_")
    my_layer = LAYERS.index(pkg.name)
    ah_imports = {m.replace("_", "-") for m in imported if m.startswith("ah_") and m != own}
    for dep in ah_imports:
        assert dep in LAYERS, f"{pkg.name} imports unknown package {dep}"
        assert LAYERS.index(dep) < my_layer, f"{pkg.name} imports {dep}, which is above it"
    declared_ah = {d for d in declared if d.startswith("ah-")}
    assert ah_imports == declared_ah, (
        f"{pkg.name}: imports {sorted(ah_imports)} but declares {sorted(declared_ah)}"
    )
    stdlib = set(sys.stdlib_module_names)
    for name in sorted(imported - stdlib - {own} - {m for m in imported if m.startswith("ah_")}):
        dists = _distributions_for(name)
        assert dists, f"{pkg.name} imports {name}, which no installed distribution provides"
        assert dists & declared, f"{pkg.name} imports {name} ({sorted(dists)}) without declaring it"


def test_versions_are_consistent_with_pinned_internal_dependencies() -> None:
    versions = {}
    for pkg in _packages():
        project = _pyproject(pkg)["project"]
        assert isinstance(project, dict)
        versions[pkg.name] = project["version"]
    for pkg in _packages():
        project = _pyproject(pkg)["project"]
        assert isinstance(project, dict)
        for req in project.get("dependencies", []):
            name = _requirement_name(req)
            if name in versions:
                assert f"=={versions[name]}" in req.replace(" ", ""), (
                    f"{pkg.name} must pin {name}=={versions[name]}, has {req!r}"
                )


def test_wheels_build_and_import_in_a_fresh_venv(tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    subprocess.run(
        ["uv", "build", "--all-packages", "--wheel", "-q", "-o", str(dist)],
        cwd=ROOT, check=True, timeout=300,
    )
    wheels = sorted(dist.glob("*.whl"))
    built = {w.name.split("-")[0].replace("_", "-") for w in wheels}
    assert built == {p.name for p in _packages()}, f"one wheel per package, got {built}"
    venv = tmp_path / "venv"
    subprocess.run(["uv", "venv", "-q", "--python", sys.executable, str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    subprocess.run(
        ["uv", "pip", "install", "-q", "--python", str(python), "--find-links", str(dist), *map(str, wheels)],
        check=True, timeout=300,
    )
    modules = [p.name.replace("-", "_") for p in _packages()]
    # Run from tmp_path so the checkout's sources cannot be imported by accident.
    result = subprocess.run(
        [str(python), "-c", "import importlib,sys\nfor m in sys.argv[1:]:\n    print(importlib.import_module(m).__file__)", *modules],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    for line in result.stdout.splitlines():
        assert str(venv) in line, f"imported from outside the venv: {line}"
