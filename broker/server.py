"""The broker loop and its sockets: owns the broker's state (BrokerCore) and serves clients and workers.

One thread does everything, so nothing here takes a lock. Each turn of the loop handles
every message that is waiting (up to a batch limit), expires leases, dispatches what can
run, hands the turn's changes to the store writer (group commit), and sends replies; what
depends on those changes (acknowledgements, job assignments, events) leaves once they are
on disk.

The path of a request: a socket here -> client_handlers or worker_handlers (one table per
endpoint) -> BrokerCore (the one place jobs change) -> placement.dispatch -> the outbox ->
the sockets here.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

import zmq

from virtbroker import __version__
from virtbroker.broker import hosts
from virtbroker.broker.client_handlers import ClientHandlers
from virtbroker.broker.core import RESYNC_QUIET_S, BrokerCore
from virtbroker.broker.etcd_store import EtcdBackend
from virtbroker.broker.ha import Campaign, EtcdStore, Follower
from virtbroker.broker.local import LocalConnection, LocalEndpoint
from virtbroker.broker.metrics import BrokerMetrics
from virtbroker.broker.outbox import TO_WORKERS, Entry
from virtbroker.broker.placement import dispatch
from virtbroker.broker.store import Store, StoreWriter
from virtbroker.broker.worker_handlers import WorkerHandlers
from virtbroker.common import protocol as p
from virtbroker.common.config import Config, etcd_endpoints
from virtbroker.common.curve import CurveServer, check_tcp_security
from virtbroker.common.errors import ProtocolError, VirtbrokerError
from virtbroker.common.process import run_until_signalled
from virtbroker.common.statelock import StateLock
from virtbroker.common.wire import send_frames

log = logging.getLogger("virtbroker.broker")

__all__ = ["Broker", "run_broker", "RESYNC_QUIET_S", "BATCH_MAX_MESSAGES"]

# Messages read from one socket per loop turn. Replies leave at the end of a turn, so this
# bounds how long a request waits behind a flood from another peer (bench/analysis.md has
# the measured cost).
BATCH_MAX_MESSAGES = 200
TICK_S = 0.2
_NOBLOCK = int(zmq.NOBLOCK)

EXIT_OK = 0
EXIT_CONFIG = 2
EXIT_STORE = 3


class Broker:
    def __init__(self, config: Config, context: zmq.Context):
        self.config = config
        self.context = context
        urls = [config.client_url, config.worker_url, config.events_url, config.readonly_url]
        check_tcp_security([u for u in urls if u], bool(config.curve_dir), config.allow_insecure_tcp, "--curve-dir")
        # Before any socket or the database is touched: one broker per state dir.
        self.lock = StateLock(os.path.join(config.state_dir, "broker.lock"), "a broker")
        self.metrics = BrokerMetrics()
        self.curve = CurveServer(context, config.curve_dir) if config.curve_dir else None
        self.core: BrokerCore | None = None  # None while standing by (etcd store)
        self.store: Store | None = None
        self.campaign: Campaign | None = None
        self.leader_info: dict | None = None  # the leading broker's URLs (etcd store), as its key says
        self.token: int | None = None  # our fencing token while we lead
        self.standby_peers: set[bytes] = set()  # worker connections we sent not-leader to
        self.abandoned_writers: list[StoreWriter] = []  # of leads lost: closed at shutdown
        self.takeovers = 0
        if config.store == "sqlite":
            self._lead(Store(config.state_dir))
        else:
            self.campaign = Campaign(config, context)
        self.follower: Follower | None = None  # a standby's copy of the store
        self.client_sock: Any = None  # the sockets, bound in bind()
        self.worker_sock: Any = None
        self.pub_sock: Any = None
        self.readonly_sock: Any = None
        self.local: LocalEndpoint | None = None
        self.writer: StoreWriter | None = None
        self.poller: zmq.Poller | None = None
        self.batch_id = 0
        self.stopping = False
        self._gauges_at = 0.0

    def _lead(self, store: Store) -> None:
        """Load the state from the store and serve it (at start, or when elected)."""
        self.store = store
        self.core = BrokerCore(self.config, store, metrics=self.metrics)
        self.core.load()
        self.clients = ClientHandlers(self.core, self.config.events_url, self)
        self.worker_messages = WorkerHandlers(self.core)
        if self.curve is not None:
            self.core.worker_keys = self.curve.worker_keys

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
            self.config.client_url, self.config.local_url, self.config.worker_url, self.config.events_url,
        )

    def _socket(self, kind: int, url: str, zap_domain: str) -> zmq.Socket:
        sock = self.context.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        if self.curve is not None:
            self.curve.secure(sock, zap_domain)
        if sock is not None and zap_domain == "workers":
            # A worker that moves away and back (brokers on etcd) reconnects under the same
            # routing id before this socket has dropped its old connection: hand the id over
            # to the new connection instead of dropping its messages for good. Who may speak
            # for a worker is still its key (CURVE), or its routing id on an owner-only socket.
            sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
        if kind == zmq.ROUTER:
            # The socket refuses oversize messages before they reach the decoder.
            sock.setsockopt(zmq.MAXMSGSIZE, p.MAX_FRAME_BYTES + 4096)
            sock.setsockopt(zmq.RCVHWM, 100000)
            sock.setsockopt(zmq.SNDHWM, 100000)
        if url.startswith("ipc://"):
            path = url[len("ipc://") :]
            os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
            if os.path.exists(path):
                os.unlink(path)  # left by a broker that was killed (we hold the state dir's lock)
        sock.bind(url)
        return sock

    # ------------------------------------------------------------------ loop
    def run(self) -> None:
        if self.config.realtime_priority:
            # This thread, and the threads it starts from here on (they inherit the class):
            # the store writer, the etcd campaign. Not the metrics server's, started before.
            os.sched_setscheduler(0, os.SCHED_RR, os.sched_param(self.config.realtime_priority))
            log.warning("broker loop in the real-time class SCHED_RR at priority %d", self.config.realtime_priority)
        self.poller = poller = zmq.Poller()
        poller.register(self.client_sock, zmq.POLLIN)
        poller.register(self.worker_sock, zmq.POLLIN)
        poller.register(self.pub_sock, zmq.POLLIN)
        if self.readonly_sock is not None:
            poller.register(self.readonly_sock, zmq.POLLIN)
        self.local.start(poller)
        if self.campaign is not None:
            self.follower = Follower(self.config)
            poller.register(self.campaign.loop_side, zmq.POLLIN)
            self.campaign.start()
        else:
            self._start_writer()
        while not self.stopping:
            ready = dict(poller.poll(self._poll_timeout_ms()))
            if self.campaign is not None and self.campaign.loop_side in ready:
                self._campaign_news()
            core = self.core
            if core is None:
                self._stand_by(ready)
                continue
            now = time.monotonic()
            if self.writer.done in ready:
                self._release_written()
                if self.core is None:
                    continue  # the store refused a write: we stood down (etcd store)
            if self.pub_sock in ready:
                self._read_subscriptions()
            handled = 0
            if self.worker_sock in ready:
                handled += self._drain_workers()
            if self.client_sock in ready:
                handled += self._drain(self.client_sock, False)
            if self.readonly_sock is not None and self.readonly_sock in ready:
                handled += self._drain(self.readonly_sock, True)
            handled += self.local.service(ready, self._on_local_request, BATCH_MAX_MESSAGES)
            if handled:
                self.metrics.batch_messages.observe(handled)
            core.tick(now)
            hosts.check(core, now)
            dispatch(core, now)
            self.refresh_gauges(now)
            core.answer_waiters(now)
            self._hand_over_batch()
            self._send(core.outbox.take_now())
        self._shutdown()

    def _start_writer(self) -> None:
        self.writer = StoreWriter(self.store, self.context)
        self.poller.register(self.writer.done, zmq.POLLIN)

    # ------------------------------------------------------------------ failover (etcd store)
    def _campaign_news(self) -> None:
        while True:
            try:
                news = self.campaign.loop_side.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if news[0] == b"leader":
                self._take_over(int(news[1]), json.loads(news[2]))
            elif news[0] == b"follower":
                self.leader_info = json.loads(news[1]) if news[1] else None
                if self.leader_info is not None and self.leader_info.get("worker_url") == self.config.worker_url:
                    # The lease of this broker's previous run (killed, restarted at the same
                    # URLs) has not run out yet: it leads nowhere; wait for a real leader.
                    self.leader_info = None
                if self.core is not None:
                    self._step_down("another broker leads now")
            elif news[0] == b"lost":
                self._step_down(news[1].decode())

    def _take_over(self, token: int, info: dict) -> None:
        """Elected: load what the store holds and lead under `token`."""
        started = time.monotonic()
        backend = EtcdBackend(etcd_endpoints(self.config.store), self.config.etcd_prefix, self.config.store_timeout_s)
        fence = (backend.leader_key.decode(), token)
        copy = None
        if self.follower is not None:
            copy = self.follower.copy_at(token, timeout_s=self.config.store_timeout_s)
            self.follower.stop()
            self.follower = None
        try:
            self._lead(EtcdStore(backend, fence, self.config.store, copy))
        except VirtbrokerError as e:
            # We hold the lead but cannot serve it: leave, so that the lease lapses and
            # another broker (or this one, restarted) takes over.
            log.critical("elected, but cannot load the state from %s: %s", self.config.store, e)
            os._exit(EXIT_STORE)
        self.token, self.leader_info = token, info
        self.takeovers += 1
        self.metrics.takeovers.inc()
        self.metrics.leader.set(1)
        self._start_writer()
        # Workers that came to us while we stood by: register with us now.
        for identity in self.standby_peers:
            self.core.to_connection(identity, p.Reregister())
        self.standby_peers.clear()
        log.warning("leading (fencing token %d): %d domains, %d jobs %s in %.2f s", token,
                    len(self.core.registry), len(self.core.scheduler.jobs),
                    "built from the standby's copy" if copy is not None else "read from etcd",
                    time.monotonic() - started)

    def _step_down(self, reason: str) -> None:
        """Stop acknowledging at once and stand by: nothing that waited for the store leaves
        as it is (its change may or may not be stored), and the state in memory is dropped."""
        log.error("standing by: %s", reason)
        core = self.core
        if core is None:
            return
        self.campaign.resign()
        self.core = None
        self.token = None
        self.metrics.leader.set(0)
        self.metrics.fenced.inc()
        if self.writer is not None:
            self.poller.unregister(self.writer.done)
            self.writer.abandon()
            self.abandoned_writers.append(self.writer)
            self.writer = None
        waiting = core.outbox.abandon() + [(w.dest, [w.identity, *p.encode(p.Ok(request_id=w.request_id))])
                                           for w in core.waiters]
        failed = []
        for dest, frames in waiting:
            if dest is TO_WORKERS:
                continue
            for reply in p.unbatch(p.decode(frames[1:], p.CLIENT_VERSION)):
                failed.append((dest, [frames[0], *p.encode(p.Error(
                    request_id=reply.request_id, code="unavailable",
                    message="this broker lost the lead before the change was stored; it may or may not be: "
                            "look it up on the leader",
                ))]))
        self._send(core.outbox.take_now() + failed)
        self.store.close()
        self.store = None
        self.follower = Follower(self.config)

    def _stand_by(self, ready: dict) -> None:
        """Answer what arrives while another broker leads (or none does)."""
        for sock in (self.client_sock, self.readonly_sock):
            if sock is not None and sock in ready:
                self._drain_standby(sock)
        self.local.service(ready, self._standby_local, BATCH_MAX_MESSAGES)
        if self.worker_sock in ready:
            while True:
                try:
                    frames = self.worker_sock.recv_multipart(_NOBLOCK)
                except zmq.Again:
                    break
                identity = frames[0]
                self.standby_peers.add(identity)
                leader = self.leader_info["worker_url"] if self.leader_info else None
                self._send_one(self.worker_sock, [identity, *p.encode(p.NotLeader(leader_url=leader))])
        if self.pub_sock in ready:
            self._read_subscriptions()

    def _drain_standby(self, sock: zmq.Socket) -> None:
        for _ in range(BATCH_MAX_MESSAGES):
            try:
                frames = sock.recv_multipart(_NOBLOCK)
            except zmq.Again:
                return
            self._answer_standby(sock, frames, "client_url")

    def _standby_local(self, conn: LocalConnection, item) -> int:
        if isinstance(item, ProtocolError):
            self._send_one(conn, [b"", *p.encode(p.Error(request_id=None, code=item.code, message=item.message))])
            return 1
        self._answer_standby(conn, [b"", *item], "local_url")
        return 1

    def _answer_standby(self, dest, frames: list[bytes], url_key: str) -> None:
        identity = frames[0]
        try:
            requests = p.unbatch(p.decode(frames[1:], p.CLIENT_VERSION))
        except ProtocolError as e:
            self._send_one(dest, [identity, *p.encode(p.Error(request_id=None, code=e.code, message=e.message))])
            return
        leader = self.leader_info.get(url_key) if self.leader_info else None
        replies = []
        for msg in requests:
            request_id = getattr(msg, "request_id", None)
            if msg.KIND == "ping":
                replies.append(p.encode(p.Ok(request_id=request_id, result=self.status())))
            elif leader:
                replies.append(p.encode(p.Error(request_id=request_id, code="not-leader", leader=leader,
                                                message=f"this broker stands by; the leader is at {leader}")))
            else:
                replies.append(p.encode(p.Error(request_id=request_id, code="unavailable",
                                                message="no broker leads (is etcd reachable, with a quorum?)")))
        for frames_out in p.batch_frames(replies):
            self._send_one(dest, [identity, *frames_out])

    def status(self) -> dict:
        """What `ping` says of this broker's part in failover (vbctl brokers)."""
        return {
            "version": __version__,
            "role": "leader" if self.core is not None else "standby",
            "store": self.config.store,
            "token": self.token,
            "leader": self.leader_info,
            "takeovers": self.takeovers,
            "revision": self.writer.last_revision if self.writer is not None else None,
            "events_url": self.config.events_url,
            "domains": len(self.core.registry) if self.core is not None else None,
            "workers": len(self.core.workers) if self.core is not None else 0,
            # The seq of the last event made: everything this turn reads (list in the same
            # batch, say) reflects every event up to it, and no later one.
            "event_seq": self.core.events.seq if self.core is not None else None,
        }

    def _hand_over_batch(self) -> None:
        """Group commit: this turn's changes go to the writer; their replies wait for it."""
        batch = self.core.take_batch()
        batch_id = None
        if batch is not None:
            self.batch_id += 1
            batch_id = self.batch_id
            self.writer.submit(batch_id, batch)
        entries, events = self.core.outbox.hand_over(batch_id, self.core.events.take())
        self._send(entries)
        self._publish(events)

    def _release_written(self) -> None:
        while True:
            try:
                status, detail = self.writer.done.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if status != b"done":
                if self.campaign is not None:
                    # Fenced (another broker leads) or etcd unreachable: acknowledge nothing
                    # more, drop what is in memory, and stand by; a new leader reloads.
                    self._step_down(f"the store refused a write ({detail.decode(errors='replace')})")
                    return
                # Nothing more may be acknowledged: leave, and let supervisord restart us
                # on what is on disk.
                log.critical("stopping: the state store failed (%s)", detail.decode(errors="replace"))
                os._exit(EXIT_STORE)
            entries, events = self.core.outbox.release(int(detail))
            self._send(entries)
            self._publish(events)

    def _poll_timeout_ms(self) -> int:
        if self.local is not None and self.local.backlogged:
            return 0  # requests already read wait for the next turn
        if self.core is None:
            return int(TICK_S * 1000)
        timeout_s = min(TICK_S, self.core.scheduler.earliest_expiry - time.monotonic())
        return max(0, int(timeout_s * 1000))

    def _drain(self, sock: zmq.Socket, readonly: bool) -> int:
        """Handle what waits on a client socket, up to BATCH_MAX_MESSAGES (a batch counts its messages)."""
        count = 0
        on_message = self.clients.on_message
        while count < BATCH_MAX_MESSAGES:
            try:
                frames = sock.recv_multipart(_NOBLOCK, copy=True)
            except zmq.Again:
                break
            count += on_message(frames, sock, readonly)
        return count

    def _drain_workers(self) -> int:
        """Handle what waits on the worker socket, as _drain does; with CURVE, each message
        carries its sender's key (the User-Id ZAP gave it), read from the frame's metadata."""
        count = 0
        on_message = self.worker_messages.on_message
        curve = self.curve is not None
        while count < BATCH_MAX_MESSAGES:
            try:
                frames = self.worker_sock.recv_multipart(_NOBLOCK, copy=not curve)
            except zmq.Again:
                break
            if curve:
                peer = frames[-1].get("User-Id").encode()
                count += on_message([f.bytes for f in frames], peer)
            else:
                count += on_message(frames)
        return count

    def _on_local_request(self, conn: LocalConnection, item: list[bytes] | ProtocolError) -> int:
        """A request from a local endpoint's connection: handled as the client endpoint's are."""
        if isinstance(item, ProtocolError):
            self.metrics.request("undecodable", item.code)
            log.warning("bad local client message: %s", item)
            self.core.reply(conn, b"", p.Error(request_id=None, code=item.code, message=item.message))
            return 1
        return self.clients.on_message([b"", *item], conn)

    def _send(self, entries: list[Entry]) -> None:
        """Send queued messages. A worker's are grouped into batches (one send, one wake-up
        for every job it got this turn), in the order they were queued."""
        if not entries:
            return
        to_workers: dict[bytes, list[list[bytes]]] = {}
        for dest, frames in entries:
            if dest is TO_WORKERS:
                to_workers.setdefault(frames[0], []).append(frames[1:])
            else:
                self._send_one(dest, frames)
        for identity, encoded in to_workers.items():
            for frames in p.batch_frames(encoded):
                self._send_one(self.worker_sock, [identity, *frames])

    @staticmethod
    def _send_one(dest, frames: list[bytes]) -> None:
        if type(dest) is LocalConnection:
            dest.send_message(frames[1:])  # a connection needs no identity frame
            return
        try:
            send_frames(dest, frames, noblock=True)
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
                self.core.events.subscribe(message[1:])
            elif message[:1] == b"\x00":
                self.core.events.unsubscribe(message[1:])

    def _publish(self, events: list[p.Message]) -> None:
        for event in events:
            send_frames(self.pub_sock, p.encode_event(event))

    def refresh_gauges(self, now: float) -> None:
        """Gauges are recomputed at most once a second: their sums walk whole tables."""
        if now - self._gauges_at < 1.0:
            return
        self._gauges_at = now
        m, core = self.metrics, self.core
        m.queue_depth.set(core.scheduler.queued_count)
        m.running.set(len(core.scheduler.active))
        for role in ("lifecycle", "security"):
            m.workers.labels(role).set(sum(1 for w in core.workers.values() if w.role == role))
        m.hosts.set(len({w.host_id for w in core.workers.values() if w.role == "lifecycle"}))
        for state, count in core.registry.state_counts.items():
            m.domains.labels(state).set(count)

    def _shutdown(self) -> None:
        log.info("broker stopping")
        if self.core is not None:
            # Everything handed to the writer is written before the replies that wait for it go.
            self.writer.stop()
            self.store.commit()
            entries, events = self.core.outbox.release_all()
            self._send(entries)
            self._publish(events + self.core.events.take())
            for identity in self.core.identities.values():
                self.worker_sock.send_multipart([identity, *p.encode(p.Shutdown())], zmq.NOBLOCK)
            self.store.close()
        if self.campaign is not None:
            self.campaign.stop()  # resigns if it leads, so a standby takes over at once
        if self.follower is not None:
            self.follower.stop()
        for writer in self.abandoned_writers:
            writer.close(self.config.store_timeout_s * 2)
        for sock in (self.client_sock, self.worker_sock, self.pub_sock, self.readonly_sock):
            if sock is not None:
                sock.close(linger=0)
        if self.local is not None:
            self.local.close()
        if self.curve is not None:
            self.curve.stop()


def run_broker(config: Config) -> int:
    """Entry point for one broker process (virtbroker broker, or a child of virtbroker up)."""
    if config.realtime_priority:
        try:  # the same call, on this thread, before anything is bound: refused -> exit at once
            os.sched_setscheduler(0, os.SCHED_RR, os.sched_param(config.realtime_priority))
            os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
        except OSError as e:
            log.critical("realtime_priority %d: cannot enter SCHED_RR (%s); it needs CAP_SYS_NICE",
                         config.realtime_priority, e.strerror)
            return EXIT_CONFIG
    context = zmq.Context()
    broker = Broker(config, context)
    broker.bind()
    if config.metrics_port:
        broker.metrics.serve(config.metrics_port, config.metrics_addr)
        log.info("metrics at http://%s:%d/metrics", config.metrics_addr, config.metrics_port)

    return run_until_signalled(broker, context)
