"""Every test here builds network namespaces: without root and iproute2 they are skipped, with
the reason, unless ``AH_REQUIRE_NETNS=1`` (set by ``.ci/run`` when it runs as root) makes
that a failure, so CI cannot skip them unnoticed."""

from __future__ import annotations

import os

import pytest

from ah_harness_containers import unavailable_reason


@pytest.fixture(autouse=True, scope="session")
def _network_lab_possible() -> None:
    reason = unavailable_reason()
    if reason is None:
        return
    if os.environ.get("AH_REQUIRE_NETNS") == "1":
        pytest.fail(f"AH_REQUIRE_NETNS=1 but no network lab can be built here: {reason}")
    # Not a missing feature: a machine without root or iproute2 cannot build the lab at
    # all; CI (root) sets AH_REQUIRE_NETNS=1 above, so this skip never happens there.
    pytest.skip(f"no network lab here: {reason}")
