"""``ah-fleetctl paths``, ``proxy``, ``ssh-config`` and the hidden ``agent``: the data plane.

* ``paths [selectors] [--json]`` — the fixed path per follower (method, target, relay, RTT),
  selecting one where there is none yet. Exit 5 when a selected follower has no path.
* ``proxy HOST PORT`` — an OpenSSH ``ProxyCommand``: HOST (a follower name, or its
  ``ah-<name>`` alias) is reached over its fixed path's method — direct: plain TCP;
  connect/relay: a CONNECT tunnel — and stdin/stdout are pumped through it.
* ``ssh-config [selectors]`` — ``Host <follower>`` blocks with ``ProxyCommand ah-fleetctl
  proxy %h %p``, the configured user and key, a known-hosts file holding exactly the host
  keys verified against the fingerprints the followers reported over their control
  connections (``StrictHostKeyChecking yes``), and a ControlMaster per follower.

Paths come from the leader agent when it is enabled (it keeps them open between
invocations), else are selected in this process.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import sys
from collections.abc import Sequence
from pathlib import Path

import click
import msgspec

from ah_config import AhCommand, CliError, echo_json
from ah_domain_types import Event, ExitCode, FollowerStatus, TransportMethod, parse_host_port

from ..agent_proto import HostPath
from ..context import FleetContext
from ..options import common_options, parse_duration_option, selector_from_options, selector_options
from ..output import render_table
from .fleet import select_followers

__all__ = ["agent_command", "paths_command", "proxy_command", "ssh_config_command"]

_HEADERS = ("HOST", "METHOD", "TARGET", "RELAY", "RTT")


class PathsDocument(msgspec.Struct, frozen=True, rename="camel"):
    """``paths --json``."""

    paths: list[HostPath]
    events: list[Event] = []


def _no_agent_option(f: click.decorators.FC) -> click.decorators.FC:
    return click.option(
        "--no-agent",
        is_flag=True,
        default=None,
        help="Do not use (or start) the leader agent: select paths in this process "
        "(config agent.enabled = false does the same).",
    )(f)


def _mark_no_agent(ctx: click.Context, no_agent: bool | None) -> None:
    if no_agent:
        ctx.find_root().meta["ah_fleetctl.no_agent"] = True


async def _gather_paths(
    app: FleetContext, followers: Sequence[FollowerStatus]
) -> tuple[list[HostPath], list[Event]]:
    from ..agent import AgentError, agent_client

    client = await agent_client(app)
    if client is not None:
        try:
            reply = await client.paths([f.info.name for f in followers])
            return reply.paths, list(reply.events)
        except (AgentError, OSError) as exc:
            click.echo(f"warning: leader agent failed ({exc}); selecting paths here", err=True)
    from ..paths import establish_paths, make_path_connector

    events: list[Event] = []
    connector = await asyncio.to_thread(make_path_connector, app, emit=events.append)
    try:
        return await establish_paths(connector, followers), events
    finally:
        await connector.close()


def _selected(
    app: FleetContext, hosts: tuple[str, ...], tags: tuple[str, ...], all_: bool
) -> list[FollowerStatus]:
    selector = selector_from_options(hosts, tags, all_)
    with app.api_client() as api:
        everyone = api.followers().followers
    return select_followers(selector, everyone)


@click.command("paths", cls=AhCommand)
@selector_options
@_no_agent_option
@common_options
@click.pass_context
def paths_command(
    ctx: click.Context,
    /,
    hosts: tuple[str, ...],
    tags: tuple[str, ...],
    all_: bool,
    no_agent: bool | None,
    **_: object,
) -> None:
    """The fixed data-plane path per follower: method (direct, connect, relay), target,
    relaying access point and RTT estimate. A follower without a path gets one selected
    (direct → connect → relay under [path-policy]); one that cannot be reached is listed
    with the most informative reason, and the exit code is 5.

    With --json: {"paths": [{"host", "method", "target", "relay", "rttEstimateMs",
    "hostKey", "error", "kind", "failures"}], "events": [connect.path.* events]}.
    """
    _mark_no_agent(ctx, no_agent)
    app = FleetContext.of(ctx)
    followers = _selected(app, hosts, tags, all_)
    paths, events = asyncio.run(_gather_paths(app, followers))
    if app.json:
        echo_json(PathsDocument(paths=paths, events=events))
    else:
        rows = [
            (
                p.host,
                p.method.value if p.method is not None else "-",
                p.target or "-",
                p.relay or "-",
                f"{p.rtt_estimate_ms:.1f} ms" if p.rtt_estimate_ms is not None else "-",
            )
            for p in paths
        ]
        click.echo(render_table(_HEADERS, rows))
        for p in paths:
            if p.error:
                click.echo(f"error: {p.error}", err=True)
    if any(p.method is None for p in paths):
        ctx.exit(int(ExitCode.NETWORK))


# --------------------------------------------------------------------------- proxy


def _follower_named(followers: Sequence[FollowerStatus], host: str) -> FollowerStatus:
    from ..dataplane import SSH_ALIAS_PREFIX

    by_name = {f.info.name: f for f in followers}
    if host in by_name:
        return by_name[host]
    if host.startswith(SSH_ALIAS_PREFIX) and host[len(SSH_ALIAS_PREFIX) :] in by_name:
        return by_name[host[len(SSH_ALIAS_PREFIX) :]]
    raise CliError(
        ExitCode.VALIDATION,
        f"proxy: {host!r} is not a follower of this fleet (known: "
        f"{', '.join(sorted(by_name)) or 'none'})",
        kind="validation",
    )


def _open_path_socket(app: FleetContext, path: HostPath, name: str, port: int) -> socket.socket:
    """A socket to the follower's sshd over ``path`` (blocking)."""
    from ah_connectivity.connect_client import ConnectRefused, open_connect_tunnel
    from ah_ssh_bridge import SshError, tcp_connect

    from ..paths import make_path_connector

    timeout = app.connect_timeout_s()
    try:
        if path.method is TransportMethod.DIRECT:
            assert path.target is not None
            host, target_port = parse_host_port(path.target, default_port=22)
            return tcp_connect(name, host, target_port if port == 22 else port, timeout)
        connector = make_path_connector(app)
        dialer = connector.dialer
        if path.method is TransportMethod.CONNECT:
            endpoint = dialer.home
            target = f"{name}:{port}"
        else:
            endpoint = dialer.relays.get(path.relay or "")
            target = path.target or ""
            if port != 22:
                target = target.rsplit(":", 1)[0] + f":{port}"
        if endpoint is None or dialer.ca_pem is None:
            raise CliError(
                ExitCode.NETWORK,
                f"proxy: no access point to tunnel to {name} through ({path.method})",
                kind="network",
            )
        return open_connect_tunnel(
            endpoint.host,
            endpoint.connect_port,
            ca_pem=dialer.ca_pem,
            token=dialer.token,
            target=target,
            timeout=timeout,
        )
    except ConnectRefused as exc:
        code = ExitCode.AUTH if exc.status in (401, 403, 407) else ExitCode.NETWORK
        raise CliError(code, f"proxy {name}: {exc}") from None
    except (SshError, OSError) as exc:
        raise CliError(ExitCode.NETWORK, f"proxy {name}: {exc}", kind="network") from None


@click.command("proxy", cls=AhCommand)
@click.argument("host")
@click.argument("port", type=click.IntRange(1, 65535))
@_no_agent_option
@common_options
@click.pass_context
def proxy_command(
    ctx: click.Context, /, host: str, port: int, no_agent: bool | None, **_: object
) -> None:
    """OpenSSH ProxyCommand: connect stdin/stdout to HOST's sshd over its fixed path.

    Use as `ProxyCommand ah-fleetctl proxy %h %p` (see `ah-fleetctl ssh-config`). HOST is a
    follower name (or ah-<name>); PORT 22 means its sshd wherever it listens.
    """
    import socket

    from ah_connectivity.connect_client import pump_stdio

    _mark_no_agent(ctx, no_agent)
    app = FleetContext.of(ctx)
    with app.api_client() as api:
        follower = _follower_named(api.followers().followers, host)
    name = follower.info.name
    (path,), _events = asyncio.run(_gather_paths(app, [follower]))
    if path.method is None:
        raise CliError(ExitCode.NETWORK, path.error or f"proxy: no path to {name}", kind="network")
    sock = _open_path_socket(app, path, name, port)
    assert isinstance(sock, socket.socket)
    stats = pump_stdio(sock)
    if stats.outcome != "eof":
        raise CliError(
            ExitCode.NETWORK, f"proxy {name}: the tunnel broke: {stats.reason}", kind="network"
        )


# --------------------------------------------------------------------------- ssh-config


def _proxy_argv(app: FleetContext) -> list[str]:
    from ah_config import find_config_file

    script = Path(sys.argv[0])
    if script.name == "ah-fleetctl" and script.is_file():
        argv = [str(script.absolute())]
    elif found := shutil.which("ah-fleetctl"):
        argv = [found]
    else:
        argv = [sys.executable, "-m", "ah_fleetctl"]
    config = find_config_file(app.click_ctx)
    if config is not None:
        argv += ["--config", str(config.absolute())]
    return [*argv, "--access-point", app.access_point()]


@click.command("ssh-config", cls=AhCommand)
@selector_options
@click.option(
    "--known-hosts",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    metavar="FILE",
    help="Write the verified host keys here (default: a private file in the runtime dir).",
)
@click.option(
    "--control-persist",
    callback=parse_duration_option,
    default=None,
    metavar="DURATION",
    help="ControlPersist of the generated blocks (default 10m).",
)
@_no_agent_option
@common_options
@click.pass_context
def ssh_config_command(
    ctx: click.Context,
    /,
    hosts: tuple[str, ...],
    tags: tuple[str, ...],
    all_: bool,
    known_hosts: Path | None,
    control_persist: float | None,
    no_agent: bool | None,
    **_: object,
) -> None:
    """Print an OpenSSH client config with one `Host <follower>` block per reachable
    follower, so plain ssh, scp and rsync reach followers by name:
    `ssh -F <(ah-fleetctl ssh-config) lin-a true`.

    Every block uses `ProxyCommand ah-fleetctl proxy %h %p` (the fixed path), the configured
    ssh.user and ssh.identity-file, and a known-hosts file with exactly the host keys that
    were verified against the fingerprints the followers reported over their authenticated
    control connections (StrictHostKeyChecking yes: nothing is trusted on first use).
    Followers without a path are left out with a warning on stderr.
    """
    from ..dataplane import _config_value, control_dir, ssh_login
    from ..paths import runtime_dir

    _mark_no_agent(ctx, no_agent)
    app = FleetContext.of(ctx)
    followers = _selected(app, hosts, tags, all_)
    login = ssh_login(app)
    paths, _events = asyncio.run(_gather_paths(app, followers))
    reachable = [p for p in paths if p.method is not None and p.host_key]
    for p in paths:
        if p not in reachable:
            click.echo(f"warning: {p.host} left out: {p.error or 'no verified host key'}", err=True)
    known_lines = [f"{p.host} {p.host_key}" for p in reachable]
    if known_hosts is None:
        known_hosts = runtime_dir() / f"known_hosts-{os.getpid()}"
        digest = __import__("hashlib").sha256("\n".join(known_lines).encode()).hexdigest()[:16]
        known_hosts = runtime_dir() / f"known_hosts-{digest}"
    _write_private(known_hosts, "".join(f"{line}\n" for line in known_lines))
    proxy = " ".join(_shell_word(a) for a in _proxy_argv(app)) + " proxy %h %p"
    persist = control_persist if control_persist is not None else 600.0
    sockets = control_dir()
    out = [
        "# Generated by ah-fleetctl ssh-config: the leader's paths to its followers.",
        "# Host keys were verified against the fingerprints the followers reported over",
        "# their authenticated control connections.",
    ]
    for p in reachable:
        settings = {
            "HostName": p.host,
            "HostKeyAlias": p.host,
            "ProxyCommand": proxy,
            "User": login.user_for(p.host),
            "IdentityFile": str(login.identity_file),
            "IdentitiesOnly": "yes",
            "PasswordAuthentication": "no",
            "KbdInteractiveAuthentication": "no",
            "BatchMode": "yes",
            "StrictHostKeyChecking": "yes",
            "UserKnownHostsFile": str(known_hosts),
            "GlobalKnownHostsFile": "/dev/null",
            "UpdateHostKeys": "no",
            "CheckHostIP": "no",
            "ControlMaster": "auto",
            "ControlPath": str(sockets / "%C"),
            "ControlPersist": f"{max(1, round(persist))}s",
            "LogLevel": "ERROR",
        }
        out.append(f"\nHost {p.host}")
        out.extend(
            f"  {key} {value if key == 'ProxyCommand' else _config_value(key, value)}"
            for key, value in settings.items()
        )
    click.echo("\n".join(out))
    if not reachable and paths:
        ctx.exit(int(ExitCode.NETWORK))


def _shell_word(text: str) -> str:
    if text and all(c.isalnum() or c in "@%+=:,./-_" for c in text):
        return text
    return "'" + text.replace("'", "'\"'\"'") + "'"


def _write_private(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.replace(temporary, path)


# --------------------------------------------------------------------------- agent


@click.command("agent", cls=AhCommand, hidden=True)
@click.option("--socket", "socket_path", required=True, type=click.Path(path_type=Path))
@click.option("--idle", callback=parse_duration_option, default=None, metavar="DURATION")
@common_options
@click.pass_context
def agent_command(ctx: click.Context, /, socket_path: Path, idle: float | None, **_: object) -> int:
    """The leader agent (started by ah-fleetctl on first use; not for direct use)."""
    from ..agent import LeaderAgent, agent_idle_s

    app = FleetContext.of(ctx)
    agent = LeaderAgent(app, socket_path, idle if idle is not None else agent_idle_s(app))
    return asyncio.run(agent.serve())
