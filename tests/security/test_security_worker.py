"""The security worker itself: bad backing chains fail a label quickly and the worker keeps
serving; one worker per driver and state dir, in-process and as a real `virtbroker` process."""

import os
import subprocess
import threading
import uuid
from pathlib import Path

import pytest
import zmq

from tests.procs import ROOT
from tests.security.conftest import GUEST_USER, ORIGINAL_GID, ORIGINAL_UID, owner_and_mode
from virtbroker.client.api import Client
from virtbroker.client.templates import minimal_domain_xml
from virtbroker.common import protocol as p
from virtbroker.common.config import Config
from virtbroker.common.errors import ConfigError
from virtbroker.workers.security.service import SecurityWorker

pytestmark = pytest.mark.security

URI = "qemu:///system"
HANDLE_TIMEOUT_S = 10.0


def qcow2(path: Path, backing: Path | None = None) -> Path:
    cmd = ["qemu-img", "create", "-q", "-f", "qcow2"]
    if backing is not None:
        cmd += ["-b", str(backing), "-F", "qcow2"]
    subprocess.run(cmd + [str(path), "1M"], check=True, timeout=60)
    os.chown(path, ORIGINAL_UID, ORIGINAL_GID)
    path.chmod(0o640)
    return path


def label_request(worker: SecurityWorker, action: str, dom: str, disks: list[Path]) -> p.LabelRequest:
    return p.LabelRequest(
        worker_id="test", label_id=uuid.uuid4().hex, host_id=worker.host_id, action=action, domain_uuid=dom,
        domain_name=f"vbt-{dom[:8]}", xml=minimal_domain_xml(f"vbt-{dom[:8]}", "kvm", disks=[str(d) for d in disks]),
        driver="dac",
    )


def handle(worker: SecurityWorker, request: p.LabelRequest) -> p.LabelReply:
    """worker.handle() under a deadline: a label thread that blocks fails the test."""
    replies: list[p.LabelReply] = []
    thread = threading.Thread(target=lambda: replies.append(worker.handle(request)), daemon=True)
    thread.start()
    thread.join(HANDLE_TIMEOUT_S)
    assert not thread.is_alive(), f"{request.action} still running after {HANDLE_TIMEOUT_S} s"
    return replies[0]


@pytest.fixture
def images(tmp_path, guest_ids) -> Path:
    root = tmp_path / "images"
    root.mkdir()
    return root


@pytest.fixture
def config(tmp_path, images) -> Config:
    return Config(
        state_dir=str(tmp_path / "state"), uri=URI, security=["dac"], guest_user=GUEST_USER,
        storage_roots=[str(images)],
    )


@pytest.fixture
def workers(config):
    """Build SecurityWorkers over `config`; each is closed at the end, pass or fail."""
    context = zmq.Context()
    made: list[SecurityWorker] = []

    def make() -> SecurityWorker:
        worker = SecurityWorker(config, context, "dac", worker_id=f"sec-test-{len(made)}")
        made.append(worker)
        return worker

    try:
        yield make
    finally:
        for worker in made:
            for dom in worker.driver.domains():
                worker.driver.restore(dom)
            worker.close()
        context.destroy(linger=0)


@pytest.mark.parametrize("bad", ["fifo", "symlink"])
def test_a_bad_backing_file_fails_the_label_quickly_and_the_worker_serves_on(workers, images, guest_ids, bad):
    worker = workers()
    base = qcow2(images / "base.qcow2")
    if bad == "fifo":
        named = qcow2(images / "fifo.qcow2")
        top = qcow2(images / "top.qcow2", named)
        named.unlink()  # only now: qemu-img would block opening a FIFO itself
        os.mkfifo(named)
        expected = "FIFO"
    else:
        named = images / "link.qcow2"
        named.symlink_to(base)
        top = qcow2(images / "top.qcow2", named)
        expected = "symbolic link"
    bad_dom = str(uuid.uuid4())

    reply = handle(worker, label_request(worker, "label", bad_dom, [top]))

    assert not reply.ok and expected in reply.error and str(named) in reply.error, reply.error
    assert owner_and_mode(str(top)) == (ORIGINAL_UID, ORIGINAL_GID, 0o640)
    assert owner_and_mode(str(base)) == (ORIGINAL_UID, ORIGINAL_GID, 0o640)
    assert worker.driver.labelled(bad_dom) == [] and worker.driver.store.pending("dac") == []

    # The same worker labels and restores a sound chain afterwards.
    good = qcow2(images / "good.qcow2", base)
    dom = str(uuid.uuid4())
    reply = handle(worker, label_request(worker, "label", dom, [good]))
    assert reply.ok, reply.error
    assert sorted(reply.detail["labelled"]) == sorted([str(good), str(base)])
    assert owner_and_mode(str(base))[:2] == guest_ids
    reply = handle(worker, label_request(worker, "restore", dom, []))
    assert reply.ok, reply.error
    assert owner_and_mode(str(good)) == owner_and_mode(str(base)) == (ORIGINAL_UID, ORIGINAL_GID, 0o640)


def test_a_second_worker_on_the_same_state_dir_is_refused_and_the_first_serves_on(workers, images, guest_ids):
    first = workers()
    with pytest.raises(ConfigError) as err:
        workers()
    assert f"pid {os.getpid()}" in err.value.message and "driver.lock" in err.value.message
    image = qcow2(images / "vm.qcow2")
    dom = str(uuid.uuid4())
    assert handle(first, label_request(first, "label", dom, [image])).ok
    assert owner_and_mode(str(image))[:2] == guest_ids
    assert handle(first, label_request(first, "restore", dom, [])).ok


def test_a_second_security_worker_process_exits_with_one_line_naming_the_first(cluster_factory, images, guest_ids):
    extra = ["--security", "dac", "--guest-user", GUEST_USER, "--storage-root", str(images)]
    cluster = cluster_factory(uri=URI, lease_ttl_s=3.0, extra=extra)
    cluster.start_broker()
    first = cluster.start_security_worker("dac")
    cluster.wait_workers(1, role="security")

    second = subprocess.run(
        cluster._argv("security-worker", "--driver", "dac", "--worker-id", "sec-dac-second"),
        capture_output=True, text=True, timeout=60, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )

    assert second.returncode == 2, second.stderr
    lines = [line for line in second.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, second.stderr
    assert lines[0].startswith("virtbroker: error: ") and f"pid {first.pid}" in lines[0], lines[0]
    assert first.alive()
    with Client(cluster.client_url, timeout_s=5) as c:
        assert [w["worker_id"] for w in c.workers() if w["role"] == "security"] == ["sec-dac"]
    assert first.stop() == 0, first.log()
