"""Dispatch and placement: which queued job runs now, and on which worker of which host.

Functions over the broker's state (BrokerCore: its registry, scheduler and worker table),
called once per loop turn. libvirt's state checks are made here, when a job's turn comes.
"""

from __future__ import annotations

from virtbroker.broker import hosts
from virtbroker.broker.core import BrokerCore, Host
from virtbroker.broker.registry import DomainRecord
from virtbroker.broker.scheduler import PRIORITY_OPS, Job, WorkerInfo
from virtbroker.common.domxml import disk_sources, memory_mib


def dispatch(core: BrokerCore, now: float) -> None:
    """Give each ready domain's queue head to a worker, if one can take it."""
    scheduler = core.scheduler
    if not scheduler.ready:
        return
    # Only hosts that are up take jobs: not one rejoining (it destroys its strays first).
    lifecycle = [w for w in core.workers.values() if w.role == "lifecycle" and _up(core, w.host_id)]
    free = sum(max(0, w.free_slots) for w in lifecycle)
    free_priority = sum(max(0, w.free_priority_slots) for w in lifecycle)
    capacity = any(w.slots > 0 for w in lifecycle)
    if capacity and free <= 0 and (free_priority <= 0 or scheduler.priority_queued == 0):
        # Every slot that could take a waiting job is busy: nothing can start, and the checks
        # below (refusals, undefine) wait for the turn a slot frees, as the domain's turn.
        # Without this, each turn of a busy broker would walk every waiting domain.
        return
    for uuid in scheduler.ready_domains():
        job = scheduler.head(uuid)
        record = core.registry.by_uuid.get(uuid)
        refusal = refusal_of(job, record)
        if refusal is not None:
            # QUEUED -> FAILED (not valid in the domain's state when its turn came)
            core.finish_job(job, "failed", refusal[1], refusal[0])
            continue
        if job.op == "undefine":
            core.undefine(record, job)
            continue
        if job.op == "reconcile" and record.host_id is None:
            core.finish_job(job, "succeeded")  # no host to ask: nothing runs
            continue
        if free <= 0 and not (job.op in PRIORITY_OPS and free_priority > 0):
            if capacity and free_priority <= 0:
                break  # the rest wait for a slot (see above)
            continue  # no worker at all, or only a priority slot: only refusals, undefines and priority ops go on
        if job.op == "start":
            worker, why_not = pick_host_for_start(core, lifecycle, record)
            if why_not is not None:
                # QUEUED -> FAILED (no host could ever take it as the hosts are now)
                core.finish_job(job, "failed", why_not, "operation-failed")
                continue
        else:
            worker = pick_worker_on_host(lifecycle, record.host_id, job.op)
        if worker is None:
            continue  # waits in the broker, not in a worker slot
        if worker.free_slots > 0:
            free -= 1
        else:
            free_priority -= 1
        core.run_job(job, worker, record, now)


def _up(core: BrokerCore, host_id: str) -> bool:
    host = core.hosts.get(host_id)
    return host is None or host.state == "up"


def refusal_of(job: Job, record: DomainRecord | None) -> tuple[str, str] | None:
    """libvirt's operation-invalid checks, made when the job's turn comes."""
    if record is None:
        return "not-found", f"domain {job.domain_name} was undefined before job {job.job_id} ran"
    state, op = record.state, job.op
    if op == "start" and state == "unknown":
        return "operation-invalid", (f"Requested operation is not valid: domain '{record.name}' is on host "
                                     f"{record.host_id}, which is unreachable; its state is unknown")
    if op == "start" and state != "shutoff":
        return "operation-invalid", f"Requested operation is not valid: domain '{record.name}' is already active"
    if op in ("shutdown", "destroy", "reboot", "suspend") and state == "shutoff":
        return "operation-invalid", f"Requested operation is not valid: domain '{record.name}' is not running"
    if op == "resume" and state != "paused":
        return "operation-invalid", f"Requested operation is not valid: domain '{record.name}' is not paused"
    if op == "undefine" and state != "shutoff":
        return (
            "operation-invalid",
            f"Requested operation is not valid: domain '{record.name}' is {state}; destroy it before undefine",
        )
    return None


def pick_worker_on_host(lifecycle: list[WorkerInfo], host_id: str | None, op: str) -> WorkerInfo | None:
    """A job on a placed domain runs on its host: the worker there with the most free slots."""
    candidates = [w for w in lifecycle if w.host_id == host_id and w.can_take(op)]
    return max(candidates, key=lambda w: (w.free_slots, w.free_priority_slots)) if candidates else None


def pick_host_for_start(
    core: BrokerCore, lifecycle: list[WorkerInfo], record: DomainRecord
) -> tuple[WorkerInfo | None, str | None]:
    """(worker, None) to start on; (None, None) to wait for a slot; (None, why) if no host fits.

    A start goes to the host with the most free memory that fits the guest (its memory
    against the host's, less what the broker placed there), ties to the host with fewest
    guests, then to its worker with the most free slots. A host whose workers report no
    memory counts as fitting. Hosts being drained, or lacking a configured security driver,
    take no starts. An HA domain starts only where every disk is under one of the host's
    shared_storage_roots, so that it can start again on any such host if this one fails.
    """
    needed_mib = memory_mib(record.xml)
    by_host: dict[str, list[WorkerInfo]] = {}
    for w in lifecycle:
        by_host.setdefault(w.host_id, []).append(w)
    eligible: list[Host] = []
    for host_id in by_host:
        host = core.host(host_id)
        if not host.draining and host_can_label(core, host_id):
            eligible.append(host)
    if not eligible:
        return None, None  # no host at all yet: wait for one
    if record.ha:
        eligible = [h for h in eligible if hosts.storage_fits(h, record.xml)]
        if not eligible:
            return None, (f"'{record.name}' is HA, and no host's shared_storage_roots hold all its disks "
                          f"({', '.join(disk_sources(record.xml))})")
    fitting = [h for h in eligible if h.memory_mib == 0 or h.free_mib >= needed_mib]
    if not fitting:
        best = max(eligible, key=lambda h: h.free_mib)
        return None, (
            f"no host has {needed_mib} MiB free for '{record.name}' (most free: {best.free_mib} MiB "
            f"of {best.memory_mib} on {best.host_id})"
        )
    for host in sorted(fitting, key=lambda h: (-(h.free_mib if h.memory_mib else 0), len(h.placed), h.host_id)):
        workers = [w for w in by_host[host.host_id] if w.free_slots > 0]
        if workers:
            return max(workers, key=lambda w: w.free_slots), None
    return None, None  # every host that fits is busy: wait for a slot


def host_can_label(core: BrokerCore, host_id: str) -> bool:
    """A start needs every configured security driver on the host it lands on."""
    if not core.config.security:
        return True
    present = {d for w in core.workers.values() if w.role == "security" and w.host_id == host_id for d in w.drivers}
    return all(d in present for d in core.config.security)
