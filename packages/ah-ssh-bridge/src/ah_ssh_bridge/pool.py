"""Follower name → its one persistent SSH transport, created on first use."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import socket
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path

from loguru import logger

from ah_ssh_bridge.errors import SshConnectionLost, SshError
from ah_ssh_bridge.transport import (
    CommandOutput,
    ExecOutcome,
    OutputCallback,
    ProbeResult,
    SshOptions,
    SshTransport,
    StdinData,
)

__all__ = ["FingerprintLookup", "SocketFactory", "SshBridge", "SshPool"]

SocketFactory = Callable[[str], Awaitable[socket.socket] | socket.socket]
"""``(follower name) -> connected socket`` along the follower's path (direct TCP, TLS
CONNECT tunnel, relay), as a coroutine or a plain function (which then runs on the event
loop, so it should not block); errors it raises propagate to :meth:`SshPool.get`."""

FingerprintLookup = Callable[[str], str]
"""``(follower name) -> SHA256:... host-key fingerprint`` the follower reported."""


class SshPool:
    """One :class:`SshTransport` per follower, dialled lazily and reused by every command.

    A transport that died is dropped and dialled again on the next use. All transports share
    one login (``username`` + private key) and :class:`SshOptions`.
    """

    def __init__(
        self,
        dial: SocketFactory,
        *,
        username: str,
        key_path: str | Path,
        fingerprint: FingerprintLookup | Mapping[str, str],
        passphrase: str | None = None,
        options: SshOptions | None = None,
    ) -> None:
        self._dial = dial
        self._username = username
        self._key_path = Path(key_path)
        self._fingerprint: FingerprintLookup = (
            fingerprint.__getitem__ if isinstance(fingerprint, Mapping) else fingerprint
        )
        self._passphrase = passphrase
        self.options = options or SshOptions()
        self._transports: dict[str, SshTransport] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._closed = False

    @property
    def names(self) -> list[str]:
        """Followers with an open transport."""
        return sorted(n for n, t in self._transports.items() if t.is_active)

    def transport(self, name: str) -> SshTransport | None:
        """The open transport to ``name``, if there is one (never dials)."""
        found = self._transports.get(name)
        return found if found is not None and found.is_active else None

    async def get(self, name: str) -> SshTransport:
        """The transport to ``name``, dialling and logging in on first use (once, even when
        many callers ask at the same time)."""
        self._check_open(name)
        lock = self._locks.setdefault(name, asyncio.Lock())
        async with lock:
            self._check_open(name)
            existing = self._transports.get(name)
            if existing is not None:
                if existing.is_active:
                    return existing
                del self._transports[name]
                await existing.close()
            try:
                expected = self._fingerprint(name)
            except KeyError:
                raise SshError(
                    name, f"no host-key fingerprint known for {name}; cannot verify its sshd"
                ) from None
            dialled = self._dial(name)
            sock = await dialled if inspect.isawaitable(dialled) else dialled
            transport = await SshTransport.open(
                sock,
                host=name,
                username=self._username,
                key_path=self._key_path,
                expected_fingerprint=expected,
                passphrase=self._passphrase,
                options=self.options,
            )
            if self._closed:
                await transport.close()
                self._check_open(name)
            self._transports[name] = transport
            logger.debug("ssh pool: transport to {} ready", name)
            return transport

    async def run(
        self,
        name: str,
        command: str,
        *,
        on_stdout: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
        timeout: float | None = None,
        env: Mapping[str, str] | None = None,
        stdin: StdinData | None = None,
        cancel: asyncio.Event | None = None,
    ) -> ExecOutcome:
        """:meth:`SshTransport.run` on ``name``'s transport."""
        transport = await self.get(name)
        return await transport.run(
            command,
            on_stdout=on_stdout,
            on_stderr=on_stderr,
            timeout=timeout,
            env=env,
            stdin=stdin,
            cancel=cancel,
        )

    async def capture(
        self, name: str, command: str, *, timeout: float | None = None
    ) -> CommandOutput:
        return await (await self.get(name)).capture(command, timeout=timeout)

    async def probe(self, name: str, timeout: float = 1.0) -> ProbeResult:
        """Probe ``name`` (dialling if needed); never raises."""
        try:
            transport = await self.get(name)
        except (SshError, OSError) as exc:
            return ProbeResult(False, None, None, None, str(exc))
        return await transport.probe(timeout)

    async def discard(self, name: str) -> None:
        """Close and forget ``name``'s transport (e.g. after its path degraded)."""
        transport = self._transports.pop(name, None)
        if transport is not None:
            await transport.close()

    async def close(self) -> None:
        """Close every transport. Idempotent; later use raises SshConnectionLost."""
        self._closed = True
        transports = list(self._transports.values())
        self._transports.clear()
        for transport in transports:
            with contextlib.suppress(Exception):
                await transport.close()

    def _check_open(self, name: str) -> None:
        if self._closed:
            raise SshConnectionLost(name, f"the SSH pool is closed; cannot reach {name}")

    async def __aenter__(self) -> SshPool:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


SshBridge = SshPool
"""The leader's SSH bridge: the same thing under the name the spec uses."""
