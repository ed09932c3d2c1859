"""A disk in use by a guest of one host cannot be used by a guest of another.

Two guards stop a second QEMU on a disk: QEMU's own image locks (OFD locks on the file,
seen by every process of one kernel) and libvirt's lockd plugin, whose leases live in an
indirect lockspace on the shared storage (scripts/test-hosts.sh configures it for every
host's session libvirtd). On one machine QEMU's lock always fires first: libvirt takes
lockd's leases only when it resumes the CPUs, after QEMU has opened (and locked) its
disks. So lockd alone is shown with the disk's file replaced under the running guest: the
second host's QEMU then locks a fresh file, as QEMUs on two machines whose storage does
not carry their locks, and only the lease stops it.
"""

from __future__ import annotations

import os

import pytest

from tests.hosts.lab import HOST_DEAD_S, PREFIX, Guest, LabHost, lease_path, make_disk, share_lease
from tests.waiting import wait_until
from virtbroker.client.templates import minimal_domain_xml

pytestmark = [pytest.mark.kvm, pytest.mark.hosts]


def create(host: LabHost, name: str, disk) -> object:
    """`virsh create` a guest on the disk as this host; the finished process."""
    xml = host.write(f"{name}.xml", minimal_domain_xml(PREFIX + name, "kvm", disks=[str(disk)]), 0o644)
    return host.virsh("create", str(xml), check=False)


@pytest.fixture
def two_hosts(lab_hosts):
    for host in lab_hosts:
        host.remove_guests()
    try:
        yield lab_hosts
    finally:
        for host in lab_hosts:
            host.remove_guests()


def test_a_second_qemu_on_a_disk_in_use_does_not_start(two_hosts):
    a, b = two_hosts
    disk = make_disk("lock-same.qcow2")
    try:
        started = create(a, "lock-same-a", disk)
        assert started.returncode == 0, started.stderr
        lease = lease_path(disk)
        assert lease.exists() and lease.stat().st_uid == a.uid, f"host a's virtlockd holds no lease on {disk}"
        refused = create(b, "lock-same-b", disk)
        assert refused.returncode != 0, "a second QEMU started on a disk in use"
        assert 'Failed to get "write" lock' in refused.stderr or "is locked" in refused.stderr, refused.stderr
        assert not b.qemu_pids()

        a.virsh("destroy", PREFIX + "lock-same-a")
        assert not lease.exists(), "the lease is released with the guest"
        again = create(b, "lock-same-b", disk)
        assert again.returncode == 0, f"once free, the disk starts on the other host: {again.stderr}"
    finally:
        disk.unlink()


def test_lockd_refuses_a_disk_whose_lease_another_host_holds(two_hosts):
    a, b = two_hosts
    disk = make_disk("lock-lease.qcow2")
    moved = disk.with_name("lock-lease-moved.qcow2")
    try:
        share_lease(disk)
        started = create(a, "lock-lease-a", disk)
        assert started.returncode == 0, started.stderr
        # Host a's QEMU keeps its (locked) file open; b finds a new, unlocked one at the path.
        os.rename(disk, moved)
        make_disk(disk.name)
        refused = create(b, "lock-lease-b", disk)
        assert refused.returncode != 0, "a guest started on a disk whose lockd lease another host holds"
        assert f"Lockspace resource '{lease_path(disk).name}' is locked" in refused.stderr, refused.stderr
        assert not b.qemu_pids()
        assert a.virsh("domstate", PREFIX + "lock-lease-a").stdout.strip() == "running"
    finally:
        disk.unlink(missing_ok=True)
        moved.unlink(missing_ok=True)


def test_a_wrong_fence_cannot_start_an_ha_guest_twice(lab, watch, fence):
    """The operator says a host is off while its guest still runs: the broker restarts the HA
    guest on the other host, and the disk lock refuses it there."""
    a, b = lab.hosts
    fence.refuse()
    disk = make_disk("wrong-fence.qcow2")
    share_lease(disk)
    c, uuids = lab.bring_up(first=[Guest("wrong-fence", ha=True, disks=(str(disk),))])
    uuid = uuids["wrong-fence"]
    [pid] = a.qemu_pids()

    lab.workers[a.host_id].kill9()
    lab.wait_host_state(c, a, {"unreachable", "fencing"}, HOST_DEAD_S + 10)
    jobs = c.host_action(a.host_id, "fence", confirm_off=True)["jobs"]  # wrong: the guest runs
    assert len(jobs) == 1, jobs
    done = c.wait(jobs, 60)[0]
    assert done["state"] == "failed", f"the HA guest started on {b.host_id} while it ran on {a.host_id}: {done}"
    assert "lock" in done["error"], done
    watch.fresh()
    assert watch.where(uuid) == {a.host_id} and a.qemu_pids() == [pid], "the guest runs on, on host a only"
    # A second QEMU may have existed on b for an instant: started paused (-S), it failed to
    # open its disk and never ran the guest.
    wait_until(lambda: not b.qemu_pids(), 10, what="no QEMU left on host b")
