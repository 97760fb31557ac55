"""The daemon takes its log settings from the layered configuration (real binary)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

AP = [sys.executable, "-m", "ah_access_pointd"]


def _run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*AP, *args], capture_output=True, text=True, timeout=60, env=env,
                          stdin=subprocess.DEVNULL)  # fmt: skip


def test_user_file_state_file_and_environment_in_that_order(tmp_path: Path) -> None:
    ah_home = tmp_path / "ah-home"
    ah_home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("AH_")}
    env |= {"AH_HOME": str(ah_home), "AH_SYSTEM_CONFIG": str(tmp_path / "no-system.toml")}
    (ah_home / "config.toml").write_text(f'[log]\ndir = "{tmp_path / "user-logs"}"\n')
    state_dir = tmp_path / "ap"

    init = _run(env, "init", "--state-dir", str(state_dir), "--trust-domain", "log-test.fleet")
    assert init.returncode == 0, init.stderr
    user_log = tmp_path / "user-logs" / "ah-access-pointd.log"
    assert user_log.is_file(), "the user config's [log] dir was not used"

    # The state directory's own [log] beats the user file...
    with (state_dir / "ap.toml").open("a") as settings:
        settings.write(f'\n[log]\ndir = "{tmp_path / "state-logs"}"\n')
    token = _run(env, "token", "enroll", "--state-dir", str(state_dir), "--name", "lin-1")
    assert token.returncode == 0, token.stderr
    assert (tmp_path / "state-logs" / "ah-access-pointd.log").is_file()

    # ...and AH_LOG_DIR beats the state directory's file.
    env_dir = tmp_path / "env-logs"
    token = _run(env | {"AH_LOG_DIR": str(env_dir)}, "token", "enroll", "--state-dir",
                 str(state_dir), "--name", "lin-2")  # fmt: skip
    assert token.returncode == 0, token.stderr
    assert (env_dir / "ah-access-pointd.log").is_file()


def test_malformed_user_config_is_a_configuration_error_naming_the_file(tmp_path: Path) -> None:
    ah_home = tmp_path / "ah-home"
    ah_home.mkdir()
    bad = ah_home / "config.toml"
    bad.write_text("[log\nlevel = 'info'\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AH_")}
    env |= {"AH_HOME": str(ah_home), "AH_SYSTEM_CONFIG": str(tmp_path / "no-system.toml")}
    result = _run(env, "init", "--state-dir", str(tmp_path / "ap"), "--json")
    assert result.returncode == 8, result.stderr
    assert str(bad) in json.loads(result.stdout)["error"]["message"]
    assert not (tmp_path / "ap").exists(), "nothing may be created after a configuration error"
