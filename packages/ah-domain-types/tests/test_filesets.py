"""Fileset descriptors from URL-encoded data, TOML and JSON; validation and messages."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ah_domain_types import (
    FILESET_NAME_PATTERN,
    ConfigFile,
    ExitCode,
    FilesetConfig,
    FilesetError,
    FilesetSpec,
    parse_required,
)

LOGS = FilesetSpec(
    name="logs", include=("*.log", "out/**"), exclude=("tmp",), required=True, dest="out"
)


def test_urlencoded_with_repeats() -> None:
    spec = FilesetSpec.from_urlencoded(
        "name=logs&include=*.log&include=out/**&exclude=tmp&required=yes&dest=out"
    )
    assert spec == LOGS


def test_urlencoded_defaults_and_escapes() -> None:
    spec = FilesetSpec.from_urlencoded("name=junit&include=reports%2F*.xml")
    assert spec == FilesetSpec(name="junit", include=("reports/*.xml",))
    assert (spec.exclude, spec.required, spec.dest) == ((), False, ".")


def test_toml_text_and_table() -> None:
    text = """
name = "logs"
include = ["*.log", "out/**"]
exclude = ["tmp"]
required = true
dest = "out"
"""
    assert FilesetSpec.from_toml(text) == LOGS
    assert FilesetSpec.from_toml({"name": "x", "include": "a/*"}) == FilesetSpec("x", ("a/*",))


def test_json_bytes_and_str() -> None:
    doc = '{"name":"logs","include":["*.log","out/**"],"exclude":["tmp"],"required":"YES","dest":"out"}'
    assert FilesetSpec.from_json(doc) == LOGS
    assert FilesetSpec.from_json(doc.encode()) == LOGS


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (True, True),
        (False, False),
        (1, True),
        (0, False),
        ("yes", True),
        ("No", False),
        ("TRUE", True),
        ("false", False),
        ("1", True),
        ("0", False),
    ],
)
def test_required_forms(value: object, expected: bool) -> None:
    assert parse_required(value) is expected
    spec = FilesetSpec.from_mapping({"name": "a", "include": ["x"], "required": value})
    assert spec.required is expected


@pytest.mark.parametrize("value", ["maybe", "", "y", 2, None, 1.0])
def test_required_rejects(value: object) -> None:
    with pytest.raises(FilesetError) as info:
        FilesetSpec.from_mapping({"name": "a", "include": ["x"], "required": value})
    assert f"invalid required value {value!r}" in str(info.value)
    assert "yes|no|true|false|1|0" in str(info.value)


@pytest.mark.parametrize("name", ["bad name", "a/b", "", "dots.not.allowed", "é"])
def test_bad_names_are_named(name: str) -> None:
    with pytest.raises(FilesetError) as info:
        FilesetSpec.from_mapping({"name": name, "include": ["x"]})
    assert f"invalid fileset name {name!r}" in str(info.value)
    assert info.value.exit_code == ExitCode.VALIDATION
    with pytest.raises(FilesetError):
        FilesetSpec(name=name, include=("x",))


def test_unknown_keys_are_named() -> None:
    with pytest.raises(FilesetError) as info:
        FilesetSpec.from_urlencoded("name=logs&include=x&includes=y&Dest=z")
    message = str(info.value)
    assert "unknown keys 'Dest', 'includes'" in message
    assert "expected: name, include, exclude, required, dest" in message
    with pytest.raises(FilesetError, match="unknown key 'path'"):
        FilesetSpec.from_json('{"name": "a", "include": ["x"], "path": "p"}')
    with pytest.raises(FilesetError, match="unknown key 'glob'"):
        FilesetSpec.from_toml('name = "a"\ninclude = ["x"]\nglob = "y"\n')


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        ("name=logs", "at least one include glob is required"),
        ("include=x", "missing 'name'"),
        ("name=a&name=b&include=x", "'name' given more than once"),
        ("name=a&include=", "include entries must be non-empty"),
        ("name=a&include=x&dest=", "dest must be a non-empty path"),
        ("justtext", "invalid fileset data 'justtext'"),
    ],
)
def test_urlencoded_errors(data: str, fragment: str) -> None:
    with pytest.raises(FilesetError, match=fragment):
        FilesetSpec.from_urlencoded(data)


def test_direct_construction_requires_include() -> None:
    with pytest.raises(FilesetError, match="fileset 'a': at least one include glob is required"):
        FilesetSpec(name="a", include=())


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("[1, 2]", "expected an object"),
        ("{not json", "invalid fileset JSON"),
        ('{"name": "a", "include": 5}', "include must be a glob or a list of globs"),
    ],
)
def test_json_errors(text: str, fragment: str) -> None:
    with pytest.raises(FilesetError, match=fragment):
        FilesetSpec.from_json(text)


def test_toml_syntax_error() -> None:
    with pytest.raises(FilesetError, match="invalid fileset TOML"):
        FilesetSpec.from_toml("name = ")


def test_decode_validates() -> None:
    with pytest.raises(msgspec.ValidationError):
        msgspec.json.decode(b'{"name":"bad name","include":["x"]}', type=FilesetSpec)
    with pytest.raises(msgspec.ValidationError):
        msgspec.json.decode(b'{"name":"a","include":[]}', type=FilesetSpec)


def test_config_fileset_converts_to_spec() -> None:
    config = msgspec.convert(
        {
            "fileset": [
                {
                    "name": "logs",
                    "include": ["*.log", "out/**"],
                    "exclude": ["tmp"],
                    "required": "yes",
                    "dest": "out",
                }
            ]
        },
        ConfigFile,
    )
    assert config.filesets() == [LOGS]
    with pytest.raises(msgspec.ValidationError, match=r"regex .* - at `\$.name`"):
        msgspec.convert({"name": "a b", "include": ["x"]}, FilesetConfig)
    with pytest.raises(FilesetError, match="at least one include"):
        FilesetConfig(name="a", include=[])
    with pytest.raises(msgspec.ValidationError, match=r"- at `\$.required`"):
        msgspec.convert({"name": "a", "include": ["x"], "required": "maybe"}, FilesetConfig)


globs = st.text(
    alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]), min_size=1, max_size=8
)


@settings(max_examples=50, deadline=None)
@given(
    name=st.from_regex(FILESET_NAME_PATTERN, fullmatch=True),
    include=st.lists(globs, min_size=1, max_size=3),
    exclude=st.lists(globs, max_size=3),
    required=st.booleans(),
    dest=globs,
)
def test_urlencoded_and_mapping_roundtrip(
    name: str, include: list[str], exclude: list[str], required: bool, dest: str
) -> None:
    spec = FilesetSpec(name, tuple(include), tuple(exclude), required, dest)
    assert FilesetSpec.from_urlencoded(spec.to_urlencoded()) == spec
    assert FilesetSpec.from_mapping(spec.to_mapping()) == spec
