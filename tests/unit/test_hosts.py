"""Hosts that fail, in-process with a fake clock: host leases, unknown domains, fencing (fence
command, watchdog, operator), the partition and quiet-period holds, HA restarts on shared
storage, returning hosts and their strays, libvirt events, and jobs no host can take."""

from __future__ import annotations

import sys

import pytest

from tests.unit.broker_stub import StubBroker
from tests.waiting import wait_until
from virtbroker.broker import hosts
from virtbroker.client.templates import minimal_domain_xml
from virtbroker.common import domxml
from virtbroker.common import protocol as p
from virtbroker.common.errors import InvalidError, OperationInvalidError

DEAD_S = 30.0


def make(tmp_path, **config) -> StubBroker:
    settings = dict(lease_ttl_s=10.0, host_dead_s=DEAD_S, self_fence_s=20.0, fence_quiet_s=0.0, queue_timeout_s=60.0)
    settings.update(config)
    return StubBroker(tmp_path, **settings)


@pytest.fixture
def broker(tmp_path):
    b = make(tmp_path, fence_command=fence_program(tmp_path, 0))
    yield b
    b.close()


def fence_program(tmp_path, status: int) -> str:
    """A fence agent that logs its argument and exits with `status`."""
    path = tmp_path / f"fence-{status}"
    path.write_text(f"#!{sys.executable}\nimport sys\nopen({str(tmp_path / 'fenced.log')!r}, 'a')"
                    f".write(sys.argv[1] + '\\n')\nsys.exit({status})\n")
    path.chmod(0o755)
    return str(path)


def fence_calls(tmp_path) -> list[str]:
    log = tmp_path / "fenced.log"
    return log.read_text().split() if log.exists() else []


def beat(broker: StubBroker, *workers: str, seq: int = 1, guests=None) -> None:
    """Heartbeats from these workers, renewing the leases they hold, each saying `armed` as
    the last `renewed` it got said (as a real worker does)."""
    leases = broker.core.scheduler.leases.values()
    for w in workers:
        held = [lease.lease_id for lease in leases if lease.worker_id == w]
        heard = [m for m in broker.to_workers[w.encode()] if isinstance(m, p.Renewed)]
        armed = heard[-1].armed if heard else False
        broker.worker_says(w, p.Heartbeat(worker_id=w, lease_ids=held, seq=seq, guests=guests, armed=armed))
    broker.turn()


def pass_time(broker: StubBroker, seconds: float, alive: tuple[str, ...] = (), step: float = 2.0) -> None:
    """Move the clock, with the `alive` workers beating every `step` seconds."""
    left = seconds
    while left > 0:
        broker.clock.advance(min(step, left))
        left -= step
        beat(broker, *alive)


def start_on(broker: StubBroker, name: str, worker: str, ha: bool = False, xml: str | None = None) -> p.JobAssignment:
    """Define and start a guest on `worker`'s host (the others drained meanwhile), reported running."""
    host_id = broker.core.workers[worker].host_id
    others = [h for h in broker.core.hosts.values() if h.host_id != host_id and not h.draining]
    for h in others:
        h.draining = True
    broker.call(p.Define, xml=xml or minimal_domain_xml(name), ha=ha or None)
    job = broker.submit(name, "start")
    for h in others:
        h.draining = False
    for w in [w for w in broker.core.workers.values() if w.host_id == host_id]:  # any worker of that host
        got = [x for x in broker.assignments(w.worker_id) if x.job_id == job["job_id"]]
        if got:
            assert broker.report(w.worker_id, got[0]).accepted
            return got[0]
    raise AssertionError(f"the start of {name} went to no worker of host {host_id}")


def host_state(broker: StubBroker, host: str) -> str:
    return next(h["state"] for h in broker.call(p.ListHosts) if h["host"] == host)


def two_hosts(broker: StubBroker) -> None:
    broker.hello("a1", host_id="A", slots=4)
    broker.hello("b1", host_id="B", slots=4)


def test_a_silent_host_is_unreachable_its_domains_unknown_then_fenced_and_ha_restarted(broker, tmp_path):
    broker.hello("a1", host_id="A", slots=4)
    ha = start_on(broker, "ha1", "a1", ha=True)
    start_on(broker, "plain", "a1")
    broker.hello("b1", host_id="B", slots=4)
    assert host_state(broker, "A") == "up"
    pass_time(broker, DEAD_S - 2, alive=("b1",))
    assert host_state(broker, "A") == "up" and broker.call(p.Lookup, domain="ha1")["state"] == "running"
    pass_time(broker, 4, alive=("b1",))
    # The fence command ran at once (fence_quiet_s 0, one host of two lost) and exited 0.
    wait_until(lambda: (pass_time(broker, 0.5, alive=("b1",)), host_state(broker, "A"))[1] == "fenced", timeout_s=10)
    assert fence_calls(tmp_path) == ["A"]
    assert broker.call(p.Lookup, domain="plain")["state"] == "shutoff"
    record = broker.call(p.Lookup, domain="ha1")
    assert record["epoch"] > ha.epoch  # whatever A still says of it is stale
    (restart,) = broker.assignments("b1")
    assert restart.op == "start" and restart.domain_name == "ha1"
    assert broker.report("b1", restart).accepted
    assert broker.call(p.Lookup, domain="ha1")["host"] == "B"


def test_unknown_before_fencing_and_a_host_back_in_time_is_up_with_its_truth(tmp_path):
    broker = make(tmp_path)  # no fence_command, no watchdog: only the operator can fence
    two_hosts(broker)
    start_on(broker, "g", "a1", ha=True)
    pass_time(broker, DEAD_S + 4, alive=("b1",))
    assert host_state(broker, "A") == "unreachable"
    assert broker.call(p.Lookup, domain="g")["state"] == "unknown"
    assert [d["name"] for d in broker.call(p.ListDomains, state="unknown")] == ["g"]
    pass_time(broker, 120, alive=("b1",))
    assert host_state(broker, "A") == "unreachable" and not broker.assignments("b1")  # nothing restarted
    # A comes back before anyone fenced it: up, and its guest list is the truth again.
    guest = {"uuid": broker.call(p.Lookup, domain="g")["uuid"], "name": "g", "state": "running"}
    broker.hello("a1", host_id="A", slots=4, guests=[guest])
    assert host_state(broker, "A") == "up"
    assert broker.call(p.Lookup, domain="g")["state"] == "running"
    broker.close()


def test_start_on_an_unknown_domain_is_refused_at_submit_or_turn(tmp_path):
    broker = make(tmp_path)
    two_hosts(broker)
    start_on(broker, "g", "a1")
    pass_time(broker, DEAD_S + 4, alive=("b1",))
    job = broker.submit("g", "start")
    assert broker.job(job["job_id"])["error_code"] == "operation-invalid"
    broker.close()


def test_losing_most_hosts_at_once_fences_nobody(broker, tmp_path):
    two_hosts(broker)
    broker.hello("c1", host_id="C", slots=4)
    start_on(broker, "g", "a1", ha=True)
    pass_time(broker, DEAD_S + 30, alive=("c1",))  # A and B lost: 2 of 3
    assert host_state(broker, "A") == "unreachable" and host_state(broker, "B") == "unreachable"
    assert fence_calls(tmp_path) == []
    assert broker.call(p.Lookup, domain="g")["state"] == "unknown"


def test_no_fencing_in_the_quiet_period_after_a_start(tmp_path):
    broker = make(tmp_path, fence_command=fence_program(tmp_path, 0), fence_quiet_s=100.0)
    two_hosts(broker)
    start_on(broker, "g", "a1", ha=True)
    pass_time(broker, DEAD_S + 20, alive=("b1",))
    assert host_state(broker, "A") == "unreachable" and fence_calls(tmp_path) == []
    pass_time(broker, 60, alive=("b1",))
    wait_until(lambda: (pass_time(broker, 0.5, alive=("b1",)), host_state(broker, "A"))[1] == "fenced", timeout_s=10)
    broker.close()


def test_a_failing_fence_command_is_retried_and_nothing_restarts(tmp_path):
    broker = make(tmp_path, fence_command=fence_program(tmp_path, 1), fence_retry_s=10.0)
    two_hosts(broker)
    start_on(broker, "g", "a1", ha=True)
    pass_time(broker, DEAD_S + 2, alive=("b1",))
    wait_until(lambda: (pass_time(broker, 0.5, alive=("b1",)), fence_calls(tmp_path))[1] == ["A"], timeout_s=10)
    wait_until(lambda: (pass_time(broker, 0.5, alive=("b1",)), host_state(broker, "A"))[1] == "unreachable", timeout_s=10)
    pass_time(broker, 11, alive=("b1",))
    wait_until(lambda: (pass_time(broker, 0.5, alive=("b1",)), len(fence_calls(tmp_path)))[1] == 2, timeout_s=10)
    assert not broker.assignments("b1")
    # The operator's word: fenced at once, and the HA guest restarts on B.
    with pytest.raises(InvalidError):
        broker.call(p.HostAction, host="A", action="fence")
    out = broker.call(p.HostAction, host="A", action="fence", confirm_off=True)
    assert out["state"] == "fenced" and len(out["jobs"]) == 1
    (restart,) = broker.assignments("b1")
    assert restart.domain_name == "g"
    broker.close()


def test_the_operator_cannot_fence_a_host_that_renews(broker):
    two_hosts(broker)
    with pytest.raises(OperationInvalidError, match="only an unreachable host"):
        broker.call(p.HostAction, host="A", action="fence", confirm_off=True)
    with pytest.raises(OperationInvalidError, match="not fenced"):
        broker.call(p.HostAction, host="A", action="evacuate")


def test_evacuate_starts_the_other_domains_of_a_fenced_host(tmp_path):
    broker = make(tmp_path)
    two_hosts(broker)
    start_on(broker, "ha", "a1", ha=True)
    start_on(broker, "p1", "a1")
    start_on(broker, "p2", "a1")
    pass_time(broker, DEAD_S + 2, alive=("b1",))
    fenced = broker.call(p.HostAction, host="A", action="fence", confirm_off=True)
    assert len(fenced["jobs"]) == 1
    out = broker.call(p.HostAction, host="A", action="evacuate")
    assert len(out["jobs"]) == 2
    names = sorted(a.domain_name for a in broker.assignments("b1"))
    assert names == ["ha", "p1", "p2"]
    broker.close()


def test_a_returning_fenced_host_destroys_its_strays_before_taking_a_job(broker):
    two_hosts(broker)
    ha = start_on(broker, "ha", "a1", ha=True)
    plain = start_on(broker, "plain", "a1")
    pass_time(broker, DEAD_S + 2, alive=("b1",))
    wait_until(lambda: (pass_time(broker, 0.5, alive=("b1",)), host_state(broker, "A"))[1] == "fenced", timeout_s=10)
    (restart,) = broker.assignments("b1")
    broker.report("b1", restart)
    # A comes back still running both (a partition that healed; its self-fence did not act).
    guests = [{"uuid": a.domain_uuid, "name": a.domain_name, "state": "running"} for a in (ha, plain)]
    broker.hello("a1", host_id="A", slots=4, guests=guests)
    assert host_state(broker, "A") == "rejoining"
    (strays,) = [m for m in broker.to_workers[b"a1"] if isinstance(m, p.Strays)]
    assert sorted(strays.uuids) == sorted([ha.domain_uuid, plain.domain_uuid])
    # The registry kept its truth: ha runs on B, plain is off; and A takes no start yet.
    assert broker.call(p.Lookup, domain="ha")["host"] == "B"
    assert broker.call(p.Lookup, domain="plain")["state"] == "shutoff"
    broker.call(p.HostAction, host="B", action="drain")
    job = broker.submit("plain", "start")
    assert not broker.assignments("a1") and broker.job(job["job_id"])["state"] == "queued"
    broker.worker_says("a1", p.StraysDone(worker_id="a1", destroyed=strays.uuids))
    broker.turn()
    assert host_state(broker, "A") == "up"
    (a,) = broker.assignments("a1")
    assert a.job_id == job["job_id"]


def test_a_guest_running_on_two_up_hosts_is_a_stray_on_the_one_the_registry_does_not_name(broker):
    two_hosts(broker)
    a = start_on(broker, "g", "a1")
    beat(broker, "b1", guests=[{"uuid": a.domain_uuid, "name": "g", "state": "running"}])
    (strays,) = [m for m in broker.to_workers[b"b1"] if isinstance(m, p.Strays)]
    assert strays.uuids == [a.domain_uuid]
    assert broker.call(p.Lookup, domain="g")["host"] == "A"


def test_a_job_no_host_can_take_fails_after_queue_timeout(tmp_path):
    broker = make(tmp_path)
    two_hosts(broker)
    start_on(broker, "g", "a1")
    broker.clock.advance(DEAD_S + 2)  # A and B silent: a partition of the broker, nobody fenced
    beat(broker, "b1")
    destroy = broker.submit("g", "destroy")
    pass_time(broker, 58, alive=("b1",))
    assert broker.job(destroy["job_id"])["state"] == "queued"
    pass_time(broker, 4, alive=("b1",))
    job = broker.job(destroy["job_id"])
    assert job["state"] == "failed" and job["error_code"] == "timeout"
    assert "queue_timeout_s" in job["error"] and "unreachable" in job["error"]
    # A job that only waits for a busy slot is not failed.
    broker.hello("b1", host_id="B", slots=1)
    start_on(broker, "x", "b1")
    broker.define("y")
    hold = broker.submit("y", "start")
    broker.define("z")
    waits = broker.submit("z", "start")
    pass_time(broker, 70, alive=("b1",))
    assert broker.job(hold["job_id"])["state"] == "running"
    assert broker.job(waits["job_id"])["state"] == "queued"
    broker.close()


def test_stuck_jobs_are_looked_for_a_batch_of_queues_a_second(tmp_path, monkeypatch):
    """A backlog's queue heads are not all walked in one turn (every read would wait): each
    second's check looks at STUCK_BATCH of them, so a stuck job may fail a few seconds late."""
    monkeypatch.setattr(hosts, "STUCK_BATCH", 3)
    broker = make(tmp_path)
    names = [f"stuck-{i}" for i in range(10)]
    jobs = []
    for name in names:  # no lifecycle worker at all: no start can be placed
        broker.define(name)
        jobs.append(broker.submit(name, "start")["job_id"])
    broker.clock.advance(61)

    def failed() -> int:
        states = [broker.job(j) for j in jobs]
        assert all(s["state"] in ("queued", "failed") for s in states)
        assert all(s["error_code"] == "timeout" and "no host is up" in s["error"] for s in states if s["state"] == "failed")
        return sum(s["state"] == "failed" for s in states)

    seen = []
    for _ in range(4):
        broker.turn()
        seen.append(failed())
        broker.clock.advance(1.0)
    assert seen == [3, 6, 9, 10]
    broker.close()


def test_an_embedded_host_that_does_not_come_back_after_a_restart_is_gone(tmp_path):
    broker = make(tmp_path)
    broker.worker_says("t1", p.Hello(worker_id="t1", role="lifecycle", host_id="box/test/pid1", uri="test:///default",
                                     slots=4))
    broker.turn()
    start_on(broker, "e", "t1")
    broker.close()
    restarted = make(tmp_path)  # the same state dir: `virtbroker up` again
    assert restarted.call(p.Lookup, domain="e")["state"] == "running"
    pass_time(restarted, DEAD_S - 2)
    assert restarted.call(p.Lookup, domain="e")["state"] == "running"
    pass_time(restarted, 4)
    assert restarted.call(p.Lookup, domain="e")["state"] == "shutoff"
    assert restarted.call(p.ListHosts) == []
    restarted.close()


def test_a_watchdog_host_counts_as_fenced_after_dead_plus_margin_only_when_armed(tmp_path):
    broker = make(tmp_path, fence_margin_s=10.0)
    broker.hello("a1", host_id="A", slots=4, watchdog=True)
    broker.hello("b1", host_id="B", slots=4, watchdog=True)
    broker.hello("c1", host_id="C", slots=4)
    start_on(broker, "ha", "a1", ha=True)
    start_on(broker, "plain", "b1")
    beat(broker, "a1", "b1")
    renewed = [m for m in broker.to_workers[b"a1"] if isinstance(m, p.Renewed)]
    assert renewed[-1].armed and renewed[-1].self_fence_s == 20.0
    beat(broker, "a1")  # a1 says it heard it: armed, its watchdog petted
    # B without HA guests is not armed, so its silence alone never counts as fencing.
    assert not [m for m in broker.to_workers[b"b1"] if isinstance(m, p.Renewed)][-1].armed
    pass_time(broker, DEAD_S + 8, alive=("c1",))  # A and B lost: 2 of 3, held as a partition
    assert host_state(broker, "A") == "unreachable"
    broker.hello("b1", host_id="B", slots=4, watchdog=True)  # B is back: 1 of 3 lost
    broker.call(p.HostAction, host="B", action="drain")  # so A's HA guest restarts on C
    pass_time(broker, DEAD_S - 2, alive=("b1", "c1"))
    assert host_state(broker, "A") == "unreachable"  # hosts return one by one after a partition
    pass_time(broker, 4, alive=("b1", "c1"))
    assert host_state(broker, "A") == "fenced"  # its watchdog, armed by its HA guest, reset it
    pass_time(broker, DEAD_S + 20, alive=("c1",))
    assert host_state(broker, "B") == "unreachable"
    broker.close()


def test_ha_starts_go_only_where_shared_storage_holds_every_disk(tmp_path):
    broker = make(tmp_path)
    broker.hello("a1", host_id="A", slots=4, shared_storage_roots=["/srv/shared"])
    broker.hello("b1", host_id="B", slots=4)

    def disky(name: str) -> str:
        return domxml.with_ha(minimal_domain_xml(name), True).replace(
            "</domain>", f"<devices><disk type='file' device='disk'><source file='/srv/shared/{name}.qcow2'/>"
                         "<target dev='vda' bus='virtio'/></disk></devices></domain>")

    for name in ("d1", "d2", "d3"):  # placement alone would spread them over A and B
        start_on(broker, name, "a1", xml=disky(name))
    start_on(broker, "diskless", "b1", ha=True)  # fits anywhere: B has fewer guests
    broker.worker_says("a1", p.Bye(worker_id="a1"))
    broker.turn()
    broker.call(p.Define, xml=disky("d4"))
    job = broker.submit("d4", "start")
    failed = broker.job(job["job_id"])
    assert failed["state"] == "failed" and "shared_storage_roots" in failed["error"]
    broker.close()


def test_libvirt_events_move_the_registry_unless_a_job_runs(broker):
    two_hosts(broker)
    a = start_on(broker, "g", "a1")
    broker.worker_says("a1", p.GuestEvent(worker_id="a1", uuid=a.domain_uuid, state="shutoff", event="stopped",
                                          reason="destroyed"))
    broker.turn()
    assert broker.call(p.Lookup, domain="g")["state"] == "shutoff"
    job = broker.submit("g", "start")
    (s,) = broker.assignments("a1")
    # While the start runs, an event does not move the domain: the result settles it.
    broker.worker_says("a1", p.GuestEvent(worker_id="a1", uuid=a.domain_uuid, state="shutoff", event="stopped"))
    broker.turn()
    broker.report("a1", s)
    assert broker.job(job["job_id"])["state"] == "succeeded"
    assert broker.call(p.Lookup, domain="g")["state"] == "running"
    # A stop reported by another host's worker changes nothing.
    broker.worker_says("b1", p.GuestEvent(worker_id="b1", uuid=a.domain_uuid, state="shutoff", event="stopped"))
    broker.turn()
    assert broker.call(p.Lookup, domain="g")["state"] == "running"


def test_self_fenced_guests_are_shut_off_and_ha_ones_started_again(broker):
    two_hosts(broker)
    ha = start_on(broker, "ha", "a1", ha=True)
    plain = start_on(broker, "plain", "a1")
    broker.worker_says("a1", p.Heartbeat(worker_id="a1", lease_ids=[], seq=7,
                                         self_fenced=[ha.domain_uuid, plain.domain_uuid]))
    broker.turn()
    assert broker.call(p.Lookup, domain="plain")["state"] == "shutoff"
    restarts = broker.assignments("a1") + broker.assignments("b1")
    assert [r.domain_name for r in restarts] == ["ha"]
    renewed = [m for m in broker.to_workers[b"a1"] if isinstance(m, p.Renewed)]
    assert renewed[-1].seq == 7


def test_drain_keeps_new_starts_off_a_host_and_survives_a_restart(tmp_path):
    broker = make(tmp_path)
    two_hosts(broker)
    broker.call(p.HostAction, host="A", action="drain")
    for i in range(4):
        start_on(broker, f"g{i}", "b1")
    broker.close()
    again = make(tmp_path)
    assert {h["host"]: h["draining"] for h in again.call(p.ListHosts)}["A"] is True
    again.call(p.HostAction, host="A", action="undrain")
    assert {h["host"]: h["draining"] for h in again.call(p.ListHosts)}["A"] is False
    again.close()


def test_hosts_cut_off_a_beat_apart_are_one_partition(broker, tmp_path):
    """Each host turns unreachable on its own at host_dead_s; the first to cross must not be
    fenced alone when the other fell silent with it (a heartbeat later)."""
    two_hosts(broker)
    start_on(broker, "g", "a1", ha=True)
    broker.clock.advance(1.0)
    beat(broker, "b1")  # B's last word, one beat after A's
    pass_time(broker, DEAD_S + 20)
    assert host_state(broker, "A") == "unreachable" and host_state(broker, "B") == "unreachable"
    assert fence_calls(tmp_path) == []


def test_an_event_read_before_the_last_result_on_its_host_is_stale(broker):
    """Events travel apart from results: a `running` read before a suspend's result ended
    must not undo it (the resume queued next would then be refused)."""
    two_hosts(broker)
    a = start_on(broker, "g", "a1")
    suspend = broker.submit("g", "suspend")
    (s,) = broker.assignments("a1")
    assert s.job_id == suspend["job_id"]
    broker.report("a1", s, state="paused", done_at=500.0)
    broker.worker_says("a1", p.GuestEvent(worker_id="a1", uuid=a.domain_uuid, state="running", event="resumed",
                                          at=499.5))
    broker.turn()
    assert broker.call(p.Lookup, domain="g")["state"] == "paused"
    # Read after the result: news.
    broker.worker_says("a1", p.GuestEvent(worker_id="a1", uuid=a.domain_uuid, state="running", event="resumed",
                                          at=500.5))
    broker.turn()
    assert broker.call(p.Lookup, domain="g")["state"] == "running"


def test_a_host_whose_last_worker_stops_on_purpose_is_left_not_fenced(broker, tmp_path):
    two_hosts(broker)
    a = start_on(broker, "g", "a1", ha=True)
    broker.worker_says("a1", p.Bye(worker_id="a1"))
    broker.turn()
    assert host_state(broker, "A") == "left"
    pass_time(broker, DEAD_S + 60, alive=("b1",))
    assert host_state(broker, "A") == "left" and fence_calls(tmp_path) == []
    assert broker.call(p.Lookup, domain="g")["state"] == "unknown"  # nobody watches it
    assert not broker.assignments("b1")  # nothing restarted
    broker.hello("a1", host_id="A", slots=4, guests=[{"uuid": a.domain_uuid, "name": "g", "state": "running"}])
    assert host_state(broker, "A") == "up"
    assert broker.call(p.Lookup, domain="g")["state"] == "running"


def test_a_watchdog_host_cut_off_before_its_worker_heard_armed_is_not_fenced_by_time(tmp_path):
    """The broker arms a host when an HA guest lands there, but its worker learns it only from
    the next `renewed`. Cut off before that, it neither self-fences nor pets its watchdog:
    only a fence command or the operator may fence it."""
    broker = make(tmp_path, fence_margin_s=10.0)
    broker.hello("a1", host_id="A", slots=4, watchdog=True)
    broker.hello("b1", host_id="B", slots=4)
    start_on(broker, "ha", "a1", ha=True)  # no beat of a1 after this: it never heard armed
    pass_time(broker, DEAD_S + 30, alive=("b1",))
    assert host_state(broker, "A") == "unreachable"
    assert not broker.assignments("b1")
    broker.close()


def test_only_workers_that_beat_until_the_host_fell_silent_count_as_armed(tmp_path):
    """A worker that said `armed` and died long before does not vouch for its host's watchdog."""
    broker = make(tmp_path, fence_margin_s=10.0)
    broker.hello("a1", host_id="A", slots=4, watchdog=True)
    broker.hello("b1", host_id="B", slots=4)
    start_on(broker, "ha", "a1", ha=True)
    beat(broker, "a1")
    beat(broker, "a1")  # a1 says armed
    # a1 dies; its replacement a2 (same host) never heard `armed` before the host falls silent.
    broker.hello("a2", host_id="A", slots=4, watchdog=True)
    pass_time(broker, 20, alive=("a2", "b1"), step=20)
    broker.worker_says("a2", p.Heartbeat(worker_id="a2", lease_ids=[], seq=1, armed=False))
    broker.turn()
    pass_time(broker, DEAD_S + 30, alive=("b1",))
    assert host_state(broker, "A") == "unreachable"
    broker.close()


def test_an_armed_worker_without_a_watchdog_does_not_vouch_for_its_host(tmp_path):
    """A host with one watchdog worker that never said armed, and one armed worker without a
    watchdog: a silence of it is not a reset."""
    broker = make(tmp_path, fence_margin_s=10.0)
    broker.hello("a1", host_id="A", slots=4, watchdog=True)
    broker.hello("a2", host_id="A", slots=4)
    broker.hello("b1", host_id="B", slots=4)
    start_on(broker, "ha", "a2", ha=True)
    beat(broker, "a2")
    beat(broker, "a2")  # a2 says armed, but has no watchdog
    pass_time(broker, DEAD_S + 30, alive=("b1",))
    assert host_state(broker, "A") == "unreachable"
    broker.close()


def test_hosts_returning_one_by_one_after_a_partition_are_not_fenced(broker, tmp_path):
    """The partition heals host by host: when A is back, B (still silent) is one host of two,
    but it gets host_dead_s to return before anyone fences it."""
    two_hosts(broker)
    start_on(broker, "g", "b1")
    pass_time(broker, DEAD_S + 10)  # both silent: a partition, nobody fenced
    broker.hello("a1", host_id="A", slots=4)
    pass_time(broker, DEAD_S - 4, alive=("a1",))
    assert fence_calls(tmp_path) == [] and host_state(broker, "B") == "unreachable"
    broker.hello("b1", host_id="B", slots=4)
    assert host_state(broker, "B") == "up" and fence_calls(tmp_path) == []
