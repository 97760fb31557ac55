"""The fence on the thin path: the leader agent fences for ``run`` (fenced, the default)
and for ``fence``, with what it keeps between invocations.

The full CLI fences in a fresh process: it imports the whole stack, links every selected
follower (an SSH handshake each), then :func:`ah_fleetctl.fencing.fence_selected` reads the
leader's stat cache and the proven-host records from disk, snapshots, syncs and digests.
Through the agent (:mod:`ah_fleetctl.thin_server` calls in here) the same
:func:`~ah_fleetctl.fencing.fence_selected` runs with:

* the agent's warm transports as the links (its path connector; never closed here: they
  serve every later invocation) and the OpenSSH ControlMasters they keep alive;
* the fence's own in-process memos, which live as long as the agent: the snapshot's stat
  cache rows (:mod:`ah_mutagen_project.snapshot`) and the proven manifests
  (:class:`~ah_fleetctl.fencing.VerifiedHosts` reads its records from the workspace's cache
  directory and finds each manifest it names already decoded), keyed by the workspace's
  cache directory — so one agent serves several workspaces, each with its own;
* one lock per leader workspace: two invocations fencing the same tree at once take turns
  (the second then usually has nothing to send) instead of racing their ``rsync --delete``
  into the same follower directories;
* per leader workspace, the fence's warm digest sessions when this build's fence has them
  (``ah_fleetctl.fencing.keep_digest_sessions``: one digest server per follower that keeps
  the follower's tree in memory), handed to each invocation's links and ended when the
  agent exits (:func:`close_workspaces`). Without them every fence digests one-shot.

Same semantics as the full CLI, decided by the invoking CLI's configuration, which the
thin index recorded (:class:`~ah_fleetctl.agent_proto.ThinDefaults`): ``sync-ignores``
(the repo layer included), ``sync-engine``, ``timeouts.fence``, ``session`` and the cache
directory. What the agent cannot serve identically is handed back to the full CLI before
anything ran (:func:`fence_fallback_reason`): a ``PATH`` other than the agent's (``rsync``,
``ssh`` and ``mutagen`` are found on it), an index entry without the fence settings,
``sync-ignores`` the fence would reject or a ``sync-engine`` that cannot be used (the full
CLI names the file at fault).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from ah_config import CliError, ResolvedConfig
from ah_domain_types import (
    ConfigFile,
    DomainValidationError,
    ErrorBody,
    ErrorEnvelope,
    ExitCode,
    FenceMetadata,
)
from ah_mutagen_project import IgnorePatternError, user_ignores

from .agent_proto import ThinDefaults, ThinOutReply, ThinReply, ThinRunRequest, ThinStartedReply
from .dataplane import FleetLinks

if TYPE_CHECKING:
    from .agent import LeaderAgent
    from .fencing import FenceEmit

__all__ = [
    "AgentLinks",
    "WorkspaceState",
    "close_workspaces",
    "fence_failures",
    "fence_fallback_reason",
    "fence_for_run",
    "thin_fence_command",
    "workspace_state",
]


@dataclass(frozen=True)
class _Invocation:
    """What :func:`~ah_fleetctl.fencing.fence_selected` needs of an invocation: its
    configuration — here the invoking CLI's fence settings, as the thin index recorded."""

    config: ResolvedConfig[ConfigFile]


def _invocation(defaults: ThinDefaults) -> _Invocation:
    typed = ConfigFile(
        sync_ignores=defaults.sync_ignores,
        sync_engine=cast(Any, defaults.sync_engine),  # checked by fence_fallback_reason
        session=defaults.session,
    )
    return _Invocation(ResolvedConfig(schema=ConfigFile, typed=typed, raw={}, origins={}))


def fence_fallback_reason(request: ThinRunRequest) -> str | None:
    """Why the agent must not fence for ``request`` (the full CLI fences instead), or None."""
    defaults = request.defaults
    if defaults.fence_timeout_s is None or defaults.cache_root is None:
        return "the thin index has no fence settings"
    if request.path != os.environ.get("PATH"):
        return "the CLI's PATH is not the agent's (the fence runs rsync, ssh, mutagen)"
    try:
        user_ignores(defaults.sync_ignores)
    except IgnorePatternError as exc:
        return f"sync-ignores: {exc} (the full CLI names the file)"
    from .fencing import engine_for

    try:
        engine_for(defaults.sync_engine)
    except ValueError as exc:
        return f"sync-engine: {exc} (the full CLI names the file)"
    return None


_INTERRUPTED = 130


class AgentLinks(FleetLinks):
    """A selection's links on the agent's transports: the agent's path connector owns them
    and they serve every later invocation, so closing these links (``FleetLinks.connect``
    does when it is cancelled, e.g. by Ctrl-C in the CLI) only forgets them."""

    async def close(self) -> None:
        self.transports.clear()


@dataclass
class WorkspaceState:
    """What the agent keeps per leader workspace between fences (the snapshot's stat cache
    and the proven manifests are kept by the fence's own in-process memos)."""

    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    """Serialises this agent's fences of the workspace."""
    digest_sessions: Any = None
    """The fence's warm digest sessions of this workspace, when this build's fence keeps
    them (``ah_fleetctl.fencing.keep_digest_sessions``): handed to each invocation's links."""

    def keep_sessions(self, links: FleetLinks) -> None:
        """Give ``links`` this workspace's warm digest sessions (made on first use), so the
        fence asks running digest servers instead of starting a digest per host."""
        from . import fencing

        keep = getattr(fencing, "keep_digest_sessions", None)
        if keep is None:
            return  # this build's fence has no warm sessions: one-shot digests
        if self.digest_sessions is None:
            self.digest_sessions = keep(links)
        else:
            setattr(links, "digest_sessions", self.digest_sessions)  # noqa: B010 - see keep

    async def close(self) -> None:
        sessions, self.digest_sessions = self.digest_sessions, None
        if sessions is not None:
            with contextlib.suppress(Exception):
                await sessions.close()


_workspaces: dict[Path, WorkspaceState] = {}


def workspace_state(leader_root: Path) -> WorkspaceState:
    """This agent's state for the leader workspace ``leader_root`` (created on first use)."""
    state = _workspaces.get(leader_root)
    if state is None:
        state = _workspaces[leader_root] = WorkspaceState()
    return state


async def close_workspaces() -> None:
    """End what the agent kept for its workspaces (the warm digest sessions); at exit."""
    states = list(_workspaces.values())
    _workspaces.clear()
    for state in states:
        await state.close()


async def _fence(
    links: FleetLinks,
    hosts: list[str],
    defaults: ThinDefaults,
    *,
    timeout: float,
    emit: FenceEmit | None,
    engine: Any = None,
) -> FenceMetadata:
    from .fencing import fence_selected

    assert defaults.cache_root is not None
    state = workspace_state(Path(links.leader_root))
    async with state.lock:
        state.keep_sessions(links)
        return await fence_selected(
            _invocation(defaults),
            links,
            hosts,
            timeout=timeout,
            emit=emit,
            engine=engine,
            cache_root=Path(defaults.cache_root),
        )


def fence_failures(links: FleetLinks, metadata: FenceMetadata) -> dict[str, str]:
    """Linked host → why it may not run (its fence is not ``consistent``)."""
    failed: dict[str, str] = {}
    for name in links.linked:
        result = metadata.hosts.get(name)
        if result is None:
            failed[name] = f"fence: no result for {name} (snapshot {metadata.snapshot_id})"
        elif not result.consistent:
            detail = f": {result.detail}" if result.detail else ""
            failed[name] = f"fence {result.state.value} (snapshot {metadata.snapshot_id}){detail}"
    return failed


async def fence_for_run(
    links: FleetLinks, defaults: ThinDefaults, emit: FenceEmit | None
) -> dict[str, str]:
    """A fenced run's link-and-fence step, as the full CLI's: link every selected follower
    (the agent's transports), fence the linked ones; returns host → why it gets no
    command. Raises :class:`~ah_config.CliError` when the leader cannot be snapshotted."""
    await links.connect()
    if not links.linked:
        return {}
    assert defaults.fence_timeout_s is not None
    metadata = await _fence(
        links, links.linked, defaults, timeout=defaults.fence_timeout_s, emit=emit
    )
    return fence_failures(links, metadata)


# --------------------------------------------------------------------------- ah-fleetctl fence


async def thin_fence_command(
    agent: LeaderAgent,
    request: ThinRunRequest,
    send: Callable[[ThinReply], None],
    reader: asyncio.StreamReader,
) -> int:
    """``ah-fleetctl fence ARGS`` served by the agent: what the full command prints (the
    per-host table, or the ``--json`` fence document), events and exit code."""
    from ah_mutagen_project import describe_fence_failure

    from .commands.fence import _render, fence_command
    from .commands.fleet import select_followers
    from .fencing import configured_engine
    from .thin_server import (
        _Fallback,
        _json_encoder,
        parse_thin_request,
        selection_and_session,
        send_error,
        start_event_sink,
    )

    params = parse_thin_request(request, fence_command)
    reason = fence_fallback_reason(request)
    if reason is not None:
        raise _Fallback(reason)
    defaults = request.defaults
    json_mode = bool(params["json_output"]) or defaults.json

    try:
        selector, session_id = selection_and_session(params, defaults)
    except (CliError, DomainValidationError) as exc:
        return send_error(send, exc, json_mode)
    assert defaults.fence_timeout_s is not None
    limit = params["timeout_s"] if params["timeout_s"] is not None else defaults.fence_timeout_s
    try:
        fleet = await agent._followers_named([])
    except Exception as exc:  # the full CLI asks the access point itself and reports it
        raise _Fallback(f"follower list: {exc}") from None
    try:
        selected = select_followers(selector, fleet)
    except (CliError, DomainValidationError) as exc:
        return send_error(send, exc, json_mode)
    engine = configured_engine(_invocation(defaults).config)  # usable: see the fallback
    loop = asyncio.get_running_loop()
    events, _ = start_event_sink(agent, defaults, send, session_id)
    send(ThinStartedReply())
    links = AgentLinks(
        selected,
        agent.connector,  # type: ignore[arg-type]
        connect_timeout=agent.app.connect_timeout_s(),
        leader_root=request.cwd,
        workspaces=defaults.workspaces,
    )
    fencing = loop.create_task(
        _link_and_fence(links, defaults, limit, events.emit if events is not None else None, engine)
    )

    async def watch_client() -> None:
        # A cancel frame (Ctrl-C in the CLI) or the CLI going away stops the fence.
        with contextlib.suppress(OSError, ConnectionError, asyncio.IncompleteReadError):
            while True:
                header = await reader.readexactly(4)
                await reader.readexactly(int.from_bytes(header, "big"))
                break
        fencing.cancel()

    watcher = loop.create_task(watch_client())
    try:
        metadata = await fencing
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if current is None or not current.cancelling():
            # What the full CLI does on Ctrl-C (ah_config's error report).
            send(ThinOutReply(fd=2, text="Interrupted.\n"))
            if json_mode:
                body = ErrorBody(kind="interrupted", message="interrupted",
                                 exit_code=_INTERRUPTED, details={})  # fmt: skip
                text = _json_encoder.encode(ErrorEnvelope(body)).decode()
                send(ThinOutReply(fd=1, text=text + "\n"))
            return _INTERRUPTED
        raise
    except (CliError, DomainValidationError) as exc:
        return send_error(send, exc, json_mode)
    finally:
        watcher.cancel()
        if events is not None:
            agent.in_background(agent.close_event_sink(events))
    if json_mode:
        send(ThinOutReply(fd=1, text=_json_encoder.encode(metadata).decode() + "\n"))
    else:
        send(ThinOutReply(fd=1, text=_render(metadata, engine) + "\n"))
    if metadata.lagging_hosts():
        send(ThinOutReply(fd=2, text=f"error: {describe_fence_failure(metadata)}\n"))
        return int(ExitCode.HOSTS_FAILED)
    return int(ExitCode.OK)


async def _link_and_fence(
    links: FleetLinks,
    defaults: ThinDefaults,
    timeout: float,
    emit: FenceEmit | None,
    engine: Any,
) -> FenceMetadata:
    await links.connect()
    return await _fence(links, links.names, defaults, timeout=timeout, emit=emit, engine=engine)
