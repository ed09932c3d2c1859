"""Section 5: broker scale (1,000 to 100,000 defined domains) and no-op job throughput against raw pyzmq."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import random
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import msgpack
import zmq

from bench.common import (
    PREFIX,
    TARGET_WORKERS,
    Settings,
    cpu_s,
    median,
    percentile,
    ratio,
    rss_mb,
    say,
    vb_cluster,
    wait_for_idle_cpu,
)
from tests.procs import Cluster
from virtbroker.client.api import Client
from virtbroker.client.templates import minimal_domain_xml
from virtbroker.common import protocol as p
from virtbroker.common.stream import is_stream_url, stream_path

WINDOW = 200  # requests in flight from one pipelining client
LOOKUP_SAMPLES = 2000
ZMQ_PINGPONG_SAMPLES = 5000
ZMQ_PIPELINED_MESSAGES = 50000
NOOP_DOMAINS = 2000
NOOP_ROUNDS = 2  # each guest is suspended and resumed this many times per repetition
# A no-op job runs for microseconds, but it holds its slot from its grant (which waits for
# the group commit that records the lease) until the broker reads its result: tens of ms
# under load. A throughput figure needs enough jobs in flight to cover that round trip, or
# it measures the round trip: every guest may have a job in flight (the window), and the
# workers' slots can hold them all. With 128 slots and a 200-request window the same run
# gives 8,500 to 9,200 a second (bench/analysis.md).
NOOP_SLOTS = 512
NOOP_WINDOW = NOOP_DOMAINS
NOOP_FEW_SLOTS = 16  # the same run with fewer jobs in flight, for comparison
# A bulk client submits its jobs in batches (one message, one reply, for this many); the
# full run also measures one message per job.
NOOP_BATCH = 100
DEFINE_CHUNKS = 3  # define throughput is measured per chunk of the fill; the median is shown


# ---------------------------------------------------------------------------- pipelining
def pipelined(
    sock: zmq.Socket, requests: list[p.Message], window: int = WINDOW, timeout_s: float = 120.0, batch: int = 1
) -> list:
    """Send requests over one DEALER with up to `window` unanswered; results in request order.
    With batch > 1 they travel `batch` to a message (the client socket's `batch` kind).

    Client.call() waits for each answer; a real bulk client pipelines, and so must a
    throughput figure, or it measures the round trip instead of the broker.
    """
    results: dict[int, object] = {}
    sent = 0
    deadline = time.monotonic() + timeout_s
    while len(results) < len(requests):
        while sent < len(requests) and sent - len(results) < window:
            group = requests[sent : sent + min(batch, window - (sent - len(results)))]
            for frames in p.batch_frames([p.encode(msg) for msg in group]):
                sock.send_multipart(frames)
            sent += len(group)
        if not sock.poll(max(1, int((deadline - time.monotonic()) * 1000))):
            raise RuntimeError(f"broker stopped answering after {len(results)} of {len(requests)} requests")
        # Every reply that is waiting, without a poll for each: the load generator shares
        # the machine with what it measures, and must not spend its CPU on syscalls.
        while True:
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            for reply in p.unbatch(p.decode(frames, p.CLIENT_VERSION, max_bytes=p.MAX_REPLY_BYTES)):
                if isinstance(reply, p.Error):
                    raise RuntimeError(f"request {reply.request_id} failed: {reply.code}: {reply.message}")
                results[reply.request_id] = reply.result
    return [results[r.request_id] for r in requests]


def _dealer(context: zmq.Context, url: str) -> zmq.Socket:
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    sock.connect(url)
    return sock


# ---------------------------------------------------------------------------- raw pyzmq
def echo_main(url: str, ready) -> None:
    """A ROUTER that sends every message back: the transport's own limit, no broker logic.
    For a unix:// URL, a UNIX stream socket that sends every byte back (the local endpoint's
    transport), one connection at a time. Runs until killed (echo_server)."""
    if is_stream_url(url):
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(stream_path(url))
        listener.listen(8)
        ready.set()
        while True:
            conn, _ = listener.accept()
            with conn:
                while data := conn.recv(65536):
                    conn.sendall(data)
    context = zmq.Context()
    sock = context.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    sock.bind(url)
    ready.set()
    while True:
        sock.send_multipart(sock.recv_multipart(copy=True), copy=True)


@contextlib.contextmanager
def echo_server(url: str, ready_timeout_s: float = 30.0) -> Iterator[str]:
    """echo_main in a process of its own, bound and ready; killed on exit. Yields the URL."""
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Event()
    server = ctx.Process(target=echo_main, args=(url, ready), daemon=True)
    server.start()
    try:
        if not ready.wait(ready_timeout_s):
            raise RuntimeError("echo server did not start")
        yield url
    finally:
        server.kill()
        server.join(timeout=10)


def raw_zmq(state_dir: Path) -> dict:
    """Round-trip latency (one at a time) and throughput (pipelined) of ROUTER/DEALER on ipc://."""
    # A body the size of a lookup request, in the same three frames as the protocol.
    frames = p.encode(p.Lookup(request_id=1, domain=f"{PREFIX}scale-000001"))
    with echo_server(f"ipc://{state_dir}/echo.sock") as url:
        context = zmq.Context()
        sock = _dealer(context, url)
        try:
            rtts_s, pipelined_per_s = _echo_rates(sock, frames)
        finally:
            sock.close(linger=0)
            context.term()
    return {
        "rtt_p50_ms": percentile(rtts_s, 50) * 1000,
        "rtt_p99_ms": percentile(rtts_s, 99) * 1000,
        "pingpong_per_s": len(rtts_s) / sum(rtts_s),
        "pipelined_per_s": pipelined_per_s,
    }


def _echo_rates(sock: zmq.Socket, frames: list[bytes]) -> tuple[list[float], float]:
    """Round trips one at a time (seconds each), then pipelined round trips per second."""
    for _ in range(200):  # warm up the connection
        sock.send_multipart(frames)
        sock.recv_multipart()
    rtts_s = []
    for _ in range(ZMQ_PINGPONG_SAMPLES):
        t0 = time.perf_counter()
        sock.send_multipart(frames)
        sock.recv_multipart()
        rtts_s.append(time.perf_counter() - t0)
    started = time.perf_counter()
    sent = received = 0
    while received < ZMQ_PIPELINED_MESSAGES:
        while sent < ZMQ_PIPELINED_MESSAGES and sent - received < WINDOW:
            sock.send_multipart(frames)
            sent += 1
        sock.recv_multipart()
        received += 1
    pipelined_per_s = ZMQ_PIPELINED_MESSAGES / (time.perf_counter() - started)
    return rtts_s, pipelined_per_s


# ---------------------------------------------------------------------------- registry scale
def _scale_xml(i: int) -> str:
    return minimal_domain_xml(f"{PREFIX}scale-{i:06d}", "test")


def registry_scale(size: int, reps: int) -> dict:
    """A broker alone (no workers), filled with `size` domains by pipelined durable defines."""
    state_dir = Path(tempfile.mkdtemp(prefix="vbb-", dir="/tmp"))
    cluster = Cluster(state_dir)
    context = zmq.Context()
    try:
        cluster.start_broker()
        sock = _dealer(context, cluster.client_url)
        define_rates: list[float] = []
        chunk = -(-size // DEFINE_CHUNKS)
        for start in range(0, size, chunk):
            batch = [p.Define(request_id=i + 1, xml=_scale_xml(i)) for i in range(start, min(size, start + chunk))]
            t0 = time.perf_counter()
            pipelined(sock, batch, timeout_s=600)
            define_rates.append(len(batch) / (time.perf_counter() - t0))
        with Client(cluster.client_url, timeout_s=60) as c:
            rng = random.Random(size)
            lookup_p99s_ms = []
            list_all_s = []
            list_raw_s = []
            list_error = None
            for rep in range(reps):
                samples_s = []
                for _ in range(LOOKUP_SAMPLES):
                    name = f"{PREFIX}scale-{rng.randrange(size):06d}"
                    t0 = time.perf_counter()
                    c.lookup(name)
                    samples_s.append(time.perf_counter() - t0)
                lookup_p99s_ms.append(percentile(samples_s, 99) * 1000)
                if list_error is None:
                    t0 = time.perf_counter()
                    try:
                        listed = c.list(all=True)
                    except Exception as e:  # a finding, not a crash: the reply may be too big
                        list_error = f"{type(e).__name__}: {e}"
                    else:
                        list_all_s.append(time.perf_counter() - t0)
                        if len(listed) != size:
                            raise RuntimeError(f"list --all returned {len(listed)} domains, expected {size}")
                list_raw_s.append(_list_raw_s(sock, 10**9 + rep, size))
            rss = rss_mb(cluster.broker.pid)
        return {
            "size": size,
            "define_per_s": median(define_rates),
            "define_per_s_chunks": define_rates,
            "lookup_p99_ms": median(lookup_p99s_ms),
            "lookup_p99_ms_reps": lookup_p99s_ms,
            "list_all_s": median(list_all_s),
            "list_all_s_reps": list_all_s,
            "list_all_error": list_error,
            "list_all_raw_s": median(list_raw_s),
            "list_all_raw_s_reps": list_raw_s,
            "broker_rss_mb": rss,
        }
    finally:
        with contextlib.suppress(Exception):
            sock.close(linger=0)
        context.term()
        cluster.stop()
        shutil.rmtree(state_dir, ignore_errors=True)


def _list_raw_s(sock: zmq.Socket, request_id: int, size: int) -> float:
    """list all over a raw DEALER, decoded with msgpack alone: the broker's cost and the
    transport's, without the client's 2 MiB reply limit and structural check."""
    t0 = time.perf_counter()
    sock.send_multipart(p.encode(p.ListDomains(request_id=request_id, all=True)))
    if not sock.poll(120000):
        raise RuntimeError("no answer to list all")
    frames = sock.recv_multipart()
    body = msgpack.unpackb(frames[2], raw=False)
    elapsed_s = time.perf_counter() - t0
    if body.get("request_id") != request_id or len(body.get("result") or []) != size:
        raise RuntimeError(f"unexpected answer to list all: {str(body)[:200]}")
    return elapsed_s


# ---------------------------------------------------------------------------- no-op jobs
def noop_throughput(
    workers: int, reps: int, slots: int = NOOP_SLOTS, batches: tuple[int, ...] = (NOOP_BATCH,)
) -> list[dict]:
    """suspend/resume jobs on test:///default guests: a job whose hypervisor call costs microseconds.

    The broker has no no-op operation; on libvirt's embedded test driver each lifecycle
    worker process is its own host, and suspend and resume return at once, so the rate
    measures the broker, the protocol and the workers' job handling. The client learns
    that its jobs ended the way a bulk client would: one `wait` for all of them. It starts
    once the CPUs are idle (what an earlier section started has ended).

    One row per entry of `batches` (submits per message); with several, their repetitions
    take turns on the same cluster, so that drift of the host lands on each alike. Each
    repetition also records the CPU time per job of the broker, the workers and this
    client, from /proc: a figure the host's speed moves less than the rate.
    """
    idle = wait_for_idle_cpu()
    rows = {
        batch: {"workers": workers, "slots": slots, "batch": batch, "jobs_per_s_reps": [], "cpu_us_per_job_reps": []}
        for batch in batches
    }
    with vb_cluster(workers, slots, uri="test:///default") as cluster:
        context = zmq.Context()
        sock = _dealer(context, cluster.client_url)
        try:
            names = [f"{PREFIX}noop-{i:04d}" for i in range(NOOP_DOMAINS)]
            request_ids = iter(range(1, 10**9))
            pipelined(sock, [p.Define(request_id=next(request_ids), xml=minimal_domain_xml(n, "test")) for n in names])
            _run_ops(sock, names, ["start"], request_ids, batches[0])
            pids = {"broker": [cluster.broker.pid], "workers": [w.pid for w in cluster.workers.values()],
                    "client": [os.getpid()]}
            for _rep in range(reps):
                for batch, row in rows.items():
                    before = {role: sum(map(cpu_s, group)) for role, group in pids.items()}
                    jobs, elapsed_s = _run_ops(sock, names, ["suspend", "resume"] * NOOP_ROUNDS, request_ids, batch)
                    row["jobs_per_s_reps"].append(jobs / elapsed_s)
                    row["cpu_us_per_job_reps"].append(
                        {role: (sum(map(cpu_s, group)) - before[role]) / jobs * 1e6 for role, group in pids.items()}
                    )
        finally:
            sock.close(linger=0)
            context.term()
    for row in rows.values():
        row["jobs_per_s"] = median(row["jobs_per_s_reps"])
        row["cpu_us_per_job"] = {
            role: median([r[role] for r in row["cpu_us_per_job_reps"]]) for role in ("broker", "workers", "client")
        }
        row["cpu_idle_before"] = idle
    return list(rows.values())


def _run_ops(sock, names, ops, request_ids, batch: int) -> tuple[int, float]:
    """Submit every op for every name (pipelined), then wait for all of them to end."""
    requests = [p.Submit(request_id=next(request_ids), domain=n, op=op) for op in ops for n in names]
    started = time.perf_counter()
    job_ids = [job["job_id"] for job in pipelined(sock, requests, window=NOOP_WINDOW, batch=batch)]
    (waited,) = pipelined(sock, [p.Wait(request_id=next(request_ids), job_ids=job_ids, timeout_s=300)], timeout_s=310)
    elapsed_s = time.perf_counter() - started
    if waited["timed_out"]:
        raise RuntimeError(f"no-op jobs unfinished after 300 s: {sum(not j['finished_at'] for j in waited['jobs'])}")
    failed = [f"{j['op']}: {j['state']} {j['error']}" for j in waited["jobs"] if j["state"] != "succeeded"]
    if failed:
        raise RuntimeError(f"{len(failed)} jobs failed: {failed[:3]}")
    return len(job_ids), elapsed_s


# ---------------------------------------------------------------------------- the section
def run(settings: Settings) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="vbb-", dir="/tmp"))
    try:
        say("scale: raw pyzmq ROUTER/DEALER")
        zmq_reps = [raw_zmq(tmp) for _ in range(settings.reps)]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    transport = {key: median([r[key] for r in zmq_reps]) for key in zmq_reps[0]}
    say(f"  round trip p99 {transport['rtt_p99_ms']:.3f} ms, pipelined {transport['pipelined_per_s']:.0f}/s")
    registry_rows = []
    for size in settings.scale_sizes:
        say(f"scale: {size} domains")
        row = registry_scale(size, settings.reps)
        row["lookup_p99_ratio"] = ratio(row["lookup_p99_ms"], transport["rtt_p99_ms"])
        registry_rows.append(row)
        listed = f"{row['list_all_s']:.3f} s" if row["list_all_s"] is not None else f"failed ({row['list_all_error']})"
        say(
            f"  define {row['define_per_s']:.0f}/s, lookup p99 {row['lookup_p99_ms']:.3f} ms, "
            f"list all {listed}, raw {row['list_all_raw_s']:.3f} s, RSS {row['broker_rss_mb']:.0f} MB"
        )
    smallest = registry_rows[0]
    for row in registry_rows:
        row["list_all_ratio"] = ratio(row["list_all_s"], smallest["list_all_s"])
        row["list_all_raw_ratio"] = ratio(row["list_all_raw_s"], smallest["list_all_raw_s"])
        row["rss_ratio"] = ratio(row["broker_rss_mb"], smallest["broker_rss_mb"])
        row["define_ratio"] = ratio(row["define_per_s"], smallest["define_per_s"])
    noop_rows = []
    few = unbatched = None
    for workers in settings.noop_worker_counts:
        # With the target's worker count the full run takes turns with one submit a
        # message, on the same cluster.
        both = workers == TARGET_WORKERS and not settings.short
        say(
            f"scale: no-op jobs with {workers} workers" + (", batched and one submit a message in turn" if both else "")
        )
        row, *rest = noop_throughput(workers, settings.noop_reps, batches=(NOOP_BATCH, 1) if both else (NOOP_BATCH,))
        noop_rows.append(row)
        if rest:
            unbatched = rest[0]
        for r in [row, *rest]:
            r["ratio_to_zmq"] = ratio(r["jobs_per_s"], transport["pipelined_per_s"])
            cpu = r["cpu_us_per_job"]
            say(f"  {r['batch']} a message: {r['jobs_per_s']:.0f} jobs/s; CPU per job: broker {cpu['broker']:.0f} µs, "
                f"workers {cpu['workers']:.0f} µs, client {cpu['client']:.0f} µs")
    if not settings.short:
        say(f"scale: no-op jobs with 4 workers of {NOOP_FEW_SLOTS} slots")
        (few,) = noop_throughput(4, settings.noop_reps, slots=NOOP_FEW_SLOTS)
        few["ratio_to_zmq"] = ratio(few["jobs_per_s"], transport["pipelined_per_s"])
        say(f"  {few['jobs_per_s']:.0f} jobs/s")
    return {
        "status": "ok",
        "baseline": "raw pyzmq ROUTER/DEALER echo on ipc:// (same machine); for list/RSS/define the smallest size",
        "note": (
            "Defines are pipelined (200 in flight) and durable; lookups are one at a time through "
            "virtbroker.Client, p99 of 2,000 random names; list all is Client.list(all=True), and "
            "'raw' the same request on a plain DEALER decoded by msgpack alone (no 2 MiB reply limit). "
            "No-op jobs are suspend/resume on libvirt's test:///default, one host per worker process "
            f"({NOOP_DOMAINS} guests, {NOOP_ROUNDS} rounds of suspend and resume per repetition, "
            f"{NOOP_SLOTS} slots per worker), submitted pipelined ({NOOP_WINDOW} in flight, {NOOP_BATCH} submits "
            "a `batch` message, and in the last row one a message, taking turns with the 4-worker row on its "
            "cluster) and waited for with one `wait` for all of them. CPU per job is read from /proc for the "
            "broker, all workers together, and the client."
        ),
        "transport": transport,
        "transport_reps": zmq_reps,
        "registry": registry_rows,
        "noop": noop_rows,
        "noop_few_slots": few,
        "noop_unbatched": unbatched,
    }
