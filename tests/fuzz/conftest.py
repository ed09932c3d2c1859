"""Fuzzing a real broker process: one broker per test module, raw sockets, and a liveness probe.

Every hypothesis test here uses FUZZ: a fixed number of examples, derandomized, no example
database, so a CI run tries exactly the same inputs each time. After every batch the probe
asks the broker for `list --all` under a 2 s receive deadline; the worst answer time is
recorded and printed in the terminal summary (it is reported, never asserted on).
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass, field

import pytest
import zmq
from hypothesis import HealthCheck, settings

from tests.procs import Cluster
from virtbroker.client.api import Client
from virtbroker.common import protocol as p

FUZZ = settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
settings.register_profile("virtbroker-fuzz", FUZZ)

PROBE_DEADLINE_S = 2.0
REPLY_DEADLINE_S = 5.0

_STATS = pytest.StashKey[dict]()


@dataclass
class FuzzStats:
    module: str
    batches: int = 0
    messages: int = 0
    replies: int = 0
    worst_probe_s: float = 0.0
    codes: dict[str, int] = field(default_factory=dict)


class FuzzBroker:
    """A broker process (no workers unless a test starts them), a probe client and raw peers."""

    def __init__(self, cluster: Cluster, stats: FuzzStats):
        self.cluster = cluster
        self.stats = stats
        self.context = zmq.Context()
        self.probe_client = Client(cluster.client_url, timeout_s=PROBE_DEADLINE_S, context=self.context)

    @property
    def worker_url(self) -> str:
        return f"ipc://{self.cluster.state_dir}/worker.sock"

    def raw(self, url: str | None = None, identity: bytes | None = None) -> zmq.Socket:
        sock = self.context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        if identity is not None:
            sock.setsockopt(zmq.IDENTITY, identity)
        sock.connect(url or self.cluster.client_url)
        return sock

    def probe(self) -> list[dict]:
        """`list --all` must be answered within PROBE_DEADLINE_S; returns it."""
        # The probe times the broker, not this process: keep a garbage collection of
        # hypothesis's objects from landing inside the measurement.
        gc.collect()
        gc.disable()
        try:
            started = time.monotonic()
            listing = self.probe_client.list(all=True)  # UnavailableError past the deadline
            elapsed = time.monotonic() - started
        finally:
            gc.enable()
        self.stats.batches += 1
        self.stats.worst_probe_s = max(self.stats.worst_probe_s, elapsed)
        assert self.cluster.broker.alive(), "broker exited:\n" + self.cluster.broker.log()[-3000:]
        return listing

    def collect(self, sock: zmq.Socket, expected: int, deadline_s: float = REPLY_DEADLINE_S) -> list[p.Message]:
        """Replies on a client-socket peer until `expected` came or the deadline passed; each must decode."""
        replies = []
        deadline = time.monotonic() + deadline_s
        while len(replies) < expected:
            remaining_ms = int((deadline - time.monotonic()) * 1000)
            if remaining_ms <= 0 or not sock.poll(remaining_ms):
                break
            reply = p.decode(sock.recv_multipart(), p.CLIENT_VERSION)
            for item in p.unbatch(reply):  # the replies to a batch come as one
                assert isinstance(item, (p.Ok, p.Error)), item
                if isinstance(item, p.Error):
                    self.stats.codes[item.code] = self.stats.codes.get(item.code, 0) + 1
            replies.append(reply)
        self.stats.replies += len(replies)
        return replies

    def close(self) -> None:
        self.probe_client.close()
        self.context.destroy(linger=0)


@pytest.fixture(scope="module")
def fuzz_broker(request, tmp_path_factory):
    state_dir = tmp_path_factory.mktemp("fuzz")
    cluster = Cluster(state_dir, lease_ttl_s=2.0)
    stats = FuzzStats(module=request.module.__name__.rsplit(".", 1)[-1])
    request.config.stash.setdefault(_STATS, {})[stats.module] = stats
    broker = None
    try:
        cluster.start_broker()
        broker = FuzzBroker(cluster, stats)
        yield broker
        log = cluster.broker.log()
        assert cluster.broker.alive(), "broker exited:\n" + log[-3000:]
        # A handler that raised something other than a VirtbrokerError is a bug, even if
        # the loop survived it.
        assert "Traceback" not in log and "internal error" not in log, log[-5000:]
    finally:
        if broker is not None:
            broker.close()
        cluster.stop()


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    all_stats = config.stash.get(_STATS, {})
    if not all_stats:
        return
    terminalreporter.section("virtbroker fuzz")
    for stats in all_stats.values():
        terminalreporter.write_line(
            f"{stats.module}: {stats.batches} batches, {stats.messages} messages sent, {stats.replies} replies, "
            f"worst list --all latency after a batch {stats.worst_probe_s * 1000:.1f} ms; error codes {stats.codes}"
        )
