"""AH_* variables mapped through the schema."""

from __future__ import annotations

import pytest
from ah_config_support import Demo, World

from ah_config import ConfigError, Layer, env_leaves, load_config
from ah_domain_types import ConfigFile, TransportMethod


def test_real_schema_variable_names(world: World) -> None:
    names = env_leaves(ConfigFile)
    assert names["AH_SSH_IDENTITY_FILE"].path == ("ssh", "identity-file")
    assert names["AH_REMOTE_SERVER"].path == ("remote-server",)
    assert names["AH_TIMEOUTS_CONNECT"].path == ("timeouts", "connect")
    assert names["AH_PATH_POLICY_ALLOW_DIRECT"].path == ("path-policy", "allow-direct")
    # Tables of tables, arrays of tables and the system-only list are not mappable.
    assert not any(var.startswith(("AH_HOSTS", "AH_FILESET", "AH_ENFORCED")) for var in names)


def test_env_values_reach_typed_config(world: World) -> None:
    kwargs = world.load_kwargs()
    kwargs["env"].update(
        {
            "AH_SSH_IDENTITY_FILE": "/keys/id_ed25519",
            "AH_REMOTE_SERVER": "https://ap.example:8443",
            "AH_TIMEOUTS_CONNECT": "7",
            "AH_TIMEOUTS_RUN": "1m30s",
            "AH_PATH_POLICY_ALLOW_DIRECT": "no",
            "AH_PATH_POLICY_METHODS": "connect, relay",
            "AH_CONCURRENCY_TRANSFER": "4",
            "AH_SYNC_IGNORES": "node_modules,.venv,,dist",
        }
    )
    resolved = load_config(**kwargs)
    typed = resolved.typed
    assert typed.ssh is not None and typed.ssh.identity_file == "/keys/id_ed25519"
    assert typed.remote_server == "https://ap.example:8443"
    assert typed.timeouts is not None
    assert typed.timeouts.connect == 7
    assert typed.timeouts.seconds("run") == 90
    assert typed.path_policy is not None and typed.path_policy.allow_direct is False
    assert typed.path_policy.methods == [TransportMethod.CONNECT, TransportMethod.RELAY]
    assert typed.concurrency is not None and typed.concurrency.transfer == 4
    assert typed.sync_ignores == ["node_modules", ".venv", "dist"]
    origin = resolved.origin("ssh.identity-file")
    assert origin is not None and (origin.layer, origin.source) == (
        Layer.ENV,
        "AH_SSH_IDENTITY_FILE",
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1", True),
        ("true", True),
        ("YES", True),
        ("on", True),
        ("0", False),
        ("False", False),
        ("no", False),
    ],
)
def test_boolean_spellings(world: World, text: str, expected: bool) -> None:
    kwargs = world.load_kwargs()
    kwargs["env"]["AH_VERBOSE"] = text
    assert load_config(schema=Demo, **kwargs).get("verbose") is expected


@pytest.mark.parametrize(
    ("var", "value", "key", "expected"),
    [
        ("AH_CONCURRENCY_TRANSFER", "many", "concurrency.transfer", "integer"),
        ("AH_CONCURRENCY_TRANSFER", "0", "concurrency.transfer", ">= 1"),
        ("AH_PATH_POLICY_ALLOW_DIRECT", "maybe", "path-policy.allow-direct", "boolean"),
        ("AH_PATH_POLICY_METHODS", "direct,teleport", "path-policy.methods", "'relay'"),
        ("AH_TIMEOUTS_CONNECT", "5 parsecs", "timeouts.connect", "number"),
    ],
)
def test_bad_env_value_names_the_variable(
    world: World, var: str, value: str, key: str, expected: str
) -> None:
    kwargs = world.load_kwargs()
    kwargs["env"][var] = value
    with pytest.raises(ConfigError) as caught:
        load_config(**kwargs)
    error = caught.value
    assert error.message.startswith(f"{var}: ")
    assert f"'{key}'" in error.message
    assert expected in error.message
    assert error.exit_code == 8
    assert error.details["source"] == var


def test_bad_secret_env_value_is_not_echoed(world: World) -> None:
    class Secretive(Demo, frozen=True):
        api_token: int | None = None

    kwargs = world.load_kwargs()
    kwargs["env"]["AH_API_TOKEN"] = "hunter2"
    with pytest.raises(ConfigError) as caught:
        load_config(schema=Secretive, **kwargs)
    assert "hunter2" not in caught.value.message
    assert "AH_API_TOKEN" in caught.value.message


def test_unknown_ah_variables_are_ignored_and_listed(world: World) -> None:
    kwargs = world.load_kwargs()
    kwargs["env"].update({"AH_NAEM": "typo", "AH_JSON": "1", "AH_HOSTS_A_USER": "x", "OTHER": "1"})
    resolved = load_config(schema=Demo, **kwargs)
    assert resolved.unknown_env == ("AH_HOSTS_A_USER", "AH_NAEM")
    assert resolved.get("name") is None


def test_empty_value_counts_as_unset(world: World) -> None:
    world.write(world.user_file, {"name": "user"})
    kwargs = world.load_kwargs()
    kwargs["env"]["AH_NAME"] = ""
    assert load_config(schema=Demo, **kwargs).get("name") == "user"


def test_access_point_alias_and_canonical_precedence(world: World) -> None:
    kwargs = world.load_kwargs()
    kwargs["env"]["AH_ACCESS_POINT"] = "https://alias"
    resolved = load_config(**kwargs)
    assert resolved.get("remote-server") == "https://alias"
    origin = resolved.origin("remote-server")
    assert origin is not None and origin.source == "AH_ACCESS_POINT"
    kwargs["env"]["AH_REMOTE_SERVER"] = "https://canonical"
    assert load_config(**kwargs).get("remote-server") == "https://canonical"
    assert "AH_ACCESS_POINT" not in load_config(**kwargs).unknown_env


def test_env_layer_post_init_validation_names_variable(world: World) -> None:
    kwargs = world.load_kwargs()
    kwargs["env"]["AH_PATH_POLICY_DIRECT_TAGS"] = "os=linux,=bad"
    with pytest.raises(ConfigError) as caught:
        load_config(**kwargs)
    assert "AH_PATH_POLICY_DIRECT_TAGS" in caught.value.message
