"""``ah-fleetctl slurp`` end to end against real followers with real sshd
(``dataplane_fleet`` in conftest.py: lin-a/b/c + mac-d)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from ah_harness_local import wait_for

if TYPE_CHECKING:
    from conftest import FleetCli


def workspace(cli: FleetCli, name: str) -> Path:
    return Path(cli.fleet.follower(name).workspace)


@pytest.fixture
def planted(dataplane_fleet: FleetCli) -> Iterator[list[Path]]:
    """Files a test plants in followers' workspaces, removed afterwards."""
    paths: list[Path] = []
    yield paths
    for path in paths:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def plant(paths: list[Path], root: Path, relative: str, content: str) -> Path:
    target = root / relative
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(content)
    top = root / relative.split("/")[0]
    if top not in paths:
        paths.append(top)
    return target


def test_several_answering_hosts_land_per_fileset_and_host_with_metadata(
    dataplane_fleet: FleetCli, planted: list[Path], tmp_path: Path
) -> None:
    cli = dataplane_fleet
    for name in ("lin-a", "lin-b"):
        root = workspace(cli, name)
        plant(planted, root, "reports/r.txt", f"report of {name}\n")
        plant(planted, root, "reports/deep/er/d.txt", f"deep {name}\n")
        plant(planted, root, "reports/skip.tmp", "never fetched\n")
        plant(planted, root, "reports/tmp/t.txt", "excluded directory\n")
    out = tmp_path / "out"
    result = cli(
        "slurp",
        "--json",
        "--host", "lin-a",
        "--host", "lin-b",
        "--fileset-data", "name=rep&include=reports/**/*.txt&include=reports/*.tmp&exclude=*.tmp&exclude=reports/tmp",
        "--dest", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result
    (fileset,) = result.json()["filesets"]
    assert fileset["answered"] == ["lin-a", "lin-b"]
    fetched = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert fetched == [
        "rep.slurp.json",
        "rep/lin-a/reports/deep/er/d.txt",
        "rep/lin-a/reports/r.txt",
        "rep/lin-b/reports/deep/er/d.txt",
        "rep/lin-b/reports/r.txt",
    ]
    assert (out / "rep/lin-b/reports/r.txt").read_text() == "report of lin-b\n"
    metadata = json.loads((out / "rep.slurp.json").read_text())
    assert len(metadata) == 4
    for entry in metadata:
        source = workspace(cli, entry["host"]) / entry["path"]
        data = source.read_bytes()
        assert entry["sha256"] == hashlib.sha256(data).hexdigest()
        assert entry["size"] == len(data)
        assert abs(entry["mtime"] - source.stat().st_mtime) < 1e-3
        assert Path(entry["localPath"]).read_bytes() == data
    assert not list(out.rglob(".ah-slurp-*")), "the staging directory was left behind"


def test_one_answering_host_lands_in_dest_from_a_configured_fileset(
    dataplane_fleet: FleetCli, planted: list[Path], tmp_path: Path
) -> None:
    cli = dataplane_fleet
    plant(planted, workspace(cli, "lin-c"), "only-c/x.log", "only on lin-c\n")
    config = tmp_path / "filesets.toml"
    config.write_text('[[fileset]]\nname = "only"\ninclude = ["only-c/*.log"]\nrequired = "yes"\n')
    out = tmp_path / "out"
    result = cli(
        "slurp", "--config", str(config), "--tag", "os=linux", "--fileset", "only", "--dest", str(out)
    )  # fmt: skip
    assert result.returncode == 0, result
    assert (out / "only-c/x.log").read_text() == "only on lin-c\n"
    assert sorted(p.name for p in out.iterdir()) == ["only-c", "only.slurp.json"]
    assert result.stdout.strip() == f"only: 1 file(s), 14 bytes from lin-c -> {out}"


def test_a_required_fileset_no_host_provides_fails_naming_it(
    dataplane_fleet: FleetCli, tmp_path: Path
) -> None:
    cli = dataplane_fleet
    spec = tmp_path / "sets.toml"
    spec.write_text(
        '[[fileset]]\nname = "optional"\ninclude = "nowhere/*"\n\n'
        '[[fileset]]\nname = "needed"\ninclude = ["nowhere/*.xml"]\nrequired = true\n'
    )
    result = cli("slurp", "--fileset-file", str(spec), "--dest", str(tmp_path / "out"))
    assert result.returncode == 1, result
    assert "required fileset 'needed': no host provided a file matching nowhere/*.xml" in (
        result.stderr
    )
    assert "optional" not in result.stderr  # an optional fileset may be missing


def test_a_file_changing_during_the_transfer_is_a_checksum_error_after_one_retry(
    dataplane_fleet: FleetCli, tmp_path: Path
) -> None:
    cli = dataplane_fleet
    growing = workspace(cli, "lin-a") / "growing.log"
    # The writer keeps appending (paced at ~1 ms so it does not hog a core) until the test
    # kills it: every transfer of the file races a change, which is what is under test.
    writer_code = (
        "import sys, time\n"
        "with open(sys.argv[1], 'a') as f:\n"
        "    n = 0\n"
        "    while True:\n"
        "        n += 1; f.write('line %d\\n' % n); f.flush(); time.sleep(0.001)\n"
    )
    writer = subprocess.Popen(
        [sys.executable, "-c", writer_code, str(growing)],
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    out = tmp_path / "out"
    try:
        wait_for(lambda: growing.exists() and growing.stat().st_size > 0, 10, what="the writer")
        result = cli(
            "slurp", "--json", "--host", "lin-a",
            "--fileset-data", "name=grow&include=growing.log", "--dest", str(out),
        )  # fmt: skip
    finally:
        os.killpg(writer.pid, 9)
        writer.wait(10)
        growing.unlink(missing_ok=True)
    assert result.returncode == 1, result
    (fileset,) = result.json()["filesets"]
    (host,) = fileset["hosts"]
    assert host["host"] == "lin-a" and host["state"] == "failed", host
    (error,) = host["errors"]
    assert error.startswith("checksum mismatch for lin-a:growing.log"), error
    assert error.endswith("(also after one retry)"), error
    assert not (out / "growing.log").exists()
    assert fileset["files"] == []
