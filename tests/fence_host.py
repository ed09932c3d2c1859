#!/usr/bin/env python3
"""A fence agent for the host-failure tests: `fence_host.py HOST` powers test host HOST off.

A test host is a user vbhI (scripts/test-hosts.sh); powering it off is kill -9 of every QEMU
running as that user. The broker runs this as its fence_command with the host id, and counts
exit 0 as "the host is off".

$VIRTBROKER_TEST_FENCE_DIR names a folder (the test's). Each call appends one JSON line to
calls.log there: {"host", "at" (wall seconds), "outcome" (off, refused or error), "killed"}.
While a file named `refuse` exists in it, every call fails (exit 1) and kills nothing: a
fence device that does not answer, until the test allows it.

Exit codes: 0 the host is off; 1 refused or failed; 2 wrong use.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import signal
import sys
import time

EXIT_OFF = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
HOST_USER = re.compile(r"^vbh[0-9]+$")  # only the test hosts' users: nothing else is ever killed
GONE_WITHIN_S = 10.0


def qemu_pids(uid: int) -> list[int]:
    """Every QEMU process running as uid (a zombie runs nothing any more)."""
    pids = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                program = f.read().split(b"\0", 1)[0]
            with open(f"/proc/{name}/status") as f:
                real_uid = next(int(line.split()[1]) for line in f if line.startswith("Uid:"))
        except (OSError, StopIteration, IndexError, ValueError):
            continue
        if real_uid == uid and os.path.basename(program).startswith(b"qemu-system"):
            pids.append(int(name))
    return pids


def power_off(uid: int) -> list[int]:
    """kill -9 the user's QEMUs until none runs; the pids killed. TimeoutError if some stay."""
    killed: list[int] = []
    deadline = time.monotonic() + GONE_WITHIN_S
    while True:
        pids = qemu_pids(uid)
        if not pids:
            return killed
        if time.monotonic() > deadline:
            raise TimeoutError(f"QEMU processes {pids} still run {GONE_WITHIN_S:g} s after kill -9")
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                continue
            if pid not in killed:
                killed.append(pid)
        time.sleep(0.05)


def main(argv: list[str]) -> int:
    folder = os.environ.get("VIRTBROKER_TEST_FENCE_DIR")
    if len(argv) != 2 or not folder:
        print("usage: VIRTBROKER_TEST_FENCE_DIR=DIR fence_host.py HOST", file=sys.stderr)
        return EXIT_USAGE
    host = argv[1]
    entry: dict = {"host": host, "at": time.time(), "killed": []}
    code = EXIT_FAILED
    try:
        if os.path.exists(os.path.join(folder, "refuse")):
            entry["outcome"] = "refused"
            print(f"fence_host: refusing to fence {host} (the test's gate is closed)", file=sys.stderr)
        elif not HOST_USER.match(host):
            entry["outcome"] = "error"
            print(f"fence_host: {host} is not a test host (vbhN)", file=sys.stderr)
        else:
            entry["killed"] = power_off(pwd.getpwnam(host).pw_uid)
            entry["outcome"] = "off"
            code = EXIT_OFF
    except (KeyError, OSError, TimeoutError) as e:
        entry["outcome"] = "error"
        entry["error"] = str(e)
        print(f"fence_host: cannot fence {host}: {e}", file=sys.stderr)
    with open(os.path.join(folder, "calls.log"), "a") as log:
        log.write(json.dumps(entry) + "\n")
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv))
