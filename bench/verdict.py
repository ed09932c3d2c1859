"""The verdict rule every benchmark target is judged by: interleaved pairs, the median of their ratios with min and max.

One pair is one run of the baseline and one of virtbroker, back to back; the order flips
from one pair to the next (pair_order), so that neither side always runs first, on a host
that the previous run left warm or busy. A target is judged on the median of the per-pair
ratios and shown with their min and max; with fewer than MIN_PAIRS pairs it is not judged
at all. When the min-max range straddles the limit (some pairs meet it, some miss it) the
verdict says `within noise` beside met or missed: one more run could come out the other way.

A target with an absolute limit (jobs a second, a size in MB) is judged the same way on
its repetitions' values; a baseline measured at the same moment (a raw fsync probe in the
same storm) makes a pair by construction, with no order to flip.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterator, Sequence
from typing import TypeVar

MIN_PAIRS = 5
LOWER = "lower"  # lower is better: met when the figure is <= the limit
HIGHER = "higher"  # higher is better: met when the figure is >= the limit

T = TypeVar("T")


def pair_order(pair_index: int, ways: Sequence[T]) -> list[T]:
    """The order in which pair `pair_index` (from 0) runs `ways`: as given in even pairs,
    reversed in odd ones. With more than two ways, keep each judged way next to its
    baseline in the list, so that it stays next to it both ways round."""
    return list(ways) if pair_index % 2 == 0 else list(reversed(ways))


def interleaved(pairs: int, ways: Sequence[T]) -> Iterator[tuple[int, T]]:
    """(pair index, way) for `pairs` pairs, each in pair_order."""
    for index in range(pairs):
        for way in pair_order(index, ways):
            yield index, way


def pair_ratio(baseline: float | None, subject: float | None) -> float | None:
    """subject / baseline of one pair; None when either side is missing or the baseline is 0."""
    if baseline is None or subject is None or not baseline:
        return None
    return subject / baseline


def pair_ratios(pairs: Sequence[tuple[float | None, float | None]]) -> list[float]:
    """subject / baseline for every (baseline, subject) pair that has both sides."""
    return [r for r in (pair_ratio(b, s) for b, s in pairs) if r is not None]


def meets(value: float, limit: float, better: str) -> bool:
    if better == LOWER:
        return value <= limit
    if better == HIGHER:
        return value >= limit
    raise ValueError(f"better must be {LOWER!r} or {HIGHER!r}, not {better!r}")


def decide(
    name: str,
    values: Sequence[float | None],
    limit: float,
    better: str,
    *,
    fmt: str = "{:.2f}x",
    limit_text: str | None = None,
    statistic: str = "median",
    min_pairs: int = MIN_PAIRS,
    requires: Sequence[tuple[str, bool | None]] = (),
    unjudged: str | None = None,
    note: str = "",
    counted: str = "pairs",
) -> dict:
    """One target's verdict, as a dict the results file keeps and the report renders.

    values: one figure per pair (a ratio) or per repetition (an absolute figure); None
    entries (a failed run) are dropped. statistic: "median" judges the median (the rule),
    "max" the largest value (a worst-case limit, such as the longest takeover), where
    `within noise` does not apply. requires: further conditions, each (what, True/False/None),
    that must all hold for the target to be met (a base image restored, say). unjudged: a
    reason not to judge at all (a short run's smaller N), the figures still shown. counted:
    what one value is, for the report ("pairs", or "runs" for an absolute limit).
    """
    kept = [float(v) for v in values if v is not None]
    out = {
        "target": name,
        "limit": limit_text or f"{'<=' if better == LOWER else '>='} {fmt.format(limit)}",
        "limit_value": limit,
        "better": better,
        "fmt": fmt,
        "statistic": statistic,
        "values": kept,
        "count": len(kept),
        "min_pairs": min_pairs,
        "counted": counted,
        "median": statistics.median(kept) if kept else None,
        "min": min(kept) if kept else None,
        "max": max(kept) if kept else None,
        "note": note,
        "requires": [[what, ok] for what, ok in requires],
        "met": None,
        "within_noise": False,
        "verdict": "not measured",
    }
    if not kept:
        return out
    figure = out["max"] if statistic == "max" else out["median"]
    met = meets(figure, limit, better) and all(ok for _, ok in requires)
    lo, hi = out["min"], out["max"]
    # Some pairs on each side of the limit, a value at the limit counting as meeting it.
    straddles = meets(lo, limit, better) != meets(hi, limit, better)
    out["within_noise"] = statistic == "median" and straddles
    if unjudged:
        out["verdict"] = "not judged"
        out["why_not_judged"] = unjudged
    elif len(kept) < min_pairs:
        out["verdict"] = "not judged"
        out["why_not_judged"] = f"{len(kept)} of {min_pairs} {counted}"
    else:
        out["met"] = met
        out["verdict"] = "met" if met else "missed"
    out["figure_meets"] = met  # what the figures alone say, also when not judged
    return out


def label(target: dict) -> str:
    """The verdict as the report shows it: met, **missed**, either with `within noise`,
    `not judged (why)` or `not measured`."""
    verdict = target.get("verdict", "not measured")
    if verdict in ("met", "missed"):
        text = "met" if verdict == "met" else "**missed**"
        return text + (", within noise" if target.get("within_noise") else "")
    if verdict == "not judged":
        leaning = "the median meets the limit" if target.get("figure_meets") else "the median misses the limit"
        if target.get("statistic") == "max":
            leaning = leaning.replace("median", "max")
        return f"not judged ({target.get('why_not_judged')}; {leaning})"
    return "not measured"


def figures(target: dict) -> tuple[str, str]:
    """(the judged figure, "min to max") as the report shows them: the median, or the max for
    a worst-case target; dashes when not measured."""
    if target.get("median") is None:
        return "-", "-"
    fmt = target.get("fmt", "{:.2f}")
    judged = target["max"] if target.get("statistic") == "max" else target["median"]
    return fmt.format(judged), f"{fmt.format(target['min'])} to {fmt.format(target['max'])}"


def not_measured(name: str, limit_text: str, why: str) -> dict:
    """A target whose section did not run or failed: no figures, the reason as its note."""
    return {"target": name, "limit": limit_text, "values": [], "count": 0, "median": None, "min": None,
            "max": None, "met": None, "within_noise": False, "verdict": "not measured", "note": why}
