"""The fence: sync every selected follower, then prove each holds the leader's snapshot.

Per host: sync → remote digest → ``consistent`` iff the follower's content id equals the
snapshot id. On a mismatch, one forced resync (``force=True``: rsync ``--checksum``) and a
digest *with* the manifest; still different → ``error``, naming the differing paths. A
host that does not finish by the fence deadline → ``timeout``; a sync or digest that fails →
``error`` with the failure. All hosts run in parallel; events ``fenceStarted`` then
``fenceResult``.

:class:`FencePlan` is the sans-I/O core (it is told what happened and answers with the next
step per host); :func:`run_fence` is the asyncio shell that performs the steps through the
``sync`` and ``digest`` callables.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol, TypeAlias

import msgspec

from ah_domain_types import (
    ExitCode,
    FenceHostResult,
    FenceHostState,
    FenceMetadata,
    FenceResultEvent,
    FenceStartedEvent,
)
from ah_mutagen_project.remote_digest import RemoteDigest
from ah_mutagen_project.snapshot import Manifest, Snapshot

__all__ = [
    "DigestFn",
    "DigestStep",
    "EmitFn",
    "FenceError",
    "FencePlan",
    "FenceStep",
    "HostVerdict",
    "SyncFn",
    "SyncStep",
    "describe_fence_failure",
    "require_consistent",
    "run_fence",
]


class SyncStep(msgspec.Struct, frozen=True):
    """Sync ``host``; ``force`` asks for a full-content comparison (the repair resync)."""

    host: str
    force: bool


class DigestStep(msgspec.Struct, frozen=True):
    """Digest ``host``'s tree; ``with_manifest`` when differing paths must be named."""

    host: str
    with_manifest: bool


class HostVerdict(msgspec.Struct, frozen=True):
    host: str
    state: FenceHostState
    detail: str | None = None


FenceStep: TypeAlias = SyncStep | DigestStep | HostVerdict


class SyncFn(Protocol):
    """Sync the leader's tree to ``host`` within ``timeout`` seconds (raise on failure)."""

    def __call__(self, host: str, *, force: bool, timeout: float) -> Awaitable[object]: ...


class DigestFn(Protocol):
    """Digest ``host``'s tree within ``timeout`` seconds."""

    def __call__(
        self, host: str, *, with_manifest: bool, timeout: float
    ) -> Awaitable[RemoteDigest]: ...


EmitFn: TypeAlias = Callable[[FenceStartedEvent | FenceResultEvent], Awaitable[None] | None]

_STAGES = {
    (SyncStep, False): "sync",
    (SyncStep, True): "forced resync",
    (DigestStep, False): "digest",
    (DigestStep, True): "digest after resync",
}


class FencePlan:
    """Per-host fence state machine, free of I/O.

    ``begin(host)`` → :class:`SyncStep`; report completions with ``synced``/``digested``,
    failures with ``failed``/``timed_out``; each answers with the host's next step, a
    :class:`HostVerdict` when the host is done.
    """

    def __init__(self, snapshot_id: str, hosts: Sequence[str], manifest: Manifest | None = None):
        if isinstance(hosts, str):
            raise TypeError("hosts must be a sequence of host names, not one string")
        if not hosts:
            raise ValueError("fence: no hosts to fence (an empty selection is an error)")
        duplicates = sorted({h for h in hosts if list(hosts).count(h) > 1})
        if duplicates:
            raise ValueError(f"fence: hosts listed more than once: {', '.join(duplicates)}")
        self.snapshot_id = snapshot_id
        self.hosts: tuple[str, ...] = tuple(hosts)
        self.manifest = manifest
        self._step: dict[str, FenceStep] = {}
        self._forced: set[str] = set()
        self._no_exec_id: str | None = None

    def _set(self, step: FenceStep) -> FenceStep:
        self._step[step.host] = step
        return step

    def _current(self, host: str, expected: type[SyncStep] | type[DigestStep]) -> FenceStep:
        if host not in self.hosts:
            raise KeyError(f"fence: {host!r} is not one of the fenced hosts {list(self.hosts)}")
        step = self._step.get(host)
        if not isinstance(step, expected):
            raise RuntimeError(
                f"fence: host {host!r} reported {expected.__name__} completion while at {step!r}"
            )
        return step

    def begin(self, host: str) -> FenceStep:
        if host not in self.hosts:
            raise KeyError(f"fence: {host!r} is not one of the fenced hosts {list(self.hosts)}")
        if host in self._step:
            raise RuntimeError(f"fence: host {host!r} already begun")
        return self._set(SyncStep(host, force=False))

    def synced(self, host: str) -> FenceStep:
        self._current(host, SyncStep)
        return self._set(DigestStep(host, with_manifest=host in self._forced))

    def expected_id(self, exec_bits: bool) -> str:
        """The id a follower's digest must have: the snapshot id, or for a follower digested
        without executable bits (``--no-exec-bit``: Windows, whose filesystems have none) the
        id of the same manifest with the bits left out."""
        if exec_bits:
            return self.snapshot_id
        if self.manifest is None:
            raise ValueError(
                "fence: a digest without executable bits needs the snapshot's manifest"
            )
        if self._no_exec_id is None:
            self._no_exec_id = self.manifest.content_id(exec_bits=False)
        return self._no_exec_id

    def digested(self, host: str, remote: RemoteDigest) -> FenceStep:
        self._current(host, DigestStep)
        if remote.id == self.expected_id(remote.exec_bits):
            detail = "repaired by a forced resync" if host in self._forced else None
            return self._set(HostVerdict(host, FenceHostState.CONSISTENT, detail))
        if host not in self._forced:
            self._forced.add(host)
            return self._set(SyncStep(host, force=True))
        expected = self.expected_id(remote.exec_bits)
        detail = f"tree is {remote.id}, snapshot is {expected} after a forced resync"
        if self.manifest is not None and remote.manifest is not None:
            diff = self.manifest.diff(remote.manifest, exec_bits=remote.exec_bits)
            detail += f"; {diff.describe()}"
        return self._set(HostVerdict(host, FenceHostState.ERROR, detail))

    def stage(self, host: str) -> str:
        step = self._step.get(host)
        if step is None:
            return "not started"
        if isinstance(step, HostVerdict):
            return "done"
        flag = step.force if isinstance(step, SyncStep) else step.with_manifest
        return _STAGES[(type(step), flag)]

    def failed(self, host: str, message: str) -> HostVerdict:
        verdict = HostVerdict(host, FenceHostState.ERROR, f"{self.stage(host)} failed: {message}")
        self._set(verdict)
        return verdict

    def timed_out(self, host: str, timeout: float, cause: str | None = None) -> HostVerdict:
        """``cause``: the message of a step's own deadline error (e.g. which mutagen or rsync
        call was killed), when the step gave up before the fence deadline itself."""
        detail = f"no answer within the {timeout:g}s fence deadline (during {self.stage(host)})"
        verdict = HostVerdict(
            host, FenceHostState.TIMEOUT, f"{detail}: {cause}" if cause else detail
        )
        self._set(verdict)
        return verdict

    def verdicts(self) -> dict[str, HostVerdict]:
        return {h: s for h, s in self._step.items() if isinstance(s, HostVerdict)}

    @property
    def done(self) -> bool:
        return len(self.verdicts()) == len(self.hosts)


def describe_fence_failure(metadata: FenceMetadata) -> str:
    """One message naming every host that is not consistent, and what to do about it."""
    lagging = metadata.lagging_hosts()
    if not lagging:
        return f"fence {metadata.snapshot_id}: every host is consistent"
    timed_out = [h for h in lagging if metadata.hosts[h].state is FenceHostState.TIMEOUT]
    failed = [h for h in lagging if metadata.hosts[h].state is FenceHostState.ERROR]
    parts = [
        f"fence for snapshot {metadata.snapshot_id} did not come back consistent on "
        f"{len(lagging)} of {len(metadata.hosts)} hosts"
    ]
    if timed_out:
        parts.append(f"timed out (lagging): {', '.join(timed_out)}")
    for host in timed_out:
        detail = metadata.hosts[host].detail
        if detail:
            parts.append(f"{host}: {detail}")
    for host in failed:
        parts.append(f"{host}: {metadata.hosts[host].detail or 'error'}")
    advice = "narrow the selection with --host/--tag to leave the lagging hosts out"
    if timed_out:
        advice += ", or raise the fence timeout (--timeout / timeouts.fence)"
    return "; ".join(parts) + f". To run anyway, {advice}."


class FenceError(RuntimeError):
    """Some hosts are not consistent; the message names them (see describe_fence_failure)."""

    exit_code = ExitCode.HOSTS_FAILED

    def __init__(self, metadata: FenceMetadata) -> None:
        super().__init__(describe_fence_failure(metadata))
        self.metadata = metadata

    @property
    def lagging_hosts(self) -> list[str]:
        return self.metadata.lagging_hosts()


def require_consistent(metadata: FenceMetadata) -> FenceMetadata:
    """Return ``metadata`` if every host is consistent, else raise :class:`FenceError`."""
    if metadata.lagging_hosts():
        raise FenceError(metadata)
    return metadata


async def _emit(emit: EmitFn | None, event: FenceStartedEvent | FenceResultEvent) -> None:
    if emit is None:
        return
    result = emit(event)
    if inspect.isawaitable(result):
        await result


async def run_fence(
    snapshot: Snapshot,
    hosts: Sequence[str],
    sync: SyncFn,
    digest: DigestFn,
    timeout: float,
    emit: EmitFn | None = None,
    *,
    session_id: str = "local",
    clock: Callable[[], float] = time.time,
    deadline: float | None = None,
) -> FenceMetadata:
    """Fence ``hosts`` to ``snapshot`` in parallel within ``timeout`` seconds.

    ``deadline`` (event-loop time) ends the fence earlier than ``timeout`` from now, for a
    caller whose fence began before this call (e.g. with the snapshot); messages still name
    ``timeout``, the fence timeout the user set.

    Never raises for a host's failure: each host's verdict is in the returned metadata
    (use :func:`require_consistent` to turn lagging hosts into a :class:`FenceError`).
    """
    plan = FencePlan(snapshot.id, hosts, snapshot.manifest)
    loop = asyncio.get_running_loop()
    started_ms = int(clock() * 1000)
    started = loop.time()
    end = started + timeout if deadline is None else deadline
    await _emit(
        emit,
        FenceStartedEvent(
            snapshot_id=snapshot.id, hosts=list(plan.hosts), session_id=session_id,
            ts_ms=clock() * 1000,
        ),
    )  # fmt: skip
    took: dict[str, int] = {}

    async def drive(host: str) -> None:
        host_started = loop.time()
        step = plan.begin(host)
        try:
            async with asyncio.timeout_at(end):
                while not isinstance(step, HostVerdict):
                    remaining = max(0.0, end - loop.time())
                    if isinstance(step, SyncStep):
                        await sync(host, force=step.force, timeout=remaining)
                        step = plan.synced(host)
                    else:
                        remote = await digest(
                            host, with_manifest=step.with_manifest, timeout=remaining
                        )
                        step = plan.digested(host, remote)
        except TimeoutError as exc:
            # The fence deadline's own TimeoutError has no message; a step's has (SyncTimeout,
            # MutagenTimeout...), and it says which call was killed.
            plan.timed_out(host, timeout, str(exc) or None)
        except Exception as exc:
            plan.failed(host, str(exc) or type(exc).__name__)
        took[host] = int((loop.time() - host_started) * 1000)

    await asyncio.gather(*(drive(host) for host in plan.hosts))
    verdicts = plan.verdicts()
    results = {
        host: FenceHostResult(state=verdicts[host].state, took_ms=took[host],
                              detail=verdicts[host].detail)
        for host in plan.hosts
    }  # fmt: skip
    metadata = FenceMetadata(
        snapshot_id=snapshot.id,
        hosts=results,
        started_ms=started_ms,
        took_ms=int((loop.time() - started) * 1000),
    )
    await _emit(
        emit,
        FenceResultEvent(
            snapshot_id=snapshot.id, hosts=results, session_id=session_id, ts_ms=clock() * 1000
        ),
    )
    return metadata
