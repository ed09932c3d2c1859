"""Test-only entry point: `virtbroker security-worker` whose driver pauses after each file it labels.

    python -m tests.paused_security_worker --label-pause S <the usual security-worker options>

Crash tests kill the worker in the middle of a labelling transaction; the pause makes
that middle long enough to aim at. It is not a configuration key on purpose: nothing an
operator writes can slow labelling down or widen a crash window.
"""

from __future__ import annotations

import argparse
import sys

from virtbroker.common.errors import VirtbrokerError
from virtbroker.common.logsetup import setup_logging
from virtbroker.launcher import cli


def main(argv: list[str] | None = None) -> int:
    ours = argparse.ArgumentParser(prog="paused_security_worker", add_help=False)
    ours.add_argument("--label-pause", type=float, required=True, dest="label_pause_s")
    known, rest = ours.parse_known_args(argv)
    args = cli.build_parser().parse_args(["security-worker", *rest])
    from virtbroker.workers.security.service import run_security_worker

    try:
        config = cli._config(args)
        setup_logging(config.log_level)
        return run_security_worker(config, args.driver, args.worker_id, label_pause_s=known.label_pause_s)
    except VirtbrokerError as e:
        print(f"virtbroker: error: {e}", file=sys.stderr)
        return cli.EXIT_USAGE if e.code == "config" else cli.EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
