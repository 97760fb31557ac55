"""Malformed and schema-invalid files: loud errors naming file, line, key and type."""

from __future__ import annotations

from pathlib import Path

import pytest
from ah_config_support import Demo, World

from ah_config import ConfigError, load_config, read_config_file


@pytest.mark.parametrize(
    ("text", "line", "column"),
    [
        ('name = "ok"\nratio = = 2\n', 2, 9),
        ("[net]\nretries = 1\n[net]\nretries = 2\n", 3, 5),
        ('name = "unterminated\n', 1, 21),
        ("name = 'x'\ntags = [1, \n", 3, 1),
    ],
)
def test_malformed_toml_names_file_line_and_column(
    world: World, text: str, line: int, column: int
) -> None:
    world.write(world.repo_file, text)
    with pytest.raises(ConfigError) as caught:
        load_config(schema=Demo, **world.load_kwargs())
    error = caught.value
    assert str(world.repo_file) in error.message
    assert f"line {line}" in error.message
    assert (error.line, error.column) == (line, column)
    assert error.source == str(world.repo_file)
    assert error.exit_code == 8


def test_non_utf8_file_names_position(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'name = "ok"\nother = "caf\xe9"\n')
    with pytest.raises(ConfigError) as caught:
        read_config_file(path)
    assert (caught.value.line, caught.value.column) == (2, 13)
    assert "UTF-8" in caught.value.message


def test_unreadable_path_is_an_error(world: World) -> None:
    world.repo_file.mkdir(parents=True)  # a directory where the file should be
    with pytest.raises(ConfigError) as caught:
        load_config(schema=Demo, **world.load_kwargs())
    assert str(world.repo_file) in caught.value.message


def test_unknown_key_names_file_key_and_allowed_keys(world: World) -> None:
    world.write(world.user_file, {"net": {"retry": 3}})
    with pytest.raises(ConfigError) as caught:
        load_config(schema=Demo, **world.load_kwargs())
    error = caught.value
    assert str(world.user_file) in error.message
    assert "'net.retry'" in error.message
    assert "connect-timeout, retries" in error.message
    assert error.key == "net.retry"


def test_unknown_top_level_key(world: World) -> None:
    world.write(world.system_file, {"colour": "blue"})
    with pytest.raises(ConfigError) as caught:
        load_config(schema=Demo, **world.load_kwargs())
    assert "'colour'" in caught.value.message
    assert str(world.system_file) in caught.value.message


@pytest.mark.parametrize(
    ("data", "key", "expected"),
    [
        ({"net": {"retries": "three"}}, "net.retries", "an integer"),
        ({"verbose": "yes"}, "verbose", "a boolean"),
        ({"tags": "a,b"}, "tags", "an array"),
        ({"tags": ["a", 2]}, "tags[1]", "a string"),
        ({"net": 5}, "net", "a table"),
        ({"hosts": {"a": {"port": "22"}}}, "hosts.a.port", "an integer"),
    ],
)
def test_wrong_type_names_file_key_and_expected_type(
    world: World, data: dict[str, object], key: str, expected: str
) -> None:
    world.write(world.repo_user_file, data)
    with pytest.raises(ConfigError) as caught:
        load_config(schema=Demo, **world.load_kwargs())
    error = caught.value
    assert str(world.repo_user_file) in error.message
    assert f"'{key}'" in error.message
    assert expected in error.message
    assert error.key == key


def test_real_schema_invalid_values(world: World) -> None:
    cases: list[tuple[str, str, str]] = [
        ('[path-policy]\nmethods = ["teleport"]\n', "path-policy.methods[0]", "'connect'"),
        ("[concurrency]\ntransfer = 0\n", "concurrency.transfer", ">= 1"),
        ('[timeouts]\nconnect = "soon"\n', "timeouts.connect", "number"),
        ('[hosts."bad name!"]\nworkspace = "/w"\n', 'hosts."bad name!"', "matching"),
        ('[[fileset]]\nname = "logs"\ninclude = []\n', "fileset[0].include", "length"),
        ('[log]\nformat = "xml"\n', "log.format", "'json'"),
    ]
    for text, key, expected in cases:
        world.write(world.repo_file, text)
        with pytest.raises(ConfigError) as caught:
            load_config(**world.load_kwargs())
        message = caught.value.message
        assert str(world.repo_file) in message, text
        assert f"'{key}'" in message, message
        assert expected in message, message


def test_missing_explicit_config_file_is_an_error(world: World) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(schema=Demo, config_file=world.root / "nope.toml", **world.load_kwargs())
    assert "nope.toml" in caught.value.message


def test_relative_explicit_config_file_is_relative_to_cwd(world: World) -> None:
    world.write(world.cwd / "local.toml", {"name": "local"})
    resolved = load_config(schema=Demo, config_file=Path("local.toml"), **world.load_kwargs())
    assert resolved.get("name") == "local"


def test_invalid_flag_value_names_the_flag(world: World) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(
            schema=Demo,
            flag_values={"net.retries": "x"},
            flag_sources={"net.retries": "--retries"},
            **world.load_kwargs(),
        )
    assert caught.value.message.startswith("--retries: ")
    assert caught.value.layer == "flag"


def test_flag_for_a_key_the_schema_lacks_is_a_programming_error(world: World) -> None:
    with pytest.raises(ValueError, match="not a key"):
        load_config(schema=Demo, flag_values={"nope": 1}, **world.load_kwargs())
