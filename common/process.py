"""How every virtbroker process runs under supervisord: foreground loop, SIGTERM to stop, a second signal to leave."""

from __future__ import annotations

import os
import signal

import zmq

from virtbroker.common import protocol as p
from virtbroker.common.config import Config
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


def connect_worker_socket(context: zmq.Context, config: Config, worker_id: str) -> zmq.Socket:
    """A worker's DEALER to the broker: its id as routing identity, the frame limit, CURVE if configured."""
    check_tcp_security(
        [config.worker_url], bool(config.curve_secret_key), config.allow_insecure_tcp,
        "--curve-server-key and --curve-secret-key",
    )
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.IDENTITY, worker_id.encode())
    sock.setsockopt(zmq.MAXMSGSIZE, p.MAX_FRAME_BYTES + 4096)
    if config.curve_secret_key:
        use_as_client(sock, config.curve_server_key, config.curve_secret_key)
    sock.connect(config.worker_url)
    return sock
