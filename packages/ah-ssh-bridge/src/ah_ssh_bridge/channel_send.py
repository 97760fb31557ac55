"""Send EOF and data on a paramiko channel without racing the channel's close.

paramiko checks ``closed`` under the channel lock but sends *after* releasing it, and its
transport thread answers the server's CHANNEL_CLOSE the same way. A packet built just
before that close can therefore reach sshd after our CLOSE. sshd frees a channel as soon as
both CLOSEs have crossed, and for data or EOF naming a freed channel it drops the whole
connection ("data packet referred to nonexistent channel 2"): one command that exits
without reading its stdin took every other command on the transport down with it.

The functions here check and send while holding the channel lock, so a packet either
leaves before the close reply is even built or is not sent at all. paramiko releases the
channel lock before sending because a send waits out any key exchange, and the transport
thread may need the channel lock to get through one; so these wait for the end of a key
exchange first and hold the transport's clear-to-send lock across the send, as paramiko's
own ``_send_user_message`` does, and never wait for anything while holding the channel lock.

This leans on paramiko internals (``lock``, ``closed``, ``eof_sent``, the send window, the
clear-to-send event and lock); the stdin tests in ``tests/test_transport.py`` break if
they move.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

import paramiko  # type: ignore[import-untyped]
from paramiko.common import cMSG_CHANNEL_DATA  # type: ignore[import-untyped]

# paramiko's own headroom under the peer's maximum packet size for the message framing.
_PACKET_HEADROOM = 64


def send_eof(channel: Any) -> bool:
    """Send EOF on ``channel`` unless it is closed or EOF went out already.

    Returns whether the channel was still open for writing.
    """
    return _send_locked(channel, _build_eof, None) >= 0


def send_data(channel: Any, data: bytes | memoryview, timeout: float | None = None) -> int:
    """Send up to ``len(data)`` bytes on ``channel``; how many went out.

    Waits for send window as ``Channel.send`` does; 0 means the channel is closed or its
    write side is shut (the command exited without reading all of its stdin).

    Raises:
        TimeoutError: no send window opened within ``timeout`` seconds.
    """
    if not data:
        return 0
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        # Unlocked peek first: a small frame on a channel with window (the usual case) goes
        # straight to the locked send, which checks again.
        if channel.out_window_size == 0 and not _wait_for_window(channel, deadline):
            return 0
        sent = _send_locked(channel, _build_data, data)
        if sent != 0:
            return max(sent, 0)


def send_all(channel: Any, data: bytes | memoryview, timeout: float | None = None) -> bool:
    """Send all of ``data``; False if the channel ended first (nothing more is sent)."""
    while data:
        sent = send_data(channel, data, timeout)
        if sent == 0:
            return False
        data = memoryview(data)[sent:]
    return True


def _build_eof(channel: Any, _: None) -> tuple[paramiko.Message | None, int]:
    return channel._send_eof(), 1  # no message if EOF went out already


def _build_data(channel: Any, data: bytes | memoryview) -> tuple[paramiko.Message | None, int]:
    if channel.eof_sent:
        return None, -1
    # Only one thread sends data on a channel, so the window only grew since the caller
    # saw it open; it is 0 again only if the channel ended meanwhile.
    size = min(len(data), channel.out_window_size, channel.out_max_packet_size - _PACKET_HEADROOM)
    if size <= 0:
        return None, 0
    channel.out_window_size -= size
    message = paramiko.Message()
    message.add_byte(cMSG_CHANNEL_DATA)
    message.add_int(channel.remote_chanid)
    chunk = data if size == len(data) else data[:size]
    # bytes, not a memoryview: paramiko's asbytes() takes a memoryview only after two
    # exceptions (a few microseconds on every frame).
    message.add_string(chunk.tobytes() if isinstance(chunk, memoryview) else chunk)
    return message, size


def _wait_for_window(channel: Any, deadline: float | None) -> bool:
    """Wait, under the channel lock only, until the peer grants send window.

    False when the channel closed or its write side was shut first.
    """
    transport = channel.transport
    with channel.lock:
        while channel.out_window_size == 0:
            if channel.closed or channel.eof_sent or not transport.is_active():
                return False
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise TimeoutError("no SSH send window opened in time")
            # paramiko notifies out_buffer_cv on window adjust and on close; the cap only
            # re-checks a transport that died without closing its channels yet.
            channel.out_buffer_cv.wait(0.5 if remaining is None else min(remaining, 0.5))
        return not (channel.closed or channel.eof_sent)


_T = TypeVar("_T")


def _send_locked(
    channel: Any,
    build: Callable[[Any, _T], tuple[paramiko.Message | None, int]],
    argument: _T,
) -> int:
    """Build and send one message with the channel lock held across check and send.

    ``build(channel, argument)`` runs under the channel lock while the channel is open and
    returns the message to send (None: nothing) and the result to return. Returns -1 when
    the channel (or the connection) is closed.
    """
    transport = channel.transport
    clear_to_send = transport.clear_to_send
    started = 0.0
    while True:
        # Wait out a key exchange without holding any lock, as _send_user_message does.
        if not clear_to_send.is_set():
            if not started:
                started = time.monotonic()
            elif time.monotonic() > started + transport.clear_to_send_timeout:
                raise paramiko.SSHException("Key-exchange timed out waiting for key negotiation")
            clear_to_send.wait(0.1)
        if not transport.active:
            return -1
        with transport.clear_to_send_lock:
            if clear_to_send.is_set():
                with channel.lock:
                    if channel.closed:
                        return -1
                    message, result = build(channel, argument)
                    if message is not None:
                        transport._send_message(message)
                    return result
