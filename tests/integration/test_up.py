"""`virtbroker up` as a supervisor: a killed child comes back at once, a child that keeps
failing to start makes `up` give up (supervisord's startsecs, startretries and FATAL)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

from tests.procs import ROOT, Proc
from tests.waiting import wait_until
from virtbroker.client.api import Client
from virtbroker.client.templates import minimal_domain_xml
from virtbroker.common.statelock import StateLock
from virtbroker.launcher.cli import EXIT_ERROR, Restarts

STARTSECS_S = 1.0  # the default, as supervisord's
STARTRETRIES = 3


def up_argv(state_dir, *more: str) -> list[str]:
    return [sys.executable, "-m", "virtbroker.launcher", "up", "--state-dir", str(state_dir), *more]


def first_ping(client: Client, deadline_s: float, up: Proc | None = None) -> float:
    """Ping until the broker answers; the monotonic time of the first answer."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        try:
            client.ping(timeout_s=0.1)
            return time.monotonic()
        except Exception:
            if up is not None and not up.alive():
                raise AssertionError("up exited:\n" + up.log()[-3000:]) from None
    raise AssertionError("the broker did not answer a ping" + (":\n" + up.log()[-3000:] if up else ""))


def broker_pid(state_dir) -> int:
    # The broker writes its pid into the state dir's lock file (common/statelock.py).
    return int((state_dir / "broker.lock").read_text().split()[0])


def process_age_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        started_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
    with open("/proc/uptime") as f:
        uptime_s = float(f.read().split()[0])
    return uptime_s - started_ticks / os.sysconf("SC_CLK_TCK")


def test_a_broker_killed_under_up_answers_again_within_2_s(tmp_path):
    up = Proc("up", up_argv(tmp_path, "--workers", "1"), tmp_path).start()
    try:
        with Client(f"ipc://{tmp_path}/client.sock", timeout_s=5) as c:
            first_ping(c, 30, up)
            pid = broker_pid(tmp_path)
            # Not a synchronisation: a child that dies sooner than startsecs after its start
            # failed to start, and is retried after a back-off by design (the next test).
            time.sleep(max(0.0, STARTSECS_S + 0.2 - process_age_s(pid)))
            killed_at = time.monotonic()
            os.kill(pid, signal.SIGKILL)
            answered_at = first_ping(c, 10, up)
            assert answered_at - killed_at < 2.0, up.log()[-3000:]  # issue 13 asks for 2 s
            assert broker_pid(tmp_path) != pid
            # The restarted broker serves: the lifecycle worker registers with it again.
            deadline = time.monotonic() + 30
            while c.ping(timeout_s=5)["workers"] < 1:
                assert time.monotonic() < deadline, up.log()[-3000:]
                time.sleep(0.05)
    finally:
        code = up.stop(timeout_s=60)
    log = up.log()
    assert code == 0, log[-3000:]
    exits = [line for line in log.splitlines() if re.search(r"virtbroker\.up: \S+ \(pid \d+\) (was killed|exited)", line)]
    restarts = [line for line in log.splitlines() if "started again" in line]
    assert len(exits) == 1 and f"broker (pid {pid}) was killed by SIGKILL" in exits[0], log[-3000:]
    assert exits[0].endswith("starting it again now"), exits
    assert len(restarts) == 1 and "broker started again" in restarts[0], log[-3000:]


def test_a_child_that_fails_every_start_makes_up_give_up(tmp_path):
    # The test holds the state dir's broker lock, so every broker up starts exits at once
    # with "a broker is already running" (a ConfigError): no product knob makes it fail.
    lock = StateLock(str(tmp_path / "broker.lock"), "the test")
    try:
        done = subprocess.run(up_argv(tmp_path, "--workers", "1"), check=False, cwd=str(ROOT), capture_output=True, text=True,
                              timeout=120, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    finally:
        lock.release()
    lines = done.stderr.splitlines()
    assert done.returncode == EXIT_ERROR, done.stderr[-3000:]
    refused = [line for line in lines if "already running" in line]
    exits = [line for line in lines if re.search(r"virtbroker\.up: broker \(pid \d+\) exited with code 2", line)]
    restarts = [line for line in lines if "broker started again" in line]
    reasons = [line for line in lines if "giving up" in line]
    # As supervisord: the first start and STARTRETRIES retries, each failed, then FATAL.
    assert len(refused) == STARTRETRIES + 1, done.stderr[-3000:]
    assert len(exits) == STARTRETRIES and len(restarts) == STARTRETRIES, done.stderr[-3000:]
    assert [re.search(r"again in (\d+) s", line).group(1) for line in exits] == ["1", "2", "3"]
    assert len(reasons) == 1, done.stderr[-3000:]
    assert f"broker failed to start {STARTRETRIES + 1} times in a row" in reasons[0] and "exited with code 2" in reasons[0]
    # It stopped the others before it exited: the lifecycle worker was told to stop.
    assert lines.index(reasons[0]) < max(i for i, line in enumerate(lines) if "virtbroker.up: stopping" in line)


def test_restarts_follow_supervisords_rules():
    r = Restarts(startsecs_s=1.0, startretries=2)
    r.started("broker", now=100.0)
    assert r.next_due() is None
    assert r.exited("broker", now=150.0) == 150.0  # it had run: at once
    assert r.due(150.0) == ["broker"]
    r.started("broker", now=150.0)
    assert r.due(150.0) == [] and r.next_due() is None
    assert r.exited("broker", now=150.5) == 151.5  # failed start 1: 1 s
    assert r.due(151.0) == [] and r.due(151.5) == ["broker"]
    r.started("broker", now=151.5)
    assert r.exited("broker", now=151.6) == 153.6  # failed start 2: 2 s
    r.started("broker", now=153.6)
    assert r.exited("broker", now=153.7) is None  # failed start 3 > 2 retries: FATAL
    # A start that lasts startsecs resets the count.
    r = Restarts(startsecs_s=1.0, startretries=1)
    r.started("w", now=0.0)
    assert r.exited("w", now=0.5) == 1.5
    r.started("w", now=1.5)
    assert r.exited("w", now=2.5) == 2.5
    r.started("w", now=2.5)
    assert r.exited("w", now=2.6) == 3.6


def descendants(pid: int) -> list[int]:
    """Every process below pid, from /proc (children of children too)."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            parents.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def test_up_killed_with_its_embedded_guests_then_up_again_shuts_them_off(tmp_path):
    """kill -9 of `virtbroker up` and every process under it, with 10 test:/// guests running
    (their hypervisors die with their workers), then `up` again on the same state dir: within
    host_dead_s the guests are shutoff, no call waits past queue_timeout_s, and they start
    again on the new workers."""
    host_dead_s, queue_timeout_s = 5.0, 8.0
    argv = up_argv(tmp_path, "--workers", "2", "--host-dead-s", str(host_dead_s), "--self-fence-s", "3",
                   "--queue-timeout-s", str(queue_timeout_s))
    names = [f"emb{i}" for i in range(10)]
    up = Proc("up", argv, tmp_path).start()
    again = None
    try:
        with Client(f"ipc://{tmp_path}/client.sock", timeout_s=10) as c:
            first_ping(c, 30, up)
            wait_until(lambda: len(c.workers()) == 2, timeout_s=30, what="both workers registered")
            for name in names:
                c.define(minimal_domain_xml(name))
            finals = c.wait([c.submit(n, "start")["job_id"] for n in names], 60)
            assert {j["state"] for j in finals} == {"succeeded"}
            old_hosts = {d["host"] for d in c.list()}
            assert len(old_hosts) == 2
        victims = [up.pid, *descendants(up.pid)]
        for pid in victims:
            os.kill(pid, signal.SIGKILL)
        up.popen.wait(timeout=10)
        wait_until(lambda: not any(os.path.exists(f"/proc/{pid}") and process_state(pid) != "Z" for pid in victims),
                   timeout_s=10, what="every killed process gone")
        again = Proc("up-again", argv, tmp_path).start()
        with Client(f"ipc://{tmp_path}/client.sock", timeout_s=10) as c:
            first_ping(c, 30, again)
            restarted_at = time.monotonic()
            # Still recorded as running: the broker gives the vanished hosts host_dead_s.
            assert {d["state"] for d in c.list(all=True)} == {"running"}
            destroy = c.submit(names[0], "destroy")
            wait_until(lambda: {d["state"] for d in c.list(all=True)} == {"shutoff"}, timeout_s=host_dead_s + 5,
                       what="every guest of the vanished hosts shut off")
            assert time.monotonic() - restarted_at <= host_dead_s + 3
            # The destroy queued meanwhile ended (refused: the guest is off), well within queue_timeout_s.
            (job,) = c.wait([destroy["job_id"]], queue_timeout_s)
            assert job["state"] == "failed" and job["error_code"] == "operation-invalid"
            finals = c.wait([c.submit(n, "start")["job_id"] for n in names], 60)
            assert {j["state"] for j in finals} == {"succeeded"}
            new_hosts = {d["host"] for d in c.list()}
            assert len(new_hosts) == 2 and not new_hosts & old_hosts
            assert old_hosts.isdisjoint(h["host"] for h in c.hosts())
    finally:
        if up.alive():
            up.kill9()
        if again is not None:
            assert again.stop(timeout_s=60) == 0, again.log()[-3000:]


def process_state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"
