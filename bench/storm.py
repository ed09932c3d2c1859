"""Sections 1 and 2: start and destroy storms of N KVM guests, libvirt-python against virtbroker."""

from __future__ import annotations

import math
import time

import libvirt

from bench.common import (
    PREFIX,
    TARGET_WORKERS,
    Settings,
    cleanup_guests,
    connections,
    guest_xml,
    parallel,
    say,
    spread,
    vb_cluster,
    vb_start_destroy,
)
from bench.verdict import LOWER, decide, not_measured, pair_order, pair_ratio

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
START_LIMIT = 1.05
DESTROY_LIMIT = 1.10
TARGET_WAY = f"virtbroker-{TARGET_WORKERS}w"


def ways_for(settings: Settings, n: int) -> list[tuple[str, int | None, bool]]:
    """(way, workers or None for libvirt, judged by a target) in the order of an even pair:
    the baseline first, the judged ways next to it, so they stay next to it when the order flips."""
    judged = n == settings.target_n
    ways: list[tuple[str, int | None, bool]] = [(BASELINE_WAY, None, judged)]
    if judged:
        ways.append((TARGET_WAY, TARGET_WORKERS, True))
        if not settings.short:  # the short run has time for the target's way only
            ways.append((DEFAULTS_WAY, DEFAULT_WORKERS, True))
    ways += [(f"virtbroker-{w}w", w, False) for w in settings.worker_counts if not (judged and w == TARGET_WORKERS)]
    if not judged and not settings.short:
        ways.append((DEFAULTS_WAY, DEFAULT_WORKERS, False))
    if not settings.short and n == settings.target_n:
        ways.append(("libvirt-threads-shared", None, False))
    if n <= settings.sequential_max_n:
        ways.append(("libvirt-sequential", None, False))
    return ways


def run(settings: Settings, conn: libvirt.virConnect) -> dict:
    raw: dict[tuple[int, str], dict] = {}
    rounds = max(settings.rounds(True), settings.rounds(False))
    for index in range(rounds):
        for n in settings.storm_ns:
            ways = [w for w in ways_for(settings, n) if index < settings.rounds(w[2])]
            for way, workers, judged in pair_order(index, ways):
                names = _names(n, "s")
                entry = raw.setdefault((n, way), {
                    "n": n, "way": way, "workers": workers, "judged": judged,
                    "start_s": [None] * rounds, "destroy_s": [None] * rounds, "errors": [],
                })
                say(f"storm pair {index + 1}/{rounds}: N={n} {way}")
                try:
                    if workers is None:
                        start_s, destroy_s = libvirt_storm(conn, names, way)
                    else:
                        start_s, destroy_s = vb_storm(conn, names, workers, defaults=way == DEFAULTS_WAY)
                except Exception as e:
                    say(f"  failed: {e}")
                    entry["errors"].append(str(e)[:500])
                    continue
                entry["start_s"][index] = start_s
                entry["destroy_s"][index] = destroy_s
                say(f"  start {start_s:.2f} s, destroy {destroy_s:.2f} s")
                time.sleep(settings.settle_s)
    rows = list(raw.values())
    for row in rows:
        base = raw[(row["n"], BASELINE_WAY)]
        for phase in ("start", "destroy"):
            row[f"{phase}_spread_s"] = spread(row[f"{phase}_s"])
            ratios = [pair_ratio(b, s) for b, s in zip(base[f"{phase}_s"], row[f"{phase}_s"])]
            row[f"{phase}_pair_ratios"] = ratios
            row[f"{phase}_ratio"] = spread(ratios)
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
            "defines and submits with one thread and client per guest. Each pair runs every way once, "
            "the order flipped from pair to pair; a ratio is taken within its pair. Ways no target "
            f"judges run in the first {settings.rounds(False)} pairs only."
        ),
        "pairs": rounds,
        "rows": rows,
        "targets": targets(rows, settings),
    }


def targets(rows: list[dict], settings: Settings) -> list[dict]:
    n = settings.target_n
    by_way = {r["way"]: r for r in rows if r["n"] == n}
    unjudged = None if n == 20 else f"N={n}, the targets are for N=20"
    out = []
    for way, label in ((TARGET_WAY, f"virtbroker ({TARGET_WORKERS} workers)"),
                       (DEFAULTS_WAY, "`virtbroker up` untuned (2 workers, default slots)")):
        row = by_way.get(way, {})
        for phase, limit in (("start", START_LIMIT), ("destroy", DESTROY_LIMIT)):
            name = f"{phase.capitalize()} storm N={n}: {label} / libvirt one thread and connection per guest"
            if not row:
                out.append(not_measured(name, f"<= {limit:.2f}x", "run by the full suite only"))
                continue
            out.append(decide(
                name, row.get(f"{phase}_pair_ratios", []), limit, LOWER, unjudged=unjudged,
                note=_seconds_note(by_way.get(BASELINE_WAY, {}), row, phase),
            ))
    return out


def _seconds_note(base: dict, row: dict, phase: str) -> str:
    b, s = base.get(f"{phase}_spread_s") or {}, row.get(f"{phase}_spread_s") or {}
    if b.get("median") is None or s.get("median") is None:
        return ""
    return (f"{phase} {s['median']:.2f} s ({s['min']:.2f} to {s['max']:.2f}) against "
            f"{b['median']:.2f} s ({b['min']:.2f} to {b['max']:.2f})")
