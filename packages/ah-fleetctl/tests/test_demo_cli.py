"""``ah-fleetctl demo`` without a fleet: the command line, missing programs, the env file and
``--down``'s refusals. (The demo run end to end, Ctrl-C and ``--keep``/``--down`` with a real
fleet are in ``tests/test_demo.py``.)"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from ah_fleetctl.localfleet.demo import (
    DIRECTORY_MARKER,
    PREREQUISITES,
    STATE_FILE_NAME,
    DemoError,
    DemoProcess,
    DemoState,
    demo_directory_of,
    down,
    install_hint,
    missing_prerequisites,
    render_env_file,
)

if TYPE_CHECKING:  # conftest is not importable at run time under --import-mode=importlib
    from conftest import Cli


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["demo", "--down"], "--down needs --env-file"),
        (["demo", "--env-file", "x.env"], "--env-file needs --keep"),
        (["demo", "--down", "--env-file", "x.env", "--followers", "2"], "--down takes only"),
        (["demo", "--down", "--env-file", "x.env", "--", "ls"], "--down takes only"),
        (["demo", "--followers", "0"], "--followers"),
        (["demo", "--followers", "33"], "--followers"),
        (["demo", "--keep", "--env-file", "no/such/dir/x.env"], "does not exist"),
    ],
    ids=["down-without-env-file", "env-file-alone", "down-with-followers", "down-with-command",
         "zero-followers", "too-many-followers", "env-file-dir-missing"],
)  # fmt: skip
def test_usage_errors_exit_2_before_anything_starts(cli: Cli, args: list[str], needle: str) -> None:
    result = cli(*args)
    assert result.returncode == 2, result
    assert needle in result.stderr, result


def test_missing_programs_are_named_with_their_debian_packages_and_exit_8(
    cli: Cli, tmp_path: Path
) -> None:
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    # No ssh, ssh-keygen or rsync on PATH (sshd is also looked for in /usr/sbin and the like,
    # so whether it counts as missing depends on the machine).
    result = cli("demo", env={"PATH": str(empty)})
    assert result.returncode == 8, result
    assert result.stdout == "", result
    assert "rsync" in result.stderr and "ssh-keygen" in result.stderr, result
    assert "sudo apt-get install" in result.stderr, result
    install = result.stderr.split("sudo apt-get install ", 1)[1].split(" (", 1)[0].split()
    assert {"openssh-client", "rsync"} <= set(install), result
    assert "scripts/install-system-deps.sh" in result.stderr, result

    as_json = cli("--json", "demo", env={"PATH": str(empty)})
    assert as_json.returncode == 8, as_json
    error = json.loads(as_json.stdout)["error"]
    assert (error["kind"], error["exitCode"]) == ("missingPrerequisite", 8)
    assert {"rsync", "ssh", "ssh-keygen"} <= set(error["details"]["missing"].split())
    assert {"openssh-client", "rsync"} <= set(error["details"]["debianPackages"].split())


def test_a_missing_sshd_asks_for_openssh_server() -> None:
    missing = missing_prerequisites(
        which=lambda name: f"/usr/bin/{name}", sshd_present=lambda: False
    )
    assert [m.program for m in missing] == ["sshd"]
    hint = install_hint(missing)
    assert "sudo apt-get install openssh-server " in hint and "sshd" in hint
    everything = missing_prerequisites(which=lambda name: None, sshd_present=lambda: False)
    assert everything == list(PREREQUISITES)
    # Each package is named once, in order.
    assert "install openssh-server openssh-client rsync (" in install_hint(everything)
    assert missing_prerequisites(which=lambda n: "/x", sshd_present=lambda: True) == []


@given(
    directory=st.text(
        st.characters(codec="utf-8", exclude_categories=["Cc", "Cs", "Zl", "Zp"]), min_size=1
    ).map(lambda s: "/tmp/ah-demo-" + s.strip().replace("\n", "")),
    value=st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=40),
)
def test_the_env_file_round_trips_through_a_real_shell_and_names_its_directory(
    directory: str, value: str
) -> None:
    env_file = Path("/tmp/x y/demo.env")
    text = render_env_file(Path(directory), env_file, {"AH_TOKEN": value, "AH_HOME": directory})
    assert demo_directory_of(text, env_file) == Path(directory)
    # Sourced by sh, the exports give back exactly the values (quoting survives anything).
    shown = subprocess.run(
        ["sh", "-c", text + '\nprintf "%s\\0%s" "$AH_TOKEN" "$AH_HOME"'],
        capture_output=True,
        env={"PATH": os.environ["PATH"]},
        check=True,
    ).stdout
    assert shown.split(b"\0") == [value.encode(), directory.encode()]


def test_down_refuses_files_that_do_not_describe_a_demo_fleet(tmp_path: Path) -> None:
    stranger = tmp_path / "not-a-demo.env"
    stranger.write_text("export AH_HOME=/somewhere\n")
    with pytest.raises(DemoError, match="not an env file written by `ah-fleetctl demo --keep`"):
        down(stranger)

    # An env file naming a directory whose demo.json describes another directory: nothing is
    # stopped or removed.
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious.txt").write_text("keep me")
    state = DemoState(
        directory=str(tmp_path / "elsewhere"),
        env_file=str(tmp_path / "x.env"),
        access_point="https://127.0.0.1:1",
        followers=["demo-1"],
        processes=[DemoProcess("ah-access-pointd", os.getpid(), None)],
        kept_at_ms=0,
    )
    (victim / STATE_FILE_NAME).write_bytes(msgspec.json.encode(state))
    forged = tmp_path / "forged.env"
    forged.write_text(f"{DIRECTORY_MARKER}{victim}\n")
    with pytest.raises(DemoError, match="describes the demo directory"):
        down(forged)
    assert (victim / "precious.txt").read_text() == "keep me" and forged.exists()

    (victim / STATE_FILE_NAME).write_text("{not json")
    with pytest.raises(DemoError, match="not a demo fleet state file"):
        down(forged)
    (victim / STATE_FILE_NAME).unlink()
    with pytest.raises(DemoError, match="already stopped"):
        down(forged)


def test_down_with_a_stranger_env_file_is_exit_7(cli: Cli, tmp_path: Path) -> None:
    stranger = tmp_path / "stranger.env"
    stranger.write_text("export AH_HOME=/somewhere\n")
    result = cli("demo", "--down", "--env-file", str(stranger))
    assert result.returncode == 7, result
    assert str(stranger) in result.stderr and "not an env file" in result.stderr, result
    assert stranger.exists()
