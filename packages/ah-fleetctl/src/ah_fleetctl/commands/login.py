"""``ah-fleetctl login``: pin the fleet CA, check the token, store both in the user config."""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import ssl
from pathlib import Path

import click
import msgspec
from loguru import logger

from ah_config import (
    CliError,
    ConfigPaths,
    confirm,
    echo_json,
    require_interaction,
    write_user_config,
)
from ah_domain_types import ExitCode

from ..context import FleetContext
from ..options import common_options

__all__ = ["CA_FILE_NAME", "LoginResult", "login", "normalize_fingerprint"]

CA_FILE_NAME = "fleet-ca.pem"
"""The pinned CA's file name, beside the user config file."""

_FINGERPRINT = re.compile(r"^(?:sha256:)?(?P<hex>(?:[0-9a-f]{2}:?){31}[0-9a-f]{2})$", re.IGNORECASE)


class LoginResult(msgspec.Struct, frozen=True, rename="camel"):
    """The ``--json`` document of ``login`` (never the token)."""

    access_point: str
    ca_fingerprint: str
    ca_file: str
    config_file: str
    followers_visible: int


def normalize_fingerprint(text: str) -> str:
    """``sha256:<64 lowercase hex>`` from ``sha256:HEX``, bare ``HEX`` or ``AB:CD:...``."""
    match = _FINGERPRINT.fullmatch(text.strip())
    if match is None:
        raise ValueError(
            f"invalid CA fingerprint {text!r}: expected sha256: followed by 64 hex digits "
            "(as printed by `ah-access-pointd init`)"
        )
    return "sha256:" + match["hex"].replace(":", "").lower()


def _fingerprint_option(
    ctx: click.Context, param: click.Parameter, value: str | None
) -> str | None:
    if value is None:
        return None
    try:
        return normalize_fingerprint(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), ctx=ctx, param=param) from None


def ca_fingerprint(pem: str) -> str:
    """``sha256:<hex>`` over the DER form of the (first) certificate in ``pem``: the same
    value as ``ah_connectivity.pki.ca_fingerprint`` and ``ah-access-pointd init`` print,
    computed with the stdlib so that the CLI need not load the QUIC stack."""
    der = ssl.PEM_cert_to_DER_cert(pem.strip())
    return "sha256:" + hashlib.sha256(der).hexdigest()


def _bootstrap_tls_context() -> ssl.SSLContext:
    """The only unverified TLS in the product: before login the leader has no trust anchor
    for the fleet's private CA, so the CA certificate itself is fetched without verifying
    the server. Nothing fetched this way is trusted until its sha256 matches the fingerprint
    the user got out of band (or confirmed); every later request verifies against it."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def _make_private_dirs(directory: Path) -> None:
    missing = [d for d in (directory, *directory.parents) if not d.exists()]
    for candidate in reversed(missing):
        with contextlib.suppress(FileExistsError):
            candidate.mkdir(mode=0o700)
            os.chmod(candidate, 0o700)  # mkdir's mode is filtered by the umask


def _store_ca(pem: str, directory: Path) -> Path:
    """Write the CA atomically as ``directory/fleet-ca.pem`` (0644: it is public)."""
    _make_private_dirs(directory)
    target = directory / CA_FILE_NAME
    temporary = directory / f".{CA_FILE_NAME}.{os.getpid()}.tmp"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        with os.fdopen(fd, "w", encoding="ascii") as handle:
            handle.write(pem if pem.endswith("\n") else pem + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, target)
    except BaseException:
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise
    return target


@click.command("login")
@click.option(
    "--ca-fingerprint",
    "expected_fingerprint",
    metavar="sha256:HEX",
    default=None,
    callback=_fingerprint_option,
    help="Fingerprint of the fleet CA (from the access point's operator); without it you are "
    "shown the fingerprint and asked to confirm (exit 10 under --non-interactive).",
)
@common_options
@click.pass_context
def login(ctx: click.Context, /, expected_fingerprint: str | None, **_: object) -> None:
    """Pin the fleet CA of an access point and store it with the URL and token.

    Fetches URL/api/v1/ca, refuses it unless its sha256 (over the DER certificate) matches
    --ca-fingerprint, checks that the token is accepted (GET /api/v1/followers, TLS verified
    against that CA), then writes remote-server, token and ca-file into the user config
    (mode 0600; the CA as fleet-ca.pem beside it; AH_HOME moves both).
    """
    app = FleetContext.of(ctx)
    url = app.access_point()
    token = app.token()
    if expected_fingerprint is None:
        # Fail before touching the network: the answer would need a person anyway.
        require_interaction(
            ctx, "confirming the fleet CA fingerprint (pass --ca-fingerprint sha256:HEX)"
        )
    from ..client import ApiClient, tls_context  # loads ah_api: see FleetContext.api_client

    with ApiClient(
        url,
        token=None,
        verify=_bootstrap_tls_context(),
        ca_description="nothing (bootstrap fetch of the CA)",
        connect_timeout_s=app.connect_timeout_s(),
    ) as bootstrap:
        pem = bootstrap.ca_pem()
    try:
        actual = ca_fingerprint(pem)
        verify = tls_context(ca_pem=pem)
    except (ValueError, ssl.SSLError) as exc:
        raise CliError(
            ExitCode.AUTH,
            f"access point {url} answered /api/v1/ca with something that is not a PEM "
            f"certificate ({exc}); nothing was stored",
            kind="caRefused",
            details={"url": url},
        ) from None

    if expected_fingerprint is None:
        click.echo(f"The access point {url} presents the fleet CA\n  {actual}", err=True)
        if not confirm(ctx, "Trust this CA and log in?"):
            raise CliError(
                ExitCode.AUTH,
                f"fleet CA {actual} of {url} was not confirmed; nothing was stored",
                kind="caRefused",
                details={"url": url, "actual": actual},
            )
    elif actual != expected_fingerprint:
        raise CliError(
            ExitCode.AUTH,
            f"fleet CA of {url} does not match: expected {expected_fingerprint}, the access "
            f"point presents {actual}; nothing was stored",
            kind="caMismatch",
            details={"url": url, "expected": expected_fingerprint, "actual": actual},
        )
    logger.debug("fleet CA {} of {} accepted", actual, url)

    with ApiClient(
        url,
        token=token,
        verify=verify,
        ca_description=f"the fetched fleet CA {actual}",
        connect_timeout_s=app.connect_timeout_s(),
    ) as api:
        visible = len(api.followers().followers)

    user_config = Path(str(ConfigPaths.for_platform().user))
    ca_path = _store_ca(pem, user_config.parent)
    written = write_user_config({"remote-server": url, "token": token, "ca-file": str(ca_path)})
    logger.debug("logged in to {}; settings stored in {}", url, written)

    if app.json:
        echo_json(
            LoginResult(
                access_point=url,
                ca_fingerprint=actual,
                ca_file=str(ca_path),
                config_file=str(written),
                followers_visible=visible,
            )
        )
        return
    click.echo(f"Logged in to {url} ({visible} follower{'s' if visible != 1 else ''} visible).")
    click.echo(f"Fleet CA {actual} pinned in {ca_path}")
    click.echo(f"remote-server, token and ca-file stored in {written}")
