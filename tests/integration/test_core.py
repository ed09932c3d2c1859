"""The broker and workers as real processes on ipc sockets, on libvirt's embedded test driver."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import threading
import time

import msgpack
import pytest
import zmq

from tests.procs import ROOT, Proc
from tests.waiting import wait_until
from virtbroker.client.api import Client
from virtbroker.client.templates import minimal_domain_xml
from virtbroker.common import protocol as p
from virtbroker.common.errors import ConflictError, InvalidError, NotFoundError, OperationInvalidError


def test_embedded_up_runs_50_guests(tmp_path):
    """`virtbroker up` with no libvirtd: 50 guests through define, start, list, destroy, undefine."""
    up = Proc("up", [sys.executable, "-m", "virtbroker.launcher", "up", "--state-dir", str(tmp_path), "--workers", "4"], tmp_path)
    up.start()
    try:
        with Client(f"ipc://{tmp_path}/client.sock", timeout_s=30) as c:
            wait_until(lambda: _ping_workers(c) >= 4)
            names = [f"g{i:02d}" for i in range(50)]
            for name in names:
                c.define(minimal_domain_xml(name))
            starts = c.wait([c.submit(n, "start")["job_id"] for n in names], 60)
            assert {j["state"] for j in starts} == {"succeeded"}
            running = c.list()
            assert sorted(d["name"] for d in running) == names
            assert len({d["host"] for d in running}) > 1  # spread over the workers' hosts
            destroys = c.wait([c.submit(n, "destroy")["job_id"] for n in names], 60)
            assert {j["state"] for j in destroys} == {"succeeded"}
            assert c.list() == [] and len(c.list(all=True)) == 50
            undefines = c.wait([c.submit(n, "undefine")["job_id"] for n in names], 60)
            assert {j["state"] for j in undefines} == {"succeeded"}
            assert c.list(all=True) == []
    finally:
        code = up.stop(timeout_s=60)
    assert code == 0, up.log()[-3000:]


def _ping_workers(c):
    try:
        return c.ping(timeout_s=1)["workers"]
    except Exception:
        return 0


def test_fifty_concurrent_defines_of_one_name_one_wins(cluster):
    results: list[object] = []
    barrier = threading.Barrier(50)

    def define():
        with Client(cluster.client_url) as c:
            barrier.wait()
            try:
                results.append(c.define(minimal_domain_xml("contested")))
            except ConflictError as e:
                results.append(e)

    threads = [threading.Thread(target=define) for _ in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wins = [r for r in results if isinstance(r, dict)]
    conflicts = [r for r in results if isinstance(r, ConflictError)]
    assert len(wins) == 1 and len(conflicts) == 49
    assert all(wins[0]["uuid"] in str(e) for e in conflicts)
    assert [d["name"] for d in cluster.client().list(all=True)] == ["contested"]


def test_define_rules_and_errors(cluster):
    c = cluster.client()
    uuid = "11111111-2222-3333-4444-555555555555"
    assert c.define(minimal_domain_xml("a", uuid=uuid))["created"]
    again = c.define(minimal_domain_xml("a", uuid=uuid, memory_mib=128))
    assert not again["created"] and again["generation"] == 2
    with pytest.raises(ConflictError):
        c.define(minimal_domain_xml("b", uuid=uuid))
    with pytest.raises(InvalidError):
        c.define("<domain type='test'><name>x</name>")
    with pytest.raises(NotFoundError):
        c.lookup("nope")
    with pytest.raises(InvalidError):
        c.submit("a", "explode")
    assert [d["name"] for d in c.list(all=True)] == ["a"]


def test_lifecycle_verbs_follow_libvirt_state_rules(cluster):
    c = cluster.client()
    c.define(minimal_domain_xml("life"))
    assert c.run("life", "start")["state"] == "succeeded"
    assert c.run("life", "start")["error"].endswith("is already active")
    assert c.run("life", "resume")["state"] == "failed"
    assert c.run("life", "suspend")["state"] == "succeeded"
    assert c.lookup("life")["state"] == "paused"
    assert c.run("life", "resume")["state"] == "succeeded"
    assert c.run("life", "reboot")["state"] == "succeeded"
    assert c.run("life", "undefine")["error"].endswith("destroy it before undefine")
    # Client.submit's timeout_s is the shutdown's ACPI timeout, sent to the broker (which
    # checks it), not how long the client waits for the reply; run()'s is the job's wait.
    with pytest.raises(InvalidError, match="timeout_s"):
        c.submit("life", "shutdown", timeout_s=-1)
    shutdown = c.submit("life", "shutdown", timeout_s=5)
    assert c.wait([shutdown["job_id"]], 30)[0]["state"] == "succeeded"
    assert c.lookup("life")["state"] == "shutoff"
    assert c.run("life", "destroy")["error"].endswith("is not running")
    assert "<name>life</name>" in c.dumpxml("life")
    assert c.run("life", "undefine")["state"] == "succeeded"
    with pytest.raises(NotFoundError):
        c.lookup("life")


def test_queue_order_destroy_priority_cancel_and_idempotency(cluster_factory):
    cluster = cluster_factory()
    cluster.start_broker()  # no worker yet: jobs wait in the broker
    c = cluster.client()
    c.define(minimal_domain_xml("q"))
    start = c.submit("q", "start", idempotency_key="k1")
    assert c.submit("q", "start", idempotency_key="k1")["job_id"] == start["job_id"]
    with pytest.raises(ConflictError):
        c.submit("q", "reboot", idempotency_key="k1")
    reboot = c.submit("q", "reboot")
    suspend = c.submit("q", "suspend")
    destroy = c.submit("q", "destroy")
    # destroy jumped ahead of the queued start: its turn came at once, on a shut-off domain,
    # so it failed without waiting for a worker, while start, reboot and suspend still wait.
    assert c.wait([destroy["job_id"]], 5)[0]["error"].endswith("is not running")
    assert c.lookup("q")["pending_jobs"] == [start["job_id"], reboot["job_id"], suspend["job_id"]]
    assert c.cancel(suspend["job_id"])["state"] == "cancelled"
    with pytest.raises(OperationInvalidError):
        c.cancel(destroy["job_id"])
    cluster.start_worker("w1")
    jobs = {j["job_id"]: j for j in c.wait([start["job_id"], reboot["job_id"]], 30)}
    assert jobs[start["job_id"]]["state"] == "succeeded"
    assert jobs[reboot["job_id"]]["state"] == "succeeded"
    assert jobs[start["job_id"]]["finished_at"] <= jobs[reboot["job_id"]]["started_at"]
    assert c.job(suspend["job_id"])["state"] == "cancelled"
    # On a running domain a destroy goes ahead of jobs queued before it.
    c.submit("q", "suspend")
    c.submit("q", "resume")
    late_destroy = c.submit("q", "destroy")
    finals = c.wait([late_destroy["job_id"]], 30)
    assert finals[0]["state"] == "succeeded"


def test_events_carry_increasing_sequence_numbers(cluster):
    c = cluster.client()
    seen = []

    def listen():
        with Client(cluster.client_url) as sub_client:
            for event in sub_client.events(timeout_s=30):
                seen.append(event)
                if event.KIND == "domain" and event.name == "ev" and event.event == "state" and event.state == "shutoff":
                    return

    t = threading.Thread(target=listen)
    t.start()
    # A SUB socket joins some time after it connects (ZeroMQ's slow joiner): make events
    # until the listener has heard one.
    c.define(minimal_domain_xml("ev-join"))
    ops = itertools.cycle(("start", "destroy"))

    def heard() -> bool:
        if not seen:
            c.run("ev-join", next(ops))
        return bool(seen)

    wait_until(heard, 15, what="the listener joined")
    c.define(minimal_domain_xml("ev"))
    c.run("ev", "start")
    c.run("ev", "destroy")
    t.join(20)
    kinds = [(e.KIND, getattr(e, "event", None) or e.state) for e in seen]
    assert ("domain", "defined") in kinds and ("job", "succeeded") in kinds
    seqs = [e.seq for e in seen]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)


def _subscribe(context: zmq.Context, url: str, topic: bytes = b"") -> zmq.Socket:
    sub = context.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, topic)
    sub.connect(url)
    return sub


def _next_event(sub: zmq.Socket, kind: str, name_or_op: str, timeout_s: float = 5.0) -> p.Message:
    deadline = time.monotonic() + timeout_s
    while sub.poll(max(1, int((deadline - time.monotonic()) * 1000))):
        event = p.decode_event(sub.recv_multipart())
        if event.KIND == kind and name_or_op in (getattr(event, "name", None), getattr(event, "op", None)):
            return event
    raise AssertionError(f"no {kind} event for {name_or_op} within {timeout_s} s")


def _heard(c: Client, sub: zmq.Socket, tag: str) -> None:
    """Make events until the subscriber hears one: it has joined (ZeroMQ's slow joiner)."""
    c.define(minimal_domain_xml(tag))
    for i in range(50):
        c.run(tag, "start" if i % 2 == 0 else "destroy")
        if sub.poll(200):
            while sub.poll(200):  # the rest of what this made
                sub.recv_multipart()
            return
    raise AssertionError("the subscriber never joined")


def _connections(path: str) -> int:
    """Connected UNIX sockets bound to path: the broker's ends of its ipc:// connections there."""
    with open("/proc/net/unix") as f:
        next(f)
        return sum(1 for line in f if line.split()[-1] == path and line.split()[5] == "03")


def test_events_follow_subscribers_as_they_come_and_go(cluster):
    """The broker builds events only for topics someone subscribed to (XPUB): when one of two
    subscribers leaves, the other still hears everything; a subscriber of one topic gets
    only that topic, and the events it does not get still take their sequence numbers."""
    c = cluster.client()
    url = c.ping()["events_url"]
    context = zmq.Context()
    try:
        first, second = _subscribe(context, url), _subscribe(context, url)
        _heard(c, first, "sub-a")
        _heard(c, second, "sub-b")
        events_path = url[len("ipc://"):]
        joined = _connections(events_path)
        first.close()
        # The broker has seen the first subscriber go once it closed its end of that connection.
        wait_until(lambda: _connections(events_path) < joined, 10, what="the broker dropped the first subscriber")
        c.define(minimal_domain_xml("sub-c"))
        assert _next_event(second, "domain", "sub-c").event == "defined"
        second.close()

        jobs_only = _subscribe(context, url, b"job")
        _heard(c, jobs_only, "sub-d")
        c.define(minimal_domain_xml("sub-e"))
        c.run("sub-e", "start")
        c.run("sub-e", "destroy")
        seen = []
        while jobs_only.poll(500):
            seen.append(p.decode_event(jobs_only.recv_multipart()))
        assert {e.KIND for e in seen} == {"job"}
        states = [(e.op, e.state) for e in seen]
        assert states == [("start", "queued"), ("start", "running"), ("start", "succeeded"),
                          ("destroy", "queued"), ("destroy", "running"), ("destroy", "succeeded")]
        # The domain's state change after the start took the number between the two jobs.
        assert seen[3].seq == seen[2].seq + 2
    finally:
        context.destroy(linger=0)


def test_client_close_returns_while_an_events_stream_is_left_open(cluster):
    """A caller that stops reading events() without closing the generator must still be able
    to close its Client: the stream's SUB socket must not keep the context open."""
    closed = threading.Event()

    def read_one_then_close():
        c = Client(cluster.client_url)
        stream = c.events(timeout_s=10)
        next(stream)  # the SUB socket now exists and stays open: the generator is suspended
        c.close()
        closed.set()
        del stream

    t = threading.Thread(target=read_one_then_close, daemon=True)  # daemon: a hang must not block exit
    t.start()
    definer = cluster.client()
    for i in range(50):  # keep making events until the stream has joined and read one
        definer.define(minimal_domain_xml(f"ev-close-{i}"))
        if closed.wait(0.3):
            break
    assert closed.wait(5), "Client.close() hung on the open events socket"


def test_broker_kill9_loses_no_acknowledged_define_or_job(cluster_factory):
    cluster = cluster_factory()
    cluster.start_broker()
    c = cluster.client()
    acked = []
    for i in range(200):
        acked.append(c.define(minimal_domain_xml(f"d{i:03d}"))["uuid"])
    jobs = [c.submit(f"d{i:03d}", "start")["job_id"] for i in range(10)]
    jobs += [job["job_id"] for job in c.submit_many([(f"d{i:03d}", "start") for i in range(10, 20)])]
    cluster.broker.kill9()
    cluster.start_broker()
    c2 = cluster.client()
    assert sorted(d["uuid"] for d in c2.list(all=True)) == sorted(acked)
    assert [c2.job(j)["state"] for j in jobs] == ["queued"] * 20
    cluster.start_worker("w1")
    finals = c2.wait(jobs, 30)
    assert {j["state"] for j in finals} == {"succeeded"}
    c2.wait([c2.submit(f"d{i:03d}", "destroy")["job_id"] for i in range(20)], 30)


def test_only_the_newest_final_jobs_are_kept_and_ids_are_never_reused(cluster_factory):
    cluster = cluster_factory(extra=["--job-history", "5"])
    cluster.start_broker()
    c = cluster.client()
    c.define(minimal_domain_xml("hist"))
    # With no worker, a destroy of a shut-off domain fails when its turn comes: final at once.
    ids = [c.submit("hist", "destroy", idempotency_key=f"k{i}")["job_id"] for i in range(12)]
    c.wait(ids[-1:], 10)
    wait_until(lambda: [j["job_id"] for j in c.jobs("hist")] == ids[-5:])
    with pytest.raises(NotFoundError):
        c.job(ids[0])
    # A forgotten job's idempotency key makes a new job; a kept one still answers with its job.
    assert c.submit("hist", "destroy", idempotency_key="k0")["job_id"] > ids[-1]
    assert c.submit("hist", "destroy", idempotency_key="k11")["job_id"] == ids[-1]
    kept = [j["job_id"] for j in c.jobs("hist")]
    assert len(kept) == 5
    # The rows went from disk too, and the next id stays above every id ever given.
    cluster.broker.kill9()
    cluster.start_broker()
    c2 = cluster.client()
    assert [j["job_id"] for j in c2.jobs("hist")] == kept
    assert c2.submit("hist", "destroy")["job_id"] > max(kept)


def test_a_pruned_highest_job_id_is_not_given_again_after_a_restart(cluster_factory):
    cluster = cluster_factory(extra=["--job-history", "1"])
    cluster.start_broker()
    c = cluster.client()
    c.define(minimal_domain_xml("hist1"))
    start = c.submit("hist1", "start")["job_id"]  # no worker: stays queued
    destroy = c.submit("hist1", "destroy")["job_id"]  # goes ahead of the start, fails at once
    assert c.wait([destroy], 10)[0]["state"] == "failed"
    c.cancel(start)  # now the newest final job; the destroy, with the higher id, is forgotten
    wait_until(lambda: [j["job_id"] for j in c.jobs("hist1")] == [start])
    cluster.broker.kill9()
    cluster.start_broker()
    assert cluster.client().submit("hist1", "start")["job_id"] > destroy


def test_broker_kill9_while_jobs_run_then_workers_rejoin(cluster):
    c = cluster.client()
    for i in range(10):
        c.define(minimal_domain_xml(f"r{i}"))
    jobs = [c.submit(f"r{i}", "start")["job_id"] for i in range(10)]
    c.wait(jobs, 30)
    cluster.broker.kill9()
    cluster.start_broker()
    c2 = cluster.client()
    assert {d["state"] for d in c2.list(all=True)} == {"running"}
    cluster.wait_workers(1)  # the worker re-registered by itself
    finals = c2.wait([c2.submit(f"r{i}", "destroy")["job_id"] for i in range(10)], 30)
    assert {j["state"] for j in finals} == {"succeeded"}


class FakeWorker:
    """A worker speaking the wire protocol by hand, to send what a real one would not."""

    def __init__(self, url: str, worker_id: str, host_id: str):
        self.context = zmq.Context()
        self.sock = self.context.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.IDENTITY, worker_id.encode())
        self.sock.connect(url)
        self.worker_id = worker_id
        self.host_id = host_id

    def send(self, msg: p.Message) -> None:
        self.sock.send_multipart(p.encode(msg))

    def beat(self) -> None:
        """Stay alive without renewing any lease: a worker that lost track of its job."""
        self.send(p.Heartbeat(worker_id=self.worker_id, lease_ids=[]))

    def recv(self, kind: type[p.Message], timeout_s: float = 10.0) -> p.Message:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.beat()
            if self.sock.poll(100):
                for msg in p.unbatch(p.decode(self.sock.recv_multipart(), p.WORKER_VERSION)):
                    if isinstance(msg, kind):
                        return msg
        raise AssertionError(f"no {kind.KIND} within {timeout_s} s")

    def close(self):
        self.sock.close(0)
        self.context.term()


def test_result_with_stale_epoch_is_refused(cluster_factory):
    cluster = cluster_factory(lease_ttl_s=1.0)
    cluster.start_broker()
    c = cluster.client()
    c.define(minimal_domain_xml("stale"))
    fake = FakeWorker(f"ipc://{cluster.state_dir}/worker.sock", "fake-1", "fakehost")
    try:
        fake.send(p.Hello(worker_id="fake-1", role="lifecycle", host_id="fakehost", uri="test:///default", slots=1))
        fake.recv(p.Welcome)
        job = c.submit("stale", "start")
        assignment = fake.recv(p.JobAssignment)
        assert assignment.job_id == job["job_id"] and assignment.epoch == 1
        # No heartbeat: the lease expires, the job ends lost and a reconcile job (epoch 2) follows.
        wait_until(lambda: fake.beat() or c.job(job["job_id"])["state"] == "lost", timeout_s=5)
        reconcile = fake.recv(p.JobAssignment)
        assert reconcile.op == "reconcile" and reconcile.epoch == 2
        # The late result of the first lease is refused and changes nothing.
        fake.send(p.Result(worker_id="fake-1", job_id=job["job_id"], lease_id=assignment.lease_id,
                           epoch=assignment.epoch, ok=True, domain_state="running"))
        ack = fake.recv(p.ResultAck)
        assert not ack.accepted and ack.job_id == job["job_id"]
        # A result naming the current lease but an old epoch is refused too.
        fake.send(p.Result(worker_id="fake-1", job_id=reconcile.job_id, lease_id=reconcile.lease_id,
                           epoch=1, ok=True, domain_state="running"))
        ack = fake.recv(p.ResultAck)
        assert not ack.accepted and "stale epoch" in ack.reason
        assert c.job(job["job_id"])["state"] == "lost"
        assert c.lookup("stale")["state"] == "shutoff"
        # The current lease and epoch are accepted.
        fake.send(p.Result(worker_id="fake-1", job_id=reconcile.job_id, lease_id=reconcile.lease_id,
                           epoch=reconcile.epoch, ok=True, domain_state="shutoff"))
        assert fake.recv(p.ResultAck).accepted
        assert "refused result" in cluster.broker.log()
    finally:
        fake.close()


def test_bad_frames_get_an_error_and_the_broker_keeps_serving(cluster):
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(cluster.client_url)
    # A batch with one bad item (or none) is refused whole: its good define must not run.
    good = p.encode(p.Define(request_id=1, xml=minimal_domain_xml("never")))[2]
    bad_batches = ([["define", good], ["define", b"\xc1"]], [["define", good], ["batch", good]], [])
    try:
        for frames in (
            [b"VBC1", b"define", b"\xc1"], [b"junk"], [b"VBC1", b"nope", msgpack.packb({})],
            *([p.CLIENT_VERSION, b"batch", msgpack.packb({"messages": items}, use_bin_type=True)] for items in bad_batches),
        ):
            sock.send_multipart(frames)
            assert sock.poll(5000)
            reply = p.decode(sock.recv_multipart(), p.CLIENT_VERSION)
            assert isinstance(reply, p.Error) and reply.code == "protocol" and reply.request_id is None
    finally:
        sock.close(0)
        ctx.term()
    assert cluster.client().ping()["domains"] == 0


def test_a_client_batch_runs_each_request_as_if_alone_and_answers_in_order(cluster):
    c = cluster.client()
    defined = c.call_many([p.Define(request_id=0, xml=minimal_domain_xml(f"b{i}")) for i in range(3)])
    assert [d["name"] for d in defined] == ["b0", "b1", "b2"]
    results = c.call_many([
        p.Submit(request_id=0, domain="b0", op="start"),
        p.Submit(request_id=0, domain="ghost", op="start"),
        p.Lookup(request_id=0, domain="b1"),
        p.Wait(request_id=0, job_ids=[1], timeout_s=1),
        p.Submit(request_id=0, domain="b1", op="start"),
        p.Submit(request_id=0, domain="b2", op="resume"),  # refused when its turn comes: not running
    ])
    assert results[0]["domain"] == "b0" and results[4]["domain"] == "b1" and results[5]["domain"] == "b2"
    assert isinstance(results[1], NotFoundError) and "ghost" in str(results[1])
    assert results[2]["name"] == "b1" and results[2]["state"] == "shutoff"
    assert isinstance(results[3], InvalidError) and "batch" in str(results[3])
    finals = c.wait([results[i]["job_id"] for i in (0, 4, 5)], 30)
    assert [j["state"] for j in finals] == ["succeeded", "succeeded", "failed"]
    jobs = c.submit_many([("b0", "destroy"), ("b1", "destroy")])
    assert [j["state"] for j in c.wait([j["job_id"] for j in jobs], 30)] == ["succeeded"] * 2
    # More than one batch holds: the client splits at BATCH_MAX_ITEMS and puts the answers back in order.
    names = [f"b{i % 3}" for i in range(p.BATCH_MAX_ITEMS + 200)]
    assert [d["name"] for d in c.call_many([p.Lookup(request_id=0, domain=n) for n in names])] == names


def vbctl(cluster, *args, check=True, connect=True):
    """vbctl on the cluster's ZeroMQ client endpoint, or (connect=False) on its default: the
    local endpoint of the state dir named by $VIRTBROKER_STATE_DIR."""
    env = dict(os.environ, VIRTBROKER_STATE_DIR=str(cluster.state_dir))
    env.pop("VIRTBROKER_URL", None)
    proc = subprocess.run(
        [sys.executable, "-m", "virtbroker.client.vbctl", *(["--connect", cluster.client_url] if connect else []), *args],
        capture_output=True, text=True, cwd=str(ROOT), timeout=60, env=env,
    )
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def test_vbctl_verbs(cluster, tmp_path):
    xml = tmp_path / "cli.xml"
    xml.write_text(minimal_domain_xml("cli"))
    assert "defined" in vbctl(cluster, "define", str(xml)).stdout
    assert "started" in vbctl(cluster, "start", "cli").stdout
    listing = json.loads(vbctl(cluster, "list", "--all", "--json").stdout)
    assert [(d["name"], d["state"]) for d in listing] == [("cli", "running")]
    assert {"name", "uuid", "state", "host"} <= set(listing[0])
    job_id = int(vbctl(cluster, "destroy", "--no-wait", "cli").stdout.strip())
    assert vbctl(cluster, "wait", str(job_id), "--json").returncode == 0
    assert "shut off" in vbctl(cluster, "dominfo", listing[0]["uuid"]).stdout
    failed = vbctl(cluster, "destroy", "cli", check=False)
    assert failed.returncode == 1
    assert failed.stderr.strip().count("\n") == 0 and "is not running" in failed.stderr
    missing = vbctl(cluster, "dominfo", "ghost", check=False)
    assert missing.returncode == 1 and "Traceback" not in missing.stderr and "ghost" in missing.stderr
    both = vbctl(cluster, "start", "cli", "ghost", check=False)
    assert both.returncode == 1 and "Domain 'cli' started" in both.stdout
    assert both.stderr.strip().count("\n") == 0 and "Failed to start domain 'ghost'" in both.stderr
    vbctl(cluster, "destroy", "cli")
    assert "lifecycle" in vbctl(cluster, "workers").stdout
    top = vbctl(cluster, "top", "--once").stdout
    assert "w1" in top and "domains 1 " in top and "workers 1 on 1 host(s)" in top
    vbctl(cluster, "undefine", "cli")


def test_vbctl_finds_the_broker_by_its_state_dir(cluster, tmp_path):
    """With no --connect and no $VIRTBROKER_URL, vbctl uses the local endpoint in the state dir."""
    xml = tmp_path / "near.xml"
    xml.write_text(minimal_domain_xml("near"))
    assert "defined" in vbctl(cluster, "define", str(xml), connect=False).stdout
    assert "started" in vbctl(cluster, "start", "near", connect=False).stdout
    assert cluster.client().lookup("near")["state"] == "running"  # the same broker over ZeroMQ
    assert f"unix://{cluster.state_dir}/local.sock" in vbctl(cluster, "--help", connect=False).stdout
    vbctl(cluster, "destroy", "near", connect=False)
    env = dict(os.environ, VIRTBROKER_STATE_DIR=str(tmp_path / "none"))
    env.pop("VIRTBROKER_URL", None)
    elsewhere = subprocess.run(
        [sys.executable, "-m", "virtbroker.client.vbctl", "list"], capture_output=True, text=True, cwd=str(ROOT), timeout=60, env=env,
    )
    assert elsewhere.returncode == 1 and "cannot connect to the broker at unix://" in elsewhere.stderr
    assert "Traceback" not in elsewhere.stderr


def test_embedded_host_dies_with_its_worker_and_its_domains_start_elsewhere(cluster_factory):
    cluster = cluster_factory(lease_ttl_s=1.0)
    cluster.start_broker()
    cluster.start_worker("w1")
    cluster.wait_workers(1)
    c = cluster.client()
    c.define(minimal_domain_xml("orphan"))
    assert c.run("orphan", "start")["worker_id"] == "w1"
    cluster.start_worker("w2")
    cluster.wait_workers(2)
    cluster.workers["w1"].kill9()
    # The test hypervisor lived inside w1: once w1 is declared gone, the guest is gone too.
    wait_until(lambda: c.lookup("orphan")["state"] == "shutoff", timeout_s=10)
    again = c.run("orphan", "start")
    assert again["state"] == "succeeded" and again["worker_id"] == "w2"
    c.run("orphan", "destroy")


def test_children_of_up_stop_when_up_is_killed(tmp_path):
    up = Proc("up", [sys.executable, "-m", "virtbroker.launcher", "up", "--state-dir", str(tmp_path), "--workers", "2"], tmp_path)
    up.start()
    try:
        with Client(f"ipc://{tmp_path}/client.sock", timeout_s=30) as c:
            wait_until(lambda: _ping_workers(c) >= 2)
        children = subprocess.run(["pgrep", "-P", str(up.pid)], capture_output=True, text=True).stdout.split()
        assert len(children) >= 3  # broker, two workers (and the logging queue's helper, if any)
    finally:
        up.kill9()
    wait_until(lambda: not any(os.path.exists(f"/proc/{pid}") and "zombie" not in open(f"/proc/{pid}/status").read()
                                for pid in children), timeout_s=30)
