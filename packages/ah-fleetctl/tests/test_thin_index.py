"""The thin index's file names (``ah_fleetctl.thin.thin_key``) and what the thin path loads.

The key names the index file of one invocation (working directory + the environment that
can change the configuration). It must be the same in every process (``hash()`` is salted
per process), differ when any part of the invocation differs, and cost no module import:
the thin path runs on every warm ``ah-fleetctl run``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from hypothesis import given, settings
from hypothesis import strategies as st

from ah_fleetctl.thin import thin_key

ENV = {"HOME": "/home/dev", "AH_ACCESS_POINT": "https://ap.example:8443", "XDG_RUNTIME_DIR": "/r"}


def test_the_key_is_the_same_in_another_process_with_another_hash_seed() -> None:
    code = (
        "import json, sys; from ah_fleetctl.thin import thin_key; "
        "print(thin_key(sys.argv[1], json.loads(sys.argv[2])))"
    )
    keys = {
        subprocess.run(
            [sys.executable, "-c", code, "/work/tree", json.dumps(ENV)],
            env={**os.environ, "PYTHONHASHSEED": seed},
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        for seed in ("1", "2", "3")
    }
    assert keys == {thin_key("/work/tree", ENV)}


def test_only_the_relevant_environment_is_part_of_the_key() -> None:
    key = thin_key("/work/tree", ENV)
    assert thin_key("/work/tree", {**ENV, "TERM": "dumb", "LANG": "C"}) == key
    assert thin_key("/work/tree", {**ENV, "AH_LOG_LEVEL": "debug"}) != key
    assert thin_key("/work/tree", {**ENV, "XDG_CONFIG_HOME": "/c"}) != key
    assert thin_key("/work/tree", {**ENV, "HOME": "/home/other"}) != key
    assert thin_key("/work/tree2", ENV) != key


def test_a_one_character_change_moves_the_whole_name() -> None:
    a, b = thin_key("/work/x", ENV), thin_key("/work/y", ENV)
    # The length suffix is equal; of the 32 hash digits, most must differ.
    assert sum(x != y for x, y in zip(a[:32], b[:32], strict=True)) >= 20, (a, b)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.text(min_size=1, max_size=40), min_size=2, max_size=60, unique=True))
def test_distinct_working_directories_get_distinct_names(cwds: list[str]) -> None:
    keys = [thin_key("/" + cwd, ENV) for cwd in cwds]
    assert len(set(keys)) == len(keys)
    assert all(key.isalnum() and key == key.lower() for key in keys)


def test_the_thin_path_loads_no_module_beyond_its_own_and_the_socket() -> None:
    code = (
        "import sys; before = set(sys.modules); import ah_fleetctl.cli, ah_fleetctl.thin; "
        "print(' '.join(sorted(set(sys.modules) - before)))"
    )
    loaded = set(
        subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        ).stdout.split()
    )
    assert loaded <= {"_socket", "ah_fleetctl", "ah_fleetctl.cli", "ah_fleetctl.thin"}
