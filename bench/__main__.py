"""`python -m bench [--short] [--only SECTION] [--out FILE] [--report]`: run the benchmarks, write JSON and docs."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from pathlib import Path

from bench import report
from bench.common import ROOT, Settings, cleanup_guests, open_libvirt, say

SECTIONS = ("storm", "latency", "security", "scale", "gateway", "ha")
DEFAULT_OUT = ROOT / "bench" / "results" / "latest.json"


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
    else:
        from bench import scale

        result = scale.run(settings)
    result["duration_s"] = time.monotonic() - started
    result["short"] = settings.short
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--short", action="store_true", help="the reduced suite (a few minutes)")
    parser.add_argument("--only", action="append", choices=SECTIONS, help="run only this section (repeatable); "
                        "its results replace that section in --out")
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help=f"results file (default {DEFAULT_OUT.relative_to(ROOT)})"
    )
    parser.add_argument("--report", action="store_true", help="only render docs/BENCHMARKS.md from --out")
    args = parser.parse_args(argv)

    if args.report:
        results = json.loads(args.out.read_text())
        results["targets"] = report.evaluate(results)
        print(report.write(results))
        return 0

    signal.signal(signal.SIGTERM, _on_sigterm)
    settings = Settings.make(args.short)
    sections = args.only or list(SECTIONS)
    results = {"sections": {}}
    if args.only and args.out.exists():
        results = json.loads(args.out.read_text())  # keep the sections not run this time
    this_run = {
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "short": settings.short,
        "reps": settings.reps,
        "security_reps": settings.security_reps,
        "noop_reps": settings.noop_reps,
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
                say(f"section {name} failed: {e}")
                results["sections"][name] = {"status": f"not run: {type(e).__name__}: {e}"[:1000]}
    except KeyboardInterrupt:
        say("interrupted: cleaning up")
        return 130
    finally:
        cleanup_guests(conn)
        conn.close()
    this_run["duration_s"] = time.monotonic() - started
    results["targets"] = report.evaluate(results) + results["sections"].get("gateway", {}).get("targets", [])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    doc = report.write(results)
    say(f"wrote {args.out} and {doc} in {this_run['duration_s']:.0f} s")
    for target in results["targets"]:
        verdict = report._verdict(target["met"])
        say(f"  {verdict:>14}  {target['target']}: {target['measured']} (limit {target['limit']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
