"""Jobs, per-domain FIFO queues, leases and the worker table: pure state machines that take the clock."""

from __future__ import annotations

import math
import secrets
import time
from collections import deque
from collections.abc import Container
from dataclasses import dataclass, field

from virtbroker.common.errors import NotFoundError, OperationInvalidError

# Ops that jump to the front of their domain's queue. libvirt keeps separate priority
# workers for destroy for the same reason: killing a guest must not wait behind a slow job.
PRIORITY_OPS = ("destroy", "reconcile")


@dataclass
class Job:
    job_id: int
    uuid: str
    domain_name: str
    op: str
    state: str = "queued"
    submitted_at: float = 0.0  # wall clock, for display
    started_at: float | None = None
    finished_at: float | None = None
    error: str | None = None
    error_code: str | None = None
    timeout_s: float | None = None
    idempotency_key: str | None = None
    worker_id: str | None = None
    host_id: str | None = None
    lease_id: str | None = None
    epoch: int | None = None
    deadline_s: float | None = None  # how long it may run once started (None: no deadline)

    @property
    def final(self) -> bool:
        return self.state in ("succeeded", "failed", "cancelled", "lost")

    @classmethod
    def from_dict(cls, data: dict) -> Job:
        return cls(**data)

    def summary(self) -> dict:
        return {
            "job_id": self.job_id,
            "domain": self.domain_name,
            "uuid": self.uuid,
            "op": self.op,
            "state": self.state,
            "error": self.error,
            "error_code": self.error_code,
            "submitted_at": self.submitted_at,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "worker_id": self.worker_id,
            "host": self.host_id,
        }


@dataclass
class Lease:
    lease_id: str
    job_id: int
    uuid: str
    worker_id: str
    epoch: int
    expires_at: float  # monotonic
    # The job's deadline (monotonic): renewals never carry the lease more than one TTL past
    # it, whatever the worker says, so a job stuck in a hung call ends `lost` (deadline).
    deadline_at: float = math.inf

    def renew(self, now: float, ttl_s: float) -> None:
        self.expires_at = min(now, self.deadline_at) + ttl_s

    def past_deadline(self, now: float) -> bool:
        return now >= self.deadline_at


@dataclass
class WorkerInfo:
    worker_id: str
    role: str
    host_id: str
    uri: str
    slots: int
    drivers: list[str] = field(default_factory=list)
    last_seen: float = 0.0  # monotonic
    jobs: set = field(default_factory=set)  # job ids (lifecycle) or label ids (security) it holds
    # Extra slots for PRIORITY_OPS only (destroy, reconcile): libvirtd's priority workers. A
    # destroy takes one when every ordinary slot is busy, so it never waits behind starts.
    priority_slots: int = 0
    priority_jobs: set[int] = field(default_factory=set)  # the jobs in those slots

    @property
    def free_slots(self) -> int:
        return self.slots - (len(self.jobs) - len(self.priority_jobs))

    @property
    def free_priority_slots(self) -> int:
        return self.priority_slots - len(self.priority_jobs)

    def can_take(self, op: str) -> bool:
        return self.free_slots > 0 or (op in PRIORITY_OPS and self.free_priority_slots > 0)

    def take(self, job_id: int, op: str) -> None:
        if self.free_slots <= 0 and op in PRIORITY_OPS:
            self.priority_jobs.add(job_id)
        self.jobs.add(job_id)

    def drop(self, job_id) -> None:
        self.jobs.discard(job_id)
        self.priority_jobs.discard(job_id)

    def summary(self) -> dict:
        return {
            "worker_id": self.worker_id,
            "role": self.role,
            "host": self.host_id,
            "uri": self.uri,
            "slots": self.slots,
            "priority_slots": self.priority_slots,
            "busy": len(self.jobs),
            "drivers": list(self.drivers),
        }


class Scheduler:
    """Per-domain queues and leases. At most one job per domain runs at a time."""

    def __init__(self, lease_ttl_s: float):
        self.lease_ttl_s = lease_ttl_s
        self.jobs: dict[int, Job] = {}
        self.queues: dict[str, deque[int]] = {}
        self.active: dict[str, int] = {}  # domain uuid -> job_id holding its lease
        # Domains with a queued job and none running, in the order they became ready: a
        # domain whose job ends goes to the back, so domains take turns for free slots.
        self.ready: dict[str, None] = {}
        self.leases: dict[str, Lease] = {}
        # No lease expires before this (monotonic seconds). A lower bound, kept so that a
        # busy broker does not walk every lease on every turn: leases are only added
        # (expiring no earlier than this), renewed (later) or released, so the earliest
        # expiry found by the last walk can only move later until the next walk.
        self.earliest_expiry = math.inf
        self.by_key: dict[str, int] = {}
        self.next_job_id = 1
        self.finished: deque[int] = deque()  # final jobs, in the order they became final
        # Each domain's jobs in id order (an ordered set): `jobs --domain` walks these, not
        # every job. `jobs` itself walks self.jobs, which holds jobs in id order too (they are
        # added in id order, on submit and when loaded).
        self.by_domain: dict[str, dict[int, None]] = {}
        self.queued_count = 0  # jobs waiting in any queue: max_queued_jobs is checked on this
        self.priority_queued = 0  # of them, PRIORITY_OPS (dispatch looks for these when slots are full)

    # -- jobs
    def new_job(self, uuid: str, name: str, op: str, now_wall: float, **kw) -> Job:
        job = Job(job_id=self.next_job_id, uuid=uuid, domain_name=name, op=op, submitted_at=now_wall, **kw)
        self.next_job_id += 1
        self._add(job)
        return job

    def _add(self, job: Job) -> None:
        self.jobs[job.job_id] = job
        self.by_domain.setdefault(job.uuid, {})[job.job_id] = None
        if job.idempotency_key:
            self.by_key[job.idempotency_key] = job.job_id

    def restore_job(self, job: Job) -> None:
        """Put a job loaded from disk back (in id order); queued ones re-enter their queue in order."""
        self._add(job)
        self.next_job_id = max(self.next_job_id, job.job_id + 1)
        if job.state == "queued":
            self.enqueue(job)
        elif job.final:
            self.finished.append(job.job_id)

    def restore_running(self, job: Job, now: float) -> Lease:
        """Put back a job that was running when the broker stopped, with its lease (see restore_lease)."""
        self._add(job)
        self.next_job_id = max(self.next_job_id, job.job_id + 1)
        return self.restore_lease(job, now)

    def queued_for(self, uuid: str) -> int:
        return len(self.queues.get(uuid, ()))

    def _dequeued(self, job: Job) -> None:
        self.queued_count -= 1
        if job.op in PRIORITY_OPS:
            self.priority_queued -= 1

    def enqueue(self, job: Job) -> None:
        self.queued_count += 1
        if job.op in PRIORITY_OPS:
            self.priority_queued += 1
        queue = self.queues.setdefault(job.uuid, deque())
        if job.op in PRIORITY_OPS:
            # After priority jobs already waiting, before everything else.
            position = 0
            while position < len(queue) and self.jobs[queue[position]].op in PRIORITY_OPS:
                position += 1
            queue.insert(position, job.job_id)
        else:
            queue.append(job.job_id)
        if job.uuid not in self.active:
            self.ready.setdefault(job.uuid)

    def get(self, job_id: int) -> Job:
        job = self.jobs.get(job_id)
        if job is None:
            raise NotFoundError(f"no job with id {job_id}")
        return job

    def cancel(self, job_id: int, now_wall: float) -> Job:
        job = self.get(job_id)
        if job.state != "queued":
            raise OperationInvalidError(f"job {job_id} is {job.state}; only queued jobs can be cancelled")
        self.queues[job.uuid].remove(job_id)
        self._dequeued(job)
        self.drop_empty_queue(job.uuid)
        # QUEUED -> CANCELLED
        self._now_final(job)
        job.state = "cancelled"
        job.finished_at = now_wall
        return job

    def _now_final(self, job: Job) -> None:
        """Called just before a job's state turns final: it joins the history prune() trims."""
        if not job.final:
            self.finished.append(job.job_id)

    def prune(self, keep: int, in_use: Container[int]) -> list[int]:
        """Forget the oldest final jobs beyond `keep`; returns their ids.

        Stops at a job in `in_use` (a client still waits for it), so that one and those
        after it stay until the next call. A forgotten job's idempotency key may be
        used again.
        """
        pruned = []
        while len(self.finished) > keep and self.finished[0] not in in_use:
            job_id = self.finished.popleft()
            job = self.jobs.pop(job_id, None)
            if job is not None:
                of_domain = self.by_domain.get(job.uuid)
                if of_domain is not None:
                    of_domain.pop(job_id, None)
                    if not of_domain:
                        del self.by_domain[job.uuid]
            if job is not None and job.idempotency_key and self.by_key.get(job.idempotency_key) == job_id:
                del self.by_key[job.idempotency_key]
            pruned.append(job_id)
        return pruned

    def ready_domains(self) -> list[str]:
        """Domains whose queue head may run now (no job of theirs holds a lease), longest ready first."""
        return list(self.ready)

    def head(self, uuid: str) -> Job:
        return self.jobs[self.queues[uuid][0]]

    def pop_head(self, uuid: str) -> Job:
        job = self.jobs[self.queues[uuid].popleft()]
        self._dequeued(job)
        self.drop_empty_queue(uuid)
        return job

    def remove_queued(self, job: Job) -> None:
        """Take a queued job out of its domain's queue (it is about to become final)."""
        self.queues[job.uuid].remove(job.job_id)
        self._dequeued(job)
        self.drop_empty_queue(job.uuid)

    def drop_empty_queue(self, uuid: str) -> None:
        if not self.queues.get(uuid):
            self.queues.pop(uuid, None)
            self.ready.pop(uuid, None)

    def pending_for(self, uuid: str) -> list[Job]:
        return [self.jobs[j] for j in self.queues.get(uuid, ())]

    # -- leases
    def grant(self, job: Job, worker: WorkerInfo, epoch: int, now: float, now_wall: float) -> Lease:
        """QUEUED -> RUNNING under a new lease with the domain's next epoch.

        Lease ids are 128 random bits (secrets): a worker cannot name a lease it was not given.
        """
        if job.uuid in self.active:
            raise OperationInvalidError(f"domain {job.domain_name} already has job {self.active[job.uuid]} running")
        lease = Lease(
            lease_id=secrets.token_hex(16),
            job_id=job.job_id,
            uuid=job.uuid,
            worker_id=worker.worker_id,
            epoch=epoch,
            expires_at=now + self.lease_ttl_s,
            deadline_at=now + job.deadline_s if job.deadline_s is not None else math.inf,
        )
        self._add_lease(lease)
        self.active[job.uuid] = job.job_id
        self.ready.pop(job.uuid, None)
        worker.take(job.job_id, job.op)
        # QUEUED -> RUNNING
        job.state = "running"
        job.started_at = now_wall
        job.worker_id = worker.worker_id
        job.host_id = worker.host_id
        job.lease_id = lease.lease_id
        job.epoch = epoch
        return lease

    def restore_lease(self, job: Job, now: float) -> Lease:
        """After a broker restart a running job keeps its lease for one more TTL: its worker
        may still report (it reconnects and says hello with its leases) before it expires."""
        deadline_at = math.inf
        if job.deadline_s is not None and job.started_at is not None:
            # What is left of the deadline, by the wall clock (the monotonic one restarted with us).
            deadline_at = now + max(0.0, job.started_at + job.deadline_s - time.time())
        lease = Lease(job.lease_id, job.job_id, job.uuid, job.worker_id, job.epoch, now + self.lease_ttl_s, deadline_at)
        self._add_lease(lease)
        self.active[job.uuid] = job.job_id
        self.ready.pop(job.uuid, None)
        return lease

    def renew(self, worker_id: str, lease_ids: list[str], now: float) -> list[str]:
        """Renew the worker's leases; returns the ids it named that are no longer its."""
        unknown = []
        for lease_id in lease_ids:
            lease = self.leases.get(lease_id)
            if lease is None or lease.worker_id != worker_id:
                unknown.append(lease_id)
            else:
                lease.renew(now, self.lease_ttl_s)
        return unknown

    def _add_lease(self, lease: Lease) -> None:
        self.leases[lease.lease_id] = lease
        self.earliest_expiry = min(self.earliest_expiry, lease.expires_at)

    def expired(self, now: float) -> list[Lease]:
        """Leases whose time is up; the caller ends their jobs (which releases them)."""
        if now < self.earliest_expiry:
            return []
        out = []
        earliest = math.inf
        for lease in self.leases.values():
            if lease.expires_at <= now:
                out.append(lease)
            earliest = min(earliest, lease.expires_at)
        self.earliest_expiry = earliest
        return out

    def release(self, lease: Lease) -> None:
        self.leases.pop(lease.lease_id, None)
        if self.active.get(lease.uuid) == lease.job_id:
            del self.active[lease.uuid]
            if self.queues.get(lease.uuid):
                self.ready[lease.uuid] = None  # to the back of the line

    def finish(self, job: Job, state: str, now_wall: float, error: str | None = None, code: str | None = None):
        # RUNNING -> SUCCEEDED | FAILED | LOST, or QUEUED -> FAILED (refused before dispatch)
        self._now_final(job)
        job.state = state
        job.finished_at = now_wall
        job.error = error
        job.error_code = code
        if job.lease_id and job.lease_id in self.leases:
            self.release(self.leases[job.lease_id])
