"""Logging to stderr, one format for every process."""

import logging
import sys

FORMAT = "%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s"


def setup_logging(level: str = "INFO", role: str = "") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # At DEBUG, workers log a line per job. Every record would otherwise walk the stack for its
    # caller's file and line and look up its thread and process id, which FORMAT never
    # prints: the "Optimization" section of the logging documentation turns them off so.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
