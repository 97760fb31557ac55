"""Packaging contract: layering, declared dependencies, and wheels that install on their own."""

from __future__ import annotations

import ast
import importlib.metadata
import json
import os
import re
import ssl
import subprocess
import sys
import tomllib
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from ah_connectivity import CA_CERT_FILE

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


BINARIES = ("ah-access-pointd", "ah-fleetctl", "ah-followerd")


def test_bin_holds_a_thin_launcher_for_each_binary_and_each_is_a_console_script() -> None:
    assert sorted(p.name for p in (ROOT / "bin").iterdir()) == sorted(BINARIES)
    for name in BINARIES:
        module = name.replace("-", "_")
        project = _pyproject(PACKAGES / name)["project"]
        assert isinstance(project, dict)
        assert project["scripts"][name] == f"{module}.cli:main", project["scripts"]
        launcher = ROOT / "bin" / name
        tree = ast.parse(launcher.read_text())
        imports = [n for n in ast.walk(tree) if isinstance(n, ast.Import | ast.ImportFrom)]
        # Thin: it imports the package's main() and nothing else.
        assert [(getattr(i, "module", None), [a.name for a in i.names]) for i in imports] == [
            (f"{module}.cli", ["main"])
        ], launcher
        shown = subprocess.run(
            [sys.executable, str(launcher), "--help"],
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        assert shown.returncode == 0, shown
        assert shown.stdout.startswith(f"Usage: {name} "), shown.stdout


@dataclass(frozen=True)
class Wheelhouse:
    dist: Path
    wheels: tuple[Path, ...]


@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory: pytest.TempPathFactory) -> Wheelhouse:
    """Every package's wheel, built once for the module's tests."""
    dist = tmp_path_factory.mktemp("dist")
    subprocess.run(
        ["uv", "build", "--all-packages", "--wheel", "-q", "-o", str(dist)],
        cwd=ROOT, check=True, timeout=300,
    )  # fmt: skip
    return Wheelhouse(dist, tuple(sorted(dist.glob("*.whl"))))


def _fresh_venv(path: Path) -> Path:
    """A new venv (no workspace, no checkout on its path); its python."""
    subprocess.run(
        ["uv", "venv", "-q", "--python", sys.executable, str(path)], check=True, timeout=120
    )
    return path / "bin" / "python"


def _install(python: Path, wheelhouse: Wheelhouse, *requirements: str) -> None:
    """pip semantics: our packages from the wheelhouse (--find-links), third-party ones from
    the index (in practice uv's cache), bytecode compiled at install as pip does."""
    subprocess.run(
        ["uv", "pip", "install", "-q", "--compile-bytecode", "--python", str(python),
         "--find-links", str(wheelhouse.dist), *requirements],
        check=True, timeout=300,
    )  # fmt: skip


def _outside_env() -> dict[str, str]:
    """The caller's environment minus what could make a venv see the checkout or config."""
    drop = ("PYTHONPATH", "VIRTUAL_ENV", "RUST_LOG")
    return {k: v for k, v in os.environ.items() if not k.startswith("AH_") and k not in drop}


def test_wheels_build_and_import_in_a_fresh_venv(tmp_path: Path, wheelhouse: Wheelhouse) -> None:
    built = {w.name.split("-")[0].replace("_", "-") for w in wheelhouse.wheels}
    assert built == {p.name for p in _packages()}, f"one wheel per package, got {built}"
    python = _fresh_venv(tmp_path / "venv")
    _install(python, wheelhouse, *map(str, wheelhouse.wheels))
    modules = [p.name.replace("-", "_") for p in _packages()]
    # Run from tmp_path so the checkout's sources cannot be imported by accident.
    result = subprocess.run(
        [str(python), "-c", "import importlib,sys\nfor m in sys.argv[1:]:\n    print(importlib.import_module(m).__file__)", *modules],
        cwd=tmp_path, capture_output=True, text=True, timeout=120, env=_outside_env(),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    for line in result.stdout.splitlines():
        assert str(tmp_path / "venv") in line, f"imported from outside the venv: {line}"


def test_installing_ah_fleetctl_alone_gives_a_working_demo(
    tmp_path: Path, wheelhouse: Wheelhouse
) -> None:
    python = _fresh_venv(tmp_path / "venv")
    _install(python, wheelhouse, "ah-fleetctl")
    installed = subprocess.run(
        [str(python), "-c", "import importlib.metadata as m\nprint(' '.join(sorted(d.metadata['Name'] for d in m.distributions())))"],
        capture_output=True, text=True, check=True, cwd=tmp_path, env=_outside_env(),
    ).stdout.split()  # fmt: skip
    ours = {n.lower().replace("_", "-") for n in installed if n.lower().startswith("ah")}
    # What the demo runs comes along; the test harness (and pytest) does not.
    assert {"ah-fleetctl", "ah-access-pointd", "ah-followerd"} <= ours, installed
    assert "ah-harness-local" not in ours and "pytest" not in installed, installed

    work = tmp_path / "work"
    work.mkdir()
    (work / "hello.txt").write_text("from the leader\n")
    fleetctl = str(tmp_path / "venv" / "bin" / "ah-fleetctl")
    env_file = tmp_path / "demo.env"
    demo = subprocess.run(
        [fleetctl, "demo", "--followers", "2", "--keep", "--env-file", str(env_file),
         "--", "cat", "hello.txt"],
        cwd=work, env=_outside_env(), stdin=subprocess.DEVNULL, capture_output=True, text=True,
        timeout=240, check=False,
    )  # fmt: skip
    try:
        assert demo.returncode == 0, demo
        results = sorted(line for line in demo.stdout.splitlines() if "from the leader" in line)
        assert results == ["demo-1 | from the leader", "demo-2 | from the leader"], demo
        assert demo.stdout.splitlines()[-1] == "2 succeeded, 0 failed, 0 unreachable", demo
        # The daemons it started are the venv's, not the checkout's.
        directory = re.search(r"^demo: starting .* in (\S+)$", demo.stderr, re.MULTILINE)
        assert directory, demo.stderr
        kept = json.loads((Path(directory.group(1)) / "demo.json").read_text())
        daemons = [p for p in kept["processes"] if p["name"].startswith("ah-")]
        assert len(daemons) == 3, kept  # the access point and two followers
        for process in daemons:
            argv = Path(f"/proc/{process['pgid']}/cmdline").read_bytes().split(b"\0")
            assert argv[0].decode() == str(python), (process, argv)
    finally:
        down = subprocess.run(
            [fleetctl, "demo", "--down", "--env-file", str(env_file)],
            env=_outside_env(), capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
    assert down.returncode == 0, down


def test_installing_ah_access_pointd_alone_gives_a_standalone_access_point(
    tmp_path: Path, wheelhouse: Wheelhouse
) -> None:
    from ah_harness_local import ManagedProcess, wait_for

    python = _fresh_venv(tmp_path / "venv")
    _install(python, wheelhouse, "ah-access-pointd")
    env = _outside_env()
    absent = subprocess.run(
        [str(python), "-c", "import ah_fleetctl"], capture_output=True, cwd=tmp_path, env=env
    )
    assert absent.returncode != 0, "ah-access-pointd must not pull in the leader CLI"
    binary = str(tmp_path / "venv" / "bin" / "ah-access-pointd")
    state = tmp_path / "ap"
    init = subprocess.run(
        [binary, "init", "--state-dir", str(state)],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120, check=False,
    )  # fmt: skip
    assert init.returncode == 0, init
    ready_file = tmp_path / "ready.json"
    server = ManagedProcess(
        [binary, "serve", "--state-dir", str(state), "--quic-port", "0", "--api-port", "0",
         "--connect-port", "0", "--ready-file", str(ready_file)],
        log_dir=tmp_path / "logs", name="ah-access-pointd", env=env, cwd=tmp_path,
    )  # fmt: skip
    try:
        ready = wait_for(
            lambda: ready_file.is_file() and json.loads(ready_file.read_text() or "null"),
            90,
            what=f"the ready file {ready_file}",
        )
        assert ready["pid"] == server.pid, ready
        context = ssl.create_default_context(cafile=str(state / CA_CERT_FILE))
        url = f"https://127.0.0.1:{ready['apiPort']}/api/v1/healthz"
        with urllib.request.urlopen(url, context=context, timeout=30) as response:
            status, body = response.status, json.loads(response.read())
        assert status == 200, body
        assert body["status"] == "ok", body
    finally:
        code = server.terminate(10)
    assert code == 0, server.log_text()
