"""The ``ah-fleetctl`` entry point.

``main()`` first offers the invocation to the thin ``run`` path (:mod:`ah_fleetctl.thin`:
the standard library only, talking to the running leader agent); only when that declines is
the full click application (:mod:`ah_fleetctl.app`) imported. ``cli`` (the root click group)
is still importable from here, loaded on first access.
"""

import os
import sys

TYPE_CHECKING = False  # not typing's: importing typing would cost the thin path ~10 modules
if TYPE_CHECKING:
    from typing import Any

__all__ = ["main"]  # and ``cli``, loaded on first access (module __getattr__)


def main() -> None:
    """Console-script entry point (exits with the documented exit code)."""
    from .thin import try_thin_run

    code = try_thin_run(sys.argv[1:])
    if code is not None:
        # The agent ran it and everything went out through os.write: leave without the
        # interpreter's teardown (module and GC clean-up, ~2 ms of a ~40 ms warm run). Nothing
        # on this path registers atexit work or buffers output; the flush is a safeguard.
        for stream in (sys.stdout, sys.stderr):
            try:  # noqa: SIM105 - contextlib is not loaded on this path
                stream.flush()
            except (OSError, ValueError, AttributeError):
                pass
        os._exit(code)
    from .app import main as full_main

    full_main()


def __getattr__(name: str) -> "Any":
    if name == "cli":
        from .app import cli

        return cli
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
