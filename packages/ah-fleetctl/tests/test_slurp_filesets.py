"""``slurp --fileset-file``: filesets from TOML and JSON files, errors naming the file."""

from __future__ import annotations

from pathlib import Path

import pytest

from ah_config import CliError
from ah_domain_types import ExitCode, FilesetError
from ah_fleetctl.commands.slurp import load_fileset_file


def test_one_table_a_fileset_array_and_json_forms(tmp_path: Path) -> None:
    one = tmp_path / "one.toml"
    one.write_text('name = "logs"\ninclude = "out/*.log"\nrequired = "yes"\n')
    (logs,) = load_fileset_file(one)
    assert (logs.name, logs.include, logs.required) == ("logs", ("out/*.log",), True)

    many = tmp_path / "many.toml"
    many.write_text(
        '[[fileset]]\nname = "a"\ninclude = ["a/**"]\n\n'
        '[[fileset]]\nname = "b"\ninclude = ["b/*"]\nexclude = ["*.tmp"]\ndest = "bees"\n'
    )
    assert [(f.name, f.dest) for f in load_fileset_file(many)] == [("a", "."), ("b", "bees")]

    listed = tmp_path / "sets.json"
    listed.write_text('[{"name": "j", "include": ["x"]}, {"name": "k", "include": "y"}]')
    assert [f.name for f in load_fileset_file(listed)] == ["j", "k"]


def test_bad_files_are_validation_errors_naming_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "missing.toml"
    with pytest.raises(CliError) as caught:
        load_fileset_file(missing)
    assert caught.value.exit_code is ExitCode.VALIDATION
    assert str(missing) in caught.value.message

    broken = tmp_path / "broken.json"
    broken.write_text('{"name": "x", "include": []')
    with pytest.raises(FilesetError, match=f"--fileset-file {broken}: invalid JSON"):
        load_fileset_file(broken)

    unknown = tmp_path / "unknown.toml"
    unknown.write_text('name = "x"\ninclude = "a"\nincludes = "typo"\n')
    with pytest.raises(FilesetError, match="unknown key 'includes'"):
        load_fileset_file(unknown)
