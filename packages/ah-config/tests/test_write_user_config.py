"""write_user_config: merges into the user file with private permissions."""

from __future__ import annotations

import stat
import sys
import tomllib

import pytest
from ah_config_support import World

from ah_config import ConfigError, Layer, load_config, write_user_config


def test_creates_private_dirs_and_file(world: World) -> None:
    assert not world.user_file.parent.exists()
    path = write_user_config(
        {"remote-server": "https://ap:8443", "token": "t", "ca-file": world.root / "ca.pem"},
        world.env,
        platform="linux",
    )
    assert path == world.user_file
    assert tomllib.loads(path.read_text()) == {
        "remote-server": "https://ap:8443",
        "token": "t",
        "ca-file": str(world.root / "ca.pem"),
    }
    if sys.platform != "win32":
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    resolved = load_config(**world.load_kwargs())
    assert resolved.typed.token == "t"
    origin = resolved.origin("remote-server")
    assert origin is not None and origin.layer is Layer.USER


def test_merges_with_existing_content_and_deletes_none(world: World) -> None:
    world.write(world.user_file, {"token": "old", "ssh": {"user": "ann"}, "session": "s"})
    write_user_config(
        {"token": "new", "ssh.identity-file": "/k", "session": None}, world.env, platform="linux"
    )
    assert tomllib.loads(world.user_file.read_text()) == {
        "token": "new",
        "ssh": {"user": "ann", "identity-file": "/k"},
    }
    write_user_config({"ssh.user": None, "ssh.identity-file": None}, world.env, platform="linux")
    assert tomllib.loads(world.user_file.read_text()) == {"token": "new"}


def test_invalid_update_writes_nothing(world: World) -> None:
    world.write(world.user_file, {"token": "keep"})
    before = world.user_file.read_bytes()
    with pytest.raises(ConfigError, match=r"concurrency\.transfer"):
        write_user_config({"concurrency.transfer": "lots"}, world.env, platform="linux")
    with pytest.raises(ConfigError, match="unknown key 'nope'"):
        write_user_config({"nope": 1}, world.env, platform="linux")
    assert world.user_file.read_bytes() == before
    assert sorted(p.name for p in world.user_file.parent.iterdir()) == ["config.toml"]


def test_malformed_existing_file_is_reported_not_overwritten(world: World) -> None:
    world.write(world.user_file, "token = \n")
    with pytest.raises(ConfigError, match="line 1"):
        write_user_config({"token": "x"}, world.env, platform="linux")
    assert world.user_file.read_text() == "token = \n"
