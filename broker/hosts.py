"""Hosts that fail: host leases, fencing, HA restarts, returning hosts, jobs no host can take.

Functions over the broker's state (BrokerCore), like placement. A host is alive while any of
its lifecycle workers renews its host lease: every heartbeat (and hello) renews it, and the
broker answers each with `renewed`. The states of a host:

  up           renewed within host_dead_s; it takes jobs (unless draining)
  left         its last lifecycle worker stopped on purpose (`bye`): its guests run on,
               unwatched; it is never fenced but by the operator (a stopped agent is
               maintenance, not a failure); after host_dead_s its domains are `unknown`
  unreachable  no renewal for host_dead_s: its domains are `unknown` (the broker cannot tell)
  fencing      fence_command is running for it
  fenced       known to be off: its domains' epochs were raised, they are shutoff, and HA
               domains were queued to start elsewhere
  rejoining    back after being fenced: it destroys its stray guests before it takes a job

A host is fenced by (a) its own reset, counted only for a host whose workers pet a watchdog
while armed (after host_dead_s + fence_margin_s: the watchdog has reset it by then); (b)
fence_command, an operator's program run with the host id (exit 0: the host is off); or (c)
an operator's `vbctl host-fence HOST --yes-it-is-off`. A worker's self-fence without a
watchdog destroys its guests in a partition but cannot act if the worker itself died, so the
broker does not count on it alone. Nobody is fenced in the first fence_quiet_s after the
broker starts or takes over, nor while more than partition_fraction of the hosts are lost at
once (the broker is then the one cut off).

An embedded host (test:///, the hypervisor lives inside its worker process) is never fenced:
when its workers are gone its guests are gone too, so after host_dead_s its domains are shutoff.
"""

from __future__ import annotations

import logging
import os
import subprocess
from collections.abc import Iterable

from virtbroker.broker.core import BrokerCore, Host
from virtbroker.broker.registry import DomainRecord
from virtbroker.broker.scheduler import WorkerInfo
from virtbroker.common import domxml
from virtbroker.common import protocol as p
from virtbroker.common.errors import InvalidError, NotFoundError, OperationInvalidError

log = logging.getLogger("virtbroker.broker")

CHECK_EVERY_S = 0.2  # host states and stuck jobs are looked at this often, not every turn
STUCK_BATCH = 5000  # queue heads fail_stuck_jobs looks at a second
FENCE_COMMAND_TIMEOUT_S = 120.0  # a fence program still running after this has failed


# ---------------------------------------------------------------------- renewals
def renewed(core: BrokerCore, worker: WorkerInfo, now: float, seq: int) -> None:
    """A lifecycle worker's heartbeat (or hello) renews its host's lease; it hears `renewed`."""
    host = core.host(worker.host_id)
    host.renewed_at = now
    host.renewed_wall = core.clock.wall()
    if host.state in ("unreachable", "fencing", "left"):
        back(core, host, "its workers renew the host lease again")
    core.to_worker(worker.worker_id, p.Renewed(seq=seq, armed=armed(core, host),
                                               self_fence_s=core.config.self_fence_s), durable=False)


def armed(core: BrokerCore, host: Host) -> bool:
    """Self-fencing is armed on a host that runs HA guests (Proxmox arms its watchdog only then)."""
    by_uuid = core.registry.by_uuid
    return any(uuid in by_uuid and by_uuid[uuid].ha for uuid in host.placed)


def back(core: BrokerCore, host: Host, why: str) -> None:
    """An unreachable host answers again before anyone fenced it: it is up, and its domains'
    states come from its next guest list (the hello's, or the first heartbeat after)."""
    if stop_fence_command(host):
        log.warning("host %s is back; stopped its fence command", host.host_id)
    set_host_state(core, host, "up", why)


def stop_fence_command(host: Host) -> bool:
    """Kill the host's fence command if one runs; whether one did."""
    if host.fence_proc is None:
        return False
    host.fence_proc.kill()
    host.fence_proc.wait()
    host.fence_proc = None
    return True


def set_host_state(core: BrokerCore, host: Host, state: str, reason: str) -> None:
    if host.state == state:
        return
    log.warning("host %s: %s -> %s (%s)", host.host_id, host.state, state, reason)
    host.state = state
    core.events.host(host.host_id, state, reason)
    core.metrics.host_transitions.labels(state).inc()
    core.save_hosts()


# ---------------------------------------------------------------------- the periodic check
def check(core: BrokerCore, now: float) -> None:
    """Hosts that fell silent, fence commands that ended, fencing, and jobs no host can take."""
    if now < core.hosts_checked_at + CHECK_EVERY_S:
        return
    core.hosts_checked_at = now
    live = {w.host_id for w in core.workers.values() if w.role == "lifecycle"}
    for host in list(core.hosts.values()):
        silent = now - host.renewed_at > core.config.host_dead_s and host.host_id not in live
        if host.embedded:
            if silent:
                embedded_gone(core, host)
            continue
        if host.state in ("up", "left") and silent and host.lost_at <= host.renewed_at:
            if host.state == "up":
                set_host_state(core, host, "unreachable",
                               f"no renewal of its host lease for {core.config.host_dead_s:g} s")
                # What its workers last said, not what the broker would tell them: a worker
                # cut off before it heard `armed` neither self-fences nor pets a watchdog.
                # Only the workers that beat until the end count (not one that died before).
                recent = host.renewed_at - core.config.lease_ttl_s
                host.armed_when_lost = any(a for a, at in host.armed_workers.values() if at >= recent)
                host.armed_workers.clear()
            host.lost_at = now
            for record in domains_on(core, host.host_id):
                if record.uuid not in core.scheduler.active:
                    core.set_state(record, "unknown", host.host_id, reason=f"host {host.host_id} {host.state}")
        elif host.state == "fencing":
            poll_fence_command(core, host, now)
    lost = [h for h in core.hosts.values() if not h.embedded and h.state in ("unreachable", "fencing")]
    if lost:
        consider_fencing(core, lost, live, now)
    fail_stuck_jobs(core, now)


def embedded_gone(core: BrokerCore, host: Host) -> None:
    """A test:/// host whose workers are gone: its hypervisor went with them."""
    for record in domains_on(core, host.host_id):
        if record.uuid in core.scheduler.active:
            continue
        for job in core.scheduler.pending_for(record.uuid):
            if job.op == "reconcile":
                core.finish_job(job, "succeeded")
        core.set_state(record, "shutoff", None, reason=f"embedded host {host.host_id} is gone with its workers")
    log.info("embedded host %s is gone with its workers", host.host_id)
    del core.hosts[host.host_id]
    core.save_hosts()


def domains_on(core: BrokerCore, host_id: str) -> list[DomainRecord]:
    return [r for r in core.registry.by_uuid.values() if r.host_id == host_id and r.state != "shutoff"]


def consider_fencing(core: BrokerCore, lost: list[Host], live: set[str], now: float) -> None:
    """Fence what may be fenced now, by watchdog or fence_command; the rest waits.

    Hosts cut off together fall silent within one heartbeat of each other, but each turns
    unreachable on its own at host_dead_s. So the partition rule counts as lost every host
    already silent for longer than a lease TTL (its workers are gone from the table), not
    only those past host_dead_s: the first of them to cross is not fenced alone.
    """
    config = core.config
    if now < core.fence_allowed_at:
        return  # the quiet period after a start or takeover
    counted = [h for h in core.hosts.values() if not h.embedded and h.state not in ("fenced", "left")]
    silent_s = min(config.lease_ttl_s, config.host_dead_s / 2)
    silent = [h for h in counted if h in lost or (h.host_id not in live and now - h.renewed_at > silent_s)]
    if len(silent) > config.partition_fraction * len(counted):
        core.partition_seen_at = now
        if not core.partition_logged:
            core.partition_logged = True
            log.error("%d of %d hosts lost at once (more than partition_fraction %g): this broker is probably the "
                      "one cut off; fencing nobody", len(silent), len(counted), config.partition_fraction)
        for host in lost:
            if stop_fence_command(host):  # started before the others fell silent too
                set_host_state(core, host, "unreachable", "fence command stopped: most hosts are lost at once")
        return
    if now < core.partition_seen_at + config.host_dead_s:
        # A partition ends as it began, host by host: the first back must not leave the
        # others looking like a minority to fence. They get host_dead_s to return too.
        return
    core.partition_logged = False
    for host in lost:
        if host.state != "unreachable":
            continue
        reset_by = host.renewed_at + config.host_dead_s + config.fence_margin_s
        if host.watchdog and host.armed_when_lost and now > reset_by:
            fence(core, host, "its watchdog has reset it (no renewal for host_dead_s + fence_margin_s)")
        elif config.fence_command and now >= host.fence_next_try:
            start_fence_command(core, host, now)


def start_fence_command(core: BrokerCore, host: Host, now: float) -> None:
    command = [core.config.fence_command, host.host_id]
    try:
        host.fence_proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                           stderr=subprocess.PIPE, start_new_session=True)
    except OSError as e:
        log.error("cannot run fence_command %s for host %s: %s", command[0], host.host_id, e)
        host.fence_next_try = now + core.config.fence_retry_s
        return
    host.fence_started = now
    set_host_state(core, host, "fencing", f"running {os.path.basename(command[0])} {host.host_id}")


def poll_fence_command(core: BrokerCore, host: Host, now: float) -> None:
    proc = host.fence_proc
    if proc is None:
        set_host_state(core, host, "unreachable", "fence command gone")
        return
    code = proc.poll()
    if code is None:
        if now - host.fence_started < FENCE_COMMAND_TIMEOUT_S:
            return
        proc.kill()
        code = proc.wait()
        why = f"still running after {FENCE_COMMAND_TIMEOUT_S:g} s"
    else:
        why = f"exit status {code}"
    stderr = proc.stderr.read().decode(errors="replace").strip() if proc.stderr else ""
    if proc.stderr:
        proc.stderr.close()
    host.fence_proc = None
    if code == 0 and why.startswith("exit"):
        fence(core, host, "fence_command powered it off")
        return
    log.error("fence_command for host %s failed (%s)%s; trying again in %g s", host.host_id, why,
              f": {stderr.splitlines()[-1]}" if stderr else "", core.config.fence_retry_s)
    core.metrics.fence_failures.inc()
    host.fence_next_try = now + core.config.fence_retry_s
    set_host_state(core, host, "unreachable", f"fence command failed ({why})")


# ---------------------------------------------------------------------- fencing
def fence(core: BrokerCore, host: Host, how: str) -> list[int]:
    """The host is off: raise its domains' epochs, shut them off, restart the HA ones elsewhere.

    Returns the ids of the start jobs queued for HA domains.
    """
    set_host_state(core, host, "fenced", how)
    core.metrics.fenced_hosts.inc()
    started = []
    for record in domains_on(core, host.host_id):
        job_id = core.scheduler.active.get(record.uuid)
        if job_id is not None:
            # Its lease can only be renewed from the fenced host: it ran there, if at all.
            job = core.scheduler.jobs[job_id]
            worker = core.workers.get(job.worker_id or "")
            if worker is not None:
                worker.drop(job_id)
            core.finish_job(job, "lost", f"host {host.host_id} was fenced while the job ran there", "lease")
        for job in core.scheduler.pending_for(record.uuid):
            if job.op == "reconcile":
                core.finish_job(job, "succeeded")  # nothing left to ask
        record.epoch += 1  # whatever the fenced host still says of it is stale
        host.fenced_domains.add(record.uuid)
        core.set_state(record, "shutoff", None, reason=f"fenced: host {host.host_id} ({how})")
        if record.ha:
            job = core.new_job(record, "start", deadline_s=core.config.deadline_s["start"])
            started.append(job.job_id)
            log.warning("HA domain %s of fenced host %s: start job %d queued on another host",
                        record.name, host.host_id, job.job_id)
    host.placed.clear()
    core.save_hosts()
    return started


def operator_fence(core: BrokerCore, host: Host) -> list[int]:
    """`vbctl host-fence HOST --yes-it-is-off`: the operator's word, taken in any quiet period
    or partition; refused for a host whose workers still renew its lease."""
    if host.embedded:
        raise OperationInvalidError(f"host {host.host_id} is an embedded test:/// host: it is never fenced")
    if host.state == "fenced":
        return []
    if host.state in ("up", "rejoining"):
        age = core.clock.monotonic() - host.renewed_at
        raise OperationInvalidError(
            f"Requested operation is not valid: host {host.host_id} is {host.state} (its lease was renewed "
            f"{age:.1f} s ago); only an unreachable host can be fenced"
        )
    stop_fence_command(host)
    return fence(core, host, "the operator says it is off")


def evacuate(core: BrokerCore, host: Host) -> list[int]:
    """`vbctl host-evacuate HOST`: start every shut-off domain the fenced host had, elsewhere."""
    if host.state != "fenced":
        raise OperationInvalidError(
            f"Requested operation is not valid: host {host.host_id} is {host.state}, not fenced; "
            f"fence it first (vbctl host-fence {host.host_id} --yes-it-is-off)"
        )
    jobs = []
    for uuid in sorted(host.fenced_domains):
        record = core.registry.by_uuid.get(uuid)
        if record is None or record.state != "shutoff":
            continue
        if uuid in core.scheduler.active or any(j.op == "start" for j in core.scheduler.pending_for(uuid)):
            continue  # an HA domain whose restart is already queued or running
        jobs.append(core.new_job(record, "start", deadline_s=core.config.deadline_s["start"]).job_id)
    log.warning("evacuating host %s: %d start job(s)", host.host_id, len(jobs))
    return jobs


# ---------------------------------------------------------------------- a host that returns
def worker_left(core: BrokerCore, worker: WorkerInfo) -> None:
    """A lifecycle worker said `bye`. If it was its host's last, the host is `left`."""
    host = core.hosts.get(worker.host_id)
    if worker.role != "lifecycle" or host is None or host.embedded or host.state != "up":
        return
    if any(w.role == "lifecycle" and w.host_id == host.host_id for w in core.workers.values()):
        return
    set_host_state(core, host, "left", "its last lifecycle worker stopped: its guests run on, unwatched; "
                                       "not fenced but by the operator")


def strays_of(core: BrokerCore, host_id: str, guests: Iterable[dict]) -> list[str]:
    """Reported guests that must not run on host_id: domains fenced while it was away, and
    domains the registry has running on another host that is up (a guest never runs twice)."""
    host = core.host(host_id)
    out = []
    for guest in guests:
        try:
            uuid = domxml.normalize_uuid(str(guest.get("uuid")))
        except InvalidError:
            continue
        record = core.registry.by_uuid.get(uuid)
        if record is None or guest.get("state") not in ("running", "paused"):
            continue
        if uuid in host.fenced_domains:
            out.append(uuid)
        elif record.host_id not in (None, host_id) and record.state in ("running", "paused"):
            other = core.hosts.get(record.host_id)
            if other is not None and other.state == "up":
                out.append(uuid)
    return out


def send_strays(core: BrokerCore, worker: WorkerInfo, host: Host, strays: list[str]) -> None:
    host.strays = set(strays)
    set_host_state(core, host, "rejoining", f"destroying {len(strays)} stray guest(s) before it takes a job")
    core.to_worker(worker.worker_id, p.Strays(uuids=strays), durable=False)


def returned(core: BrokerCore, worker: WorkerInfo, guests: list[dict]) -> set[str]:
    """A lifecycle worker said hello: if its host was fenced, or runs a guest that runs elsewhere,
    it destroys those first. Returns the uuids its guest list must not be trusted for."""
    host = core.host(worker.host_id)
    strays = strays_of(core, worker.host_id, guests)
    if strays:
        for uuid in strays:
            record = core.registry.by_uuid[uuid]
            core.events.domain(record, "stray", reason=f"running on {worker.host_id}, which was fenced or is not its "
                                                       f"host; destroyed there before the host takes a job")
        send_strays(core, worker, host, strays)
        return set(strays)
    if host.state == "fenced":
        host.fenced_domains.clear()
        set_host_state(core, host, "up", "returned with no stray guest")
    return set()


def strays_done(core: BrokerCore, worker: WorkerInfo, msg: p.StraysDone) -> None:
    host = core.host(worker.host_id)
    for uuid in msg.destroyed:
        host.strays.discard(uuid)
        host.fenced_domains.discard(uuid)
    if msg.failed:
        log.error("host %s could not destroy stray guest(s): %s; it takes no job", worker.host_id,
                  "; ".join(f"{f.get('uuid')}: {f.get('error')}" for f in msg.failed))
        return
    host.strays.clear()
    host.fenced_domains.clear()
    set_host_state(core, host, "up", f"destroyed {len(msg.destroyed)} stray guest(s)")


# ---------------------------------------------------------------------- jobs no host can take
def fail_stuck_jobs(core: BrokerCore, now: float) -> None:
    """A queued job that no worker can take (its domain's host is gone, or no host fits a start)
    fails after queue_timeout_s instead of waiting for ever. One waiting for a busy slot waits.

    The queue heads are looked at STUCK_BATCH a second, in rounds over every queue: one pass
    over a large backlog at once would hold every read for a good part of each second
    (docs/ARCHITECTURE.md has the measurement). A stuck job may so fail up to
    (queued domains / STUCK_BATCH) seconds after queue_timeout_s."""
    if now < core.stuck_checked_at + 1.0:
        return
    core.stuck_checked_at = now
    if not core.stuck_round:
        core.stuck_round = list(core.scheduler.queues)
    batch = core.stuck_round[-STUCK_BATCH:]
    del core.stuck_round[-STUCK_BATCH:]
    limit = core.config.queue_timeout_s
    oldest = core.clock.wall() - limit
    scheduler = core.scheduler
    lifecycle = lifecycle_hosts(core)
    can_start = any(core.host(h).state == "up" and not core.host(h).draining for h in lifecycle)
    for uuid in batch:
        job = scheduler.head(uuid)
        if job is None or job.submitted_at > oldest or uuid in scheduler.active:
            continue
        record = core.registry.by_uuid.get(uuid)
        if record is None:
            continue
        why = why_no_host(core, job.op, record, lifecycle, can_start)
        if why is not None:
            core.finish_job(job, "failed", f"{job.op} of '{record.name}' waited {limit:g} s (queue_timeout_s): {why}",
                            "timeout")


def lifecycle_hosts(core: BrokerCore) -> set[str]:
    """The hosts with a lifecycle worker that takes jobs."""
    return {w.host_id for w in core.workers.values() if w.role == "lifecycle" and w.slots > 0}


def why_no_host(core: BrokerCore, op: str, record: DomainRecord, lifecycle: set[str], can_start: bool) -> str | None:
    """Why no worker can take this job now, or None if one could (or may, once a slot frees).
    lifecycle: lifecycle_hosts(core); can_start: one of them is up and not draining (both
    read once per check)."""
    if op == "start" and record.state == "shutoff":
        return None if can_start else "no host is up to start it on"
    if op in ("undefine",):
        return None
    host_id = record.host_id
    if host_id is None:
        return None
    host = core.hosts.get(host_id)
    state = host.state if host is not None else "gone"
    if host_id in lifecycle and state == "up":
        return None
    return f"its host {host_id} is {state}"


# ---------------------------------------------------------------------- client requests
def describe(core: BrokerCore, host: Host, now: float) -> dict:
    workers = [w for w in core.workers.values() if w.host_id == host.host_id]
    return {
        "host": host.host_id,
        "state": host.state,
        "draining": host.draining,
        "embedded": host.embedded,
        "workers": sorted(w.worker_id for w in workers),
        "guests": len(host.placed),
        "memory_mib": host.memory_mib,
        "free_mib": host.free_mib if host.memory_mib else None,
        "cpus": host.cpus,
        "renewed_s_ago": round(now - host.renewed_at, 3),
        "watchdog": host.watchdog,
        "armed": armed(core, host),
        "shared_storage_roots": list(host.shared_storage_roots),
        "fenced_domains": len(host.fenced_domains),
    }


def find(core: BrokerCore, host_id: str) -> Host:
    host = core.hosts.get(host_id)
    if host is None:
        raise NotFoundError(f"no host '{host_id}' (vbctl hosts lists them)")
    return host


def storage_fits(host: Host, xml: str) -> bool:
    """Does every disk of the definition lie under one of the host's shared storage roots?"""
    return all(any(_under(path, root) for root in host.shared_storage_roots) for path in domxml.disk_sources(xml))


def _under(path: str, root: str) -> bool:
    path = os.path.normpath(path)
    return path == root or path.startswith(root.rstrip("/") + "/")
