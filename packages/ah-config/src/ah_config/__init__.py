"""ah-config: layered TOML configuration for Agent Harbor fleet.

Precedence, lowest first: system, user, repo (``<repo>/.agents/config.toml``), repo-user
(``<repo>/.agents/config.user.toml``), environment (``AH_*``), ``--config FILE``,
command-line flags; defaults fill only what no layer set. Every leaf key records where it
came from. ``ah_config.click`` ties this to click options without letting a click default
shadow configuration; ``ah_config.cli`` holds the CLI contract shared by every binary.
"""

from __future__ import annotations

from .cli import (
    AhCommand,
    AhGroup,
    CliError,
    confirm,
    echo_json,
    format_toml_value,
    global_options,
    is_interactive,
    is_json,
    is_non_interactive,
    make_config_show_command,
    require_interaction,
)
from .click import (
    ConfigFileOption,
    ConfigOption,
    collect_flag_values,
    config_file_option,
    config_option,
    duration_callback,
    find_config_file,
    resolve_from_click,
    tags_callback,
)
from .errors import ConfigError
from .keys import KeyPath, format_key, parse_key
from .loader import (
    DEFAULT_ENV_ALIASES,
    ENV_PREFIX,
    NON_CONFIG_ENV_VARS,
    StateLayer,
    daemon_log_config,
    environment_layer,
    flag_layer,
    load_config,
    read_config_file,
)
from .paths import (
    ConfigPaths,
    PlatformName,
    find_repo_root,
    home_from_env,
    normalize_platform,
    repo_config_paths,
)
from .resolved import (
    REDACTED,
    ConfigEntry,
    Layer,
    LayerInput,
    LayerSource,
    Origin,
    OverrideAttempt,
    ResolvedConfig,
    UnknownConfigKeyError,
    is_secret_key,
    merge_layers,
)
from .schema import env_leaves, env_var_name
from .writer import write_user_config

__all__ = [
    "DEFAULT_ENV_ALIASES",
    "ENV_PREFIX",
    "NON_CONFIG_ENV_VARS",
    "REDACTED",
    "AhCommand",
    "AhGroup",
    "CliError",
    "ConfigEntry",
    "ConfigError",
    "ConfigFileOption",
    "ConfigOption",
    "ConfigPaths",
    "KeyPath",
    "Layer",
    "LayerInput",
    "LayerSource",
    "Origin",
    "OverrideAttempt",
    "PlatformName",
    "ResolvedConfig",
    "StateLayer",
    "UnknownConfigKeyError",
    "collect_flag_values",
    "config_file_option",
    "config_option",
    "confirm",
    "daemon_log_config",
    "duration_callback",
    "echo_json",
    "env_leaves",
    "env_var_name",
    "environment_layer",
    "find_config_file",
    "find_repo_root",
    "flag_layer",
    "format_key",
    "format_toml_value",
    "global_options",
    "home_from_env",
    "is_interactive",
    "is_json",
    "is_non_interactive",
    "is_secret_key",
    "load_config",
    "make_config_show_command",
    "merge_layers",
    "normalize_platform",
    "parse_key",
    "read_config_file",
    "repo_config_paths",
    "require_interaction",
    "resolve_from_click",
    "tags_callback",
    "write_user_config",
]
