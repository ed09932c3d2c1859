"""The broker's local endpoint: client requests over a UNIX stream socket (common/stream.py).

The broker's loop polls the listening socket and each connection beside its ZeroMQ sockets,
so a request read here is handled in the same turn, by the same code and with the same
rights as one from the client endpoint. The socket file is owner-only, as the ipc sockets are.

A connection is an ordered pipe of messages. A message that is well framed but not a list
of frames gets a `protocol` error and the connection goes on; bytes that are not msgpack, or
a message over the size limit, leave no way to find the next message, so that connection
gets one `protocol` error and is closed.
"""

from __future__ import annotations

import logging
import socket
from collections import deque
from collections.abc import Callable

import msgpack
import zmq

from virtbroker.common import protocol as p
from virtbroker.common import stream
from virtbroker.common.errors import ProtocolError

log = logging.getLogger("virtbroker.broker")

MAX_CONNECTIONS = 1024
# Read from one connection per loop turn. What one read brings is handled over as many
# turns as it takes at the broker's per-socket limit (BATCH_MAX_MESSAGES), so a peer that
# sends much at once cannot hold the loop.
READ_BYTES = 64 * 1024
# Replies queued for a peer that does not read them. Past this the peer is dropped: a stream
# cannot skip a reply, as a ZeroMQ socket drops a message at its high-water mark.
MAX_PENDING_BYTES = p.MAX_REPLY_BYTES
# Poll flags as plain ints: the poller's are enums, whose `&` runs Python code each time.
_IN = int(zmq.POLLIN)
_OUT = int(zmq.POLLOUT)
_IN_OUT = _IN | _OUT

# The broker's handler of one request read from a connection: its frames, or the
# ProtocolError the stream earned; returns how many requests it was (a batch is several).
Handler = Callable[["LocalConnection", "list[bytes] | ProtocolError"], int]


class LocalConnection:
    """One accepted client. The broker's outbox sends to it with send_message()."""

    def __init__(self, sock: socket.socket, endpoint: LocalEndpoint):
        self.sock = sock
        self.fd = sock.fileno()  # the poller's name for it
        self.endpoint = endpoint
        self.unpacker = stream.unpacker(p.MAX_FRAME_BYTES)
        self.out: deque[memoryview] = deque()
        self.pending_bytes = 0
        self.polling = _IN
        self.closing = False  # read nothing more; close once everything queued is sent
        self.closed = False

    def send_message(self, frames: list[bytes]) -> None:
        """Queue one message (its frames, without an identity) and send what the socket takes."""
        if self.closed:
            return  # the client left; what it asked for still happened
        data = stream.encode_message(frames)
        self.out.append(memoryview(data))
        self.pending_bytes += len(data)
        self.flush()

    def flush(self) -> None:
        try:
            while self.out:
                sent = self.sock.send(self.out[0])
                self.pending_bytes -= sent
                if sent < len(self.out[0]):
                    self.out[0] = self.out[0][sent:]
                    break
                self.out.popleft()
        except BlockingIOError:
            pass
        except OSError:
            self.close()
            return
        if self.out:
            if self.pending_bytes > MAX_PENDING_BYTES:
                log.warning("dropped a local client: %d bytes of replies unread", self.pending_bytes)
                self.close()
                return
            self._poll_for(_OUT if self.closing else _IN_OUT)
        elif self.closing:
            self.close()
        else:
            self._poll_for(_IN)

    def _poll_for(self, flags: int) -> None:
        if flags != self.polling:
            self.polling = flags
            self.endpoint.poller.register(self.fd, flags)

    def serve(self, handle: Handler, limit: int) -> int:
        """Hand each message read to handle(), which returns how many requests it was, until
        `limit` of them; the rest wait in the decoder for the next turn (the connection is
        then backlogged, and read no further until they are done). Returns the count."""
        backlog = self.endpoint.backlogged
        if self not in backlog:
            try:
                size = self.sock.recv_into(self.endpoint.buffer)
            except BlockingIOError:
                return 0
            except OSError:
                size = 0
            if not size:
                self.close()
                return 0
            try:
                self.unpacker.feed(self.endpoint.buffer[:size])
            except msgpack.BufferFull:
                return handle(self, self._fatal(f"a stream message over the limit of {p.MAX_FRAME_BYTES} bytes"))
        count = 0
        try:
            for obj in self.unpacker:
                try:
                    frames = stream.check_message(obj)
                except ProtocolError as e:
                    count += handle(self, e)
                else:
                    count += handle(self, frames)
                if count >= limit:
                    backlog.add(self)
                    return count
        except (ValueError, msgpack.UnpackException) as e:
            count += handle(self, self._fatal(f"the stream is not msgpack ({type(e).__name__})"))
        backlog.discard(self)
        return count

    def _fatal(self, why: str) -> ProtocolError:
        self.closing = True
        self.endpoint.backlogged.discard(self)
        self._poll_for(_OUT)  # reading stops; the error reply goes out, then the socket closes
        return ProtocolError(f"{why}: closing the connection")

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.endpoint.forget(self)
        self.sock.close()
        self.out.clear()


class LocalEndpoint:
    """The listening socket and its connections."""

    def __init__(self, url: str):
        self.url = url
        self.path = stream.stream_path(url)
        stream.remove_stale(self.path)
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(self.path)  # created under the broker's umask: owner-only
        self.listener.listen(128)
        self.listener.setblocking(False)
        self.listener_fd = self.listener.fileno()
        self.connections: dict[int, LocalConnection] = {}  # by file descriptor
        # Connections with messages read but not yet handled: the loop must not sleep.
        self.backlogged: set[LocalConnection] = set()
        # Every read lands here first. recv(n) would allocate n bytes each time, and a
        # buffer this size is allocated with mmap: two system calls a read.
        self.buffer = memoryview(bytearray(READ_BYTES))
        self.poller: zmq.Poller | None = None

    def start(self, poller: zmq.Poller) -> None:
        """Poll the listening socket with the broker's sockets. The poller reports a plain
        socket by its file descriptor, so everything here is registered by descriptor."""
        self.poller = poller
        poller.register(self.listener_fd, _IN)

    def service(self, ready: dict, handle: Handler, limit: int) -> int:
        """Accept, send and read for whatever the poller found ready, and go on with the
        backlogged connections; each connection's requests go to handle(), up to `limit` a
        connection. Returns how many requests were handled."""
        if not self.connections and self.listener_fd not in ready:
            return 0  # the common turn of a broker nobody talks to locally: nothing to walk
        if self.listener_fd in ready:
            self._accept()
        handled = 0
        serve = set(self.backlogged)
        for fd, events in list(ready.items()):
            conn = self.connections.get(fd) if type(fd) is int else None
            if conn is None or conn.closed:
                continue
            events = int(events)
            if events & _OUT:
                conn.flush()
            if events & _IN:
                serve.add(conn)
        for conn in serve:
            if not conn.closing and not conn.closed:
                handled += conn.serve(handle, limit)
        return handled

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # out of file descriptors, say: the next turn tries again
                log.warning("local endpoint: accept failed: %s", e)
                return
            if len(self.connections) >= MAX_CONNECTIONS:
                log.warning("local endpoint: refused a connection, %d are open", len(self.connections))
                sock.close()
                continue
            sock.setblocking(False)
            conn = LocalConnection(sock, self)
            self.connections[conn.fd] = conn
            self.poller.register(conn.fd, _IN)

    def forget(self, conn: LocalConnection) -> None:
        """Before its socket closes: its descriptor number may be reused at once."""
        del self.connections[conn.fd]
        self.backlogged.discard(conn)
        if self.poller is not None:
            self.poller.unregister(conn.fd)

    def close(self) -> None:
        for conn in list(self.connections.values()):
            conn.flush()
            conn.close()
        if self.poller is not None:
            self.poller.unregister(self.listener_fd)
        self.listener.close()
        stream.remove_stale(self.path)
