"""Load: 1,000 random lifecycle jobs from 8 concurrent clients on 50 domains (libvirt's test driver).

Checks, from the job records alone:
- none lost: every acknowledged submission exists and ends final, none 'lost';
- per-domain order: replaying each domain's queue from the jobs' submitted_at and
  dequeue times (started_at, or finished_at for a job refused at its turn) shows every job
  left the queue exactly when it was the head under the broker's rule: priority jobs
  (destroy, reconcile) first in submission order, then the rest in submission order,
  counting only jobs already submitted at that instant; and no job of a domain began
  before the previous one finished;
- outcomes: replaying each domain's state machine in that order predicts every job's
  outcome (succeeded, refused at its turn, or failed on the worker) and the registry's
  final state; libvirt's test driver answered exactly as predicted.
Then a broker restart makes every worker say hello with what its hypervisor really runs,
and the broker's host reconciliation must change nothing.
"""

from __future__ import annotations

import threading
import time

import pytest

from tests.faults.conftest import (
    FAULT_PREFIX,
    active_guests,
    fault_guest_xml,
    registry_active,
    settle,
)
from tests.kvm.conftest import URI
from virtbroker.client.api import Client
from virtbroker.client.templates import minimal_domain_xml
from virtbroker.common.protocol import FINAL_JOB_STATES

CLIENTS = 8
JOBS = 1000
DOMAINS = 50
WORKERS = 3
# Weighted so that most domains spend time running and paused, not only shut off.
OPS = ("start",) * 3 + ("suspend", "resume") * 2 + ("destroy", "reboot", "shutdown")
PRIORITY_OPS = ("destroy", "reconcile")

# libvirt's test driver, op x state -> what happens. "refused": the broker refuses it at its
# turn (operation-invalid, never reaches a worker); "failed": a worker runs it and libvirt
# says no. Measured with libvirt-python on test:///default.
OUTCOME = {
    ("start", "shutoff"): ("succeeded", "running"),
    ("destroy", "running"): ("succeeded", "shutoff"), ("destroy", "paused"): ("succeeded", "shutoff"),
    ("shutdown", "running"): ("succeeded", "shutoff"), ("shutdown", "paused"): ("succeeded", "shutoff"),
    ("reboot", "running"): ("succeeded", "running"), ("reboot", "paused"): ("succeeded", "running"),
    ("suspend", "running"): ("succeeded", "paused"), ("suspend", "paused"): ("failed", "paused"),
    ("resume", "paused"): ("succeeded", "running"),
}


# QEMU guests without an OS (no ACPI): only the ops whose outcome does not depend on a guest
# OS. Suspending a paused QEMU guest reaches the worker; libvirt may accept it or not, and
# either way the guest stays paused. Nothing answers the ACPI request of a running guest's
# shutdown, so it ends in a destroy after run_load's shutdown timeout (0.5 s, not the default 60 s).
KVM_OPS = ("start",) * 3 + ("suspend", "resume") * 2 + ("destroy", "shutdown")
KVM_OUTCOME = {
    ("start", "shutoff"): ("succeeded", "running"),
    ("destroy", "running"): ("succeeded", "shutoff"), ("destroy", "paused"): ("succeeded", "shutoff"),
    # libvirt's QEMU driver refuses to shut down a paused guest ("domain is not running").
    ("shutdown", "running"): ("succeeded", "shutoff"), ("shutdown", "paused"): ("failed", "paused"),
    ("suspend", "running"): ("succeeded", "paused"), ("suspend", "paused"): ("any", "paused"),
    ("resume", "paused"): ("succeeded", "running"),
}


def expected_outcome(op: str, state: str, table=None) -> tuple[str, str]:
    return (table or OUTCOME).get((op, state), ("refused", state))


def dequeue_time(job: dict) -> float:
    return job["started_at"] if job["started_at"] is not None else job["finished_at"]


def check_domain(jobs: list[dict], registry_state: str, table=None) -> list[str]:
    """Replay one domain's queue and state machine; return what disagrees."""
    problems = []
    order = sorted(jobs, key=lambda j: (dequeue_time(j), j["job_id"]))
    taken: set[int] = set()
    state = "shutoff"
    previous_end = None
    for job in order:
        t = dequeue_time(job)
        waiting = [j for j in jobs if j["job_id"] not in taken and j["submitted_at"] <= t]
        head = min(waiting, key=lambda j: (j["op"] not in PRIORITY_OPS, j["job_id"]))
        if head["job_id"] != job["job_id"]:
            problems.append(f"job {job['job_id']} ({job['op']}) left the queue at {t:.6f} before head "
                            f"{head['job_id']} ({head['op']})")
        taken.add(job["job_id"])
        if previous_end is not None and t < previous_end:
            problems.append(f"job {job['job_id']} began at {t:.6f} before the previous job ended at {previous_end:.6f}")
        previous_end = job["finished_at"]
        if job["op"] == "reconcile":
            continue  # not expected under this load; its read changes nothing we track
        outcome, after = expected_outcome(job["op"], state, table)
        got = "refused" if job["started_at"] is None else job["state"]
        if got != outcome and not (outcome == "any" and got in ("succeeded", "failed")):
            problems.append(f"job {job['job_id']} {job['op']} on a {state} domain: {got} "
                            f"({job['error']}), expected {outcome}")
        if job["state"] == "succeeded":
            state = after
    if state != registry_state:
        problems.append(f"registry says {registry_state}, the replay says {state}")
    return problems


def run_load(cluster, rng, names, clients, jobs_total, ops, workers, table, shutdown_timeout_s=0.5):
    """Submit jobs_total random jobs from `clients` threads; half queue up before the workers
    join, half trickle in while jobs run. Returns (jobs by domain, registry, elapsed_s)."""
    c = cluster.client(timeout_s=30)
    plans = [[(rng.choice(names), rng.choice(ops)) for _ in range(jobs_total // clients)] for _ in range(clients)]
    think_s = [[rng.uniform(0, 0.01) for _ in plan] for plan in plans]
    acked: list[list[dict]] = [[] for _ in range(clients)]
    errors: list[BaseException] = []
    half_done = threading.Barrier(clients + 1)

    def client_thread(index: int) -> None:
        try:
            with Client(cluster.client_url, timeout_s=30) as tc:
                for n, (name, op) in enumerate(plans[index]):
                    if n == len(plans[index]) // 2:
                        half_done.wait(60)  # the first half queues up before any worker exists
                    if n >= len(plans[index]) // 2:
                        time.sleep(think_s[index][n])  # the second half trickles in while jobs run
                    timeout_s = shutdown_timeout_s if op == "shutdown" else None
                    acked[index].append(tc.submit(name, op, timeout_s=timeout_s))
        except BaseException as e:
            errors.append(e)
            half_done.abort()

    threads = [threading.Thread(target=client_thread, args=(i,)) for i in range(clients)]
    started = time.monotonic()
    for t in threads:
        t.start()
    # Workers join once the first half waits in deep queues, so destroys really do jump
    # ahead of jobs submitted before them; the second half arrives while jobs run.
    for i in range(workers):
        cluster.start_worker(f"w{i}", slots=4)
    cluster.wait_workers(workers)
    half_done.wait(60)
    for t in threads:
        t.join(120)
    assert not errors, errors
    job_ids = [j["job_id"] for per_client in acked for j in per_client]
    assert len(job_ids) == jobs_total and len(set(job_ids)) == jobs_total
    finals = c.wait(job_ids, 300)
    elapsed_s = time.monotonic() - started
    jobs = settle(c, timeout_s=60)
    # None lost: every acknowledged submission is there and final.
    assert {j["state"] for j in finals} <= set(FINAL_JOB_STATES) - {"lost", "cancelled"}, \
        [j for j in finals if j["state"] in ("lost", "cancelled")]

    registry = {d["name"]: d["state"] for d in c.list(all=True)}
    assert sorted(registry) == sorted(names)
    by_domain: dict[str, list[dict]] = {n: [] for n in names}
    for job in jobs:
        by_domain[job["domain"]].append(job)
    assert sum(len(v) for v in by_domain.values()) == jobs_total, "jobs the clients did not submit (reconciles?)"
    problems = {n: p for n in names if (p := check_domain(by_domain[n], registry[n], table))}
    assert not problems, f"seed {rng.seed_value}: {problems}"
    outcomes: dict[str, int] = {}
    for job in jobs:
        key = "refused" if job["started_at"] is None else job["state"]
        outcomes[key] = outcomes.get(key, 0) + 1
    priority_jumps = sum(
        1 for n in names for j in by_domain[n] if j["op"] == "destroy"
        and any(o["job_id"] < j["job_id"] and dequeue_time(o) > dequeue_time(j) for o in by_domain[n])
    )
    print(f"{jobs_total} jobs from {clients} clients on {len(names)} domains in {elapsed_s:.1f} s: {outcomes}; "
          f"{priority_jumps} destroys ran ahead of earlier jobs")
    assert priority_jumps > 0, "no destroy ever jumped a queue: the ordering rule was not exercised"
    return by_domain, registry, elapsed_s


def test_thousand_jobs_from_eight_clients_keep_per_domain_order(cluster_factory, fault_rng):
    cluster = cluster_factory(lease_ttl_s=5.0)
    cluster.start_broker()
    c = cluster.client(timeout_s=30)
    names = [f"ld{i:02d}" for i in range(DOMAINS)]
    for name in names:
        c.define(minimal_domain_xml(name))
    _, registry, _ = run_load(cluster, fault_rng, names, CLIENTS, JOBS, OPS, WORKERS, OUTCOME)

    # What the hypervisors really run: a restarted broker hears it in every worker's hello.
    cluster.broker.stop()
    cluster.start_broker()
    c2 = cluster.client(timeout_s=30)
    # A worker is listed only once the broker has handled its hello, host reconciliation
    # included, so with every worker listed every hello has been applied.
    cluster.wait_workers(WORKERS)
    assert {d["name"]: d["state"] for d in c2.list(all=True)} == registry


KVM_DOMAINS = 10
KVM_JOBS = 120
KVM_CLIENTS = 4


@pytest.mark.kvm
def test_kvm_jobs_from_four_clients_keep_order_and_match_virsh(cluster_factory, kvm_guests, fault_rng):
    """The same checks on real guests, and the final registry against `virsh list`."""
    cluster = cluster_factory(uri=URI, lease_ttl_s=5.0)
    cluster.start_broker()
    c = cluster.client(timeout_s=30)
    names = [f"{FAULT_PREFIX}ld{i}" for i in range(KVM_DOMAINS)]
    for name in names:
        c.define(fault_guest_xml(name[len(FAULT_PREFIX):]))
    by_domain, registry, _ = run_load(cluster, fault_rng, names, KVM_CLIENTS, KVM_JOBS, KVM_OPS, 3, KVM_OUTCOME)
    # The shutdown timeout given to Client.submit reached the worker: a shutdown that started
    # ended after about 0.5 s, not after the default 60 s.
    shutdowns = [j for jobs in by_domain.values() for j in jobs if j["op"] == "shutdown" and j["started_at"]]
    assert shutdowns, "no shutdown ran: the timeout was not exercised"
    assert max(j["finished_at"] - j["started_at"] for j in shutdowns) < 20, shutdowns
    # No fault here: the registry agrees with the host at once.
    assert {n: s for n, s in registry.items() if s != "shutoff"} == active_guests(URI)
    assert registry_active(c) == active_guests(URI)
