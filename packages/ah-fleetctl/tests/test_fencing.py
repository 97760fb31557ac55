"""``ah_fleetctl.fencing`` and ``ah-fleetctl fence`` without followers: where the caches live,
the timeout and engine choice, configuration errors, the table, and the CLI contract (usage
and selection errors). The fence against real followers is ``tests/test_fence_fleet.py``."""

from __future__ import annotations

import asyncio
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from ah_config import CliError, ResolvedConfig, load_config
from ah_domain_types import (
    ConfigFile,
    ExitCode,
    FenceHostResult,
    FenceHostState,
    FenceMetadata,
    OsKind,
    TimeoutsConfig,
)
from ah_fleetctl.commands.fence import _render
from ah_fleetctl.dataplane import FleetLinks
from ah_fleetctl.fencing import (
    DEFAULT_FENCE_TIMEOUT_S,
    FenceTarget,
    VerifiedHosts,
    changed_paths,
    choose_engine,
    configured_engine,
    engine_for,
    fence_selected,
    fence_timeout_s,
    user_cache_dir,
    workspace_cache_dir,
)
from ah_mutagen_project import Manifest, take_snapshot

if TYPE_CHECKING:
    from conftest import Cli, RunningApi


def test_user_cache_dir_per_platform() -> None:
    assert user_cache_dir({"AH_HOME": "/ah", "HOME": "/h"}, "linux") == Path("/ah/cache")
    assert user_cache_dir({"HOME": "/h"}, "linux") == Path("/h/.cache/agent-harbor")
    assert user_cache_dir({"HOME": "/h", "XDG_CACHE_HOME": "/x"}, "linux") == Path(
        "/x/agent-harbor"
    )
    # A relative XDG_CACHE_HOME is invalid (XDG spec) and ignored.
    assert user_cache_dir({"HOME": "/h", "XDG_CACHE_HOME": "rel"}, "linux") == Path(
        "/h/.cache/agent-harbor"
    )
    assert user_cache_dir({"HOME": "/h"}, "darwin") == Path("/h/Library/Caches/agent-harbor")
    assert user_cache_dir({"LOCALAPPDATA": "/l", "HOME": "/h"}, "win32") == Path(
        "/l/agent-harbor/cache"
    )


def test_workspace_cache_dir_is_private_and_keyed_by_workspace(tmp_path: Path) -> None:
    one = workspace_cache_dir(tmp_path / "ws-one", tmp_path / "cache")
    two = workspace_cache_dir(tmp_path / "ws-two", tmp_path / "cache")
    assert one != two and one.parent == two.parent == tmp_path / "cache" / "fence"
    assert stat.S_IMODE(one.stat().st_mode) == 0o700
    assert workspace_cache_dir(tmp_path / "ws-one", tmp_path / "cache") == one


def test_fence_timeout_and_engine_choice(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    configured = ConfigFile(timeouts=TimeoutsConfig(fence="45s"))
    assert fence_timeout_s(configured, 3.0) == 3.0
    assert fence_timeout_s(configured) == 45.0
    assert fence_timeout_s(ConfigFile()) == DEFAULT_FENCE_TIMEOUT_S

    monkeypatch.setenv("PATH", str(tmp_path))
    assert choose_engine() == "rsync"
    (tmp_path / "mutagen").write_text("#!/bin/sh\n")
    (tmp_path / "mutagen").chmod(0o755)
    assert choose_engine() == "mutagen"

    windows = FenceTarget(name="w", alias="ah-w", workspace="C:/ws", os=OsKind.WINDOWS)
    linux = FenceTarget(name="l", alias="ah-l", workspace="/ws", os=OsKind.LINUX)
    assert (windows.exec_bits, linux.exec_bits) == (False, True)


@dataclass(frozen=True)
class _Invocation:
    config: ResolvedConfig[ConfigFile]


def test_bad_sync_ignores_are_a_configuration_error_naming_the_file(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    (repo / ".agents").mkdir(parents=True)
    config_file = repo / ".agents" / "config.toml"
    config_file.write_text('sync-ignores = ["src/**/gen"]\n')
    env = {"HOME": str(tmp_path), "AH_HOME": str(tmp_path / "ah"), "PATH": os.environ["PATH"]}
    invocation = _Invocation(load_config(cwd=repo, env=env))
    links = FleetLinks([], connector=None, leader_root=repo)  # type: ignore[arg-type]
    with pytest.raises(CliError) as failure:
        asyncio.run(fence_selected(invocation, links, ["lin-a"], cache_root=tmp_path / "c"))
    assert failure.value.exit_code is ExitCode.CONFIGURATION
    assert str(config_file) in str(failure.value) and "'**'" in str(failure.value)
    with pytest.raises(ValueError, match="empty selection"):
        asyncio.run(fence_selected(invocation, links, [], cache_root=tmp_path / "c"))


def test_sync_engine_setting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ah_fleetctl.agent_proto import ThinDefaults, ThinRunRequest
    from ah_fleetctl.thin_fence import fence_fallback_reason

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", str(bin_dir))
    assert [engine_for(s) for s in (None, "auto", "rsync")] == ["rsync"] * 3
    with pytest.raises(ValueError, match="no 'mutagen' binary on PATH"):
        engine_for("mutagen")

    repo = tmp_path / "repo"
    (repo / ".agents").mkdir(parents=True)
    config_file = repo / ".agents" / "config.toml"
    config_file.write_text('sync-engine = "mutagen"\n')
    env = {"HOME": str(tmp_path), "AH_HOME": str(tmp_path / "ah"), "PATH": str(bin_dir)}
    with pytest.raises(CliError) as failure:
        configured_engine(load_config(cwd=repo, env=env))
    assert failure.value.exit_code is ExitCode.CONFIGURATION
    assert f"sync-engine = 'mutagen' (repo {config_file})" in str(failure.value)
    # The agent hands such a fence back to the full CLI, which names the file.
    defaults = ThinDefaults(
        runs_base=str(tmp_path), sync_engine="mutagen", fence_timeout_s=5.0, cache_root="/c"
    )
    request = ThinRunRequest(
        version=1, args=[], cwd=str(repo), colour=False, defaults=defaults, path=str(bin_dir)
    )
    assert fence_fallback_reason(request) == (
        "sync-engine: no 'mutagen' binary on PATH (the full CLI names the file)"
    )

    (bin_dir / "mutagen").write_text("#!/bin/sh\n")
    (bin_dir / "mutagen").chmod(0o755)
    assert configured_engine(load_config(cwd=repo, env=env)) == "mutagen"
    assert fence_fallback_reason(request) is None
    assert [engine_for(s) for s in ("auto", "rsync")] == ["mutagen", "rsync"]


def test_the_table_names_every_host_and_the_snapshot() -> None:
    metadata = FenceMetadata(
        snapshot_id="snap-" + "c" * 32,
        hosts={
            "lin-a": FenceHostResult(state=FenceHostState.CONSISTENT, took_ms=120),
            "lin-b": FenceHostResult(
                state=FenceHostState.TIMEOUT, took_ms=3001, detail="no answer within 3s"
            ),
        },
        started_ms=1,
        took_ms=3010,
    )
    lines = _render(metadata, "rsync").splitlines()
    assert lines[0].split() == ["HOST", "STATE", "TOOK", "DETAIL"]
    assert lines[1].split() == ["lin-a", "consistent", "120", "ms"]
    assert lines[2].split()[:4] == ["lin-b", "timeout", "3001", "ms"]
    assert lines[2].endswith("no answer within 3s")
    assert lines[3] == f"snapshot {metadata.snapshot_id}: 1 of 2 hosts consistent (rsync, 3010 ms)"


def test_fence_cli_usage_and_selection_errors(cli: Cli, api: RunningApi) -> None:
    helped = cli("fence", "--help")
    assert helped.returncode == 0 and "consistent" in helped.stdout
    bad = cli("fence", "--timeout", "soon", env=api.env())
    assert bad.returncode == ExitCode.USAGE, bad
    assert "--timeout" in bad.stderr
    empty = cli("fence", "--tag", "pool=nowhere", env=api.env())
    assert empty.returncode == ExitCode.VALIDATION, empty
    assert "pool=nowhere" in empty.stderr
    as_json = cli("fence", "--json", "--host", "ghost", env=api.env())
    assert as_json.returncode == ExitCode.VALIDATION, as_json
    assert "ghost" in as_json.json()["error"]["message"]


def _manifest(rows: list[tuple[str, str, str]]) -> Manifest:
    return Manifest.from_tuples([[path, kind, 0, len(data), data] for path, kind, data in rows])


def test_changed_paths_lists_what_to_send_and_the_top_of_what_to_delete() -> None:
    proven = _manifest(
        [
            ("keep.txt", "f", "k"),
            ("edit.txt", "f", "old"),
            ("gone-dir", "d", ""),
            ("gone-dir/a.txt", "f", "a"),
            ("gone-dir/sub", "d", ""),
            ("gone-dir/sub/b.txt", "f", "b"),
            ("dir-to-file", "d", ""),
            ("dir-to-file/c.txt", "f", "c"),
            ("link", "l", "keep.txt"),
        ]
    )
    wanted = _manifest(
        [
            ("keep.txt", "f", "k"),
            ("edit.txt", "f", "new"),
            ("dir-to-file", "f", "now a file"),
            ("link", "l", "edit.txt"),
            ("new-dir", "d", ""),
            ("new-dir/n.txt", "f", "n"),
        ]
    )
    assert changed_paths(proven, wanted) == [
        "dir-to-file",
        "edit.txt",
        "gone-dir",
        "link",
        "new-dir",
        "new-dir/n.txt",
    ]
    assert changed_paths(wanted, wanted) == []


def test_verified_hosts_round_trip_and_invalidation(tmp_path: Path) -> None:
    root = tmp_path / "ws"
    root.mkdir()
    (root / "a.txt").write_text("a\n")
    snapshot = take_snapshot(root, [])
    linux = FenceTarget(name="l", alias="ah-l", workspace="/ws", os=OsKind.LINUX)
    windows = FenceTarget(name="w", alias="ah-w", workspace="C:/ws", os=OsKind.WINDOWS)
    targets = {"l": linux, "w": windows}
    store = VerifiedHosts(tmp_path / "cache")
    assert store.manifest_for("l", linux, ()) is None
    ok = FenceHostResult(state=FenceHostState.CONSISTENT, took_ms=1)
    store.update(snapshot, {"l": ok, "w": ok}, targets, ())

    again = VerifiedHosts(tmp_path / "cache")
    assert again.manifest_for("l", linux, ()) == snapshot.manifest
    assert again.manifest_for("w", windows, ()) == snapshot.manifest
    # A proof holds only for the same workspace and ignores.
    assert again.manifest_for("l", linux, ("dist",)) is None
    moved = FenceTarget(name="l", alias="ah-l", workspace="/elsewhere", os=OsKind.LINUX)
    assert again.manifest_for("l", moved, ()) is None

    failed = FenceHostResult(state=FenceHostState.ERROR, took_ms=1, detail="x")
    (root / "a.txt").write_text("b\n")
    newer = take_snapshot(root, [])
    again.update(newer, {"l": ok, "w": failed}, targets, ())
    last = VerifiedHosts(tmp_path / "cache")
    assert last.manifest_for("w", windows, ()) is None
    assert last.manifest_for("l", linux, ()) == newer.manifest
    kept = sorted(p.stem for p in (tmp_path / "cache" / "manifests").iterdir())
    assert kept == [newer.id]  # the old snapshot's manifest is no longer named
    (tmp_path / "cache" / "verified.json").write_text("{broken")
    assert VerifiedHosts(tmp_path / "cache").manifest_for("l", linux, ()) is None
