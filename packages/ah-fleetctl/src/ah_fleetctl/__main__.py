"""``python -m ah_fleetctl``: the same as the ``ah-fleetctl`` console script."""

from ah_fleetctl.cli import main

main()
