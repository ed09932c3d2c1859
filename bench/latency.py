"""Section 3: control-plane latency (lookup, define) during a start storm, through virtbroker and libvirt."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import time

import libvirt

from bench.common import (
    PREFIX,
    SETTLE_S,
    Settings,
    check_jobs,
    cleanup_guests,
    connections,
    guest_xml,
    median,
    open_libvirt,
    parallel,
    ratio,
    say,
    summary_ms,
    vb_client,
    vb_cluster,
)
from bench.scale import echo_server

PROBE_PERIOD_S = 0.005
PROBE_READY_TIMEOUT_S = 30.0
VB_WORKERS = 4
# virtbroker's probe is a Client on the broker's host: it connects to the local endpoint. The
# full run also puts two probes in one storm, one on each transport, to compare them.
VB_WAY = f"virtbroker-{VB_WORKERS}w"
PAIRED_LOCAL_WAY = f"{VB_WAY}, paired: local"
PAIRED_ZMQ_WAY = f"{VB_WAY}, paired: ZeroMQ"


def probe_main(mode: str, target: str, names: list[str], go, stop, out) -> None:
    """In its own process (no GIL shared with the storm): every 5 ms look up a storm guest and
    define a new name, timing each call; sends {"lookup_s": [...], "define_s": [...]} at the end."""
    lookups: list[float] = []
    defines: list[float] = []
    errors: list[str] = []
    defined: list[str] = []
    tag = f"{PREFIX}p{os.getpid()}-"
    if mode == "libvirt":
        conn = open_libvirt(target)
        lookup = conn.lookupByName
        define = conn.defineXML
    elif mode == "fsync":
        # The disk's own share of a durable define: a 4 KiB append and fsync on the file
        # system of the broker's state dir, nothing else.
        fd = os.open(os.path.join(target, "fsync-probe"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        block = b"x" * 4096

        def lookup(_name):
            pass

        def define(_xml):
            os.write(fd, block)
            os.fsync(fd)
    elif mode == "echo":
        # The floor for any control plane on this host: one round trip over a local socket
        # to a process that answers at once (bench.scale.echo_main), ZeroMQ or, for a
        # unix:// target, the local endpoint's stream through the client's own transport.
        import zmq

        from virtbroker.common import protocol as p
        from virtbroker.common.stream import StreamSocket, is_stream_url

        if is_stream_url(target):
            sock = StreamSocket(target)
        else:
            sock = zmq.Context().socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(target)
        frames = p.encode(p.Lookup(request_id=1, domain=names[0]))

        def lookup(_name):
            sock.send_multipart(frames)
            sock.recv_multipart()

        def define(_xml):
            pass
    else:
        from virtbroker.client.api import Client

        client = Client(target, timeout_s=30)
        lookup = client.lookup
        define = client.define
    out.put("ready")
    go.wait(PROBE_READY_TIMEOUT_S)
    i = 0
    next_s = time.monotonic()
    try:
        while not stop.is_set():
            name = f"{tag}{i:05d}"
            xml = guest_xml(name)
            try:
                t0 = time.perf_counter()
                lookup(names[i % len(names)])
                t1 = time.perf_counter()
                define(xml)
                t2 = time.perf_counter()
                lookups.append(t1 - t0)
                defines.append(t2 - t1)
                defined.append(name)
            except Exception as e:  # reported with the results; a probe error is a finding
                errors.append(str(e)[:200])
            i += 1
            # A fixed 5 ms schedule, not "5 ms after the last answer": a slow answer must
            # not thin out the samples taken while the control plane is slow.
            next_s += PROBE_PERIOD_S
            delay_s = next_s - time.monotonic()
            if delay_s > 0:
                time.sleep(delay_s)
    finally:
        if mode == "libvirt":
            for name in defined:
                with contextlib.suppress(libvirt.libvirtError):
                    conn.lookupByName(name).undefine()
        out.put({"lookup_s": lookups, "define_s": defines, "errors": errors[:20], "error_count": len(errors)})


class Probe:
    """The probe process, started before the storm and stopped when the storm ends."""

    def __init__(self, mode: str, target: str, names: list[str]):
        ctx = multiprocessing.get_context("spawn")
        self.go, self.stop, self.out = ctx.Event(), ctx.Event(), ctx.Queue()
        self.proc = ctx.Process(
            target=probe_main, args=(mode, target, names, self.go, self.stop, self.out), daemon=True
        )

    def __enter__(self) -> Probe:
        self.proc.start()
        if self.out.get(timeout=PROBE_READY_TIMEOUT_S) != "ready":
            raise RuntimeError("probe did not start")
        self.go.set()
        return self

    def finish(self) -> dict:
        self.stop.set()
        result = self.out.get(timeout=120)
        self.proc.join(timeout=30)
        return result

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.proc.join(timeout=30)
        if self.proc.is_alive():
            self.proc.kill()


def libvirt_run(conn: libvirt.virConnect, n: int) -> dict:
    names = [f"{PREFIX}l{i:02d}" for i in range(n)]
    try:
        for name in names:
            conn.defineXML(guest_xml(name))
        with connections(n) as own, Probe("libvirt", conn.getURI(), names) as probe:
            # Each starting thread has its own connection, as in the storm baseline.
            doms = [c.lookupByName(name) for c, name in zip(own, names)]
            started = time.monotonic()
            parallel(lambda dom: dom.create(), doms)
            storm_s = time.monotonic() - started
            samples = probe.finish()
        return {"storm_s": storm_s, **samples}
    finally:
        cleanup_guests(conn)


def vb_run(conn: libvirt.virConnect, n: int, mode: str = "single") -> dict:
    """The storm through virtbroker, with probes by mode:

    - single: the virtbroker probe on the local endpoint, alone, as libvirt's probe is alone
      in its storm (on 2 cores every probe process adds load);
    - paired: two virtbroker probes side by side, one on the local endpoint and one on the
      ZeroMQ client endpoint, so both transports meet the same storm;
    - floors: a raw fsync probe (what the disk alone costs a durable define) and two raw
      echo probes, over ZeroMQ and over a UNIX stream (what one local round trip costs on
      this host during the storm).

    Returns {"storm_s": ..., "probes": {label: the probe's samples}}.
    """
    names = [f"{PREFIX}l{i:02d}" for i in range(n)]
    slots = -(-n // VB_WORKERS)
    try:
        with vb_cluster(VB_WORKERS, slots) as cluster:
            c = vb_client(cluster)
            for name in names:
                c.define(guest_xml(name))
            with contextlib.ExitStack() as stack:
                if mode == "floors":
                    echo_url = stack.enter_context(echo_server(f"ipc://{cluster.state_dir}/echo.sock"))
                    stream_url = stack.enter_context(echo_server(f"unix://{cluster.state_dir}/echo-stream.sock"))
                    targets = {"fsync": ("fsync", str(cluster.state_dir)), "echo": ("echo", echo_url),
                               "stream_echo": ("echo", stream_url)}
                elif mode == "paired":
                    targets = {"local": ("virtbroker", cluster.local_url), "zeromq": ("virtbroker", cluster.client_url)}
                else:
                    targets = {"local": ("virtbroker", cluster.local_url)}
                probes = {label: stack.enter_context(Probe(kind, url, names)) for label, (kind, url) in targets.items()}
                started = time.monotonic()
                finals = c.wait([c.submit(name, "start")["job_id"] for name in names], 300)
                storm_s = time.monotonic() - started
                samples = {label: probe.finish() for label, probe in probes.items()}
            check_jobs(finals, "start")
            c.wait([c.submit(name, "destroy")["job_id"] for name in names], 300)
        return {"storm_s": storm_s, "probes": samples}
    finally:
        cleanup_guests(conn)


def _rep_row(storm_s: float, samples: dict) -> dict:
    return {"lookup": summary_ms(samples["lookup_s"]), "define": summary_ms(samples["define_s"]), "storm_s": storm_s,
            "probe_errors": samples["error_count"], "probe_error_samples": samples["errors"][:3]}


def run(settings: Settings, conn: libvirt.virConnect) -> dict:
    rows: dict[tuple[int, str], dict] = {}

    def row_for(n: int, way: str) -> dict:
        return rows.setdefault((n, way), {"n": n, "way": way, "reps": [], "floor_reps": [], "errors": []})

    for rep in range(settings.reps):
        for n in settings.latency_ns:
            ways = ["libvirt", VB_WAY]
            if not settings.short:  # these explain the full run's verdicts; the smoke run has no time for them
                ways += ["paired", "floors"]
            for way in ways:
                say(f"latency rep {rep + 1}/{settings.reps}: N={n} {way}")
                # The floors belong with virtbroker's row: the same storm, another run of it.
                first = row_for(n, {"paired": PAIRED_LOCAL_WAY, "floors": VB_WAY}.get(way, way))
                try:
                    result = (
                        libvirt_run(conn, n) if way == "libvirt" else vb_run(conn, n, {VB_WAY: "single"}.get(way, way))
                    )
                except Exception as e:
                    say(f"  failed: {e}")
                    first["errors"].append(str(e)[:500])
                    continue
                storm_s = result["storm_s"]
                if way == "libvirt":
                    measured = {"libvirt": result}
                elif way == "floors":
                    floors = result["probes"]
                    rep_row = {
                        "fsync": summary_ms(floors["fsync"]["define_s"]),
                        "echo": summary_ms(floors["echo"]["lookup_s"]),
                        "stream_echo": summary_ms(floors["stream_echo"]["lookup_s"]),
                        "storm_s": storm_s,
                        "probe_errors": sum(f["error_count"] for f in floors.values()),
                        "probe_error_samples": [e for f in floors.values() for e in f["errors"]][:3],
                    }
                    first["floor_reps"].append(rep_row)
                    say(
                        f"  storm {storm_s:.2f} s; echo p99 {rep_row['echo']['p99_ms']:.2f} ms (ZeroMQ), "
                        f"{rep_row['stream_echo']['p99_ms']:.2f} ms (stream), "
                        f"fsync p99 {rep_row['fsync']['p99_ms']:.2f} ms"
                    )
                    time.sleep(SETTLE_S)
                    continue
                elif way == "paired":
                    measured = {PAIRED_LOCAL_WAY: result["probes"]["local"], PAIRED_ZMQ_WAY: result["probes"]["zeromq"]}
                else:
                    measured = {VB_WAY: result["probes"]["local"]}
                for row_way, samples in measured.items():
                    rep_row = _rep_row(storm_s, samples)
                    row_for(n, row_way)["reps"].append(rep_row)
                    say(
                        f"  storm {storm_s:.2f} s; {row_way}: lookup p99 {rep_row['lookup']['p99_ms']:.2f} ms, "
                        f"define p99 {rep_row['define']['p99_ms']:.2f} ms ({rep_row['lookup']['count']} samples)"
                    )
                time.sleep(SETTLE_S)
    out = []
    for row in rows.values():
        for op in ("lookup", "define"):
            for stat in ("p50_ms", "p99_ms", "max_ms"):
                row[f"{op}_{stat}"] = median([r[op][stat] for r in row["reps"] if r[op][stat] is not None])
        for floor in ("fsync", "echo", "stream_echo"):
            floors = [r[floor] for r in row["floor_reps"] if floor in r]
            for stat in ("p50_ms", "p99_ms", "max_ms"):
                row[f"{floor}_{stat}"] = median([f[stat] for f in floors if f[stat] is not None]) if floors else None
        row["samples"] = sum(r["lookup"]["count"] for r in row["reps"])
        out.append(row)
    for row in out:
        base = rows.get((row["n"], "libvirt"), {})
        if row["way"] in (PAIRED_LOCAL_WAY, PAIRED_ZMQ_WAY):
            continue  # two probes in one storm: compare them with each other, not with libvirt's one
        for key in (
            "lookup_p50_ms",
            "lookup_p99_ms",
            "lookup_max_ms",
            "define_p50_ms",
            "define_p99_ms",
            "define_max_ms",
        ):
            row[key.replace("_ms", "_ratio")] = ratio(row.get(key), base.get(key))
    return {
        "status": "ok",
        "baseline": "libvirt",
        "note": (
            "A separate process looks up a storm guest and defines a new name every 5 ms while N "
            "pre-defined guests start (one thread and connection per guest for libvirt; 4 lifecycle workers for "
            "virtbroker). virtbroker's probe is a Client on the local endpoint (a UNIX stream socket). "
            "virtbroker's define is durable: the broker fsyncs its SQLite WAL before it replies. "
            "In the full run, two more virtbroker storms follow each. The 'paired' one carries two virtbroker "
            "probes side by side, one on the local endpoint and one on the ZeroMQ client endpoint: the two "
            "transports in the same storm (with two probes' load, so not comparable with the other rows). The "
            "other carries raw probes instead: one appends 4 KiB and fsyncs every 5 ms on the state dir's "
            "file system (the "
            "disk's own floor for a durable define), two send a lookup-sized message to an echo process and "
            "wait for it, over ZeroMQ and over a UNIX stream (the floor for any lookup over that transport "
            "during the storm). "
            "Percentiles are per repetition; the table shows their median."
        ),
        "rows": out,
    }
