"""Fixtures shared by every test folder, and a guard against threads left running."""

import os
import sys
import threading
import time

import libvirt
import pytest

from tests.guests import PREFIX, URI, destroy_through_broker, quiet_libvirt_errors, remove_guests
from tests.procs import Cluster


@pytest.fixture
def cluster_factory(tmp_path_factory):
    """Make clusters of real processes; every process is stopped at the end, pass or fail.
    make.clusters lists what it made (kvm_guests destroys their guests first)."""
    made: list[Cluster] = []

    def make(**kw) -> Cluster:
        state_dir = tmp_path_factory.mktemp("vb")
        cluster = Cluster(state_dir, **kw)
        made.append(cluster)
        return cluster

    make.clusters = made
    yield make
    for cluster in made:
        cluster.stop()


# --------------------------------------------------------------------------- KVM guests


@pytest.fixture(scope="session")
def libvirt_conn():
    """One connection to the host's libvirtd (qemu:///system) for the session."""
    quiet_libvirt_errors()
    try:
        conn = libvirt.open(URI)
    except libvirt.libvirtError as e:
        pytest.fail(f"libvirtd is not reachable at {URI} (scripts/setup-host.sh starts it): {e}")
    yield conn
    conn.close()


@pytest.fixture
def guest_prefix() -> str:
    """The name prefix of the guests kvm_guests cleans up; a folder may narrow it (tests/faults)."""
    return PREFIX


@pytest.fixture
def kvm_guests(libvirt_conn, cluster_factory, guest_prefix):
    """The host's libvirt connection. Guests named guest_prefix are removed before the test
    and after it, pass or fail: first through every broker on the host that the test's
    clusters still run (labels and profiles come off, the registry ends clean), then
    whatever is left straight on the hypervisor. It depends on cluster_factory so that
    those brokers are still running when it cleans up."""
    remove_guests(libvirt_conn, guest_prefix)
    try:
        yield libvirt_conn
    finally:
        for cluster in cluster_factory.clusters:
            if cluster.uri == URI:
                destroy_through_broker(cluster, guest_prefix)
        remove_guests(libvirt_conn, guest_prefix)


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


@pytest.fixture(scope="session")
def guest_user() -> tuple[int, int]:
    """(uid, gid) of the unprivileged guest user (tests/guests.py's ensure_guest_user)."""
    from tests.guests import ensure_guest_user

    pw = ensure_guest_user()
    return pw.pw_uid, pw.pw_gid
