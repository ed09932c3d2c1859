"""The broker's state and the one place its jobs change: no sockets, a clock passed in.

BrokerCore holds the registry, the scheduler (queues and leases), the worker table, the
store's pending batch, the events and the outbox. The handlers (client_handlers,
worker_handlers) and dispatch (placement) act through it; the loop (server) feeds it
messages and time, and sends what it leaves in the outbox. Unit tests drive it directly with
a fake clock (tests/unit/broker_stub.py).
"""

from __future__ import annotations

import json
import logging
import subprocess
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field

from virtbroker.broker.events import Events
from virtbroker.broker.metrics import BrokerMetrics
from virtbroker.broker.outbox import TO_WORKERS, Outbox
from virtbroker.broker.registry import DomainRecord, Registry
from virtbroker.broker.scheduler import Job, Scheduler, WorkerInfo
from virtbroker.broker.store import Batch, Store
from virtbroker.common import protocol as p
from virtbroker.common.config import Config
from virtbroker.common.domxml import memory_mib

log = logging.getLogger("virtbroker.broker")

# A lifecycle worker's report of its host's guests is not applied to a domain whose state
# changed this recently: the report may have been taken just before another worker's job
# changed it.
RESYNC_QUIET_S = 5.0
# The store's meta key of the host table (what of each host outlives a restart: see save_hosts).
HOSTS_META = "hosts"
# Label ids the broker remembers to refuse a reused one (a replayed request); the oldest are
# forgotten first. Each is a random 128-bit id, so a reuse is never an accident.
LABEL_IDS_KEPT = 100000


class Clock:
    """Time as the broker reads it: monotonic for deadlines, wall for what users see."""

    monotonic = staticmethod(time.monotonic)
    wall = staticmethod(time.time)


@dataclass
class Waiter:
    """A client's `wait`, answered when its jobs are final or at its deadline."""

    identity: bytes
    request_id: int
    job_ids: list[int]
    deadline: float  # monotonic
    dest: object = None  # the endpoint the wait came in on
    final_prefix: int = 0  # job_ids[:final_prefix] are final


@dataclass
class Host:
    """A hypervisor host as its lifecycle workers describe it (memory and CPUs from libvirt),
    and its liveness (broker/hosts.py has the states and what moves between them)."""

    host_id: str
    memory_mib: int = 0  # 0: not reported (placement then counts guests only)
    cpus: int = 0
    draining: bool = False
    placed: dict[str, int] = field(default_factory=dict)  # domain uuid -> MiB it was placed with
    embedded: bool = False  # test:///: the hypervisor lives inside its worker
    state: str = "up"  # up, unreachable, fencing, fenced, rejoining
    renewed_at: float = 0.0  # monotonic: the last renewal of its host lease
    renewed_wall: float = 0.0
    shared_storage_roots: tuple[str, ...] = ()
    watchdog: bool = False  # its workers pet a watchdog while armed
    armed_when_lost: bool = False  # a worker of it said it was armed when it fell silent
    watchdog_workers: set[str] = field(default_factory=set)  # its workers whose hello said watchdog
    # worker id -> (its last beat said armed and it has a watchdog, when that beat came, monotonic)
    armed_workers: dict[str, tuple[bool, float]] = field(default_factory=dict)
    lost_at: float = 0.0
    fence_proc: subprocess.Popen | None = None
    fence_started: float = 0.0
    fence_next_try: float = 0.0
    fenced_domains: set[str] = field(default_factory=set)  # domains shut off when it was fenced
    strays: set[str] = field(default_factory=set)  # guests it was asked to destroy on return

    @property
    def used_mib(self) -> int:
        return sum(self.placed.values())

    @property
    def free_mib(self) -> int:
        return self.memory_mib - self.used_mib


class BrokerCore:
    def __init__(self, config: Config, store: Store, clock: Clock | None = None, metrics: BrokerMetrics | None = None):
        self.config = config
        self.store = store
        self.clock = clock or Clock()
        self.metrics = metrics or BrokerMetrics()
        self.registry = Registry()
        self.scheduler = Scheduler(config.lease_ttl_s)
        self.workers: dict[str, WorkerInfo] = {}
        self.hosts: dict[str, Host] = {}
        self.identities: dict[str, bytes] = {}  # worker_id -> ROUTER identity of its connection
        # worker_id -> the peer that registered it: its CURVE key, or without CURVE its
        # connection (ROUTER identity). A message naming a worker must come from that peer.
        self.worker_peers: dict[str, bytes] = {}
        self.worker_keys: dict | None = None  # CURVE: public key (z85) -> WorkerKey; None without CURVE
        self.label_ids: OrderedDict[str, None] = OrderedDict()  # recent label ids (see LABEL_IDS_KEPT)
        # label_id -> (lifecycle worker awaiting the reply, security worker asked)
        self.label_routes: dict[str, tuple[str, str]] = {}
        self.waiters: list[Waiter] = []
        self.waited_for: dict[int, int] = {}  # job_id -> how many waiters name it (pruning spares these)
        self.outbox = Outbox()
        self.events = Events(int(store.meta("event_seq", "0")), keep=store.put_event)
        self.saved_seq = self.events.seq
        # The oldest event the store keeps for replay (events before it are gone).
        oldest = store.oldest_event()
        self.oldest_event = oldest if oldest is not None else self.events.seq + 1
        self.saved_next_job_id = 1
        # Hosts that fail (broker/hosts.py): no host is fenced before fence_allowed_at (the quiet
        # period after a start or takeover).
        self.fence_allowed_at = 0.0
        self.hosts_checked_at = 0.0
        self.stuck_checked_at = 0.0
        self.stuck_round: list[str] = []  # domains whose queue heads hosts.fail_stuck_jobs has yet to look at
        self.partition_logged = False
        self.partition_seen_at = float("-inf")  # monotonic: the last check that found a partition
        self.saved_hosts = ""

    # ------------------------------------------------------------------ startup
    def load(self) -> None:
        for record in self.store.load_domains():
            self.registry.add(record)
            if record.state != "shutoff" and record.host_id is not None:
                self.place(record, record.host_id)
        now = self.clock.monotonic()
        restored = 0
        for job in self.store.load_jobs():
            if job.state == "running":
                # The worker may still be running it; it keeps its lease for one TTL and
                # can report (or say hello with it) before the lease expires as lost.
                self.scheduler.restore_running(job, now)
                restored += 1
            else:
                self.scheduler.restore_job(job)
        self.scheduler.next_job_id = max(self.scheduler.next_job_id, int(self.store.meta("next_job_id", "1")))
        self.saved_next_job_id = self.scheduler.next_job_id
        self.load_hosts(now)
        # Oldest final first, so that pruning forgets the same jobs it would have before the restart.
        jobs = self.scheduler.jobs
        self.scheduler.finished = deque(sorted(self.scheduler.finished, key=lambda j: (jobs[j].finished_at or 0.0, j)))
        log.info(
            "loaded %d domains, %d jobs (%d running leases restored) from %s",
            len(self.registry), len(self.scheduler.jobs), restored, self.store.path,
        )

    def load_hosts(self, now: float) -> None:
        """The hosts of the store, each given host_dead_s from now to renew its lease."""
        self.saved_hosts = self.store.meta(HOSTS_META, "") or ""
        try:
            saved = json.loads(self.saved_hosts or "{}")
        except ValueError:
            log.error("the stored host table is not JSON; starting without it")
            saved = {}
        for host_id, fields in saved.items():
            host = self.host(host_id)
            host.embedded = bool(fields.get("embedded"))
            host.draining = bool(fields.get("draining"))
            host.fenced_domains = set(fields.get("fenced", ()))
            if fields.get("state") == "fenced":
                host.state = "fenced"
        for host in self.hosts.values():
            host.renewed_at = now
        self.fence_allowed_at = now + self.config.fence_quiet_s

    def save_hosts(self) -> None:
        """Store what a restarted broker must know of each host: embedded, draining, fenced."""
        table = {
            h.host_id: {"embedded": h.embedded, "draining": h.draining,
                        "state": "fenced" if h.state == "fenced" else "", "fenced": sorted(h.fenced_domains)}
            for h in self.hosts.values()
        }
        text = json.dumps(table, sort_keys=True)
        if text != self.saved_hosts:
            self.saved_hosts = text
            self.store.set_meta(HOSTS_META, text)

    # ------------------------------------------------------------------ job transitions
    # Every change of a job's state goes through these: they change it, write it, emit it.
    def new_job(self, record: DomainRecord, op: str, **kw) -> Job:
        """-> QUEUED"""
        job = self.scheduler.new_job(record.uuid, record.name, op, self.clock.wall(), **kw)
        self.scheduler.enqueue(job)
        self._changed(job)
        return job

    def run_job(self, job: Job, worker: WorkerInfo, record: DomainRecord, now: float) -> None:
        """QUEUED -> RUNNING on worker, under a new lease and the domain's next epoch; the
        assignment leaves once that is on disk."""
        self.scheduler.pop_head(job.uuid)
        record.epoch += 1
        lease = self.scheduler.grant(job, worker, record.epoch, now, self.clock.wall())
        if job.op == "start":
            record.host_id = worker.host_id  # so a lost start is reconciled on the right host
            record.live_xml = record.xml
            self.place(record, worker.host_id)
        self.store.put_domain_state(record)
        self._changed(job)
        self.to_worker(
            worker.worker_id,
            p.JobAssignment(
                job_id=job.job_id,
                op=job.op,
                lease_id=lease.lease_id,
                epoch=lease.epoch,
                lease_ttl_s=self.config.lease_ttl_s,
                domain_uuid=record.uuid,
                domain_name=record.name,
                xml=record.live_xml or record.xml,
                timeout_s=job.timeout_s,
                security=list(self.config.security) if job.op in ("start", "destroy", "shutdown", "reconcile") else [],
                deadline_s=job.deadline_s,
            ),
        )

    def finish_job(self, job: Job, state: str, error: str | None = None, code: str | None = None) -> None:
        """QUEUED or RUNNING -> SUCCEEDED | FAILED | LOST; a queued job leaves its queue."""
        if job.state == "queued" and job.job_id in self.scheduler.queues.get(job.uuid, ()):
            self.scheduler.remove_queued(job)
        self.scheduler.finish(job, state, self.clock.wall(), error, code)
        self._changed(job)

    def cancel_job(self, job_id: int) -> Job:
        """QUEUED -> CANCELLED"""
        job = self.scheduler.cancel(job_id, self.clock.wall())
        self._changed(job)
        return job

    def _changed(self, job: Job) -> None:
        self.store.put_job(job)
        self.metrics.job_transition(job)
        self.events.job(job)

    def queue_reconcile(self, record: DomainRecord, why: str) -> None:
        if any(j.op == "reconcile" for j in self.scheduler.pending_for(record.uuid)):
            return
        job = self.new_job(record, "reconcile", deadline_s=self.config.deadline_s["reconcile"])
        log.info("queued reconcile job %d for %s: %s", job.job_id, record.name, why)

    # ------------------------------------------------------------------ domains
    def set_state(self, record: DomainRecord, state: str, host_id: str | None, reason: str | None = None) -> None:
        changed = record.state != state or record.host_id != host_id
        record.changed_at = self.clock.monotonic()
        self.registry.set_state(record, state)
        record.host_id = host_id
        if state == "shutoff":
            record.live_xml = None
            self.unplace(record)
        elif host_id is not None and record.uuid not in self.host(host_id).placed:
            self.place(record, host_id)
        self.store.put_domain_state(record)
        if changed:
            self.events.domain(record, "state", reason)

    def place(self, record: DomainRecord, host_id: str) -> None:
        """Count the domain's memory on host_id (where it runs, or where a start sends it)."""
        self.unplace(record)
        self.host(host_id).placed[record.uuid] = memory_mib(record.live_xml or record.xml)

    def unplace(self, record: DomainRecord) -> None:
        for host in self.hosts.values():
            host.placed.pop(record.uuid, None)

    def host(self, host_id: str) -> Host:
        host = self.hosts.get(host_id)
        if host is None:
            host = self.hosts[host_id] = Host(host_id, renewed_at=self.clock.monotonic())
        return host

    def undefine(self, record: DomainRecord, job: Job) -> None:
        """The broker's own op: the domain goes, and every job still queued for it fails."""
        self.scheduler.pop_head(record.uuid)
        self.unplace(record)
        self.registry.remove(record.uuid)
        self.store.delete_domain(record.uuid)
        self.finish_job(job, "succeeded")
        self.events.domain(record, "undefined")
        for later in self.scheduler.pending_for(record.uuid):
            self.finish_job(later, "failed", f"domain {record.name} was undefined", "not-found")

    # ------------------------------------------------------------------ messages out
    def to_worker(self, worker_id: str, msg: p.Message, durable: bool = True) -> None:
        """Job assignments and result acks wait for the disk; routing and greetings need not."""
        identity = self.identities.get(worker_id)
        if identity is not None:
            self.outbox.put(TO_WORKERS, [identity, *p.encode(msg)], durable)

    def to_connection(self, identity: bytes, msg: p.Message) -> None:
        """To a worker connection that is not (or not yet) a registered worker."""
        self.outbox.put(TO_WORKERS, [identity, *p.encode(msg)])

    def reply(self, dest, identity: bytes, msg: p.Message, durable: bool = False) -> None:
        self.outbox.put(dest, [identity, *p.encode(msg)], durable)

    def forget_worker(self, worker: WorkerInfo) -> None:
        """Drop a worker from the table. Its id stays bound to its peer (worker_peers)."""
        del self.workers[worker.worker_id]
        self.identities.pop(worker.worker_id, None)

    def remember_label_id(self, label_id: str) -> None:
        self.label_ids[label_id] = None
        if len(self.label_ids) > LABEL_IDS_KEPT:
            self.label_ids.popitem(last=False)

    def fail_label_routes(self, worker: WorkerInfo) -> None:
        """A security worker left: its unanswered requests fail now instead of at the requester's timeout."""
        for label_id, (requester, target) in list(self.label_routes.items()):
            if target == worker.worker_id:
                del self.label_routes[label_id]
                self.to_worker(requester, p.LabelReply(
                    worker_id="broker", label_id=label_id, driver=",".join(worker.drivers), ok=False,
                    error=f"security worker {worker.worker_id} went away before answering",
                ), durable=False)

    # ------------------------------------------------------------------ time
    def tick(self, now: float) -> None:
        """Prune the job history, end jobs whose lease expired, drop workers that fell silent."""
        if len(self.scheduler.finished) > self.config.job_history:
            for job_id in self.scheduler.prune(self.config.job_history, self.waited_for):
                self.store.delete_job(job_id)
        for lease in self.scheduler.expired(now):
            job = self.scheduler.jobs[lease.job_id]
            worker = self.workers.get(lease.worker_id)
            if worker is not None:
                worker.drop(job.job_id)
            if lease.past_deadline(now):
                # RUNNING -> LOST (its deadline passed: the worker stopped renewing, or we stopped believing it)
                code = "deadline"
                error = (f"job ran past its deadline of {job.deadline_s:g} s on worker {lease.worker_id}; "
                         "outcome unknown")
            else:
                # RUNNING -> LOST (lease expired)
                code, error = "lease", f"lease expired on worker {lease.worker_id}; outcome unknown"
            log.warning("job %d (%s %s) lost: %s", job.job_id, job.op, job.domain_name, error)
            self.metrics.lease_expiries.inc()
            self.finish_job(job, "lost", error, code)
            record = self.registry.by_uuid.get(job.uuid)
            if record is not None:
                # A lost reconcile is retried on another worker of the host, like any lost job.
                self.queue_reconcile(record, f"{'reconcile ' if job.op == 'reconcile' else ''}job {job.job_id} lost")
        silent_since = now - self.config.lease_ttl_s
        for worker in [w for w in self.workers.values() if w.last_seen < silent_since]:
            self.forget_worker(worker)
            self.fail_label_routes(worker)
            log.warning("worker %s (host %s) is gone: no heartbeat for %.1f s", worker.worker_id, worker.host_id,
                        now - worker.last_seen)
            self.worker_gone(worker)

    def worker_gone(self, worker: WorkerInfo) -> None:
        """An embedded hypervisor (test:///default) lives inside its worker: when the last worker
        of such a host is gone, so are its guests. A real host's guests outlive their workers and
        wait, with their queued jobs, for a worker of that host to return."""
        if worker.role != "lifecycle" or not worker.uri.startswith("test:///"):
            return
        if any(w.host_id == worker.host_id for w in self.workers.values()):
            return
        for record in list(self.registry.by_uuid.values()):
            if record.host_id != worker.host_id or record.uuid in self.scheduler.active:
                continue
            for job in self.scheduler.pending_for(record.uuid):
                if job.op == "reconcile":
                    self.finish_job(job, "succeeded")
            log.info("%s: its embedded host %s is gone with its worker; now shut off", record.name, worker.host_id)
            self.set_state(record, "shutoff", None, reason=f"embedded host {worker.host_id} is gone with its workers")
        self.hosts.pop(worker.host_id, None)
        self.save_hosts()

    def answer_waiters(self, now: float) -> None:
        if not self.waiters:
            return
        still = []
        jobs = self.scheduler.jobs
        for waiter in self.waiters:
            # Jobs never leave a final state: each turn looks on from the first one that was not final.
            ids = waiter.job_ids
            while waiter.final_prefix < len(ids) and jobs[ids[waiter.final_prefix]].final:
                waiter.final_prefix += 1
            done = waiter.final_prefix == len(ids)
            if done or now >= waiter.deadline:
                result = {"jobs": [jobs[j].summary() for j in ids], "timed_out": not done}
                self.reply(
                    waiter.dest, waiter.identity, p.Ok(request_id=waiter.request_id, result=result), durable=True
                )
                for job_id in ids:
                    left = self.waited_for.pop(job_id) - 1
                    if left:
                        self.waited_for[job_id] = left
            else:
                still.append(waiter)
        self.waiters = still

    # ------------------------------------------------------------------ end of a turn
    def take_batch(self) -> Batch | None:
        """This turn's changes as one batch for the writer (group commit), or None."""
        if self.events.seq != self.saved_seq:
            self.saved_seq = self.events.seq
            self.store.set_meta("event_seq", str(self.events.seq))
        # The event history is bounded: trim it when it is a hundredth over, not every turn.
        kept = self.events.seq - self.oldest_event + 1
        history = self.config.event_history
        if kept > history + max(1, history // 100):
            self.oldest_event = self.events.seq - history + 1
            self.store.forget_events_before(self.oldest_event)
        if self.scheduler.next_job_id != self.saved_next_job_id:
            # Job ids are never reused, even when the job with the highest id was pruned.
            self.saved_next_job_id = self.scheduler.next_job_id
            self.store.set_meta("next_job_id", str(self.saved_next_job_id))
        return self.store.take_batch()
