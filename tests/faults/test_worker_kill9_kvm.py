"""kill -9 of a lifecycle worker at random points while real KVM guests start and stop.

On qemu:///system every worker of the machine shares one host, so the jobs a dead worker
held are lost, and reconcile jobs on the surviving workers read the guests back. After
each phase: every job is final, every define is still there, and the registry agrees
with `virsh list` (at once, or after the workers' periodic resync: both are counted).
The killed worker is restarted each round.
"""

from __future__ import annotations

import time

import pytest

from tests.faults.conftest import (
    FAULT_PREFIX,
    RESYNC_ARGS,
    active_guests,
    converge,
    fault_guest_xml,
    registry_active,
    settle,
)
from tests.kvm.conftest import URI
from tests.waiting import wait_until

pytestmark = pytest.mark.kvm

GUESTS = 10
ROUNDS = 5  # each round starts and destroys every guest: 100 jobs
WORKERS = ("kw1", "kw2", "kw3")


@pytest.fixture
def kvm_fault_cluster(cluster_factory, kvm_guests):
    cluster = cluster_factory(uri=URI, lease_ttl_s=3.0, extra=RESYNC_ARGS)
    cluster.start_broker()
    for w in WORKERS:
        cluster.start_worker(w, slots=4)
    workers = cluster.wait_workers(len(WORKERS))
    assert len({w["host"] for w in workers}) == 1
    return cluster


def check_registry_matches_virsh(c, names, context) -> float:
    defined = {d["name"] for d in c.list(all=True)}
    assert set(names) <= defined, f"{context}: defines lost: {set(names) - defined}"
    return converge(lambda: registry_active(c), lambda: active_guests(URI), context)


def test_lifecycle_worker_kill9_during_kvm_starts_and_destroys(kvm_fault_cluster, fault_rng):
    cluster = kvm_fault_cluster
    c = cluster.client(timeout_s=30)
    names = [f"{FAULT_PREFIX}wk{i}" for i in range(GUESTS)]
    for name in names:
        c.define(fault_guest_xml(name[len(FAULT_PREFIX):]))
    counts = {"jobs": 0, "kills": 0, "lost": 0, "lost on other workers": 0, "reconciles": 0,
              "registry behind virsh": 0}

    for round_no in range(ROUNDS):
        for op in ("start", "destroy"):
            job_ids = [c.submit(n, op)["job_id"] for n in names]
            counts["jobs"] += len(job_ids)
            # A random worker at a random instant: usually while it holds leases.
            victim = fault_rng.choice(WORKERS)
            time.sleep(fault_rng.uniform(0.05, 1.5))
            busy = [j for j in c.jobs(state="running") if j["worker_id"] == victim]
            cluster.workers[victim].kill9()
            counts["kills"] += 1
            finals = c.wait(job_ids, 120)
            assert all(j["state"] in ("succeeded", "failed", "lost") for j in finals)
            jobs = settle(c, timeout_s=60)  # reconciles of lost jobs included
            lost = [j for j in finals if j["state"] == "lost"]
            counts["lost"] += len(lost)
            for job in lost:
                # A surviving worker can lose a lease too when its heartbeat stalls (see
                # RELIABILITY.md); safe, as its job is reconciled like the victim's.
                if job["worker_id"] != victim:
                    counts["lost on other workers"] += 1
                reconciles = [j for j in jobs if j["op"] == "reconcile" and j["domain"] == job["domain"]
                              and j["job_id"] > job["job_id"]]
                assert reconciles and reconciles[-1]["state"] == "succeeded", (job, reconciles)
                counts["reconciles"] += 1
            # Jobs that failed outright did so for a reason libvirt gave, not a crash.
            for job in finals:
                if job["state"] == "failed":
                    assert job["error_code"] in ("operation-invalid", "driver"), job
            behind_s = check_registry_matches_virsh(
                c, names, f"seed {fault_rng.seed_value}, round {round_no} {op}, killed {victim} with {len(busy)} running"
            )
            counts["registry behind virsh"] += behind_s > 0
            print(f"round {round_no} {op}: killed {victim} holding {len(busy)} job(s); {len(lost)} lost; "
                  f"registry agreed with virsh after {behind_s:.1f} s")
            cluster.start_worker(victim, slots=4)
            wait_until(lambda victim=victim: victim in {w["worker_id"] for w in c.workers()}, 30, what=f"{victim} back")

    print(f"worker kill -9: {counts}")
    # Whatever the registry says runs can be destroyed, and then nothing of ours runs.
    running = list(registry_active(c))
    if running:
        assert {j["state"] for j in c.wait([c.submit(n, "destroy")["job_id"] for n in running], 120)} == {"succeeded"}
    assert active_guests(URI) == {}
