"""`virtbroker libvirt-gateway`: libvirt's remote protocol on two UNIX sockets (read-write, owner-only;
read-only), served from one asyncio loop; each call that talks to the broker or to libvirtd runs
in a worker thread, so a slow call never holds another call, another connection or the loop."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from concurrent.futures import ThreadPoolExecutor

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
EXIT_ERROR = 1

# libvirtd's max_client_requests is 5; a connection may have this many calls under way before
# the gateway stops reading from it (the rest wait in the socket, not in memory).
MAX_CALLS_PER_CONNECTION = 32
MAX_CONNECTIONS = 4096  # libvirtd's max_clients is 5000
# A client that stops reading its events is dropped once this much waits for it.
MAX_PENDING_OUTPUT_BYTES = 16 * 1024 * 1024
STOP_GRACE_S = 30.0
POOL_THREADS = {READ: 32, JOB: 256, FACTS: 4}


class Connection:
    """One client connection; owned by the loop (its callbacks, its open state)."""

    def __init__(self, gateway: "Gateway", reader, writer, read_only_socket: bool):
        self.gw = gateway
        self.reader = reader
        self.writer = writer
        self.read_only = read_only_socket
        self.opened = False
        self.closed = False
        self.callbacks: dict[int, tuple[int, str | None]] = {}  # callback id -> (event id, uuid or all)
        self.next_callback_id = 1
        self.calls = asyncio.Semaphore(MAX_CALLS_PER_CONNECTION)

    # -- called by LOOP handlers
    def open(self, name: str | None, read_only: bool) -> None:
        if self.opened:
            raise RemoteError(rpc.ERR_INTERNAL_ERROR, "internal error: connection already open", rpc.FROM_RPC)
        self.opened = True
        self.read_only = self.read_only or read_only
        log.debug("connection opened (%s, %s)", name, "read-only" if self.read_only else "read-write")

    def close_requested(self) -> None:
        self.callbacks.clear()
        self.opened = False

    def add_callback(self, event_id: int, uuid: str | None) -> int:
        callback_id = self.next_callback_id
        self.next_callback_id += 1
        self.callbacks[callback_id] = (event_id, uuid)
        return callback_id

    def remove_callback(self, callback_id: int) -> bool:
        return self.callbacks.pop(callback_id, None) is not None

    # -- the wire
    async def serve(self) -> None:
        try:
            while not self.closed:
                word = await self.reader.readexactly(rpc.LENGTH_BYTES)
                length = rpc.frame_length(word)
                if not rpc.MIN_FRAME_BYTES <= length <= rpc.MAX_FRAME_BYTES:
                    # No way to find the next frame, and libvirtd closes here too.
                    log.info("closing a connection that sent a frame length of %d bytes", length)
                    return
                data = await self.reader.readexactly(length - rpc.LENGTH_BYTES)
                await self.calls.acquire()
                self.on_frame(data)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.close()

    def on_frame(self, data: bytes) -> None:
        header = Header.unpack(data)
        body = data[rpc.HEADER_BYTES:]
        if header.prog == rpc.KEEPALIVE_PROGRAM:
            self.calls.release()
            if header.vers == rpc.KEEPALIVE_VERSION and header.proc == rpc.KEEPALIVE_PING and header.type == rpc.TYPE_MESSAGE:
                self.send(rpc.frame(Header(rpc.KEEPALIVE_PROGRAM, rpc.KEEPALIVE_VERSION, rpc.KEEPALIVE_PONG,
                                           rpc.TYPE_MESSAGE, 0, rpc.STATUS_OK)))
            return
        if header.type != rpc.TYPE_CALL:
            # Replies, events and streams from a client: nothing this server asked for.
            self.calls.release()
            log.debug("ignoring a message of type %d for procedure %d", header.type, header.proc)
            return
        if header.prog != rpc.REMOTE_PROGRAM or header.vers != rpc.REMOTE_VERSION:
            self.reply_error(header, RemoteError(
                rpc.ERR_RPC, f"Cannot find program {header.prog} version {header.vers}", rpc.FROM_RPC))
            return
        if header.status != rpc.STATUS_OK:
            self.reply_error(header, RemoteError(rpc.ERR_RPC, f"Unexpected message status {header.status}", rpc.FROM_RPC))
            return
        proc = DISPATCH.get(header.proc)
        if proc is None:
            log.info("procedure %d is not served (NO_SUPPORT)", header.proc)
            self.reply_error(header, rpc.no_support(header.proc))
            return
        if not self.opened and not proc.before_open:
            self.reply_error(header, RemoteError(rpc.ERR_INTERNAL_ERROR, "internal error: connection not open", rpc.FROM_RPC))
            return
        if proc.writes and self.read_only:
            self.reply_error(header, RemoteError(
                rpc.ERR_OPERATION_DENIED, f"operation forbidden: read only access prevents {proc.api}", rpc.FROM_REMOTE))
            return
        call = Call(Unpacker(body), self.gw, self)
        if proc.pool == LOOP:
            self.finish(header, run_handler(proc.handler, call))
            return
        future = self.gw.loop.run_in_executor(self.gw.pools[proc.pool], run_handler, proc.handler, call)
        future.add_done_callback(lambda f: self.finish(header, _outcome(f)))

    def finish(self, header: Header, outcome: tuple[bool, bytes]) -> None:
        self.calls.release()
        ok, body = outcome
        self.send(rpc.frame(header.reply(rpc.STATUS_OK if ok else rpc.STATUS_ERROR), body))

    def reply_error(self, header: Header, error: RemoteError) -> None:
        self.finish(header, (False, error.body()))

    def send(self, data: bytes) -> None:
        if self.closed:
            return  # the answer to a call whose client went away
        self.writer.write(data)
        if self.writer.transport.get_write_buffer_size() > MAX_PENDING_OUTPUT_BYTES:
            log.warning("dropping a client that has not read %d bytes", MAX_PENDING_OUTPUT_BYTES)
            self.close()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.callbacks.clear()
            self.writer.close()
            self.gw.connections.discard(self)


def _outcome(future) -> tuple[bool, bytes]:
    if future.cancelled() or future.exception() is not None:  # the pools are shutting down
        return False, RemoteError(rpc.ERR_INTERNAL_ERROR, "internal error: the gateway is stopping", rpc.FROM_RPC).body()
    return future.result()


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
        self.broker = Broker(config.local_url)
        self.ids = DomainIds()
        self.facts = HostFacts(config.uri)
        self.pools = {name: ThreadPoolExecutor(n, thread_name_prefix=f"gateway-{name}") for name, n in POOL_THREADS.items()}
        self.connections: set[Connection] = set()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.servers: list[asyncio.AbstractServer] = []
        self.feed = EventFeed(config.local_url, LifecycleTranslator(self.ids.is_transient), self.deliver, self.on_stopped)

    # -- events: called from the feed's thread
    def deliver(self, lc: Lifecycle) -> None:
        self.loop.call_soon_threadsafe(self.publish, lc)

    def on_stopped(self, uuid: str) -> None:
        if self.ids.is_transient(uuid):
            # libvirt forgets a transient domain when it stops; virtbroker's registry follows.
            self.pools[JOB].submit(self._forget_transient, uuid)

    def _forget_transient(self, uuid: str) -> None:
        try:
            self.broker.run_job(uuid, "undefine")
        except RemoteError as e:
            log.warning("could not undefine transient domain %s after it stopped: %s", uuid, e)

    def publish(self, lc: Lifecycle) -> None:
        dom = bytes(pack_dom(Packer(), self, {"name": lc.name, "uuid": lc.uuid, "state": lc.state}))
        for conn in list(self.connections):
            for callback_id, (event_id, uuid) in list(conn.callbacks.items()):
                if event_id != lc.event_id or (uuid is not None and uuid != lc.uuid):
                    continue
                body = bytes(Packer().int(callback_id)) + dom
                proc = rpc.PROC_DOMAIN_EVENT_CALLBACK_REBOOT
                if lc.event_id == rpc.EVENT_ID_LIFECYCLE:
                    body += bytes(Packer().int(lc.event).int(lc.detail))
                    proc = rpc.PROC_DOMAIN_EVENT_CALLBACK_LIFECYCLE
                conn.send(rpc.frame(Header(rpc.REMOTE_PROGRAM, rpc.REMOTE_VERSION, proc, rpc.TYPE_MESSAGE, 0, rpc.STATUS_OK), body))

    # -- connections
    async def accept(self, reader, writer, read_only: bool) -> None:
        if len(self.connections) >= MAX_CONNECTIONS:
            log.warning("refusing a connection: %d are open", MAX_CONNECTIONS)
            writer.close()
            return
        conn = Connection(self, reader, writer, read_only)
        self.connections.add(conn)
        await conn.serve()

    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        for url, read_only, mode in (
            (self.config.libvirt_url, False, 0o600),
            (self.config.libvirt_readonly_url, True, 0o666),
        ):
            path = stream_path(url)
            _remove_stale(path)
            server = await asyncio.start_unix_server(
                lambda r, w, ro=read_only: self.accept(r, w, ro), path=path, limit=rpc.MAX_FRAME_BYTES
            )
            # The read-write socket is owner-only; the read-only one is open to anyone who can
            # reach the state directory, as libvirtd's libvirt-sock-ro is.
            os.chmod(path, mode)
            self.servers.append(server)
            log.info("serving libvirt's remote protocol on %s (%s)", url, "read-only" if read_only else "read-write")

    async def stop(self) -> None:
        for server in self.servers:
            server.close()
        for conn in list(self.connections):
            conn.close()
        for url in (self.config.libvirt_url, self.config.libvirt_readonly_url):
            _remove_stale(stream_path(url))

    def close(self) -> None:
        self.feed.stopping.set()
        for pool in self.pools.values():
            pool.shutdown(wait=False, cancel_futures=True)
        self.broker.close()
        self.facts.close()


def _remove_stale(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


async def _serve(gateway: Gateway) -> None:
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    signals = {"count": 0}

    def on_signal() -> None:
        signals["count"] += 1
        if signals["count"] > 1:
            log.warning("second signal: exiting at once")
            os._exit(EXIT_OK)
        stopping.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal)
    gateway.feed.start()
    await gateway.start()
    await stopping.wait()
    log.info("stopping: no new connections; calls under way get up to %g s", STOP_GRACE_S)
    for server in gateway.servers:
        server.close()
    deadline = loop.time() + STOP_GRACE_S
    while any(c.calls._value < MAX_CALLS_PER_CONNECTION for c in gateway.connections) and loop.time() < deadline:
        await asyncio.sleep(0.1)
    await gateway.stop()


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
    try:
        asyncio.run(_serve(gateway))
    finally:
        gateway.close()
        lock.release()
    return EXIT_OK
