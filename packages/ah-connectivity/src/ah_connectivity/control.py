"""Sans-I/O state machines for the control stream.

`FollowerControl` is the follower's side (Hello → Welcome, heartbeats, RTT, reconnect
decisions); `AccessPointControl` is the access point's side for one follower connection
(identity check of Hello against the certificate, Welcome, Ack, health). Both are fed
messages and clock ticks with an explicit ``now_ms`` (a monotonic millisecond clock chosen by
the caller) and return a list of actions for the I/O shell to carry out, in order.
"""

from __future__ import annotations

import enum

import msgspec

from ah_domain_types import (
    CONTROL_PROTOCOL_VERSION,
    Ack,
    ControlMessage,
    FollowerHealth,
    FollowerInfo,
    Goodbye,
    Heartbeat,
    Hello,
    StreamError,
    StreamErrorCode,
    Welcome,
)

__all__ = [
    "NO_ERROR",
    "AccessPointAction",
    "AccessPointControl",
    "AccessPointPhase",
    "CloseStream",
    "FollowerAccepted",
    "FollowerAction",
    "FollowerControl",
    "FollowerPhase",
    "MarkHealth",
    "Reconnect",
    "RttSample",
    "SendMessage",
    "SessionClosed",
    "SessionEstablished",
]

NO_ERROR = 0
"""Stream close code for an orderly close (Goodbye)."""

# Heartbeat sequence numbers remembered for RTT; older ones no longer matter because their
# Ack would arrive after the reconnect decision anyway.
_MAX_OUTSTANDING = 32


class SendMessage(msgspec.Struct, frozen=True):
    """Write this message as one frame on the control stream."""

    message: ControlMessage


class CloseStream(msgspec.Struct, frozen=True):
    """Close the control stream; ``code`` is NO_ERROR or a StreamErrorCode."""

    code: int
    reason: str


class MarkHealth(msgspec.Struct, frozen=True):
    """The follower's health as the access point sees it changed."""

    health: FollowerHealth


class Reconnect(msgspec.Struct, frozen=True):
    """The follower should drop this connection and dial again (with backoff)."""

    reason: str


class SessionEstablished(msgspec.Struct, frozen=True):
    """Follower side: the access point welcomed us."""

    welcome: Welcome


class RttSample(msgspec.Struct, frozen=True):
    """Follower side: round trip of heartbeat ``seq``."""

    seq: int
    rtt_ms: int


class FollowerAccepted(msgspec.Struct, frozen=True):
    """Access point side: Hello passed the identity check; register this follower."""

    info: FollowerInfo


class SessionClosed(msgspec.Struct, frozen=True):
    """Access point side: the control session ended (``graceful`` after a Goodbye)."""

    graceful: bool
    reason: str


FollowerAction = SendMessage | CloseStream | Reconnect | SessionEstablished | RttSample
AccessPointAction = SendMessage | CloseStream | MarkHealth | FollowerAccepted | SessionClosed


def _type_name(msg: object) -> str:
    return type(msg).__name__


class FollowerPhase(enum.Enum):
    IDLE = "idle"
    HELLO_SENT = "helloSent"
    CONNECTED = "connected"
    CLOSED = "closed"


class FollowerControl:
    """The follower's side of one control stream."""

    def __init__(
        self,
        info: FollowerInfo,
        *,
        protocol_version: int = CONTROL_PROTOCOL_VERSION,
        missed_ack_intervals: int = 3,
        welcome_timeout_ms: int = 10_000,
    ) -> None:
        if missed_ack_intervals < 1 or welcome_timeout_ms < 1:
            raise ValueError(
                f"missed_ack_intervals ({missed_ack_intervals}) and welcome_timeout_ms "
                f"({welcome_timeout_ms}) must be positive"
            )
        self.info = info
        self.protocol_version = protocol_version
        self.missed_ack_intervals = missed_ack_intervals
        self.welcome_timeout_ms = welcome_timeout_ms
        self.phase = FollowerPhase.IDLE
        self.welcome: Welcome | None = None
        self.rtt_ms: int | None = None
        """The latest RTT sample."""
        self.close_reason: str | None = None
        self._hello_sent_ms = 0
        self._seq = 0  # last heartbeat seq sent
        self._outstanding: dict[int, int] = {}  # seq -> our send time
        self._last_ack_ms = 0
        self._next_heartbeat_ms = 0

    @property
    def heartbeat_interval_ms(self) -> int | None:
        return self.welcome.heartbeat_interval_ms if self.welcome else None

    @property
    def last_heartbeat_seq(self) -> int:
        return self._seq

    def start(self, now_ms: int) -> list[FollowerAction]:
        """Open the session: send Hello."""
        if self.phase is not FollowerPhase.IDLE:
            raise RuntimeError(f"FollowerControl.start called in phase {self.phase.value}")
        self.phase = FollowerPhase.HELLO_SENT
        self._hello_sent_ms = now_ms
        return [SendMessage(Hello(info=self.info, protocol_version=self.protocol_version))]

    def _fail(self, code: int, reason: str, *, tell_peer: bool = True) -> list[FollowerAction]:
        self.phase = FollowerPhase.CLOSED
        self.close_reason = reason
        actions: list[FollowerAction] = []
        if tell_peer:
            actions.append(SendMessage(StreamError(code=code, message=reason)))
        actions += [CloseStream(code, reason), Reconnect(reason)]
        return actions

    def receive(self, msg: ControlMessage, now_ms: int) -> list[FollowerAction]:
        """A message arrived on the control stream."""
        phase = self.phase
        if phase is FollowerPhase.CLOSED:
            return []
        if isinstance(msg, StreamError):
            reason = f"access point closed the control stream: {msg.message} (code {msg.code})"
            return self._fail(msg.code, reason, tell_peer=False)
        if isinstance(msg, Goodbye):
            reason = f"access point said goodbye: {msg.reason}"
            self.phase = FollowerPhase.CLOSED
            self.close_reason = reason
            return [CloseStream(NO_ERROR, reason), Reconnect(reason)]
        if phase is FollowerPhase.HELLO_SENT and isinstance(msg, Welcome):
            if msg.follower != self.info.name:
                return self._fail(
                    StreamErrorCode.UNEXPECTED_MESSAGE,
                    f"Welcome names follower {msg.follower!r}, expected {self.info.name!r}",
                )
            self.phase = FollowerPhase.CONNECTED
            self.welcome = msg
            self._last_ack_ms = now_ms
            self._next_heartbeat_ms = now_ms  # first heartbeat right away: an early RTT sample
            return [SessionEstablished(msg)]
        if phase is FollowerPhase.CONNECTED and isinstance(msg, Ack):
            if msg.seq > self._seq or msg.seq == 0:
                return self._fail(
                    StreamErrorCode.UNEXPECTED_MESSAGE,
                    f"Ack for heartbeat {msg.seq} that was never sent (last sent {self._seq})",
                )
            sent = self._outstanding.pop(msg.seq, None)
            if sent is None:
                return []  # duplicate or too old to matter
            for old in [s for s in self._outstanding if s < msg.seq]:
                del self._outstanding[old]
            self._last_ack_ms = max(self._last_ack_ms, now_ms)
            self.rtt_ms = max(0, now_ms - sent)
            return [RttSample(seq=msg.seq, rtt_ms=self.rtt_ms)]
        return self._fail(
            StreamErrorCode.UNEXPECTED_MESSAGE,
            f"unexpected {_type_name(msg)} on the control stream while {phase.value}",
        )

    def tick(self, now_ms: int) -> list[FollowerAction]:
        """Time passed: send a heartbeat when due, give up when acks stopped coming."""
        if self.phase is FollowerPhase.HELLO_SENT:
            if now_ms - self._hello_sent_ms >= self.welcome_timeout_ms:
                return self._fail(
                    StreamErrorCode.UNEXPECTED_MESSAGE,
                    f"no Welcome within {self.welcome_timeout_ms} ms of Hello",
                )
            return []
        if self.phase is not FollowerPhase.CONNECTED or self.welcome is None:
            return []
        interval = self.welcome.heartbeat_interval_ms
        silent = now_ms - self._last_ack_ms
        if silent >= self.missed_ack_intervals * interval:
            reason = f"no Ack for {silent} ms ({self.missed_ack_intervals} heartbeat intervals of {interval} ms)"
            self.phase = FollowerPhase.CLOSED
            self.close_reason = reason
            return [CloseStream(NO_ERROR, reason), Reconnect(reason)]
        if now_ms < self._next_heartbeat_ms:
            return []
        self._seq += 1
        self._outstanding[self._seq] = now_ms
        while len(self._outstanding) > _MAX_OUTSTANDING:
            del self._outstanding[min(self._outstanding)]
        # Schedule from the due time, not from now, so late ticks do not drift the cadence;
        # but never schedule into the past (a long stall sends one heartbeat, not a burst).
        self._next_heartbeat_ms = max(self._next_heartbeat_ms + interval, now_ms + 1)
        return [SendMessage(Heartbeat(seq=self._seq, sent_ms=now_ms))]

    def next_timer_ms(self) -> int | None:
        """When `tick` next has something to do (None: nothing scheduled)."""
        if self.phase is FollowerPhase.HELLO_SENT:
            return self._hello_sent_ms + self.welcome_timeout_ms
        if self.phase is FollowerPhase.CONNECTED and self.welcome is not None:
            give_up = (
                self._last_ack_ms + self.missed_ack_intervals * self.welcome.heartbeat_interval_ms
            )
            return min(self._next_heartbeat_ms, give_up)
        return None

    def shutdown(self, reason: str) -> list[FollowerAction]:
        """Leave on purpose: Goodbye, then close the stream (no reconnect)."""
        phase = self.phase
        self.phase = FollowerPhase.CLOSED
        self.close_reason = reason
        if phase in (FollowerPhase.HELLO_SENT, FollowerPhase.CONNECTED):
            return [SendMessage(Goodbye(reason=reason)), CloseStream(NO_ERROR, reason)]
        return []

    def protocol_error(self, code: int, message: str) -> list[FollowerAction]:
        """The shell could not decode the control stream (malformed/oversized frame)."""
        if self.phase is FollowerPhase.CLOSED:
            return []
        return self._fail(code, message)

    def connection_lost(self, reason: str) -> list[FollowerAction]:
        """The QUIC connection or the control stream went away underneath us."""
        if self.phase is FollowerPhase.CLOSED:
            return []
        self.phase = FollowerPhase.CLOSED
        self.close_reason = reason
        return [Reconnect(reason)]


class AccessPointPhase(enum.Enum):
    AWAITING_HELLO = "awaitingHello"
    CONNECTED = "connected"
    CLOSED = "closed"


class AccessPointControl:
    """The access point's side of one follower's control stream.

    `peer_name` is the follower name from the client certificate's verified SPIFFE ID; the
    Hello must name the same follower.
    """

    def __init__(
        self,
        peer_name: str,
        now_ms: int,
        *,
        heartbeat_interval_ms: int = 5_000,
        server_version: str = "0.1.0",
        unhealthy_after_intervals: int = 3,
        hello_timeout_ms: int = 10_000,
        protocol_version: int = CONTROL_PROTOCOL_VERSION,
    ) -> None:
        if heartbeat_interval_ms < 1 or unhealthy_after_intervals < 1 or hello_timeout_ms < 1:
            raise ValueError(
                f"heartbeat_interval_ms ({heartbeat_interval_ms}), unhealthy_after_intervals "
                f"({unhealthy_after_intervals}) and hello_timeout_ms ({hello_timeout_ms}) must be positive"
            )
        self.peer_name = peer_name
        self.heartbeat_interval_ms = heartbeat_interval_ms
        self.server_version = server_version
        self.unhealthy_after_intervals = unhealthy_after_intervals
        self.hello_timeout_ms = hello_timeout_ms
        self.protocol_version = protocol_version
        self.phase = AccessPointPhase.AWAITING_HELLO
        self.info: FollowerInfo | None = None
        self.close_reason: str | None = None
        self.graceful: bool | None = None
        self.last_heartbeat_ms: int | None = None
        self._opened_ms = now_ms
        self._reported: FollowerHealth = FollowerHealth.OFFLINE

    def health(self, now_ms: int) -> FollowerHealth:
        if self.phase is not AccessPointPhase.CONNECTED or self.last_heartbeat_ms is None:
            return FollowerHealth.OFFLINE
        limit = self.unhealthy_after_intervals * self.heartbeat_interval_ms
        if now_ms - self.last_heartbeat_ms <= limit:
            return FollowerHealth.HEALTHY
        return FollowerHealth.UNHEALTHY

    def _health_change(self, now_ms: int) -> list[AccessPointAction]:
        current = self.health(now_ms)
        if current is self._reported:
            return []
        self._reported = current
        return [MarkHealth(current)]

    def _close(
        self, code: int, reason: str, *, graceful: bool, tell_peer: bool, now_ms: int
    ) -> list[AccessPointAction]:
        actions: list[AccessPointAction] = []
        if tell_peer:
            actions.append(SendMessage(StreamError(code=code, message=reason)))
        actions.append(CloseStream(code, reason))
        self.phase = AccessPointPhase.CLOSED
        self.close_reason = reason
        self.graceful = graceful
        actions += self._health_change(now_ms)
        actions.append(SessionClosed(graceful=graceful, reason=reason))
        return actions

    def _refuse(self, reason: str, now_ms: int) -> list[AccessPointAction]:
        return self._close(
            StreamErrorCode.UNEXPECTED_MESSAGE,
            reason,
            graceful=False,
            tell_peer=True,
            now_ms=now_ms,
        )

    def receive(self, msg: ControlMessage, now_ms: int) -> list[AccessPointAction]:
        phase = self.phase
        if phase is AccessPointPhase.CLOSED:
            return []
        if isinstance(msg, StreamError):
            return self._close(
                msg.code,
                f"follower {self.peer_name!r} closed the control stream: {msg.message} (code {msg.code})",
                graceful=False,
                tell_peer=False,
                now_ms=now_ms,
            )
        if phase is AccessPointPhase.AWAITING_HELLO:
            if not isinstance(msg, Hello):
                return self._refuse(
                    f"expected Hello as the first control message from {self.peer_name!r}, got {_type_name(msg)}",
                    now_ms,
                )
            if msg.info.name != self.peer_name:
                return self._refuse(
                    f"name mismatch: certificate names follower {self.peer_name!r}, Hello names {msg.info.name!r}",
                    now_ms,
                )
            if msg.protocol_version != self.protocol_version:
                return self._refuse(
                    f"follower {self.peer_name!r} speaks control protocol {msg.protocol_version}, "
                    f"this access point speaks {self.protocol_version}",
                    now_ms,
                )
            self.phase = AccessPointPhase.CONNECTED
            self.info = msg.info
            self.last_heartbeat_ms = now_ms
            welcome = Welcome(
                follower=self.peer_name,
                heartbeat_interval_ms=self.heartbeat_interval_ms,
                server_version=self.server_version,
            )
            return [SendMessage(welcome), FollowerAccepted(msg.info), *self._health_change(now_ms)]
        # CONNECTED
        if isinstance(msg, Heartbeat):
            self.last_heartbeat_ms = max(self.last_heartbeat_ms or now_ms, now_ms)
            return [
                SendMessage(Ack(seq=msg.seq, sent_ms=msg.sent_ms)),
                *self._health_change(now_ms),
            ]
        if isinstance(msg, Goodbye):
            return self._close(
                NO_ERROR,
                f"follower {self.peer_name!r} said goodbye: {msg.reason}",
                graceful=True,
                tell_peer=False,
                now_ms=now_ms,
            )
        return self._refuse(
            f"unexpected {_type_name(msg)} on the control stream of {self.peer_name!r}", now_ms
        )

    def tick(self, now_ms: int) -> list[AccessPointAction]:
        """Time passed: report health changes; refuse a connection that never said Hello."""
        if self.phase is AccessPointPhase.AWAITING_HELLO:
            if now_ms - self._opened_ms >= self.hello_timeout_ms:
                return self._refuse(
                    f"no Hello from {self.peer_name!r} within {self.hello_timeout_ms} ms", now_ms
                )
            return []
        return self._health_change(now_ms)

    def next_timer_ms(self) -> int | None:
        """When `tick` next may have something to report."""
        if self.phase is AccessPointPhase.AWAITING_HELLO:
            return self._opened_ms + self.hello_timeout_ms
        if self.phase is AccessPointPhase.CONNECTED and self.last_heartbeat_ms is not None:
            if self._reported is FollowerHealth.HEALTHY:
                return (
                    self.last_heartbeat_ms
                    + self.unhealthy_after_intervals * self.heartbeat_interval_ms
                    + 1
                )
            return None  # unhealthy: only a heartbeat (an event) changes that
        return None

    def protocol_error(self, code: int, message: str, now_ms: int) -> list[AccessPointAction]:
        """The shell could not decode the control stream (malformed/oversized frame)."""
        if self.phase is AccessPointPhase.CLOSED:
            return []
        return self._close(code, message, graceful=False, tell_peer=True, now_ms=now_ms)

    def shutdown(self, reason: str, now_ms: int) -> list[AccessPointAction]:
        """The access point is going away: tell the follower (it will reconnect)."""
        if self.phase is AccessPointPhase.CLOSED:
            return []
        actions: list[AccessPointAction] = [SendMessage(Goodbye(reason=reason))]
        actions += self._close(NO_ERROR, reason, graceful=True, tell_peer=False, now_ms=now_ms)
        return actions

    def connection_lost(self, reason: str, now_ms: int) -> list[AccessPointAction]:
        if self.phase is AccessPointPhase.CLOSED:
            return []
        self.phase = AccessPointPhase.CLOSED
        self.close_reason = reason
        self.graceful = False
        return [*self._health_change(now_ms), SessionClosed(graceful=False, reason=reason)]
