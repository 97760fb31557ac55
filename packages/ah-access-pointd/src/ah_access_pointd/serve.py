"""``serve``: the QUIC control server and the REST API over one state directory.

Start order: QUIC listener, then the API, then the ready file (written atomically, so a reader
never sees half of it). SIGTERM/SIGINT: stop the API, say Goodbye to every follower, close the
registry, exit 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import signal
import socket
from dataclasses import dataclass
from pathlib import Path

import msgspec
from loguru import logger

from ah_api import (
    ApiServer,
    ApiServerError,
    EndpointsResponse,
    EventHub,
    JwtAuthenticator,
    SseSettings,
    create_app,
)
from ah_config import CliError
from ah_connectivity import (
    ConnectProxyServer,
    DataChannelHub,
    TunnelBroker,
    TunnelRecord,
    token_authorizer,
    user_audience,
)
from ah_connectivity.leader_push import ControlAndPushServer
from ah_domain_types import ExitCode

from . import __version__
from .events_store import EVENTS_DB_FILE, EventStore, EventStoreError
from .fleet import AccessPointFleet
from .registry import FleetRegistry, RegistryError
from .sessions import SessionService
from .state import ApState

__all__ = ["ReadyFile", "ServeOptions", "run_serve", "write_json_atomically"]

_log = logger.bind(component="ah-access-pointd.serve")


@dataclass(frozen=True)
class ServeOptions:
    bind: str = "127.0.0.1"
    quic_port: int = 0
    api_port: int = 0
    connect_port: int | None = None
    """TCP port of the TLS CONNECT listener (None or 0: any free port)."""
    ready_file: Path | None = None
    heartbeat_interval_ms: int = 5_000
    unhealthy_after_intervals: int = 3
    offline_after_intervals: int = 6
    advertise_host: str | None = None
    """Host followers are told to dial for QUIC; default: the bind address, or this machine's
    host name when binding a wildcard address."""
    # -- session events (issue 7) --
    sse_keepalive_s: float = 15.0
    """An idle SSE stream gets a ``: ka`` comment this often."""
    sse_queue_size: int = 10_000
    """Live events an SSE client may lag behind before it is disconnected (it resumes)."""


class ReadyFile(msgspec.Struct, frozen=True, rename="camel"):
    """What ``--ready-file`` receives once every listener accepts connections."""

    pid: int
    bind: str
    quic_port: int
    api_port: int
    connect_port: int | None
    ca_fingerprint: str
    trust_domain: str


@dataclass
class _Endpoints:
    """The bound listener ports, as ``GET /api/v1/endpoints`` reports them."""

    trust_domain: str
    connect_port: int | None = None
    quic_port: int | None = None

    def response(self) -> EndpointsResponse:
        return EndpointsResponse(
            connect_port=self.connect_port,
            quic_port=self.quic_port,
            trust_domain=self.trust_domain,
        )


def write_json_atomically(path: Path, value: object) -> None:
    """Write JSON to a temporary file beside `path`, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        temporary.write_bytes(msgspec.json.encode(value) + b"\n")
        os.replace(temporary, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()


def _advertised_host(bind: str, override: str | None) -> str:
    if override:
        host = override
    else:
        try:
            wildcard = ipaddress.ip_address(bind).is_unspecified
        except ValueError:
            wildcard = False
        host = socket.gethostname() if wildcard else bind
    return f"[{host}]" if ":" in host else host


async def run_serve(state: ApState, options: ServeOptions) -> int:
    """Serve until SIGTERM/SIGINT; return the exit code. Raises CliError when a listener
    cannot start (exit 5) or the registry cannot be opened (exit 8)."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    received: list[str] = []

    def on_signal(sig: signal.Signals) -> None:
        received.append(sig.name)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)

    try:
        registry = FleetRegistry(state.db_path)
    except RegistryError as exc:
        raise CliError(ExitCode.CONFIGURATION, str(exc)) from None
    fleet = AccessPointFleet(
        state,
        registry,
        heartbeat_interval_ms=options.heartbeat_interval_ms,
        unhealthy_after_intervals=options.unhealthy_after_intervals,
        offline_after_intervals=options.offline_after_intervals,
    )
    # -- session events (issue 7): event store + live hub; leaders push on the QUIC port --
    try:
        events = EventStore(state.state_dir / EVENTS_DB_FILE)
    except EventStoreError as exc:
        registry.close()
        raise CliError(ExitCode.CONFIGURATION, str(exc)) from None
    sessions = SessionService(
        events, EventHub(), state.signer.verifier(), fleet, trust_domain=state.trust_domain
    )
    # ----------------------------------------------------------------------------------------
    control = ControlAndPushServer(
        push_ingest=sessions,
        identity=state.identity,
        ca=state.ca,
        trust_domain=state.trust_domain,
        handler=fleet,
        heartbeat_interval_ms=options.heartbeat_interval_ms,
        unhealthy_after_intervals=options.unhealthy_after_intervals,
        server_version=__version__,
    )
    api: ApiServer | None = None
    # -- data plane (issue 4): CONNECT listener, tunnels over the followers' connections --
    data_hub = DataChannelHub(state.ca, state.trust_domain)
    broker = TunnelBroker(
        control.follower, data_hub=data_hub, methods=("data", "quic"), dst_host="127.0.0.1"
    )
    proxy = ConnectProxyServer(
        identity=state.identity,
        ca=state.ca,
        authorize=token_authorizer(state.signer.verifier()),
        knows_follower=lambda name: registry.get(name) is not None,
        open_tunnel=broker.open,
        data_hub=data_hub,
        relay=True,
        on_tunnel_closed=_log_tunnel,
    )
    proxy_started = False
    endpoints = _Endpoints(state.trust_domain)
    try:
        try:
            quic_port = await control.start(options.bind, options.quic_port)
        except OSError as exc:
            raise CliError(
                ExitCode.NETWORK,
                f"cannot listen for QUIC on {options.bind}:{options.quic_port}/udp: "
                f"{exc.strerror or exc}",
                details={"bind": options.bind, "port": str(options.quic_port)},
            ) from None
        fleet.quic_address = f"{_advertised_host(options.bind, options.advertise_host)}:{quic_port}"
        try:
            connect_port = await proxy.start(options.bind, options.connect_port or 0)
        except OSError as exc:
            raise CliError(
                ExitCode.NETWORK,
                f"cannot listen for CONNECT on {options.bind}:{options.connect_port or 0}/tcp: "
                f"{exc.strerror or exc}",
                details={"bind": options.bind, "port": str(options.connect_port or 0)},
            ) from None
        proxy_started = True
        endpoints.connect_port = connect_port
        endpoints.quic_port = quic_port
        sessions.push_host = _advertised_host(options.bind, options.advertise_host).strip("[]")
        sessions.push_port = quic_port
        authenticator = JwtAuthenticator(state.signer.verifier(), user_audience(state.trust_domain))
        api = ApiServer(
            create_app(
                fleet,
                authenticator,
                version=__version__,
                sessions=sessions,
                sse=SseSettings(
                    keepalive_s=options.sse_keepalive_s, queue_size=options.sse_queue_size
                ),
                endpoints=endpoints.response,
            ),
            certfile=state.server_cert_path,
            keyfile=state.server_key_path,
        )
        try:
            api_port = await api.start(options.bind, options.api_port)
        except ApiServerError as exc:
            raise CliError(
                ExitCode.NETWORK,
                f"cannot serve the API on {options.bind}:{options.api_port}/tcp: {exc}",
                details={"bind": options.bind, "port": str(options.api_port)},
            ) from None
        fleet.ready = True
        ready = ReadyFile(
            pid=os.getpid(),
            bind=options.bind,
            quic_port=quic_port,
            api_port=api_port,
            connect_port=connect_port,
            ca_fingerprint=state.ca.fingerprint,
            trust_domain=state.trust_domain,
        )
        if options.ready_file is not None:
            write_json_atomically(options.ready_file, ready)
        _log.info(
            "access point ready: QUIC {}:{}/udp, CONNECT {}:{}/tcp, API https://{}:{} "
            "(trust domain {}, CA {})",
            options.bind,
            quic_port,
            options.bind,
            connect_port,
            options.bind,
            api_port,
            state.trust_domain,
            state.ca.fingerprint,
        )
        await stop.wait()
        _log.info("received {}: shutting down", received[0] if received else "stop")
    finally:
        fleet.ready = False
        sessions.hub.close()  # session event streams end now instead of holding up the stop
        if api is not None:
            await api.stop()
        if proxy_started:
            await proxy.close()
        await broker.close()
        await control.close("access point shutting down")
        fleet.close()
        registry.close()
        events.close()
        _ignore_further_signals(loop)
        if options.ready_file is not None:
            _remove_own_ready_file(options.ready_file)
    _log.info("access point stopped")
    return int(ExitCode.OK)


def _log_tunnel(record: TunnelRecord) -> None:
    """Who opened which tunnel to which follower (the listener logs the details too)."""
    _log.bind(tunnel=msgspec.to_builtins(record)).debug(
        "tunnel {} closed: subject {!r} reached follower {!r} port {} via {}{} from {} "
        "({} bytes up, {} down, {:.3f}s, {})",
        record.tunnel_id,
        record.subject,
        record.follower,
        record.port,
        record.method,
        f" (relay to {record.relay})" if record.relay else "",
        record.client,
        record.bytes_up,
        record.bytes_down,
        record.duration_s,
        record.outcome,
    )


def _ignore_further_signals(loop: asyncio.AbstractEventLoop) -> None:
    """We are stopping anyway: a repeated SIGTERM (a supervisor signalling the process group and
    then each process) must not turn a clean exit into death by signal. Taking the handlers off
    the loop first keeps loop.close() from restoring the default action."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.remove_signal_handler(sig)
        signal.signal(sig, signal.SIG_IGN)


def _remove_own_ready_file(path: Path) -> None:
    """A stale ready file would tell the next reader to wait on a dead process."""
    try:
        current = msgspec.json.decode(path.read_bytes(), type=ReadyFile)
    except (OSError, msgspec.DecodeError):
        return
    if current.pid == os.getpid():
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
