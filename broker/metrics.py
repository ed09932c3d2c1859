"""Prometheus metrics of the broker, in a registry of its own (no global state)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

# Jobs range from milliseconds (test driver, suspend) to minutes (ACPI shutdown timeouts).
LATENCY_BUCKETS_S = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300)


class BrokerMetrics:
    """Counters are bumped where transitions happen; gauges are refreshed by the loop."""

    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.jobs = Counter("virtbroker_jobs", "Job transitions into each state, by operation", ["op", "state"], registry=r)
        self.job_latency = Histogram(
            "virtbroker_job_duration_seconds", "Submission to final state, by operation", ["op"],
            buckets=LATENCY_BUCKETS_S, registry=r,
        )
        self.job_run = Histogram(
            "virtbroker_job_run_seconds", "Lease granted to final state, by operation", ["op"],
            buckets=LATENCY_BUCKETS_S, registry=r,
        )
        self.queue_depth = Gauge("virtbroker_queue_depth", "Jobs waiting in the broker", registry=r)
        self.running = Gauge("virtbroker_jobs_running", "Jobs holding a lease", registry=r)
        self.lease_expiries = Counter("virtbroker_lease_expiries", "Leases that expired (job lost)", registry=r)
        self.refused_results = Counter("virtbroker_refused_results", "Results refused for a stale lease or epoch", registry=r)
        self.workers = Gauge("virtbroker_workers", "Workers connected, by role", ["role"], registry=r)
        self.hosts = Gauge("virtbroker_hosts", "Hosts with at least one lifecycle worker", registry=r)
        self.domains = Gauge("virtbroker_domains", "Defined domains, by state", ["state"], registry=r)
        self.requests = Counter("virtbroker_requests", "Client requests, by kind and outcome", ["kind", "outcome"], registry=r)
        self.batch_messages = Histogram(
            "virtbroker_batch_messages", "Messages handled per loop turn (one group commit each)",
            buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000), registry=r,
        )

    def serve(self, port: int, addr: str = "127.0.0.1") -> None:
        start_http_server(port, addr=addr, registry=self.registry)
