"""Worker messages: who a worker is, its hello, heartbeats, results, and label routing.

A worker is only who its key (with CURVE) or its connection (without) says: its id is bound
to the peer that registered it, and with CURVE its role and host come from its key. Every
message is checked against that before its handler runs (docs/PROTOCOL.md, Worker identity).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from virtbroker.broker import hosts
from virtbroker.broker.core import RESYNC_QUIET_S, BrokerCore
from virtbroker.broker.scheduler import WorkerInfo
from virtbroker.common import domxml
from virtbroker.common import protocol as p
from virtbroker.common.errors import InvalidError, ProtocolError

log = logging.getLogger("virtbroker.broker")


class WorkerHandlers:
    def __init__(self, core: BrokerCore):
        self.core = core
        # Every message kind the worker endpoint takes, and its handler. A hello registers its
        # sender; the others are handled only for the peer that registered the worker they name.
        self.table: dict[str, Callable[[Any, WorkerInfo], None]] = {
            "heartbeat": self.handle_heartbeat,
            "result": self.handle_result,
            "bye": self.handle_bye,
            "label": self.handle_label,
            "label-reply": self.handle_label_reply,
            "guest-event": self.handle_guest_event,
            "strays-done": self.handle_strays_done,
        }

    def on_message(self, frames: list[bytes], peer: bytes | None = None) -> int:
        """Handle one message from a worker ([identity, version, kind, body]), or each message
        of its batch in order; returns how many. `peer` is who sent it: its CURVE key, or
        without CURVE its connection (the identity)."""
        identity, body = frames[0], frames[1:]
        if peer is None:
            peer = identity
        try:
            messages = p.unbatch(p.decode(body, p.WORKER_VERSION))
        except ProtocolError as e:
            log.warning("bad worker message dropped: %s", e)
            return 1
        for msg in messages:
            try:
                if msg.KIND == "hello":
                    self.handle_hello(msg, identity, peer)
                    continue
                handler = self.table.get(msg.KIND)
                if handler is None:
                    raise ProtocolError(f"'{msg.KIND}' is not a worker request")
                worker = self._sender(msg, identity, peer)
                if worker is not None:
                    handler(msg, worker)
            except ProtocolError as e:
                log.warning("bad worker message dropped: %s", e)
            except Exception:
                log.exception("internal error handling a worker message")
        return len(messages)

    def _sender(self, msg: Any, identity: bytes, peer: bytes) -> WorkerInfo | None:
        """The registered worker a message names, if it came from the peer that registered it.

        A message naming a worker this broker does not know (it restarted) gets a reregister
        on the connection it came from; one naming a worker another peer registered is refused.
        """
        core = self.core
        worker = core.workers.get(msg.worker_id)
        if worker is None:
            if msg.KIND in ("heartbeat", "result", "label"):
                core.to_connection(identity, p.Reregister())
            return None
        if core.worker_peers.get(msg.worker_id) != peer:
            self._refuse(msg, "impersonation", f"it names worker {msg.worker_id}, which another peer registered")
            return None
        if core.identities.get(msg.worker_id) != identity:
            # The same key on a new connection (a worker that reconnected over tcp://).
            core.identities[msg.worker_id] = identity
        worker.last_seen = core.clock.monotonic()
        return worker

    def _refuse(self, msg: p.Message, reason: str, detail: str) -> None:
        """Refuse a worker message: logged, counted, and nothing changes."""
        log.warning("refused %s from a worker peer: %s", msg.KIND, detail)
        self.core.metrics.refused_worker_messages.labels(msg.KIND, reason).inc()

    # ------------------------------------------------------------------ hello
    def handle_hello(self, msg: p.Hello, identity: bytes, peer: bytes) -> None:
        """Register a worker. With CURVE its role and host come from its key, not from the hello."""
        core = self.core
        if msg.role not in ("lifecycle", "security") or msg.slots < 1 or msg.priority_slots < 0:
            self._refuse(msg, "invalid", f"worker {msg.worker_id}: role {msg.role!r}, slots {msg.slots!r}")
            return
        host_id = msg.host_id
        if core.worker_keys is not None:
            key = core.worker_keys.get(peer)
            if key is None:
                self._refuse(msg, "unknown-key", f"worker {msg.worker_id}: its key is not a worker key")
                return
            if key.role != msg.role:
                self._refuse(
                    msg, "wrong-role", f"worker {msg.worker_id} says {msg.role}, its key {key.name} is for {key.role}"
                )
                return
            if msg.host_id != key.host:
                log.warning("worker %s says host %s; its key %s says %s, which is what counts",
                            msg.worker_id, msg.host_id, key.name, key.host)
            host_id = key.host
        owner = core.worker_peers.get(msg.worker_id)
        if owner is not None and owner != peer:
            # The id is bound to the peer that registered it first, for the broker's life.
            self._refuse(msg, "impersonation", f"worker id {msg.worker_id} belongs to another peer")
            return
        now = core.clock.monotonic()
        previous = core.workers.get(msg.worker_id)
        if previous is not None:
            # Restarted under the same id before we noticed: what the old process was asked
            # will never be answered.
            core.fail_label_routes(previous)
        worker = WorkerInfo(
            worker_id=msg.worker_id,
            role=msg.role,
            host_id=host_id,
            uri=msg.uri,
            slots=msg.slots,
            drivers=list(msg.drivers),
            last_seen=now,
            priority_slots=msg.priority_slots if msg.role == "lifecycle" else 0,
        )
        core.workers[msg.worker_id] = worker
        core.worker_peers[msg.worker_id] = peer
        core.identities[msg.worker_id] = identity
        if msg.role == "lifecycle":
            host = core.host(host_id)
            if msg.memory_mib > 0:
                host.memory_mib, host.cpus = msg.memory_mib, msg.cpus
            host.embedded = msg.uri.startswith("test:///")
            host.shared_storage_roots = tuple(str(r) for r in msg.shared_storage_roots)
            host.watchdog = bool(msg.watchdog)
            if msg.watchdog:
                host.watchdog_workers.add(msg.worker_id)
            else:
                host.watchdog_workers.discard(msg.worker_id)
            core.save_hosts()
        for held in msg.leases:
            lease = core.scheduler.leases.get(str(held.get("lease_id")))
            if lease is None or lease.job_id != held.get("job_id"):
                continue
            if lease.worker_id != msg.worker_id:
                self._refuse(msg, "not-lease-holder",
                             f"worker {msg.worker_id} names lease of job {lease.job_id}, held by {lease.worker_id}")
                continue
            # A broker restart: the worker still runs this job, bind it back.
            lease.renew(now, core.config.lease_ttl_s)
            worker.take(lease.job_id, core.scheduler.jobs[lease.job_id].op)
        log.info(
            "%s worker %s joined: host %s, %s, %d slots%s",
            msg.role, msg.worker_id, host_id, msg.uri, msg.slots,
            f", drivers {','.join(msg.drivers)}" if msg.drivers else "",
        )
        core.to_worker(
            msg.worker_id,
            p.Welcome(heartbeat_interval_s=core.config.heartbeat_interval_s, lease_ttl_s=core.config.lease_ttl_s),
            durable=False,
        )
        if msg.role == "lifecycle":
            strays = hosts.returned(core, worker, msg.guests)
            self.reconcile_host(host_id, [g for g in msg.guests if _uuid_of(g) not in strays])
            self.self_fenced(worker, msg.self_fenced)
            hosts.renewed(core, worker, now, 0)

    def self_fenced(self, worker: WorkerInfo, uuids: list[str]) -> None:
        """The worker destroyed these guests while it could not renew its host lease. Those
        still recorded on its host are shut off; HA ones are started again (anywhere)."""
        core = self.core
        for text in uuids:
            record = core.registry.by_uuid.get(_uuid_of({"uuid": text}) or "")
            if record is None:
                continue
            log.warning("host %s self-fenced %s while it was cut off", worker.host_id, record.name)
            if record.host_id != worker.host_id or record.uuid in core.scheduler.active:
                continue
            core.set_state(record, "shutoff", None, reason=f"self-fenced: host {worker.host_id} lost its host lease")
            if record.ha and not core.scheduler.pending_for(record.uuid):
                core.new_job(record, "start", deadline_s=core.config.deadline_s["start"])

    def reconcile_host(self, host_id: str, guests: list[dict]) -> None:
        """Make the registry agree with what a worker sees running on its host.

        Domains with a job running or queued are left alone: their job will settle them.
        So are domains whose state changed in the last RESYNC_QUIET_S: the worker's list may
        have been taken just before another worker's job changed them. Guests the registry
        does not know are someone else's and are left alone too.
        """
        core = self.core
        quiet_since = core.clock.monotonic() - RESYNC_QUIET_S
        seen = {}
        for guest in guests:
            try:
                seen[domxml.normalize_uuid(str(guest.get("uuid")))] = str(guest.get("state"))
            except InvalidError:
                continue
        for record in core.registry.by_uuid.values():
            busy = record.uuid in core.scheduler.active or record.uuid in core.scheduler.queues
            # `unknown` is no recent news: the host was silent, and this is its word again.
            if busy or (record.changed_at > quiet_since and record.state != "unknown"):
                continue
            state = seen.get(record.uuid)
            if state in ("running", "paused"):
                if record.host_id not in (None, host_id) and record.state != "shutoff":
                    continue  # recorded on another host: strays_of decides which copy goes
                if record.state != state or record.host_id != host_id:
                    core.set_state(record, state, host_id, reason=f"reported by host {host_id}")
            elif record.host_id == host_id and record.state != "shutoff":
                core.set_state(record, "shutoff", None, reason=f"not running on host {host_id}")

    # ------------------------------------------------------------------ the rest
    def handle_heartbeat(self, msg: p.Heartbeat, worker: WorkerInfo) -> None:
        core = self.core
        unknown = core.scheduler.renew(worker.worker_id, msg.lease_ids, worker.last_seen)
        if worker.role == "lifecycle":
            host = core.host(worker.host_id)
            # Only a worker with a watchdog vouches that a silence of its host resets it.
            vouches = msg.armed and worker.worker_id in host.watchdog_workers
            host.armed_workers[worker.worker_id] = (vouches, worker.last_seen)
            hosts.renewed(core, worker, worker.last_seen, msg.seq)
            if msg.self_fenced:
                self.self_fenced(worker, msg.self_fenced)
            if msg.guests is not None:
                strays = hosts.strays_of(core, worker.host_id, msg.guests)
                if strays and host.state != "rejoining":
                    hosts.send_strays(core, worker, host, strays)
                skip = set(strays) | host.strays
                self.reconcile_host(worker.host_id, [g for g in msg.guests if _uuid_of(g) not in skip])
        if unknown:
            log.debug("worker %s renews leases it does not hold: %s", worker.worker_id, unknown)

    def handle_guest_event(self, msg: p.GuestEvent, worker: WorkerInfo) -> None:
        """A libvirt lifecycle event from a worker's host: the registry follows it at once,
        unless a job of that domain is running (its result settles the state)."""
        core = self.core
        if worker.role != "lifecycle" or msg.state not in p.DOMAIN_STATES:
            self._refuse(msg, "invalid", f"guest-event from {worker.role} worker {worker.worker_id}: {msg.state!r}")
            return
        uuid = _uuid_of({"uuid": msg.uuid})
        record = core.registry.by_uuid.get(uuid or "")
        if record is None or record.uuid in core.scheduler.active:
            return
        host = core.host(worker.host_id)
        if record.uuid in host.strays:
            return
        if msg.at and record.settled_host == worker.host_id and msg.at <= record.settled_at:
            # Read before the last job's result on this host ended: the result is newer news
            # (events travel apart from results, and may come after them).
            return
        reason = f"libvirt: {msg.event}" + (f" ({msg.reason})" if msg.reason else "")
        if msg.state == "shutoff":
            if record.host_id == worker.host_id and record.state != "shutoff":
                if core.config.security:
                    # Its files keep their labels until a reconcile on its host restores them;
                    # the reconcile's result shuts it off (a domain with no host is not asked).
                    core.queue_reconcile(record, f"stopped outside virtbroker ({reason})")
                else:
                    core.set_state(record, "shutoff", None, reason=reason)
            return
        if record.host_id not in (None, worker.host_id) and record.state != "shutoff":
            strays = hosts.strays_of(core, worker.host_id, [{"uuid": record.uuid, "state": msg.state}])
            if strays:
                hosts.send_strays(core, worker, host, strays)
            return
        core.set_state(record, msg.state, worker.host_id, reason=reason)

    def handle_strays_done(self, msg: p.StraysDone, worker: WorkerInfo) -> None:
        if worker.role != "lifecycle":
            self._refuse(msg, "wrong-role", f"{worker.role} worker {worker.worker_id} sent strays-done")
            return
        hosts.strays_done(self.core, worker, msg)

    def handle_bye(self, msg: p.Bye, worker: WorkerInfo) -> None:
        core = self.core
        if worker.jobs:
            # Draining: no new work, but its results are still accepted and its leases renewed.
            worker.slots = 0
            worker.priority_slots = 0
            log.info("worker %s is stopping after %d job(s)", worker.worker_id, len(worker.jobs))
            return
        core.forget_worker(worker)
        log.info("worker %s left (host %s)", worker.worker_id, worker.host_id)
        core.worker_gone(worker)
        hosts.worker_left(core, worker)

    def handle_result(self, msg: p.Result, worker: WorkerInfo) -> None:
        core = self.core
        if worker.role != "lifecycle":
            self._refuse(msg, "wrong-role", f"{worker.role} worker {worker.worker_id} sent a job result")
            return
        job = core.scheduler.jobs.get(msg.job_id)
        lease = core.scheduler.leases.get(msg.lease_id)
        record = core.registry.by_uuid.get(job.uuid) if job is not None else None
        reason = None
        if job is None:
            reason = f"unknown job {msg.job_id}"
        elif lease is None or lease.job_id != msg.job_id:
            reason = f"lease {msg.lease_id} is not current for job {msg.job_id} (job is {job.state})"
        elif lease.worker_id != worker.worker_id:
            # Only the lease's holder may end its job; the holder keeps it.
            self._refuse(msg, "not-lease-holder",
                         f"worker {worker.worker_id} reports job {msg.job_id}, whose lease {lease.worker_id} holds")
            core.to_worker(worker.worker_id, p.ResultAck(job_id=msg.job_id, accepted=False,
                                                         reason=f"job {msg.job_id} is not leased to you"))
            return
        elif record is None or msg.epoch != lease.epoch or msg.epoch < record.epoch:
            reason = f"stale epoch {msg.epoch} for {job.domain_name} (current {record.epoch if record else '-'})"
        worker.drop(msg.job_id)
        if reason is not None:
            log.warning("refused result from worker %s for job %s: %s", worker.worker_id, msg.job_id, reason)
            core.metrics.refused_results.inc()
            core.to_worker(worker.worker_id, p.ResultAck(job_id=msg.job_id, accepted=False, reason=reason))
            if record is not None and job.op != "reconcile" and job.worker_id == worker.worker_id:
                # The late worker may have changed the guest after its lease ended: read the truth again.
                core.queue_reconcile(record, f"late result for job {msg.job_id}")
            return
        record.settled_host, record.settled_at = job.host_id, msg.done_at
        # RUNNING -> SUCCEEDED | FAILED (an accepted result)
        core.finish_job(job, "succeeded" if msg.ok else "failed", msg.error, msg.error_code if not msg.ok else None)
        if msg.domain_state in p.DOMAIN_STATES:
            host = job.host_id if msg.domain_state != "shutoff" else None
            core.set_state(record, msg.domain_state, host)
        elif not msg.ok:
            # The worker could not tell what became of the guest (libvirtd went away mid-call):
            # keep the host and ask it again.
            core.queue_reconcile(record, f"job {job.job_id} failed with the outcome unknown")
        core.to_worker(worker.worker_id, p.ResultAck(job_id=msg.job_id, accepted=True))

    def handle_label(self, msg: p.LabelRequest, worker: WorkerInfo) -> None:
        """Route a lifecycle worker's label request to a security worker of its host.

        The requester must hold the lease of a job on that domain; the host is the
        requester's registered one, and the definition sent is the broker's own, so a
        worker can neither label for another host nor choose what gets labelled.
        """
        core = self.core
        refusal = self._label_refusal(msg, worker)
        if refusal is not None:
            self._refuse(msg, refusal[0], refusal[1])
            self._label_failed(worker.worker_id, msg, refusal[1])
            return
        core.remember_label_id(msg.label_id)
        record = core.registry.by_uuid[domxml.normalize_uuid(msg.domain_uuid)]
        candidates = [
            w
            for w in core.workers.values()
            if w.role == "security" and w.host_id == worker.host_id and msg.driver in w.drivers and w.slots > 0
        ]
        if not candidates:
            self._label_failed(worker.worker_id, msg, f"no {msg.driver} security worker on host {worker.host_id}")
            return
        target = min(candidates, key=lambda w: len(w.jobs))
        core.label_routes[msg.label_id] = (worker.worker_id, target.worker_id)
        target.jobs.add(msg.label_id)
        routed = p.LabelRequest(
            worker_id=worker.worker_id, label_id=msg.label_id, host_id=worker.host_id, action=msg.action,
            domain_uuid=record.uuid, domain_name=record.name, xml=record.live_xml or record.xml, driver=msg.driver,
        )
        core.to_worker(target.worker_id, routed, durable=False)  # routing changes nothing on disk

    def _label_refusal(self, msg: p.LabelRequest, worker: WorkerInfo) -> tuple[str, str] | None:
        core = self.core
        if worker.role != "lifecycle":
            return "wrong-role", f"{worker.role} worker {worker.worker_id} asked for labels"
        if msg.label_id in core.label_ids or msg.label_id in core.label_routes:
            return "reused-label-id", f"label id {msg.label_id} was used before"
        if msg.action not in ("label", "restore"):
            return "invalid", f"unknown label action {msg.action!r}"
        try:
            uuid = domxml.normalize_uuid(msg.domain_uuid)
        except InvalidError:
            return "invalid", f"bad domain uuid {msg.domain_uuid!r}"
        job_id = core.scheduler.active.get(uuid)
        job = core.scheduler.jobs.get(job_id) if job_id is not None else None
        lease = core.scheduler.leases.get(job.lease_id) if job is not None and job.lease_id else None
        if lease is None or lease.worker_id != worker.worker_id or uuid not in core.registry.by_uuid:
            return "not-lease-holder", f"worker {worker.worker_id} holds no lease on domain {msg.domain_uuid}"
        return None

    def _label_failed(self, worker_id: str, msg: p.LabelRequest, error: str) -> None:
        self.core.to_worker(
            worker_id,
            p.LabelReply(worker_id="broker", label_id=msg.label_id, driver=msg.driver, ok=False, error=error),
            durable=False,
        )

    def handle_label_reply(self, msg: p.LabelReply, worker: WorkerInfo) -> None:
        core = self.core
        route = core.label_routes.get(msg.label_id)
        if route is None:
            log.warning("label reply %s from %s has no requester (it left)", msg.label_id, worker.worker_id)
            return
        requester, target = route
        if target != worker.worker_id:
            self._refuse(msg, "not-asked", f"worker {worker.worker_id} answers label {msg.label_id}, sent to {target}")
            return
        del core.label_routes[msg.label_id]
        worker.jobs.discard(msg.label_id)
        core.to_worker(requester, msg, durable=False)


def _uuid_of(guest: dict) -> str | None:
    try:
        return domxml.normalize_uuid(str(guest.get("uuid")))
    except InvalidError:
        return None
