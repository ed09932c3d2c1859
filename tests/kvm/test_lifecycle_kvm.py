"""The core on real KVM guests: storms, control-plane reads during them, and a worker killed mid-start."""

from __future__ import annotations

import subprocess
import threading
import time

import pytest

from tests.kvm.conftest import PREFIX, URI, guest_xml, running_on_host
from tests.waiting import wait_until
from virtbroker.client.api import Client

pytestmark = pytest.mark.kvm


@pytest.fixture
def kvm_cluster(cluster_factory, kvm_guests):
    cluster = cluster_factory(uri=URI, lease_ttl_s=3.0)
    cluster.start_broker()
    for i in range(4):
        cluster.start_worker(f"kw{i}", slots=5)
    workers = cluster.wait_workers(4)
    assert len({w["host"] for w in workers}) == 1  # qemu:///system of one machine is one host
    return cluster  # kvm_guests destroys its guests through the broker, then on the hypervisor


def virsh_running() -> set[str]:
    out = subprocess.run(["virsh", "-c", URI, "list", "--name"], capture_output=True, text=True, check=True).stdout
    return {line.strip() for line in out.splitlines() if line.strip().startswith(PREFIX)}


def test_twenty_guests_start_at_once_while_reads_and_defines_are_answered(kvm_cluster, kvm_guests):
    c = kvm_cluster.client()
    names = [f"{PREFIX}storm{i:02d}" for i in range(20)]
    for name in names:
        c.define(guest_xml(name[len(PREFIX):]))

    probe_results: dict[str, list] = {"lookups": [], "defines": [], "errors": []}
    stop = threading.Event()

    def probe():
        """Lookups and defines of new names, answered while the starts are in flight."""
        with Client(kvm_cluster.client_url, timeout_s=5) as pc:
            i = 0
            while not stop.is_set():
                try:
                    probe_results["lookups"].append(pc.lookup(names[i % 20])["name"])
                    probe_results["defines"].append(pc.define(guest_xml(f"probe{i:04d}"))["name"])
                except Exception as e:  # recorded and asserted on below
                    probe_results["errors"].append(repr(e))
                i += 1
                time.sleep(0.005)

    thread = threading.Thread(target=probe)
    thread.start()
    try:
        jobs = [c.submit(n, "start")["job_id"] for n in names]
        # Reads were answered while starts were still running, not after.
        in_flight = c.jobs(state="running") + c.jobs(state="queued")
        finals = c.wait(jobs, 120)
    finally:
        stop.set()
        thread.join()
    assert [j["state"] for j in finals] == ["succeeded"] * 20, [j["error"] for j in finals]
    assert in_flight, "every start had finished before the first read came back"
    assert not probe_results["errors"]
    assert len(probe_results["lookups"]) >= 5 and len(probe_results["defines"]) >= 5
    assert {d["name"] for d in c.list()} == set(names)
    assert virsh_running() == set(names)
    assert len({j["worker_id"] for j in finals}) == 4  # all four workers took part

    destroys = c.wait([c.submit(n, "destroy")["job_id"] for n in names], 120)
    assert {j["state"] for j in destroys} == {"succeeded"}
    assert virsh_running() == set()
    assert c.list() == []
    undefines = c.wait([c.submit(d["name"], "undefine")["job_id"] for d in c.list(all=True)], 60)
    assert {j["state"] for j in undefines} == {"succeeded"}
    assert c.list(all=True) == []


def test_worker_killed_mid_start_ends_lost_and_reconcile_matches_virsh(kvm_cluster, kvm_guests):
    c = kvm_cluster.client()
    name = f"{PREFIX}victim"
    c.define(guest_xml("victim"))
    job = c.submit(name, "start")
    # Kill the worker the moment it holds the lease.
    def running() -> dict | None:
        current = c.job(job["job_id"])
        return current if current["state"] == "running" else None

    current = wait_until(running, 10, interval_s=0, what="the start running")
    kvm_cluster.workers[current["worker_id"]].kill9()
    killed_at = time.monotonic()

    final = c.wait([job["job_id"]], kvm_cluster.lease_ttl_s + 5)[0]
    assert final["state"] in ("lost", "failed")
    assert final["finished_at"] - (time.time() - (time.monotonic() - killed_at)) <= kvm_cluster.lease_ttl_s + 1.0

    # A reconcile job reads the guest's real state back on another worker of the host.
    def reconciled() -> list[dict]:
        reconciles = [j for j in c.jobs(domain=name) if j["op"] == "reconcile"]
        return reconciles if reconciles and reconciles[-1]["state"] == "succeeded" else []

    reconciles = wait_until(reconciled, 20, interval_s=0.1, what="a reconcile succeeded")
    assert reconciles[-1]["worker_id"] != current["worker_id"]
    on_host = name in running_on_host(kvm_guests)
    assert (c.lookup(name)["state"] == "running") == on_host
    assert (name in virsh_running()) == on_host
    if on_host:
        assert c.run(name, "destroy", 60)["state"] == "succeeded"
    assert virsh_running() == set()


def test_guest_stopped_outside_virtbroker_is_noticed_by_resync(cluster_factory, kvm_guests):
    cluster = cluster_factory(uri=URI, lease_ttl_s=3.0, extra=["--resync-interval", "1"])
    cluster.start_broker()
    cluster.start_worker("rw1")
    cluster.wait_workers(1)
    c = cluster.client()
    name = f"{PREFIX}outside"
    c.define(guest_xml("outside"))
    assert c.run(name, "start", 60)["state"] == "succeeded"
    kvm_guests.lookupByName(name).destroy()  # behind virtbroker's back, as `virsh destroy` would
    wait_until(lambda: c.lookup(name)["state"] == "shutoff", 15, interval_s=0.2, what="the registry says shutoff")
    assert c.run(name, "start", 60)["state"] == "succeeded"
    assert c.run(name, "destroy", 60)["state"] == "succeeded"


def test_shutdown_timeout_given_to_submit_destroys_a_guest_that_ignores_acpi(cluster_factory, kvm_guests):
    """The minimal guest boots to firmware with no OS, so nothing answers the ACPI power
    button: the shutdown ends with a destroy once the timeout_s given to Client.submit has
    passed, 2 s here, not the worker's default of 60 s."""
    cluster = cluster_factory(uri=URI, lease_ttl_s=3.0)
    cluster.start_broker()
    cluster.start_worker("acpi1")
    cluster.wait_workers(1)
    c = cluster.client()
    name = f"{PREFIX}noacpi"
    c.define(guest_xml("noacpi"))
    assert c.run(name, "start", 60)["state"] == "succeeded"
    job = c.submit(name, "shutdown", timeout_s=2)
    final = c.wait([job["job_id"]], 60)[0]
    assert final["state"] == "succeeded", final
    took_s = final["finished_at"] - final["started_at"]
    assert 2.0 <= took_s < 20.0, f"the shutdown took {took_s:.1f} s"
    assert c.lookup(name)["state"] == "shutoff"
    assert name not in running_on_host(kvm_guests)
