"""The broker's Prometheus metrics count jobs, expiries and workers as they happen."""

import socket
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from tests.waiting import wait_until
from virtbroker.client.templates import minimal_domain_xml


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(port: int) -> dict:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def test_metrics_follow_jobs_and_workers(cluster_factory):
    port = free_port()
    cluster = cluster_factory(extra=["--metrics-port", str(port)])
    cluster.start_broker()
    cluster.start_worker("m1")
    cluster.wait_workers(1)
    c = cluster.client()
    c.define(minimal_domain_xml("metered"))
    c.run("metered", "start")
    c.run("metered", "destroy")
    c.run("metered", "destroy")  # fails: not running
    # Gauges are refreshed at most once a second: wait until one refresh came after the jobs.
    settled = {
        ("virtbroker_domains", (("state", "shutoff"),)): 1,
        ("virtbroker_domains", (("state", "running"),)): 0,
        ("virtbroker_workers", (("role", "lifecycle"),)): 1,
    }

    def refreshed() -> dict | None:
        m = scrape(port)
        return m if all(m.get(key) == value for key, value in settled.items()) else None

    m = wait_until(refreshed, 10, interval_s=0.1, what="gauges refreshed after the jobs")
    assert m[("virtbroker_jobs_total", (("op", "start"), ("state", "succeeded")))] == 1
    assert m[("virtbroker_jobs_total", (("op", "destroy"), ("state", "succeeded")))] == 1
    assert m[("virtbroker_jobs_total", (("op", "destroy"), ("state", "failed")))] == 1
    assert m[("virtbroker_job_duration_seconds_count", (("op", "start"),))] == 1
    assert m[("virtbroker_workers", (("role", "lifecycle"),))] == 1
    assert m[("virtbroker_hosts", ())] == 1
    assert m[("virtbroker_domains", (("state", "shutoff"),))] == 1
    assert m[("virtbroker_queue_depth", ())] == 0
    assert m[("virtbroker_requests_total", (("kind", "define"), ("outcome", "ok")))] == 1
