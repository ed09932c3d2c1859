"""The broker's logic in-process: dispatch order, the destroy lane, placement, result fencing,
lease expiry and pruning, driven turn by turn with a fake clock (no sockets, no sleeps)."""

from __future__ import annotations

import pytest

from tests.unit.broker_stub import StubBroker
from virtbroker.common import protocol as p
from virtbroker.common.errors import NotFoundError


@pytest.fixture
def broker(tmp_path):
    b = StubBroker(tmp_path, lease_ttl_s=10.0)
    yield b
    b.close()


def started(broker: StubBroker, name: str, worker: str = "w1") -> p.JobAssignment:
    """Define and start a guest on `worker`, and report it running."""
    broker.define(name)
    job = broker.submit(name, "start")
    (a,) = [x for x in broker.assignments(worker) if x.job_id == job["job_id"]]
    assert broker.report(worker, a).accepted
    return a


def test_one_job_per_domain_at_a_time_in_submission_order_destroy_first(broker):
    broker.hello("w1", slots=4)
    started(broker, "d1")
    ids = [j["job_id"] for j in broker.call_many(
        [p.Submit(request_id=900 + i, domain="d1", op=op) for i, op in enumerate(("suspend", "resume", "destroy"))]
    )]
    # The destroy jumps the queue; one job of the domain at a time.
    (first,) = broker.assignments("w1")
    assert first.job_id == ids[2] and first.op == "destroy"
    broker.report("w1", first, state="shutoff")
    # suspend and resume now find the domain shut off: refused at their turn, in order.
    assert [broker.job(i)["state"] for i in ids] == ["failed", "failed", "succeeded"]
    assert broker.job(ids[0])["error_code"] == "operation-invalid"


def test_a_destroy_takes_a_priority_slot_when_every_slot_is_busy(broker):
    broker.hello("w1", slots=1, priority_slots=1)
    a = started(broker, "busy")  # leaves the one slot free again
    broker.define("starting")
    start = broker.submit("starting", "start")
    (held,) = broker.assignments("w1")  # the start holds the only ordinary slot
    assert held.job_id == start["job_id"]
    broker.define("other")
    waiting = broker.submit("other", "start")
    destroy = broker.submit("busy", "destroy")
    (fast,) = broker.assignments("w1")
    assert fast.job_id == destroy["job_id"] and fast.domain_uuid == a.domain_uuid
    assert broker.job(waiting["job_id"])["state"] == "queued"  # a start never takes the destroy lane
    workers = {w["worker_id"]: w for w in broker.call(p.ListWorkers)}
    assert workers["w1"]["busy"] == 2 and workers["w1"]["priority_slots"] == 1


def test_sequential_starts_spread_over_equal_hosts(broker):
    for i in range(4):
        broker.hello(f"w{i}", host_id=f"host{i}", slots=4, memory_mib=4096)
    per_host: dict[str, int] = {}
    for n in range(40):
        broker.define(f"g{n}")
        job = broker.submit(f"g{n}", "start")
        worker = broker.job(job["job_id"])["worker_id"]
        (a,) = broker.assignments(worker)
        assert broker.report(worker, a).accepted  # each start finishes (and frees its slot) before the next
        host = broker.job(job["job_id"])["host"]
        per_host[host] = per_host.get(host, 0) + 1
    assert per_host == {f"host{i}": 10 for i in range(4)}


def test_a_start_that_fits_no_host_fails_instead_of_waiting(broker):
    broker.hello("small", host_id="small", memory_mib=512)
    broker.define("huge", memory_mib=2048)
    job = broker.submit("huge", "start")
    failed = broker.job(job["job_id"])
    assert failed["state"] == "failed" and failed["error_code"] == "operation-failed"
    assert "2048 MiB" in failed["error"] and "small" in failed["error"]
    assert not broker.assignments("small")


def test_results_are_fenced_by_lease_epoch_and_holder(broker):
    broker.hello("w1")
    broker.hello("w2", host_id="h1")
    broker.define("f")
    job = broker.submit("f", "start")
    (a,) = broker.assignments("w1") + broker.assignments("w2")
    holder = "w1" if broker.job(job["job_id"])["worker_id"] == "w1" else "w2"
    other = "w2" if holder == "w1" else "w1"
    assert not broker.report(other, a).accepted  # the wrong worker
    assert broker.job(job["job_id"])["state"] == "running"
    ack = broker.report(holder, a, lease_id="0" * 32)  # a lease that is not the job's
    assert not ack.accepted and "not current" in ack.reason
    ack = broker.report(holder, a, epoch=a.epoch - 1)  # a stale epoch
    assert not ack.accepted and "stale epoch" in ack.reason
    assert broker.report(holder, a).accepted
    assert broker.job(job["job_id"])["state"] == "succeeded"
    # The same result again: its lease is gone.
    assert not broker.report(holder, a).accepted


def test_an_expired_lease_ends_the_job_lost_and_queues_a_reconcile(broker):
    broker.hello("w1")
    broker.define("e")
    job = broker.submit("e", "start")
    (a,) = broker.assignments("w1")
    for _ in range(3):  # renewed: still running past one TTL
        broker.clock.advance(5.0)
        broker.worker_says("w1", p.Heartbeat(worker_id="w1", lease_ids=[a.lease_id]))
        broker.turn()
    assert broker.job(job["job_id"])["state"] == "running"
    broker.clock.advance(10.1)  # silent for a TTL
    broker.turn()
    lost = broker.job(job["job_id"])
    assert lost["state"] == "lost" and lost["error_code"] == "lease"
    reconciles = [j for j in broker.call(p.ListJobs, domain="e") if j["op"] == "reconcile"]
    assert len(reconciles) == 1


def test_a_deadline_caps_the_lease_whatever_the_worker_renews(broker):
    broker.hello("w1")
    broker.define("dl")
    job = broker.submit("dl", "start", deadline_s=15.0)
    (a,) = broker.assignments("w1")
    assert a.deadline_s == 15.0
    for _ in range(7):  # keeps renewing, past the deadline and one TTL more
        broker.clock.advance(4.0)
        broker.worker_says("w1", p.Heartbeat(worker_id="w1", lease_ids=[a.lease_id]))
        broker.turn()
    lost = broker.job(job["job_id"])
    assert lost["state"] == "lost" and lost["error_code"] == "deadline"


def test_pruning_forgets_the_oldest_final_jobs_but_not_waited_ones(tmp_path):
    broker = StubBroker(tmp_path, job_history=3)
    try:
        broker.define("p")
        ids = [broker.submit("p", "suspend")["job_id"] for _ in range(6)]  # each refused: shut off
        broker.turn()
        kept = [j["job_id"] for j in broker.call(p.ListJobs, domain="p")]
        assert kept == ids[-3:]
        with pytest.raises(NotFoundError):
            broker.job(ids[0])
    finally:
        broker.close()


def test_a_hello_names_only_its_own_leases(broker):
    broker.hello("w1")
    broker.hello("w2", host_id="h2")
    broker.define("x")
    job = broker.submit("x", "start")
    a = (broker.assignments("w1") + broker.assignments("w2"))[0]
    holder = broker.job(job["job_id"])["worker_id"]
    other = "w2" if holder == "w1" else "w1"
    broker.worker_says(other, p.Hello(worker_id=other, role="lifecycle", host_id="h9", uri="qemu:///system", slots=4,
                                      leases=[{"lease_id": a.lease_id, "job_id": a.job_id, "epoch": a.epoch}]))
    broker.turn()
    assert broker.core.scheduler.leases[a.lease_id].worker_id == holder
    assert broker.core.metrics.refused_worker_messages.labels("hello", "not-lease-holder")._value.get() == 1
