"""Section gateway: the 2013 experiment with one client library on both sides (libvirt-python,
one thread and connection per guest, probes looking up and defining during the storm), once
through libvirtd's socket and once through virtbroker's libvirt gateway, in the same run; and
the gateway's overhead at rest."""

from __future__ import annotations

import contextlib
import functools
import math
import time

import libvirt

from bench import latency
from bench.common import (
    PREFIX,
    SETTLE_S,
    URI,
    Settings,
    cleanup_guests,
    connections,
    guest_xml,
    median,
    open_libvirt,
    say,
    summary_ms,
    vb_cluster,
)
from bench.report import _target
from tests.gateway.helpers import start_gateway

GATEWAY_WORKERS = 4
AT_REST_SAMPLES = 2000
WAYS = ("libvirtd", "gateway")


@contextlib.contextmanager
def _through(uri: str):
    """bench/latency.py's baseline, unchanged but for its URI: its per-thread connections open
    `uri` (its probe follows the connection it is given)."""
    saved = latency.connections
    latency.connections = functools.partial(connections, uri=uri)
    try:
        yield
    finally:
        latency.connections = saved


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
            with _through(gw.uri):
                return latency.libvirt_run(conn, n)
        finally:
            conn.close()
            cleanup_guests(host)


def at_rest(host: libvirt.virConnect) -> dict:
    """One lookup round trip, again and again on an idle host: libvirt-python through the
    gateway, virtbroker.Client on the broker's local endpoint, libvirt-python on libvirtd."""
    name = f"{PREFIX}rest"
    out = {}
    host.defineXML(guest_xml(name))
    try:
        out["libvirtd"] = _time_lookups(host.lookupByName, name)
    finally:
        cleanup_guests(host)
    with gateway_cluster(1) as (cluster, gw):
        client = cluster.client()
        client.define(guest_xml(name))
        conn = open_libvirt(gw.uri)
        try:
            out["gateway"] = _time_lookups(conn.lookupByName, name)
        finally:
            conn.close()
        out["local endpoint"] = _time_lookups(client.lookup, name)
    return out


def _time_lookups(lookup, name: str) -> dict:
    for _ in range(100):  # warm up: connections, caches, the broker's first turns
        lookup(name)
    samples = []
    for _ in range(AT_REST_SAMPLES):
        t0 = time.perf_counter()
        lookup(name)
        samples.append(time.perf_counter() - t0)
    return summary_ms(samples)


def run(settings: Settings, host: libvirt.virConnect) -> dict:
    n = max(settings.latency_ns)
    reps: dict[str, list[dict]] = {way: [] for way in WAYS}
    errors: list[str] = []
    for rep in range(settings.reps):
        for way in WAYS:  # interleaved, so drift of the host lands on both
            say(f"gateway rep {rep + 1}/{settings.reps}: N={n} libvirt-python through {way}")
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
            reps[way].append(row)
            say(f"  storm {row['storm_s']:.2f} s; lookup p99 {row['lookup']['p99_ms']:.2f} ms max "
                f"{row['lookup']['max_ms']:.1f} ms; define p99 {row['define']['p99_ms']:.2f} ms; "
                f"probe errors {row['probe_errors']}")
            time.sleep(SETTLE_S)
    say("gateway: lookups at rest")
    rest = at_rest(host)
    for way, s in rest.items():
        say(f"  {way}: p50 {s['p50_ms']:.3f} ms, p99 {s['p99_ms']:.3f} ms")
    summary = {way: _medians(rows) for way, rows in reps.items()}
    return {"n": n, "reps": reps, "summary": summary, "at_rest": rest, "errors": errors,
            "targets": targets(summary, n)}


def _medians(rows: list[dict]) -> dict:
    if not rows:
        return {}
    pick = lambda key, stat: median([r[key][stat] for r in rows])  # noqa: E731
    return {
        "storm_s": median([r["storm_s"] for r in rows]),
        "lookup_p50_ms": pick("lookup", "p50_ms"), "lookup_p99_ms": pick("lookup", "p99_ms"),
        "lookup_max_ms": pick("lookup", "max_ms"), "define_p99_ms": pick("define", "p99_ms"),
        "probe_errors": sum(r["probe_errors"] for r in rows),
    }


def targets(summary: dict, n: int) -> list[dict]:
    lv, gw = summary.get("libvirtd"), summary.get("gateway")
    prefix = f"libvirt-python N={n} through the gateway vs libvirtd"
    if not lv or not gw:
        return [_target(f"{prefix}: start storm, lookups, defines", None, "", None, "not measured")]
    ratio = gw["storm_s"] / lv["storm_s"]
    return [
        _target(
            f"{prefix}: start storm",
            f"{ratio:.2f}x ({gw['storm_s']:.2f} s vs {lv['storm_s']:.2f} s)",
            "<= 1.05x",
            ratio <= 1.05,
        ),
        _target(
            f"{prefix}: lookupByName p99 during the storm",
            f"{gw['lookup_p99_ms']:.2f} ms vs {lv['lookup_p99_ms']:.2f} ms",
            "<= libvirtd's",
            gw["lookup_p99_ms"] <= lv["lookup_p99_ms"],
        ),
        _target(
            f"{prefix}: lookupByName max during the storm",
            f"{gw['lookup_max_ms']:.1f} ms vs {lv['lookup_max_ms']:.1f} ms",
            "<= a tenth of libvirtd's",
            gw["lookup_max_ms"] <= lv["lookup_max_ms"] / 10,
        ),
        _target(
            f"{prefix}: defineXML p99 during the storm",
            f"{gw['define_p99_ms']:.2f} ms vs {lv['define_p99_ms']:.2f} ms",
            "<= libvirtd's",
            gw["define_p99_ms"] <= lv["define_p99_ms"],
        ),
    ]


if __name__ == "__main__":
    # python -m bench.gateway [--short] [--n N] [--reps R]: this section alone, printed
    # (python -m bench --only gateway also writes it into the results file).
    import argparse
    import json

    parser = argparse.ArgumentParser(prog="python -m bench.gateway")
    parser.add_argument("--short", action="store_true")
    parser.add_argument("--n", type=int)
    parser.add_argument("--reps", type=int)
    args = parser.parse_args()
    settings = Settings.make(args.short)
    if args.n:
        settings.latency_ns = [args.n]
    if args.reps:
        settings.reps = args.reps
    host = open_libvirt(URI)
    cleanup_guests(host)
    try:
        result = run(settings, host)
    finally:
        cleanup_guests(host)
    print(json.dumps({k: result[k] for k in ("n", "summary", "at_rest", "targets", "errors")}, indent=1))
