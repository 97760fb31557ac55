"""ah-access-pointd: the Agent Harbor fleet access point daemon.

``init`` creates the fleet CA, the server identity and the token-signing key in a state
directory; ``serve`` runs the QUIC control server for followers and the REST API over the
SQLite fleet registry; ``token enroll`` / ``token user`` mint tokens. See README.md.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
