"""Layer precedence, deep merge, list replacement and defaults."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from ah_config_support import DEMO_DEFAULTS, Demo, World
from hypothesis import given
from hypothesis import strategies as st

from ah_config import Layer, LayerInput, load_config, merge_layers
from ah_domain_types import DEFAULTS, ConfigFile

LAYERS_LOW_TO_HIGH = [
    Layer.SYSTEM,
    Layer.USER,
    Layer.REPO,
    Layer.REPO_USER,
    Layer.ENV,
    Layer.CONFIG_FILE,
    Layer.FLAG,
]


def _configure(world: World, layers: list[Layer], key: str, env_var: str) -> dict[str, Any]:
    """Set ``key`` in each of ``layers`` to the layer's own name; return load kwargs."""
    kwargs = world.load_kwargs()
    files = {
        Layer.SYSTEM: world.system_file,
        Layer.USER: world.user_file,
        Layer.REPO: world.repo_file,
        Layer.REPO_USER: world.repo_user_file,
        Layer.CONFIG_FILE: world.root / "explicit.toml",
    }
    for layer in layers:
        if layer in files:
            world.write(files[layer], {key: layer.value})
        elif layer is Layer.ENV:
            kwargs["env"][env_var] = layer.value
        elif layer is Layer.FLAG:
            kwargs["flag_values"] = {key: layer.value}
            kwargs["flag_sources"] = {key: "--" + key}
    if Layer.CONFIG_FILE in layers:
        kwargs["config_file"] = files[Layer.CONFIG_FILE]
    return kwargs


@pytest.mark.parametrize("top", range(len(LAYERS_LOW_TO_HIGH)))
def test_each_layer_beats_every_layer_below_it(world: World, top: int) -> None:
    layers = LAYERS_LOW_TO_HIGH[: top + 1]
    kwargs = _configure(world, layers, "name", "AH_NAME")
    resolved = load_config(schema=Demo, defaults=DEMO_DEFAULTS, **kwargs)
    winner = layers[-1]
    assert resolved.typed.name == winner.value
    origin = resolved.origin("name")
    assert origin is not None and origin.layer is winner


def test_layers_above_a_winner_but_absent_do_not_matter(world: World) -> None:
    # system, repo and --config set it; user, repo-user, env and flags do not.
    layers = [Layer.SYSTEM, Layer.REPO, Layer.CONFIG_FILE]
    kwargs = _configure(world, layers, "name", "AH_NAME")
    resolved = load_config(schema=Demo, defaults=DEMO_DEFAULTS, **kwargs)
    assert resolved.get("name") == "config-file"
    world.user_file.unlink(missing_ok=True)
    kwargs.pop("config_file")
    resolved = load_config(schema=Demo, defaults=DEMO_DEFAULTS, **kwargs)
    assert resolved.get("name") == "repo"


def test_default_applies_only_when_no_layer_sets_the_key(world: World) -> None:
    resolved = load_config(schema=Demo, defaults=DEMO_DEFAULTS, **world.load_kwargs())
    assert resolved.get("name") == "default-name"
    origin = resolved.origin("name")
    assert origin is not None and origin.layer is Layer.DEFAULT

    world.write(world.system_file, {"name": "sys"})
    resolved = load_config(schema=Demo, defaults=DEMO_DEFAULTS, **world.load_kwargs())
    assert resolved.get("name") == "sys"


def test_tables_merge_deeply_across_layers(world: World) -> None:
    world.write(world.system_file, {"net": {"connect-timeout": 1}, "hosts": {"a": {"user": "u"}}})
    world.write(world.user_file, {"hosts": {"a": {"port": 2222}, "b": {"user": "v"}}})
    world.write(world.repo_file, {"net": {"connect-timeout": 9}})
    resolved = load_config(schema=Demo, defaults=DEMO_DEFAULTS, **world.load_kwargs())
    assert resolved.get("net.connect-timeout") == 9
    assert resolved.get("net.retries") == 3  # from the defaults, beside a configured sibling
    assert resolved.get("hosts.a.user") == "u"
    assert resolved.get("hosts.a.port") == 2222
    assert resolved.get("hosts.b.user") == "v"
    origins = {key: resolved.origin(key) for key, _ in resolved.items()}
    assert origins["hosts.a.user"] is not None and origins["hosts.a.user"].layer is Layer.SYSTEM
    assert origins["hosts.a.port"] is not None and origins["hosts.a.port"].layer is Layer.USER
    assert origins["net.connect-timeout"] is not None
    assert origins["net.connect-timeout"].layer is Layer.REPO
    assert origins["net.retries"] is not None and origins["net.retries"].layer is Layer.DEFAULT


def test_lists_replace_instead_of_merging(world: World) -> None:
    world.write(world.system_file, {"tags": ["a", "b"]})
    world.write(world.repo_file, {"tags": ["c"]})
    resolved = load_config(schema=Demo, defaults=DEMO_DEFAULTS, **world.load_kwargs())
    assert resolved.get("tags") == ["c"]
    # ...and a configured list replaces the default list too.
    world.repo_file.unlink()
    resolved = load_config(schema=Demo, defaults=DEMO_DEFAULTS, **world.load_kwargs())
    assert resolved.get("tags") == ["a", "b"]


def test_flag_values_of_none_are_not_set(world: World) -> None:
    world.write(world.repo_file, {"name": "repo"})
    resolved = load_config(
        schema=Demo, defaults=DEMO_DEFAULTS, flag_values={"name": None}, **world.load_kwargs()
    )
    assert resolved.get("name") == "repo"


# ---------------------------------------------------------------- the real ConfigFile


def test_real_schema_precedence_flag_over_config_over_env_over_repo(world: World) -> None:
    world.write(world.system_file, {"remote-server": "https://system"})
    world.write(world.user_file, {"remote-server": "https://user"})
    world.write(world.repo_file, {"remote-server": "https://repo"})
    world.write(world.repo_user_file, {"remote-server": "https://repo-user"})
    explicit = world.write(world.root / "x.toml", {"remote-server": "https://explicit"})
    kwargs = world.load_kwargs()
    kwargs["env"]["AH_REMOTE_SERVER"] = "https://env"

    steps: list[tuple[dict[str, Any], str]] = [
        (
            {"config_file": explicit, "flag_values": {"remote-server": "https://flag"}},
            "https://flag",
        ),
        ({"config_file": explicit}, "https://explicit"),
        ({}, "https://env"),
    ]
    for extra, expected in steps:
        assert load_config(**kwargs, **extra).get("remote-server") == expected
    del kwargs["env"]["AH_REMOTE_SERVER"]
    assert load_config(**kwargs).get("remote-server") == "https://repo-user"
    removals: list[tuple[Path, str | None]] = [
        (world.repo_user_file, "https://repo"),
        (world.repo_file, "https://user"),
        (world.user_file, "https://system"),
        (world.system_file, None),
    ]
    for path, expected_after in removals:
        path.unlink()
        assert load_config(**kwargs).get("remote-server") == expected_after


def test_real_schema_defaults_and_repo_ignores(world: World) -> None:
    resolved = load_config(**world.load_kwargs())
    assert isinstance(resolved.typed, ConfigFile)
    assert resolved.typed.sync_ignores == DEFAULTS.sync_ignores
    assert resolved.typed.concurrency is not None and resolved.typed.concurrency.transfer == 16

    world.write(
        world.repo_file,
        {"sync-ignores": ["dist"], "concurrency": {"transfer": 4}, "timeouts": {"run": "1s"}},
    )
    resolved = load_config(**world.load_kwargs())
    assert resolved.typed.sync_ignores == ["dist"]
    assert resolved.get("concurrency.transfer") == 4
    origin = resolved.origin("sync-ignores")
    assert origin is not None
    assert origin.layer is Layer.REPO and origin.source == str(world.repo_file)
    # Defaults of sibling keys in a partly configured table still apply.
    assert DEFAULTS.timeouts is not None
    assert resolved.get("timeouts.run") == "1s"
    assert resolved.get("timeouts.connect") == DEFAULTS.timeouts.connect


def test_repo_root_is_nearest_ancestor_with_agents_dir(world: World) -> None:
    inner = world.repo / "src"
    world.write(inner / ".agents" / "config.toml", {"session": "inner"})
    world.write(world.repo_file, {"session": "outer"})
    resolved = load_config(**world.load_kwargs())
    assert resolved.get("session") == "inner"


def test_no_repo_means_no_repo_layers(tmp_path: Path, world: World) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    world.write(world.repo_file, {"session": "repo"})
    kwargs = world.load_kwargs()
    kwargs["cwd"] = outside
    assert load_config(**kwargs).get("session") is None


# ---------------------------------------------------------------- property: merge order

_KEYS = ["name", "token", "ratio", "net.retries", "net.connect-timeout"]


def _layer_data(assignments: dict[str, int]) -> dict[str, Any]:
    data: dict[str, Any] = {}
    for key, value in assignments.items():
        head, _, tail = key.partition(".")
        typed: Any = (
            float(value) if key == "ratio" else (str(value) if key in ("name", "token") else value)
        )
        if tail:
            data.setdefault(head, {})[tail] = typed
        else:
            data[head] = typed
    return data


@given(
    st.lists(
        st.dictionaries(st.sampled_from(_KEYS), st.integers(min_value=0, max_value=99)),
        min_size=1,
        max_size=len(LAYERS_LOW_TO_HIGH),
    )
)
def test_highest_layer_that_sets_a_key_wins(per_layer: list[dict[str, int]]) -> None:
    layers = [
        LayerInput(LAYERS_LOW_TO_HIGH[i], f"layer-{i}", _layer_data(assignments))
        for i, assignments in enumerate(per_layer)
    ]
    resolved = merge_layers(layers, schema=Demo, defaults={"net": {"retries": -1}})
    for key in _KEYS:
        setters = [i for i, assignments in enumerate(per_layer) if key in assignments]
        origin = resolved.origin(key)
        if setters:
            top = setters[-1]
            assert origin is not None and origin.source == f"layer-{top}"
            expected = _layer_data({key: per_layer[top][key]})
            head, _, tail = key.partition(".")
            assert resolved.get(key) == (expected[head][tail] if tail else expected[head])
        elif key == "net.retries":
            assert origin is not None and origin.layer is Layer.DEFAULT
            assert resolved.get(key) == -1
        else:
            assert origin is None and resolved.get(key) is None
