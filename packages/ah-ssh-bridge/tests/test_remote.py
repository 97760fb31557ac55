"""The shell texts for POSIX followers, run by the real local shells."""

from __future__ import annotations

import shutil
import subprocess

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ah_ssh_bridge import kill_group_script, wrap_command
from ah_ssh_bridge.remote import parse_marker

SHELLS = [s for s in ("sh", "dash", "bash", "zsh") if shutil.which(s)]


@pytest.mark.parametrize("shell", SHELLS)
def test_wrapper_prints_the_marker_first_then_runs_the_command(shell: str) -> None:
    wrapped = wrap_command("echo body; exit 4", env={"A_VAR": "it's $x"})
    result = subprocess.run(
        [shell, "-c", wrapped.text + "\necho never"], capture_output=True, text=True
    )
    first, *rest = result.stdout.splitlines()
    pgid = parse_marker(first, wrapped.nonce)
    assert pgid is not None and pgid > 1
    assert rest == ["body"]
    assert result.returncode == 4


@pytest.mark.parametrize("shell", SHELLS)
def test_marker_is_printed_even_when_the_command_has_a_syntax_error(shell: str) -> None:
    wrapped = wrap_command("if then fi (")
    result = subprocess.run([shell, "-c", wrapped.text], capture_output=True, text=True)
    assert parse_marker(result.stdout.splitlines()[0], wrapped.nonce) is not None
    assert result.returncode != 0


@settings(max_examples=50, deadline=None)
@given(
    st.dictionaries(
        st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,10}", fullmatch=True),
        st.text(
            st.characters(blacklist_categories=["Cs"], blacklist_characters="\x00"), max_size=30
        ),
        max_size=4,
    )
)
def test_env_values_arrive_verbatim(env: dict[str, str]) -> None:
    names = sorted(env)
    command = " ".join(f'printf "%s\\0" "${name}";' for name in names) or "true"
    wrapped = wrap_command(command, env=env, report_pgid=False)
    result = subprocess.run(["sh", "-c", wrapped.text], capture_output=True, check=True)
    values = result.stdout.split(b"\0")[:-1]
    assert [v.decode() for v in values] == [env[n] for n in names]


def test_marker_needs_the_nonce() -> None:
    wrapped = wrap_command("true", nonce="00ff")
    assert parse_marker("__ah_ssh_bridge_pgid__ 00ff 1234", wrapped.nonce) == 1234
    assert parse_marker("__ah_ssh_bridge_pgid__ 0000 1234", wrapped.nonce) is None
    assert parse_marker("__ah_ssh_bridge_pgid__ 00ff 1", wrapped.nonce) is None
    assert parse_marker("__ah_ssh_bridge_pgid__ 00ff x", wrapped.nonce) is None


def test_kill_script_refuses_init_and_bad_names() -> None:
    with pytest.raises(ValueError, match="refusing"):
        kill_group_script(1, grace_s=1)
    with pytest.raises(ValueError, match="not a valid environment variable name"):
        wrap_command("true", env={"1X": "y"})


@pytest.mark.parametrize("shell", SHELLS)
def test_one_literal_simple_command_is_execed_keeping_the_marked_process_group(
    shell: str,
) -> None:
    # What the run-everywhere adapters send: `bash -lc '<script>'` (quotes as '\'').
    wrapped = wrap_command("sh -c 'echo \"$$\"; echo \"it'\\''s\"; exit 5'")
    assert wrapped.text.splitlines()[-1].startswith("exec sh -c ")
    result = subprocess.run([shell, "-c", wrapped.text], capture_output=True, text=True)
    first, pid, text = result.stdout.splitlines()
    # The command became the login shell (no fork): it is the process the marker names.
    assert parse_marker(first, wrapped.nonce) == int(pid)
    assert text == "it's"
    assert result.returncode == 5


@pytest.mark.parametrize(
    "command",
    ["echo a; echo b", "sh -c 'x' && echo b", "sh -c 'x' 'y'", "sh -c $HOME", "a'b' -c 'x'"],
)
def test_anything_else_is_evaluated_not_execed(command: str) -> None:
    assert wrap_command(command).text.splitlines()[-1].startswith("eval ")
