"""Guards at the broker's edge: one broker per state dir, no tcp:// without CURVE, and limits
on what it holds. Each refusal is a one-line error and changes nothing."""

from __future__ import annotations

import subprocess
import sys
import uuid as uuidlib

import pytest

from tests.integration.test_access import free_port
from tests.procs import ROOT
from virtbroker.client.templates import minimal_domain_xml
from virtbroker.common.errors import InvalidError, LimitError


def run_launcher(*args: str, timeout_s: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "virtbroker.launcher", *args], cwd=str(ROOT), capture_output=True, text=True,
                          timeout=timeout_s)


def test_a_second_broker_on_the_same_state_dir_is_refused(cluster_factory):
    cluster = cluster_factory()
    cluster.start_broker()
    cluster.start_worker("w1")
    cluster.wait_workers(1)
    c = cluster.client()
    c.define(minimal_domain_xml("only-one"))
    second = run_launcher("broker", "--state-dir", str(cluster.state_dir))
    assert second.returncode != 0
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1, second.stderr
    assert "already running" in lines[0] and f"pid {cluster.broker.pid}" in lines[0]
    # The first broker's sockets were left alone: both endpoints still answer.
    assert c.lookup("only-one")["name"] == "only-one"
    job = c.submit("only-one", "start")
    assert c.wait([job["job_id"]], 30)[0]["state"] == "succeeded"
    with cluster.client(url=cluster.local_url) as local:
        assert local.lookup("only-one")["state"] == "running"


def test_a_state_dir_is_free_again_after_its_broker_is_killed(cluster_factory):
    cluster = cluster_factory()
    cluster.start_broker()
    cluster.broker.kill9()
    cluster.start_broker()  # the kernel dropped the dead broker's lock
    assert cluster.client().ping()["domains"] == 0


@pytest.mark.parametrize("option", ["--client-url", "--worker-url", "--events-url", "--readonly-url"])
def test_tcp_without_curve_is_refused_at_start(tmp_path, option):
    url = f"tcp://127.0.0.1:{free_port()}"
    done = run_launcher("broker", "--state-dir", str(tmp_path), option, url)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "without CURVE" in lines[0] and url in lines[0], done.stderr
    assert not (tmp_path / "client.sock").exists()  # nothing was bound


def test_a_worker_refuses_tcp_without_keys(tmp_path):
    url = f"tcp://127.0.0.1:{free_port()}"
    done = run_launcher("worker", "--state-dir", str(tmp_path), "--worker-url", url)
    assert done.returncode == 2 and "without CURVE" in done.stderr, done.stderr


def test_insecure_tcp_only_when_asked(cluster_factory, tmp_path):
    port = free_port()
    ini = tmp_path / "insecure.ini"
    ini.write_text(f"[virtbroker]\nclient_url = tcp://127.0.0.1:{port}\nallow_insecure_tcp = true\n")
    cluster = cluster_factory(extra=["-c", str(ini)])
    cluster.client_url = f"tcp://127.0.0.1:{port}"
    cluster.start_broker()
    assert cluster.client().ping()["domains"] == 0
    assert "insecure" in cluster.broker.log()


def test_limits_refuse_and_change_nothing(cluster_factory):
    cluster = cluster_factory(extra=["--max-domains", "3", "--max-queued-jobs", "4", "--max-queued-jobs-per-domain", "2"])
    cluster.start_broker()  # no worker: submitted jobs stay queued
    c = cluster.client()
    first = minimal_domain_xml("lim-0", uuid=str(uuidlib.uuid4()))
    c.define(first)
    for i in range(1, 3):
        c.define(minimal_domain_xml(f"lim-{i}"))
    with pytest.raises(LimitError, match="max_domains"):
        c.define(minimal_domain_xml("lim-3"))
    assert c.define(first)["created"] is False  # a redefine is not a new domain
    assert len(c.list(all=True)) == 3
    # No worker: a start stays at the head of its queue, and what is behind it waits.
    c.submit("lim-0", "start")
    c.submit("lim-0", "reboot")
    with pytest.raises(LimitError, match="max_queued_jobs_per_domain"):
        c.submit("lim-0", "suspend")
    c.submit("lim-1", "start")
    c.submit("lim-1", "reboot")
    with pytest.raises(LimitError, match="max_queued_jobs"):
        c.submit("lim-2", "start")
    assert len(c.jobs()) == 4
    assert c.jobs(domain="lim-2") == []
    with pytest.raises(InvalidError, match="deadline_s"):
        c.submit("lim-2", "start", deadline_s=-1)
    with pytest.raises(InvalidError, match="deadline_s"):
        c.submit("lim-2", "start", deadline_s=float("nan"))


def test_jobs_newest_first_from_the_index(cluster_factory):
    cluster = cluster_factory()
    cluster.start_broker()
    c = cluster.client()
    for name in ("ix-a", "ix-b"):
        c.define(minimal_domain_xml(name))
    ids = [c.submit(name, op)["job_id"] for op in ("start", "destroy") for name in ("ix-a", "ix-b")]
    assert [j["job_id"] for j in c.jobs()] == ids
    assert [j["job_id"] for j in c.jobs(domain="ix-a")] == ids[0::2]
    assert [j["job_id"] for j in c.jobs(domain="ix-b", limit=1)] == [ids[3]]
    cluster.broker.kill9()
    cluster.start_broker()  # the index is rebuilt from the store in the same order
    assert [j["job_id"] for j in c.jobs(domain="ix-a")] == ids[0::2]


def test_forty_sequential_starts_on_four_test_hosts_land_ten_on_each(cluster_factory):
    """Each test:/// worker is a host of its own; a start goes to the host with fewest guests."""
    cluster = cluster_factory()
    cluster.start_broker()
    for i in range(4):
        cluster.start_worker(f"sp{i}", slots=2)
    cluster.wait_workers(4)
    c = cluster.client()
    per_host: dict[str, int] = {}
    for n in range(40):
        c.define(minimal_domain_xml(f"spread-{n}"))
        job = c.wait([c.submit(f"spread-{n}", "start")["job_id"]], 30)[0]
        assert job["state"] == "succeeded", job
        per_host[job["host"]] = per_host.get(job["host"], 0) + 1
    assert sorted(per_host.values()) == [10, 10, 10, 10], per_host
