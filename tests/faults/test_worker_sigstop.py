"""A lifecycle worker frozen with SIGSTOP past its leases, then SIGCONT.

The frozen worker still holds job assignments; when it wakes it runs them and reports.
Those late results must be refused (the lease is gone and the domain's epoch moved on), the
jobs stay 'lost', and reconcile jobs and the woken worker's resync bring the registry back to
where the hypervisor is. (On test:///default the broker takes a worker that stops
heartbeating for a dead one and marks its guests shut off; the woken worker's reports
correct that once RESYNC_QUIET_S has passed. How often that was needed is printed.)
"""

from __future__ import annotations

import re
import signal
import time

from tests.faults.conftest import RESYNC_ARGS, converge, settle
from tests.waiting import wait_until
from virtbroker.client.templates import minimal_domain_xml

DOMAINS = 8
ROUNDS = 3
LEASE_TTL_S = 1.5

# The state each op leaves on libvirt's test driver, from the state it finds; None: the
# broker refuses it before it reaches a worker. suspend of a paused guest reaches the
# worker (the broker only refuses it on a shut-off domain) and fails there.
EFFECT = {
    ("start", "shutoff"): "running",
    ("destroy", "running"): "shutoff", ("destroy", "paused"): "shutoff",
    ("reboot", "running"): "running", ("reboot", "paused"): "running",
    ("suspend", "running"): "paused",
    ("resume", "paused"): "running",
}


def valid_op(rng, state: str) -> str:
    return rng.choice([op for (op, before) in EFFECT if before == state])


def test_sigstop_worker_past_its_lease_late_results_refused(cluster_factory, fault_rng):
    cluster = cluster_factory(lease_ttl_s=LEASE_TTL_S, extra=RESYNC_ARGS)
    cluster.start_broker()
    workers = ["w1", "w2"]
    for w in workers:
        cluster.start_worker(w, slots=4)
    cluster.wait_workers(2)
    c = cluster.client()
    names = [f"frz{i}" for i in range(DOMAINS)]
    for name in names:
        c.define(minimal_domain_xml(name))
    expected = {name: "shutoff" for name in names}
    total_lost = 0
    behind_rounds = 0

    for round_no in range(ROUNDS):
        victim = fault_rng.choice(workers)
        victim_host = {w["worker_id"]: w["host"] for w in c.workers()}[victim]
        on_victim_host = {d["name"] for d in c.list(all=True) if d["host"] == victim_host}
        proc = cluster.workers[victim]
        proc.signal(signal.SIGSTOP)
        try:
            # Submitted at once, while the broker still counts the frozen worker as alive:
            # some of these land on it and wait in its socket.
            submitted = {}
            for name in fault_rng.sample(names, fault_rng.randint(DOMAINS // 2, DOMAINS)):
                op = valid_op(fault_rng, expected[name])
                submitted[name] = (op, c.submit(name, op)["job_id"])
            # Stay frozen until every job handed to the victim is lost, and a random while longer.
            wait_until(
                lambda submitted=submitted, victim=victim: all(
                    c.job(job_id)["state"] == "lost"
                    for _, job_id in submitted.values()
                    if c.job(job_id)["worker_id"] == victim
                ),
                timeout_s=LEASE_TTL_S * 10,
                what="jobs of the frozen worker lost",
            )
            time.sleep(fault_rng.uniform(0, LEASE_TTL_S))
        finally:
            proc.signal(signal.SIGCONT)
        jobs = {j["job_id"]: j for j in settle(c, timeout_s=60)}
        log = cluster.broker.log()
        lost_here = 0
        for name, (op, job_id) in submitted.items():
            job = jobs[job_id]
            if job["worker_id"] == victim and job["state"] == "lost":
                lost_here += 1
                # The late result came and was refused ...
                wait_until(
                    lambda pattern=rf"refused result from worker {victim} for job {job_id}:": re.search(
                        pattern, cluster.broker.log()),
                    timeout_s=10,
                    what=f"refusal of job {job_id}'s late result",
                )
                # ... the job stays lost, and a later reconcile read the guest back.
                assert jobs[job_id]["state"] == "lost"
                reconciles = [j for j in jobs.values() if j["op"] == "reconcile" and j["domain"] == name
                              and j["job_id"] > job_id]
                assert reconciles and all(r["state"] == "succeeded" for r in reconciles), (job, reconciles)
            elif job["state"] == "failed":
                # A guest of the frozen worker's embedded host, whose job waited in the queue:
                # the broker took the silent worker for dead, marked its guests shut off, and
                # refused the job at its turn. It never ran, so the guest is as it was.
                assert name in on_victim_host and job["error_code"] == "operation-invalid", (
                    f"seed {fault_rng.seed_value}", job)
                continue
            else:
                assert job["state"] == "succeeded", (f"seed {fault_rng.seed_value}", job)
            # A lost op really ran on the woken worker, so either way its effect is the truth.
            expected[name] = EFFECT[(op, expected[name])]
        total_lost += lost_here
        jobs = {j["job_id"]: j for j in settle(c, timeout_s=60)}  # reconciles queued by late refusals
        behind_s = converge(lambda: {d["name"]: d["state"] for d in c.list(all=True)}, lambda: expected,
                            f"seed {fault_rng.seed_value}, round {round_no}")
        behind_rounds += behind_s > 0
        print(f"round {round_no}: froze {victim}, {len(submitted)} jobs, {lost_here} lost and refused late; "
              f"registry agreed with the hypervisors after {behind_s:.1f} s")
        assert "refused result" in log or lost_here == 0
        cluster.wait_workers(2)  # the woken worker registered again

    assert total_lost > 0, f"seed {fault_rng.seed_value}: no job ever landed on a frozen worker"
    print(f"{ROUNDS} freezes, {total_lost} late results refused, registry behind in {behind_rounds} round(s)")
    # Both workers still run jobs afterwards.
    running = [n for n, s in expected.items() if s != "shutoff"]
    if running:
        finals = c.wait([c.submit(n, "destroy")["job_id"] for n in running], 30)
        assert {j["state"] for j in finals} == {"succeeded"}
