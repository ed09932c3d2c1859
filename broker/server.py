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

import logging
import os
import time

import zmq

from virtbroker.broker.client_handlers import ClientHandlers
from virtbroker.broker.core import RESYNC_QUIET_S, BrokerCore
from virtbroker.broker.local import LocalConnection, LocalEndpoint
from virtbroker.broker.outbox import TO_WORKERS, Entry
from virtbroker.broker.placement import dispatch
from virtbroker.broker.store import Store, StoreWriter
from virtbroker.broker.worker_handlers import WorkerHandlers
from virtbroker.common import protocol as p
from virtbroker.common.config import Config
from virtbroker.common.curve import CurveServer, check_tcp_security
from virtbroker.common.errors import ProtocolError
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
        self.store = Store(config.state_dir)
        self.core = BrokerCore(config, self.store)
        self.core.load()
        self.metrics = self.core.metrics
        self.clients = ClientHandlers(self.core, config.events_url)
        self.worker_messages = WorkerHandlers(self.core)
        self.curve = CurveServer(context, config.curve_dir) if config.curve_dir else None
        if self.curve is not None:
            self.core.worker_keys = self.curve.worker_keys
        self.client_sock = self.worker_sock = self.pub_sock = self.readonly_sock = None
        self.local: LocalEndpoint | None = None
        self.writer: StoreWriter | None = None
        self.batch_id = 0
        self.stopping = False
        self._gauges_at = 0.0

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
        core = self.core
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
                handled += self._drain(self.client_sock, False)
            if self.readonly_sock is not None and self.readonly_sock in ready:
                handled += self._drain(self.readonly_sock, True)
            handled += self.local.service(ready, self._on_local_request, BATCH_MAX_MESSAGES)
            if handled:
                self.metrics.batch_messages.observe(handled)
            core.tick(now)
            dispatch(core, now)
            self.refresh_gauges(now)
            core.answer_waiters(now)
            self._hand_over_batch()
            self._send(core.outbox.take_now())
        self._shutdown()

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
        # Everything handed to the writer is written before the replies that wait for it go.
        self.writer.stop()
        self.store.commit()
        entries, events = self.core.outbox.release_all()
        self._send(entries)
        self._publish(events + self.core.events.take())
        for identity in self.core.identities.values():
            self.worker_sock.send_multipart([identity, *p.encode(p.Shutdown())], zmq.NOBLOCK)
        self.store.close()
        for sock in (self.client_sock, self.worker_sock, self.pub_sock, self.readonly_sock):
            if sock is not None:
                sock.close(linger=0)
        if self.local is not None:
            self.local.close()
        if self.curve is not None:
            self.curve.stop()


def run_broker(config: Config) -> int:
    """Entry point for one broker process (virtbroker broker, or a child of virtbroker up)."""
    context = zmq.Context()
    broker = Broker(config, context)
    broker.bind()
    if config.metrics_port:
        broker.metrics.serve(config.metrics_port, config.metrics_addr)
        log.info("metrics at http://%s:%d/metrics", config.metrics_addr, config.metrics_port)

    return run_until_signalled(broker, context)
