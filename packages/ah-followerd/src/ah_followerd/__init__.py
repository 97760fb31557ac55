"""ah-followerd: the Agent Harbor fleet follower daemon.

``enroll`` exchanges a one-time token for a certificate (pinning the fleet CA by the
fingerprint the token carries); ``run`` keeps a QUIC control connection to the access point
up (Hello, heartbeats, reconnect with backoff, Goodbye on SIGTERM) and answers RPCs.
See README.md.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
