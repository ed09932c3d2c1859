"""Security workers on real KVM guests: QEMU runs as an unprivileged user and starts only
because virtbroker labelled its files; labels come off after stop, also after a crash."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import libvirt
import pytest

from tests.kvm.conftest import PREFIX, URI, guest_xml
from tests.waiting import wait_until
from virtbroker.common import domxml

pytestmark = [pytest.mark.kvm, pytest.mark.security]

GUEST_USER = "vbguest"
ORIGINAL_UID, ORIGINAL_GID, ORIGINAL_MODE = 4321, 4322, 0o640




@pytest.fixture
def storage_root():
    """A root QEMU can traverse (0711), under /var/tmp; removed afterwards."""
    root = Path(tempfile.mkdtemp(prefix="vbsec-", dir="/var/tmp"))
    root.chmod(0o711)
    yield root
    shutil.rmtree(root, ignore_errors=True)


def make_image(path: Path, backing: Path | None = None) -> Path:
    cmd = ["qemu-img", "create", "-q", "-f", "qcow2"]
    if backing is not None:
        cmd += ["-b", str(backing), "-F", "qcow2"]
    subprocess.run(cmd + [str(path), "16M"], check=True)
    os.chown(path, ORIGINAL_UID, ORIGINAL_GID)
    path.chmod(ORIGINAL_MODE)
    return path


def owner(path: Path) -> tuple[int, int, int]:
    st = os.stat(path)
    return st.st_uid, st.st_gid, st.st_mode & 0o7777


ORIGINAL = (ORIGINAL_UID, ORIGINAL_GID, ORIGINAL_MODE)


def qemu_uid(name: str) -> int:
    pid = int(Path(f"/run/libvirt/qemu/{name}.pid").read_text())
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise AssertionError("no Uid line")


@pytest.fixture
def secure_cluster(cluster_factory, kvm_guests, guest_user, storage_root):

    def make(drivers=("dac",), label_pause_s=0.0):
        extra = ["--security", ",".join(drivers), "--guest-user", GUEST_USER, "--storage-root", str(storage_root)]
        cluster = cluster_factory(uri=URI, lease_ttl_s=3.0, extra=extra)
        cluster.start_broker()
        for driver in drivers:
            # A pause runs tests/paused_security_worker.py: it is no configuration key.
            cluster.start_security_worker(driver, label_pause_s=label_pause_s)
        cluster.start_worker("sw1", slots=8)
        cluster.wait_workers(1)
        cluster.wait_workers(len(drivers), role="security")
        return cluster

    # kvm_guests destroys the guests through each broker, so their labels come off too.
    return make


def test_unlabelled_disk_cannot_start_as_the_guest_user(kvm_guests, guest_user, storage_root):
    """The control: with libvirt told not to relabel, QEMU as the guest user cannot open the disk."""
    uid, gid = guest_user
    disk = make_image(storage_root / "plain.qcow2")
    xml = domxml.with_static_dac_label(guest_xml("plain", disks=[str(disk)]), uid, gid)
    with pytest.raises(libvirt.libvirtError, match="Permission denied"):
        kvm_guests.createXML(xml, 0)
    assert owner(disk) == ORIGINAL


def test_guests_run_as_guest_user_on_labelled_disks_and_shared_base_is_restored_last(
    secure_cluster, guest_user, storage_root
):
    uid, gid = guest_user
    cluster = secure_cluster(("dac",))
    c = cluster.client()
    base = make_image(storage_root / "base.qcow2")
    overlays = [make_image(storage_root / f"overlay{i}.qcow2", backing=base) for i in range(5)]
    names = [f"{PREFIX}sec{i}" for i in range(5)]
    for name, overlay in zip(names, overlays):
        c.define(guest_xml(name[len(PREFIX):], disks=[str(overlay)]))
    starts = c.wait([c.submit(n, "start")["job_id"] for n in names], 120)
    assert [j["state"] for j in starts] == ["succeeded"] * 5, [j["error"] for j in starts]
    for name, overlay in zip(names, overlays):
        assert qemu_uid(name) == uid  # not root, not libvirt-qemu
        assert owner(overlay)[:2] == (uid, gid)
    assert owner(base)[:2] == (uid, gid)
    # The shared base stays labelled while any of its users runs.
    for name, overlay in zip(names[:4], overlays[:4]):
        assert c.run(name, "destroy", 60)["state"] == "succeeded"
        assert owner(overlay) == ORIGINAL
        assert owner(base)[:2] == (uid, gid)
    assert c.run(names[4], "destroy", 60)["state"] == "succeeded"
    assert owner(overlays[4]) == ORIGINAL
    assert owner(base) == ORIGINAL
    # `stat` agrees with os.stat.
    out = subprocess.run(["stat", "-c", "%u:%g:%a", str(base)], capture_output=True, text=True, check=True).stdout
    assert out.strip() == f"{ORIGINAL_UID}:{ORIGINAL_GID}:640"


def test_disk_outside_roots_and_escaping_symlink_are_refused_untouched(secure_cluster, storage_root):
    cluster = secure_cluster(("dac",))
    c = cluster.client()
    shadow_before = os.stat("/etc/shadow")
    c.define(guest_xml("shadow", disks=["/etc/shadow"]))
    job = c.run(f"{PREFIX}shadow", "start", 60)
    assert job["state"] == "failed" and "outside the storage roots" in job["error"]
    link = storage_root / "escape.img"
    link.symlink_to("/etc/passwd")
    passwd_before = os.stat("/etc/passwd")
    c.define(guest_xml("escape", disks=[str(link)]))
    job = c.run(f"{PREFIX}escape", "start", 60)
    assert job["state"] == "failed" and "outside the storage roots" in job["error"]
    for path, before in (("/etc/shadow", shadow_before), ("/etc/passwd", passwd_before)):
        after = os.stat(path)
        assert (after.st_uid, after.st_gid, after.st_mode, after.st_ctime_ns) == (
            before.st_uid, before.st_gid, before.st_mode, before.st_ctime_ns,
        )
        assert "trusted.virtbroker.dac" not in os.listxattr(path)
    assert c.list() == []


def test_apparmor_profile_follows_the_guest_and_an_injecting_path_is_refused(secure_cluster, guest_user, storage_root):
    uid, gid = guest_user
    cluster = secure_cluster(("dac", "apparmor"))
    c = cluster.client()
    disk = make_image(storage_root / "aa.qcow2")
    record = c.define(guest_xml("aa", disks=[str(disk)]))
    assert c.run(f"{PREFIX}aa", "start", 60)["state"] == "succeeded"
    profile = cluster.state_dir / "security-apparmor" / "profiles" / f"virtbroker-{record['uuid']}"
    text = profile.read_text()
    assert f'"{disk}" rwk,' in text and "/etc/shadow" not in text
    assert owner(disk)[:2] == (uid, gid)
    assert c.run(f"{PREFIX}aa", "destroy", 60)["state"] == "succeeded"
    assert not profile.exists()
    assert owner(disk) == ORIGINAL

    evil = make_image(storage_root / "evil,disk.qcow2")
    c.define(guest_xml("evil", disks=[str(evil)]))
    job = c.run(f"{PREFIX}evil", "start", 60)
    assert job["state"] == "failed" and "apparmor" in job["error"]
    assert owner(evil) == ORIGINAL  # DAC's labels were rolled back when AppArmor refused


def test_security_worker_killed_mid_transaction_leaves_every_file_restored(secure_cluster, storage_root):
    cluster = secure_cluster(("dac",), label_pause_s=1.0)
    c = cluster.client()
    disks = [make_image(storage_root / f"multi{i}.qcow2") for i in range(4)]
    c.define(guest_xml("multi", disks=[str(d) for d in disks]))
    job = c.submit(f"{PREFIX}multi", "start")
    wait_until(lambda: owner(disks[0]) != ORIGINAL, 20, what="labelling began")
    cluster.security["dac"].kill9()
    final = c.wait([job["job_id"]], 60)[0]
    assert final["state"] == "failed"
    # Restarted (without the pause), the worker rolls back the transaction the crash interrupted.
    cluster.start_security_worker("dac")
    cluster.wait_workers(1, role="security")
    wait_until(lambda: all(owner(d) == ORIGINAL for d in disks), 20, interval_s=0.1, what="every file restored")
    assert c.lookup(f"{PREFIX}multi")["state"] == "shutoff"
    # And the domain starts normally afterwards, then gives its labels back.
    assert c.run(f"{PREFIX}multi", "start", 60)["state"] == "succeeded"
    assert c.run(f"{PREFIX}multi", "destroy", 60)["state"] == "succeeded"
    assert [owner(d) for d in disks] == [ORIGINAL] * 4


def test_restarted_security_worker_restores_what_it_labelled_before(secure_cluster, guest_user, storage_root):
    uid, gid = guest_user
    cluster = secure_cluster(("dac", "apparmor"))
    c = cluster.client()
    base = make_image(storage_root / "rbase.qcow2")
    overlays = [make_image(storage_root / f"r{i}.qcow2", backing=base) for i in range(2)]
    for i, overlay in enumerate(overlays):
        c.define(guest_xml(f"restart{i}", disks=[str(overlay)]))
        assert c.run(f"{PREFIX}restart{i}", "start", 60)["state"] == "succeeded"
    for driver in ("dac", "apparmor"):
        cluster.security[driver].kill9()
        cluster.start_security_worker(driver)
    cluster.wait_workers(2, role="security")
    profiles = sorted((cluster.state_dir / "security-apparmor" / "profiles").glob("virtbroker-*"))
    assert len(profiles) == 2
    assert c.run(f"{PREFIX}restart0", "destroy", 60)["state"] == "succeeded"
    assert owner(overlays[0]) == ORIGINAL and owner(base)[:2] == (uid, gid)  # the count survived
    assert c.run(f"{PREFIX}restart1", "destroy", 60)["state"] == "succeeded"
    assert [owner(p) for p in (*overlays, base)] == [ORIGINAL] * 3
    assert not any((cluster.state_dir / "security-apparmor" / "profiles").glob("virtbroker-*"))


@pytest.mark.parametrize("bad", ["fifo", "symlink"])
def test_a_fifo_or_symlink_in_the_backing_chain_fails_the_start_and_a_sound_guest_starts_after(
    secure_cluster, guest_user, storage_root, bad
):
    """Root reads every image header of the chain: a FIFO there would block a label thread
    for ever (and the start with it), a symlink could point anywhere. Both fail the start
    with the reason, well within the wait below, and the worker serves the next start."""
    uid, gid = guest_user
    cluster = secure_cluster(("dac",))
    c = cluster.client()
    base = make_image(storage_root / "base.qcow2")
    if bad == "fifo":
        named = make_image(storage_root / "named.qcow2")
        top = make_image(storage_root / "top.qcow2", backing=named)
        named.unlink()  # a FIFO only now: qemu-img would block opening it
        os.mkfifo(named)
        expected = "FIFO"
    else:
        named = storage_root / "named.qcow2"
        named.symlink_to(base)
        top = make_image(storage_root / "top.qcow2", backing=named)
        expected = "symbolic link"
    c.define(guest_xml("badchain", disks=[str(top)]))
    job = c.run(f"{PREFIX}badchain", "start", 30)
    assert job["state"] == "failed", job
    assert expected in job["error"] and str(named) in job["error"], job["error"]
    assert owner(top) == ORIGINAL and owner(base) == ORIGINAL
    assert c.lookup(f"{PREFIX}badchain")["state"] == "shutoff"

    good = make_image(storage_root / "good.qcow2", backing=base)
    c.define(guest_xml("goodchain", disks=[str(good)]))
    assert c.run(f"{PREFIX}goodchain", "start", 60)["state"] == "succeeded"
    assert qemu_uid(f"{PREFIX}goodchain") == uid
    assert owner(base)[:2] == (uid, gid)
    assert c.run(f"{PREFIX}goodchain", "destroy", 60)["state"] == "succeeded"
    assert owner(good) == ORIGINAL and owner(base) == ORIGINAL
