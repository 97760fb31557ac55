"""The pure push cores: `PushSender` and `PushReceiver` driven through any interleaving of
emits, partial deliveries and lost connections store every event exactly once, in order."""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ah_connectivity.framing import encode_frame
from ah_connectivity.push_core import (
    Authenticate,
    ClosePush,
    PushAction,
    PushProtocolError,
    PushReceiver,
    PushReceiverPhase,
    PushSender,
    SendPush,
    StoreEvents,
    compress_batch,
    expand_batch,
)
from ah_domain_types import (
    PUSH_PROTOCOL_VERSION,
    Event,
    HostExitedEvent,
    HostResult,
    HostStartedEvent,
    HostState,
    NoteEvent,
    OsKind,
    PushAck,
    PushBatch,
    PushBatchZ,
    PushHello,
    PushMessage,
    PushRefusal,
    PushRefused,
    PushWelcome,
    RunSummary,
    SummaryEvent,
)

SESSION = "s-test-1"


def note(n: int, session_id: str = "") -> NoteEvent:
    return NoteEvent(session_id=session_id, ts_ms=0.0, message=f"event {n}")


def hello(producer: str = "p1", version: int = PUSH_PROTOCOL_VERSION) -> PushHello:
    return PushHello(token="t", session_id=SESSION, producer=producer, protocol_version=version)


@dataclass
class Store:
    """The access point's persistent part: events stored and the producer's last lseq."""

    events: list[tuple[int, str]] = field(default_factory=list)  # (seq, message)
    acked_lseq: int = 0


@dataclass
class Link:
    """One connection: the server-side receiver and the messages in flight each way."""

    receiver: PushReceiver
    to_server: list[PushMessage] = field(default_factory=list)
    to_client: list[PushMessage] = field(default_factory=list)


def run_actions(
    receiver: PushReceiver, store: Store, actions: list[PushAction]
) -> list[PushMessage]:
    """The access point's shell: authenticate, store, collect what it sends."""
    out: list[PushMessage] = []
    queue = list(actions)
    while queue:
        action = queue.pop(0)
        if isinstance(action, SendPush):
            out.append(action.message)
        elif isinstance(action, Authenticate):
            last = store.events[-1][0] if store.events else 0
            queue[:0] = receiver.opened(store.acked_lseq, last)
        elif isinstance(action, StoreEvents):
            if not action.events:
                queue[:0] = receiver.stored(0, 0)
                continue
            assert action.first_lseq == store.acked_lseq + 1, "a stored lseq would repeat or skip"
            first = (store.events[-1][0] if store.events else 0) + 1
            for offset, event in enumerate(action.events):
                assert isinstance(event, NoteEvent)
                store.events.append((first + offset, event.message))
            store.acked_lseq = action.last_lseq
            queue[:0] = receiver.stored(first, first + len(action.events) - 1)
        elif isinstance(action, ClosePush):
            assert not action.error, action.reason
    return out


ops = st.lists(
    st.one_of(
        st.tuples(st.just("emit"), st.integers(1, 7)),
        st.tuples(st.just("to_server"), st.integers(1, 4)),
        st.tuples(st.just("to_client"), st.integers(1, 4)),
        st.tuples(st.just("drop"), st.just(0)),
    ),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(
    ops=ops,
    max_batch=st.integers(1, 5),
    window=st.integers(1, 12),
    batches=st.one_of(st.none(), st.integers(1, 3)),
)
def test_any_interleaving_stores_each_event_exactly_once_in_order(
    ops: list[tuple[str, int]], max_batch: int, window: int, batches: int | None
) -> None:
    sender = PushSender(
        max_batch_events=max_batch, max_in_flight=window, max_in_flight_batches=batches
    )
    store = Store()
    acked_seqs: dict[int, int] = {}

    def connect() -> Link:
        link = Link(PushReceiver(max_batch_events=max_batch))
        link.to_server.append(hello())
        return link

    def deliver_to_client(link: Link, count: int) -> None:
        for _ in range(min(count, len(link.to_client))):
            message = link.to_client.pop(0)
            if isinstance(message, PushWelcome):
                sender.on_welcome(message)
            elif isinstance(message, PushAck):
                acked = sender.on_ack(message)
                for lseq in range(acked.first_lseq, acked.last_lseq + 1):
                    seq = acked.seq_of(lseq)
                    assert seq is not None and lseq not in acked_seqs
                    acked_seqs[lseq] = seq
            else:
                raise AssertionError(f"unexpected {message}")
            pump(link)

    def deliver_to_server(link: Link, count: int) -> None:
        for _ in range(min(count, len(link.to_server))):
            message = link.to_server.pop(0)
            link.to_client += run_actions(link.receiver, store, link.receiver.receive(message))

    def pump(link: Link) -> None:
        while (batch := sender.next_batch()) is not None:
            link.to_server.append(batch)

    link = connect()
    emitted = 0
    for op, arg in ops:
        if op == "emit":
            for _ in range(arg):
                emitted += 1
                assert sender.emit(note(emitted)) == emitted
            pump(link)
        elif op == "to_server":
            deliver_to_server(link, arg)
        elif op == "to_client":
            deliver_to_client(link, arg)
        else:
            sender.on_disconnect()
            link = connect()
        assert sender.in_flight <= window
        assert batches is None or sender.batches_in_flight <= batches
    # Finally the network behaves: deliver everything until the sender is idle.
    for _ in range(10_000):
        if sender.all_acked and not link.to_server and not link.to_client:
            break
        deliver_to_server(link, 1_000)
        deliver_to_client(link, 1_000)
    assert sender.all_acked
    assert [m for _, m in store.events] == [f"event {n}" for n in range(1, emitted + 1)]
    assert [s for s, _ in store.events] == list(range(1, emitted + 1))
    # Every ack mapped each lseq to the seq it really got. (An event whose ack was lost is
    # covered by the next welcome instead, which carries no seqs.)
    assert all(seq == lseq for lseq, seq in acked_seqs.items()), acked_seqs


def test_batches_respect_event_and_byte_limits() -> None:
    sender = PushSender(max_batch_events=10, max_batch_bytes=300, max_in_flight=100)
    for n in range(25):
        sender.emit(note(n))
    assert sender.next_batch() is None, "nothing is sent before a welcome"
    sender.on_welcome(
        PushWelcome(session_id=SESSION, producer="p", acked_lseq=0, last_seq=0, max_batch_events=4)
    )
    sizes = []
    while (batch := sender.next_batch()) is not None:
        sizes.append(len(batch.events))
    assert sum(sizes) == 25
    assert max(sizes) <= 4, "the access point's limit wins over the sender's"
    assert sender.in_flight == 25


def test_events_emitted_while_the_batch_window_is_full_leave_together_on_the_next_ack() -> None:
    sender = PushSender(max_batch_events=100, max_in_flight_batches=1)
    sender.on_welcome(
        PushWelcome(
            session_id=SESSION, producer="p", acked_lseq=0, last_seq=0, max_batch_events=100
        )
    )
    sender.emit(note(1))
    first = sender.next_batch()
    assert first is not None and len(first.events) == 1, "an event on an idle link goes at once"
    for n in range(2, 9):
        sender.emit(note(n))
        assert sender.next_batch() is None, "one batch awaits its ack: the others gather"
    sender.on_ack(PushAck(last_lseq=1, first_seq=1, last_seq=1))
    second = sender.next_batch()
    assert second is not None and second.first_lseq == 2
    assert [e.message for e in second.events if isinstance(e, NoteEvent)] == [
        f"event {n}" for n in range(2, 9)
    ]
    # A lost connection forgets the window: the welcome's resend is not held back.
    sender.on_disconnect()
    sender.on_welcome(
        PushWelcome(
            session_id=SESSION, producer="p", acked_lseq=1, last_seq=1, max_batch_events=100
        )
    )
    resent = sender.next_batch()
    assert resent is not None and resent.first_lseq == 2 and len(resent.events) == 7


def test_sender_refuses_acks_for_events_never_sent() -> None:
    sender = PushSender()
    sender.emit(note(1))
    sender.on_welcome(
        PushWelcome(session_id=SESSION, producer="p", acked_lseq=0, last_seq=0, max_batch_events=9)
    )
    assert sender.next_batch() is not None
    with pytest.raises(PushProtocolError, match="outside the in-flight range"):
        sender.on_ack(PushAck(last_lseq=2, first_seq=1, last_seq=2))
    with pytest.raises(PushProtocolError, match="more events"):
        sender.on_ack(PushAck(last_lseq=1, first_seq=1, last_seq=5))
    with pytest.raises(PushProtocolError, match="were emitted"):
        sender.on_welcome(
            PushWelcome(
                session_id=SESSION, producer="p", acked_lseq=7, last_seq=7, max_batch_events=9
            )
        )


def refusal(actions: list[PushAction]) -> PushRefused:
    assert len(actions) == 2 and isinstance(actions[1], ClosePush) and actions[1].error
    first = actions[0]
    assert isinstance(first, SendPush) and isinstance(first.message, PushRefused)
    return first.message


@pytest.mark.parametrize(
    ("messages", "code", "fragment"),
    [
        ([PushBatch(first_lseq=1, events=[note(1)])], PushRefusal.INVALID, "expected pushHello"),
        ([hello(version=99)], PushRefusal.INVALID, "version 99"),
    ],
)
def test_receiver_refuses_a_bad_start(
    messages: list[Any], code: PushRefusal, fragment: str
) -> None:
    receiver = PushReceiver()
    refused = refusal(receiver.receive(messages[0]))
    assert refused.code is code and fragment in refused.message
    assert receiver.phase is PushReceiverPhase.CLOSED
    assert receiver.receive(hello()) == []


def open_receiver(acked: int = 0) -> PushReceiver:
    receiver = PushReceiver(max_batch_events=3)
    assert receiver.receive(hello()) == [Authenticate(hello())]
    (welcome,) = receiver.opened(acked, acked)
    assert isinstance(welcome, SendPush) and isinstance(welcome.message, PushWelcome)
    assert welcome.message.acked_lseq == acked
    return receiver


def test_receiver_skips_a_resent_prefix_and_refuses_gaps_and_foreign_events() -> None:
    receiver = open_receiver(acked=2)
    (store,) = receiver.receive(PushBatch(first_lseq=1, events=[note(1), note(2), note(3)]))
    assert isinstance(store, StoreEvents)
    assert store.first_lseq == 3 and [e.message for e in store.events] == ["event 3"]  # type: ignore[attr-defined]
    (ack,) = receiver.stored(9, 9)
    assert isinstance(ack, SendPush) and ack.message == PushAck(
        last_lseq=3, first_seq=9, last_seq=9
    )
    # All resent: an empty store, acked with zero seqs by the shell.
    (store,) = receiver.receive(PushBatch(first_lseq=2, events=[note(2), note(3)]))
    assert isinstance(store, StoreEvents) and not store.events
    (ack,) = receiver.stored(0, 0)
    assert isinstance(ack, SendPush) and ack.message == PushAck(
        last_lseq=3, first_seq=0, last_seq=0
    )

    gap = open_receiver(acked=2)
    assert (
        "would be missing"
        in refusal(gap.receive(PushBatch(first_lseq=4, events=[note(4)]))).message
    )
    foreign = open_receiver()
    assert (
        "of session 'other'"
        in refusal(
            foreign.receive(PushBatch(first_lseq=1, events=[note(1, session_id="other")]))
        ).message
    )
    big = open_receiver()
    assert (
        "over the limit"
        in refusal(big.receive(PushBatch(first_lseq=1, events=[note(n) for n in range(4)]))).message
    )


def test_receiver_queues_pipelined_batches_and_closes_after_the_last_one() -> None:
    receiver = PushReceiver()
    assert receiver.receive(hello()) == [Authenticate(hello())]
    # Batches and the end of the stream arrive before the hello is authenticated.
    assert receiver.receive(PushBatch(first_lseq=1, events=[note(1)])) == []
    assert receiver.receive(PushBatch(first_lseq=2, events=[note(2)])) == []
    assert receiver.peer_finished() == []
    welcome, store = receiver.opened(0, 0)
    assert isinstance(welcome, SendPush) and isinstance(welcome.message, PushWelcome)
    assert isinstance(store, StoreEvents) and store.first_lseq == 1
    ack, store = receiver.stored(1, 1)
    assert isinstance(store, StoreEvents) and store.first_lseq == 2
    ack, close = receiver.stored(2, 2)
    assert isinstance(ack, SendPush) and ack.message == PushAck(
        last_lseq=2, first_seq=2, last_seq=2
    )
    assert close == ClosePush("leader finished the push stream", error=False)
    assert receiver.phase is PushReceiverPhase.CLOSED


# --------------------------------------------------------------------------- PushBatchZ

_texts = st.text(max_size=300)
_events = st.lists(
    st.builds(NoteEvent, session_id=st.just(""), ts_ms=st.floats(0, 1e13), message=_texts),
    min_size=1,
    max_size=60,
)


@given(_events, st.integers(1, 2**40), st.integers(0, 4096))
def test_a_compressed_batch_expands_to_exactly_the_batch(
    events: list[NoteEvent], first_lseq: int, min_size: int
) -> None:
    batch = PushBatch(first_lseq=first_lseq, events=list(events))
    sent = compress_batch(batch, min_size=min_size)
    if isinstance(sent, PushBatchZ):
        assert sent.count == len(events) and sent.first_lseq == first_lseq
        assert expand_batch(sent, max_size=1 << 20) == batch
    else:  # small, or incompressible: the batch itself
        assert sent is batch


def test_a_run_of_sixteen_hosts_compresses_to_one_packet() -> None:
    """What the leader agent pushes for ``run -- true`` on 16 hosts (their hostStarted and
    hostExited events and the summary): ~4.6 KB of msgpack, under 1 KB compressed."""
    runs = "/home/u/.local/state/agent-harbor/runs/20261128T120000Z-ab12"
    results = [
        HostResult(
            host=f"f{i:02d}",
            os=OsKind.LINUX,
            state=HostState.OK,
            exit_code=0,
            took_ms=12,
            log_path=f"{runs}/f{i:02d}.log",
            command="true",
        )
        for i in range(16)
    ]
    events: list[Event] = [
        HostStartedEvent(host=r.host, command="true", session_id="", ts_ms=1.0) for r in results
    ]
    events += [HostExitedEvent(host=r.host, result=r, session_id="", ts_ms=2.0) for r in results]
    events.append(SummaryEvent(summary=RunSummary.from_results(results), session_id="", ts_ms=3.0))
    batch = PushBatch(first_lseq=1, events=events)
    sent = compress_batch(batch)
    assert isinstance(sent, PushBatchZ)
    assert len(encode_frame(batch)) > 4000
    assert len(encode_frame(sent)) < 1000
    assert expand_batch(sent, max_size=1 << 20) == batch


def _z(raw: bytes, count: int = 1) -> PushBatchZ:
    return PushBatchZ(first_lseq=1, count=count, data=raw)


_ONE_NOTE = msgspec.msgpack.encode([note(1)])


@pytest.mark.parametrize(
    ("batch", "max_size", "error"),
    [
        (_z(b"not zlib at all"), 1 << 20, "not zlib"),
        (_z(zlib.compress(_ONE_NOTE)[:-6]), 1 << 20, "truncated"),
        (_z(zlib.compress(_ONE_NOTE) + b"tail"), 1 << 20, "4 bytes after"),
        # 8 MB of zeros in a few KB: refused while expanding, at the frame size limit.
        (_z(zlib.compress(bytes(8 << 20), 9)), 1 << 20, "expands beyond 1048576 bytes"),
        (_z(zlib.compress(_ONE_NOTE), count=2), 1 << 20, "says 2 events, holds 1"),
        (_z(zlib.compress(msgspec.msgpack.encode([{"type": "nope"}]))), 1 << 20, "no valid"),
        (_z(zlib.compress(msgspec.msgpack.encode({"a": 1}))), 1 << 20, "no valid"),
    ],
    ids=["garbage", "truncated", "trailing", "bomb", "count", "unknown-event", "not-a-list"],
)
def test_a_bad_compressed_batch_is_named(batch: PushBatchZ, max_size: int, error: str) -> None:
    with pytest.raises(PushProtocolError, match=error):
        expand_batch(batch, max_size=max_size)
