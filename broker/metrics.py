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

        # labels() takes a lock and builds a key on every call; a job makes three
        # transitions, so keep the children per label set.
        self._children: dict[tuple, object] = {}

    def job_transition(self, job) -> None:
        """Count a job's move into job.state and, when it is final, observe its durations."""
        children = self._children
        key = (job.op, job.state)
        counter = children.get(key)
        if counter is None:
            counter = children[key] = self.jobs.labels(job.op, job.state)
        counter.inc()
        if job.final and job.finished_at is not None:
            hists = children.get(job.op)
            if hists is None:
                hists = children[job.op] = (self.job_latency.labels(job.op), self.job_run.labels(job.op))
            hists[0].observe(max(0.0, job.finished_at - job.submitted_at))
            if job.started_at is not None:
                hists[1].observe(max(0.0, job.finished_at - job.started_at))

    def serve(self, port: int, addr: str = "127.0.0.1") -> None:
        start_http_server(port, addr=addr, registry=self.registry)
