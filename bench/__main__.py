"""`python -m bench [--short] [--only SECTION] [--out FILE] [--report]`: run the benchmarks, write JSON and a report."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from pathlib import Path

from bench import report, verdict
from bench.common import ROOT, Settings, cleanup_guests, open_libvirt, say

SECTIONS = report.SECTION_ORDER


def _on_sigterm(signum, frame):
    # SIGTERM unwinds like Ctrl-C, so every finally block destroys its guests and stops its processes.
    raise KeyboardInterrupt


def run_section(name: str, settings: Settings, conn) -> dict:
    started = time.monotonic()
    if name == "storm":
        from bench import storm

        result = storm.run(settings, conn)
    elif name == "latency":
        from bench import latency

        result = latency.run(settings, conn)
    elif name == "security":
        from bench import security

        result = security.run(settings, conn)
    elif name == "gateway":
        from bench import gateway

        result = gateway.run(settings, conn)
    elif name == "ha":
        from bench import ha

        result = ha.run(settings)
    elif name == "hosts":
        from bench import hosts

        result = hosts.run(settings, conn)
    else:
        from bench import scale

        result = scale.run(settings)
    result["duration_s"] = time.monotonic() - started
    result["short"] = settings.short
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__,
        epilog="A full run writes bench/results/full.json and docs/BENCHMARKS.md; --short writes "
               "bench/results/short.json and bench/results/short.md, never docs/.",
    )
    parser.add_argument("--short", action="store_true",
                        help="the smoke run: every section but hosts (--only hosts runs it), smaller N, 2 pairs "
                             "(under 3 minutes; judges nothing)")
    parser.add_argument("--only", action="append", choices=SECTIONS, help="run only this section (repeatable); "
                        "its results replace that section in --out")
    parser.add_argument("--out", type=Path, help="results file (default bench/results/full.json, or "
                        "bench/results/short.json with --short)")
    parser.add_argument("--report", action="store_true", help="only render the report from --out: "
                        "docs/BENCHMARKS.md for a full run's results, bench/results/short.md for a short run's")
    args = parser.parse_args(argv)
    out = args.out or (report.SHORT_RESULTS if args.short else report.FULL_RESULTS)

    if args.report:
        results = json.loads(out.read_text())
        print(report.write(results))
        return 0

    signal.signal(signal.SIGTERM, _on_sigterm)
    settings = Settings.make(args.short)
    sections = args.only or [s for s in SECTIONS if not (settings.short and s in report.NOT_IN_SHORT)]
    results: dict = {"sections": {}}
    if args.only and out.exists():
        results = json.loads(out.read_text())  # keep the sections not run this time
        if report.method_of(results) < report.METHOD or bool(results.get("meta", {}).get("short")) != settings.short:
            # An earlier method's results, or a short run's sections in a full file (or the
            # reverse), must not be merged into one page with this run's.
            say(f"{out} holds another method's or another mode's run: starting it afresh")
            results = {"sections": {}}
    this_run = {
        "method": report.METHOD,
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "short": settings.short,
        "pairs": settings.pairs,
        "reps": settings.rounds(False),
        "sections_run": sections,
        "machine": report.machine(),
    }
    if args.only and "meta" in results:
        # Merged into an earlier run: its meta (when, how long, short or full) still describes
        # the other sections; this run is listed beside it (each section has its own duration).
        results["meta"].setdefault("merged", []).append(this_run)
    else:
        results["meta"] = this_run
    started = time.monotonic()
    conn = open_libvirt()
    left = cleanup_guests(conn)
    if left:
        say(f"removed {left} vbb- guest(s) left by an earlier run")
    try:
        for name in sections:
            say(f"section {name}")
            try:
                results["sections"][name] = run_section(name, settings, conn)
            except KeyboardInterrupt:
                raise
            except Exception as e:  # one broken section must not lose the others' results
                say(f"section {name} failed: {type(e).__name__}: {e}")
                results["sections"][name] = {"status": f"not run: {type(e).__name__}: {e}"[:1000]}
    except KeyboardInterrupt:
        say("interrupted: cleaning up")
        return 130
    finally:
        cleanup_guests(conn)
        conn.close()
    this_run["duration_s"] = time.monotonic() - started
    results["targets"] = report.evaluate(results)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    doc = report.write(results)
    say(f"wrote {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out} and "
        f"{doc.relative_to(ROOT)} in {this_run['duration_s']:.0f} s")
    for target in results["targets"]:
        median, span = verdict.figures(target)
        say(f"  {verdict.label(target)}: {target['target']}: {median} ({span}), limit {target['limit']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
