"""Agent Harbor fleet SSH bridge: one persistent paramiko transport per follower.

Host keys are pinned to the fingerprint the follower reported (no trust on first use), only
public-key authentication is used, every command is a new channel with line-streamed output,
and timeouts/cancellation kill the remote process group.
"""

from ah_ssh_bridge.errors import (
    HostKeyMismatch,
    SshAuthError,
    SshChannelError,
    SshConnectError,
    SshConnectionLost,
    SshError,
    SshKeyFileError,
)
from ah_ssh_bridge.lines import DEFAULT_MAX_LINE_CHARS, LineSplitter
from ah_ssh_bridge.pool import FingerprintLookup, SocketFactory, SshBridge, SshPool
from ah_ssh_bridge.remote import kill_group_script, wrap_command
from ah_ssh_bridge.transport import (
    DEFAULT_CIPHERS,
    IDLE_READ_TIMEOUT_S,
    PROBE_COMMAND,
    CommandOutput,
    ExecOutcome,
    OutputCallback,
    ProbeResult,
    SshOptions,
    SshTransport,
    StdinData,
    fingerprint_of_key_blob,
    normalize_fingerprint,
    tcp_connect,
)
from ah_ssh_bridge.warm import WarmCommand

__all__ = [
    "DEFAULT_CIPHERS",
    "DEFAULT_MAX_LINE_CHARS",
    "IDLE_READ_TIMEOUT_S",
    "PROBE_COMMAND",
    "CommandOutput",
    "ExecOutcome",
    "FingerprintLookup",
    "HostKeyMismatch",
    "LineSplitter",
    "OutputCallback",
    "ProbeResult",
    "SocketFactory",
    "SshAuthError",
    "SshBridge",
    "SshChannelError",
    "SshConnectError",
    "SshConnectionLost",
    "SshError",
    "SshKeyFileError",
    "SshOptions",
    "SshPool",
    "SshTransport",
    "StdinData",
    "WarmCommand",
    "fingerprint_of_key_blob",
    "kill_group_script",
    "normalize_fingerprint",
    "tcp_connect",
    "wrap_command",
]
