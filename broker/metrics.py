"""Prometheus metrics of the broker, in a registry of its own (no global state)."""

from __future__ import annotations

import bisect

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily

# Jobs range from milliseconds (test driver, suspend) to minutes (ACPI shutdown timeouts).
LATENCY_BUCKETS_S = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300)


class BrokerMetrics:
    """Counters are bumped where transitions happen; gauges are refreshed by the loop."""

    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        # Job transitions and requests happen thousands of times a second: they are counted in
        # plain dicts (one loop thread, no lock) and turned into metrics when scraped.
        self.job_counts: dict[tuple[str, str], int] = {}
        self.request_counts: dict[tuple[str, str], int] = {}
        self.job_latency: dict[str, _Durations] = {}  # by op: submission to final state
        self.job_run: dict[str, _Durations] = {}  # by op: lease granted to final state
        r.register(_LoopCollector(self))
        self.queue_depth = Gauge("virtbroker_queue_depth", "Jobs waiting in the broker", registry=r)
        self.running = Gauge("virtbroker_jobs_running", "Jobs holding a lease", registry=r)
        self.lease_expiries = Counter("virtbroker_lease_expiries", "Leases that expired (job lost)", registry=r)
        self.refused_results = Counter(
            "virtbroker_refused_results", "Results refused for a stale lease or epoch", registry=r
        )
        self.refused_worker_messages = Counter(
            "virtbroker_refused_worker_messages",
            "Worker messages refused: a peer naming another worker, a wrong role, a lease it does not hold",
            ["kind", "reason"],
            registry=r,
        )
        self.leader = Gauge("virtbroker_leader", "1 while this broker leads (always, on the sqlite store)", registry=r)
        self.takeovers = Counter("virtbroker_takeovers", "Times this broker took the lead from etcd", registry=r)
        self.fenced = Counter("virtbroker_fenced_writes",
                              "Times this broker stopped leading: a write refused by the fence, or its lease lost",
                              registry=r)
        self.host_transitions = Counter("virtbroker_host_transitions", "Hosts that entered a state "
                                        "(up, unreachable, fencing, fenced, rejoining)", ["state"], registry=r)
        self.fenced_hosts = Counter("virtbroker_fenced_hosts", "Hosts fenced (by watchdog, fence_command or "
                                    "operator)", registry=r)
        self.fence_failures = Counter("virtbroker_fence_command_failures", "Runs of fence_command that failed",
                                      registry=r)
        self.workers = Gauge("virtbroker_workers", "Workers connected, by role", ["role"], registry=r)
        self.hosts = Gauge("virtbroker_hosts", "Hosts with at least one lifecycle worker", registry=r)
        self.domains = Gauge("virtbroker_domains", "Defined domains, by state", ["state"], registry=r)
        self.batch_messages = Histogram(
            "virtbroker_batch_messages", "Messages handled per loop turn (one group commit each)",
            buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000), registry=r,
        )

    def request(self, kind: str, outcome: str) -> None:
        key = (kind, outcome)
        self.request_counts[key] = self.request_counts.get(key, 0) + 1

    def job_transition(self, job) -> None:
        """Count a job's move into job.state and, when it is final, record its durations."""
        key = (job.op, job.state)
        self.job_counts[key] = self.job_counts.get(key, 0) + 1
        if job.final and job.finished_at is not None:
            latency = self.job_latency.get(job.op)
            if latency is None:
                latency = self.job_latency[job.op] = _Durations()
                self.job_run[job.op] = _Durations()
            latency.observe(max(0.0, job.finished_at - job.submitted_at))
            if job.started_at is not None:
                self.job_run[job.op].observe(max(0.0, job.finished_at - job.started_at))

    def serve(self, port: int, addr: str = "127.0.0.1") -> None:
        start_http_server(port, addr=addr, registry=self.registry)


class _Durations:
    """A histogram's state, kept by the loop thread: a count per bucket (not cumulative) and the sum."""

    __slots__ = ("counts", "total")

    def __init__(self):
        self.counts = [0] * (len(LATENCY_BUCKETS_S) + 1)  # the last is +Inf
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(LATENCY_BUCKETS_S, value)] += 1
        self.total += value

    def buckets(self) -> list[tuple[str, int]]:
        out, running = [], 0
        for bound, count in zip((*LATENCY_BUCKETS_S, float("inf")), self.counts):
            running += count
            out.append(("+Inf" if bound == float("inf") else repr(float(bound)), running))
        return out


class _LoopCollector:
    """Reads the loop's plain counters at scrape time (from the HTTP thread: a dict may
    grow while it is read, so each is copied first)."""

    def __init__(self, metrics: BrokerMetrics):
        self.metrics = metrics

    def collect(self):
        m = self.metrics
        jobs = CounterMetricFamily(
            "virtbroker_jobs", "Job transitions into each state, by operation", labels=["op", "state"]
        )
        for (op, state), count in list(m.job_counts.items()):
            jobs.add_metric([op, state], count)
        yield jobs
        requests = CounterMetricFamily(
            "virtbroker_requests", "Client requests, by kind and outcome", labels=["kind", "outcome"]
        )
        for (kind, outcome), count in list(m.request_counts.items()):
            requests.add_metric([kind, outcome], count)
        yield requests
        for name, help_text, table in (
            ("virtbroker_job_duration_seconds", "Submission to final state, by operation", m.job_latency),
            ("virtbroker_job_run_seconds", "Lease granted to final state, by operation", m.job_run),
        ):
            family = HistogramMetricFamily(name, help_text, labels=["op"])
            for op, durations in list(table.items()):
                family.add_metric([op], durations.buckets(), durations.total)
            yield family
