"""Fixtures shared by every test folder, and a guard against threads left running."""

import os
import sys
import threading
import time

import pytest

from tests.procs import Cluster


@pytest.fixture
def cluster_factory(tmp_path_factory):
    """Make clusters of real processes; every process is stopped at the end, pass or fail."""
    made: list[Cluster] = []

    def make(**kw) -> Cluster:
        state_dir = tmp_path_factory.mktemp("vb")
        cluster = Cluster(state_dir, **kw)
        made.append(cluster)
        return cluster

    yield make
    for cluster in made:
        cluster.stop()


# A thread a test leaves running would keep pytest from exiting after its summary, and the
# run would hang instead of failing. Give such threads a moment, then name them and fail.
_LEFTOVER_GRACE_S = 10.0


def pytest_sessionfinish(session, exitstatus):
    deadline = time.monotonic() + _LEFTOVER_GRACE_S
    for t in _leftover_threads():
        t.join(max(0.0, deadline - time.monotonic()))
    leftover = _leftover_threads()
    if leftover:
        names = ", ".join(t.name for t in leftover)
        sys.stderr.write(f"\nvirtbroker tests: threads left running after the session: {names}\n")
        session.config._virtbroker_leftover_threads = True
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_unconfigure(config):
    if getattr(config, "_virtbroker_leftover_threads", False):
        sys.stderr.flush()
        sys.stdout.flush()
        os._exit(int(pytest.ExitCode.TESTS_FAILED))


def _leftover_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon and t.is_alive()]
