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
from collections.abc import Iterator

import msgpack
import zmq

from common import protocol as p, stream
from common.errors import ProtocolError

log = logging.getLogger("virtbroker.broker")

MAX_CONNECTIONS = 1024
# Read from one connection per loop turn, so that one peer cannot hold the loop: at most
# about 500 small requests (a lookup is about 40 bytes), as the ZeroMQ sockets give up after
# 200 messages a turn. A 1 MiB definition takes 64 turns to arrive, a few milliseconds.
READ_BYTES = 16 * 1024
# Replies queued for a peer that does not read them. Past this the peer is dropped: a stream
# cannot skip a reply, as a ZeroMQ socket drops a message at its high-water mark.
MAX_PENDING_BYTES = p.MAX_REPLY_BYTES
# Poll flags as plain ints: the poller's are enums, whose `&` runs Python code each time.
_IN = int(zmq.POLLIN)
_OUT = int(zmq.POLLOUT)
_IN_OUT = _IN | _OUT


class LocalConnection:
    """One accepted client. The broker's outbox sends to it with send_message()."""

    def __init__(self, sock: socket.socket, endpoint: "LocalEndpoint"):
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

    def read(self) -> Iterator[list[bytes] | ProtocolError]:
        """The messages one read brings: each one's frames, or the ProtocolError it earned."""
        buffer = self.endpoint.buffer
        try:
            size = self.sock.recv_into(buffer)
        except BlockingIOError:
            return
        except OSError:
            size = 0
        if not size:
            self.close()
            return
        try:
            self.unpacker.feed(buffer[:size])
            for obj in self.unpacker:
                try:
                    yield stream.check_message(obj)
                except ProtocolError as e:
                    yield e
        except msgpack.BufferFull:
            yield self._fatal(f"a stream message over the limit of {p.MAX_FRAME_BYTES} bytes")
        except (ValueError, msgpack.UnpackException) as e:
            yield self._fatal(f"the stream is not msgpack ({type(e).__name__})")

    def _fatal(self, why: str) -> ProtocolError:
        self.closing = True
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
        self.connections: dict[int, LocalConnection] = {}  # by file descriptor
        # Every read lands here first. recv(n) would allocate n bytes each time, and a
        # buffer this size is allocated with mmap: two system calls a read.
        self.buffer = memoryview(bytearray(READ_BYTES))
        self.poller: zmq.Poller | None = None

    def start(self, poller: zmq.Poller) -> None:
        """Poll the listening socket with the broker's sockets. The poller reports a plain
        socket by its file descriptor, so everything here is registered by descriptor."""
        self.poller = poller
        poller.register(self.listener.fileno(), _IN)

    def service(self, ready: dict) -> Iterator[tuple[LocalConnection, list[bytes] | ProtocolError]]:
        """Accept, send and read for whatever the poller found ready; yields each request read."""
        if self.listener.fileno() in ready:
            self._accept()
        for fd, events in list(ready.items()):
            conn = self.connections.get(fd) if type(fd) is int else None
            if conn is None or conn.closed:
                continue
            events = int(events)
            if events & _OUT:
                conn.flush()
            if events & _IN and not conn.closing and not conn.closed:
                for item in conn.read():
                    yield conn, item

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
        if self.poller is not None:
            self.poller.unregister(conn.fd)

    def close(self) -> None:
        for conn in list(self.connections.values()):
            conn.flush()
            conn.close()
        if self.poller is not None:
            self.poller.unregister(self.listener.fileno())
        self.listener.close()
        stream.remove_stale(self.path)
