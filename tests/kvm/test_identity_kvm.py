"""A security worker cannot choose who QEMU runs as. A test peer with a valid security key
for the host answers a DAC label request with uid 0: the start fails, its labels are
restored, and no QEMU of that guest runs at all, let alone as root (checked with ps). The
same peer answering the host's real guest user lets the next guest start as that user."""

from __future__ import annotations

import grp
import subprocess
import sys

import libvirt
import pytest
import zmq

from tests.fakeworker import FakeWorker
from tests.kvm.conftest import PREFIX, URI, guest_xml
from tests.procs import ROOT
from virtbroker.common import protocol as p
from virtbroker.workers.lifecycle import host_id_for

pytestmark = [pytest.mark.kvm, pytest.mark.security]

GUEST_USER = "vbguest"




def keygen(curve_dir, *args) -> None:
    subprocess.run([sys.executable, "-m", "virtbroker.launcher", "keygen", str(curve_dir), *args], check=True, cwd=str(ROOT),
                   capture_output=True)


def qemu_uids(uuid: str) -> list[int]:
    """The uid of every QEMU process of this guest (its UUID is on QEMU's command line), as
    `ps -eww -o uid,args` shows them (-ww: no line is cut at 80 columns)."""
    out = subprocess.run(["ps", "-eww", "-o", "uid=,args="], capture_output=True, text=True, check=True).stdout
    return [int(line.split(None, 1)[0]) for line in out.splitlines() if "qemu-system" in line and uuid in line]


def test_a_label_reply_cannot_make_qemu_run_as_root(cluster_factory, kvm_guests, guest_user, tmp_path, monkeypatch):
    host = host_id_for(kvm_guests, URI)
    curve = tmp_path / "curve"
    keygen(curve)
    keygen(curve, "--client", "admin")
    keygen(curve, "--worker", "lw", "--role", "lifecycle", "--host", host)
    keygen(curve, "--worker", "fake-dac", "--role", "security", "--host", host)
    monkeypatch.setenv("VIRTBROKER_SERVER_KEY", str(curve / "server.key"))
    monkeypatch.setenv("VIRTBROKER_CLIENT_KEY", str(curve / "keys" / "admin.key_secret"))
    cluster = cluster_factory(uri=URI, lease_ttl_s=3.0, extra=[
        "--curve-dir", str(curve), "--curve-server-key", str(curve / "server.key"),
        "--curve-secret-key", str(curve / "keys" / "lw.key_secret"),
        "--security", "dac", "--guest-user", f"{GUEST_USER}:kvm", "--storage-root", str(tmp_path),
    ])
    cluster.start_broker()
    context = zmq.Context()
    fake = FakeWorker(context, f"ipc://{cluster.state_dir}/worker.sock", "fake-dac",
                      str(curve / "server.key"), str(curve / "keys" / "fake-dac.key_secret"))
    try:
        fake.hello("fake-dac", role="security", host_id=host, drivers=["dac"])
        fake.expect(p.Welcome)
        cluster.start_worker("lw", slots=2)
        cluster.wait_workers(1)
        c = cluster.client(timeout_s=30)

        def start_answering(name: str, uid: int, gid: int) -> tuple[dict, str]:
            uuid = c.define(guest_xml(name))["uuid"]
            job = c.submit(PREFIX + name, "start")
            request = fake.expect(p.LabelRequest, timeout_s=30, action="label")
            assert request.domain_uuid == uuid
            fake.send(p.LabelReply(worker_id="fake-dac", label_id=request.label_id, driver="dac", ok=True,
                                   detail={"uid": uid, "gid": gid, "labelled": []}))
            return job, uuid

        job, uuid = start_answering("rootless", 0, 0)
        # The lifecycle worker refuses the answer and asks for the labels back.
        restore = fake.expect(p.LabelRequest, timeout_s=30, action="restore")
        fake.send(p.LabelReply(worker_id="fake-dac", label_id=restore.label_id, driver="dac", ok=True,
                               detail={"restored": []}))
        failed = c.wait([job["job_id"]], 60)[0]
        assert failed["state"] == "failed" and failed["error_code"] == "security", failed
        assert "0:0" in failed["error"]
        assert qemu_uids(uuid) == []
        assert c.lookup(PREFIX + "rootless")["state"] == "shutoff"
        with pytest.raises(libvirt.libvirtError):
            kvm_guests.lookupByUUIDString(uuid)

        # The same peer, answering with the host's guest user: the guest runs, as that user.
        uid = guest_user[0]
        job, uuid = start_answering("as-guest", uid, grp.getgrnam("kvm").gr_gid)
        started = c.wait([job["job_id"]], 60)[0]
        assert started["state"] == "succeeded", started
        assert qemu_uids(uuid) and set(qemu_uids(uuid)) == {uid}
    finally:
        fake.close()
        context.term()
