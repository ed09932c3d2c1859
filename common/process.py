"""How every virtbroker process runs under supervisord: foreground loop, SIGTERM to stop, a second signal to leave."""

from __future__ import annotations

import os
import signal
import time

import zmq
from zmq.utils.monitor import recv_monitor_message

from virtbroker.common import protocol as p
from virtbroker.common.config import Config, url_list
from virtbroker.common.curve import check_tcp_security, use_as_client

EXIT_OK = 0
EXIT_FORCED = 1


def run_until_signalled(service, context: zmq.Context) -> int:
    """Run service.run() until SIGTERM or SIGINT sets service.stopping; a second signal exits at once.

    The service finishes or hands back its work when it sees `stopping`; the context is
    always destroyed so no socket outlives the process's loop.
    """

    def on_signal(signum, frame):
        if service.stopping:
            os._exit(EXIT_FORCED)
        service.stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        service.run()
    finally:
        context.destroy(linger=0)
    return EXIT_OK


def connect_worker_socket(
    context: zmq.Context, config: Config, worker_id: str, url: str | None = None, before_connect=None
) -> zmq.Socket:
    """A worker's DEALER to the broker: its id as routing identity, the frame limit, CURVE if configured."""
    url = url or url_list(config.worker_url)[0]
    check_tcp_security(
        [url], bool(config.curve_secret_key), config.allow_insecure_tcp,
        "--curve-server-key and --curve-secret-key",
    )
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.IDENTITY, worker_id.encode())
    sock.setsockopt(zmq.MAXMSGSIZE, p.MAX_FRAME_BYTES + 4096)
    if config.curve_secret_key:
        use_as_client(sock, config.curve_server_key, config.curve_secret_key)
    if before_connect is not None:
        before_connect(sock)  # e.g. a monitor, which must be there before the connection is
    sock.connect(url)
    return sock


# A worker whose broker connection stayed down this long moves on to the next broker of its
# list (brokers on one etcd store: the leader may have died, and a standby takes over).
FAILOVER_AFTER_S = 1.0
NEXT_BROKER_PAUSE_S = 0.1


class BrokerLink:
    """A worker's connection to the leading broker among those worker_url lists.

    With one URL it is just the DEALER. With several (brokers sharing an etcd store), it
    also watches the connection (a ZeroMQ socket monitor) and moves: to the leader a
    standby's `not-leader` names, or to the next URL when the broker it talks to is gone or
    no broker leads. After a move the worker says hello again. The caller polls `sockets()`,
    and calls `lost(ready, now)` each turn: true when it should move on (then `move(None)`).
    """

    def __init__(self, context: zmq.Context, config: Config, worker_id: str):
        self.context, self.config, self.worker_id = context, config, worker_id
        self.urls = url_list(config.worker_url)
        self.url = self.urls[0]
        self.monitor: zmq.Socket | None = None
        self.down_since: float | None = None
        self.sock = self._open(self.url)

    def _open(self, url: str) -> zmq.Socket:
        def watch(sock: zmq.Socket) -> None:
            self.monitor = sock.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
            self.down_since = time.monotonic()  # until connected

        return connect_worker_socket(
            self.context, self.config, self.worker_id, url, before_connect=watch if len(self.urls) > 1 else None
        )

    def sockets(self) -> list[zmq.Socket]:
        return [self.sock] + ([self.monitor] if self.monitor is not None else [])

    def lost(self, ready: dict, now: float) -> bool:
        """Read the monitor: has the broker been unreachable for FAILOVER_AFTER_S?"""
        if self.monitor is None:
            return False
        if self.monitor in ready:
            while True:
                try:
                    event = recv_monitor_message(self.monitor, zmq.NOBLOCK)
                except zmq.Again:
                    break
                if event["event"] == zmq.EVENT_CONNECTED:
                    self.down_since = None
                elif event["event"] == zmq.EVENT_DISCONNECTED and self.down_since is None:
                    self.down_since = now
        return self.down_since is not None and now - self.down_since > FAILOVER_AFTER_S

    def move_polled(self, poller: zmq.Poller, leader_url: str | None) -> None:
        """move(), and swap the old sockets for the new ones in the caller's poller."""
        old = self.sockets()
        self.move(leader_url)
        for sock in old:
            poller.unregister(sock)
        for sock in self.sockets():
            poller.register(sock, zmq.POLLIN)

    def move(self, leader_url: str | None) -> None:
        """To leader_url, or the next URL of the list (after a short pause: while no broker
        leads, every one answers not-leader at once)."""
        if leader_url is None:
            at = self.urls.index(self.url) if self.url in self.urls else -1
            leader_url = self.urls[(at + 1) % len(self.urls)]
            time.sleep(NEXT_BROKER_PAUSE_S)
        if self.monitor is not None:
            self.sock.disable_monitor()
            self.monitor.close(linger=0)
            self.monitor = None
        self.sock.close(linger=0)
        self.url = leader_url
        self.sock = self._open(leader_url)
