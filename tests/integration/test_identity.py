"""A worker is only who its key says: test peers with valid worker keys, speaking the
documented worker protocol, try to finish, renew or steal another worker's job, register
as another host's security worker, and misuse label routing. A real broker refuses each,
changes nothing, and counts the refusal."""

from __future__ import annotations

import re
import subprocess
import sys
import time
import urllib.request
import uuid as uuidlib

import pytest
import zmq

from tests.fakeworker import FakeWorker
from tests.integration.test_access import free_port
from tests.procs import ROOT
from tests.waiting import wait_until
from virtbroker.client.templates import minimal_domain_xml
from virtbroker.common import protocol as p

HOST_A, HOST_B = "host-a", "host-b"


def keygen(curve_dir, *args) -> None:
    subprocess.run([sys.executable, "-m", "virtbroker.launcher", "keygen", str(curve_dir), *args], check=True, cwd=str(ROOT),
                   capture_output=True)


@pytest.fixture
def keyed(cluster_factory, tmp_path, monkeypatch):
    """A broker with CURVE on its ipc endpoints and no real worker; keys for the test peers."""
    curve = tmp_path / "curve"
    keygen(curve)
    keygen(curve, "--client", "alice")
    keygen(curve, "--worker", "victim", "--role", "lifecycle", "--host", HOST_A)
    keygen(curve, "--worker", "rogue", "--role", "lifecycle", "--host", HOST_B)
    keygen(curve, "--worker", "sec-a", "--role", "security", "--host", HOST_A)
    monkeypatch.setenv("VIRTBROKER_SERVER_KEY", str(curve / "server.key"))
    monkeypatch.setenv("VIRTBROKER_CLIENT_KEY", str(curve / "keys" / "alice.key_secret"))
    port = free_port()
    cluster = cluster_factory(lease_ttl_s=2.0, extra=["--curve-dir", str(curve), "--metrics-port", str(port)])
    cluster.start_broker()
    context = zmq.Context()
    peers: list[FakeWorker] = []

    def peer(key: str, routing_id: str | None = None) -> FakeWorker:
        worker = FakeWorker(context, f"ipc://{cluster.state_dir}/worker.sock", routing_id or key,
                            str(curve / "server.key"), str(curve / "keys" / f"{key}.key_secret"))
        peers.append(worker)
        return worker

    try:
        yield cluster, peer, port
    finally:
        for worker in peers:
            worker.close()
        context.term()


def refused(port: int, kind: str, reason: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    match = re.search(
        rf'^virtbroker_refused_worker_messages_total{{kind="{kind}",reason="{reason}"}} (\S+)$', text, re.M
    )
    return float(match.group(1)) if match else 0.0


def joined(cluster, count: int, role: str = "lifecycle") -> list[dict]:
    return cluster.wait_workers(count, role=role, timeout_s=10)


def start_job(c, victim: FakeWorker, name: str) -> tuple[dict, p.JobAssignment]:
    c.define(minimal_domain_xml(name))
    job = c.submit(name, "start")
    assignment = victim.expect(p.JobAssignment, job_id=job["job_id"])
    return job, assignment


def result(worker_id: str, a: p.JobAssignment, **kw) -> p.Result:
    return p.Result(worker_id=worker_id, job_id=a.job_id, lease_id=a.lease_id, epoch=a.epoch, ok=True,
                    domain_state="running", **kw)


def test_a_peer_cannot_finish_another_workers_job(keyed):
    cluster, peer, port = keyed
    victim, rogue = peer("victim"), peer("rogue")
    victim.hello("victim", slots=8)
    victim.expect(p.Welcome)
    rogue.hello("rogue", host_id=HOST_B, slots=1)
    rogue.expect(p.Welcome)
    c = cluster.client()
    job, assignment = start_job(c, victim, "id-a")
    assert len(assignment.lease_id) == 32 and int(assignment.lease_id, 16) >= 0  # 128 random bits, hex

    # Naming the victim: refused as impersonation, no answer, nothing changes.
    rogue.send(result("victim", assignment))
    # Its own name with the victim's lease (as if it had learned the id): not the lease holder.
    rogue.send(result("rogue", assignment))
    ack = rogue.expect(p.ResultAck, job_id=job["job_id"])
    assert not ack.accepted and "not leased to you" in ack.reason
    wait_until(lambda: refused(port, "result", "impersonation") >= 1, what="impersonation counted")
    assert refused(port, "result", "not-lease-holder") >= 1
    assert c.job(job["job_id"])["state"] == "running"
    assert c.lookup("id-a")["state"] == "shutoff"
    assert not victim.drop(p.ResultAck)  # nothing was sent on the victim's behalf

    # A hello under the victim's id from another key is refused; the id stays the victim's.
    rogue.hello("victim", host_id=HOST_A)
    wait_until(lambda: refused(port, "hello", "impersonation") >= 1, what="hello refused")
    assert {w["worker_id"]: w["host"] for w in c.workers()} == {"victim": HOST_A, "rogue": HOST_B}

    # The holder's own result is accepted.
    victim.send(result("victim", assignment))
    assert victim.expect(p.ResultAck, job_id=job["job_id"]).accepted
    finished = c.wait([job["job_id"]], 10)[0]
    assert finished["state"] == "succeeded" and finished["worker_id"] == "victim"
    assert c.lookup("id-a")["state"] == "running"


def test_a_peer_cannot_renew_or_steal_another_workers_lease(keyed):
    cluster, peer, port = keyed
    victim, rogue = peer("victim"), peer("rogue")
    victim.hello("victim", slots=8)
    victim.expect(p.Welcome)
    rogue.hello("rogue", host_id=HOST_B, slots=1)
    rogue.expect(p.Welcome)
    c = cluster.client()
    job, assignment = start_job(c, victim, "id-b")
    # The victim stays but stops renewing its lease. The rogue renews the victim's lease
    # under both names and claims it in a hello: none of it keeps the lease alive.
    deadline = time.monotonic() + 6
    while time.monotonic() < deadline and c.job(job["job_id"])["state"] == "running":
        victim.send(p.Heartbeat(worker_id="victim", lease_ids=[]))
        rogue.send(p.Heartbeat(worker_id="victim", lease_ids=[assignment.lease_id]))
        rogue.send(p.Heartbeat(worker_id="rogue", lease_ids=[assignment.lease_id]))
        time.sleep(0.2)
    rogue.send(p.Hello(worker_id="rogue", role="lifecycle", host_id=HOST_B, uri="test:///default", slots=1,
                       leases=[{"lease_id": assignment.lease_id, "job_id": assignment.job_id, "epoch": 1}]))
    lost = c.wait([job["job_id"]], 10)[0]
    assert lost["state"] == "lost" and lost["error_code"] == "lease"
    assert refused(port, "heartbeat", "impersonation") >= 1
    # The late holder's result is refused as stale, not credited to anyone.
    victim.send(result("victim", assignment))
    assert not victim.expect(p.ResultAck, job_id=job["job_id"], timeout_s=10).accepted
    assert c.job(job["job_id"])["state"] == "lost"


def test_role_and_host_come_from_the_key(keyed):
    cluster, peer, port = keyed
    c = cluster.client()
    # A lifecycle key cannot register as a security worker, of any host.
    rogue = peer("rogue")
    rogue.hello("rogue-sec", role="security", host_id=HOST_A, drivers=["dac"])
    wait_until(lambda: refused(port, "hello", "wrong-role") >= 1, what="wrong role refused")
    # A security key for host A that says host B is host A's.
    sec = peer("sec-a")
    sec.hello("sec-a", role="security", host_id=HOST_B, drivers=["dac"])
    sec.expect(p.Welcome)
    workers = joined(cluster, 1, role="security")
    assert [(w["worker_id"], w["host"]) for w in workers] == [("sec-a", HOST_A)]
    assert all(w["worker_id"] != "rogue-sec" for w in c.workers())


def test_label_requests_need_the_lease_and_carry_the_brokers_definition(keyed):
    cluster, peer, port = keyed
    victim, rogue, sec = peer("victim"), peer("rogue"), peer("sec-a")
    victim.hello("victim", slots=8)
    rogue.hello("rogue", host_id=HOST_B, slots=1)
    sec.hello("sec-a", role="security", host_id=HOST_A, drivers=["dac"])
    for w in (victim, rogue, sec):
        w.expect(p.Welcome)
    c = cluster.client()
    job, assignment = start_job(c, victim, "id-c")

    def label(worker_id: str, label_id: str, **kw) -> p.LabelRequest:
        fields = dict(worker_id=worker_id, label_id=label_id, host_id=HOST_A, action="label",
                      domain_uuid=assignment.domain_uuid, domain_name="id-c", xml="<domain/>", driver="dac")
        fields.update(kw)
        return p.LabelRequest(**fields)

    # Without the domain's lease: refused and answered by the broker; the security worker sees nothing.
    rogue.send(label("rogue", "L-rogue"))
    reply = rogue.expect(p.LabelReply, label_id="L-rogue")
    assert not reply.ok and reply.worker_id == "broker" and "holds no lease" in reply.error
    # The holder: routed to its own host, with the broker's definition, not the one it sent.
    bogus = minimal_domain_xml("something-else")
    victim.send(label("victim", "L-1", host_id=HOST_B, xml=bogus))
    routed = sec.expect(p.LabelRequest, label_id="L-1")
    assert routed.host_id == HOST_A and routed.xml == c.dumpxml("id-c") and routed.xml != bogus
    assert not sec.drop(p.LabelRequest)  # the rogue's never arrived
    # Only the security worker asked may answer.
    rogue.send(p.LabelReply(worker_id="rogue", label_id="L-1", driver="dac", ok=True, detail={"uid": 0, "gid": 0}))
    wait_until(lambda: refused(port, "label-reply", "not-asked") >= 1, what="foreign label reply refused")
    sec.send(p.LabelReply(worker_id="sec-a", label_id="L-1", driver="dac", ok=True, detail={"uid": 1, "gid": 1}))
    assert victim.expect(p.LabelReply, label_id="L-1").detail == {"uid": 1, "gid": 1}
    # A label id is used once.
    victim.send(label("victim", "L-1"))
    again = victim.expect(p.LabelReply, label_id="L-1")
    assert not again.ok and "used before" in again.error
    assert refused(port, "label", "reused-label-id") >= 1
    assert refused(port, "label", "not-lease-holder") >= 1


def test_without_curve_a_worker_is_the_connection_that_said_hello(cluster_factory):
    cluster = cluster_factory(lease_ttl_s=2.0)
    cluster.start_broker()
    context = zmq.Context()
    url = f"ipc://{cluster.state_dir}/worker.sock"
    victim, rogue = FakeWorker(context, url, "victim"), FakeWorker(context, url, "rogue-conn")
    try:
        victim.hello("victim", slots=8)
        victim.expect(p.Welcome)
        c = cluster.client()
        job, assignment = start_job(c, victim, "id-d")
        rogue.send(result("victim", assignment))  # another connection naming the victim
        rogue.hello("victim")  # and taking its id
        assert not rogue.receive(1.0)  # no welcome, no ack: refused
        assert c.job(job["job_id"])["state"] == "running"
        assert [w["worker_id"] for w in c.workers()] == ["victim"]
        victim.send(result("victim", assignment))
        assert victim.expect(p.ResultAck, job_id=job["job_id"]).accepted
        log = cluster.broker.log()
        assert "refused result from a worker peer" in log and "refused hello from a worker peer" in log
    finally:
        victim.close()
        rogue.close()
        context.term()


def test_an_unknown_worker_is_asked_to_register_and_changes_nothing(cluster_factory):
    cluster = cluster_factory(lease_ttl_s=2.0)
    cluster.start_broker()
    context = zmq.Context()
    stranger = FakeWorker(context, f"ipc://{cluster.state_dir}/worker.sock", "stranger")
    try:
        stranger.send(p.Result(worker_id="stranger", job_id=1, lease_id=uuidlib.uuid4().hex, epoch=1, ok=True))
        stranger.expect(p.Reregister)
        assert cluster.client().workers() == []
    finally:
        stranger.close()
        context.term()
