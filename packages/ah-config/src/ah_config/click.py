"""click integration: options that feed the flag layer without ever shadowing config.

A :func:`config_option` has no click default: when the user does not type it, its value is
``None`` and the configuration (files, ``AH_*``, defaults) decides. Only options whose
:meth:`click.Context.get_parameter_source` is ``COMMANDLINE`` become the flag layer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar, overload

import click
import msgspec
from click.core import ParameterSource

from ah_domain_types import (
    ACCEPTED_DURATION_FORMS,
    DomainValidationError,
    TagSelector,
    parse_duration,
)
from ah_domain_types.config_schema import ConfigFile

from .errors import ConfigError
from .keys import format_key, parse_key
from .loader import load_config
from .resolved import ResolvedConfig
from .writer import write_user_config

__all__ = [
    "ConfigFileOption",
    "ConfigOption",
    "collect_flag_values",
    "config_file_option",
    "config_option",
    "duration_callback",
    "find_config_file",
    "resolve_from_click",
    "tags_callback",
    "write_user_config",
]

S = TypeVar("S", bound=msgspec.Struct)
FC = TypeVar("FC", bound=Callable[..., Any] | click.Command)


class ConfigOption(click.Option):
    """A click option bound to a dotted configuration key; it never has a default."""

    def __init__(
        self,
        param_decls: Sequence[str] | None = None,
        *,
        config_key: str,
        **attrs: Any,
    ) -> None:
        _check_no_default(config_key, attrs)
        attrs["default"] = None
        super().__init__(param_decls, **attrs)
        self.config_key = format_key(parse_key(config_key))

    def flag_name(self, value: object) -> str:
        """The spelling the user typed, as best we can tell (``--no-x`` for a false flag)."""
        if value is False and self.secondary_opts:
            return max(self.secondary_opts, key=len)
        return max(self.opts, key=len)


class ConfigFileOption(click.Option):
    """Marks the ``--config FILE`` option that :func:`resolve_from_click` reads."""


def _check_no_default(config_key: str, attrs: Mapping[str, Any]) -> None:
    if attrs.get("default") is not None:
        raise TypeError(
            f"option for config key {config_key!r} has default={attrs['default']!r}; a click "
            "default would shadow configured values — put defaults in the config DEFAULTS"
        )
    if attrs.get("envvar") is not None:
        raise TypeError(
            f"option for config key {config_key!r} has envvar=...; AH_* variables reach it "
            "through the configuration's environment layer"
        )
    if attrs.get("required"):
        raise TypeError(
            f"option for config key {config_key!r} is required=True; the configuration may "
            "supply it, so check for a missing value after resolving"
        )


def config_option(key: str, *param_decls: str, **kwargs: Any) -> Callable[[FC], FC]:
    """``click.option`` for config key ``key`` (``"ssh.identity-file"``).

    Passing a ``default`` (other than None), ``envvar`` or ``required=True`` raises
    ``TypeError``: each would let the command line shadow the configuration.
    """
    _check_no_default(key, kwargs)
    kwargs.pop("default", None)
    cls = kwargs.pop("cls", ConfigOption)
    if not (isinstance(cls, type) and issubclass(cls, ConfigOption)):
        raise TypeError(f"cls must be a ConfigOption subclass, not {cls!r}")
    parse_key(key)  # fail at import time on a malformed key
    return click.option(*param_decls, cls=cls, config_key=key, **kwargs)


def config_file_option(*param_decls: str, **kwargs: Any) -> Callable[[FC], FC]:
    """The ``--config FILE`` option (a TOML file layered above the environment)."""
    kwargs.setdefault("type", click.Path(exists=True, dir_okay=False, path_type=Path))
    kwargs.setdefault("metavar", "FILE")
    kwargs.setdefault(
        "help", "Extra TOML config file, above AH_* variables and below command-line flags."
    )
    kwargs["default"] = None
    return click.option(
        *(param_decls or ("--config", "config_file")), cls=ConfigFileOption, **kwargs
    )


def _chain(ctx: click.Context) -> Iterator[click.Context]:
    """``ctx`` and its parents, innermost first."""
    current: click.Context | None = ctx
    while current is not None:
        yield current
        current = current.parent


def collect_flag_values(ctx: click.Context) -> tuple[dict[str, Any], dict[str, str]]:
    """Values of :class:`ConfigOption`\\ s the user typed, from the root context down to
    ``ctx`` (an inner command's flag wins), as ``({key: value}, {key: "--flag"})``."""
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for current in reversed(list(_chain(ctx))):
        for param in current.command.params:
            if not isinstance(param, ConfigOption) or param.name is None:
                continue
            if current.get_parameter_source(param.name) is not ParameterSource.COMMANDLINE:
                continue
            value = current.params.get(param.name)
            if value is None:
                continue
            values[param.config_key] = value
            sources[param.config_key] = param.flag_name(value)
    return values, sources


def find_config_file(ctx: click.Context) -> Path | None:
    """The ``--config FILE`` given to ``ctx`` or the nearest parent that has one."""
    for current in _chain(ctx):
        for param in current.command.params:
            if isinstance(param, ConfigFileOption) and param.name is not None:
                value = current.params.get(param.name)
                if value is not None:
                    return Path(value)
    return None


@overload
def resolve_from_click(
    ctx: click.Context,
    *,
    schema: None = None,
    defaults: ConfigFile | None = None,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    platform: str | None = None,
    home: Path | None = None,
) -> ResolvedConfig[ConfigFile]: ...


@overload
def resolve_from_click(
    ctx: click.Context,
    *,
    schema: type[S],
    defaults: S | None = None,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    platform: str | None = None,
    home: Path | None = None,
) -> ResolvedConfig[S]: ...


def resolve_from_click(
    ctx: click.Context,
    *,
    schema: type[msgspec.Struct] | None = None,
    defaults: msgspec.Struct | None = None,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    platform: str | None = None,
    home: Path | None = None,
) -> ResolvedConfig[Any]:
    """Load the configuration for a running command: ``--config`` and the typed
    :class:`ConfigOption`\\ s of ``ctx`` and its parents, plus files and ``AH_*``.

    A flag value the schema rejects becomes a ``click.BadParameter`` (exit 2) naming the
    flag; every other problem is a :class:`ConfigError` (exit 8).
    """
    values, sources = collect_flag_values(ctx)
    try:
        return load_config(
            cwd=cwd,
            env=env,
            config_file=find_config_file(ctx),
            flag_values=values,
            flag_sources=sources,
            platform=platform,
            home=home,
            schema=ConfigFile if schema is None else schema,
            defaults=defaults,
        )
    except ConfigError as exc:
        if exc.layer != "flag":
            raise
        raise click.BadParameter(
            exc.message.split(": ", 1)[-1], ctx=ctx, param_hint=exc.source
        ) from None


def duration_callback(
    ctx: click.Context, param: click.Parameter, value: str | None
) -> float | None:
    """Option callback: ``500ms``, ``30s``, ``1m30s``, ``2h`` or a number of seconds →
    seconds (> 0); anything else is a usage error (exit 2) naming the option."""
    if value is None:
        return None
    try:
        seconds = parse_duration(value)
    except DomainValidationError as exc:
        raise click.BadParameter(str(exc), ctx=ctx, param=param) from None
    if seconds <= 0:
        raise click.BadParameter(
            f"{value!r} must be longer than 0; expected {ACCEPTED_DURATION_FORMS}",
            ctx=ctx,
            param=param,
        )
    return seconds


def tags_callback(
    ctx: click.Context, param: click.Parameter, values: Sequence[str]
) -> dict[str, str]:
    """Option callback for a repeatable ``--tag K=V``: the tags as a dict (the last value of
    a key wins); a malformed one is a usage error (exit 2) naming the option."""
    tags: dict[str, str] = {}
    for text in values:
        try:
            selector = TagSelector.parse(text)
        except DomainValidationError as exc:
            raise click.BadParameter(str(exc), ctx=ctx, param=param) from None
        tags[selector.key] = selector.value
    return tags
