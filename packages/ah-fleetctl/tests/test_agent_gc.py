"""The leader agent's garbage-collection policy (``ah_fleetctl.agent.GcPolicy``), with the
real collector, in a fresh interpreter (it changes process-wide collector settings)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import gc, weakref
    from ah_fleetctl.agent import GcPolicy

    class Node:
        pass

    def cycle():
        a, b = Node(), Node()
        a.b, b.a = b, a
        return a

    kept = [cycle()]  # alive at start-up: frozen with everything else
    frozen_then_dead = weakref.ref(kept[0])
    policy = GcPolicy(young_threshold=50_000, full_after_idle_s=2.0)
    policy.start()
    assert gc.get_freeze_count() > 0, "nothing frozen"
    assert gc.get_threshold()[0] == 50_000, gc.get_threshold()

    young = weakref.ref(cycle())  # garbage made during a request
    for _ in range(2_000):  # more new objects than the default threshold (700)
        cycle()
    assert young() is not None, "collected in the middle of a request"
    assert not policy.full_due
    policy.after_request()
    assert young() is None, "the young garbage outlived the request"
    assert policy.full_due

    kept.clear()  # a frozen object dies (a transport closed since start-up)
    policy.after_request()
    assert frozen_then_dead() is not None, "a young collection walked the frozen objects"
    policy.when_idle(1.0)
    assert frozen_then_dead() is not None and policy.full_due, "full collection before idle"
    policy.when_idle(2.5)
    assert frozen_then_dead() is None, "the idle full collection missed frozen garbage"
    assert not policy.full_due and gc.get_freeze_count() > 0
    print("ok")
    """
)


def test_collections_run_between_requests_and_in_idle_time_not_during_one() -> None:
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
