"""libvirtd restarted under a lifecycle worker: its events resume.

libvirtd forgets every client's event registrations when it restarts (kubevirt/kubevirt#194
is a control plane that did not register again and heard nothing more). After each restart
the worker must register again on a new connection: a guest destroyed behind virtbroker's
back then still shows `shutoff` in the broker within a second. The periodic resync is an
hour, so nothing but an event can tell the broker in time.

The daemon restarted is a private one (PrivateLibvirtd, tests/faults/conftest.py), stopped
by its pid only; the host's qemu:///system daemon is never touched.
"""

from __future__ import annotations

import subprocess
import time

import pytest

from tests.faults.conftest import FAULT_PREFIX, fault_guest_xml
from tests.waiting import wait_until

pytestmark = pytest.mark.kvm

EVENT_WITHIN_S = 1.0


@pytest.fixture
def events_cluster(cluster_factory, private_libvirtd):
    cluster = cluster_factory(uri=private_libvirtd.uri, lease_ttl_s=3.0, extra=["--resync-interval", "3600"])
    cluster.start_broker()
    cluster.start_worker("lw1", slots=2)
    cluster.wait_workers(1)
    yield cluster, private_libvirtd
    # private_libvirtd's own cleanup destroys whatever is left on it.


def registered_again(cluster, registration: int) -> bool:
    """The worker's log says it registered for events on its n-th connection."""
    return f"(registration {registration})" in cluster.workers["lw1"].log()


def test_events_resume_after_each_libvirtd_restart(events_cluster):
    cluster, daemon = events_cluster
    c = cluster.client(timeout_s=30)
    names = [f"{FAULT_PREFIX}evr{i}" for i in range(2)]
    for name in names:
        c.define(fault_guest_xml(name[len(FAULT_PREFIX):]))
        job = c.run(name, "start", 60)
        assert (job["state"], job["error"]) == ("succeeded", None)

    for restart, name in enumerate(names, start=1):
        daemon.restart()
        wait_until(lambda restart=restart: registered_again(cluster, restart + 1), 30,
                   what=f"the worker registered for events again after restart {restart}")
        assert c.lookup(name)["state"] == "running"  # guests outlive libvirtd
        subprocess.run(["virsh", "-c", daemon.uri, "destroy", name], check=True, capture_output=True, timeout=60)
        destroyed_at = time.monotonic()
        wait_until(lambda name=name: c.lookup(name)["state"] == "shutoff",
                   max(0.0, destroyed_at + EVENT_WITHIN_S - time.monotonic()), interval_s=0.02,
                   what=f"{name} shutoff in the broker within {EVENT_WITHIN_S:g} s after restart {restart}")
        print(f"restart {restart}: shutoff in the broker {(time.monotonic() - destroyed_at) * 1000:.0f} ms "
              "after virsh destroy returned")
