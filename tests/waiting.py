"""Waiting on a condition under a deadline: how tests synchronise, instead of sleeping."""

from __future__ import annotations

import time


def wait_until(predicate, timeout_s: float = 30.0, interval_s: float = 0.05, what: str = "condition"):
    """Call predicate until it returns something true and return that; AssertionError naming
    `what` once timeout_s has passed. interval_s spaces the calls, it is no synchronisation."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met within {timeout_s:g} s")
        time.sleep(interval_s)
