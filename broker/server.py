"""The broker loop: owns the registry, the queues and the leases; serves clients and workers over ZeroMQ.

One thread does everything, so nothing here takes a lock. Each turn of the loop handles
every message that is waiting (up to a batch limit), expires leases, dispatches what can
run, commits once (group commit), and only then sends replies, job assignments and events.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections import OrderedDict
from collections import deque
from dataclasses import dataclass

import zmq

from virtbroker import __version__
from virtbroker.broker.local import LocalConnection, LocalEndpoint
from virtbroker.broker.metrics import BrokerMetrics
from virtbroker.broker.registry import DomainRecord, Registry
from virtbroker.broker.scheduler import Job, Scheduler, WorkerInfo
from virtbroker.broker.store import Store, StoreWriter
from virtbroker.common import domxml, protocol as p
from virtbroker.common.config import Config
from virtbroker.common.process import run_until_signalled
from virtbroker.common.curve import CurveServer, check_tcp_security
from virtbroker.common.statelock import StateLock
from virtbroker.common.wire import send_frames
from virtbroker.common.config import MAX_DEADLINE_S
from virtbroker.common.errors import (
    ConflictError,
    LimitError,
    PermissionError_,
    InvalidError,
    ProtocolError,
    VirtbrokerError,
)

log = logging.getLogger("virtbroker.broker")


# Where a client's reply goes: a ROUTER socket (with the identity as the first frame), or a
# connection of the local endpoint.
ClientSocket = zmq.Socket | LocalConnection

# Messages read from one socket per loop turn. Replies leave at the end of a turn, so this
# bounds how long a request waits behind a flood from another peer (about 2.5 ms at 200
# pings; 13 ms at 1,000, measured by tests/fuzz while 20,000 unread pings arrive).
BATCH_MAX_MESSAGES = 200
TICK_S = 0.2
MAX_WAIT_S = 3600.0
MAX_SHUTDOWN_TIMEOUT_S = 3600.0
_DEFERRED = object()  # a handler's "no reply yet" (wait)
_NOBLOCK = int(zmq.NOBLOCK)
# What the read-only endpoint answers; everything else there is refused.
RESYNC_QUIET_S = 5.0
READONLY_KINDS = frozenset({"ping", "lookup", "list", "dumpxml", "job", "jobs", "wait", "workers"})
# Requests whose replies change nothing, so they need not wait for the disk. A read may show a
# change whose own acknowledgement is still waiting for its commit: if the broker dies first,
# that change is gone, and it was never acknowledged.
READ_KINDS = frozenset({"ping", "lookup", "list", "dumpxml", "job", "jobs", "workers"})

EXIT_OK = 0
EXIT_CONFIG = 2
EXIT_STORE = 3
# Label ids the broker remembers to refuse a reused one (a replayed request); the oldest
# are forgotten first. Each is a random 128-bit id, so a reuse is never an accident.
LABEL_IDS_KEPT = 100000


@dataclass
class Waiter:
    identity: bytes
    request_id: int
    job_ids: list[int]
    deadline: float
    sock: ClientSocket | None = None  # the endpoint the wait came in on
    final_prefix: int = 0  # job_ids[:final_prefix] are final


class Broker:
    def __init__(self, config: Config, context: zmq.Context):
        self.config = config
        self.context = context
        urls = [config.client_url, config.worker_url, config.events_url, config.readonly_url]
        check_tcp_security([u for u in urls if u], bool(config.curve_dir), config.allow_insecure_tcp, "--curve-dir")
        # Before any socket or the database is touched: one broker per state dir.
        self.lock = StateLock(os.path.join(config.state_dir, "broker.lock"), "a broker")
        self.registry = Registry()
        self.scheduler = Scheduler(config.lease_ttl_s)
        self.workers: dict[str, WorkerInfo] = {}
        self.identities: dict[str, bytes] = {}  # worker_id -> ROUTER identity
        # worker_id -> the peer that registered it: its CURVE key, or without CURVE its
        # connection (ROUTER identity). A message naming a worker must come from that peer.
        self.worker_peers: dict[str, bytes] = {}
        self.label_ids: OrderedDict[str, None] = OrderedDict()  # recent label ids (see LABEL_IDS_KEPT)
        self.waiters: list[Waiter] = []
        self.waited_for: dict[int, int] = {}  # job_id -> how many waiters name it (pruning spares these)
        # label_id -> (lifecycle worker awaiting the reply, security worker asked)
        self.label_routes: dict[str, tuple[str, str]] = {}
        # Replies that depend on nothing unwritten (reads, errors, routing) leave at the end
        # of the loop turn; the rest (acknowledged changes, job assignments, events) leave
        # when the batch holding their changes is on disk.
        self.outbox: list[tuple[ClientSocket, list[bytes]]] = []
        self.durable_outbox: list[tuple[ClientSocket, list[bytes]]] = []
        self.events: list[p.Message] = []
        self.subscriptions: set[bytes] = set()  # topic prefixes subscribers asked for
        self.listening = {b"domain": False, b"job": False}  # per topic: does any subscriber want it
        self.in_flight: deque[tuple[int, list, list]] = deque()  # (batch_id, outbox, events) being written
        self.batch_id = 0
        self.writer: StoreWriter | None = None
        self.stopping = False
        self.metrics = BrokerMetrics()
        self._gauges_at = 0.0
        self.store = Store(config.state_dir)
        self.seq = self.saved_seq = int(self.store.meta("event_seq", "0"))
        self._load()
        self.client_sock = self.worker_sock = self.pub_sock = self.readonly_sock = None
        self.local: LocalEndpoint | None = None
        self.curve = CurveServer(context, config.curve_dir) if config.curve_dir else None
        # Every message kind the worker endpoint takes, and its handler.
        self.worker_handlers = {
            "hello": self.handle_worker_hello,
            "heartbeat": self.handle_worker_heartbeat,
            "result": self.handle_worker_result,
            "bye": self.handle_worker_bye,
            "label": self.handle_worker_label,
            "label-reply": self.handle_worker_label_reply,
        }

    # ------------------------------------------------------------------ startup
    def _load(self) -> None:
        for record in self.store.load_domains():
            self.registry.add(record)
        now = time.monotonic()
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
        # Oldest final first, so that pruning forgets the same jobs it would have before the restart.
        jobs = self.scheduler.jobs
        self.scheduler.finished = deque(sorted(self.scheduler.finished, key=lambda j: (jobs[j].finished_at or 0.0, j)))
        log.info(
            "loaded %d domains, %d jobs (%d running leases restored) from %s",
            len(self.registry),
            len(self.scheduler.jobs),
            restored,
            self.store.path,
        )

    def bind(self) -> None:
        # ipc sockets are created owner-only: only this user may connect.
        old_umask = os.umask(0o077)
        try:
            self.client_sock = self._socket(zmq.ROUTER, self.config.client_url, "clients")
            self.worker_sock = self._socket(zmq.ROUTER, self.config.worker_url, "workers")
            # XPUB: a PUB that also tells us what subscribers want, so no event is built for
            # a topic nobody listens to.
            self.pub_sock = self._socket(zmq.XPUB, self.config.events_url, "events")
            if self.config.readonly_url:
                self.readonly_sock = self._socket(zmq.ROUTER, self.config.readonly_url, "readonly")
            self.local = LocalEndpoint(self.config.local_url)
        finally:
            os.umask(old_umask)
        log.info(
            "broker listening: clients %s and %s, workers %s, events %s",
            self.config.client_url,
            self.config.local_url,
            self.config.worker_url,
            self.config.events_url,
        )

    def _socket(self, kind: int, url: str, zap_domain: str) -> zmq.Socket:
        sock = self.context.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        if self.curve is not None:
            self.curve.secure(sock, zap_domain)
        if kind == zmq.ROUTER:
            # The socket refuses oversize messages before they reach the decoder.
            sock.setsockopt(zmq.MAXMSGSIZE, p.MAX_FRAME_BYTES + 4096)
            sock.setsockopt(zmq.RCVHWM, 100000)
            sock.setsockopt(zmq.SNDHWM, 100000)
        if url.startswith("ipc://"):
            path = url[len("ipc://") :]
            os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
            if os.path.exists(path):
                os.unlink(path)  # left by a broker that was killed
        sock.bind(url)
        return sock

    # ------------------------------------------------------------------ loop
    def run(self) -> None:
        self.writer = StoreWriter(self.store, self.context)
        poller = zmq.Poller()
        poller.register(self.client_sock, zmq.POLLIN)
        poller.register(self.worker_sock, zmq.POLLIN)
        poller.register(self.writer.done, zmq.POLLIN)
        poller.register(self.pub_sock, zmq.POLLIN)
        if self.readonly_sock is not None:
            poller.register(self.readonly_sock, zmq.POLLIN)
        self.local.start(poller)
        while not self.stopping:
            ready = dict(poller.poll(self._poll_timeout_ms()))
            now = time.monotonic()
            if self.writer.done in ready:
                self._release_written()
            if self.pub_sock in ready:
                self._read_subscriptions()
            handled = 0
            if self.worker_sock in ready:
                handled += self._drain_workers()
            if self.client_sock in ready:
                handled += self._drain(self.client_sock, self._on_client_frames)
            if self.readonly_sock is not None and self.readonly_sock in ready:
                handled += self._drain(self.readonly_sock, self._on_readonly_frames)
            handled += self.local.service(ready, self._on_local_request, BATCH_MAX_MESSAGES)
            if handled:
                self.metrics.batch_messages.observe(handled)
            self.tick(now)
            self.dispatch(now)
            self.refresh_gauges(now)
            self._answer_waiters(now)
            self._hand_over_batch()
            self._send(self.outbox)
        self._shutdown()

    def _hand_over_batch(self) -> None:
        """Group commit: this turn's changes go to the writer; their replies wait for it."""
        if self.seq != self.saved_seq:
            self.saved_seq = self.seq
            self.store.set_meta("event_seq", str(self.seq))
        if self.scheduler.next_job_id != self.saved_next_job_id:
            # Job ids are never reused, even when the job with the highest id was pruned.
            self.saved_next_job_id = self.scheduler.next_job_id
            self.store.set_meta("next_job_id", str(self.saved_next_job_id))
        batch = self.store.take_batch()
        if batch is not None:
            self.batch_id += 1
            self.in_flight.append((self.batch_id, self.durable_outbox, self.events))
            self.writer.submit(self.batch_id, batch)
        elif self.in_flight:
            # Nothing new to write, but these replies may report changes still being
            # written: they leave with the last batch, in order.
            self.in_flight[-1][1].extend(self.durable_outbox)
            self.in_flight[-1][2].extend(self.events)
        else:
            self._send(self.durable_outbox)
            self._publish(self.events)
        self.durable_outbox, self.events = [], []

    def _release_written(self) -> None:
        while True:
            try:
                status, detail = self.writer.done.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if status != b"done":
                # Nothing more may be acknowledged: leave, and let supervisord restart us
                # on what is on disk.
                log.critical("stopping: the state store failed (%s)", detail.decode(errors="replace"))
                os._exit(EXIT_STORE)
            batch_id = int(detail)
            while self.in_flight and self.in_flight[0][0] <= batch_id:
                _, outbox, events = self.in_flight.popleft()
                self._send(outbox)
                self._publish(events)

    def _poll_timeout_ms(self) -> int:
        if self.local is not None and self.local.backlogged:
            return 0  # requests already read wait for the next turn
        timeout_s = min(TICK_S, self.scheduler.earliest_expiry - time.monotonic())
        return max(0, int(timeout_s * 1000))

    def _drain(self, sock: zmq.Socket, handler) -> int:
        """Handle what waits on sock, up to BATCH_MAX_MESSAGES (a batch counts its messages)."""
        count = 0
        while count < BATCH_MAX_MESSAGES:
            try:
                frames = sock.recv_multipart(_NOBLOCK, copy=True)
            except zmq.Again:
                break
            count += handler(frames)
        return count

    def _send(self, outbox: list[tuple[ClientSocket, list[bytes]]]) -> None:
        """Send queued messages. A worker's are grouped into batches (one send, one wake-up
        for every job it got this turn), in the order they were queued."""
        to_workers: dict[bytes, list[list[bytes]]] = {}
        for sock, frames in outbox:
            if sock is self.worker_sock:
                to_workers.setdefault(frames[0], []).append(frames[1:])
            else:
                self._send_one(sock, frames)
        for identity, encoded in to_workers.items():
            for frames in p.batch_frames(encoded):
                self._send_one(self.worker_sock, [identity, *frames])
        outbox.clear()

    @staticmethod
    def _send_one(sock: ClientSocket, frames: list[bytes]) -> None:
        if type(sock) is LocalConnection:
            sock.send_message(frames[1:])  # a connection needs no identity frame
            return
        try:
            send_frames(sock, frames, noblock=True)
        except zmq.Again:
            log.warning("dropped a message: peer's queue is full")

    def _read_subscriptions(self) -> None:
        """XPUB hands us each topic prefix when its first subscriber arrives (b"\\x01" + prefix)
        and again when its last one leaves (b"\\x00" + prefix)."""
        while True:
            try:
                message = self.pub_sock.recv(_NOBLOCK)
            except zmq.Again:
                break
            if message[:1] == b"\x01":
                self.subscriptions.add(message[1:])
            elif message[:1] == b"\x00":
                self.subscriptions.discard(message[1:])
        self.listening = {
            topic: any(topic.startswith(prefix) for prefix in self.subscriptions) for topic in self.listening
        }

    def _publish(self, events: list[p.Message]) -> None:
        for event in events:
            send_frames(self.pub_sock, p.encode_event(event))
        events.clear()

    def _shutdown(self) -> None:
        log.info("broker stopping")
        # Everything handed to the writer is written before the replies that wait for it go.
        self.writer.stop()
        while self.in_flight:
            _, outbox, events = self.in_flight.popleft()
            self._send(outbox)
            self._publish(events)
        self.store.commit()
        self._send(self.durable_outbox)
        self._publish(self.events)
        self._send(self.outbox)
        for worker_id, identity in self.identities.items():
            self.worker_sock.send_multipart([identity, *p.encode(p.Shutdown())], zmq.NOBLOCK)
        self.store.close()
        for sock in (self.client_sock, self.worker_sock, self.pub_sock, self.readonly_sock):
            if sock is not None:
                sock.close(linger=0)
        if self.local is not None:
            self.local.close()
        if self.curve is not None:
            self.curve.stop()

    # ------------------------------------------------------------------ client side
    def _on_local_request(self, conn: LocalConnection, item: list[bytes] | ProtocolError) -> int:
        """A request from a local endpoint's connection: handled as the client endpoint's are."""
        if isinstance(item, ProtocolError):
            self.metrics.request("undecodable", item.code)
            log.warning("bad local client message: %s", item)
            self._reply(b"", p.Error(request_id=None, code=item.code, message=item.message), conn)
            return 1
        return self._on_client_frames([b"", *item], conn)

    def _on_readonly_frames(self, frames: list[bytes]) -> int:
        return self._on_client_frames(frames, self.readonly_sock)

    def _on_client_frames(self, frames: list[bytes], sock: ClientSocket | None = None) -> int:
        """Handle one client request, or each request of its batch; returns how many."""
        sock = sock or self.client_sock
        identity, body = frames[0], frames[1:]
        try:
            msg = p.decode(body, p.CLIENT_VERSION)
            messages = p.unbatch(msg)
        except ProtocolError as e:
            self.metrics.request("undecodable", e.code)
            log.warning("bad client message: %s", e)
            self._reply(identity, p.Error(request_id=None, code=e.code, message=e.message), sock)
            return 1
        if type(msg) is not p.ClientBatch:
            reply, durable = self._answer(msg, identity, sock)
            if reply is not None:
                self._reply(identity, reply, sock, durable)
            return 1
        # One batch of replies, in the requests' order. It waits for the disk if any of
        # its requests changed something.
        replies = []
        any_durable = False
        for item in messages:
            if item.KIND == "wait":
                self.metrics.request(item.KIND, "invalid")
                reply = p.Error(
                    request_id=item.request_id, code="invalid", message="wait cannot travel in a batch: send it alone"
                )
            else:
                reply, durable = self._answer(item, identity, sock)
                any_durable = any_durable or durable
            replies.append(p.encode(reply))
        box = self.durable_outbox if any_durable else self.outbox
        for frames_out in p.batch_frames(replies):
            box.append((sock, [identity, *frames_out]))
        return len(messages)

    def _answer(self, msg: p.Message, identity: bytes, sock: ClientSocket) -> tuple[p.Message | None, bool]:
        """Handle one decoded request: (its reply, or None while a wait is pending; whether
        the reply must wait for this turn's changes to be on disk)."""
        request_id = getattr(msg, "request_id", None)
        try:
            if sock is self.readonly_sock and msg.KIND not in READONLY_KINDS:
                raise PermissionError_(f"'{msg.KIND}' is not allowed on the read-only endpoint")
            handler = getattr(self, "handle_" + msg.KIND.replace("-", "_"), None)
            if handler is None or msg.KIND in ("ok", "error"):
                raise ProtocolError(f"'{msg.KIND}' is not a request")
            result = handler(msg, identity)
            self.metrics.request(msg.KIND, "ok")
            if result is _DEFERRED:
                self.waiters[-1].sock = sock
                return None, False
            return p.Ok(request_id=request_id, result=result), msg.KIND not in READ_KINDS
        except VirtbrokerError as e:
            self.metrics.request(msg.KIND, e.code)
            if isinstance(e, ProtocolError):
                log.warning("bad client message: %s", e)
            return p.Error(request_id=request_id, code=e.code, message=e.message), False
        except Exception as e:  # a bug: report it and keep serving everyone else
            log.exception("internal error handling a client request")
            return p.Error(request_id=request_id, code="internal", message=f"internal error: {e}"), False

    def _reply(self, identity: bytes, msg: p.Message, sock: ClientSocket | None = None, durable: bool = False) -> None:
        """Queue a reply; durable ones leave only once this turn's changes are on disk."""
        box = self.durable_outbox if durable else self.outbox
        box.append((sock or self.client_sock, [identity, *p.encode(msg)]))

    def handle_ping(self, msg: p.Ping, identity: bytes):
        return {
            "version": __version__,
            "domains": len(self.registry),
            "workers": len(self.workers),
            "events_url": self.config.events_url,
        }

    def handle_define(self, msg: p.Define, identity: bytes):
        definition = domxml.load_definition(msg.xml)
        is_new = definition.uuid not in self.registry.by_uuid and definition.name not in self.registry.by_name
        if is_new and len(self.registry) >= self.config.max_domains:
            raise LimitError(f"cannot define '{definition.name}': the broker holds max_domains = "
                             f"{self.config.max_domains} domains")
        record, created = self.registry.define(definition)
        self.store.put_domain(record)
        self._emit_domain(record, "defined")
        out = record.summary()
        out["created"] = created
        return out

    def handle_lookup(self, msg: p.Lookup, identity: bytes):
        record = self.registry.resolve(msg.domain)
        out = record.summary()
        out["pending_jobs"] = [j.job_id for j in self.scheduler.pending_for(record.uuid)]
        out["active_job"] = self.scheduler.active.get(record.uuid)
        out["persistent"] = True
        return out

    def handle_list(self, msg: p.ListDomains, identity: bytes):
        return [r.summary() for r in self.registry.list(msg.all, msg.state)]

    def handle_dumpxml(self, msg: p.DumpXml, identity: bytes):
        record = self.registry.resolve(msg.domain)
        if not msg.inactive and record.state != "shutoff" and record.live_xml:
            return record.live_xml
        return record.xml

    def handle_submit(self, msg: p.Submit, identity: bytes):
        if msg.op not in p.JOB_OPS:
            raise InvalidError(f"unknown operation '{msg.op}' ({', '.join(p.JOB_OPS)})")
        if msg.timeout_s is not None and not (0 < msg.timeout_s <= MAX_SHUTDOWN_TIMEOUT_S):  # NaN fails too
            raise InvalidError(f"timeout_s must be between 0 and {MAX_SHUTDOWN_TIMEOUT_S:g} seconds")
        if msg.idempotency_key is not None and not (0 < len(msg.idempotency_key) <= 200):
            raise InvalidError("idempotency_key must be 1 to 200 characters")
        if msg.deadline_s is not None and not (0 < msg.deadline_s <= MAX_DEADLINE_S):  # NaN fails too
            raise InvalidError(f"deadline_s must be between 0 and {MAX_DEADLINE_S:g} seconds")
        record = self.registry.resolve(msg.domain)
        if msg.idempotency_key is not None:
            existing_id = self.scheduler.by_key.get(msg.idempotency_key)
            if existing_id is not None:
                existing = self.scheduler.jobs[existing_id]
                if existing.uuid != record.uuid or existing.op != msg.op:
                    raise ConflictError(
                        f"idempotency key already used by job {existing_id} ({existing.op} {existing.domain_name})"
                    )
                out = existing.summary()
                out["existing"] = True
                return out
        if self.scheduler.queued_count >= self.config.max_queued_jobs:
            raise LimitError(f"{self.scheduler.queued_count} jobs are queued (max_queued_jobs); try again later")
        if self.scheduler.queued_for(record.uuid) >= self.config.max_queued_jobs_per_domain:
            raise LimitError(
                f"domain '{record.name}' has {self.scheduler.queued_for(record.uuid)} queued jobs "
                "(max_queued_jobs_per_domain); try again later"
            )
        timeout_s = msg.timeout_s if msg.op == "shutdown" else None
        if msg.op == "shutdown" and timeout_s is None:
            timeout_s = self.config.shutdown_timeout_s
        deadline_s = msg.deadline_s
        if deadline_s is None and msg.op != "undefine":  # undefine runs in the broker itself
            deadline_s = self.config.deadline_s[msg.op] + (timeout_s or 0.0)
        job = self.scheduler.new_job(
            record.uuid, record.name, msg.op, time.time(), timeout_s=timeout_s, idempotency_key=msg.idempotency_key,
            deadline_s=deadline_s,
        )
        self.scheduler.enqueue(job)
        self.store.put_job(job)
        self._emit_job(job)
        return job.summary()

    def handle_job(self, msg: p.GetJob, identity: bytes):
        return self.scheduler.get(msg.job_id).summary()

    def handle_jobs(self, msg: p.ListJobs, identity: bytes):
        if msg.state is not None and msg.state not in p.JOB_STATES:
            raise InvalidError(f"unknown job state '{msg.state}' ({', '.join(p.JOB_STATES)})")
        uuid = self.registry.resolve(msg.domain).uuid if msg.domain else None
        limit = max(1, min(msg.limit, 10000))
        out = []
        jobs = self.scheduler.jobs
        # Newest first, from the indexes (both hold ids in order): no sort of every job.
        newest_first = reversed(self.scheduler.by_domain.get(uuid, {})) if uuid is not None else reversed(jobs)
        for job_id in newest_first:
            job = jobs[job_id]
            if msg.state is None or job.state == msg.state:
                out.append(job.summary())
                if len(out) >= limit:
                    break
        out.reverse()
        return out

    def handle_wait(self, msg: p.Wait, identity: bytes):
        if not msg.job_ids or len(msg.job_ids) > 10000:
            raise InvalidError("wait needs 1 to 10000 job ids")
        for job_id in msg.job_ids:
            self.scheduler.get(job_id)  # unknown ids fail now, not at the deadline
        if not math.isfinite(msg.timeout_s):
            raise InvalidError("timeout_s must be a finite number of seconds")
        timeout_s = min(max(msg.timeout_s, 0.0), MAX_WAIT_S)
        self.waiters.append(Waiter(identity, msg.request_id, list(msg.job_ids), time.monotonic() + timeout_s))
        for job_id in msg.job_ids:
            self.waited_for[job_id] = self.waited_for.get(job_id, 0) + 1
        return _DEFERRED

    def handle_cancel(self, msg: p.Cancel, identity: bytes):
        job = self.scheduler.cancel(msg.job_id, time.time())
        self.store.put_job(job)
        self._emit_job(job)
        return job.summary()

    def handle_workers(self, msg: p.ListWorkers, identity: bytes):
        return [w.summary() for w in self.workers.values()]

    def _answer_waiters(self, now: float) -> None:
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
                self._reply(waiter.identity, p.Ok(request_id=waiter.request_id, result=result), waiter.sock, durable=True)
                for job_id in ids:
                    left = self.waited_for.pop(job_id) - 1
                    if left:
                        self.waited_for[job_id] = left
            else:
                still.append(waiter)
        self.waiters = still

    # ------------------------------------------------------------------ worker side
    def _drain_workers(self) -> int:
        """Handle what waits on the worker socket, as _drain does; with CURVE, each message
        carries its sender's key (the User-Id ZAP gave it), read from the frame's metadata."""
        if self.curve is None:
            return self._drain(self.worker_sock, self._on_worker_frames)
        count = 0
        while count < BATCH_MAX_MESSAGES:
            try:
                frames = self.worker_sock.recv_multipart(_NOBLOCK, copy=False)
            except zmq.Again:
                break
            peer = frames[-1].get("User-Id").encode()
            count += self._on_worker_frames([f.bytes for f in frames], peer)
        return count

    def _on_worker_frames(self, frames: list[bytes], peer: bytes | None = None) -> int:
        """Handle one message from a worker, or each message of its batch in order; returns
        how many. `peer` is who sent it: its CURVE key, or without CURVE its connection."""
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
                handler = self.worker_handlers.get(msg.KIND)
                if handler is None:
                    raise ProtocolError(f"'{msg.KIND}' is not a worker request")
                if msg.KIND == "hello":
                    handler(msg, identity, peer)
                    continue
                worker = self._sender(msg, identity, peer)
                if worker is not None:
                    handler(msg, worker)
            except ProtocolError as e:
                log.warning("bad worker message dropped: %s", e)
            except Exception:
                log.exception("internal error handling a worker message")
        return len(messages)

    def _sender(self, msg: p.Message, identity: bytes, peer: bytes) -> WorkerInfo | None:
        """The registered worker a message names, if it came from the peer that registered it.

        A message naming a worker this broker does not know (it restarted) gets a reregister
        on the connection it came from; one naming a worker another peer registered is refused.
        """
        worker = self.workers.get(msg.worker_id)
        if worker is None:
            if msg.KIND in ("heartbeat", "result", "label"):
                self.outbox.append((self.worker_sock, [identity, *p.encode(p.Reregister())]))
            return None
        if self.worker_peers.get(msg.worker_id) != peer:
            self._refuse_worker(msg, "impersonation", f"it names worker {msg.worker_id}, which another peer registered")
            return None
        if self.identities.get(msg.worker_id) != identity:
            # The same key on a new connection (a worker that reconnected over tcp://).
            self.identities[msg.worker_id] = identity
        worker.last_seen = time.monotonic()
        return worker

    def _refuse_worker(self, msg: p.Message, reason: str, detail: str) -> None:
        """Refuse a worker message: logged, counted, and nothing changes."""
        log.warning("refused %s from a worker peer: %s", msg.KIND, detail)
        self.metrics.refused_worker_messages.labels(msg.KIND, reason).inc()

    def _to_worker(self, worker_id: str, msg: p.Message, durable: bool = True) -> None:
        """Job assignments and result acks wait for the disk; routing and greetings need not."""
        identity = self.identities.get(worker_id)
        if identity is not None:
            box = self.durable_outbox if durable else self.outbox
            box.append((self.worker_sock, [identity, *p.encode(msg)]))

    def handle_worker_hello(self, msg: p.Hello, identity: bytes, peer: bytes) -> None:
        """Register a worker. With CURVE its role and host come from its key, not from the hello."""
        if msg.role not in ("lifecycle", "security") or msg.slots < 1:
            self._refuse_worker(msg, "invalid", f"worker {msg.worker_id}: role {msg.role!r}, slots {msg.slots!r}")
            return
        host_id = msg.host_id
        if self.curve is not None:
            key = self.curve.worker_keys.get(peer)
            if key is None:
                self._refuse_worker(msg, "unknown-key", f"worker {msg.worker_id}: its key is not a worker key")
                return
            if key.role != msg.role:
                self._refuse_worker(
                    msg, "wrong-role", f"worker {msg.worker_id} says {msg.role}, its key {key.name} is for {key.role}"
                )
                return
            if msg.host_id != key.host:
                log.warning("worker %s says host %s; its key %s says %s, which is what counts",
                            msg.worker_id, msg.host_id, key.name, key.host)
            host_id = key.host
        owner = self.worker_peers.get(msg.worker_id)
        if owner is not None and owner != peer:
            # The id is bound to the peer that registered it first, for the broker's life.
            self._refuse_worker(msg, "impersonation", f"worker id {msg.worker_id} belongs to another peer")
            return
        now = time.monotonic()
        previous = self.workers.get(msg.worker_id)
        if previous is not None:
            # Restarted under the same id before we noticed: what the old process was asked
            # will never be answered.
            self._fail_label_routes(previous)
        worker = WorkerInfo(
            worker_id=msg.worker_id,
            role=msg.role,
            host_id=host_id,
            uri=msg.uri,
            slots=msg.slots,
            drivers=list(msg.drivers),
            last_seen=now,
        )
        self.workers[msg.worker_id] = worker
        self.worker_peers[msg.worker_id] = peer
        self.identities[msg.worker_id] = identity
        for held in msg.leases:
            lease = self.scheduler.leases.get(str(held.get("lease_id")))
            if lease is None or lease.job_id != held.get("job_id"):
                continue
            if lease.worker_id != msg.worker_id:
                self._refuse_worker(msg, "not-lease-holder",
                                    f"worker {msg.worker_id} names lease of job {lease.job_id}, held by {lease.worker_id}")
                continue
            # A broker restart: the worker still runs this job, bind it back.
            lease.renew(now, self.config.lease_ttl_s)
            worker.jobs.add(lease.job_id)
        log.info(
            "%s worker %s joined: host %s, %s, %d slots%s",
            msg.role,
            msg.worker_id,
            host_id,
            msg.uri,
            msg.slots,
            f", drivers {','.join(msg.drivers)}" if msg.drivers else "",
        )
        self._to_worker(
            msg.worker_id,
            p.Welcome(heartbeat_interval_s=self.config.heartbeat_interval_s, lease_ttl_s=self.config.lease_ttl_s),
            durable=False,
        )
        if msg.role == "lifecycle":
            self._reconcile_host(host_id, msg.guests)

    def _reconcile_host(self, host_id: str, guests: list[dict]) -> None:
        """Make the registry agree with what a worker sees running on its host.

        Domains with a job running or queued are left alone: their job will settle them.
        So are domains whose state changed in the last RESYNC_QUIET_S: the worker's list may
        have been taken just before another worker's job changed them. Guests the registry
        does not know are someone else's and are left alone too.
        """
        quiet_since = time.monotonic() - RESYNC_QUIET_S
        seen = {}
        for guest in guests:
            try:
                seen[domxml.normalize_uuid(str(guest.get("uuid")))] = str(guest.get("state"))
            except InvalidError:
                continue
        for record in self.registry.by_uuid.values():
            busy = record.uuid in self.scheduler.active or record.uuid in self.scheduler.queues
            if busy or record.changed_at > quiet_since:
                continue
            state = seen.get(record.uuid)
            if state in ("running", "paused"):
                if record.state != state or record.host_id != host_id:
                    self._set_state(record, state, host_id)
            elif record.host_id == host_id and record.state != "shutoff":
                self._set_state(record, "shutoff", None)

    def handle_worker_heartbeat(self, msg: p.Heartbeat, worker: WorkerInfo) -> None:
        unknown = self.scheduler.renew(worker.worker_id, msg.lease_ids, worker.last_seen)
        if msg.guests is not None and worker.role == "lifecycle":
            self._reconcile_host(worker.host_id, msg.guests)
        if unknown:
            log.debug("worker %s renews leases it does not hold: %s", worker.worker_id, unknown)

    def handle_worker_bye(self, msg: p.Bye, worker: WorkerInfo) -> None:
        if worker.jobs:
            # Draining: no new work, but its results are still accepted and its leases renewed.
            worker.slots = 0
            log.info("worker %s is stopping after %d job(s)", worker.worker_id, len(worker.jobs))
            return
        self._forget_worker(worker)
        log.info("worker %s left (host %s)", worker.worker_id, worker.host_id)
        self._worker_gone(worker)

    def _forget_worker(self, worker: WorkerInfo) -> None:
        """Drop a worker from the table. Its id stays bound to its peer (worker_peers)."""
        del self.workers[worker.worker_id]
        self.identities.pop(worker.worker_id, None)

    def handle_worker_result(self, msg: p.Result, worker: WorkerInfo) -> None:
        if worker.role != "lifecycle":
            self._refuse_worker(msg, "wrong-role", f"{worker.role} worker {worker.worker_id} sent a job result")
            return
        now_wall = time.time()
        worker.jobs.discard(msg.job_id)
        job = self.scheduler.jobs.get(msg.job_id)
        lease = self.scheduler.leases.get(msg.lease_id)
        record = self.registry.by_uuid.get(job.uuid) if job is not None else None
        reason = None
        if job is None:
            reason = f"unknown job {msg.job_id}"
        elif lease is None or lease.job_id != msg.job_id:
            reason = f"lease {msg.lease_id} is not current for job {msg.job_id} (job is {job.state})"
        elif lease.worker_id != worker.worker_id:
            # Only the lease's holder may end its job; the holder keeps it.
            self._refuse_worker(msg, "not-lease-holder",
                                f"worker {worker.worker_id} reports job {msg.job_id}, whose lease {lease.worker_id} holds")
            self._to_worker(worker.worker_id, p.ResultAck(job_id=msg.job_id, accepted=False,
                                                          reason=f"job {msg.job_id} is not leased to you"))
            return
        elif record is None or msg.epoch != lease.epoch or msg.epoch < record.epoch:
            reason = f"stale epoch {msg.epoch} for {job.domain_name} (current {record.epoch if record else '-'})"
        if reason is not None:
            log.warning("refused result from worker %s for job %s: %s", worker.worker_id, msg.job_id, reason)
            self.metrics.refused_results.inc()
            self._to_worker(worker.worker_id, p.ResultAck(job_id=msg.job_id, accepted=False, reason=reason))
            if record is not None and job.op != "reconcile" and job.worker_id == worker.worker_id:
                # The late worker may have changed the guest after its lease ended: read the truth again.
                self._queue_reconcile(record, f"late result for job {msg.job_id}")
            return
        ok_state = "succeeded" if msg.ok else "failed"
        self.scheduler.finish(job, ok_state, now_wall, msg.error, msg.error_code if not msg.ok else None)
        self.store.put_job(job)
        self._emit_job(job)
        if msg.domain_state in p.DOMAIN_STATES:
            host = job.host_id if msg.domain_state != "shutoff" else None
            self._set_state(record, msg.domain_state, host)
        elif not msg.ok:
            # The worker could not tell what became of the guest (libvirtd went away mid-call):
            # keep the host and ask it again.
            self._queue_reconcile(record, f"job {job.job_id} failed with the outcome unknown")
        self._to_worker(worker.worker_id, p.ResultAck(job_id=msg.job_id, accepted=True))

    def handle_worker_label(self, msg: p.LabelRequest, worker: WorkerInfo) -> None:
        """Route a lifecycle worker's label request to a security worker of its host.

        The requester must hold the lease of a job on that domain; the host is the
        requester's registered one, and the definition sent is the broker's own, so a
        worker can neither label for another host nor choose what gets labelled.
        """
        refusal = self._label_refusal(msg, worker)
        if refusal is not None:
            self._refuse_worker(msg, refusal[0], refusal[1])
            self._label_failed(worker.worker_id, msg, refusal[1])
            return
        self._remember_label_id(msg.label_id)
        record = self.registry.by_uuid[domxml.normalize_uuid(msg.domain_uuid)]
        candidates = [
            w
            for w in self.workers.values()
            if w.role == "security" and w.host_id == worker.host_id and msg.driver in w.drivers and w.slots > 0
        ]
        if not candidates:
            self._label_failed(worker.worker_id, msg, f"no {msg.driver} security worker on host {worker.host_id}")
            return
        target = min(candidates, key=lambda w: len(w.jobs))
        self.label_routes[msg.label_id] = (worker.worker_id, target.worker_id)
        target.jobs.add(msg.label_id)
        routed = p.LabelRequest(
            worker_id=worker.worker_id, label_id=msg.label_id, host_id=worker.host_id, action=msg.action,
            domain_uuid=record.uuid, domain_name=record.name, xml=record.live_xml or record.xml, driver=msg.driver,
        )
        self._to_worker(target.worker_id, routed, durable=False)  # routing changes nothing on disk

    def _label_refusal(self, msg: p.LabelRequest, worker: WorkerInfo) -> tuple[str, str] | None:
        if worker.role != "lifecycle":
            return "wrong-role", f"{worker.role} worker {worker.worker_id} asked for labels"
        if msg.label_id in self.label_ids or msg.label_id in self.label_routes:
            return "reused-label-id", f"label id {msg.label_id} was used before"
        if msg.action not in ("label", "restore"):
            return "invalid", f"unknown label action {msg.action!r}"
        try:
            uuid = domxml.normalize_uuid(msg.domain_uuid)
        except InvalidError:
            return "invalid", f"bad domain uuid {msg.domain_uuid!r}"
        job_id = self.scheduler.active.get(uuid)
        job = self.scheduler.jobs.get(job_id) if job_id is not None else None
        lease = self.scheduler.leases.get(job.lease_id) if job is not None and job.lease_id else None
        if lease is None or lease.worker_id != worker.worker_id or uuid not in self.registry.by_uuid:
            return "not-lease-holder", f"worker {worker.worker_id} holds no lease on domain {msg.domain_uuid}"
        return None

    def _remember_label_id(self, label_id: str) -> None:
        self.label_ids[label_id] = None
        if len(self.label_ids) > LABEL_IDS_KEPT:
            self.label_ids.popitem(last=False)

    def _label_failed(self, worker_id: str, msg: p.LabelRequest, error: str) -> None:
        self._to_worker(
            worker_id,
            p.LabelReply(worker_id="broker", label_id=msg.label_id, driver=msg.driver, ok=False, error=error),
            durable=False,
        )

    def handle_worker_label_reply(self, msg: p.LabelReply, worker: WorkerInfo) -> None:
        route = self.label_routes.get(msg.label_id)
        if route is None:
            log.warning("label reply %s from %s has no requester (it left)", msg.label_id, worker.worker_id)
            return
        requester, target = route
        if target != worker.worker_id:
            self._refuse_worker(msg, "not-asked", f"worker {worker.worker_id} answers label {msg.label_id}, sent to {target}")
            return
        del self.label_routes[msg.label_id]
        worker.jobs.discard(msg.label_id)
        self._to_worker(requester, msg, durable=False)

    def _fail_label_routes(self, worker: WorkerInfo) -> None:
        """A security worker left: its unanswered requests fail now instead of at the requester's timeout."""
        for label_id, (requester, target) in list(self.label_routes.items()):
            if target == worker.worker_id:
                del self.label_routes[label_id]
                self._to_worker(requester, p.LabelReply(
                    worker_id="broker", label_id=label_id, driver=",".join(worker.drivers), ok=False,
                    error=f"security worker {worker.worker_id} went away before answering",
                ), durable=False)

    # ------------------------------------------------------------------ time
    def tick(self, now: float) -> None:
        now_wall = time.time()
        if len(self.scheduler.finished) > self.config.job_history:
            for job_id in self.scheduler.prune(self.config.job_history, self.waited_for):
                self.store.delete_job(job_id)
        for lease in self.scheduler.expired(now):
            job = self.scheduler.jobs[lease.job_id]
            worker = self.workers.get(lease.worker_id)
            if worker is not None:
                worker.jobs.discard(job.job_id)
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
            self.scheduler.finish(job, "lost", now_wall, error, code)
            self.store.put_job(job)
            self._emit_job(job)
            record = self.registry.by_uuid.get(job.uuid)
            if record is not None and job.op != "reconcile":
                self._queue_reconcile(record, f"job {job.job_id} lost")
            elif record is not None:
                # A lost reconcile is retried on another worker of the host.
                self._queue_reconcile(record, f"reconcile job {job.job_id} lost")
        deadline = now - self.config.lease_ttl_s
        for worker in [w for w in self.workers.values() if w.last_seen < deadline]:
            worker_id = worker.worker_id
            self._forget_worker(worker)
            self._fail_label_routes(worker)
            log.warning("worker %s (host %s) is gone: no heartbeat for %.1f s", worker_id, worker.host_id,
                        now - worker.last_seen)
            self._worker_gone(worker)

    def _worker_gone(self, worker: WorkerInfo) -> None:
        """An embedded hypervisor (test:///default) lives inside its worker: when the last worker
        of such a host is gone, so are its guests. A real host's guests outlive their workers and
        wait, with their queued jobs, for a worker of that host to return."""
        if worker.role != "lifecycle" or not worker.uri.startswith("test:///"):
            return
        if any(w.host_id == worker.host_id for w in self.workers.values()):
            return
        now_wall = time.time()
        for record in self.registry.by_uuid.values():
            if record.host_id != worker.host_id or record.uuid in self.scheduler.active:
                continue
            for job in self.scheduler.pending_for(record.uuid):
                if job.op == "reconcile":
                    self.scheduler.remove_queued(job)
                    self.scheduler.finish(job, "succeeded", now_wall)
                    self.store.put_job(job)
                    self._emit_job(job)
            self.scheduler.drop_empty_queue(record.uuid)
            log.info("%s: its embedded host %s is gone with its worker; now shut off", record.name, worker.host_id)
            self._set_state(record, "shutoff", None)

    def refresh_gauges(self, now: float) -> None:
        """Gauges are recomputed at most once a second: their sums walk whole tables."""
        if now - self._gauges_at < 1.0:
            return
        self._gauges_at = now
        m = self.metrics
        m.queue_depth.set(sum(len(q) for q in self.scheduler.queues.values()))
        m.running.set(len(self.scheduler.active))
        for role in ("lifecycle", "security"):
            m.workers.labels(role).set(sum(1 for w in self.workers.values() if w.role == role))
        m.hosts.set(len({w.host_id for w in self.workers.values() if w.role == "lifecycle"}))
        for state, count in self.registry.state_counts.items():
            m.domains.labels(state).set(count)

    def _queue_reconcile(self, record: DomainRecord, why: str) -> None:
        if any(j.op == "reconcile" for j in self.scheduler.pending_for(record.uuid)):
            return
        job = self.scheduler.new_job(
            record.uuid, record.name, "reconcile", time.time(), deadline_s=self.config.deadline_s["reconcile"]
        )
        self.scheduler.enqueue(job)
        self.store.put_job(job)
        self._emit_job(job)
        log.info("queued reconcile job %d for %s: %s", job.job_id, record.name, why)

    # ------------------------------------------------------------------ dispatch
    def dispatch(self, now: float) -> None:
        """Give each domain's queue head to a worker, if one with a free slot can take it."""
        if not self.scheduler.ready:
            return
        now_wall = time.time()
        lifecycle = [w for w in self.workers.values() if w.role == "lifecycle"]
        free_slots = sum(max(0, w.free_slots) for w in lifecycle)
        lifecycle_capacity = any(w.slots > 0 for w in lifecycle)
        if free_slots <= 0 and lifecycle_capacity:
            # Every slot is busy: nothing can start, and the checks below (refusals,
            # undefine) wait for the turn a slot frees, as the domain's turn. Without this,
            # each turn of a busy broker would walk every waiting domain.
            return
        for uuid in self.scheduler.ready_domains():
            job = self.scheduler.head(uuid)
            record = self.registry.by_uuid.get(uuid)
            refusal = self._refusal(job, record)
            if refusal is not None:
                self.scheduler.pop_head(uuid)
                code, message = refusal
                # QUEUED -> FAILED (not valid in the domain's state when its turn came)
                self.scheduler.finish(job, "failed", now_wall, message, code)
                self.store.put_job(job)
                self._emit_job(job)
                continue
            if job.op == "undefine":
                self.scheduler.pop_head(uuid)
                self._undefine(record, job, now_wall)
                continue
            if job.op == "reconcile" and record.host_id is None:
                self.scheduler.pop_head(uuid)
                self.scheduler.finish(job, "succeeded", now_wall)
                self.store.put_job(job)
                self._emit_job(job)
                continue
            if free_slots <= 0:
                if lifecycle_capacity:
                    break  # the rest wait for a slot (see above)
                continue  # no worker at all: only refusals and undefines can go on
            worker = self._pick_worker(lifecycle, job, record)
            if worker is None:
                continue  # waits in the broker, not in a worker slot
            self.scheduler.pop_head(uuid)
            free_slots -= 1
            record.epoch += 1
            lease = self.scheduler.grant(job, worker, record.epoch, now, now_wall)
            if job.op == "start":
                record.host_id = worker.host_id  # so a lost start is reconciled on the right host
                record.live_xml = record.xml
            self.store.put_domain_state(record)
            self.store.put_job(job)
            self._emit_job(job)
            self._to_worker(
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

    def _refusal(self, job: Job, record: DomainRecord | None) -> tuple[str, str] | None:
        """libvirt's operation-invalid checks, made when the job's turn comes."""
        if record is None:
            return "not-found", f"domain {job.domain_name} was undefined before job {job.job_id} ran"
        state, op = record.state, job.op
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

    def _pick_worker(self, lifecycle: list[WorkerInfo], job: Job, record: DomainRecord) -> WorkerInfo | None:
        if job.op == "start":
            candidates = [w for w in lifecycle if w.free_slots > 0 and self._host_can_label(w.host_id)]
            if not candidates:
                return None
            host_free: dict[str, int] = {}
            for w in candidates:
                host_free[w.host_id] = host_free.get(w.host_id, 0) + w.free_slots
            return max(candidates, key=lambda w: (host_free[w.host_id], w.free_slots))
        candidates = [w for w in lifecycle if w.host_id == record.host_id and w.free_slots > 0]
        return max(candidates, key=lambda w: w.free_slots) if candidates else None

    def _host_can_label(self, host_id: str) -> bool:
        """A start needs every configured security driver on the host it lands on."""
        if not self.config.security:
            return True
        present = {d for w in self.workers.values() if w.role == "security" and w.host_id == host_id for d in w.drivers}
        return all(d in present for d in self.config.security)

    def _undefine(self, record: DomainRecord, job: Job, now_wall: float) -> None:
        self.registry.remove(record.uuid)
        self.store.delete_domain(record.uuid)
        self.scheduler.finish(job, "succeeded", now_wall)
        self.store.put_job(job)
        self._emit_job(job)
        self._emit_domain(record, "undefined")
        for later in self.scheduler.pending_for(record.uuid):
            self.scheduler.pop_head(record.uuid)
            self.scheduler.finish(later, "failed", now_wall, f"domain {record.name} was undefined", "not-found")
            self.store.put_job(later)
            self._emit_job(later)

    # ------------------------------------------------------------------ state and events
    def _set_state(self, record: DomainRecord, state: str, host_id: str | None) -> None:
        changed = record.state != state or record.host_id != host_id
        record.changed_at = time.monotonic()
        self.registry.set_state(record, state)
        record.host_id = host_id
        if state == "shutoff":
            record.live_xml = None
        self.store.put_domain_state(record)
        if changed:
            self._emit_domain(record, "state")

    def _emit_domain(self, record: DomainRecord, event: str) -> None:
        self.seq += 1
        if not self.listening[b"domain"]:
            return  # its seq is spent all the same: seq counts every event, sent or not
        self.events.append(
            p.DomainEvent(
                seq=self.seq, uuid=record.uuid, name=record.name, event=event, state=record.state,
                host_id=record.host_id,
            )
        )

    def _emit_job(self, job: Job) -> None:
        self.metrics.job_transition(job)
        self.seq += 1
        if not self.listening[b"job"]:
            return
        self.events.append(
            p.JobEvent(seq=self.seq, job_id=job.job_id, uuid=job.uuid, op=job.op, state=job.state, error=job.error)
        )


def run_broker(config: Config) -> int:
    """Entry point for one broker process (virtbroker broker, or a child of virtbroker up)."""
    context = zmq.Context()
    broker = Broker(config, context)
    broker.bind()
    if config.metrics_port:
        broker.metrics.serve(config.metrics_port, config.metrics_addr)
        log.info("metrics at http://%s:%d/metrics", config.metrics_addr, config.metrics_port)

    return run_until_signalled(broker, context)
