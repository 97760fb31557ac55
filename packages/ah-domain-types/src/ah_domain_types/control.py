"""Control-plane messages between a follower and its access point.

They travel length-prefixed and msgpack-encoded over QUIC streams (framing lives in
``ah-connectivity``). ``ControlMessage`` is a union tagged by the ``type`` field.
Enrollment (``EnrollRequest``/``EnrollResponse``) goes over HTTPS instead.
"""

from __future__ import annotations

import enum
from typing import Annotated, TypeAlias

import msgspec

from .hosts import FollowerInfo
from .patterns import HostName, TagKey, TagValue

__all__ = [
    "CONTROL_MESSAGE_TYPES",
    "CONTROL_PROTOCOL_VERSION",
    "Ack",
    "ControlMessage",
    "DataChannelHello",
    "DialData",
    "EnrollRequest",
    "EnrollResponse",
    "ExecRequest",
    "ExecResult",
    "Goodbye",
    "Heartbeat",
    "Hello",
    "OpenTcp",
    "OpenTcpErr",
    "OpenTcpOk",
    "StreamError",
    "StreamErrorCode",
    "TunnelErrorCode",
    "Welcome",
    "decode_control_message",
    "encode_control_message",
]

CONTROL_PROTOCOL_VERSION = 1

NonNegativeInt = Annotated[int, msgspec.Meta(ge=0)]
Port = Annotated[int, msgspec.Meta(ge=1, le=65535)]


class TunnelErrorCode(enum.StrEnum):
    """Why a follower refused or failed to open a TCP tunnel."""

    REFUSED_NOT_ALLOWED = "refusedNotAllowed"
    """The destination is not on the follower's allow-list."""
    UNREACHABLE = "unreachable"
    TIMEOUT = "timeout"
    DATA_CHANNEL_FAILED = "dataChannelFailed"
    """The destination was reachable but the follower could not dial the access point's data
    port back (``DialData`` only); the access point falls back to a QUIC tunnel stream."""


class StreamErrorCode(enum.IntEnum):
    """Application error codes for closing a QUIC stream."""

    MALFORMED_FRAME = 1
    FRAME_TOO_LARGE = 2
    UNEXPECTED_MESSAGE = 3
    INTERNAL = 4


class _ControlBase(msgspec.Struct, frozen=True, rename="camel", tag_field="type"):
    """Common configuration of every control-plane message."""


class Hello(_ControlBase, frozen=True, tag="hello"):
    """First message of a follower on its control stream."""

    info: FollowerInfo
    protocol_version: int


class Welcome(_ControlBase, frozen=True, tag="welcome"):
    """The access point's answer to ``Hello``."""

    follower: HostName
    heartbeat_interval_ms: Annotated[int, msgspec.Meta(ge=1)]
    server_version: str


class Heartbeat(_ControlBase, frozen=True, tag="heartbeat"):
    seq: NonNegativeInt
    sent_ms: int


class Ack(_ControlBase, frozen=True, tag="ack"):
    """Acknowledges the ``Heartbeat`` with the same ``seq``."""

    seq: NonNegativeInt
    sent_ms: int


class Goodbye(_ControlBase, frozen=True, tag="goodbye"):
    reason: str


class ExecRequest(_ControlBase, frozen=True, tag="execRequest"):
    """Run a command on the follower (mock exec mode), on its own RPC stream."""

    request_id: str
    command: list[str]
    timeout_ms: Annotated[int, msgspec.Meta(ge=0)] | None = None


class ExecResult(_ControlBase, frozen=True, tag="execResult"):
    request_id: str
    exit_code: int
    stdout: str
    stderr: str
    took_ms: NonNegativeInt


class OpenTcp(_ControlBase, frozen=True, tag="openTcp"):
    """Open a tunnel stream to ``dst:port`` on the follower's side (allow-listed only)."""

    dst: str
    port: Port
    tunnel_id: str


class OpenTcpOk(_ControlBase, frozen=True, tag="openTcpOk"):
    tunnel_id: str


class OpenTcpErr(_ControlBase, frozen=True, tag="openTcpErr"):
    tunnel_id: str
    code: TunnelErrorCode
    message: str


class DialData(_ControlBase, frozen=True, tag="dialData"):
    """RPC: open ``dst:port`` (allow-listed only) and splice it with a TLS TCP connection that
    the follower dials back to the access point's ``data_host:data_port`` (``data_host`` None:
    the host the follower dialled for QUIC). The new connection starts with a
    ``DataChannelHello`` carrying the same ``tunnel_id`` and ``nonce``. Reply: ``OpenTcpOk``
    once that hello is sent, or ``OpenTcpErr``."""

    tunnel_id: str
    dst: str
    port: Port
    data_port: Port
    nonce: str
    data_host: str | None = None


class DataChannelHello(_ControlBase, frozen=True, tag="dataChannelHello"):
    """First frame on a data connection the follower dialled back for ``DialData``."""

    tunnel_id: str
    nonce: str


class StreamError(_ControlBase, frozen=True, tag="streamError"):
    """Sent before closing a stream on a protocol error; ``code`` is a StreamErrorCode."""

    code: int
    message: str


ControlMessage: TypeAlias = (
    Hello
    | Welcome
    | Heartbeat
    | Ack
    | Goodbye
    | ExecRequest
    | ExecResult
    | OpenTcp
    | OpenTcpOk
    | OpenTcpErr
    | DialData
    | DataChannelHello
    | StreamError
)

CONTROL_MESSAGE_TYPES: tuple[str, ...] = (
    "hello",
    "welcome",
    "heartbeat",
    "ack",
    "goodbye",
    "execRequest",
    "execResult",
    "openTcp",
    "openTcpOk",
    "openTcpErr",
    "dialData",
    "dataChannelHello",
    "streamError",
)
"""The ``type`` tags of :data:`ControlMessage`, in declaration order."""

_ENCODER = msgspec.msgpack.Encoder()
_DECODER: msgspec.msgpack.Decoder[ControlMessage] = msgspec.msgpack.Decoder(ControlMessage)


def encode_control_message(message: ControlMessage) -> bytes:
    """msgpack body of one control message (without the length prefix)."""
    return _ENCODER.encode(message)


def decode_control_message(data: bytes) -> ControlMessage:
    """Decode one msgpack body; raises :class:`msgspec.DecodeError` (or its subclass
    ValidationError) on malformed input."""
    return _DECODER.decode(data)


class EnrollRequest(msgspec.Struct, frozen=True, rename="camel"):
    """``POST`` by a follower joining with a one-time enrollment token (HTTPS)."""

    token: str
    name: HostName
    csr_pem: str
    tags: dict[TagKey, TagValue]


class EnrollResponse(msgspec.Struct, frozen=True, rename="camel"):
    """The follower's certificate and everything it needs to connect from then on."""

    name: HostName
    certificate_pem: str
    ca_pem: str
    trust_domain: str
    access_point_quic: str
    """``host:port`` of the access point's QUIC listener."""
