"""Host-failure tests on separate hypervisors: two test hosts for the session (users with their
own qemu:///session in network namespaces, scripts/test-hosts.sh), and per test a broker, a
worker per host, a QEMU watcher and the fence agent's gate.

Everything is removed at the end, also when a test fails: each test's guests, processes and
links; the hosts themselves (users, namespaces, daemons, folders) after the session. A run
that was killed leaves hosts behind: the next one removes them before it starts.
"""

from __future__ import annotations

import pytest

from tests.hosts.lab import (
    SHARED_DIR,
    FenceGate,
    HostLab,
    LabHost,
    QemuWatcher,
    hosts_script,
)
from tests.waiting import wait_until

HOST_COUNT = 2


def pytest_configure(config):
    config.addinivalue_line("markers", "hosts: needs root; runs separate test hypervisors (scripts/test-hosts.sh)")


@pytest.fixture(scope="session")
def lab_hosts() -> list[LabHost]:
    """Hosts vbh1 and vbh2 with their session libvirtd running, for the whole session."""
    hosts_script("down")  # what a killed earlier run left
    try:
        hosts_script("up", str(HOST_COUNT))
        yield [LabHost(i) for i in range(1, HOST_COUNT + 1)]
    finally:
        hosts_script("down")


@pytest.fixture
def fence(tmp_path) -> FenceGate:
    """tests/fence_host.py's gate and call log for this test; open (it fences) unless refused."""
    return FenceGate(tmp_path / "fence")


@pytest.fixture
def watch(lab_hosts) -> QemuWatcher:
    """Which host runs which guest's QEMU, every 100 ms, for the whole test."""
    watcher = QemuWatcher({h.uid: h.host_id for h in lab_hosts}).start()
    try:
        yield watcher
    finally:
        watcher.stop()


@pytest.fixture
def lab(lab_hosts, tmp_path_factory, fence, watch) -> HostLab:
    """A broker and, once the test starts them, a worker per host. At the end, pass or fail:
    links up again, workers and broker stopped, every QEMU of the hosts killed and their test
    guests gone, the shared storage emptied (its lockspace kept)."""
    for host in lab_hosts:
        host.heal()
        host.remove_guests()
    made = HostLab(lab_hosts, tmp_path_factory.mktemp("vbhosts"), fence)
    try:
        yield made
    finally:
        for host in lab_hosts:
            host.heal()
        made.stop()
        for host in lab_hosts:
            host.remove_guests()
        watch.fresh()
        wait_until(lambda: not any(watch.where(u) for u in list(watch.seen)), 15, what="no test guest runs")
        for entry in SHARED_DIR.iterdir():
            if entry.name != "lockspace":
                entry.unlink()
