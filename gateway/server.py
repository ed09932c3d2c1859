"""`virtbroker libvirt-gateway`: libvirt's remote protocol on two UNIX sockets (read-write,
owner-only; read-only). One thread per connection reads its calls and answers the quick ones
itself (a read from the broker's memory, the connect sequence); calls that wait for a
virtbroker job or for libvirtd go to thread pools and answer from there. So a slow call never
holds another call, nor another connection, nor the broker's loop, and a lookup costs one
thread wake-up in the gateway."""

from __future__ import annotations

import logging
import os
import queue
import signal
import socket
import threading
from concurrent.futures import ThreadPoolExecutor

import zmq

from virtbroker.common.config import Config
from virtbroker.common.errors import ConfigError, VirtbrokerError
from virtbroker.common.statelock import StateLock
from virtbroker.common.stream import stream_path
from virtbroker.gateway import rpc
from virtbroker.gateway.domains import Broker, DomainIds, remote_error
from virtbroker.gateway.events import EventFeed, Lifecycle, LifecycleTranslator
from virtbroker.gateway.facts import HostFacts
from virtbroker.gateway.handlers import DISPATCH, FACTS, JOB, LOOP, READ, Call, pack_dom
from virtbroker.gateway.rpc import Header, RemoteError
from virtbroker.gateway.xdr import Packer, Unpacker, XdrError

log = logging.getLogger("virtbroker.gateway")

EXIT_OK = 0

# libvirtd's max_client_requests is 5; a connection may have this many pooled calls under way
# before the gateway stops reading from it (the rest wait in the socket, not in memory).
MAX_CALLS_PER_CONNECTION = 32
MAX_CONNECTIONS = 4096  # libvirtd's max_clients is 5000
# Events waiting for a client that does not read them; past this the client is dropped.
MAX_QUEUED_EVENTS = 10000
STOP_GRACE_S = 30.0
POOL_THREADS = {JOB: 256, FACTS: 4}
READ_BYTES = 256 * 1024
CONNECTION_STACK_BYTES = 512 * 1024


class Connection:
    """One client connection, served by its own thread. Its open state and callbacks are
    changed only by that thread; the event thread reads the callbacks as a snapshot (the dict
    is replaced, never changed in place)."""

    def __init__(self, gateway: Gateway, sock: socket.socket, read_only_socket: bool, number: int):
        self.gw = gateway
        self.sock = sock
        self.read_only = read_only_socket
        self.number = number
        self.opened = False
        self.closed = False
        self.callbacks: dict[int, tuple[int, str | None]] = {}  # callback id -> (event id, uuid or all)
        self.next_callback_id = 1
        self.write_lock = threading.Lock()
        self.pooled = threading.Semaphore(MAX_CALLS_PER_CONNECTION)
        self.in_flight = 0  # pooled calls under way (for a clean stop)
        self.events: queue.Queue | None = None  # made with the first callback, with its writer thread

    # -- called by LOOP handlers, in the connection's thread
    def open(self, name: str | None, read_only: bool) -> None:
        if self.opened:
            raise RemoteError(rpc.ERR_INTERNAL_ERROR, "internal error: connection already open", rpc.FROM_RPC)
        self.opened = True
        self.read_only = self.read_only or read_only
        log.debug("connection %d opened (%s, %s)", self.number, name, "read-only" if self.read_only else "read-write")

    def close_requested(self) -> None:
        self.callbacks = {}
        self.opened = False

    def add_callback(self, event_id: int, uuid: str | None) -> int:
        callback_id = self.next_callback_id
        self.next_callback_id += 1
        self.callbacks = {**self.callbacks, callback_id: (event_id, uuid)}
        if self.events is None:
            self.events = queue.Queue(MAX_QUEUED_EVENTS)
            threading.Thread(target=self._write_events, name=f"gateway-events-{self.number}", daemon=True).start()
        return callback_id

    def remove_callback(self, callback_id: int) -> bool:
        if callback_id not in self.callbacks:
            return False
        self.callbacks = {k: v for k, v in self.callbacks.items() if k != callback_id}
        return True

    # -- the wire
    def serve(self) -> None:
        buffer = bytearray()
        try:
            while not self.closed:
                chunk = self.sock.recv(READ_BYTES)
                if not chunk:
                    return
                buffer += chunk
                while len(buffer) >= rpc.LENGTH_BYTES:
                    length = rpc.frame_length(bytes(buffer[:rpc.LENGTH_BYTES]))
                    if not rpc.MIN_FRAME_BYTES <= length <= rpc.MAX_FRAME_BYTES:
                        # No way to find the next frame, and libvirtd closes here too.
                        log.info("closing a connection that sent a frame length of %d bytes", length)
                        return
                    if len(buffer) < length:
                        break
                    data = bytes(buffer[rpc.LENGTH_BYTES:length])
                    del buffer[:length]
                    self.on_frame(data)
        except OSError:
            pass
        finally:
            self.close()
            self.gw.broker.release_thread_client()

    def on_frame(self, data: bytes) -> None:
        header = Header.unpack(data)
        body = data[rpc.HEADER_BYTES:]
        if header.prog == rpc.KEEPALIVE_PROGRAM:
            if (
                header.vers == rpc.KEEPALIVE_VERSION
                and header.proc == rpc.KEEPALIVE_PING
                and header.type == rpc.TYPE_MESSAGE
            ):
                self.send(rpc.frame(Header(rpc.KEEPALIVE_PROGRAM, rpc.KEEPALIVE_VERSION, rpc.KEEPALIVE_PONG,
                                           rpc.TYPE_MESSAGE, 0, rpc.STATUS_OK)))
            return
        if header.type != rpc.TYPE_CALL:
            # Replies, events and streams from a client: nothing this server asked for.
            log.debug("ignoring a message of type %d for procedure %d", header.type, header.proc)
            return
        if header.prog != rpc.REMOTE_PROGRAM or header.vers != rpc.REMOTE_VERSION:
            self.reply_error(header, RemoteError(
                rpc.ERR_RPC, f"Cannot find program {header.prog} version {header.vers}", rpc.FROM_RPC))
            return
        if header.status != rpc.STATUS_OK:
            self.reply_error(
                header, RemoteError(rpc.ERR_RPC, f"Unexpected message status {header.status}", rpc.FROM_RPC)
            )
            return
        proc = DISPATCH.get(header.proc)
        if proc is None:
            log.info("procedure %d is not served (NO_SUPPORT)", header.proc)
            self.reply_error(header, rpc.no_support(header.proc))
            return
        if not self.opened and not proc.before_open:
            self.reply_error(
                header, RemoteError(rpc.ERR_INTERNAL_ERROR, "internal error: connection not open", rpc.FROM_RPC)
            )
            return
        if proc.writes and self.read_only:
            self.reply_error(
                header,
                RemoteError(
                    rpc.ERR_OPERATION_DENIED,
                    f"operation forbidden: read only access prevents {proc.api}",
                    rpc.FROM_REMOTE,
                ),
            )
            return
        call = Call(Unpacker(body), self.gw, self)
        if proc.pool in (LOOP, READ):
            # The connection's own state, or one read from the broker's memory: answered here.
            self.reply(header, run_handler(proc.handler, call))
            return
        self.pooled.acquire()
        with self.write_lock:
            self.in_flight += 1
        try:
            self.gw.pools[proc.pool].submit(self._pooled, proc.handler, call, header)
        except RuntimeError:  # the pools are shut down: the gateway is stopping
            self._done_pooled()
            self.reply_error(
                header, RemoteError(rpc.ERR_INTERNAL_ERROR, "internal error: the gateway is stopping", rpc.FROM_RPC)
            )

    def _pooled(self, handler, call: Call, header: Header) -> None:
        try:
            self.reply(header, run_handler(handler, call))
        finally:
            self._done_pooled()

    def _done_pooled(self) -> None:
        with self.write_lock:
            self.in_flight -= 1
        self.pooled.release()

    def reply(self, header: Header, outcome: tuple[bool, bytes]) -> None:
        ok, body = outcome
        self.send(rpc.frame(header.reply(rpc.STATUS_OK if ok else rpc.STATUS_ERROR), body))

    def reply_error(self, header: Header, error: RemoteError) -> None:
        self.reply(header, (False, error.body()))

    def send(self, data: bytes) -> None:
        with self.write_lock:
            if self.closed:
                return  # the answer to a call whose client went away
            try:
                self.sock.sendall(data)
            except OSError:
                self._close_locked()

    def queue_event(self, data: bytes) -> None:
        """From the event thread: never blocks on a client that does not read."""
        events = self.events
        if events is None or self.closed:
            return
        try:
            events.put_nowait(data)
        except queue.Full:
            log.warning("dropping a client that has not read %d events", MAX_QUEUED_EVENTS)
            self.close()

    def _write_events(self) -> None:
        while not self.closed:
            data = self.events.get()
            if data is None:
                return
            self.send(data)

    def close(self) -> None:
        with self.write_lock:
            self._close_locked()

    def _close_locked(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.callbacks = {}
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        if self.events is not None:
            try:
                self.events.put_nowait(None)
            except queue.Full:
                pass
        self.gw.forget(self)


def run_handler(handler, call: Call) -> tuple[bool, bytes]:
    """(ok, reply body) of one call; every failure becomes a remote_error."""
    try:
        return True, handler(call)
    except RemoteError as e:
        return False, e.body()
    except XdrError as e:
        log.info("undecodable arguments: %s", e)
        return False, RemoteError(rpc.ERR_RPC, f"Unable to decode message payload: {e}", rpc.FROM_RPC).body()
    except VirtbrokerError as e:
        return False, remote_error(e).body()
    except Exception as e:  # a bug: answer it and keep serving
        log.exception("procedure failed")
        return False, RemoteError(rpc.ERR_INTERNAL_ERROR, f"internal error: {e}").body()


class Gateway:
    """The listening sockets, the connections, the worker pools and the event feed."""

    def __init__(self, config: Config):
        self.config = config
        self.context = zmq.Context()  # shared by every thread's Client (used only for events)
        self.broker = Broker(config.local_url, context=self.context)
        self.ids = DomainIds()
        self.facts = HostFacts(config.uri)
        self.pools = {
            name: ThreadPoolExecutor(n, thread_name_prefix=f"gateway-{name}") for name, n in POOL_THREADS.items()
        }
        self.lock = threading.Lock()  # guards self.connections, changed by connection threads
        self.connections: set[Connection] = set()
        self.listeners: list[socket.socket] = []
        self.stopping = threading.Event()
        self.feed = EventFeed(
            config.local_url, LifecycleTranslator(self.ids.is_transient), self.publish, self.on_stopped
        )
        self._numbers = 0

    # -- events: called from the feed's thread
    def on_stopped(self, uuid: str) -> None:
        if self.ids.is_transient(uuid):
            # libvirt forgets a transient domain when it stops; virtbroker's registry follows.
            try:
                self.pools[JOB].submit(self._forget_transient, uuid)
            except RuntimeError:
                pass  # stopping

    def _forget_transient(self, uuid: str) -> None:
        try:
            self.broker.run_job(uuid, "undefine")
        except RemoteError as e:
            log.warning("could not undefine transient domain %s after it stopped: %s", uuid, e)

    def publish(self, lc: Lifecycle) -> None:
        with self.lock:
            connections = list(self.connections)
        dom = None
        for conn in connections:
            for callback_id, (event_id, uuid) in conn.callbacks.items():
                if event_id != lc.event_id or (uuid is not None and uuid != lc.uuid):
                    continue
                if dom is None:
                    dom = bytes(pack_dom(Packer(), self, {"name": lc.name, "uuid": lc.uuid, "state": lc.state}))
                body = bytes(Packer().int(callback_id)) + dom
                proc = rpc.PROC_DOMAIN_EVENT_CALLBACK_REBOOT
                if lc.event_id == rpc.EVENT_ID_LIFECYCLE:
                    body += bytes(Packer().int(lc.event).int(lc.detail))
                    proc = rpc.PROC_DOMAIN_EVENT_CALLBACK_LIFECYCLE
                conn.queue_event(rpc.frame(
                    Header(rpc.REMOTE_PROGRAM, rpc.REMOTE_VERSION, proc, rpc.TYPE_MESSAGE, 0, rpc.STATUS_OK), body))

    # -- connections
    def forget(self, conn: Connection) -> None:
        with self.lock:
            self.connections.discard(conn)

    def _accept_loop(self, listener: socket.socket, read_only: bool) -> None:
        while not self.stopping.is_set():
            try:
                sock, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                if self.stopping.is_set():
                    return
                raise
            sock.settimeout(None)
            with self.lock:
                if len(self.connections) >= MAX_CONNECTIONS:
                    log.warning("refusing a connection: %d are open", MAX_CONNECTIONS)
                    sock.close()
                    continue
                self._numbers += 1
                conn = Connection(self, sock, read_only, self._numbers)
                self.connections.add(conn)
            threading.Thread(target=conn.serve, name=f"gateway-conn-{conn.number}", daemon=True).start()

    def start(self) -> None:
        threading.stack_size(CONNECTION_STACK_BYTES)
        self.feed.start()
        for url, read_only, mode in (
            (self.config.libvirt_url, False, 0o600),
            (self.config.libvirt_readonly_url, True, 0o666),
        ):
            path = stream_path(url)
            _remove_stale(path)
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            listener.bind(path)  # under umask 077
            # The read-write socket is owner-only; the read-only one is open to anyone who can
            # reach the state directory, as libvirtd's libvirt-sock-ro is.
            os.chmod(path, mode)
            listener.listen(socket.SOMAXCONN)
            listener.settimeout(0.5)
            self.listeners.append(listener)
            threading.Thread(target=self._accept_loop, args=(listener, read_only), name=f"gateway-accept-{path}",
                             daemon=True).start()
            log.info("serving libvirt's remote protocol on %s (%s)", url, "read-only" if read_only else "read-write")

    def stop(self, grace_s: float = STOP_GRACE_S) -> None:
        """No new connections; calls under way get grace_s to finish; then every connection closes."""
        self.stopping.set()
        for listener in self.listeners:
            listener.close()
        for url in (self.config.libvirt_url, self.config.libvirt_readonly_url):
            _remove_stale(stream_path(url))
        waited = threading.Event()
        deadline_steps = int(grace_s / 0.1)
        for _ in range(deadline_steps):
            with self.lock:
                busy = any(c.in_flight for c in self.connections)
            if not busy:
                break
            waited.wait(0.1)
        with self.lock:
            connections = list(self.connections)
        for conn in connections:
            conn.close()
        self.feed.stopping.set()
        for pool in self.pools.values():
            pool.shutdown(wait=False, cancel_futures=True)
        self.broker.close()
        self.facts.close()
        self.context.destroy(linger=0)


def _remove_stale(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def run_gateway(config: Config) -> int:
    if not config.libvirt_url:
        raise ConfigError("libvirt_url is not set")
    # libvirt prints every error of the host-facts connections to stderr by default; they are
    # passed on to the gateway's clients instead.
    import libvirt

    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    lock = StateLock(os.path.join(config.state_dir, "libvirt-gateway.lock"), "a libvirt gateway")
    os.umask(0o077)
    gateway = Gateway(config)
    stop = threading.Event()
    signals = {"count": 0}

    def on_signal(signum, frame) -> None:
        signals["count"] += 1
        if signals["count"] > 1:
            log.warning("second signal: exiting at once")
            os._exit(EXIT_OK)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:  # `up`'s children leave Ctrl-C to `up`
        signal.signal(signal.SIGINT, on_signal)
    try:
        gateway.start()
        while not stop.wait(1.0):
            pass
        log.info("stopping: no new connections; calls under way get up to %g s", STOP_GRACE_S)
        gateway.stop()
    finally:
        lock.release()
    # A call still waiting for its job after the grace period holds a pool thread, which the
    # interpreter would wait for at exit: the job goes on in virtbroker, the gateway leaves now.
    logging.shutdown()
    os._exit(EXIT_OK)
