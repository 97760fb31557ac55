"""Access point side: open a tunnel to a follower's destination, fast path first.

`TunnelBroker.open(follower, port)` returns an `OpenedTunnel` (a blocking socket the CONNECT
listener splices with its client), trying its `methods` in order:

* ``"data"`` — a ``DialData`` RPC makes the follower dial a TLS data connection back to the
  access point (`ah_connectivity.data_channel`); hundreds of MB/s.
* ``"quic"`` — an ``OpenTcp`` tunnel stream on the follower's QUIC connection; an asyncio
  task bridges it onto one end of a socketpair, the other end is what gets spliced.

It moves to the next method only when one is unavailable (the follower could not dial back,
or does not know ``DialData``); a refusal (not allow-listed, unreachable) or a timeout ends
the attempt, since the next method would meet the same answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import socket
import threading
from collections.abc import Callable, Sequence
from typing import Literal

from loguru import logger

from ah_connectivity.data_channel import DataChannelHub
from ah_connectivity.quic import (
    FollowerConnection,
    RpcConnectionLost,
    RpcError,
    RpcTimeout,
    bridge_tunnel,
)
from ah_connectivity.splice import SpliceEnd
from ah_connectivity.tunnel import (
    OpenedTunnel,
    TunnelRefused,
    TunnelTimeout,
    TunnelUnavailable,
)
from ah_domain_types import DialData, OpenTcpErr, OpenTcpOk, TunnelErrorCode

__all__ = ["BrokerMethod", "TunnelBroker"]

BrokerMethod = Literal["data", "quic"]

_log = logger.bind(component="ah-connectivity.broker")
_SOCKETPAIR_BUFFER = 1024 * 1024


class _FallBack(Exception):
    """This method is unavailable for this tunnel; try the next one."""


class TunnelBroker:
    """Opens tunnels on the followers connected to this access point."""

    def __init__(
        self,
        lookup: Callable[[str], FollowerConnection | None],
        *,
        data_hub: DataChannelHub | None = None,
        methods: Sequence[BrokerMethod] = ("data", "quic"),
        dst_host: str = "127.0.0.1",
        timeout_s: float = 10.0,
    ) -> None:
        """`lookup(name)` gives the follower's live connection (e.g. `ControlServer.follower`).

        `dst_host` is the host every tunnel asks the follower for: port 22 there means the
        follower's own sshd (see `TunnelPolicy`).
        """
        if not methods or any(m not in ("data", "quic") for m in methods):
            raise ValueError(f"methods must be a non-empty list of 'data'/'quic', got {methods!r}")
        if "data" in methods and data_hub is None:
            raise ValueError("the 'data' method needs a data_hub")
        self.lookup = lookup
        self.data_hub = data_hub
        self.methods = tuple(methods)
        self.dst_host = dst_host
        self.timeout_s = timeout_s
        self._bridges: set[asyncio.Task[tuple[int, int]]] = set()
        self.opened: dict[str, int] = {"data": 0, "quic": 0}
        """Tunnels opened so far per method."""

    async def open(self, follower: str, port: int) -> OpenedTunnel:
        """A tunnel to `port` on `follower` (its `dst_host`), within `timeout_s`.

        Raises `TunnelUnavailable` (not connected, no method worked), `TunnelRefused`,
        `TunnelTimeout`.
        """
        conn = self.lookup(follower)
        if conn is None or not conn.connected:
            raise TunnelUnavailable(f"follower {follower!r} is not connected")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        problems: list[str] = []
        timed_out = False
        for method in self.methods:
            remaining = deadline - loop.time()
            if remaining <= 0:
                timed_out = True
                break
            tunnel_id = secrets.token_hex(8)
            try:
                async with asyncio.timeout(remaining):
                    if method == "data":
                        opened = await self._open_data(conn, port, tunnel_id, deadline)
                    else:
                        opened = await self._open_quic(conn, port, tunnel_id, remaining)
            except TimeoutError:
                timed_out = True
                break
            except _FallBack as exc:
                problems.append(f"{method}: {exc}")
                _log.info(
                    "tunnel {} to {}:{}: {} path unavailable ({}); trying the next",
                    tunnel_id,
                    follower,
                    port,
                    method,
                    exc,
                )
                continue
            self.opened[method] += 1
            return opened
        if timed_out:
            raise TunnelTimeout(
                f"follower {follower!r} did not open a tunnel to port {port} within "
                f"{self.timeout_s:g} s"
            )
        raise TunnelUnavailable(
            f"no tunnel method worked for follower {follower!r}: {'; '.join(problems)}"
        )

    async def _open_data(
        self, conn: FollowerConnection, port: int, tunnel_id: str, deadline: float
    ) -> OpenedTunnel:
        hub = self.data_hub
        if hub is None or hub.data_port is None:
            raise _FallBack("this access point has no data port")
        loop = asyncio.get_running_loop()
        pending = hub.expect(conn.name, tunnel_id)
        delivered = False
        try:
            request = DialData(
                tunnel_id=tunnel_id,
                dst=self.dst_host,
                port=port,
                data_port=hub.data_port,
                nonce=pending.nonce,
                data_host=hub.data_host,
            )
            try:
                reply = await conn.open_rpc(request, timeout=max(0.001, deadline - loop.time()))
            except RpcTimeout:
                raise TunnelTimeout(
                    f"follower {conn.name!r} did not answer DialData in time"
                ) from None
            except RpcConnectionLost as exc:
                raise TunnelUnavailable(exc.message) from None
            except RpcError as exc:
                raise _FallBack(f"follower cannot dial data connections: {exc.message}") from None
            if isinstance(reply, OpenTcpErr):
                if reply.code is TunnelErrorCode.DATA_CHANNEL_FAILED:
                    raise _FallBack(reply.message)
                raise TunnelRefused(
                    reply.code,
                    f"follower {conn.name!r} refused a tunnel to {self.dst_host}:{port}: "
                    f"{reply.message}",
                )
            if not isinstance(reply, OpenTcpOk):
                raise _FallBack(f"follower answered DialData with {type(reply).__name__}")
            try:
                async with asyncio.timeout(max(0.001, deadline - loop.time())):
                    sock, initial = await asyncio.shield(pending.future)
            except TimeoutError:
                raise _FallBack("the follower's data connection never arrived") from None
            delivered = True
            return OpenedTunnel(
                end=SpliceEnd(sock, f"follower {conn.name} (data)", initial=initial),
                method="data",
                tunnel_id=tunnel_id,
                follower=conn.name,
            )
        finally:
            if not delivered:
                hub.cancel(pending)

    async def _open_quic(
        self, conn: FollowerConnection, port: int, tunnel_id: str, timeout: float
    ) -> OpenedTunnel:
        loop = asyncio.get_running_loop()
        _reader, writer = await conn.open_tunnel(self.dst_host, port, timeout, tunnel_id=tunnel_id)
        tunnel = writer.tunnel
        thread_end, loop_end = socket.socketpair()
        for sock in (thread_end, loop_end):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SOCKETPAIR_BUFFER)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _SOCKETPAIR_BUFFER)
        try:
            pair_reader, pair_writer = await asyncio.open_connection(sock=loop_end)
        except BaseException:
            thread_end.close()
            loop_end.close()
            tunnel.abort()
            raise
        reset_flag = threading.Event()

        def reset_socket() -> None:
            reset_flag.set()
            pair_writer.transport.abort()

        task = asyncio.ensure_future(
            bridge_tunnel(tunnel, pair_reader, pair_writer, reset_socket=reset_socket)
        )
        self._bridges.add(task)
        task.add_done_callback(self._bridges.discard)

        def on_abort() -> None:
            with contextlib.suppress(RuntimeError):  # the loop is closed
                loop.call_soon_threadsafe(tunnel.abort)

        return OpenedTunnel(
            end=SpliceEnd(
                thread_end,
                f"follower {conn.name} (quic)",
                eof_means_reset=reset_flag,
                on_abort=on_abort,
            ),
            method="quic",
            tunnel_id=tunnel_id,
            follower=conn.name,
        )

    async def close(self) -> None:
        """Abort every QUIC tunnel bridge still running."""
        for task in list(self._bridges):
            task.cancel()
        if self._bridges:
            await asyncio.gather(*self._bridges, return_exceptions=True)
