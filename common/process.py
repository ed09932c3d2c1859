"""How every virtbroker process runs under supervisord: foreground loop, SIGTERM to stop, a second signal to leave."""

from __future__ import annotations

import os
import signal

import zmq

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
