"""Every exported Struct (and both tagged unions) survives JSON and msgpack round trips,
and what it encodes to conforms to its definition in the committed JSON Schema."""

from __future__ import annotations

from typing import Any

import jsonschema
import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ah_domain_types as adt
from ah_domain_types import (
    DURATION_PATTERN,
    FILESET_NAME_PATTERN,
    HOST_KEY_FINGERPRINT_PATTERN,
    HOST_NAME_PATTERN,
    HOST_PORT_PATTERN,
    SESSION_ID_PATTERN,
    TAG_KEY_PATTERN,
    TAG_VALUE_PATTERN,
    Ack,
    AgentConfig,
    ConcurrencyConfig,
    ConfigFile,
    DataChannelHello,
    DialData,
    EnrollRequest,
    EnrollResponse,
    ErrorBody,
    ErrorEnvelope,
    ExecRequest,
    ExecResult,
    FenceHostResult,
    FenceHostState,
    FenceMetadata,
    FenceResultEvent,
    FenceStartedEvent,
    FilesetConfig,
    FilesetSpec,
    FollowerHealth,
    FollowerInfo,
    FollowersCatalogEvent,
    FollowerStatus,
    Goodbye,
    Heartbeat,
    Hello,
    HostExitedEvent,
    HostLogEvent,
    HostOverrideConfig,
    HostResult,
    HostStartedEvent,
    HostState,
    LogConfig,
    NoteEvent,
    OpenTcp,
    OpenTcpErr,
    OpenTcpOk,
    OsKind,
    PathAttemptFailure,
    PathDegradedEvent,
    PathFailedEvent,
    PathFixedEvent,
    PathPolicyConfig,
    PathRecord,
    PathRestoredEvent,
    PushAck,
    PushBatch,
    PushBatchZ,
    PushHello,
    PushRefusal,
    PushRefused,
    PushWelcome,
    Resources,
    RunEnvelope,
    RunSummary,
    Selector,
    SessionInfo,
    SshConfig,
    StreamError,
    StreamErrorCode,
    SummaryEvent,
    TagSelector,
    TimeoutsConfig,
    TransportMethod,
    TunnelErrorCode,
    Welcome,
    load_committed_schema,
)

ROUNDTRIP = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# ---- leaf strategies ---------------------------------------------------------------

text = st.text(max_size=12)
ints = st.integers(min_value=-(2**31), max_value=2**31)
non_neg = st.integers(min_value=0, max_value=2**40)
ms_floats = st.floats(min_value=0, max_value=1e9, allow_nan=False, allow_infinity=False)
any_floats = st.floats(allow_nan=False, allow_infinity=False)
host_names = st.from_regex(HOST_NAME_PATTERN, fullmatch=True)
tag_keys = st.from_regex(TAG_KEY_PATTERN, fullmatch=True)
tag_values = st.from_regex(TAG_VALUE_PATTERN, fullmatch=True)
tags = st.dictionaries(tag_keys, tag_values, max_size=3)
fingerprints = st.from_regex(HOST_KEY_FINGERPRINT_PATTERN, fullmatch=True)
host_ports = st.from_regex(HOST_PORT_PATTERN, fullmatch=True)
fileset_names = st.from_regex(FILESET_NAME_PATTERN, fullmatch=True)
globs = st.text(min_size=1, max_size=10)
durations = st.one_of(st.from_regex(DURATION_PATTERN, fullmatch=True), ms_floats)
required_flags = st.one_of(
    st.booleans(),
    st.integers(min_value=0, max_value=1),
    st.sampled_from(["yes", "No", "TRUE", "false", "1", "0"]),
)
session_ids = st.from_regex(SESSION_ID_PATTERN, fullmatch=True)
producers = st.from_regex(r"^[A-Za-z0-9_-]{1,64}$", fullmatch=True)
enforced_keys = st.from_regex(r"^[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*$", fullmatch=True)


def opt(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.none() | strategy


def event_common() -> dict[str, st.SearchStrategy[Any]]:
    return {"session_id": text, "seq": non_neg, "ts_ms": any_floats}


# ---- Struct strategies, in dependency order ------------------------------------------

path_records = st.builds(
    PathRecord,
    method=st.sampled_from(TransportMethod),
    target=text,
    relay=opt(text),
    rtt_estimate_ms=ms_floats,
)
resources = st.builds(Resources, cpus=non_neg, memory_mb=non_neg)
follower_infos = st.builds(
    FollowerInfo,
    name=host_names,
    os=st.sampled_from(OsKind),
    arch=text,
    tags=tags,
    resources=resources,
    host_key_fingerprint=fingerprints,
    direct_address=opt(host_ports),
    workspace=text,
    version=text,
)
follower_statuses = st.builds(
    FollowerStatus,
    info=follower_infos,
    health=st.sampled_from(FollowerHealth),
    last_heartbeat_ms=opt(non_neg),
    connected_since_ms=opt(non_neg),
    path=opt(path_records),
)
tag_selectors = st.builds(TagSelector, key=tag_keys, value=tag_values)
selectors = st.one_of(
    st.builds(
        Selector,
        hosts=st.lists(host_names, max_size=3).map(tuple),
        tags=st.lists(tag_selectors, max_size=3).map(tuple),
    ),
    st.just(Selector(all=True)),
)
fence_host_results = st.builds(
    FenceHostResult,
    state=st.sampled_from(FenceHostState),
    took_ms=non_neg,
    detail=opt(text),
)
fence_hosts = st.dictionaries(host_names, fence_host_results, max_size=3)
host_results = st.builds(
    HostResult,
    host=host_names,
    os=opt(st.sampled_from(OsKind)),
    state=st.sampled_from(HostState),
    exit_code=opt(ints),
    took_ms=non_neg,
    log_path=opt(text),
    error=opt(text),
    command=opt(text),
)
run_summaries = st.lists(host_results, max_size=5).map(RunSummary.from_results)
fileset_specs = st.builds(
    FilesetSpec,
    name=fileset_names,
    include=st.lists(globs, min_size=1, max_size=3).map(tuple),
    exclude=st.lists(globs, max_size=2).map(tuple),
    required=st.booleans(),
    dest=globs,
)
fileset_configs = st.builds(
    FilesetConfig,
    name=fileset_names,
    include=st.lists(globs, min_size=1, max_size=3),
    exclude=opt(st.lists(globs, max_size=2)),
    required=opt(required_flags),
    dest=opt(globs),
)

REGISTRY: dict[type[msgspec.Struct], st.SearchStrategy[Any]] = {
    ErrorBody: st.builds(
        ErrorBody,
        kind=text,
        message=text,
        exit_code=st.integers(0, 255),
        details=st.dictionaries(text, text, max_size=2),
    ),
    PathRecord: path_records,
    Resources: resources,
    FollowerInfo: follower_infos,
    FollowerStatus: follower_statuses,
    TagSelector: tag_selectors,
    Selector: selectors,
    SessionInfo: st.builds(
        SessionInfo,
        id=text,
        leader=text,
        created_ms=non_neg,
        followers=st.lists(follower_statuses, max_size=2),
        endpoints=st.dictionaries(text, text, max_size=2),
        last_event_ms=opt(ms_floats),
        last_seq=non_neg,
    ),
    FenceHostResult: fence_host_results,
    FenceMetadata: st.builds(
        FenceMetadata, snapshot_id=text, hosts=fence_hosts, started_ms=non_neg, took_ms=non_neg
    ),
    FilesetSpec: fileset_specs,
    HostResult: host_results,
    RunSummary: run_summaries,
    RunEnvelope: st.builds(
        RunEnvelope,
        session_id=opt(text),
        commands=st.lists(text, max_size=3),
        hosts=st.lists(host_results, max_size=3),
        summary=run_summaries,
        run_dir=opt(text),
    ),
    # control plane
    Hello: st.builds(Hello, info=follower_infos, protocol_version=ints),
    Welcome: st.builds(
        Welcome,
        follower=host_names,
        heartbeat_interval_ms=st.integers(1, 10**6),
        server_version=text,
    ),
    Heartbeat: st.builds(Heartbeat, seq=non_neg, sent_ms=non_neg),
    Ack: st.builds(Ack, seq=non_neg, sent_ms=non_neg),
    Goodbye: st.builds(Goodbye, reason=text),
    ExecRequest: st.builds(
        ExecRequest,
        request_id=text,
        command=st.lists(text, max_size=3),
        timeout_ms=opt(non_neg),
    ),
    ExecResult: st.builds(
        ExecResult,
        request_id=text,
        exit_code=ints,
        stdout=text,
        stderr=text,
        took_ms=non_neg,
    ),
    OpenTcp: st.builds(OpenTcp, dst=text, port=st.integers(1, 65535), tunnel_id=text),
    OpenTcpOk: st.builds(OpenTcpOk, tunnel_id=text),
    OpenTcpErr: st.builds(
        OpenTcpErr, tunnel_id=text, code=st.sampled_from(TunnelErrorCode), message=text
    ),
    DialData: st.builds(
        DialData,
        tunnel_id=text,
        dst=text,
        port=st.integers(1, 65535),
        data_port=st.integers(1, 65535),
        nonce=text,
        data_host=opt(text),
    ),
    DataChannelHello: st.builds(DataChannelHello, tunnel_id=text, nonce=text),
    StreamError: st.builds(
        StreamError, code=st.sampled_from(StreamErrorCode).map(int), message=text
    ),
    EnrollRequest: st.builds(EnrollRequest, token=text, name=host_names, csr_pem=text, tags=tags),
    EnrollResponse: st.builds(
        EnrollResponse,
        name=host_names,
        certificate_pem=text,
        ca_pem=text,
        trust_domain=text,
        access_point_quic=text,
    ),
    # events
    FollowersCatalogEvent: st.builds(
        FollowersCatalogEvent, followers=st.lists(follower_statuses, max_size=2), **event_common()
    ),
    FenceStartedEvent: st.builds(
        FenceStartedEvent,
        snapshot_id=text,
        hosts=st.lists(host_names, max_size=3),
        **event_common(),
    ),
    FenceResultEvent: st.builds(
        FenceResultEvent, snapshot_id=text, hosts=fence_hosts, **event_common()
    ),
    HostStartedEvent: st.builds(HostStartedEvent, host=host_names, command=text, **event_common()),
    HostLogEvent: st.builds(
        HostLogEvent,
        host=host_names,
        stream=st.sampled_from(["stdout", "stderr"]),
        line=text,
        **event_common(),
    ),
    HostExitedEvent: st.builds(
        HostExitedEvent, host=host_names, result=host_results, **event_common()
    ),
    SummaryEvent: st.builds(SummaryEvent, summary=run_summaries, **event_common()),
    NoteEvent: st.builds(
        NoteEvent, message=text, level=st.sampled_from(["info", "warning"]), **event_common()
    ),
    PathFixedEvent: st.builds(PathFixedEvent, host=host_names, path=path_records, **event_common()),
    PathDegradedEvent: st.builds(
        PathDegradedEvent,
        host=host_names,
        path=opt(path_records),
        failures=non_neg,
        error=text,
        **event_common(),
    ),
    PathRestoredEvent: st.builds(
        PathRestoredEvent, host=host_names, path=path_records, **event_common()
    ),
    PathAttemptFailure: st.builds(
        PathAttemptFailure,
        method=st.sampled_from(TransportMethod),
        target=text,
        relay=st.none() | text,
        kind=text,
        error=text,
        started_ms=st.floats(0, 1e13),
        ended_ms=st.floats(0, 1e13),
        stage=st.sampled_from(["attempt", "probe"]),
    ),
    PathFailedEvent: st.builds(
        PathFailedEvent,
        host=host_names,
        reason=text,
        timed_out=st.booleans(),
        methods_tried=st.lists(st.sampled_from(TransportMethod), max_size=3),
        failures=st.lists(
            st.builds(
                PathAttemptFailure,
                method=st.sampled_from(TransportMethod),
                target=text,
                relay=st.none() | text,
                kind=text,
                error=text,
                started_ms=st.floats(0, 1e13),
                ended_ms=st.floats(0, 1e13),
            ),
            max_size=3,
        ),
        **event_common(),
    ),
    # leader event push
    PushHello: st.builds(
        PushHello,
        token=text,
        session_id=session_ids,
        producer=producers,
        protocol_version=st.integers(1, 10),
        client_version=text,
    ),
    PushWelcome: st.builds(
        PushWelcome,
        session_id=session_ids,
        producer=producers,
        acked_lseq=non_neg,
        last_seq=non_neg,
        max_batch_events=st.integers(1, 10_000),
    ),
    PushAck: st.builds(PushAck, last_lseq=non_neg, first_seq=non_neg, last_seq=non_neg),
    PushBatchZ: st.builds(
        PushBatchZ, first_lseq=st.integers(1, 2**40), count=st.integers(1, 10_000), data=st.binary()
    ),
    PushRefused: st.builds(PushRefused, code=st.sampled_from(PushRefusal), message=text),
    # configuration
    SshConfig: st.builds(SshConfig, user=opt(text), identity_file=opt(text)),
    FilesetConfig: fileset_configs,
    TimeoutsConfig: st.builds(
        TimeoutsConfig,
        connect=opt(durations),
        overall=opt(durations),
        fence=opt(durations),
        run=opt(durations),
    ),
    ConcurrencyConfig: st.builds(ConcurrencyConfig, transfer=opt(st.integers(1, 1024))),
    PathPolicyConfig: st.builds(
        PathPolicyConfig,
        allow_direct=opt(st.booleans()),
        direct_hosts=opt(st.lists(host_names, max_size=3)),
        direct_tags=opt(
            st.lists(st.builds(lambda k, v: f"{k}={v}", tag_keys, tag_values), max_size=3)
        ),
        methods=opt(st.lists(st.sampled_from(TransportMethod), min_size=1, max_size=3)),
        relays=opt(st.lists(st.text(min_size=1, max_size=12), max_size=2)),
        probe_interval=opt(durations),
        probe_timeout=opt(durations),
        probe_failures=opt(st.integers(1, 10)),
    ),
    AgentConfig: st.builds(AgentConfig, enabled=opt(st.booleans()), idle=opt(durations)),
    LogConfig: st.builds(
        LogConfig,
        level=opt(st.sampled_from(["debug", "info", "warning"])),
        format=opt(st.sampled_from(["text", "json"])),
        file=opt(text),
        dir=opt(text),
    ),
    HostOverrideConfig: st.builds(HostOverrideConfig, workspace=opt(text), ssh_user=opt(text)),
}
REGISTRY[PushBatch] = st.builds(
    PushBatch,
    first_lseq=st.integers(1, 2**40),
    events=st.lists(st.one_of([REGISTRY[tp] for tp in adt.Event.__args__]), min_size=1, max_size=3),
)
REGISTRY[ErrorEnvelope] = st.builds(ErrorEnvelope, error=REGISTRY[ErrorBody])
REGISTRY[ConfigFile] = st.builds(
    ConfigFile,
    remote_server=opt(text),
    token=opt(text),
    ca_file=opt(text),
    sync_ignores=opt(st.lists(text, max_size=3)),
    sync_engine=opt(st.sampled_from(["auto", "rsync", "mutagen"])),
    ssh=opt(REGISTRY[SshConfig]),
    fileset=opt(st.lists(fileset_configs, max_size=2)),
    timeouts=opt(REGISTRY[TimeoutsConfig]),
    concurrency=opt(REGISTRY[ConcurrencyConfig]),
    path_policy=opt(REGISTRY[PathPolicyConfig]),
    agent=opt(REGISTRY[AgentConfig]),
    log=opt(REGISTRY[LogConfig]),
    hosts=opt(st.dictionaries(host_names, REGISTRY[HostOverrideConfig], max_size=2)),
    enforced=opt(st.lists(enforced_keys, max_size=2)),
    session=opt(text),
)

UNIONS: dict[str, tuple[Any, st.SearchStrategy[Any]]] = {
    "ControlMessage": (
        adt.ControlMessage,
        st.one_of([REGISTRY[tp] for tp in adt.ControlMessage.__args__]),
    ),
    "Event": (adt.Event, st.one_of([REGISTRY[tp] for tp in adt.Event.__args__])),
    "PushMessage": (
        adt.PushMessage,
        st.one_of([REGISTRY[tp] for tp in adt.PushMessage.__args__]),
    ),
}


def exported_struct_types() -> set[type[msgspec.Struct]]:
    found = set()
    for name in adt.__all__:
        obj = getattr(adt, name)
        if isinstance(obj, type) and issubclass(obj, msgspec.Struct):
            found.add(obj)
    return found


def test_every_exported_struct_has_a_strategy() -> None:
    missing = sorted(t.__name__ for t in exported_struct_types() - REGISTRY.keys())
    assert not missing, f"add hypothesis strategies to REGISTRY for: {missing}"


def test_registry_holds_only_exported_structs() -> None:
    stale = sorted(t.__name__ for t in REGISTRY.keys() - exported_struct_types())
    assert not stale, f"REGISTRY has types not exported from ah_domain_types: {stale}"


def test_union_members_are_all_registered() -> None:
    for name, (union, _) in UNIONS.items():
        for member in union.__args__:
            assert member in REGISTRY, f"{name} member {member.__name__} has no strategy"


# The committed schema must describe what the types encode to.
_SCHEMA = load_committed_schema()


def _validator(def_name: str) -> jsonschema.protocols.Validator:
    return jsonschema.Draft202012Validator(
        {"$ref": f"#/$defs/{def_name}", "$defs": _SCHEMA["$defs"]}
    )


_VALIDATORS = {name: _validator(name) for name in [*(t.__name__ for t in REGISTRY), *UNIONS]}


def _check(value: Any, tp: Any, def_name: str) -> None:
    as_json = msgspec.json.encode(value)
    back = msgspec.json.decode(as_json, type=tp)
    assert back == value
    assert type(back) is type(value)
    as_msgpack = msgspec.msgpack.encode(value)
    back = msgspec.msgpack.decode(as_msgpack, type=tp)
    assert back == value
    assert type(back) is type(value)
    errors = [e.message for e in _VALIDATORS[def_name].iter_errors(msgspec.json.decode(as_json))]
    assert not errors, f"{def_name} encodes to a document its schema rejects: {errors}"


def test_every_registered_type_is_in_the_schema() -> None:
    missing = sorted(name for name in _VALIDATORS if name not in _SCHEMA["$defs"])
    assert not missing, f"types missing from the schema $defs: {missing}"


@pytest.mark.parametrize(
    "tp", sorted(REGISTRY, key=lambda t: t.__name__), ids=lambda t: getattr(t, "__name__", str(t))
)
@ROUNDTRIP
@given(data=st.data())
def test_struct_roundtrip(tp: type[msgspec.Struct], data: st.DataObject) -> None:
    """JSON and msgpack encode -> decode give back an equal value of the same type, and the
    JSON form validates against the type's schema definition."""
    _check(data.draw(REGISTRY[tp]), tp, tp.__name__)


@pytest.mark.parametrize("name", sorted(UNIONS))
@ROUNDTRIP
@given(data=st.data())
def test_union_roundtrip(name: str, data: st.DataObject) -> None:
    union, strategy = UNIONS[name]
    _check(data.draw(strategy), union, name)
