"""Agent Harbor fleet sync and fence.

Leader snapshots (:mod:`.snapshot`), the follower digest (:mod:`.digest_script`,
``ah-tree-digest``, :mod:`.remote_digest`), the Mutagen project file and lifecycle
(:mod:`.mutagen`), the rsync-over-SSH engine (:mod:`.rsync_engine`) and the fence
(:mod:`.fence`).

Names are imported lazily, so ``ah_mutagen_project.digest_cli`` (run on followers) loads
only the standard library.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {
    # ignores
    "DEFAULT_SYNC_IGNORES": "ignores",
    "VCS_IGNORES": "ignores",
    "IgnorePatternError": "ignores",
    "effective_ignores": "ignores",
    "mutagen_ignore_paths": "ignores",
    "rsync_exclude_patterns": "ignores",
    "user_ignores": "ignores",
    # snapshot
    "RACY_WINDOW_S": "snapshot",
    "EntryKind": "snapshot",
    "Manifest": "snapshot",
    "ManifestDiff": "snapshot",
    "ManifestEntry": "snapshot",
    "Snapshot": "snapshot",
    "SnapshotError": "snapshot",
    "take_snapshot": "snapshot",
    # remote digest
    "RemoteDigest": "remote_digest",
    "RemoteDigestError": "remote_digest",
    "digest_script_source": "remote_digest",
    "parse_digest_output": "remote_digest",
    "remote_digest_command": "remote_digest",
    # mutagen
    "MutagenError": "mutagen",
    "MutagenFollower": "mutagen",
    "MutagenNotFound": "mutagen",
    "MutagenProject": "mutagen",
    "MutagenProjectError": "mutagen",
    "MutagenTimeout": "mutagen",
    "follower_alias": "mutagen",
    "mutagen_available": "mutagen",
    "mutagen_beta_url": "mutagen",
    "mutagen_endpoint_path": "mutagen",
    "mutagen_session_name": "mutagen",
    "render_mutagen_project": "mutagen",
    "write_mutagen_project": "mutagen",
    # processes
    "FedCommand": "_process",
    # rsync
    "RSYNC_EXIT_MEANINGS": "rsync_engine",
    "RemoteCommandError": "rsync_engine",
    "RsyncEngine": "rsync_engine",
    "RsyncError": "rsync_engine",
    "RsyncFenceDriver": "rsync_engine",
    "SshEndpoint": "rsync_engine",
    "SshTarget": "rsync_engine",
    "SyncJob": "rsync_engine",
    "SyncOutcome": "rsync_engine",
    "SyncResult": "rsync_engine",
    "SyncTimeout": "rsync_engine",
    # fence
    "DigestFn": "fence",
    "FenceError": "fence",
    "FencePlan": "fence",
    "HostVerdict": "fence",
    "SyncFn": "fence",
    "describe_fence_failure": "fence",
    "require_consistent": "fence",
    "run_fence": "fence",
}

__all__ = [
    "DEFAULT_SYNC_IGNORES",
    "RACY_WINDOW_S",
    "RSYNC_EXIT_MEANINGS",
    "VCS_IGNORES",
    "DigestFn",
    "EntryKind",
    "FedCommand",
    "FenceError",
    "FencePlan",
    "HostVerdict",
    "IgnorePatternError",
    "Manifest",
    "ManifestDiff",
    "ManifestEntry",
    "MutagenError",
    "MutagenFollower",
    "MutagenNotFound",
    "MutagenProject",
    "MutagenProjectError",
    "MutagenTimeout",
    "RemoteCommandError",
    "RemoteDigest",
    "RemoteDigestError",
    "RsyncEngine",
    "RsyncError",
    "RsyncFenceDriver",
    "Snapshot",
    "SnapshotError",
    "SshEndpoint",
    "SshTarget",
    "SyncFn",
    "SyncJob",
    "SyncOutcome",
    "SyncResult",
    "SyncTimeout",
    "describe_fence_failure",
    "digest_script_source",
    "effective_ignores",
    "follower_alias",
    "mutagen_available",
    "mutagen_beta_url",
    "mutagen_endpoint_path",
    "mutagen_ignore_paths",
    "mutagen_session_name",
    "parse_digest_output",
    "remote_digest_command",
    "render_mutagen_project",
    "require_consistent",
    "rsync_exclude_patterns",
    "run_fence",
    "take_snapshot",
    "user_ignores",
    "write_mutagen_project",
]

if TYPE_CHECKING:
    from ah_mutagen_project._process import FedCommand
    from ah_mutagen_project.fence import (
        DigestFn,
        FenceError,
        FencePlan,
        HostVerdict,
        SyncFn,
        describe_fence_failure,
        require_consistent,
        run_fence,
    )
    from ah_mutagen_project.ignores import (
        DEFAULT_SYNC_IGNORES,
        VCS_IGNORES,
        IgnorePatternError,
        effective_ignores,
        mutagen_ignore_paths,
        rsync_exclude_patterns,
        user_ignores,
    )
    from ah_mutagen_project.mutagen import (
        MutagenError,
        MutagenFollower,
        MutagenNotFound,
        MutagenProject,
        MutagenProjectError,
        MutagenTimeout,
        follower_alias,
        mutagen_available,
        mutagen_beta_url,
        mutagen_endpoint_path,
        mutagen_session_name,
        render_mutagen_project,
        write_mutagen_project,
    )
    from ah_mutagen_project.remote_digest import (
        RemoteDigest,
        RemoteDigestError,
        digest_script_source,
        parse_digest_output,
        remote_digest_command,
    )
    from ah_mutagen_project.rsync_engine import (
        RSYNC_EXIT_MEANINGS,
        RemoteCommandError,
        RsyncEngine,
        RsyncError,
        RsyncFenceDriver,
        SshEndpoint,
        SshTarget,
        SyncJob,
        SyncOutcome,
        SyncResult,
        SyncTimeout,
    )
    from ah_mutagen_project.snapshot import (
        RACY_WINDOW_S,
        EntryKind,
        Manifest,
        ManifestDiff,
        ManifestEntry,
        Snapshot,
        SnapshotError,
        take_snapshot,
    )


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'ah_mutagen_project' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"ah_mutagen_project.{module}"), name)
    globals()[name] = value
    return value
