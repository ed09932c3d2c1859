"""Per-domain queues and leases, driven by an explicit clock (no sleeping)."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from virtbroker.broker.scheduler import Scheduler, WorkerInfo
from virtbroker.common.errors import OperationInvalidError

U = "11111111-2222-3333-4444-555555555555"


def worker(worker_id="w1", slots=2):
    return WorkerInfo(worker_id=worker_id, role="lifecycle", host_id="h", uri="test:///default", slots=slots)


def submit(s, op, uuid=U):
    job = s.new_job(uuid, "d", op, 0.0)
    s.enqueue(job)
    return job


def test_fifo_with_destroy_jumping_ahead():
    s = Scheduler(lease_ttl_s=5)
    start, reboot, destroy1, destroy2 = (submit(s, op) for op in ("start", "reboot", "destroy", "destroy"))
    assert list(s.queues[U]) == [destroy1.job_id, destroy2.job_id, start.job_id, reboot.job_id]


def test_one_job_per_domain_at_a_time():
    s = Scheduler(lease_ttl_s=5)
    submit(s, "start")
    submit(s, "reboot")
    w = worker()
    job = s.pop_head(U)
    s.grant(job, w, epoch=1, now=100.0, now_wall=0)
    assert s.ready_domains() == []
    assert job.state == "running" and w.free_slots == 1


def test_lease_expires_unless_renewed():
    s = Scheduler(lease_ttl_s=5)
    submit(s, "start")
    w = worker()
    lease = s.grant(s.pop_head(U), w, epoch=1, now=100.0, now_wall=0)
    assert s.expired(104.9) == []
    assert s.renew("w1", [lease.lease_id], now=104.0) == []
    assert s.expired(108.9) == []
    assert s.expired(109.0) == [lease]
    assert s.renew("other", [lease.lease_id], now=105.0) == [lease.lease_id]


def test_cancel_only_queued():
    s = Scheduler(lease_ttl_s=5)
    first, second = submit(s, "start"), submit(s, "reboot")
    s.grant(s.pop_head(U), worker(), epoch=1, now=0, now_wall=0)
    with pytest.raises(OperationInvalidError):
        s.cancel(first.job_id, 0)
    assert s.cancel(second.job_id, 0).state == "cancelled"
    assert U not in s.queues


def test_finish_releases_the_domain():
    s = Scheduler(lease_ttl_s=5)
    submit(s, "start")
    submit(s, "destroy")
    job = s.pop_head(U)  # destroy first
    s.grant(job, worker(), epoch=1, now=0, now_wall=0)
    s.finish(job, "succeeded", 1.0)
    assert s.ready_domains() == [U] and s.leases == {}


def test_a_domain_whose_job_ends_goes_to_the_back_of_the_ready_line():
    s = Scheduler(lease_ttl_s=5)
    a, b, c = "a" * 36, "b" * 36, "c" * 36
    for uuid in (a, b, c):
        submit(s, "suspend", uuid)
        submit(s, "resume", uuid)
    assert s.ready_domains() == [a, b, c]
    job = s.pop_head(a)
    s.grant(job, worker(), epoch=1, now=0, now_wall=0)
    assert s.ready_domains() == [b, c]
    s.finish(job, "succeeded", 1.0)
    assert s.ready_domains() == [b, c, a]  # a waits behind the others instead of taking the next slot again
    s.cancel(s.head(b).job_id, 0)
    s.cancel(s.head(b).job_id, 0)
    assert s.ready_domains() == [c, a]  # an emptied queue leaves the line


def test_restored_lease_keeps_its_domain_out_of_the_ready_line():
    s = Scheduler(lease_ttl_s=5)
    queued = submit(s, "start")  # loaded first, though a destroy of the same domain is running
    running = s.new_job(U, "d", "destroy", 0.0)
    running.state, running.lease_id, running.worker_id, running.epoch = "running", "l-1", "w1", 1
    s.restore_lease(running, now=0)
    assert s.ready_domains() == []
    s.finish(running, "succeeded", 1.0)
    assert s.ready_domains() == [U] and s.head(U) is queued


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["grant", "renew", "finish", "tick"]), st.integers(0, 7),
                          st.floats(0, 3, allow_nan=False)), max_size=60))
def test_expired_finds_what_a_walk_of_every_lease_finds(steps):
    """expired() skips its walk while the clock is before the earliest expiry it last saw;
    through any mix of grants, renewals, finishes and ticks it must return exactly the
    leases a walk of every lease would."""
    s = Scheduler(lease_ttl_s=5)
    w = worker(slots=100)
    now = 100.0
    jobs = {}
    for action, n, advance in steps:
        now += advance
        uuid = f"00000000-0000-0000-0000-{n:012d}"
        if action == "grant" and uuid not in s.active:
            job = submit(s, "start", uuid)
            s.pop_head(uuid)
            jobs[uuid] = job
            s.grant(job, w, epoch=1, now=now, now_wall=now)
        elif action == "renew" and uuid in s.active:
            s.renew("w1", [jobs[uuid].lease_id], now=now)
        elif action == "finish" and uuid in s.active:
            s.finish(jobs[uuid], "succeeded", now)
        walked = sorted(lease.lease_id for lease in s.leases.values() if lease.expires_at <= now)
        found = sorted(lease.lease_id for lease in s.expired(now))
        assert found == walked
        for lease in s.expired(now):  # the broker ends an expired lease's job
            s.finish(s.jobs[lease.job_id], "lost", now)
