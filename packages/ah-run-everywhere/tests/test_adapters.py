"""Per-OS command adapters: quoting round-trips through real shells (POSIX) and through a
model of PowerShell's single-quoted string rules (Windows), env/PATH/cwd, path mapping."""

from __future__ import annotations

import base64
import os
import re
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from ah_domain_types import DomainValidationError, OsKind
from ah_run_everywhere import (
    MAX_POSIX_COMMAND_BYTES,
    MAX_WINDOWS_COMMAND_CHARS,
    AdapterError,
    PathMapping,
    PathOutsideWorkspaceError,
    adapter_for,
    display_command,
    posix_quote,
)
from ah_ssh_bridge import WarmCommand

# Arbitrary Unicode without NUL (no command line can carry NUL) and without lone
# surrogates (not text; hypothesis excludes them by default anyway).
# Quote characters of every kind are mixed in so that they are not left to chance.
TRICKY = "'\"`$\\\n!*?;&|()<>\u2018\u2019\u201a\u201b\u201c\u201d"
TEXT = st.text(
    st.characters(exclude_characters="\x00", exclude_categories=["Cs"]) | st.sampled_from(TRICKY),
    max_size=20,
)
ARGS = st.lists(TEXT, max_size=5)
# The two shells that play "sshd's login shell": dash (strict POSIX sh) and bash.
OUTER_SHELLS = ["/bin/sh", "bash"]
SHELL_SETTINGS = settings(
    max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def run_as_sshd(outer_shell: str, rendered: str, home: Path) -> bytes:
    """Run ``rendered`` the way sshd does: ``<login shell> -c <string>``."""
    env = {"HOME": str(home), "PATH": os.environ["PATH"], "LC_ALL": "C.UTF-8"}
    proc = subprocess.run(
        [outer_shell, "-c", rendered],
        env=env,
        cwd=home,  # a quoting bug must not scatter files into the checkout
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 0, (proc.returncode, proc.stderr)
    return proc.stdout


def nul_fields(output: bytes) -> list[str]:
    assert output.endswith(b"\0"), output
    return [f.decode("utf-8") for f in output[:-1].split(b"\0")]


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("home")


# ---- POSIX: real shells -----------------------------------------------------------------


@pytest.mark.parametrize("outer", OUTER_SHELLS)
@SHELL_SETTINGS
@given(args=ARGS, snippet=st.booleans())
def test_rendered_posix_commands_are_execed_by_the_bridge_wrapper(
    outer: str, args: list[str], snippet: bool, home: Path
) -> None:
    """The SSH bridge execs (rather than evals) one literal simple command; every POSIX
    rendering must be one, and must still round-trip through the wrapper."""
    from ah_ssh_bridge import wrap_command
    from ah_ssh_bridge.remote import parse_marker

    command: list[str] | str = ["printf", "%s\\0", "START", *args]
    if snippet:
        command = "printf '%s\\0' START " + " ".join(posix_quote(a) for a in args)
    rendered = adapter_for(OsKind.LINUX).render(command, cwd=str(home))
    wrapped = wrap_command(rendered)
    assert wrapped.text.endswith(f"\nexec {rendered}")
    output = run_as_sshd(outer, wrapped.text, home)
    marker, _, rest = output.partition(b"\n")
    assert parse_marker(marker.decode(), wrapped.nonce) is not None
    assert nul_fields(rest) == ["START", *args]


@pytest.mark.parametrize("outer", OUTER_SHELLS)
@SHELL_SETTINGS
@given(args=ARGS)
def test_bash_argv_round_trips_exactly(outer: str, args: list[str], home: Path) -> None:
    rendered = adapter_for(OsKind.LINUX).render(["printf", "%s\\0", "START", *args])
    assert rendered.startswith("bash -lc '")
    assert nul_fields(run_as_sshd(outer, rendered, home)) == ["START", *args]


@SHELL_SETTINGS
@given(
    value=TEXT,
    dirname=st.text(
        st.characters(exclude_characters="\x00/", exclude_categories=["Cs"]),
        min_size=1,
        max_size=20,
    ),
    path_entries=st.lists(
        st.text(
            st.characters(exclude_characters="\x00:", exclude_categories=["Cs"]),
            min_size=1,
            max_size=10,
        ),
        min_size=1,
        max_size=3,
    ),
)
def test_bash_env_cwd_and_path_prepend_survive(
    value: str, dirname: str, path_entries: list[str], home: Path
) -> None:
    assume(dirname not in (".", "..") and len(dirname.encode()) < 200)
    workdir = home / "work" / dirname
    workdir.mkdir(parents=True, exist_ok=True)
    rendered = adapter_for(OsKind.LINUX).render(
        """printf '%s\\0' "$AH_VALUE" "$PWD" "$PATH" """,
        cwd=str(workdir),
        env={"AH_VALUE": value},
        path_prepend=path_entries,
    )
    got_value, got_pwd, got_path = nul_fields(run_as_sshd("bash", rendered, home))
    assert got_value == value
    assert got_pwd == str(workdir)
    prefix = ":".join(path_entries) + ":"
    assert got_path.startswith(prefix) and len(got_path) > len(prefix)


def test_bash_missing_cwd_fails_loudly_instead_of_running_elsewhere(tmp_path: Path) -> None:
    rendered = adapter_for(OsKind.LINUX).render(["touch", "marker"], cwd=str(tmp_path / "nope"))
    proc = subprocess.run(
        ["bash", "-c", rendered],
        env={"HOME": str(tmp_path), "PATH": os.environ["PATH"]},
        cwd=tmp_path,
        capture_output=True,
        check=False,
        timeout=30,
    )
    assert proc.returncode == 1
    assert b"nope" in proc.stderr
    assert not (tmp_path / "marker").exists()


def test_bash_exit_status_is_the_commands(home: Path) -> None:
    rendered = adapter_for(OsKind.LINUX).render("exit 7")
    proc = subprocess.run(
        ["bash", "-c", rendered],
        env={"HOME": str(home), "PATH": os.environ["PATH"]},
        check=False,
        timeout=30,
    )
    assert proc.returncode == 7


# zsh comes from scripts/install-system-deps.sh (run by .ci/run and the README).
@SHELL_SETTINGS
@given(args=ARGS)
def test_zsh_argv_round_trips_exactly(args: list[str], home: Path) -> None:
    rendered = adapter_for(OsKind.MACOS).render(["printf", "%s\\0", "START", *args])
    assert rendered.startswith("zsh -lc '")
    assert nul_fields(run_as_sshd("zsh", rendered, home)) == ["START", *args]


@given(word=TEXT)
def test_posix_quote_is_one_single_quoted_word(word: str) -> None:
    quoted = posix_quote(word)
    # Outside the '\'' joints, nothing but the quoted pieces appears.
    assert re.fullmatch(r"'[^']*'(\\''[^']*')*", quoted)
    assert quoted.replace("'\\''", "'")[1:-1] == word


# ---- PowerShell: a model of its single-quoted strings ------------------------------------


# PowerShell's single-quote characters, written out independently of the code under test.
PS_QUOTES = frozenset("'\u2018\u2019\u201a\u201b")


def ps_tokens(script: str) -> list[str | tuple[str]]:
    """Tokenize a script into barewords (``str``) and single-quoted literals (``(value,)``).

    PowerShell's rules for single-quoted strings (about_Quoting_Rules, and its tokenizer):
    the string opens and closes with any single-quote character (' and U+2018..U+201B);
    inside, two consecutive quote characters stand for one literal quote (the second one);
    nothing else is special — no escapes, no variable expansion. Newlines separate
    statements and are kept as the bareword ``"\\n"``.
    """
    tokens: list[str | tuple[str]] = []
    i = 0
    while i < len(script):
        c = script[i]
        if c in PS_QUOTES:
            i += 1
            value: list[str] = []
            while True:
                assert i < len(script), "unterminated single-quoted string"
                if script[i] in PS_QUOTES:
                    if i + 1 < len(script) and script[i + 1] in PS_QUOTES:
                        value.append(script[i + 1])
                        i += 2
                        continue
                    i += 1
                    break
                value.append(script[i])
                i += 1
            tokens.append(("".join(value),))
        elif c == "\n":
            tokens.append("\n")
            i += 1
        elif c in " \t":
            i += 1
        else:
            start = i
            while i < len(script) and script[i] not in " \t\n" and script[i] not in PS_QUOTES:
                i += 1
            tokens.append(script[start:i])
    return tokens


def ps_statements(script: str) -> list[list[str | tuple[str]]]:
    statements: list[list[str | tuple[str]]] = [[]]
    for token in ps_tokens(script):
        if token == "\n":
            statements.append([])
        else:
            statements[-1].append(token)
    return statements


def decode_encoded_command(rendered: str) -> str:
    head, encoded = rendered.rsplit(" ", 1)
    assert head == "powershell -NoLogo -NoProfile -NonInteractive -EncodedCommand"
    return base64.b64decode(encoded, validate=True).decode("utf-16-le")


@pytest.mark.parametrize(
    ("script", "expected"),
    [
        ("'it''s'", [("it's",)]),
        ("'$HOME `n \"x\"'", [('$HOME `n "x"',)]),
        ("& 'a b' ''", ["&", ("a b",), ("",)]),
        ("'\u2019\u2019'", [("\u2019",)]),
    ],
)
def test_powershell_model_on_known_literals(script: str, expected: list[object]) -> None:
    assert ps_tokens(script) == expected


@settings(max_examples=150)
@given(
    args=ARGS,
    env=st.dictionaries(
        st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,8}", fullmatch=True), TEXT, max_size=3
    ),
    path_entries=st.lists(
        st.text(
            st.characters(exclude_characters="\x00;", exclude_categories=["Cs"]),
            min_size=1,
            max_size=8,
        ),
        max_size=3,
    ),
    cwd_tail=st.lists(st.text("abcxyz \u00e9\u4e2d'\u2019", min_size=1, max_size=6), max_size=3),
)
def test_powershell_rendering_preserves_every_value(
    args: list[str], env: dict[str, str], path_entries: list[str], cwd_tail: list[str]
) -> None:
    assume(all(name.upper() != "PATH" for name in env))
    cwd = "C:\\ws" + "".join("\\" + part for part in cwd_tail)
    rendered = adapter_for(OsKind.WINDOWS).render(
        ["prog.exe", *args], cwd=cwd, env=env, path_prepend=path_entries
    )
    # The outer layer is shell-inert: nothing cmd.exe or PowerShell would interpret.
    assert re.fullmatch(r"[A-Za-z0-9 +/=-]+", rendered)
    statements = ps_statements(decode_encoded_command(rendered))
    env_statements = [
        s
        for s in statements
        if s and isinstance(s[0], str) and s[0].startswith("$env:") and s[0] != "$env:PATH"
    ]
    assert {str(s[0]).removeprefix("$env:"): s[2] for s in env_statements} == {
        name: (value,) for name, value in env.items()
    }
    assert all(s[1] == "=" and len(s) == 3 for s in env_statements)
    path_statements = [s for s in statements if s and s[0] == "$env:PATH"]
    if path_entries:
        (path_statement,) = path_statements
        assert path_statement == [
            "$env:PATH",
            "=",
            (";".join(path_entries) + ";",),
            "+",
            "$env:PATH",
        ]
    else:
        assert path_statements == []
    (location,) = [s for s in statements if "Set-Location" in s]
    assert location[location.index("-LiteralPath") + 1] == (cwd,)
    (call,) = [s for s in statements if s and s[0] == "&"]
    assert call[1:] == [(arg,) for arg in ["prog.exe", *args]]
    # The exit-status epilogue is the last statement.
    assert "$LASTEXITCODE;" in statements[-1]


def test_powershell_shell_string_is_inserted_verbatim() -> None:
    snippet = "Get-ChildItem | Where-Object { $_.Name -like '*.py' }\nexit 3"
    script = decode_encoded_command(adapter_for(OsKind.WINDOWS).render(snippet))
    assert snippet in script.split("\n", 2)[2]


def test_powershell_too_long_command_is_refused() -> None:
    with pytest.raises(AdapterError, match=str(MAX_WINDOWS_COMMAND_CHARS)):
        adapter_for(OsKind.WINDOWS).render(["echo", "x" * 4000])


# ---- validation --------------------------------------------------------------------------


@pytest.mark.parametrize("os_kind", list(OsKind))
@pytest.mark.parametrize(
    ("command", "kwargs", "message"),
    [
        (["a\x00b"], {}, "NUL"),
        ([], {}, "empty argv"),
        (["", "x"], {}, "empty program"),
        ("   ", {}, "empty command"),
        (["x"], {"env": {"1BAD": "v"}}, "invalid environment variable name '1BAD'"),
        (["x"], {"env": {"Path": "v"}}, "path_prepend"),
        (["x"], {"env": {"A": "v\x00"}}, "NUL"),
        (["x"], {"cwd": "relative/dir"}, "relative/dir"),
    ],
)
def test_inexpressible_input_is_refused_loudly(
    os_kind: OsKind, command: Sequence[str] | str, kwargs: dict[str, object], message: str
) -> None:
    with pytest.raises(AdapterError, match=re.escape(message)) as info:
        adapter_for(os_kind).render(command, **kwargs)  # type: ignore[arg-type]
    assert isinstance(info.value, DomainValidationError)


def test_path_separator_inside_a_path_entry_is_refused() -> None:
    with pytest.raises(AdapterError, match="':'"):
        adapter_for(OsKind.LINUX).render(["x"], path_prepend=["/a:/b"])
    with pytest.raises(AdapterError, match="';'"):
        adapter_for(OsKind.WINDOWS).render(["x"], path_prepend=["C:\\a;C:\\b"])


def test_display_command_quotes_only_what_needs_it() -> None:
    assert display_command(["pytest", "-k", "a and b", ""]) == "pytest -k 'a and b' ''"
    assert display_command("make -j4 && echo ok") == "make -j4 && echo ok"


# ---- path mapping ------------------------------------------------------------------------


def is_windows_device_name(name: str) -> bool:
    """Names Windows reserves (per its file-naming rules), tested with or without extension."""
    stem = name.split(".")[0].rstrip(" ").upper()
    devices = {"CON", "PRN", "AUX", "NUL", "CONIN$", "CONOUT$"}
    return stem in devices or bool(re.fullmatch("(COM|LPT)[1-9\u00b9\u00b2\u00b3]", stem))


COMPONENT = st.text(
    st.characters(categories=("L", "N"), include_characters="-_ "), min_size=1, max_size=8
).filter(lambda s: not s.endswith(" ") and not is_windows_device_name(s))


@given(
    parts=st.lists(COMPONENT, max_size=4),
    root=st.sampled_from(["C:\\ws", "D:/b/ws", "\\\\srv\\share\\ws"]),
)
def test_windows_mapping_uses_backslashes_and_keeps_the_drive(parts: list[str], root: str) -> None:
    mapping = PathMapping("/home/me/proj", root, OsKind.WINDOWS)
    leader = "/home/me/proj" + "".join("/" + p for p in parts)
    mapped = mapping.to_follower(leader)
    expected_root = root.replace("/", "\\")
    assert mapped == expected_root + "".join("\\" + p for p in parts)
    assert "/" not in mapped


@given(parts=st.lists(COMPONENT, max_size=4), os_kind=st.sampled_from([OsKind.LINUX, OsKind.MACOS]))
def test_posix_mapping_joins_under_the_follower_root(parts: list[str], os_kind: OsKind) -> None:
    mapping = PathMapping("/home/me/proj", "/srv/ws", os_kind)
    leader = "/home/me/proj/" + "/".join(parts)
    assert mapping.to_follower(leader) == "/".join(["/srv/ws", *parts])


@pytest.mark.parametrize(
    "leader",
    ["/home/me/project2", "/home/me", "/home/me/proj/../other", "/etc", "relative/path"],
)
def test_paths_outside_the_workspace_are_refused(leader: str) -> None:
    mapping = PathMapping("/home/me/proj", "/srv/ws", OsKind.LINUX)
    with pytest.raises(PathOutsideWorkspaceError, match=re.escape(repr(leader))):
        mapping.to_follower(leader)


def test_dotdot_inside_the_workspace_is_resolved_lexically() -> None:
    mapping = PathMapping("/home/me/proj/", "/srv/ws", OsKind.LINUX)
    assert mapping.to_follower("/home/me/proj/a/../b/./c") == "/srv/ws/b/c"
    assert mapping.to_follower("/home/me/proj") == "/srv/ws"


@pytest.mark.parametrize(
    "component",
    ["a:b", "CON", "nul.txt", "COM1", "lpt\u00b2.log", "trail.", "trail ", "x\\y", "q?"],
)
def test_names_that_cannot_exist_on_windows_are_refused(component: str) -> None:
    mapping = PathMapping("/p", "C:\\ws", OsKind.WINDOWS)
    with pytest.raises(AdapterError, match="cannot exist on Windows"):
        mapping.to_follower(f"/p/{component}")
    # The same name is fine on a POSIX follower.
    assert PathMapping("/p", "/ws", OsKind.LINUX).to_follower(f"/p/{component}").endswith(component)


def test_windows_leader_paths_compare_case_insensitively() -> None:
    mapping = PathMapping("C:\\Users\\me\\proj", "/srv/ws", OsKind.LINUX, leader_os=OsKind.WINDOWS)
    assert mapping.to_follower("c:/users/ME/proj/Sub") == "/srv/ws/Sub"


@pytest.mark.parametrize(
    ("leader_root", "follower_root", "os_kind"),
    [("proj", "/ws", OsKind.LINUX), ("/p", "ws", OsKind.LINUX), ("/p", "/ws", OsKind.WINDOWS)],
)
def test_roots_must_be_absolute_for_their_os(
    leader_root: str, follower_root: str, os_kind: OsKind
) -> None:
    with pytest.raises(AdapterError, match="must be an absolute"):
        PathMapping(leader_root, follower_root, os_kind)


# --------------------------------------------------------------------------- warm commands


def test_warm_command_carries_the_structured_command() -> None:
    linux = adapter_for(OsKind.LINUX)
    warm = linux.warm_command(
        ["ls", "-l", "it's"], cwd="/ws/sub", env={"A": "1"}, path_prepend=["/opt/bin"]
    )
    assert warm == WarmCommand(
        shell="bash",
        argv=("ls", "-l", "it's"),
        cwd="/ws/sub",
        env={"A": "1"},
        path_prepend=("/opt/bin",),
    )
    mac = adapter_for(OsKind.MACOS).warm_command("echo $HOME | wc -c")
    assert mac == WarmCommand(shell="zsh", script="echo $HOME | wc -c")
    # PowerShell stays on exec channels.
    assert adapter_for(OsKind.WINDOWS).warm_command(["dir"]) is None


@pytest.mark.parametrize(
    "kwargs",
    [
        {"command": ["x"], "env": {"PATH": "/bin"}},
        {"command": ["x"], "cwd": "relative"},
        {"command": ["x"], "path_prepend": ["a:b"]},
        {"command": ["nul\x00"]},
        {"command": "   "},
        {"command": ["x" * (MAX_POSIX_COMMAND_BYTES + 1)]},
    ],
)
def test_warm_command_refuses_what_render_refuses(kwargs: dict[str, Any]) -> None:
    linux = adapter_for(OsKind.LINUX)
    command = kwargs.pop("command")
    with pytest.raises(AdapterError) as rendered:
        linux.render(command, **kwargs)
    with pytest.raises(AdapterError) as warm:
        linux.warm_command(command, **kwargs)
    assert str(warm.value) == str(rendered.value)
