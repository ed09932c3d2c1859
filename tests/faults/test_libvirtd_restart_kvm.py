"""libvirtd restarted while lifecycle jobs run on real KVM guests.

Guests keep running across a libvirtd restart; the workers' connections die with it and
their Hypervisor reopens them. After each round every job is final and the registry agrees
with `virsh list` of that libvirtd, at once or after the workers' periodic resync (jobs cut
off by the restart have unknown outcomes; how often the registry was behind is printed).

The daemon restarted here is a private one this test starts (PrivateLibvirtd: the QEMU
session driver of an unprivileged user, real KVM guests), not the host's qemu:///system
daemon, which other suites and benchmarks share and which these tests did not start. It is
signalled by pid only, and always left running until the fixture removes it.
"""

from __future__ import annotations

import signal
import threading
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
from tests.waiting import wait_until

pytestmark = pytest.mark.kvm

GUESTS = 8
ROUNDS = 2  # each round: start all, then destroy all, libvirtd restarted during each


@pytest.fixture
def lvd_cluster(request, cluster_factory, private_libvirtd):
    # Indirect parameter: the workers' resync arguments (the default 15 s when empty).
    extra = getattr(request, "param", RESYNC_ARGS)
    cluster = cluster_factory(uri=private_libvirtd.uri, lease_ttl_s=3.0, extra=extra)
    cluster.start_broker()
    cluster.start_worker("lw1", slots=4)
    cluster.start_worker("lw2", slots=4)
    cluster.wait_workers(2)
    yield cluster, private_libvirtd
    # private_libvirtd's own cleanup destroys whatever is left on it.


def test_libvirtd_restart_while_jobs_run(lvd_cluster, fault_rng):
    cluster, daemon = lvd_cluster
    c = cluster.client(timeout_s=30)
    names = [f"{FAULT_PREFIX}lvd{i}" for i in range(GUESTS)]
    for name in names:
        c.define(fault_guest_xml(name[len(FAULT_PREFIX):]))
    outcomes: dict[str, int] = {}

    for round_no in range(ROUNDS):
        for op in ("start", "destroy"):
            job_ids = [c.submit(n, op)["job_id"] for n in names]
            delay = fault_rng.uniform(0.0, 1.0)
            # The restart runs beside the jobs; whatever happens, libvirtd is started again.
            restarter = threading.Thread(target=lambda delay=delay: (time.sleep(delay), daemon.restart()))
            restarter.start()
            restarter.join(60)
            assert daemon.alive() and daemon.answers()
            finals = c.wait(job_ids, 120)
            for job in finals:
                outcomes[f"{op} {job['state']}"] = outcomes.get(f"{op} {job['state']}", 0) + 1
            settle(c, timeout_s=60)
            context = (f"seed {fault_rng.seed_value}, round {round_no} {op}, restart after {delay:.2f} s; jobs "
                       f"{[(j['domain'], j['state'], j['error']) for j in finals if j['state'] != 'succeeded']}")
            behind_s = converge(lambda: registry_active(c), lambda: active_guests(daemon.uri), context)
            outcomes["registry behind virsh"] = outcomes.get("registry behind virsh", 0) + (behind_s > 0)
            print(f"round {round_no} {op}: libvirtd restarted after {delay:.2f} s; "
                  f"{sum(j['state'] != 'succeeded' for j in finals)} of {len(finals)} jobs did not succeed; "
                  f"registry agreed with virsh after {behind_s:.1f} s")

    print(f"libvirtd restarts: {daemon.restarts}; job outcomes {outcomes}")
    # The workers reconnected: with libvirtd left alone, every start and destroy works.
    stopped = [n for n in names if n not in registry_active(c)]
    if stopped:
        finals = c.wait([c.submit(n, "start")["job_id"] for n in stopped], 60)
        assert [(j["state"], j["error"]) for j in finals] == [("succeeded", None)] * len(finals)
    finals = c.wait([c.submit(n, "destroy")["job_id"] for n in names], 60)
    assert [(j["state"], j["error"]) for j in finals] == [("succeeded", None)] * len(finals)
    wait_until(lambda: active_guests(daemon.uri) == {}, 10, what="no guest left")


@pytest.mark.parametrize("lvd_cluster", [[]], indirect=True, ids=["default-resync"])
def test_first_job_after_an_idle_libvirtd_restart_succeeds(lvd_cluster):
    """No job in flight during the restart, so nothing's outcome is unknown: the next jobs
    must simply work. A libvirt connection does not notice its daemon went away until it
    is used (isAlive() stays true without an event loop), so the worker must reconnect
    when a call fails for that reason rather than fail the job. (With the default 15 s
    resync no resync listing heals the connection first.)"""
    cluster, daemon = lvd_cluster
    c = cluster.client(timeout_s=30)
    names = [f"{FAULT_PREFIX}idle{i}" for i in range(4)]
    for name in names:
        c.define(fault_guest_xml(name[len(FAULT_PREFIX):]))
    # Every worker has used its connection before the restart.
    starts = c.wait([c.submit(n, "start")["job_id"] for n in names], 60)
    assert {j["state"] for j in starts} == {"succeeded"}
    assert len({j["worker_id"] for j in starts}) == 2
    daemon.restart()
    assert active_guests(daemon.uri) == {n: "running" for n in names}  # guests outlive libvirtd
    destroys = c.wait([c.submit(n, "destroy")["job_id"] for n in names], 60)
    assert [(j["state"], j["error"]) for j in destroys] == [("succeeded", None)] * len(names)
    assert active_guests(daemon.uri) == {} and registry_active(c) == {}


@pytest.mark.parametrize("lvd_cluster", [["--resync-interval", "1"]], indirect=True, ids=["resync-1s"])
def test_a_stalled_libvirtd_does_not_stop_the_workers_heartbeats(lvd_cluster):
    """libvirtd frozen (SIGSTOP, by pid) for three lease TTLs while a job waits on it.

    A lease says "this worker is alive and still on the job", not "libvirt is fast": the
    worker's main thread must keep heartbeating while a pool thread waits on libvirt, so
    the job stays running and succeeds once libvirtd answers. If the main thread itself
    calls libvirt (the periodic resync lists the host's guests in the heartbeat path), it
    blocks with it, its leases expire, the job ends 'lost' and the worker is dropped."""
    cluster, daemon = lvd_cluster
    c = cluster.client(timeout_s=30)
    name = f"{FAULT_PREFIX}stall"
    c.define(fault_guest_xml("stall"))
    assert c.run(name, "start", 60)["state"] == "succeeded"
    # No wait for a resync first: the workers list the guests every second, so during the
    # stall below each of them tries several listings, and each blocks on libvirtd.
    daemon.popen.send_signal(signal.SIGSTOP)
    try:
        job = c.submit(name, "suspend")
        time.sleep(3 * cluster.lease_ttl_s)  # the fault's length: three lease TTLs stalled
        during = c.job(job["job_id"])
        workers = {w["worker_id"] for w in c.workers()}
    finally:
        daemon.popen.send_signal(signal.SIGCONT)
    final = c.wait([job["job_id"]], 60)[0]
    assert during["state"] == "running" and workers == {"lw1", "lw2"}, (
        f"while libvirtd was stalled: job {during['state']} ({during['error']}), workers {sorted(workers)}"
    )
    assert final["state"] == "succeeded", final
    assert c.run(name, "destroy", 60)["state"] == "succeeded"


def test_a_job_whose_first_call_meets_a_restarted_libvirtd_reconnects_and_runs(private_libvirtd):
    """The liveness check runs at most once a second per thread, so a libvirtd restart just
    after it leaves a dead connection that looks checked. The job's first call then fails
    writing its request ("Cannot write data"): nothing reached any daemon, so the runner
    reconnects and runs the job again instead of failing it."""
    from types import SimpleNamespace

    from virtbroker.common import protocol as p
    from virtbroker.workers.lifecycle import Hypervisor, JobRunner

    hv = Hypervisor(private_libvirtd.uri)
    hv.ensure_alive()
    private_libvirtd.restart()
    hv._link().checked_at = time.monotonic()  # as if checked a moment before the restart
    job = p.JobAssignment(job_id=1, op="reconcile", lease_id="l-1", epoch=1, lease_ttl_s=10.0,
                          domain_uuid="00000000-0000-4000-8000-0000000000aa", domain_name="absent", xml="")
    result = JobRunner(SimpleNamespace(hv=hv, worker_id="w-test"), sock=None).run(job)
    assert (result.ok, result.domain_state, result.error) == (True, "shutoff", None)
