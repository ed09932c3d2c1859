"""The local stream transport: the client protocol's messages over a plain UNIX stream socket.

A message on the client endpoint is a list of frames (see common.protocol). On the stream,
each message is one msgpack array of bin values, its frames in order, and messages follow
one another with nothing in between; both directions alike. The connection stands for the
ZeroMQ identity frame, which is never sent.

Why a second transport: a ZeroMQ round trip between two local processes wakes four threads
(each side's I/O thread and its caller), a stream round trip two. When guests boot on every
core, each wake-up waits for a CPU, so in a start storm the stream's lookups wait less (the
figures are in docs/BENCHMARKS.md). ZeroMQ stays the transport for workers, remote clients
and events.
"""

from __future__ import annotations

import os
import selectors
import socket
import time
from collections import deque

import msgpack

from virtbroker.common import protocol as p
from virtbroker.common.errors import ProtocolError, UnavailableError

SCHEME = "unix://"
MAX_FRAMES = 8  # a client message has 3 (version, kind, body)
READ_BYTES = 256 * 1024


def is_stream_url(url: str) -> bool:
    return url.startswith(SCHEME)


def stream_path(url: str) -> str:
    """unix:///var/lib/virtbroker/local.sock -> /var/lib/virtbroker/local.sock"""
    return url[len(SCHEME) :]


def encode_message(frames: list[bytes]) -> bytes:
    return p.pack(list(frames))


# Past these the decoder gives up on the stream; a message within them that is still not
# what check_message() wants is refused on its own, and the stream goes on.
MAX_ARRAY_LEN = MAX_MAP_LEN = 1024


def unpacker(max_bytes: int) -> msgpack.Unpacker:
    """A stream decoder that refuses a message over max_bytes (msgpack.BufferFull on feed)."""
    return msgpack.Unpacker(
        raw=False, max_buffer_size=max_bytes + 4096, max_array_len=MAX_ARRAY_LEN, max_map_len=MAX_MAP_LEN
    )


def check_message(obj) -> list[bytes]:
    """The frames of one decoded stream message, or ProtocolError."""
    if type(obj) is not list or not 0 < len(obj) <= MAX_FRAMES or not all(type(f) is bytes for f in obj):
        raise ProtocolError(f"a stream message is an array of 1 to {MAX_FRAMES} bin frames, not {type(obj).__name__}")
    return obj


class StreamSocket:
    """The client's side: what Client needs of a ZeroMQ DEALER (send_multipart, poll,
    recv_multipart, close), over a UNIX stream socket.

    It connects at the first send, and again at the next send after the broker went away
    (the broker restarted, say): a call in flight then fails with UnavailableError, as a
    call over ZeroMQ would time out.
    """

    def __init__(self, url: str, max_bytes: int = p.MAX_REPLY_BYTES):
        self.url = url
        self.path = stream_path(url)
        self.max_bytes = max_bytes
        self.sock: socket.socket | None = None
        # selectors, not select.select(): select() cannot watch a descriptor above 1,023,
        # and a client in a process with many files open gets one.
        self.selector: selectors.BaseSelector | None = None
        self.unpacker: msgpack.Unpacker | None = None
        self.ready: deque[list[bytes]] = deque()
        self.buffer = memoryview(bytearray(READ_BYTES))  # see broker.local: recv(n) allocates n

    def _open(self) -> socket.socket:
        if self.sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(self.path)
            except OSError as e:
                sock.close()
                raise UnavailableError(f"cannot connect to the broker at {self.url}: {e.strerror}") from None
            selector = selectors.DefaultSelector()
            selector.register(sock, selectors.EVENT_READ)
            self.sock, self.selector, self.unpacker = sock, selector, unpacker(self.max_bytes)
            self.ready.clear()
        return self.sock

    def _lost(self, why: str) -> UnavailableError:
        self.close()
        return UnavailableError(f"lost the connection to the broker at {self.url}: {why}")

    def send_multipart(self, frames: list[bytes]) -> None:
        sock = self._open()
        try:
            sock.sendall(encode_message(frames))
        except OSError as e:
            raise self._lost(e.strerror or str(e)) from None

    def poll(self, timeout_ms: int) -> bool:
        """True once a whole message is here, False if none came within timeout_ms."""
        if self.ready:
            return True
        if self.sock is None:
            return False
        deadline = time.monotonic() + timeout_ms / 1000
        while not self.ready:
            remaining_s = deadline - time.monotonic()
            if remaining_s <= 0 or not self.selector.select(remaining_s):
                return False
            try:
                size = self.sock.recv_into(self.buffer)
            except OSError as e:
                raise self._lost(e.strerror or str(e)) from None
            if not size:
                raise self._lost("the broker closed it")
            try:
                self.unpacker.feed(self.buffer[:size])
                for obj in self.unpacker:
                    self.ready.append(check_message(obj))
            except (ValueError, msgpack.UnpackException, ProtocolError) as e:
                raise self._lost(f"unreadable reply ({type(e).__name__})") from None
        return True

    def recv_multipart(self) -> list[bytes]:
        while not self.ready:
            if self.sock is None:
                raise UnavailableError(f"not connected to the broker at {self.url}")
            self.poll(1000)
        return self.ready.popleft()

    def close(self, linger: int = 0) -> None:
        if self.selector is not None:
            self.selector.close()
        if self.sock is not None:
            self.sock.close()
        self.sock = self.selector = self.unpacker = None
        self.ready.clear()


def remove_stale(path: str) -> None:
    """Remove a socket file a killed broker left, so that bind() can create it again."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
