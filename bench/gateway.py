"""Section gateway: the 2013 experiment with one client library on both sides (libvirt-python,
one thread and connection per guest, probes looking up and defining during the storm), once
through libvirtd's socket and once through virtbroker's libvirt gateway, in the same run; and
the gateway's overhead at rest."""

from __future__ import annotations

import contextlib
import math
import time

import libvirt

from bench import latency
from bench.common import (
    PREFIX,
    URI,
    Settings,
    cleanup_guests,
    guest_xml,
    open_libvirt,
    say,
    spread,
    summary_ms,
    vb_cluster,
)
from bench.verdict import LOWER, decide, interleaved, pair_ratios
from tests.gateway.helpers import start_gateway

GATEWAY_WORKERS = 4
WAYS = ("libvirtd", "gateway")


@contextlib.contextmanager
def gateway_cluster(n: int):
    slots = max(1, math.ceil(n / GATEWAY_WORKERS))
    with vb_cluster(GATEWAY_WORKERS, slots) as cluster:
        gw = start_gateway(cluster)
        try:
            yield cluster, gw
        finally:
            gw.stop()


def storm_run(host: libvirt.virConnect, way: str, n: int) -> dict:
    if way == "libvirtd":
        return latency.libvirt_run(host, n)
    with gateway_cluster(n) as (_cluster, gw):
        conn = open_libvirt(gw.uri)
        try:
            # bench/latency.py's baseline, unchanged but for its URI: its per-thread
            # connections and its probe open the connection's URI, the gateway's socket.
            return latency.libvirt_run(conn, n)
        finally:
            conn.close()
            cleanup_guests(host)


def at_rest(host: libvirt.virConnect, samples: int) -> dict:
    """One lookup round trip, again and again on an idle host: libvirt-python through the
    gateway, virtbroker.Client on the broker's local endpoint, libvirt-python on libvirtd."""
    name = f"{PREFIX}rest"
    out = {}
    host.defineXML(guest_xml(name))
    try:
        out["libvirtd"] = _time_lookups(host.lookupByName, name, samples)
    finally:
        cleanup_guests(host)
    with gateway_cluster(1) as (cluster, gw):
        client = cluster.client()
        client.define(guest_xml(name))
        conn = open_libvirt(gw.uri)
        try:
            out["gateway"] = _time_lookups(conn.lookupByName, name, samples)
        finally:
            conn.close()
        out["local endpoint"] = _time_lookups(client.lookup, name, samples)
    return out


def _time_lookups(lookup, name: str, count: int) -> dict:
    for _ in range(100):  # warm up: connections, caches, the broker's first turns
        lookup(name)
    samples = []
    for _ in range(count):
        t0 = time.perf_counter()
        lookup(name)
        samples.append(time.perf_counter() - t0)
    return summary_ms(samples)


def run(settings: Settings, host: libvirt.virConnect) -> dict:
    n = max(settings.latency_ns)
    rounds = settings.rounds(True)
    runs: dict[str, list[dict | None]] = {way: [None] * rounds for way in WAYS}
    errors: list[str] = []
    for index, way in interleaved(rounds, WAYS):  # the order flipped each pair
        say(f"gateway pair {index + 1}/{rounds}: N={n} libvirt-python through {way}")
        try:
            result = storm_run(host, way, n)
        except Exception as e:
            say(f"  failed: {e}")
            errors.append(f"{way}: {e}"[:500])
            continue
        row = {
            "storm_s": result["storm_s"], "lookup": summary_ms(result["lookup_s"]),
            "define": summary_ms(result["define_s"]), "probe_errors": result["error_count"],
            "probe_error_samples": result["errors"][:3],
        }
        runs[way][index] = row
        say(f"  storm {row['storm_s']:.2f} s; lookup p99 {row['lookup']['p99_ms']:.2f} ms max "
            f"{row['lookup']['max_ms']:.1f} ms; define p99 {row['define']['p99_ms']:.2f} ms; "
            f"probe errors {row['probe_errors']}")
        time.sleep(settings.settle_s)
    say("gateway: lookups at rest")
    rest = at_rest(host, settings.at_rest_samples)
    for way, s in rest.items():
        say(f"  {way}: p50 {s['p50_ms']:.3f} ms, p99 {s['p99_ms']:.3f} ms")
    summary = {way: _spreads(way_runs) for way, way_runs in runs.items()}
    return {"status": "ok", "n": n, "pairs": rounds, "runs": runs, "summary": summary, "at_rest": rest,
            "errors": errors, "targets": targets(runs, n),
            "baseline": "libvirt-python on libvirtd's own socket, in the same run",
            "note": (f"The 2013 experiment with one client library on both sides: libvirt-python starts N={n} "
                     "pre-defined guests, one thread and connection per guest, while a probe process looks up "
                     "a storm guest and defines a new name every 5 ms; once on libvirtd's socket and once on "
                     f"virtbroker's libvirt gateway ({GATEWAY_WORKERS} lifecycle workers), the order flipped "
                     "each pair. At rest: one lookup round trip at a time on an idle host, "
                     f"{settings.at_rest_samples} times.")}


def _spreads(rows: list[dict | None]) -> dict:
    done = [r for r in rows if r is not None]
    out = {"storm_s": spread([r["storm_s"] for r in done]), "probe_errors": sum(r["probe_errors"] for r in done)}
    for probe in ("lookup", "define"):
        for stat in ("p50_ms", "p99_ms", "p999_ms", "max_ms"):
            out[f"{probe}_{stat}"] = spread([r[probe][stat] for r in done])
    return out


def targets(runs: dict[str, list[dict | None]], n: int) -> list[dict]:
    lv, gw = runs["libvirtd"], runs["gateway"]
    prefix = f"libvirt-python N={n} through the gateway / libvirtd"
    unjudged = None if n == 20 else f"N={n}, the targets are for N=20"

    def pairs(key, stat=None):
        pick = (lambda r: r[key]) if stat is None else (lambda r: r[key][stat])  # noqa: E731
        return pair_ratios([(pick(b) if b else None, pick(s) if s else None) for b, s in zip(lv, gw)])

    return [
        decide(f"{prefix}: start storm", pairs("storm_s"), 1.05, LOWER, unjudged=unjudged),
        decide(f"{prefix}: lookupByName p99 during the storm", pairs("lookup", "p99_ms"), 1.0, LOWER,
               limit_text="<= libvirtd's (1.00x)", unjudged=unjudged),
        decide(f"{prefix}: lookupByName max during the storm", pairs("lookup", "max_ms"), 0.1, LOWER,
               limit_text="<= a tenth of libvirtd's (0.10x)", fmt="{:.3f}x", unjudged=unjudged),
        decide(f"{prefix}: defineXML p99 during the storm", pairs("define", "p99_ms"), 1.0, LOWER,
               limit_text="<= libvirtd's (1.00x)", unjudged=unjudged),
    ]


if __name__ == "__main__":
    # python -m bench.gateway [--short] [--n N] [--reps R]: this section alone, printed
    # (python -m bench --only gateway also writes it into the results file).
    import argparse
    import json

    parser = argparse.ArgumentParser(prog="python -m bench.gateway")
    parser.add_argument("--short", action="store_true")
    parser.add_argument("--n", type=int)
    parser.add_argument("--pairs", type=int)
    args = parser.parse_args()
    settings = Settings.make(args.short)
    if args.n:
        settings.latency_ns = [args.n]
    if args.pairs:
        settings.pairs = args.pairs
    host = open_libvirt(URI)
    cleanup_guests(host)
    try:
        result = run(settings, host)
    finally:
        cleanup_guests(host)
    print(json.dumps({k: result[k] for k in ("n", "summary", "at_rest", "targets", "errors")}, indent=1))
