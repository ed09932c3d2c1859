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
    cpu_ledger,
    cpu_snapshot,
    median,
    percentile,
    ratio,
    rss_mb,
    say,
    spread,
    task_dir,
    vb_cluster,
    wait_for_idle_cpu,
)
from bench.verdict import HIGHER, LOWER, decide, interleaved, not_measured, pair_ratios
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
NOOP_SLOTS = 512  # every guest may have a job in flight: the window is the guest count (_run_ops)
NOOP_FEW_SLOTS = 16  # the same run with fewer jobs in flight, for comparison
# A bulk client submits its jobs in batches (one message, one reply, for this many); the
# full run also measures one message per job.
NOOP_BATCH = 100
TARGET_SIZE = 100000  # the registry size the scale targets are for
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
def echo_process(url: str, ready_timeout_s: float = 30.0) -> Iterator[tuple[str, int]]:
    """echo_main in a process of its own, bound and ready; killed on exit. Yields (URL, its pid)."""
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Event()
    server = ctx.Process(target=echo_main, args=(url, ready), daemon=True)
    server.start()
    try:
        if not ready.wait(ready_timeout_s):
            raise RuntimeError("echo server did not start")
        yield url, server.pid
    finally:
        server.kill()
        server.join(timeout=10)


@contextlib.contextmanager
def echo_server(url: str, ready_timeout_s: float = 30.0) -> Iterator[str]:
    """echo_process, yielding the URL alone."""
    with echo_process(url, ready_timeout_s) as (bound, _pid):
        yield bound


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
    _echo_pipelined(sock, frames)
    pipelined_per_s = ZMQ_PIPELINED_MESSAGES / (time.perf_counter() - started)
    return rtts_s, pipelined_per_s


def _echo_pipelined(sock: zmq.Socket, frames: list[bytes], count: int = ZMQ_PIPELINED_MESSAGES) -> None:
    """count round trips with up to WINDOW in flight."""
    sent = received = 0
    while received < count:
        while sent < count and sent - received < WINDOW:
            sock.send_multipart(frames)
            sent += 1
        sock.recv_multipart()
        received += 1


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
            rss_reps: list[float] = []
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
                rss_reps.append(rss_mb(cluster.broker.pid))
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
            "broker_rss_mb": median(rss_reps),
            "broker_rss_mb_reps": rss_reps,
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
ZMQ_WAY = "raw ZeroMQ"


def noop_throughput(
    workers: int, rounds: int, slots: int = NOOP_SLOTS, batches: tuple[int, ...] = (NOOP_BATCH,),
    with_zmq: bool = False, idle_wait_s: float = 30.0, domains: int = NOOP_DOMAINS,
    zmq_messages: int = ZMQ_PIPELINED_MESSAGES, extra: tuple[str, ...] = (),
) -> tuple[list[dict], dict | None]:
    """suspend/resume jobs on test:///default guests: a job whose hypervisor call costs microseconds.

    The broker has no no-op operation; on libvirt's embedded test driver each lifecycle
    worker process is its own host, and suspend and resume return at once, so the rate
    measures the broker, the protocol and the workers' job handling. The client learns
    that its jobs ended the way a bulk client would: one `wait` for all of them. It starts
    once the CPUs are idle (what an earlier section started has ended).

    One row per entry of `batches` (submits per message); with several, their repetitions
    take turns on the same cluster, so that drift of the host lands on each alike. With
    with_zmq, raw pipelined ZeroMQ round trips to an echo process take turns with them too
    (the order flipped each pair): the baseline the ratio target is judged on, in the same
    pairs. Each repetition records a CPU ledger (common.cpu_ledger): per job, the CPU of the
    broker (and of its loop thread alone), the workers and this client, the rest of the
    host, idle and steal; the raw round trips record the same per message for the echo
    process and this client. extra: more options for the broker and workers (the real-time
    row's). Returns (rows, the raw ZeroMQ row or None).
    """
    idle = wait_for_idle_cpu(timeout_s=idle_wait_s)
    rows = {
        batch: {"workers": workers, "slots": slots, "batch": batch, "jobs_per_s_runs": [None] * rounds,
                "ledger_runs": [None] * rounds}
        for batch in batches
    }
    raw = {"way": ZMQ_WAY, "per_s_runs": [None] * rounds, "ledger_runs": [None] * rounds} if with_zmq else None
    with contextlib.ExitStack() as stack:
        cluster = stack.enter_context(vb_cluster(workers, slots, uri="test:///default", extra=list(extra)))
        echo_url, echo_pid = stack.enter_context(echo_process(f"ipc://{cluster.state_dir}/echo.sock")) \
            if with_zmq else (None, None)
        context = zmq.Context()
        sock = _dealer(context, cluster.client_url)
        echo_sock = _dealer(context, echo_url) if with_zmq else None
        try:
            names = [f"{PREFIX}noop-{i:04d}" for i in range(domains)]
            request_ids = iter(range(1, 10**9))
            pipelined(sock, [p.Define(request_id=next(request_ids), xml=minimal_domain_xml(n, "test")) for n in names])
            _run_ops(sock, names, ["start"], request_ids, batches[0])
            me = task_dir(os.getpid())
            groups = {"broker": [task_dir(cluster.broker.pid)], "broker_loop": [task_dir(cluster.broker.pid, True)],
                      "workers": [task_dir(w.pid) for w in cluster.workers.values()], "client": [me]}
            exclusive = ("broker", "workers", "client")
            frames = p.encode(p.Lookup(request_id=1, domain=f"{PREFIX}scale-000001"))
            if with_zmq:
                _echo_pipelined(echo_sock, frames, 2000)  # warm up
            ways: list[int | str] = ([ZMQ_WAY] if with_zmq else []) + list(batches)
            for index, way in interleaved(rounds, ways):
                if way == ZMQ_WAY:
                    zgroups = {"echo": [task_dir(echo_pid)], "client": [me]}
                    before = cpu_snapshot(zgroups)
                    _echo_pipelined(echo_sock, frames, zmq_messages)
                    after = cpu_snapshot(zgroups)
                    raw["per_s_runs"][index] = zmq_messages / (after["wall_s"] - before["wall_s"])
                    raw["ledger_runs"][index] = cpu_ledger(before, after, zmq_messages)
                    continue
                row = rows[way]
                before = cpu_snapshot(groups)
                jobs, _elapsed_s = _run_ops(sock, names, ["suspend", "resume"] * NOOP_ROUNDS, request_ids, way)
                after = cpu_snapshot(groups)
                row["jobs_per_s_runs"][index] = jobs / (after["wall_s"] - before["wall_s"])
                row["ledger_runs"][index] = cpu_ledger(before, after, jobs, exclusive)
        finally:
            sock.close(linger=0)
            if echo_sock is not None:
                echo_sock.close(linger=0)
            context.term()
    for row in [*rows.values(), *([raw] if raw else [])]:
        rates = row.get("jobs_per_s_runs") or row["per_s_runs"]
        row["per_s"] = spread(rates)
        row["jobs_per_s"] = row["per_s"]["median"]
        ledgers = [r for r in row["ledger_runs"] if r]
        row["ledger"] = {key: median([r[key] for r in ledgers]) for key in (ledgers[0] if ledgers else {})}
        row["cpu_idle_before"] = idle
    return list(rows.values()), raw


def _run_ops(sock, names, ops, request_ids, batch: int) -> tuple[int, float]:
    """Submit every op for every name (pipelined), then wait for all of them to end."""
    requests = [p.Submit(request_id=next(request_ids), domain=n, op=op) for op in ops for n in names]
    started = time.perf_counter()
    job_ids = [job["job_id"] for job in pipelined(sock, requests, window=len(names), batch=batch)]
    (waited,) = pipelined(sock, [p.Wait(request_id=next(request_ids), job_ids=job_ids, timeout_s=300)], timeout_s=310)
    elapsed_s = time.perf_counter() - started
    if waited["timed_out"]:
        raise RuntimeError(f"no-op jobs unfinished after 300 s: {sum(not j['finished_at'] for j in waited['jobs'])}")
    failed = [f"{j['op']}: {j['state']} {j['error']}" for j in waited["jobs"] if j["state"] != "succeeded"]
    if failed:
        raise RuntimeError(f"{len(failed)} jobs failed: {failed[:3]}")
    return len(job_ids), elapsed_s


# ---------------------------------------------------------------------------- the section
NOOP_LIMIT = 10000.0
RT_PRIORITY = 10  # the real-time row's realtime_priority (as bench.latency's)
NOOP_ZMQ_LIMIT = 0.25


def run(settings: Settings) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="vbb-", dir="/tmp"))
    try:
        say("scale: raw pyzmq ROUTER/DEALER")
        zmq_reps = [raw_zmq(tmp) for _ in range(settings.rounds(False))]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    transport = {key: median([r[key] for r in zmq_reps]) for key in zmq_reps[0]}
    say(f"  round trip p99 {transport['rtt_p99_ms']:.3f} ms, pipelined {transport['pipelined_per_s']:.0f}/s")
    registry_rows = []
    for size in settings.scale_sizes:
        say(f"scale: {size} domains")
        row = registry_scale(size, settings.rounds(True))
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
    few = unbatched = raw = None
    for workers in settings.noop_worker_counts:
        # With the target's worker count, raw ZeroMQ round trips take turns with the no-op
        # repetitions (the ratio target's pairs), and the full run adds one submit a message.
        target = workers == TARGET_WORKERS
        batches = (NOOP_BATCH, 1) if target and not settings.short else (NOOP_BATCH,)
        say(f"scale: no-op jobs with {workers} workers" + (", taking turns with raw ZeroMQ" if target else ""))
        (row, *rest), zmq_row = noop_throughput(workers, settings.rounds(target), batches=batches, with_zmq=target,
                                                idle_wait_s=settings.idle_wait_s,
                                                domains=settings.noop_domains, zmq_messages=settings.zmq_messages)
        noop_rows.append(row)
        if rest:
            unbatched = rest[0]
        if zmq_row:
            raw = zmq_row
            say(f"  raw ZeroMQ pipelined: {raw['jobs_per_s']:.0f} round trips/s")
        for r in [row, *rest]:
            r["ratio_to_zmq"] = ratio(r["jobs_per_s"], (raw or {}).get("jobs_per_s") or transport["pipelined_per_s"])
            led = r["ledger"]
            say(f"  {r['batch']} a message: {r['jobs_per_s']:.0f} jobs/s; CPU per job: broker "
                f"{led['broker_us']:.0f} µs (loop thread {led['broker_loop_us']:.0f}), workers "
                f"{led['workers_us']:.0f} µs, client {led['client_us']:.0f} µs, rest of host "
                f"{led['other_us']:.0f} µs, idle {led['idle_us']:.0f} µs")
    rt = rt_raw = None
    if raw is not None and not settings.short:  # the smoke run has no time for it
        say(f"scale: no-op jobs with {TARGET_WORKERS} workers, the broker with realtime_priority {RT_PRIORITY}, "
            "taking turns with raw ZeroMQ")
        (rt,), rt_raw = noop_throughput(TARGET_WORKERS, settings.rounds(True), with_zmq=True,
                                        idle_wait_s=settings.idle_wait_s, domains=settings.noop_domains,
                                        zmq_messages=settings.zmq_messages,
                                        extra=("--realtime-priority", str(RT_PRIORITY)))
        rt["realtime_priority"] = RT_PRIORITY
        rt["ratio_to_zmq"] = ratio(rt["jobs_per_s"], rt_raw["jobs_per_s"])
        say(f"  {rt['jobs_per_s']:.0f} jobs/s, {rt['ratio_to_zmq']:.3f}x raw ZeroMQ "
            f"({rt_raw['jobs_per_s']:.0f} round trips/s)")
    if not settings.short:
        say(f"scale: no-op jobs with 4 workers of {NOOP_FEW_SLOTS} slots")
        (few,), _ = noop_throughput(4, settings.rounds(False), slots=NOOP_FEW_SLOTS,
                                   idle_wait_s=settings.idle_wait_s, domains=settings.noop_domains)
        few["ratio_to_zmq"] = ratio(few["jobs_per_s"], (raw or {}).get("jobs_per_s") or transport["pipelined_per_s"])
        say(f"  {few['jobs_per_s']:.0f} jobs/s")
    return {
        "status": "ok",
        "baseline": "raw pyzmq ROUTER/DEALER echo on ipc:// (same machine); for list/RSS/define the smallest size",
        "note": (
            "Defines are pipelined (200 in flight) and durable; lookups are one at a time through "
            "virtbroker.Client, p99 of 2,000 random names; list all is Client.list(all=True), and "
            "'raw' the same request on a plain DEALER decoded by msgpack alone (no 2 MiB reply limit). "
            "No-op jobs are suspend/resume on libvirt's test:///default, one host per worker process "
            f"({settings.noop_domains} guests, {NOOP_ROUNDS} rounds of suspend and resume per repetition, "
            f"{NOOP_SLOTS} slots per worker), submitted pipelined (as many in flight as guests, {NOOP_BATCH} submits "
            "a `batch` message, and in the full run's extra row one a message, taking turns with the 4-worker "
            "row on its cluster) and waited for with one `wait` for all of them. With 4 workers, "
            f"{settings.zmq_messages:,} raw pipelined ZeroMQ round trips ({WINDOW} in flight) to an echo process "
            "take turns with the no-op repetitions on the same host, the order flipped each pair. The CPU "
            "ledger is read from /proc before and after each repetition: per job (per round trip for raw "
            "ZeroMQ), the CPU of each process group, the rest of the host, idle and steal; together they add "
            "up to the two cores' capacity over the wall time."
        ),
        "transport": transport,
        "transport_reps": zmq_reps,
        "registry": registry_rows,
        "noop": noop_rows,
        "noop_zmq": raw,
        "noop_few_slots": few,
        "noop_unbatched": unbatched,
        "noop_realtime": rt,
        "noop_realtime_zmq": rt_raw,
        "targets": targets(registry_rows, noop_rows, raw, rt, rt_raw),
    }


def targets(registry_rows: list[dict], noop_rows: list[dict], raw: dict | None, rt: dict | None = None,
            rt_raw: dict | None = None) -> list[dict]:
    out = []
    row = max(registry_rows, key=lambda r: r["size"])
    size = row["size"]
    unjudged = None if size >= TARGET_SIZE else f"{size:,} domains, the targets are for {TARGET_SIZE:,}"
    out.append(decide(f"{size:,} domains: lookup p99", row["lookup_p99_ms_reps"], 0.5, LOWER, fmt="{:.3f} ms",
                      unjudged=unjudged, counted="runs"))
    if row.get("list_all_error"):
        out.append(not_measured(f"{size:,} domains: list all", "<= 0.5 s",
                                f"Client.list(all=True) fails: {row['list_all_error']}; raw request and msgpack decode "
                                f"{row['list_all_raw_s']:.3f} s"))
    else:
        out.append(decide(f"{size:,} domains: list all", row["list_all_s_reps"], 0.5, LOWER, fmt="{:.3f} s",
                          unjudged=unjudged, counted="runs"))
    out.append(decide(f"{size:,} domains: broker RSS", row["broker_rss_mb_reps"], 400, LOWER, fmt="{:.0f} MB",
                      unjudged=unjudged, counted="runs"))
    noop = next((r for r in noop_rows if r["workers"] == TARGET_WORKERS), None)
    if noop is None:
        return out + [not_measured(f"No-op jobs with {TARGET_WORKERS} workers", ">= 10,000 /s", "not run")]
    # The broker as configured by default, then (when it ran) with realtime_priority.
    for row, row_raw, who in ((noop, raw, ""), (rt, rt_raw, f", the broker with realtime_priority {RT_PRIORITY}")):
        if row is None:
            continue
        out.append(decide(f"No-op jobs with {TARGET_WORKERS} workers ({row['batch']} submits a message){who}",
                          row["jobs_per_s_runs"], NOOP_LIMIT, HIGHER, fmt="{:,.0f} /s", counted="runs"))
        zmq_runs = row_raw["per_s_runs"] if row_raw else []
        zmq = (row_raw or {}).get("per_s") or {}
        out.append(decide(
            f"No-op jobs with {TARGET_WORKERS} workers{who} / raw pipelined ZeroMQ round trips in the same pairs",
            pair_ratios(list(zip(zmq_runs, row["jobs_per_s_runs"]))), NOOP_ZMQ_LIMIT, HIGHER, fmt="{:.3f}x",
            note="" if zmq.get("median") is None else
            f"raw ZeroMQ {zmq['median']:,.0f} round trips/s ({zmq['min']:,.0f} to {zmq['max']:,.0f})",
        ))
    return out
