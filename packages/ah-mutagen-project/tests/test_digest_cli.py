"""The follower-side digest: ah-tree-digest, the shipped one-file script, and the remote
command forms all agree with the leader snapshot."""

from __future__ import annotations

import glob
import json
import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import ah_mutagen_project
from ah_mutagen_project import (
    RemoteDigestError,
    digest_script_source,
    parse_digest_output,
    remote_digest_command,
    take_snapshot,
)
from ah_mutagen_project.remote_digest import HEREDOC_MARKER

PACKAGE_SRC = Path(ah_mutagen_project.__file__).resolve().parent.parent
SCRIPT = PACKAGE_SRC / "ah_mutagen_project" / "digest_script.py"
IGNORE_ARGS = [
    "--ignore",
    "node_modules",
    "--ignore",
    ".venv",
    "--ignore",
    "target",
    "--ignore",
    "build",
]


def _run(argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False, **kwargs)


@pytest.fixture
def tree(tmp_path: Path, build_tree: Callable[..., Path], sample_tree: dict[str, Any]) -> Path:
    root = build_tree(tmp_path / "ws", sample_tree)
    (root / os.fsdecode(b"odd-\xff-name")).write_text("not utf-8 named\n")
    (root / "tab\tand\nnewline").write_text("odd name\n")
    return root


def test_console_script_matches_the_leader_snapshot(tree: Path) -> None:
    script = Path(sys.executable).parent / "ah-tree-digest"
    assert script.is_file(), "ah-tree-digest console script is not installed in the venv"
    result = _run([str(script), "--root", str(tree), *IGNORE_ARGS])
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == take_snapshot(tree).id
    as_json = _run([str(script), "--root", str(tree), *IGNORE_ARGS, "--json"])
    remote = parse_digest_output(as_json.stdout.encode(), manifest=True)
    snap = take_snapshot(tree)
    assert remote.id == snap.id
    assert remote.manifest == snap.manifest  # symlinks, exec bits, odd names, all equal


def test_runs_with_nothing_but_the_standard_library(tree: Path) -> None:
    expected = take_snapshot(tree).id
    # -I -S: no site-packages, no PYTHONPATH: msgspec and every ah-* package but this
    # directory are out of reach.
    probe = _run([sys.executable, "-I", "-S", "-c", "import msgspec"])
    assert probe.returncode != 0
    cli = _run(
        [sys.executable, "-I", "-S", "-c",
         "import sys; sys.path.insert(0, sys.argv.pop(1)); "
         "from ah_mutagen_project.digest_cli import main; main()",
         str(PACKAGE_SRC), "--root", str(tree), *IGNORE_ARGS],
    )  # fmt: skip
    assert cli.returncode == 0, cli.stderr
    assert cli.stdout.strip() == expected
    # The one-file script, by itself, on the system python3 (what a follower has).
    system_python = "/usr/bin/python3" if Path("/usr/bin/python3").exists() else sys.executable
    alone = _run([system_python, "-I", "-S", str(SCRIPT), "--root", str(tree), *IGNORE_ARGS])
    assert alone.returncode == 0, alone.stderr
    assert alone.stdout.strip() == expected


@pytest.mark.parametrize("style", ["heredoc", "inline-posix"])
def test_remote_command_forms_run_in_a_posix_shell(tree: Path, style: str) -> None:
    snap = take_snapshot(tree)
    command = remote_digest_command(str(tree), None, style=style)  # type: ignore[arg-type]
    result = _run(["/bin/sh", "-c", command])
    assert result.returncode == 0, result.stderr
    assert parse_digest_output(result.stdout.encode(), manifest=False).id == snap.id
    with_manifest = remote_digest_command(str(tree), None, manifest=True, style=style)  # type: ignore[arg-type]
    result = _run(["/bin/sh", "-c", with_manifest])
    assert parse_digest_output(result.stdout.encode(), manifest=True).manifest == snap.manifest


def test_heredoc_command_shape_and_quoting(tmp_path: Path) -> None:
    root = tmp_path / "it's a dir"
    root.mkdir()
    (root / "f").write_text("x")
    command = remote_digest_command(str(root), ["a b", "it's"])
    first_line = command.splitlines()[0]
    assert first_line.startswith("python3 - --root ")
    assert shlex.split(first_line.split(" <<")[0])[2:] == [
        "--root", str(root), "--ignore", "a b", "--ignore", "it's",
    ]  # fmt: skip
    assert command.rstrip().endswith(HEREDOC_MARKER)
    assert HEREDOC_MARKER not in digest_script_source()
    assert len(command.encode()) < 100_000  # one argv string: under Linux's 128 KiB limit
    result = _run(["/bin/sh", "-c", command])
    assert result.stdout.strip() == take_snapshot(root, ["a b", "it's"]).id


def test_inline_powershell_form_quotes_and_decodes(tmp_path: Path) -> None:
    root = tmp_path / "ws"
    root.mkdir()
    (root / "x").write_text("x")
    command = remote_digest_command(str(root), ["it's"], style="inline-powershell", python="python")
    program, loader_and_rest = command.split(' -c "', 1)
    loader, rest = loader_and_rest.split('" ', 1)
    words = [program, "-c", loader, *rest.split(" ")]
    assert program == "python" and '"' not in loader and "'" not in loader
    spaced = remote_digest_command(
        "C:\\ws", [], style="inline-powershell", python="C:\\Py 3\\python.exe"
    )
    assert spaced.startswith("& 'C:\\Py 3\\python.exe' -c ")
    assert spaced.endswith(" --root C:\\ws")
    assert "--ignore 'it''s'" in command  # PowerShell doubles single quotes
    # Run it as PowerShell would hand it to python (no shell here): loader, payload, args.
    result = _run([sys.executable, "-c", loader, words[3], "--root", str(root), "--ignore", "it's"])
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == take_snapshot(root, ["it's"]).id


def test_errors_exit_non_zero_with_a_message(tmp_path: Path) -> None:
    missing = _run([sys.executable, str(SCRIPT), "--root", str(tmp_path / "nope")])
    assert missing.returncode == 1
    assert "nope" in missing.stderr and "not a directory" in missing.stderr
    as_json = _run([sys.executable, str(SCRIPT), "--root", str(tmp_path / "nope"), "--json"])
    with pytest.raises(RemoteDigestError, match="nope"):
        parse_digest_output(as_json.stdout.encode(), manifest=True, where="f1")
    bad = _run([sys.executable, str(SCRIPT), "--root", str(tmp_path), "--ignore", "**/x"])
    assert bad.returncode == 2 and "'**/x'" in bad.stderr
    usage = _run([sys.executable, str(SCRIPT)])
    assert usage.returncode == 2 and "--root" in usage.stderr


def test_exec_bit_can_be_left_out(tmp_path: Path) -> None:
    root = tmp_path / "ws"
    root.mkdir()
    (root / "tool").write_text("#!/bin/sh\n")
    (root / "tool").chmod(0o755)
    snap = take_snapshot(root, [])
    out = _run([sys.executable, str(SCRIPT), "--root", str(root), "--no-exec-bit", "--json"])
    remote = parse_digest_output(out.stdout.encode(), manifest=True)
    assert not remote.exec_bits
    assert remote.id == snap.manifest.content_id(exec_bits=False) != snap.id


def test_parse_rejects_junk_and_forged_manifests(tmp_path: Path) -> None:
    assert parse_digest_output(b"motd line\nsnap-" + b"0" * 32 + b"\n", manifest=False).id
    with pytest.raises(RemoteDigestError, match="f2: digest printed 'hello'"):
        parse_digest_output(b"hello\n", manifest=False, where="f2")
    with pytest.raises(RemoteDigestError, match="one JSON document"):
        parse_digest_output(b"{not json", manifest=True)
    root = tmp_path / "ws"
    root.mkdir()
    (root / "a").write_text("a")
    out = _run([sys.executable, str(SCRIPT), "--root", str(root), "--json"]).stdout
    document = json.loads(out)
    document["entries"][0][4] = "0" * 64  # claim other content under the same id
    with pytest.raises(RemoteDigestError, match="hashes to"):
        parse_digest_output(json.dumps(document).encode(), manifest=True)
    document["entries"][0][1] = "x"
    with pytest.raises(RemoteDigestError, match="unknown kind 'x'"):
        parse_digest_output(json.dumps(document).encode(), manifest=True)


def _old_pythons() -> list[str]:
    """Older interpreters on this machine (PATH or pyenv), to check the script's floor."""
    found: list[str] = []
    for version in ("3.6", "3.7", "3.8"):
        # Real installs first: a pyenv *shim* fails unless pyenv selects that version.
        candidates = sorted(
            glob.glob(os.path.expanduser(f"~/.pyenv/versions/{version}.*/bin/python{version}"))
        )
        which = shutil.which(f"python{version}")
        if which and "/shims/" not in which:
            candidates.append(which)
        found += [c for c in candidates if c and os.access(c, os.X_OK)][:1]
    return found


@pytest.mark.parametrize("python", _old_pythons() or ["none"])
def test_script_runs_on_old_follower_pythons(python: str, tree: Path) -> None:
    if python == "none":
        pytest.skip("no Python 3.6-3.8 interpreter on this machine")
    result = _run([python, "-I", "-S", str(SCRIPT), "--root", str(tree), *IGNORE_ARGS, "--json"])
    assert result.returncode == 0, result.stderr
    remote = parse_digest_output(result.stdout.encode(), manifest=True)
    snap = take_snapshot(tree)
    assert remote.id == snap.id and remote.manifest == snap.manifest
