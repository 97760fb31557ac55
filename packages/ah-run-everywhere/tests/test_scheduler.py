"""ShardScheduler: placement rules, host loss, cancellation, over random event orders."""

from __future__ import annotations

from collections import Counter, defaultdict

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ah_domain_types import HostState, OsKind
from ah_run_everywhere import (
    Assignment,
    JobOutcome,
    SchedulerError,
    SchedulingMode,
    ShardScheduler,
)

OK = JobOutcome(state=HostState.OK, exit_code=0, took_ms=1)


def host_sets() -> st.SearchStrategy[list[tuple[str, OsKind]]]:
    return st.lists(st.sampled_from(list(OsKind)), min_size=1, max_size=7).map(
        lambda oses: [(f"h{i}", os) for i, os in enumerate(oses)]
    )


command_lists = st.lists(
    st.text(alphabet="abcdefgh -", min_size=1, max_size=6), min_size=1, max_size=8
)
modes = st.sampled_from(["every-host", "once-per-os"])
finish_states = st.sampled_from(
    [HostState.OK, HostState.FAILED, HostState.TIMEOUT, HostState.CANCELLED]
)


class Simulation:
    """Feeds a scheduler and checks every invariant after every event."""

    def __init__(self, hosts: list[tuple[str, OsKind]], commands: list[str], mode: str):
        self.hosts = dict(hosts)
        self.commands = commands
        self.mode: SchedulingMode = "every-host" if mode == "every-host" else "once-per-os"
        self.scheduler = ShardScheduler(hosts, commands, self.mode)
        self.ready: set[str] = set()
        self.lost: set[str] = set()
        self.running: dict[str, Assignment] = {}  # host -> its running job
        self.assigned: Counter[int] = Counter()
        self.finished_by_event: dict[int, HostState] = {}

    def collect(self) -> None:
        for a in self.scheduler.next_assignments():
            assert a.host not in self.lost, f"job {a.job_id} assigned to lost host {a.host}"
            assert a.host in self.ready, f"job {a.job_id} assigned to a host not yet ready"
            assert a.host not in self.running, f"two jobs at once on {a.host}"
            assert self.hosts[a.host] == a.os, "job assigned to a host of another OS"
            assert a.command == self.commands[a.command_index]
            self.assigned[a.job_id] += 1
            assert self.assigned[a.job_id] == 1, f"job {a.job_id} assigned twice (re-run)"
            self.running[a.host] = a
        assert {a.job_id for a in self.scheduler.running_jobs()} == {
            a.job_id for a in self.running.values()
        }

    def make_ready(self, host: str) -> None:
        self.scheduler.host_ready(host)
        if host not in self.lost:
            self.ready.add(host)
        self.collect()

    def finish(self, host: str, state: HostState) -> None:
        job = self.running.pop(host)
        self.scheduler.job_finished(job.job_id, JobOutcome(state=state, took_ms=5))
        self.finished_by_event[job.job_id] = state
        self.collect()

    def lose(self, host: str) -> None:
        self.scheduler.host_lost(host, "connection reset")
        self.lost.add(host)
        self.ready.discard(host)
        self.running.pop(host, None)
        self.collect()


@settings(max_examples=150, deadline=None)
@given(hosts=host_sets(), commands=command_lists, mode=modes, data=st.data())
def test_invariants_hold_over_random_event_orders(
    hosts: list[tuple[str, OsKind]], commands: list[str], mode: str, data: st.DataObject
) -> None:
    sim = Simulation(hosts, commands, mode)
    names = [h for h, _ in hosts]
    allow_loss = data.draw(st.booleans(), label="allow_loss")
    steps = 0
    handed_out: list[int] = []
    while not sim.scheduler.done:
        steps += 1
        assert steps < 500, "simulation does not converge"
        actions: list[str] = []
        if any(h not in sim.ready and h not in sim.lost for h in names):
            actions.append("ready")
        if sim.running:
            actions.append("finish")
        if allow_loss and len(sim.lost) < len(names):
            actions.append("lose")
        assert actions, "scheduler not done but no event can make progress"
        action = data.draw(st.sampled_from(actions), label="action")
        if action == "ready":
            pending = sorted(h for h in names if h not in sim.ready and h not in sim.lost)
            sim.make_ready(data.draw(st.sampled_from(pending), label="host"))
        elif action == "finish":
            host = data.draw(st.sampled_from(sorted(sim.running)), label="host")
            sim.finish(host, data.draw(finish_states, label="state"))
        else:
            alive = sorted(h for h in names if h not in sim.lost)
            sim.lose(data.draw(st.sampled_from(alive), label="host"))
        # What the engine emits as jobs end: each report once, each batch in job-id order.
        batch = [r.job_id for r in sim.scheduler.take_new_reports()]
        assert batch == sorted(batch)
        handed_out += batch

    reports = sim.scheduler.report()
    assert sorted(handed_out) == [r.job_id for r in reports]
    assert sim.scheduler.take_new_reports() == []
    # Every job is reported exactly once.
    assert len(reports) == sim.scheduler.job_count
    assert len({r.job_id for r in reports}) == len(reports)
    oses_present = {os for _, os in hosts}
    if sim.mode == "once-per-os":
        # Each command exactly once per OS present.
        per_os = Counter((r.os, r.command_index) for r in reports)
        assert per_os == Counter((os, i) for os in oses_present for i in range(len(commands)))
    else:
        per_host = Counter((r.queued_on, r.command_index) for r in reports)
        assert per_host == Counter((h, i) for h in names for i in range(len(commands)))
    for r in reports:
        assert r.os == sim.hosts[r.queued_on]
        if r.job_id in sim.finished_by_event:
            # Assigned and finished: reported with the state the engine gave.
            assert r.host is not None and sim.assigned[r.job_id] == 1
            assert r.state is sim.finished_by_event[r.job_id]
        else:
            # Never finished: it was lost (running or queued) -> unreachable.
            assert r.state is HostState.UNREACHABLE
            assert r.error and "connection reset" in r.error
            if r.host is None:
                assert sim.assigned[r.job_id] == 0
            else:
                assert r.host in sim.lost
    if not sim.lost:
        assert all(r.state is not HostState.UNREACHABLE for r in reports)
        # Round-robin balance per OS.
        for os in oses_present:
            counts = Counter(r.host for r in reports if r.os == os)
            os_hosts = [h for h, o in hosts if o == os]
            per_host_counts = [counts.get(h, 0) for h in os_hosts]
            assert max(per_host_counts) - min(per_host_counts) <= 1, (os, counts)


@given(hosts=host_sets(), commands=command_lists, mode=modes)
def test_cancel_pending_reports_queued_jobs_and_stops_assigning(
    hosts: list[tuple[str, OsKind]], commands: list[str], mode: str
) -> None:
    sim = Simulation(hosts, commands, mode)
    for name, _ in hosts:
        sim.make_ready(name)
    running = {a.job_id for a in sim.running.values()}
    sim.scheduler.cancel_pending("ctrl-c")
    assert sim.scheduler.next_assignments() == []
    for host in list(sim.running):
        sim.finish(host, HostState.CANCELLED)
    assert sim.scheduler.done
    for r in sim.scheduler.report():
        assert r.state is HostState.CANCELLED
        assert (r.host is not None) == (r.job_id in running)


def test_once_per_os_deals_round_robin_in_host_order() -> None:
    hosts = [("l1", OsKind.LINUX), ("m1", OsKind.MACOS), ("l2", OsKind.LINUX)]
    sched = ShardScheduler(hosts, ["a", "b", "c"], "once-per-os")
    for h, _ in hosts:
        sched.host_ready(h)
    first = {(a.host, a.command) for a in sched.next_assignments()}
    assert first == {("l1", "a"), ("l2", "b"), ("m1", "a")}
    placed: dict[str, list[str]] = defaultdict(list)
    for a in sched.running_jobs():
        placed[a.host].append(a.command)
    while not sched.done:
        for a in sched.running_jobs():
            sched.job_finished(a.job_id, OK)
        for a in sched.next_assignments():
            placed[a.host].append(a.command)
    assert placed == {"l1": ["a", "c"], "l2": ["b"], "m1": ["a", "b", "c"]}


def test_lost_host_running_job_is_unreachable_and_queue_moves_to_same_os() -> None:
    hosts = [("l1", OsKind.LINUX), ("l2", OsKind.LINUX), ("w1", OsKind.WINDOWS)]
    sched = ShardScheduler(hosts, ["a", "b", "c", "d"], "once-per-os")
    for h, _ in hosts:
        sched.host_ready(h)
    started = {a.host: a for a in sched.next_assignments()}
    assert started["l1"].command == "a"
    sched.host_lost("l1", "EOF from peer")
    # l1's queued "c" moved to l2, which is busy with "b": it queues, nothing starts now.
    assert sched.next_assignments() == []
    sched.job_finished(started["l2"].job_id, OK)
    later = [(a.host, a.command) for a in sched.next_assignments()]
    assert later == [("l2", "d")]  # c joined the back of l2's queue
    report = {(r.os, r.command): r for r in sched.report()}
    lost = report[(OsKind.LINUX, "a")]
    assert lost.state is HostState.UNREACHABLE and lost.host == "l1"
    assert lost.error is not None and "EOF from peer" in lost.error and "not re-run" in lost.error


def test_every_host_jobs_of_a_lost_host_are_unreachable_not_moved() -> None:
    hosts = [("l1", OsKind.LINUX), ("l2", OsKind.LINUX)]
    sched = ShardScheduler(hosts, ["a", "b"], "every-host")
    sched.host_ready("l2")
    sched.host_lost("l1", "no route to host")
    reports = sched.report()
    assert [(r.queued_on, r.command, r.host, r.state) for r in reports] == [
        ("l1", "a", None, HostState.UNREACHABLE),
        ("l1", "b", None, HostState.UNREACHABLE),
    ]
    assert [a.host for a in sched.next_assignments()] == ["l2"]


def test_last_host_of_an_os_lost_reports_its_queue_unreachable() -> None:
    sched = ShardScheduler([("w1", OsKind.WINDOWS)], ["a", "b"], "once-per-os")
    sched.host_lost("w1", "timeout")
    assert sched.done
    assert all(
        r.state is HostState.UNREACHABLE and r.error and "no other windows host" in r.error
        for r in sched.report()
    )


def test_host_ready_after_loss_is_ignored_and_loss_is_idempotent() -> None:
    sched = ShardScheduler([("l1", OsKind.LINUX)], ["a"], "every-host")
    sched.host_lost("l1", "gone")
    sched.host_lost("l1", "gone again")
    sched.host_ready("l1")
    assert sched.next_assignments() == []
    assert len(sched.report()) == 1


@pytest.mark.parametrize(
    ("hosts", "commands", "mode", "message"),
    [
        ([], ["a"], "every-host", "selection is empty"),
        ([("a", OsKind.LINUX)], [], "every-host", "no commands"),
        ([("a", OsKind.LINUX), ("a", OsKind.MACOS)], ["x"], "every-host", "listed twice"),
        ([("a", OsKind.LINUX)], ["x"], "sometimes", "unknown scheduling mode"),
    ],
)
def test_bad_construction_is_refused(
    hosts: list[tuple[str, OsKind]], commands: list[str], mode: str, message: str
) -> None:
    with pytest.raises(SchedulerError, match=message):
        ShardScheduler(hosts, commands, mode)  # type: ignore[arg-type]


def test_contradictory_events_are_refused() -> None:
    sched = ShardScheduler([("l1", OsKind.LINUX)], ["a"], "every-host")
    with pytest.raises(SchedulerError, match="not running"):
        sched.job_finished(0, OK)
    with pytest.raises(SchedulerError, match="unknown job id 7"):
        sched.job_finished(7, OK)
    with pytest.raises(SchedulerError, match="unknown host 'zz'"):
        sched.host_ready("zz")
    sched.host_ready("l1")
    (job,) = sched.next_assignments()
    sched.job_finished(job.job_id, OK)
    with pytest.raises(SchedulerError, match="reported"):
        sched.job_finished(job.job_id, OK)


def test_a_running_job_whose_host_was_never_reached_says_it_did_not_start() -> None:
    hosts = [("l1", OsKind.LINUX), ("l2", OsKind.LINUX)]
    sched = ShardScheduler(hosts, ["a"], "every-host")
    for h, _ in hosts:
        sched.host_ready(h)
    started = {a.host: a for a in sched.next_assignments()}
    sched.host_lost("l1", "connect refused", running_started=False)
    sched.job_finished(started["l2"].job_id, OK)
    report = {r.queued_on: r for r in sched.report()}
    never = report["l1"]
    assert never.state is HostState.UNREACHABLE and never.host is None
    assert never.error == (
        "host 'l1' could not be reached, so this command did not start "
        "(not re-run elsewhere): connect refused"
    )
    assert report["l2"].state is HostState.OK and report["l2"].host == "l2"
