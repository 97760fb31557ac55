"""The daemons' layers: system < user < the state directory's file < ``AH_*``; no repo layers."""

from __future__ import annotations

from pathlib import Path

import pytest
from ah_config_support import make_world

from ah_config import ConfigError, Layer, StateLayer, daemon_log_config, load_config
from ah_domain_types import LogConfig


def test_state_file_sits_between_user_files_and_the_environment(tmp_path: Path) -> None:
    world = make_world(tmp_path)
    world.write(world.system_file, {"log": {"level": "warn", "dir": "/sys-logs", "format": "text"}})
    world.write(world.user_file, {"log": {"level": "info", "dir": "/user-logs"}})
    # A daemon's working directory is no workspace: a repo file there must not count.
    world.write(world.repo_file, {"log": {"level": "error", "file": "/repo.log"}})
    state = LogConfig(level="debug")
    env = {**world.env, "AH_LOG_DIR": "/env-logs"}

    log = daemon_log_config(state, "/state/ap.toml", env=env, platform="linux")
    # level from the state file (beats user and system), dir from AH_LOG_DIR (beats all
    # files), format from the system file (nobody above set it), file from nobody.
    assert log == LogConfig(level="debug", format="text", dir="/env-logs")

    resolved = load_config(
        cwd=world.cwd, env=env, platform="linux", repo=False,
        state_layer=StateLayer("/state/ap.toml", {"log": {"level": "debug"}}),
    )  # fmt: skip
    origin = resolved.origin("log.level")
    assert origin is not None
    assert (origin.layer, origin.source) == (Layer.STATE_DIR, "/state/ap.toml")
    assert [layer.layer for layer in resolved.layers if layer.layer is Layer.REPO] == []

    # Without a state file the user file decides; the repo file still does not count.
    without = daemon_log_config(None, None, env=world.env, platform="linux")
    assert without == LogConfig(level="info", format="text", dir="/user-logs")


def test_enforced_system_key_holds_against_the_state_file(tmp_path: Path) -> None:
    world = make_world(tmp_path)
    world.write(world.system_file, {"log": {"dir": "/var/log/ah"}, "enforced": ["log.dir"]})
    log = daemon_log_config(LogConfig(dir="/elsewhere"), "/state/follower.toml", env=world.env,
                            platform="linux")  # fmt: skip
    assert log is not None and log.dir == "/var/log/ah"


def test_a_bad_layer_is_named(tmp_path: Path) -> None:
    world = make_world(tmp_path)
    world.write(world.user_file, "[log]\nlevel = 3\n")
    with pytest.raises(ConfigError) as caught:
        daemon_log_config(None, None, env=world.env, platform="linux")
    assert str(world.user_file) in str(caught.value)

    clean = make_world(tmp_path / "clean")
    with pytest.raises(ConfigError) as caught:
        load_config(env=clean.env, platform="linux", repo=False,
                    state_layer=StateLayer("/state/ap.toml", {"log": {"format": "xml"}}))  # fmt: skip
    assert "/state/ap.toml" in str(caught.value)
