"""A :class:`HostExecutor` over persistent SSH transports (``ah_ssh_bridge.SshTransport``).

Every job runs on the host's one transport: on its warm executor when the engine gives the
structured command (``warm=``, POSIX hosts) and the executor could start there, else on a
new exec channel. The bridge hands out *lines*
(decoded, terminator stripped, a final unterminated line at EOF) on the event loop; the
engine wants *chunks that keep their newlines*, so each line goes back with ``\\n``.

Error translation (what the engine needs to judge a host):

* no transport for the host (it was never linked) → :class:`HostUnreachable` with the
  reason the linker recorded;
* ``SshConnectionLost`` (peer gone, keepalive unanswered, transport closed) →
  :class:`HostConnectionLost`: the host is lost, its job ``unreachable``;
* ``SshConnectError`` / ``SshAuthError`` → :class:`HostUnreachable`;
* ``SshChannelError`` (the server refused a channel) stays an ordinary failure of that
  job: the host is still there.

Timeouts and cancellation are the bridge's: it kills the remote process group before the
channel closes, so a stopped job leaves nothing running on the follower.
"""

from __future__ import annotations

from collections.abc import Mapping

from ah_ssh_bridge import ExecOutcome as SshExecOutcome
from ah_ssh_bridge import (
    SshAuthError,
    SshConnectError,
    SshConnectionLost,
    SshTransport,
    WarmCommand,
)

from .engine import HostConnectionLost, HostUnreachable, OutputCallback

__all__ = ["SshExecutor"]


class SshExecutor:
    """Runs rendered commands on ``transports[host]``.

    ``unreachable`` maps hosts that have no transport to the reason (reported as the
    ``unreachable`` result's error). ``env`` is exported before every command (the adapter's
    ``env`` is usually the better place; this is for transport-level variables).

    ``warm`` runs POSIX commands on each transport's warm executor (started on a transport's
    first command, then reused). Worth it for transports that outlive one run (the leader
    agent's); for one run over fresh transports, starting 16 servers costs more CPU than
    16 exec channels, so one-shot callers pass ``warm=False``.
    """

    def __init__(
        self,
        transports: Mapping[str, SshTransport],
        *,
        unreachable: Mapping[str, str] | None = None,
        env: Mapping[str, str] | None = None,
        warm: bool = True,
    ) -> None:
        self.accepts_warm_commands = warm
        """The engine passes ``warm=`` (the structured command) along with the rendered one."""
        self._transports = transports
        self._unreachable = unreachable if unreachable is not None else {}
        self._env = dict(env) if env else None

    async def run(
        self,
        host: str,
        command: str,
        *,
        on_stdout: OutputCallback,
        on_stderr: OutputCallback,
        timeout: float | None,
        warm: WarmCommand | None = None,
    ) -> SshExecOutcome:
        transport = self._transports.get(host)
        if transport is None:
            reason = self._unreachable.get(host) or f"no SSH transport to {host}"
            raise HostUnreachable(host, reason)
        # A transport that died earlier raises SshConnectionLost at once: the host is lost.
        return await self._run(transport, command, on_stdout, on_stderr, timeout, warm)

    async def _run(
        self,
        transport: SshTransport,
        command: str,
        on_stdout: OutputCallback,
        on_stderr: OutputCallback,
        timeout: float | None,
        warm: WarmCommand | None,
    ) -> SshExecOutcome:
        host = transport.host
        try:
            return await transport.run(
                command,
                on_stdout=lambda line: on_stdout(line + "\n"),
                on_stderr=lambda line: on_stderr(line + "\n"),
                timeout=timeout,
                env=self._env,
                warm=warm,
            )
        except SshConnectionLost as exc:
            raise HostConnectionLost(host, str(exc)) from exc
        except (SshConnectError, SshAuthError) as exc:
            raise HostUnreachable(host, str(exc)) from exc
