"""ah-fleetctl: the Agent Harbor fleet leader's CLI (click).

Commands: ``login``, ``fleet list``, ``exec --mock``, ``config show``. Entry point
:func:`ah_fleetctl.cli.main`; the REST client is :class:`ah_fleetctl.client.ApiClient`.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
