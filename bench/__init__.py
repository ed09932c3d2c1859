"""virtbroker's benchmark suite: `python -m bench` (full) or `python -m bench --short`; see docs/BENCHMARKS.md."""
