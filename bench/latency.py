"""Section 3: control-plane latency (lookup, define) during a start storm, through virtbroker and libvirt."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import shutil
import tempfile
import time

import libvirt

from bench.common import (
    PREFIX,
    Settings,
    check_jobs,
    cleanup_guests,
    connections,
    guest_xml,
    open_libvirt,
    parallel,
    say,
    spread,
    summary_ms,
    vb_client,
    vb_cluster,
)
from bench.scale import echo_server
from bench.verdict import LOWER, decide, pair_order, pair_ratios

PROBE_PERIOD_S = 0.005
PROBE_READY_TIMEOUT_S = 30.0
VB_WORKERS = 4
# virtbroker's probe is a Client on the broker's host: it connects to the local endpoint. The
# full run also puts two probes in one storm, one on each transport, to compare them.
VB_WAY = f"virtbroker-{VB_WORKERS}w"
# The same storm with the broker's loop in the real-time class (the realtime_priority option,
# off by default): each target is judged for both, so a reader sees what the option buys.
RT_PRIORITY = 10
VB_RT_WAY = f"{VB_WAY}, realtime_priority {RT_PRIORITY}"
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


def libvirt_run(conn: libvirt.virConnect, n: int, fsync_dir: str | None = None) -> dict:
    """N pre-defined guests started by one thread and connection each (to conn's URI, so
    the gateway section runs the same storm through its socket), a libvirt probe alongside,
    and with fsync_dir a raw fsync probe on that folder's disk too.

    Returns the libvirt probe's samples, storm_s, and "fsync": the fsync probe's samples or None.
    """
    names = [f"{PREFIX}l{i:02d}" for i in range(n)]
    uri = conn.getURI()
    try:
        for name in names:
            conn.defineXML(guest_xml(name))
        with contextlib.ExitStack() as stack:
            own = stack.enter_context(connections(n, uri=uri))
            probe = stack.enter_context(Probe("libvirt", uri, names))
            fsync = stack.enter_context(Probe("fsync", fsync_dir, names)) if fsync_dir else None
            # Each starting thread has its own connection, as in the storm baseline.
            doms = [c.lookupByName(name) for c, name in zip(own, names)]
            started = time.monotonic()
            parallel(lambda dom: dom.create(), doms)
            storm_s = time.monotonic() - started
            samples = probe.finish()
            fsync_samples = fsync.finish() if fsync else None
        return {"storm_s": storm_s, **samples, "fsync": fsync_samples}
    finally:
        cleanup_guests(conn)


def vb_run(conn: libvirt.virConnect, n: int, mode: str = "single", extra: tuple[str, ...] = ()) -> dict:
    """The storm through virtbroker, with two probe processes by mode, as libvirt's storm has:

    - single: the virtbroker probe on the local endpoint, and a raw fsync probe on the
      broker's state dir (what the disk alone costs a durable define, in the same storm);
    - paired: two virtbroker probes side by side, one on the local endpoint and one on the
      ZeroMQ client endpoint, so both transports meet the same storm;
    - floors: two raw echo probes, over ZeroMQ and over a UNIX stream (what one local round
      trip costs on this host during the storm).

    extra: more options for the broker and workers (the real-time way's).

    Returns {"storm_s": ..., "probes": {label: the probe's samples}}.
    """
    names = [f"{PREFIX}l{i:02d}" for i in range(n)]
    slots = -(-n // VB_WORKERS)
    try:
        with vb_cluster(VB_WORKERS, slots, extra=list(extra)) as cluster:
            c = vb_client(cluster)
            for name in names:
                c.define(guest_xml(name))
            with contextlib.ExitStack() as stack:
                if mode == "floors":
                    echo_url = stack.enter_context(echo_server(f"ipc://{cluster.state_dir}/echo.sock"))
                    stream_url = stack.enter_context(echo_server(f"unix://{cluster.state_dir}/echo-stream.sock"))
                    targets = {"echo": ("echo", echo_url), "stream_echo": ("echo", stream_url)}
                elif mode == "paired":
                    targets = {"local": ("virtbroker", cluster.local_url), "zeromq": ("virtbroker", cluster.client_url)}
                else:
                    targets = {"local": ("virtbroker", cluster.local_url), "fsync": ("fsync", str(cluster.state_dir))}
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


def _run_row(storm_s: float, samples: dict, fsync: dict | None = None) -> dict:
    return {"storm_s": storm_s, "lookup": summary_ms(samples["lookup_s"]), "define": summary_ms(samples["define_s"]),
            "fsync": summary_ms(fsync["define_s"]) if fsync else None,
            "probe_errors": samples["error_count"] + (fsync["error_count"] if fsync else 0),
            "probe_error_samples": samples["errors"][:3]}


LIBVIRT_WAY = "libvirt"
FLOORS_WAY = f"{VB_WAY}, raw echo floors"
LOOKUP_P99_LIMIT = 1.0  # x libvirtd's p99 in the same pair
LOOKUP_MAX_LIMIT = 0.1  # x libvirtd's max in the same pair
DEFINE_FSYNC_LIMIT = 1.2  # x the raw fsync p99 in the same storm
STATS = ("p50_ms", "p99_ms", "p999_ms", "max_ms")


def run(settings: Settings, conn: libvirt.virConnect) -> dict:
    """Pairs of storms: libvirt (its probe and an fsync probe) and virtbroker (its probe and an
    fsync probe), the order flipped each pair; the full run adds, in its first pairs, a storm
    with two virtbroker probes (local endpoint and ZeroMQ) and one with the raw echo floors."""
    n = max(settings.latency_ns)
    rounds = settings.rounds(True)
    # libvirt in the middle: both judged ways run next to it, either way round. The smoke run
    # has no time for the real-time way.
    ways = [LIBVIRT_WAY, VB_WAY] if settings.short else [VB_RT_WAY, LIBVIRT_WAY, VB_WAY]
    if not settings.short:  # these explain the full run's verdicts; the smoke run has no time for them
        ways += ["paired", "floors"]
    runs: dict[str, list[dict | None]] = {
        way: [None] * rounds
        for way in (LIBVIRT_WAY, VB_WAY, VB_RT_WAY, PAIRED_LOCAL_WAY, PAIRED_ZMQ_WAY, FLOORS_WAY)
    }
    errors: dict[str, list[str]] = {way: [] for way in runs}
    fsync_dir = tempfile.mkdtemp(prefix="vbb-fsync-", dir="/tmp")  # the broker's state dirs' disk
    try:
        for index in range(rounds):
            judged = [w for w in ways if w in (LIBVIRT_WAY, VB_WAY, VB_RT_WAY) or index < settings.rounds(False)]
            for way in pair_order(index, judged):
                say(f"latency pair {index + 1}/{rounds}: N={n} {way}")
                row_way = {"paired": PAIRED_LOCAL_WAY, "floors": FLOORS_WAY}.get(way, way)
                try:
                    if way == LIBVIRT_WAY:
                        result = libvirt_run(conn, n, fsync_dir=fsync_dir)
                    elif way == VB_RT_WAY:
                        result = vb_run(conn, n, "single", ("--realtime-priority", str(RT_PRIORITY)))
                    else:
                        result = vb_run(conn, n, {VB_WAY: "single"}.get(way, way))
                except Exception as e:
                    say(f"  failed: {e}")
                    errors[row_way].append(str(e)[:500])
                    continue
                storm_s = result["storm_s"]
                if way == LIBVIRT_WAY:
                    made = {LIBVIRT_WAY: _run_row(storm_s, result, result["fsync"])}
                elif way == "floors":
                    floors = result["probes"]
                    made = {FLOORS_WAY: {
                        "storm_s": storm_s,
                        "echo": summary_ms(floors["echo"]["lookup_s"]),
                        "stream_echo": summary_ms(floors["stream_echo"]["lookup_s"]),
                        "probe_errors": sum(f["error_count"] for f in floors.values()),
                    }}
                elif way == "paired":
                    made = {PAIRED_LOCAL_WAY: _run_row(storm_s, result["probes"]["local"]),
                            PAIRED_ZMQ_WAY: _run_row(storm_s, result["probes"]["zeromq"])}
                else:
                    made = {way: _run_row(storm_s, result["probes"]["local"], result["probes"]["fsync"])}
                for label, row in made.items():
                    runs[label][index] = row
                    say(f"  storm {storm_s:.2f} s; {label}: " + _progress(row))
                time.sleep(settings.settle_s)
    finally:
        shutil.rmtree(fsync_dir, ignore_errors=True)
    rows = []
    for way, way_runs in runs.items():
        done = [r for r in way_runs if r is not None]
        if not done and not errors[way]:
            continue
        row = {"n": n, "way": way, "runs": way_runs, "pairs": len(done), "errors": errors[way],
               "storm_s": spread([r["storm_s"] for r in done]),
               "probe_errors": sum(r["probe_errors"] for r in done)}
        for probe in ("lookup", "define", "fsync", "echo", "stream_echo"):
            for stat in STATS:
                # The median over runs of each run's percentile, with their min and max.
                row[f"{probe}_{stat}"] = spread([(r.get(probe) or {}).get(stat) for r in done])
        row["samples"] = sum((r.get("lookup") or r.get("echo") or {}).get("count", 0) for r in done)
        rows.append(row)
    return {
        "status": "ok",
        "baseline": "libvirt (one thread and connection per guest), and the raw fsync probe in the same storm",
        "note": (
            f"A separate process looks up a storm guest and defines a new name every 5 ms while N={n} "
            "pre-defined guests start (one thread and connection per guest for libvirt; 4 lifecycle workers for "
            "virtbroker). virtbroker's probe is a Client on the local endpoint (a UNIX stream socket). "
            "virtbroker's define is durable: the broker fsyncs its SQLite WAL before it replies. Every storm "
            "carries two probe processes: beside libvirt's or virtbroker's probe, a raw probe appends 4 KiB and "
            "fsyncs every 5 ms on the file system of the broker's state dir (the disk's own floor for a durable "
            "define, in the same storm). Pairs: a libvirt storm and two virtbroker storms, one as configured by "
            f"default and one with realtime_priority {RT_PRIORITY} (the broker's loop and store writer in SCHED_RR; "
            "off by default), libvirt's between them and the order flipped each pair; each target is judged for "
            f"both. The full run adds, in its first {settings.rounds(False)} pairs, a storm with two virtbroker "
            "probes side by side (local endpoint and ZeroMQ: the two transports in the same storm) and one "
            "with two raw echo probes instead (a lookup-sized message to an echo process and back, over "
            "ZeroMQ and over a UNIX stream: the floor for any lookup over that transport during the storm). "
            "Each figure is the median over storms of that storm's percentile (min to max beside it)."
        ),
        "pairs": rounds,
        "rows": rows,
        "targets": targets(runs, settings, n),
    }


def _progress(row: dict) -> str:
    if "echo" in row:
        return (f"echo p99 {row['echo']['p99_ms']:.2f} ms (ZeroMQ), {row['stream_echo']['p99_ms']:.2f} ms "
                f"(stream)")
    text = (f"lookup p99 {row['lookup']['p99_ms']:.2f} ms max {row['lookup']['max_ms']:.1f} ms, "
            f"define p99 {row['define']['p99_ms']:.2f} ms ({row['lookup']['count']} samples)")
    if row.get("fsync"):
        text += f", fsync p99 {row['fsync']['p99_ms']:.2f} ms"
    return text


def _stat(run: dict | None, probe: str, stat: str) -> float | None:
    return ((run or {}).get(probe) or {}).get(stat)


def _against_default_fsync(rt: list[dict | None], default: list[dict | None]) -> str:
    """A real-time broker is scheduled ahead of the raw fsync probe in its own storm, which
    raises that probe's p99; the note adds its define p99 against the fsync p99 of the
    default broker's storm in the same pair, where the probe was not pushed back."""
    fsync = spread([_stat(r, "fsync", "p99_ms") for r in rt])
    other = spread([_stat(r, "fsync", "p99_ms") for r in default])
    cross = spread(pair_ratios([(_stat(d, "fsync", "p99_ms"), _stat(r, "define", "p99_ms"))
                                for r, d in zip(rt, default)]))
    if cross["median"] is None:
        return ""
    return (f"; the real-time broker slows the fsync probe in its own storm (its p99 {fsync['median']:.2f} ms, "
            f"{other['median']:.2f} ms in the default broker's storms): against the fsync p99 of the default "
            f"broker's storm in the same pair, define p99 is {cross['median']:.2f}x "
            f"({cross['min']:.2f} to {cross['max']:.2f})")


def targets(runs: dict[str, list[dict | None]], settings: Settings, n: int) -> list[dict]:
    """The three latency targets for the default broker, then for the real-time one."""
    lv = runs[LIBVIRT_WAY]
    unjudged = None if n == 20 else f"N={n}, the targets are for N=20"

    def ms(values: list[float | None]) -> str:
        sp = spread(values)
        return "-" if sp["median"] is None else f"{sp['median']:.2f} ms ({sp['min']:.2f} to {sp['max']:.2f})"

    lv_define_fsync = pair_ratios([(_stat(r, "fsync", "p99_ms"), _stat(r, "define", "p99_ms")) for r in lv if r])
    lv_df = spread(lv_define_fsync)
    out = []
    for way, who in ((VB_WAY, "virtbroker"), (VB_RT_WAY, f"virtbroker with realtime_priority {RT_PRIORITY}")):
        vb = runs[way]
        if not any(vb):
            continue

        def pairs(stat: str, vb=vb) -> list[tuple[float | None, float | None]]:
            return [(_stat(b, "lookup", stat), _stat(s, "lookup", stat)) for b, s in zip(lv, vb)]

        out += [
            decide(
                f"Lookup p99 during the N={n} start storm: {who} / libvirtd",
                pair_ratios(pairs("p99_ms")), LOOKUP_P99_LIMIT, LOWER, limit_text="<= libvirtd's (1.00x)",
                unjudged=unjudged,
                note=f"virtbroker {ms([_stat(r, 'lookup', 'p99_ms') for r in vb])}, "
                     f"libvirtd {ms([_stat(r, 'lookup', 'p99_ms') for r in lv])}",
            ),
            decide(
                f"Lookup max during the N={n} start storm: {who} / libvirtd",
                pair_ratios(pairs("max_ms")), LOOKUP_MAX_LIMIT, LOWER, limit_text="<= a tenth of libvirtd's (0.10x)",
                fmt="{:.3f}x", unjudged=unjudged,
                note=f"virtbroker {ms([_stat(r, 'lookup', 'max_ms') for r in vb])}, "
                     f"libvirtd {ms([_stat(r, 'lookup', 'max_ms') for r in lv])}",
            ),
            decide(
                f"Durable define p99 during the N={n} start storm / raw fsync p99 in the same storm: {who}",
                pair_ratios([(_stat(r, "fsync", "p99_ms"), _stat(r, "define", "p99_ms")) for r in vb if r]),
                DEFINE_FSYNC_LIMIT, LOWER, unjudged=unjudged,
                note=f"define {ms([_stat(r, 'define', 'p99_ms') for r in vb])}, "
                     f"fsync {ms([_stat(r, 'fsync', 'p99_ms') for r in vb])}; libvirtd's define p99 / fsync p99 in "
                     + ("its storms: -" if lv_df["median"] is None else
                        f"its storms: {lv_df['median']:.2f}x ({lv_df['min']:.2f} to {lv_df['max']:.2f})")
                     + (_against_default_fsync(vb, runs[VB_WAY]) if way == VB_RT_WAY else ""),
            ),
        ]
    return out
