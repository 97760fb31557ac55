"""The committed JSON Schema: no drift from the types, and agreement with msgspec on the
config fixtures (valid ones pass both, invalid ones fail both)."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import msgspec
import pytest

import ah_domain_types as adt
from ah_domain_types import (
    DEFAULTS,
    REGENERATE_COMMAND,
    ConfigFile,
    generate_schema,
    load_committed_schema,
    render_schema,
)
from ah_domain_types.schema import committed_schema_text
from ah_domain_types.schema.__main__ import main as schema_main

FIXTURES = Path(__file__).parent / "fixtures" / "config"
VALID = sorted((FIXTURES / "valid").glob("*.toml"))
INVALID = sorted((FIXTURES / "invalid").glob("*.toml"))


@pytest.fixture(scope="module")
def validator() -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(load_committed_schema())


def test_committed_schema_matches_the_types() -> None:
    assert committed_schema_text() == render_schema(), (
        "ah-fleet.schema.json is out of date with the types; regenerate it with: "
        f"{REGENERATE_COMMAND}"
    )


def test_generated_equals_loaded() -> None:
    assert generate_schema() == load_committed_schema()
    assert render_schema(generate_schema()) == render_schema()


def test_schema_is_a_valid_2020_12_document() -> None:
    schema = load_committed_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["$ref"] == "#/$defs/ConfigFile"
    assert schema["x-ah-types"] == sorted(schema["$defs"])


def test_schema_covers_every_exported_struct_and_union() -> None:
    defs = load_committed_schema()["$defs"]
    exported = {
        name
        for name in adt.__all__
        if isinstance(getattr(adt, name), type) and issubclass(getattr(adt, name), msgspec.Struct)
    }
    assert exported | {"ControlMessage", "Event"} <= set(defs)


def test_config_keys_are_kebab_case() -> None:
    props = load_committed_schema()["$defs"]["ConfigFile"]["properties"]
    assert {"remote-server", "ca-file", "sync-ignores", "path-policy"} <= set(props)
    assert not any("_" in key or key != key.lower() for key in props)


def test_defaults_are_valid_config(validator: jsonschema.Draft202012Validator) -> None:
    document = msgspec.to_builtins(DEFAULTS)
    validator.validate(document)
    assert msgspec.convert(document, ConfigFile) == DEFAULTS
    assert document == {
        "sync-ignores": ["node_modules", ".venv", "target", "build"],
        "sync-engine": "auto",
        "timeouts": {"connect": "5s", "overall": "60s", "fence": "120s"},
        "concurrency": {"transfer": 16},
        "agent": {"enabled": True, "idle": "10m"},
        "path-policy": {
            "allow-direct": True,
            "methods": ["direct", "connect", "relay"],
            "probe-interval": "30s",
            "probe-timeout": "1s",
            "probe-failures": 3,
        },
    }


def _load(path: Path) -> dict[str, Any]:
    with path.open("rb") as handle:
        return tomllib.load(handle)


def test_fixture_sets_are_present() -> None:
    assert len(VALID) >= 3
    assert {p.stem for p in INVALID} >= {
        "missing-tag-value",
        "unknown-method",
        "bad-fileset-name",
        "bad-required",
        "unknown-key",
        "wrong-type",
    }


@pytest.mark.parametrize("path", VALID, ids=lambda p: p.name)
def test_valid_fixture(path: Path, validator: jsonschema.Draft202012Validator) -> None:
    data = _load(path)
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(data)]
    assert not errors, f"{path.name} should be valid: {errors}"
    config = msgspec.convert(data, ConfigFile)
    # What the layer says survives decoding (and encoding back, minus unset keys).
    assert msgspec.to_builtins(config) == data


@pytest.mark.parametrize("path", INVALID, ids=lambda p: p.name)
def test_invalid_fixture(path: Path, validator: jsonschema.Draft202012Validator) -> None:
    data = _load(path)
    first_line = path.read_text(encoding="utf-8").splitlines()[0]
    assert first_line.startswith("# expect: "), f"{path.name}: first line must be '# expect: ...'"
    expected = first_line.removeprefix("# expect: ")
    assert list(validator.iter_errors(data)), f"{path.name} passed JSON Schema validation"
    with pytest.raises(msgspec.ValidationError) as info:
        msgspec.convert(data, ConfigFile)
    assert expected in str(info.value)


def test_check_cli_detects_drift(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "schema.json"
    target.write_text('{"stale": true}\n', encoding="utf-8")
    assert schema_main(["--check", "--output", str(target)]) == 1
    err = capsys.readouterr().err
    assert REGENERATE_COMMAND in err
    assert '-{"stale": true}' in err
    assert schema_main(["--write", "--output", str(target)]) == 0
    assert target.read_text(encoding="utf-8") == render_schema()
    assert schema_main(["--check", "--output", str(target)]) == 0


def test_rendering_format() -> None:
    text = render_schema()
    assert text.endswith("}\n") and not text.endswith("\n\n")
    assert text.startswith('{\n  "$defs": {\n')
