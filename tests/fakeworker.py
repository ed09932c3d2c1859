"""A test peer that speaks the documented worker protocol (docs/PROTOCOL.md) by hand.

It is what a rogue or buggy worker would be: a DEALER on the broker's worker endpoint with
whatever key and routing identity the test gives it, sending whatever messages the test
builds. Every receive is bounded by a deadline.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import zmq

from virtbroker.common import protocol as p
from virtbroker.common.curve import use_as_client


def expect_message(
    inbox: list[p.Message],
    receive: Callable[[float], object],
    kind: type[p.Message],
    where: Callable[[p.Message], bool],
    timeout_s: float,
    poll_s: float,
    what: str,
) -> p.Message:
    """Take the first message of this kind for which `where` holds out of inbox, calling
    receive(seconds) (which must add what arrives to this same list) for at most poll_s at a
    time until one is there; past timeout_s, an AssertionError naming `what` and the inbox."""
    deadline = time.monotonic() + timeout_s
    while True:
        for msg in inbox:
            if isinstance(msg, kind) and where(msg):
                inbox.remove(msg)
                return msg
        remaining_s = deadline - time.monotonic()
        if remaining_s <= 0:
            raise AssertionError(f"no {what} within {timeout_s:g} s; got {inbox}")
        receive(min(remaining_s, poll_s))


class FakeWorker:
    def __init__(
        self,
        context: zmq.Context,
        url: str,
        routing_id: str,
        server_key: str | None = None,
        secret_key: str | None = None,
    ):
        self.sock = context.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.IDENTITY, routing_id.encode())
        if server_key:
            use_as_client(self.sock, server_key, secret_key)
        self.sock.connect(url)
        self.inbox: list[p.Message] = []

    def send(self, msg: p.Message) -> None:
        self.sock.send_multipart(p.encode(msg))

    def hello(self, worker_id: str, role: str = "lifecycle", host_id: str = "h-a", slots: int = 4, **kw) -> None:
        self.send(p.Hello(worker_id=worker_id, role=role, host_id=host_id, uri="test:///default", slots=slots, **kw))

    def receive(self, timeout_s: float = 0.5) -> list[p.Message]:
        """Everything that arrives within timeout_s (batches unpacked), added to the inbox."""
        deadline = time.monotonic() + timeout_s
        got: list[p.Message] = []
        while True:
            remaining_ms = int((deadline - time.monotonic()) * 1000)
            if remaining_ms <= 0 or not self.sock.poll(remaining_ms):
                break
            got += p.unbatch(p.decode(self.sock.recv_multipart(), p.WORKER_VERSION))
        self.inbox += got
        return got

    def expect(self, kind: type[p.Message], timeout_s: float = 10.0, **match) -> p.Message:
        """The first message of this kind (whose fields match) in the inbox or arriving within timeout_s."""
        return expect_message(
            self.inbox, self.receive, kind, lambda msg: all(getattr(msg, k) == v for k, v in match.items()),
            timeout_s, poll_s=0.2, what=f"{kind.KIND} {match or ''}",
        )

    def drop(self, kind: type[p.Message]) -> list[p.Message]:
        """Take every message of this kind out of the inbox."""
        taken = [m for m in self.inbox if isinstance(m, kind)]
        self.inbox = [m for m in self.inbox if not isinstance(m, kind)]
        return taken

    def close(self) -> None:
        self.sock.close(linger=0)
