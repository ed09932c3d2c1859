"""kill -9 of the DAC security worker at random points of a labelling transaction, repeated.

A variant of tests/kvm/test_security_kvm.py's single crash: each round kills the worker
after a random number of a guest's files were chowned (from the first file to the pause
after the last one, just before the transaction commits), restarts it once the broker has
failed the dead worker's requests, and checks that no file of the stopped guest keeps a
label (owner, mode or trusted.virtbroker.dac attribute), that the guest is not running,
and that the registry says so too.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest

from tests.faults.conftest import (
    FAULT_PREFIX,
    active_guests,
    ensure_guest_user,
    fault_guest_xml,
)
from tests.kvm.conftest import URI
from tests.kvm.test_security_kvm import GUEST_USER, ORIGINAL, make_image, owner
from tests.waiting import wait_until

pytestmark = [pytest.mark.kvm, pytest.mark.security]

ROUNDS = 3
DISKS = 4
LABEL_PAUSE_S = 0.3
XATTR = "trusted.virtbroker.dac"


@pytest.fixture
def storage_root():
    """A root QEMU can traverse (0711), under /var/tmp; removed afterwards."""
    root = Path(tempfile.mkdtemp(prefix="vbflt-", dir="/var/tmp"))
    root.chmod(0o711)
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def dac_cluster(cluster_factory, kvm_guests, storage_root):
    ensure_guest_user()
    extra = ["--security", "dac", "--guest-user", GUEST_USER, "--storage-root", str(storage_root)]
    cluster = cluster_factory(uri=URI, lease_ttl_s=3.0, extra=extra)
    cluster.start_broker()
    # Through tests/paused_security_worker.py: the pause is no configuration key.
    cluster.start_security_worker("dac", label_pause_s=LABEL_PAUSE_S)
    cluster.start_worker("sw1", slots=4)
    cluster.wait_workers(1)
    cluster.wait_workers(1, role="security")
    return cluster  # kvm_guests destroys its guests through the broker first, labels and all


def labels_left(disks) -> list[str]:
    left = []
    for d in disks:
        if owner(d) != ORIGINAL:
            left.append(f"{d.name}: owner {owner(d)}")
        if XATTR in os.listxattr(d):
            left.append(f"{d.name}: {XATTR}")
    return left


def test_dac_worker_kill9_at_random_points_of_a_transaction(dac_cluster, storage_root, fault_rng):
    cluster = dac_cluster
    c = cluster.client(timeout_s=30)
    disks = [make_image(storage_root / f"k{i}.qcow2") for i in range(DISKS)]
    name = f"{FAULT_PREFIX}seckill"
    c.define(fault_guest_xml("seckill", disks=[str(d) for d in disks]))
    for round_no in range(ROUNDS):
        # 1..DISKS files chowned, or DISKS + 1: late in the pause after the last file,
        # just before the transaction commits.
        kill_after = fault_rng.randint(1, DISKS + 1)
        job = c.submit(name, "start")
        target = min(kill_after, DISKS)
        wait_until(lambda target=target: sum(owner(d) != ORIGINAL for d in disks) >= target, 30, interval_s=0.01,
                   what=f"{target} file(s) labelled")
        if kill_after > DISKS:
            time.sleep(LABEL_PAUSE_S * 0.9)
        cluster.security["dac"].kill9()
        final = c.wait([job["job_id"]], 60)[0]
        # Restarted only once the broker has failed the dead worker's requests; paused
        # again, so that the next round has a transaction to aim into.
        cluster.start_security_worker("dac", label_pause_s=LABEL_PAUSE_S)
        cluster.wait_workers(1, role="security")
        context = f"seed {fault_rng.seed_value}, round {round_no}, killed after {kill_after} file(s), job {final}"
        if final["state"] == "succeeded":
            # The reply got out before the kill: the guest runs on its labels; stop it.
            assert active_guests(URI) == {name: "running"}, context
            assert c.run(name, "destroy", 60)["state"] == "succeeded", context
        else:
            assert final["state"] == "failed", context
        wait_until(lambda: not labels_left(disks), 20, interval_s=0.1, what=f"labels removed ({context})")
        assert active_guests(URI) == {}, context
        assert c.lookup(name)["state"] == "shutoff", context
        print(f"round {round_no}: killed after {kill_after} file(s): start {final['state']}")
    # The guest still starts afterwards, and gives every label back when it stops.
    assert c.run(name, "start", 60)["state"] == "succeeded"
    assert c.run(name, "destroy", 60)["state"] == "succeeded"
    assert labels_left(disks) == []


def test_dac_worker_restarted_at_once_after_kill9_does_not_strand_the_start(dac_cluster, storage_root):
    """The restarted worker registers under the same worker id before the broker has noticed
    the old one died. Requests routed to the dead process must still fail promptly (the
    new process knows nothing of them), not hang the start until the lifecycle worker's
    120 s label timeout."""
    cluster = dac_cluster
    c = cluster.client(timeout_s=30)
    disks = [make_image(storage_root / f"r{i}.qcow2") for i in range(DISKS)]
    name = f"{FAULT_PREFIX}secrestart"
    c.define(fault_guest_xml("secrestart", disks=[str(d) for d in disks]))
    job = c.submit(name, "start")
    wait_until(lambda: owner(disks[0]) != ORIGINAL, 30, interval_s=0.01, what="labelling began")
    cluster.security["dac"].kill9()
    cluster.start_security_worker("dac", label_pause_s=LABEL_PAUSE_S)
    status = c.wait_status([job["job_id"]], cluster.lease_ttl_s + 10)
    assert not status["timed_out"], f"start still {status['jobs'][0]['state']} {cluster.lease_ttl_s + 10:g} s after the kill"
    final = status["jobs"][0]
    if final["state"] == "succeeded":
        assert c.run(name, "destroy", 60)["state"] == "succeeded"
    wait_until(lambda: not labels_left(disks), 20, interval_s=0.1, what="labels removed")
    assert active_guests(URI) == {}
