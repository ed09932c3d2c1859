"""Sections 1 and 2: start and destroy storms of N KVM guests, libvirt-python against virtbroker."""

from __future__ import annotations

import math
import time

import libvirt

from bench.common import (
    PREFIX,
    SETTLE_S,
    Settings,
    cleanup_guests,
    connections,
    guest_xml,
    median,
    parallel,
    ratio,
    say,
    vb_cluster,
    vb_start_destroy,
)

BASELINE_WAY = "libvirt-threads"


def _names(n: int, tag: str) -> list[str]:
    return [f"{PREFIX}{tag}{i:02d}" for i in range(n)]


# ---------------------------------------------------------------------------- libvirt-python
def libvirt_storm(conn: libvirt.virConnect, names: list[str], way: str) -> tuple[float, float]:
    """Define and start every guest, then destroy them all: (start_s, destroy_s).

    way: libvirt-sequential (one connection, one guest after another), libvirt-threads (one
    thread and one connection per guest) or libvirt-threads-shared (one thread per guest,
    all on one connection, as many applications do).
    """
    xml = {name: guest_xml(name) for name in names}  # built before the clock starts
    threaded = way != "libvirt-sequential"
    with connections(len(names) if way == BASELINE_WAY else 0) as own:
        conn_of = dict(zip(names, own)) if own else {name: conn for name in names}

        def start(name):
            conn_of[name].defineXML(xml[name]).create()

        def destroy(name):
            conn_of[name].lookupByName(name).destroy()

        try:
            started = time.monotonic()
            if threaded:
                parallel(start, names)
            else:
                for name in names:
                    start(name)
            start_s = time.monotonic() - started
            # The threaded ways destroy in parallel too: the guests of a storm are
            # independent, and one after another waits for each QEMU to exit in turn.
            started = time.monotonic()
            if threaded:
                parallel(destroy, names)
            else:
                for name in names:
                    destroy(name)
            destroy_s = time.monotonic() - started
            return start_s, destroy_s
        finally:
            cleanup_guests(conn)


# ---------------------------------------------------------------------------- virtbroker
DEFAULTS_WAY = "virtbroker-defaults"
DEFAULT_WORKERS = 2  # what `virtbroker up` starts when not told otherwise


def vb_storm(conn: libvirt.virConnect, names: list[str], workers: int, defaults: bool = False) -> tuple[float, float]:
    """The same storm through a broker and `workers` lifecycle workers (real processes).

    defaults: the workers keep their own slots and priority slots, as `virtbroker up` gives an
    operator who tunes nothing; otherwise each gets ceil(N/workers) slots, so every guest can
    be in flight at once, as one thread per guest has.
    """
    slots = None if defaults else max(1, math.ceil(len(names) / workers))
    xml = {name: guest_xml(name) for name in names}
    try:
        with vb_cluster(workers, slots) as cluster:
            return vb_start_destroy(cluster, xml)
    finally:
        cleanup_guests(conn)


# ---------------------------------------------------------------------------- the section
def ways_for(settings: Settings, n: int) -> list[tuple[str, int | None]]:
    ways: list[tuple[str, int | None]] = []
    if n <= settings.sequential_max_n:
        ways.append(("libvirt-sequential", None))
    ways.append((BASELINE_WAY, None))
    if not settings.short and n == 20:
        ways.append(("libvirt-threads-shared", None))
    ways += [(f"virtbroker-{w}w", w) for w in settings.worker_counts]
    ways.append((DEFAULTS_WAY, DEFAULT_WORKERS))
    return ways


def run(settings: Settings, conn: libvirt.virConnect) -> dict:
    raw: dict[tuple[int, str], dict] = {}
    for rep in range(settings.reps):
        for n in settings.storm_ns:
            # Interleaved by repetition, so slow drift of the host (other guests, page
            # cache) spreads over every way instead of landing on one.
            for way, workers in ways_for(settings, n):
                names = _names(n, "s")
                entry = raw.setdefault(
                    (n, way), {"n": n, "way": way, "workers": workers, "start_s": [], "destroy_s": [], "errors": []}
                )
                say(f"storm rep {rep + 1}/{settings.reps}: N={n} {way}")
                try:
                    if workers is None:
                        start_s, destroy_s = libvirt_storm(conn, names, way)
                    else:
                        start_s, destroy_s = vb_storm(conn, names, workers, defaults=way == DEFAULTS_WAY)
                except Exception as e:
                    say(f"  failed: {e}")
                    entry["errors"].append(str(e)[:500])
                    continue
                entry["start_s"].append(start_s)
                entry["destroy_s"].append(destroy_s)
                say(f"  start {start_s:.2f} s, destroy {destroy_s:.2f} s")
                time.sleep(SETTLE_S)
    rows = list(raw.values())
    for row in rows:
        row["start_median_s"] = median(row["start_s"])
        row["destroy_median_s"] = median(row["destroy_s"])
    for row in rows:
        base = raw.get((row["n"], BASELINE_WAY), {})
        row["start_ratio"] = ratio(row["start_median_s"], base.get("start_median_s"))
        row["destroy_ratio"] = ratio(row["destroy_median_s"], base.get("destroy_median_s"))
    return {
        "status": "ok",
        "baseline": BASELINE_WAY,
        "note": (
            "Wall time from the first define until every guest runs (start) and from the first "
            "destroy until every destroy returned (destroy). The baseline gives each thread its own "
            "libvirt connection (libvirtd runs at most 5 calls of one connection at a time); "
            "libvirt-threads-shared is the same on one shared connection. virtbroker-Nw gets "
            "ceil(N/workers) slots per worker, so every way can have all N in flight; virtbroker-defaults "
            "is `virtbroker up` untuned (2 workers, their default slots and priority slots). virtbroker "
            "defines and submits with one thread and client per guest."
        ),
        "rows": rows,
    }
