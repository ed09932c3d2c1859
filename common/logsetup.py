"""Logging to stderr, one format for every process."""

import logging
import sys


def setup_logging(level: str = "INFO", role: str = "") -> None:
    fmt = "%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s"
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(fmt))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
