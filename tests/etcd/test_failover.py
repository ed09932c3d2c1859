"""Broker failover on a real 3-member etcd cluster: two broker processes (one leads, one
stands by), a lifecycle worker and clients that follow the leader; real kill -9, SIGSTOP
and etcd members killed or stopped."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
import time
import uuid as uuidlib
from pathlib import Path

import pytest
import zmq

from tests.procs import Cluster, Proc
from tests.waiting import wait_until
from virtbroker import Client
from virtbroker.client.templates import minimal_domain_xml
from virtbroker.common import protocol as p
from virtbroker.common.errors import NotFoundError, UnavailableError, VirtbrokerError


class HaCluster:
    """Brokers sharing one etcd store, each with its own state dir (and sockets)."""

    def __init__(self, base: Path, etcd, brokers: int = 2):
        self.etcd = etcd
        self.store = "etcd://" + ",".join(etcd.endpoints)
        self.prefix = f"/vbt-{uuidlib.uuid4().hex[:8]}/"
        self.nodes = [Cluster(base / f"b{i}", lease_ttl_s=3.0, extra=[
            "--store", self.store, "--etcd-prefix", self.prefix, "--leader-ttl", "2",
        ]) for i in range(brokers)]
        for node in self.nodes:
            node.state_dir.mkdir(parents=True, exist_ok=True)
        self.client_urls = ",".join(n.client_url for n in self.nodes)
        self.worker_urls = ",".join(f"ipc://{n.state_dir}/worker.sock" for n in self.nodes)
        self.workers: list[Proc] = []

    def start(self) -> None:
        for node in self.nodes:
            node.broker = Proc("broker", node._argv("broker"), node.state_dir).start()
        wait_until(lambda: self.leader() is not None, timeout_s=20, what="a broker leads")

    def status(self, node: Cluster) -> dict | None:
        try:
            with Client(node.client_url, timeout_s=1.0) as c:
                return c.ping()
        except VirtbrokerError:
            return None

    def leader(self) -> Cluster | None:
        leading = [n for n in self.nodes if n.broker.alive() and (self.status(n) or {}).get("role") == "leader"]
        return leading[0] if len(leading) == 1 else None

    def start_worker(self, worker_id: str) -> Proc:
        node = self.nodes[0]
        argv = node._argv("worker", "--worker-id", worker_id, "--slots", "8", "--worker-url", self.worker_urls,
                          "--log-level", "DEBUG")
        proc = Proc(worker_id, argv, node.state_dir).start()
        self.workers.append(proc)
        return proc

    def client(self, timeout_s: float = 30.0) -> Client:
        return Client(self.client_urls, timeout_s=timeout_s)

    def stop(self) -> None:
        for proc in self.workers:
            proc.stop()
        for node in self.nodes:
            if node.broker is not None:
                node.broker.popen.send_signal(signal.SIGCONT) if node.broker.alive() else None
                node.broker.stop()


@pytest.fixture
def ha(tmp_path, etcd_cluster):
    cluster = HaCluster(tmp_path, etcd_cluster)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def raw_request(url: str, msg: p.Message, timeout_s: float = 10.0) -> p.Message:
    """One request to one broker, and its own answer (the Client would follow the leader)."""
    with zmq.Context() as context, context.socket(zmq.DEALER) as raw:
        raw.setsockopt(zmq.LINGER, 0)
        raw.connect(url)
        raw.send_multipart(p.encode(msg))
        assert raw.poll(int(timeout_s * 1000)), f"no answer from {url}"
        return p.decode(raw.recv_multipart(), p.CLIENT_VERSION)


def wait_workers(c: Client, count: int, timeout_s: float = 30.0) -> None:
    wait_until(lambda: len([w for w in c.workers() if w["role"] == "lifecycle"]) >= count, timeout_s=timeout_s,
               what=f"{count} workers on the leader")


def test_a_standby_answers_not_leader_and_names_the_leader(ha):
    leader = ha.leader()
    standby = next(n for n in ha.nodes if n is not leader)
    assert ha.status(standby)["role"] == "standby"
    assert ha.status(standby)["leader"]["client_url"] == leader.client_url
    # The standby's own answer, as any client gets it: not-leader, naming the leader.
    reply = raw_request(standby.client_url, p.Lookup(request_id=7, domain="x"))
    assert isinstance(reply, p.Error) and reply.code == "not-leader" and reply.leader == leader.client_url
    # A client given only the standby follows the leader it names.
    with Client(standby.client_url, timeout_s=5) as c:
        with pytest.raises(NotFoundError):
            c.lookup("x")
        assert c.url == leader.client_url
    with ha.client() as c:  # the list: follows the leader by itself
        assert c.define(minimal_domain_xml("ha-first"))["created"]
    # vbctl brokers: one line a broker, the leader with its token and the store's revision.
    done = subprocess.run([sys.executable, "-m", "virtbroker.client.vbctl", "--connect", ha.client_urls, "brokers"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    lines = {line.split()[0]: line.split() for line in done.stdout.splitlines()[1:] if line.strip()}
    assert lines[leader.client_url][1] == "leader" and lines[standby.client_url][1] == "standby"
    assert int(lines[leader.client_url][2]) == ha.status(leader)["token"]
    assert lines[leader.client_url][3] == ha.store and int(lines[leader.client_url][4]) > 0


def test_kill9_of_the_leader_under_load_loses_nothing_acknowledged_and_runs_nothing_twice(ha):
    ha.start_worker("hw1")
    with ha.client() as c:
        wait_workers(c, 1)
    acked_defines: dict[str, str] = {}  # name -> uuid
    acked_jobs: dict[str, int] = {}  # idempotency key -> job id
    lock = threading.Lock()
    errors: list[str] = []

    def client_thread(t: int) -> None:
        with ha.client(timeout_s=20) as c:
            for i in range(250):
                name, uuid = f"ha-{t}-{i}", str(uuidlib.uuid4())
                xml = minimal_domain_xml(name, uuid=uuid)
                deadline = time.monotonic() + 30
                while True:  # retry until acknowledged: a define by UUID is idempotent
                    try:
                        c.define(xml)
                        break
                    except VirtbrokerError as e:
                        if time.monotonic() > deadline:
                            errors.append(f"define {name}: {e}")
                            return
                with lock:
                    acked_defines[name] = uuid
                if i % 5 == 0:  # 50 starts a thread, 200 in all, each under its own key
                    key = f"start-{name}"
                    while True:
                        try:
                            job = c.submit(name, "start", idempotency_key=key)
                            break
                        except VirtbrokerError as e:
                            if time.monotonic() > deadline:
                                errors.append(f"submit {name}: {e}")
                                return
                    with lock:
                        acked_jobs[key] = job["job_id"]

    threads = [threading.Thread(target=client_thread, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    leader = ha.leader()
    wait_until(lambda: len(acked_defines) >= 300, timeout_s=60, what="300 defines acknowledged")
    leader.broker.kill9()
    for t in threads:
        t.join(180)
    assert not errors, errors[:5]
    assert len(acked_defines) == 1000 and len(acked_jobs) == 200
    new_leader = wait_until(ha.leader, timeout_s=20, what="a new leader")
    assert new_leader is not leader
    with ha.client() as c:
        domains = {d["name"]: d["uuid"] for d in c.list(all=True)}
        for name, uuid in acked_defines.items():
            assert domains.get(name) == uuid, name
        # Every acknowledged job is there under its id, and ends final.
        ids = list(acked_jobs.values())
        finals = c.wait(ids, 120)
        assert [j["job_id"] for j in finals] == ids
        assert all(j["state"] in p.FINAL_JOB_STATES for j in finals)
        # The same key again gives the same job: nothing is submitted twice.
        for key, job_id in list(acked_jobs.items())[:20]:
            assert c.submit(key[len("start-"):], "start", idempotency_key=key)["job_id"] == job_id
    # The worker ran each job at most once (its own log: one "job N: op" line per assignment).
    started = re.findall(r"job (\d+): start \S+ \(epoch \d+\)", ha.workers[0].log())
    assert len(started) == len(set(started)), "a start job was run twice"
    assert set(map(int, started)) >= {j["job_id"] for j in finals if j["state"] == "succeeded"}


def test_a_paused_leader_is_fenced_and_comes_back_as_a_standby(ha):
    leader = ha.leader()
    standby = next(n for n in ha.nodes if n is not leader)
    with ha.client() as c:
        c.define(minimal_domain_xml("ha-before"))
    leader.broker.signal(signal.SIGSTOP)
    try:
        wait_until(lambda: (ha.status(standby) or {}).get("role") == "leader", timeout_s=20,
                   what="the standby takes over")
        with ha.client() as c:
            c.define(minimal_domain_xml("ha-after"))
    finally:
        leader.broker.signal(signal.SIGCONT)
    # Its first request after waking, sent to it alone: it must not acknowledge anything
    # (not-leader once it knows, or unavailable when its write was refused by the fence).
    reply = raw_request(leader.client_url, p.Define(request_id=1, xml=minimal_domain_xml("ha-from-the-old-one")))
    assert isinstance(reply, p.Error) and reply.code in ("not-leader", "unavailable"), reply
    wait_until(lambda: (ha.status(leader) or {}).get("role") == "standby", timeout_s=20,
               what="the old leader stands by")
    with ha.client() as c:
        names = {d["name"] for d in c.list(all=True)}
    assert {"ha-before", "ha-after"} <= names and "ha-from-the-old-one" not in names


def test_losing_an_etcd_member_or_the_quorum(ha):
    etcd = ha.etcd
    with ha.client(timeout_s=20) as c:
        first = etcd.leader_index()
        etcd.kill9(first)  # the etcd leader
        uuid = str(uuidlib.uuid4())
        c.define(minimal_domain_xml("ha-member", uuid=uuid))  # goes on under the new etcd leader
        assert c.lookup("ha-member")["uuid"] == uuid
        etcd.start(first)
        # Two members down: no quorum. Nothing is acknowledged, and nothing hangs.
        down = [i for i in range(3) if i != etcd.leader_index()][:2]
        for i in down:
            etcd.stop(i)
        with Client(ha.client_urls, timeout_s=8) as short:
            started = time.monotonic()
            with pytest.raises(UnavailableError):
                short.define(minimal_domain_xml("ha-no-quorum"))
            assert time.monotonic() - started < 8 + 2
        for i in down:
            etcd.start(i)
        wait_until(ha.leader, timeout_s=30, what="a leader again")
        c.define(minimal_domain_xml("ha-quorum-back"))
        names = {d["name"] for d in c.list(all=True)}
        assert {"ha-member", "ha-quorum-back"} <= names


def test_events_replay_across_a_failover(ha):
    with ha.client() as c:
        c.define(minimal_domain_xml("ev-1"))
        seen = list(c.events(since=0, timeout_s=0.5))
        last = seen[-1].seq
    ha.leader().broker.kill9()
    wait_until(ha.leader, timeout_s=20, what="a new leader")
    with ha.client() as c:
        c.define(minimal_domain_xml("ev-2"))
        c.define(minimal_domain_xml("ev-3"))
        later = list(c.events(since=last, timeout_s=0.5))
    seqs = [e.seq for e in later]
    assert seqs == list(range(last + 1, last + 1 + len(seqs))), seqs
    assert [e.name for e in later if e.KIND == "domain"] == ["ev-2", "ev-3"]
