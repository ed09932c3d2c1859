"""What every benchmark section shares: settings, statistics, libvirt cleanup and virtbroker clusters."""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import libvirt

from bench.verdict import MIN_PAIRS
from tests.guests import remove_guests
from tests.procs import Cluster
from virtbroker.client.api import Client
from virtbroker.client.templates import minimal_domain_xml

URI = "qemu:///system"
# Every guest a benchmark makes is named with this prefix, so cleanup can find them all
# and never touches anyone else's (the test suite uses vbt-).
PREFIX = "vbb-"
TARGET_WORKERS = 4  # the worker count the targets judge virtbroker by (start storm, no-op jobs)
DOMAIN_TYPE = "kvm" if os.path.exists("/dev/kvm") else "qemu"
ROOT = Path(__file__).resolve().parents[1]


def _cpu_times() -> tuple[int, int]:
    """(idle, total) jiffies of all CPUs since boot, from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    return fields[3] + fields[4], sum(fields)  # idle + iowait


def wait_for_idle_cpu(min_idle: float = 0.9, window_s: float = 1.0, timeout_s: float = 30.0) -> float:
    """Wait until the CPUs were at least min_idle idle over one window (what an earlier
    section started, QEMU teardown or writeback, has ended), or timeout_s passed; returns
    the idle fraction of the last window, for the results."""
    deadline = time.monotonic() + timeout_s
    while True:
        idle0, total0 = _cpu_times()
        time.sleep(window_s)
        idle1, total1 = _cpu_times()
        idle = (idle1 - idle0) / max(1, total1 - total0)
        if idle >= min_idle or time.monotonic() >= deadline:
            return idle


@dataclass
class Settings:
    """How much to run. Every target is judged on `pairs` interleaved pairs (bench/verdict.py);
    rows that no target judges run `reps` times. --short keeps the whole suite under 3 minutes:
    too few pairs to judge anything, enough to run every code path and flip the order once."""

    short: bool
    pairs: int = MIN_PAIRS
    reps: int = 3
    storm_ns: list[int] = field(default_factory=list)
    target_n: int = 20  # the N the storm, latency and security targets are for
    worker_counts: list[int] = field(default_factory=list)
    sequential_max_n: int = 20  # one-after-another destroys wait for each QEMU to exit; not run above this N
    latency_ns: list[int] = field(default_factory=list)
    security_n: int = 20
    scale_sizes: list[int] = field(default_factory=list)
    noop_worker_counts: list[int] = field(default_factory=list)
    takeover_reps: int = 10
    ha_defines: int = 10000
    # The no-op sections wait up to this long for the CPUs to be idle before they start (what
    # an earlier section started has ended); the short run does not wait for a busy host.
    idle_wait_s: float = 30.0
    settle_s: float = 0.5  # pause between storms, so QEMU processes of the last one have exited
    zmq_messages: int = 50000  # raw pipelined ZeroMQ round trips per run (bench/scale.py)
    noop_domains: int = 2000  # guests of the no-op job runs (bench/scale.py); each run's jobs are 4x this
    at_rest_samples: int = 2000  # lookups at rest, per way (bench/gateway.py)

    @classmethod
    def make(cls, short: bool) -> Settings:
        if short:
            # Two pairs flip the order once; smaller N keeps 2 cores within 3 minutes. The
            # short run's verdicts say "not judged"; the full run judges at N=20.
            return cls(
                short=True,
                pairs=2,
                reps=1,
                storm_ns=[4],
                target_n=4,
                worker_counts=[TARGET_WORKERS],
                sequential_max_n=0,
                latency_ns=[4],
                security_n=4,
                scale_sizes=[1000, 10000],
                noop_worker_counts=[TARGET_WORKERS],
                takeover_reps=2,
                ha_defines=1000,
                idle_wait_s=3.0,
                settle_s=0.2,
                zmq_messages=20000,
                noop_domains=500,
                at_rest_samples=300,
            )
        return cls(
            short=False,
            storm_ns=[1, 5, 20, 40],
            worker_counts=[1, 2, 4, 8],
            sequential_max_n=20,
            latency_ns=[20],
            scale_sizes=[1000, 10000, 100000],
            noop_worker_counts=[1, 2, 4, 8],
        )

    def rounds(self, judged: bool) -> int:
        """How many times a way runs: `pairs` when a target judges it, else `reps`."""
        return self.pairs if judged else min(self.reps, self.pairs)


def say(text: str) -> None:
    """Progress on stderr; results go to the JSON file."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------- statistics
def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100): a value that was actually observed."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100.0 * len(ordered)))
    return ordered[rank - 1]


def ratio(value: float | None, baseline: float | None) -> float | None:
    if value is None or not baseline:
        return None
    return value / baseline


def summary_ms(samples_s: list[float]) -> dict:
    """p50, p99, p99.9 and max of one run's latencies, in milliseconds."""
    return {
        "count": len(samples_s),
        "p50_ms": _ms(percentile(samples_s, 50)),
        "p99_ms": _ms(percentile(samples_s, 99)),
        "p999_ms": _ms(percentile(samples_s, 99.9)),
        "max_ms": _ms(max(samples_s) if samples_s else None),
    }


def spread(values: list[float | None]) -> dict:
    """median, min and max of the values that are not None (None for each when there are none)."""
    kept = [v for v in values if v is not None]
    return {"median": median(kept), "min": min(kept) if kept else None, "max": max(kept) if kept else None,
            "count": len(kept)}


def _ms(value_s: float | None) -> float | None:
    return None if value_s is None else value_s * 1000.0


# ---------------------------------------------------------------------------- libvirt
def _quiet_libvirt(_ctx, _err):
    """libvirt prints every error to stderr by default; the benchmarks raise them instead."""


def open_libvirt(uri: str = URI) -> libvirt.virConnect:
    libvirt.registerErrorHandler(_quiet_libvirt, None)
    return libvirt.open(uri)


@contextlib.contextmanager
def connections(count: int, uri: str = URI) -> Iterator[list[libvirt.virConnect]]:
    """One libvirt connection per thread, opened before any clock starts.

    libvirtd serves at most max_client_requests (5 by default) calls of one connection at
    a time, so 20 threads sharing one connection queue behind each other in libvirtd: the
    strongest libvirt-python baseline gives every thread its own connection.
    """
    conns = [open_libvirt(uri) for _ in range(count)]
    try:
        yield conns
    finally:
        for conn in conns:
            with contextlib.suppress(libvirt.libvirtError):
                conn.close()


def guest_xml(name: str, **kw) -> str:
    return minimal_domain_xml(name, DOMAIN_TYPE, **kw)


def cleanup_guests(conn: libvirt.virConnect, prefix: str = PREFIX) -> int:
    """Destroy and undefine every guest whose name starts with prefix; returns how many were found."""
    return remove_guests(conn, prefix)


def parallel(fn, items: list) -> None:
    """One thread per item, released together; re-raises the first error after all have ended."""
    errors: list[BaseException] = []
    gate = threading.Barrier(len(items) + 1)

    def body(item):
        gate.wait()
        try:
            fn(item)
        except BaseException as e:  # collected and raised in the caller's thread
            errors.append(e)

    threads = [threading.Thread(target=body, args=(item,), daemon=True) for item in items]
    for t in threads:
        t.start()
    gate.wait()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


# ---------------------------------------------------------------------------- virtbroker
@contextlib.contextmanager
def vb_cluster(
    workers: int,
    slots: int | None,
    uri: str = URI,
    extra: list[str] = (),
    security_drivers: list[str] = (),
    lease_ttl_s: float = 10.0,
) -> Iterator[Cluster]:
    """A broker and lifecycle workers as real processes on a fresh state dir, stopped afterwards."""
    # ipc:// paths are limited to ~107 bytes, so the state dir stays short.
    state_dir = Path(tempfile.mkdtemp(prefix="vbb-", dir="/tmp"))
    cluster = Cluster(state_dir, uri=uri, lease_ttl_s=lease_ttl_s, extra=list(extra))
    try:
        cluster.start_broker()
        for driver in security_drivers:
            cluster.start_security_worker(driver)
        for i in range(workers):
            cluster.start_worker(f"w{i}", slots=slots)
        cluster.wait_workers(workers)
        if security_drivers:
            cluster.wait_workers(len(security_drivers), role="security")
        yield cluster
    finally:
        stop_cluster(cluster)
        shutil.rmtree(state_dir, ignore_errors=True)


def stop_cluster(cluster: Cluster, timeout_s: float = 20.0) -> None:
    """Cluster.stop(), with every worker told to stop at once first: Cluster.stop() signals
    each and waits for it before the next, and the waits add up over a run's many clusters.
    Each worker still gets one SIGTERM (a second one would make it exit without finishing)."""
    procs = [p for p in [*cluster.workers.values(), *cluster.security.values()] if p.alive()]
    for proc in procs:
        proc.signal(signal.SIGTERM)
    for proc in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.popen.wait(timeout=timeout_s)
    cluster.stop()  # the clients, the broker, and any worker that did not exit in time


def vb_client(cluster: Cluster, timeout_s: float = 120.0) -> Client:
    return cluster.client(timeout_s=timeout_s)


def vb_start_destroy(cluster: Cluster, xml: dict[str, str]) -> tuple[float, float]:
    """Define and start every guest through virtbroker, then destroy them all: (start_s, destroy_s).

    One thread and client per guest, as the libvirt baseline has one thread and connection
    per guest: each defines its guest (durable at the broker) and submits its start at once,
    so workers start guests while other threads are still defining. A phase ends when every
    one of its jobs is final. Raises if a job did not succeed.
    """
    names = list(xml)
    clients = {name: vb_client(cluster) for name in names}  # connected before the clock starts
    job_ids: dict[str, int] = {}

    def start(name: str) -> None:
        clients[name].define(xml[name])
        job_ids[name] = clients[name].submit(name, "start")["job_id"]

    def destroy(name: str) -> None:
        job_ids[name] = clients[name].submit(name, "destroy")["job_id"]

    times = []
    for op, fn in (("start", start), ("destroy", destroy)):
        started = time.monotonic()
        parallel(fn, names)
        finals = clients[names[0]].wait(list(job_ids.values()), 300)
        times.append(time.monotonic() - started)
        check_jobs(finals, op)
    return times[0], times[1]


def run_jobs(client: Client, names: list[str], op: str, timeout_s: float = 300.0) -> list[dict]:
    """Submit op for every name, wait for all, and raise if any did not succeed."""
    job_ids = [client.submit(name, op)["job_id"] for name in names]
    finals = client.wait(job_ids, timeout_s)
    check_jobs(finals, op)
    return finals


def check_jobs(finals: list[dict], op: str) -> None:
    failed = [f"{j['domain']}: {j['state']} {j['error']}" for j in finals if j["state"] != "succeeded"]
    if failed:
        raise RuntimeError(f"{len(failed)} {op} job(s) failed: " + "; ".join(failed[:5]))


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    raise RuntimeError(f"no VmRSS for pid {pid}")


def cpu_s(pid: int) -> float:
    """User and system CPU seconds of a process, all its threads, so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------------------- CPU ledger
# Where the CPU went while a measurement ran: each named group of processes (or a single
# thread), the rest of the host (other processes, the kernel's own threads), idle time and
# steal (time the hypervisor under this virtual machine gave to someone else), per unit of
# work (a job, a round trip). Read from /proc before and after; nothing is sampled.
def host_jiffies() -> dict:
    """busy, idle (with iowait), steal and total jiffies of all CPUs since boot, from /proc/stat."""
    with open("/proc/stat") as f:
        user, nice, system, idle, iowait, irq, softirq, steal = (int(x) for x in f.readline().split()[1:9])
    busy = user + nice + system + irq + softirq
    return {"busy": busy, "idle": idle + iowait, "steal": steal, "total": busy + idle + iowait + steal}


def task_dir(pid: int, thread: bool = False) -> str:
    """/proc/PID (the whole process) or /proc/PID/task/PID (its main thread alone)."""
    return f"/proc/{pid}/task/{pid}" if thread else f"/proc/{pid}"


def _cpu_ctx(path: str) -> tuple[float, int]:
    """(user + system CPU seconds, context switches) of a process or thread directory under /proc.
    A process's switches are summed over its threads alive now."""
    with open(f"{path}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    tasks = [f"{path}/task/{t}" for t in os.listdir(f"{path}/task")] if os.path.isdir(f"{path}/task") else [path]
    ctx = 0
    for task in tasks:
        try:
            with open(f"{task}/status") as f:
                ctx += sum(int(line.split()[1]) for line in f if "ctxt_switches:" in line)
        except OSError:  # the thread ended meanwhile
            pass
    return cpu, ctx


def cpu_snapshot(groups: dict[str, list[str]]) -> dict:
    """groups: role -> /proc directories (task_dir). Taken before and after a measurement."""
    snap = {"wall_s": time.perf_counter(), "host": host_jiffies(), "groups": {}}
    for role, paths in groups.items():
        values = [_cpu_ctx(path) for path in paths]
        snap["groups"][role] = (sum(v[0] for v in values), sum(v[1] for v in values))
    return snap


def cpu_ledger(before: dict, after: dict, units: int, exclusive: tuple[str, ...] = ()) -> dict:
    """Microseconds per unit between two snapshots: wall time; the CPU of each group and its
    context switches per unit; and the whole host's capacity (cores x wall), split into the
    groups, other (everything else that ran), idle and steal. `exclusive` names the groups
    that are not parts of another group (a broker's loop thread is part of the broker), the
    ones whose sum is taken out of the host's busy time."""
    per = 1e6 / max(1, units)
    tick_s = 1.0 / os.sysconf("SC_CLK_TCK")
    wall_s = after["wall_s"] - before["wall_s"]
    host = {k: (after["host"][k] - before["host"][k]) * tick_s for k in after["host"]}
    out = {"wall_us": wall_s * per, "cores": os.cpu_count(), "capacity_us": wall_s * (os.cpu_count() or 1) * per}
    ours_s = 0.0
    for role, (cpu, ctx) in after["groups"].items():
        cpu0, ctx0 = before["groups"][role]
        out[f"{role}_us"] = (cpu - cpu0) * per
        out[f"{role}_ctx"] = (ctx - ctx0) / max(1, units)
        if role in (exclusive or tuple(after["groups"])):
            ours_s += cpu - cpu0
    out["other_us"] = max(0.0, host["busy"] - ours_s) * per
    out["idle_us"] = host["idle"] * per
    out["steal_us"] = host["steal"] * per
    return out
