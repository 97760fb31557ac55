"""What every command needs once its options are parsed: the resolved configuration, logging,
and an :class:`~ah_fleetctl.client.ApiClient` for the configured access point.

Commands call :meth:`FleetContext.of` (once per invocation; the result is cached on the root
click context). Configuration is resolved at the leaf command so that the global options may
be given before or after the command name (``ah-fleetctl --json fleet list`` and
``ah-fleetctl fleet list --json`` mean the same).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import click
from loguru import logger

from ah_config import CliError, Layer, ResolvedConfig, is_json, resolve_from_click
from ah_domain_types import ConfigFile, ExitCode
from ah_logging import (
    LogFileError,
    LoggingHandle,
    LogSettings,
    configure_logging,
    log_settings_from_click,
)

if TYPE_CHECKING:
    from .client import ApiClient

__all__ = ["BINARY", "DEFAULT_CONNECT_TIMEOUT_S", "FleetContext", "normalize_access_point"]

BINARY = "ah-fleetctl"
DEFAULT_CONNECT_TIMEOUT_S = 5.0
_META_KEY = "ah_fleetctl.context"
_FILE_LAYERS = frozenset({Layer.SYSTEM, Layer.USER, Layer.REPO, Layer.REPO_USER, Layer.CONFIG_FILE})

_API_BASE_PATH = "/api/v1"


def normalize_access_point(text: str, *, source: str = "--access-point") -> str:
    """``https://host:port`` from what the user wrote (a bare ``host:port`` gets ``https://``).

    Only ``https`` is accepted: the API never speaks plain HTTP outside ``--insecure-dev``.
    A malformed value is a configuration error (exit 8) naming ``source``.
    """
    value = text.strip()
    if "://" not in value:
        value = f"https://{value}"
    parts = urlsplit(value)
    if parts.scheme != "https" or not parts.hostname:
        raise CliError(
            ExitCode.CONFIGURATION,
            f"{source}: invalid access point URL {text!r}: expected https://HOST[:PORT]",
            kind="configuration",
            details={"value": text, "source": source},
        )
    try:
        parts.port  # noqa: B018 - urlsplit validates the port lazily
    except ValueError:
        raise CliError(
            ExitCode.CONFIGURATION,
            f"{source}: invalid port in access point URL {text!r}: expected https://HOST[:PORT]",
            kind="configuration",
            details={"value": text, "source": source},
        ) from None
    path = parts.path.rstrip("/")
    if path.endswith(_API_BASE_PATH):
        path = path[: -len(_API_BASE_PATH)].rstrip("/")
    return f"https://{parts.netloc}{path}"


@dataclass(frozen=True)
class FleetContext:
    """The resolved configuration of one ``ah-fleetctl`` invocation."""

    click_ctx: click.Context
    config: ResolvedConfig[ConfigFile]
    logging: LoggingHandle

    @classmethod
    def of(cls, ctx: click.Context) -> FleetContext:
        """Resolve configuration (flags, ``--config``, ``AH_*``, files) and set up logging."""
        root = ctx.find_root()
        cached = root.meta.get(_META_KEY)
        if isinstance(cached, FleetContext):
            return cached
        config = resolve_from_click(ctx)
        for var in config.unknown_env:
            click.echo(f"warning: ignoring {var}: it is not a configuration variable", err=True)
        flags = log_settings_from_click(ctx)
        try:
            configured = LogSettings.from_config(config.typed.log)
        except ValueError as exc:  # e.g. [log] level = "loud" in a config file
            raise CliError(
                ExitCode.CONFIGURATION,
                f"{config.where('log.level', unset='config [log]')}: {exc}",
                kind="configuration",
                details={"key": "log"},
            ) from None
        try:
            handle = configure_logging(BINARY, "cli", LogSettings.merged(flags, configured, "cli"))
        except ValueError as exc:  # bad RUST_LOG (--log-level is checked while parsing)
            raise click.UsageError(str(exc), ctx=ctx) from None
        except LogFileError as exc:
            raise CliError(
                ExitCode.CONFIGURATION,
                f"{exc.strerror} (--log-file/--log-dir or config [log])",
                kind="configuration",
                details={"key": "log"},
            ) from None
        fleet = cls(click_ctx=ctx, config=config, logging=handle)
        root.meta[_META_KEY] = fleet
        root.call_on_close(handle.close)
        return fleet

    # ------------------------------------------------------------------ flags

    @property
    def json(self) -> bool:
        """``--json`` (or ``AH_JSON=1``): stdout holds exactly one JSON document."""
        return is_json(self.click_ctx)

    # ------------------------------------------------------------------ settings

    def _origin(self, key: str) -> str:
        return self.config.where(key)

    def access_point(self) -> str:
        """The access point URL (``https://host:port``); exit 8 when none is configured."""
        value = self.config.typed.remote_server
        if not value:
            raise CliError(
                ExitCode.CONFIGURATION,
                "no access point configured: pass --access-point URL, set AH_REMOTE_SERVER, "
                "or run `ah-fleetctl login`",
                kind="configuration",
                details={"key": "remote-server"},
            )
        return normalize_access_point(value, source=self._origin("remote-server"))

    def token(self) -> str:
        """The user token; exit 8 when none is configured. Never log the value."""
        value = self.config.typed.token
        if not value:
            raise CliError(
                ExitCode.CONFIGURATION,
                "no user token configured: pass --token TOKEN, set AH_TOKEN, or run "
                "`ah-fleetctl login`",
                kind="configuration",
                details={"key": "token"},
            )
        return value

    def ca_file(self) -> Path | None:
        """The pinned fleet CA (config ``ca-file``); a relative path in a config file is taken
        relative to that file's directory."""
        value = self.config.typed.ca_file
        if not value:
            return None
        path = Path(value).expanduser()
        origin = self.config.origin("ca-file")
        if not path.is_absolute() and origin is not None and origin.layer in _FILE_LAYERS:
            path = Path(origin.source).parent / path
        return path

    def connect_timeout_s(self) -> float:
        timeouts = self.config.typed.timeouts
        seconds = timeouts.seconds("connect") if timeouts is not None else None
        return DEFAULT_CONNECT_TIMEOUT_S if seconds is None else max(seconds, 0.001)

    def api_client(self) -> ApiClient:
        """A client of the configured access point, TLS verified against the pinned CA (the
        system trust store when no ``ca-file`` is configured)."""
        base_url = self.access_point()
        token = self.token()
        ca_file = self.ca_file()
        # Imported here: ah_api pulls in litestar, which only the commands that talk to the
        # access point should pay for (help, usage errors and `config show` stay quick).
        from .client import ApiClient, tls_context

        if ca_file is None:
            verify = tls_context()
            what = "the system trust store (no ca-file configured; see `ah-fleetctl login`)"
        else:
            verify = tls_context(ca_file)
            what = f"the fleet CA {ca_file}"
        logger.debug("access point {} (TLS verified against {})", base_url, what)
        return ApiClient(
            base_url,
            token=token,
            verify=verify,
            ca_description=what,
            connect_timeout_s=self.connect_timeout_s(),
        )
