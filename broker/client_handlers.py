"""Client requests: one handler per message kind, in one table, and the waits they leave open.

Reads are answered from memory at the end of the loop turn; a request that changed
something is answered only once that change is on disk (the outbox's durable lane).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

from virtbroker import __version__
from virtbroker.broker import hosts
from virtbroker.broker.core import BrokerCore, Waiter
from virtbroker.broker.events import Events
from virtbroker.common import domxml
from virtbroker.common import protocol as p
from virtbroker.common.config import MAX_DEADLINE_S
from virtbroker.common.errors import (
    ConflictError,
    GoneError,
    InvalidError,
    LimitError,
    PermissionError_,
    ProtocolError,
    VirtbrokerError,
)

log = logging.getLogger("virtbroker.broker")

MAX_WAIT_S = 3600.0
MAX_SHUTDOWN_TIMEOUT_S = 3600.0
# What the read-only endpoint answers; everything else there is refused.
READONLY_KINDS = frozenset({"ping", "lookup", "list", "dumpxml", "job", "jobs", "wait", "workers", "events", "hosts"})
# Requests whose replies change nothing, so they need not wait for the disk. A read may show a
# change whose own acknowledgement is still waiting for its commit: if the broker dies first,
# that change is gone, and it was never acknowledged.
READ_KINDS = frozenset({"ping", "lookup", "list", "dumpxml", "job", "jobs", "workers", "events", "hosts"})
MAX_EVENTS_PAGE = 10000
_DEFERRED = object()  # a handler's "no reply yet" (wait)


class ClientHandlers:
    def __init__(self, core: BrokerCore, events_url: str, broker=None):
        self.core = core
        self.events_url = events_url
        self.broker = broker  # the loop, for its part in failover (ping)
        # Every request kind the client endpoints take, and its handler.
        self.table: dict[str, Callable[[Any, bytes], Any]] = {
            "ping": self.handle_ping,
            "define": self.handle_define,
            "lookup": self.handle_lookup,
            "list": self.handle_list,
            "dumpxml": self.handle_dumpxml,
            "submit": self.handle_submit,
            "job": self.handle_job,
            "jobs": self.handle_jobs,
            "wait": self.handle_wait,
            "cancel": self.handle_cancel,
            "workers": self.handle_workers,
            "events": self.handle_events,
            "ha": self.handle_ha,
            "hosts": self.handle_hosts,
            "host": self.handle_host,
        }

    def on_message(self, frames: list[bytes], dest, readonly: bool = False) -> int:
        """Handle one client message ([identity, version, kind, body]): a request, or each
        request of its batch; returns how many requests it carried."""
        core = self.core
        identity, body = frames[0], frames[1:]
        try:
            msg = p.decode(body, p.CLIENT_VERSION)
            messages = p.unbatch(msg)
        except ProtocolError as e:
            core.metrics.request("undecodable", e.code)
            log.warning("bad client message: %s", e)
            core.reply(dest, identity, p.Error(request_id=None, code=e.code, message=e.message))
            return 1
        if type(msg) is not p.ClientBatch:
            reply, durable = self.answer(msg, identity, dest, readonly)
            if reply is not None:
                core.reply(dest, identity, reply, durable)
            return 1
        # One batch of replies, in the requests' order. It waits for the disk if any of its
        # requests changed something.
        replies = []
        any_durable = False
        for item in messages:
            if item.KIND == "wait":
                core.metrics.request(item.KIND, "invalid")
                reply = p.Error(
                    request_id=item.request_id, code="invalid", message="wait cannot travel in a batch: send it alone"
                )
            else:
                reply, durable = self.answer(item, identity, dest, readonly)
                any_durable = any_durable or durable
            replies.append(p.encode(reply))
        for frames_out in p.batch_frames(replies):
            core.outbox.put(dest, [identity, *frames_out], any_durable)
        return len(messages)

    def answer(self, msg: p.Message, identity: bytes, dest, readonly: bool) -> tuple[p.Message | None, bool]:
        """One decoded request: (its reply, or None while a wait is pending; whether the reply
        must wait for this turn's changes to be on disk)."""
        request_id = getattr(msg, "request_id", None)
        metrics = self.core.metrics
        try:
            if readonly and msg.KIND not in READONLY_KINDS:
                raise PermissionError_(f"'{msg.KIND}' is not allowed on the read-only endpoint")
            handler = self.table.get(msg.KIND)
            if handler is None:
                raise ProtocolError(f"'{msg.KIND}' is not a request")
            result = handler(msg, identity)
            metrics.request(msg.KIND, "ok")
            if result is _DEFERRED:
                self.core.waiters[-1].dest = dest
                return None, False
            return p.Ok(request_id=request_id, result=result), msg.KIND not in READ_KINDS
        except VirtbrokerError as e:
            metrics.request(msg.KIND, e.code)
            if isinstance(e, ProtocolError):
                log.warning("bad client message: %s", e)
            return p.Error(request_id=request_id, code=e.code, message=e.message), False
        except Exception as e:  # a bug: report it and keep serving everyone else
            log.exception("internal error handling a client request")
            return p.Error(request_id=request_id, code="internal", message=f"internal error: {e}"), False

    # ------------------------------------------------------------------ handlers
    def handle_ping(self, msg: p.Ping, identity: bytes):
        if self.broker is not None:
            return self.broker.status()
        return {
            "version": __version__,
            "domains": len(self.core.registry),
            "workers": len(self.core.workers),
            "events_url": self.events_url,
            "event_seq": self.core.events.seq,
        }

    def handle_define(self, msg: p.Define, identity: bytes):
        core = self.core
        definition = domxml.load_definition(msg.xml)
        if msg.ha is not None:
            definition = domxml.load_definition(domxml.with_ha(definition.xml, msg.ha))
        is_new = definition.uuid not in core.registry.by_uuid and definition.name not in core.registry.by_name
        if is_new and len(core.registry) >= core.config.max_domains:
            raise LimitError(f"cannot define '{definition.name}': the broker holds max_domains = "
                             f"{core.config.max_domains} domains")
        record, created = core.registry.define(definition)
        core.store.put_domain(record)
        core.events.domain(record, "defined")
        out = record.summary()
        out["created"] = created
        return out

    def handle_lookup(self, msg: p.Lookup, identity: bytes):
        core = self.core
        record = core.registry.resolve(msg.domain)
        out = record.summary()
        out["pending_jobs"] = [j.job_id for j in core.scheduler.pending_for(record.uuid)]
        out["active_job"] = core.scheduler.active.get(record.uuid)
        out["persistent"] = True
        return out

    def handle_list(self, msg: p.ListDomains, identity: bytes):
        return [r.summary() for r in self.core.registry.list(msg.all, msg.state)]

    def handle_dumpxml(self, msg: p.DumpXml, identity: bytes):
        record = self.core.registry.resolve(msg.domain)
        if not msg.inactive and record.state != "shutoff" and record.live_xml:
            return record.live_xml
        return record.xml

    def handle_submit(self, msg: p.Submit, identity: bytes):
        core = self.core
        scheduler, config = core.scheduler, core.config
        if msg.op not in p.JOB_OPS:
            raise InvalidError(f"unknown operation '{msg.op}' ({', '.join(p.JOB_OPS)})")
        if msg.timeout_s is not None and not (0 < msg.timeout_s <= MAX_SHUTDOWN_TIMEOUT_S):  # NaN fails too
            raise InvalidError(f"timeout_s must be between 0 and {MAX_SHUTDOWN_TIMEOUT_S:g} seconds")
        if msg.idempotency_key is not None and not (0 < len(msg.idempotency_key) <= 200):
            raise InvalidError("idempotency_key must be 1 to 200 characters")
        if msg.deadline_s is not None and not (0 < msg.deadline_s <= MAX_DEADLINE_S):  # NaN fails too
            raise InvalidError(f"deadline_s must be between 0 and {MAX_DEADLINE_S:g} seconds")
        record = core.registry.resolve(msg.domain)
        if msg.idempotency_key is not None:
            existing_id = scheduler.by_key.get(msg.idempotency_key)
            if existing_id is not None:
                existing = scheduler.jobs[existing_id]
                if existing.uuid != record.uuid or existing.op != msg.op:
                    raise ConflictError(
                        f"idempotency key already used by job {existing_id} ({existing.op} {existing.domain_name})"
                    )
                out = existing.summary()
                out["existing"] = True
                return out
        if scheduler.queued_count >= config.max_queued_jobs:
            raise LimitError(f"{scheduler.queued_count} jobs are queued (max_queued_jobs); try again later")
        if scheduler.queued_for(record.uuid) >= config.max_queued_jobs_per_domain:
            raise LimitError(
                f"domain '{record.name}' has {scheduler.queued_for(record.uuid)} queued jobs "
                "(max_queued_jobs_per_domain); try again later"
            )
        timeout_s = msg.timeout_s if msg.op == "shutdown" else None
        if msg.op == "shutdown" and timeout_s is None:
            timeout_s = config.shutdown_timeout_s
        deadline_s = msg.deadline_s
        if deadline_s is None and msg.op != "undefine":  # undefine runs in the broker itself
            deadline_s = config.deadline_s[msg.op] + (timeout_s or 0.0)
        job = core.new_job(record, msg.op, timeout_s=timeout_s, idempotency_key=msg.idempotency_key,
                           deadline_s=deadline_s)
        return job.summary()

    def handle_job(self, msg: p.GetJob, identity: bytes):
        return self.core.scheduler.get(msg.job_id).summary()

    def handle_jobs(self, msg: p.ListJobs, identity: bytes):
        core = self.core
        if msg.state is not None and msg.state not in p.JOB_STATES:
            raise InvalidError(f"unknown job state '{msg.state}' ({', '.join(p.JOB_STATES)})")
        uuid = core.registry.resolve(msg.domain).uuid if msg.domain else None
        limit = max(1, min(msg.limit, 10000))
        out = []
        jobs = core.scheduler.jobs
        # Newest first, from the indexes (both hold ids in order): no sort of every job.
        newest_first = reversed(core.scheduler.by_domain.get(uuid, {})) if uuid is not None else reversed(jobs)
        for job_id in newest_first:
            job = jobs[job_id]
            if msg.state is None or job.state == msg.state:
                out.append(job.summary())
                if len(out) >= limit:
                    break
        out.reverse()
        return out

    def handle_wait(self, msg: p.Wait, identity: bytes):
        core = self.core
        if not msg.job_ids or len(msg.job_ids) > 10000:
            raise InvalidError("wait needs 1 to 10000 job ids")
        for job_id in msg.job_ids:
            core.scheduler.get(job_id)  # unknown ids fail now, not at the deadline
        if not math.isfinite(msg.timeout_s):
            raise InvalidError("timeout_s must be a finite number of seconds")
        timeout_s = min(max(msg.timeout_s, 0.0), MAX_WAIT_S)
        core.waiters.append(Waiter(identity, msg.request_id, list(msg.job_ids), core.clock.monotonic() + timeout_s))
        for job_id in msg.job_ids:
            core.waited_for[job_id] = core.waited_for.get(job_id, 0) + 1
        return _DEFERRED

    def handle_cancel(self, msg: p.Cancel, identity: bytes):
        return self.core.cancel_job(msg.job_id).summary()

    def handle_workers(self, msg: p.ListWorkers, identity: bytes):
        return [w.summary() for w in self.core.workers.values()]

    def handle_ha(self, msg: p.SetHa, identity: bytes):
        """Mark a domain HA or not: a redefine of its metadata (the running guest is untouched)."""
        core = self.core
        record = core.registry.resolve(msg.domain)
        xml = domxml.with_ha(record.xml, msg.ha)
        if xml != record.xml:
            record, _ = core.registry.define(domxml.load_definition(xml))
            core.store.put_domain(record)
            core.events.domain(record, "defined", reason=f"ha {'on' if msg.ha else 'off'}")
        return {**record.summary(), "ha": msg.ha}

    def handle_hosts(self, msg: p.ListHosts, identity: bytes):
        core = self.core
        now = core.clock.monotonic()
        return [hosts.describe(core, h, now) for h in sorted(core.hosts.values(), key=lambda h: h.host_id)]

    def handle_host(self, msg: p.HostAction, identity: bytes):
        core = self.core
        if msg.action not in p.HOST_ACTIONS:
            raise InvalidError(f"unknown host action '{msg.action}' ({', '.join(p.HOST_ACTIONS)})")
        host = hosts.find(core, msg.host)
        jobs: list[int] = []
        if msg.action == "fence":
            if not msg.confirm_off:
                raise InvalidError(f"fencing {host.host_id} needs the operator's word that it is off "
                                   "(vbctl host-fence HOST --yes-it-is-off)")
            jobs = hosts.operator_fence(core, host)
        elif msg.action == "evacuate":
            jobs = hosts.evacuate(core, host)
        else:
            host.draining = msg.action == "drain"
            core.save_hosts()
            log.warning("host %s %s", host.host_id, "drained: it takes no new start" if host.draining else "undrained")
        return {**hosts.describe(core, host, core.clock.monotonic()), "jobs": jobs}

    def handle_events(self, msg: p.EventsSince, identity: bytes):
        """Kept events after `since` (committed ones; later ones come live on the events endpoint)."""
        core = self.core
        if msg.since < 0 or not 0 < msg.limit <= MAX_EVENTS_PAGE:
            raise InvalidError(f"since must be >= 0 and limit 1 to {MAX_EVENTS_PAGE}")
        if msg.since + 1 < core.oldest_event and msg.since < core.events.seq:
            raise GoneError(
                f"events after {msg.since} are no longer all kept (the oldest is {core.oldest_event}, "
                f"event_history = {core.config.event_history}): re-read the state with list and jobs, "
                f"then follow events from seq {core.events.seq}"
            )
        rows = core.store.events_since(msg.since, msg.limit)
        return {"events": [Events.replayed(body) for _seq, body in rows], "seq": core.saved_seq}
