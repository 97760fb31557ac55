"""Free ports and condition waits with deadlines.

Tests never sleep for a fixed time hoping something happened: they poll a condition until it
holds or a deadline passes, and the timeout error says what was awaited.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable
from typing import TypeVar

__all__ = [
    "free_tcp_port",
    "free_udp_port",
    "tcp_accepts",
    "wait_for",
    "wait_for_async",
    "wait_for_tcp",
]

_T = TypeVar("_T")


def free_tcp_port(host: str = "127.0.0.1") -> int:
    """A TCP port on `host` that was free a moment ago (the kernel's pick for port 0).

    Another process may take it before the caller binds it; callers that start a server on it
    must notice a bind failure and retry with a new port.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def free_udp_port(host: str = "127.0.0.1") -> int:
    """A UDP port on `host` that was free a moment ago (the kernel's pick for port 0)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for(
    predicate: Callable[[], _T | None],
    timeout: float,
    interval: float = 0.02,
    what: str = "condition",
) -> _T:
    """Call `predicate` until it returns a truthy value and return that value.

    A predicate typed `() -> X | None` gives an `X`, one typed `() -> bool` gives `True`.

    The predicate is always called at least once, and once more at the deadline, so a
    condition that becomes true exactly as time runs out is still seen.

    Raises:
        TimeoutError: "timed out after {timeout}s waiting for {what}".
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(min(interval, remaining))


async def wait_for_async(
    predicate: Callable[[], _T | None],
    timeout: float,
    *,
    interval: float = 0.02,
    what: str = "condition",
) -> _T:
    """:func:`wait_for` for a coroutine: the event loop runs while it waits."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(min(interval, remaining))


def tcp_accepts(host: str, port: int, connect_timeout: float = 0.5) -> bool:
    """True when a TCP connection to host:port completes right now."""
    try:
        with socket.create_connection((host, port), timeout=connect_timeout):
            return True
    except OSError:
        return False


def wait_for_tcp(host: str, port: int, timeout: float) -> None:
    """Wait until host:port accepts TCP connections.

    Raises:
        TimeoutError: naming host:port when the deadline passes first.
    """
    wait_for(
        lambda: tcp_accepts(host, port, connect_timeout=min(0.5, max(timeout, 0.05))),
        timeout,
        what=f"TCP {host}:{port} to accept connections",
    )
