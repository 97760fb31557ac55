"""Configuration precedence through the real binary, observed with
``config show --show-origin --json``: flag > --config > AH_* > repo-user > repo > user >
system, and no click default in between."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from conftest import Cli


def show(cli: Cli, *args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> Any:
    result = cli(*args, env=env, cwd=cwd)
    assert result.returncode == 0, result
    return result.json()


def _write(path: Path, server: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f'remote-server = "https://{server}.example"\n')
    return path


def test_access_point_precedence(cli: Cli, tmp_path: Path) -> None:
    """Each run removes the top layer; the next one down must show through, named."""
    system_file = _write(tmp_path / "etc" / "config.toml", "system")
    user_file = _write(cli.ah_home / "config.toml", "user")
    repo = tmp_path / "repo"  # has both repo files
    repo_file = _write(repo / ".agents" / "config.toml", "repo")
    repo_user_file = _write(repo / ".agents" / "config.user.toml", "repo-user")
    plain_repo = tmp_path / "plain-repo"  # has only the shared repo file
    plain_repo_file = _write(plain_repo / ".agents" / "config.toml", "repo")
    in_repo = repo / "src" / "deep"
    in_repo.mkdir(parents=True)
    extra = _write(tmp_path / "extra.toml", "config-file")
    empty_home = tmp_path / "empty-home"

    system = {"AH_SYSTEM_CONFIG": str(system_file)}
    env = {**system, "AH_REMOTE_SERVER": "https://env.example"}
    query = ["config", "show", "remote-server", "--show-origin", "--json"]
    flag = ["--access-point", "https://flag.example"]
    config = ["--config", str(extra)]
    batches = [
        cli.many([*flag, *config, *query], [*config, *query], query, env=env, cwd=in_repo),
        cli.many(query, env=system, cwd=in_repo),
        cli.many(query, env=system, cwd=plain_repo),
        cli.many(query, env=system),
        cli.many(query, env={**system, "AH_HOME": str(empty_home)}),
    ]
    results = [r for batch in batches for r in batch]
    for result in results:
        assert result.returncode == 0, result
    seen = [r.json()["remote-server"] for r in results]
    expected = [
        ("https://flag.example", "flag", "--access-point"),
        ("https://config-file.example", "config-file", str(extra)),
        ("https://env.example", "env", "AH_REMOTE_SERVER"),
        ("https://repo-user.example", "repo-user", str(repo_user_file)),
        ("https://repo.example", "repo", str(plain_repo_file)),
        ("https://user.example", "user", str(user_file)),
        ("https://system.example", "system", str(system_file)),
    ]
    assert seen == [
        {"value": value, "origin": {"layer": layer, "source": source}}
        for value, layer, source in expected
    ]
    assert repo_file.is_file()  # present, but outranked by config.user.toml


def test_global_options_after_the_command_and_secrets_redacted(cli: Cli) -> None:
    document = show(
        cli,
        "config",
        "show",
        "--show-origin",
        "--json",
        "--access-point",
        "https://late.example",
        "--token",
        "very-secret-token",
    )
    assert document["remote-server"]["value"] == "https://late.example"
    assert document["token"] == {
        "value": "***",
        "origin": {"layer": "flag", "source": "--token"},
    }
    assert "very-secret-token" not in str(document)
    # Defaults fill in what no layer set, and say so.
    assert document["timeouts.connect"] == {
        "value": "5s",
        "origin": {"layer": "default", "source": "default"},
    }


def test_nothing_configured_means_no_value_not_a_click_default(cli: Cli) -> None:
    assert show(cli, "--json", "config", "show", "remote-server") == {
        "remote-server": {"value": None, "origin": None}
    }
    text = cli("config", "show", "--show-origin")
    assert text.returncode == 0, text
    assert "remote-server" not in text.stdout
    assert 'timeouts.overall = "60s"  # default' in text.stdout.splitlines()
