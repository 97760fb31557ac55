"""Provenance of every leaf key, enforced keys, AH_HOME, typed access."""

from __future__ import annotations

import tomllib

import pytest
from ah_config_support import DEMO_DEFAULTS, Demo, World

from ah_config import (
    REDACTED,
    ConfigError,
    Layer,
    LayerSource,
    Origin,
    UnknownConfigKeyError,
    load_config,
)


def test_every_leaf_records_layer_and_source(world: World) -> None:
    world.write(world.system_file, {"name": "s", "net": {"retries": 1}})
    world.write(world.user_file, {"verbose": True})
    world.write(world.repo_file, {"hosts": {"mac.local": {"user": "r"}}})
    world.write(world.repo_user_file, {"ratio": 0.5})
    explicit = world.write(world.root / "extra.toml", {"net": {"connect-timeout": 3}})
    kwargs = world.load_kwargs()
    kwargs["env"]["AH_TAGS"] = "x,y"
    resolved = load_config(
        schema=Demo,
        defaults=DEMO_DEFAULTS,
        config_file=explicit,
        flag_values={"token": "t0k"},
        flag_sources={"token": "--token"},
        **kwargs,
    )
    assert {key: resolved.origin(key) for key, _ in resolved.items()} == {
        'hosts."mac.local".user': Origin(Layer.REPO, str(world.repo_file)),
        "name": Origin(Layer.SYSTEM, str(world.system_file)),
        "net.connect-timeout": Origin(Layer.CONFIG_FILE, str(explicit)),
        "net.retries": Origin(Layer.SYSTEM, str(world.system_file)),
        "ratio": Origin(Layer.REPO_USER, str(world.repo_user_file)),
        "tags": Origin(Layer.ENV, "AH_TAGS"),
        "token": Origin(Layer.FLAG, "--token"),
        "verbose": Origin(Layer.USER, str(world.user_file)),
    }
    assert resolved.get('hosts."mac.local".user') == "r"
    assert resolved.typed.hosts is not None and resolved.typed.hosts["mac.local"].user == "r"


def test_unset_and_unknown_keys(world: World) -> None:
    resolved = load_config(schema=Demo, defaults=DEMO_DEFAULTS, **world.load_kwargs())
    assert resolved.origin("verbose") is None
    assert resolved.get("verbose") is None
    assert resolved.get("hosts.nobody.user") is None  # any name under a table of tables
    with pytest.raises(UnknownConfigKeyError) as caught:
        resolved.get("verbos")
    assert "verbose" in caught.value.suggestions
    with pytest.raises(KeyError):
        resolved.origin("net.nope")
    assert resolved.is_key("net") and not resolved.is_key("net.nope")


def test_layers_consulted_are_listed(world: World) -> None:
    world.write(world.repo_file, {"name": "r"})
    resolved = load_config(schema=Demo, **world.load_kwargs())
    assert LayerSource(Layer.REPO, str(world.repo_file), True) in resolved.layers
    assert LayerSource(Layer.SYSTEM, str(world.system_file), False) in resolved.layers


def test_enforced_keys_keep_the_system_value(world: World) -> None:
    world.write(
        world.system_file,
        {"enforced": ["name", "net"], "name": "corp", "net": {"retries": 7}},
    )
    world.write(world.user_file, {"name": "mine", "net": {"retries": 1, "connect-timeout": 2}})
    kwargs = world.load_kwargs()
    kwargs["env"]["AH_NAME"] = "env-name"
    resolved = load_config(
        schema=Demo, defaults=DEMO_DEFAULTS, flag_values={"name": "flag-name"}, **kwargs
    )
    assert resolved.get("name") == "corp"
    assert resolved.get("net.retries") == 7
    assert resolved.get("net.connect-timeout") is None  # the whole [net] table is locked
    origin = resolved.origin("name")
    assert origin is not None
    assert origin.layer is Layer.SYSTEM and origin.enforced
    assert [(a.layer, a.source) for a in origin.overridden_attempts] == [
        (Layer.USER, str(world.user_file)),
        (Layer.ENV, "AH_NAME"),
        (Layer.FLAG, "--name"),
    ]
    attempted = {(a.key, a.layer) for a in resolved.overridden_attempts}
    assert ("net.connect-timeout", Layer.USER) in attempted
    assert "ignored: user" in origin.describe()


def test_enforced_key_unset_in_system_falls_back_to_default(world: World) -> None:
    world.write(world.system_file, {"enforced": ["name"]})
    world.write(world.repo_file, {"name": "repo"})
    resolved = load_config(schema=Demo, defaults=DEMO_DEFAULTS, **world.load_kwargs())
    assert resolved.get("name") == "default-name"
    assert [a.layer for a in resolved.overridden_attempts] == [Layer.REPO]


def test_enforced_outside_system_layer_is_an_error(world: World) -> None:
    world.write(world.repo_file, {"enforced": ["name"]})
    with pytest.raises(ConfigError) as caught:
        load_config(schema=Demo, **world.load_kwargs())
    assert str(world.repo_file) in caught.value.message
    assert "system" in caught.value.message


def test_enforced_entry_must_be_a_known_key(world: World) -> None:
    world.write(world.system_file, {"enforced": ["net.bogus"]})
    with pytest.raises(ConfigError) as caught:
        load_config(schema=Demo, **world.load_kwargs())
    assert str(world.system_file) in caught.value.message
    assert "net.bogus" in caught.value.message


def test_ah_home_moves_the_user_config(world: World) -> None:
    xdg = world.home / ".config" / "agent-harbor" / "config.toml"
    world.write(xdg, {"name": "xdg"})
    world.write(world.user_file, {"name": "ah-home"})
    resolved = load_config(schema=Demo, **world.load_kwargs())
    assert resolved.get("name") == "ah-home"
    origin = resolved.origin("name")
    assert origin == Origin(Layer.USER, str(world.user_file))

    kwargs = world.load_kwargs()
    del kwargs["env"]["AH_HOME"]
    assert load_config(schema=Demo, **kwargs).get("name") == "xdg"


def test_to_toml_round_trips_and_redacts(world: World) -> None:
    world.write(world.user_file, {"token": "s3cret", "hosts": {"a": {"port": 2}}})
    resolved = load_config(schema=Demo, defaults=DEMO_DEFAULTS, **world.load_kwargs())
    shown = tomllib.loads(resolved.to_toml())
    assert shown["token"] == REDACTED
    assert shown["hosts"] == {"a": {"port": 2}}
    assert shown["name"] == "default-name"
    assert tomllib.loads(resolved.to_toml(redact=False))["token"] == "s3cret"
    assert "s3cret" not in repr(resolved.entries(redact=True))
