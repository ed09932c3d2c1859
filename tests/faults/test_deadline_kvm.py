"""Job deadlines: a libvirt call that hangs (libvirtd stopped with SIGSTOP) does not hold its
lease for ever. The worker stops renewing at the job's deadline, the job ends `lost` with
code `deadline`, and the domain's next job runs once libvirtd answers again.

The daemon stopped here is a private one this test owns (PrivateLibvirtd), never the host's.
"""

from __future__ import annotations

import signal

import pytest

from tests.faults.conftest import FAULT_PREFIX, fault_guest_xml

pytestmark = pytest.mark.kvm

DEADLINE_S = 3.0
LEASE_TTL_S = 2.0


def test_a_hung_libvirt_call_ends_lost_at_its_deadline(cluster_factory, private_libvirtd):
    cluster = cluster_factory(uri=private_libvirtd.uri, lease_ttl_s=LEASE_TTL_S,
                              extra=["--deadline", f"suspend:{DEADLINE_S:g}"])
    cluster.start_broker()
    cluster.start_worker("dl1", slots=4)
    cluster.wait_workers(1)
    c = cluster.client(timeout_s=30)
    name = f"{FAULT_PREFIX}deadline"
    c.define(fault_guest_xml(name[len(FAULT_PREFIX):]))
    assert c.wait([c.submit(name, "start")["job_id"]], 60)[0]["state"] == "succeeded"

    private_libvirtd.popen.send_signal(signal.SIGSTOP)
    try:
        job = c.submit(name, "suspend")
        # The broker answers at the wait's timeout at the latest: a job still running then fails here.
        lost = c.wait_status([job["job_id"]], DEADLINE_S + LEASE_TTL_S + 1)["jobs"][0]
        assert lost["state"] == "lost", lost
        assert lost["error_code"] == "deadline" and "deadline" in lost["error"]
        assert lost["finished_at"] - lost["started_at"] <= DEADLINE_S + LEASE_TTL_S + 1
        assert "passed its deadline" in cluster.workers["dl1"].log()
    finally:
        private_libvirtd.popen.send_signal(signal.SIGCONT)

    # libvirtd answers again: the stuck call returns (its late result is refused and a
    # reconcile reads the truth), and the domain's next job runs.
    destroy = c.wait([c.submit(name, "destroy")["job_id"]], 120)[0]
    assert destroy["state"] == "succeeded", destroy
    assert c.lookup(name)["state"] == "shutoff"
