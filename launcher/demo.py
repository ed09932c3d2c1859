"""The demos: `virtbroker up` on the test hypervisor, 20 guests defined, started, destroyed; --ha: a takeover timed."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from tqdm import tqdm

from virtbroker.client.api import Client
from virtbroker.client.templates import minimal_domain_xml
from virtbroker.launcher.etcd import SETPRIV


def _wait_ready(client: Client, workers: int, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if client.ping(timeout_s=1.0)["workers"] >= workers:
                return
        except Exception:
            pass
        time.sleep(0.1)
    raise RuntimeError("virtbroker did not come up (see the log above)")


def _phase(label: str, items: list, action) -> float:
    started = time.monotonic()
    for item in tqdm(items, desc=label, unit="guest", leave=True):
        action(item)
    return time.monotonic() - started


def run_demo(guests: int = 20, workers: int = 4, uri: str = "test:///default") -> int:
    state_dir = tempfile.mkdtemp(prefix="virtbroker-demo-")
    log_path = os.path.join(state_dir, "virtbroker.log")
    up = subprocess.Popen(
        [sys.executable, "-m", "virtbroker.launcher", "up", "--state-dir", state_dir, "--workers", str(workers),
         "--uri", uri],
        stdout=open(log_path, "w"),
        stderr=subprocess.STDOUT,
    )
    print(f"virtbroker up: broker and {workers} lifecycle workers on {uri} (log: {log_path})")
    names = [f"demo-{i:02d}" for i in range(guests)]
    domain_type = "test" if uri.startswith("test:") else "kvm"
    timings: dict[str, float] = {}
    try:
        with Client(f"ipc://{state_dir}/client.sock") as c:
            _wait_ready(c, workers)
            timings["define"] = _phase("define ", names, lambda n: c.define(minimal_domain_xml(n, domain_type)))
            started = time.monotonic()
            jobs = [c.submit(n, "start")["job_id"] for n in names]
            with tqdm(total=len(jobs), desc="start  ", unit="guest") as bar:
                pending = set(jobs)
                while pending:
                    status = c.wait_status(sorted(pending), 0.5)
                    for job in status["jobs"]:
                        if job["state"] not in ("queued", "running"):
                            pending.discard(job["job_id"])
                            bar.update(1)
                            if job["state"] != "succeeded":
                                raise RuntimeError(f"start of {job['domain']} {job['state']}: {job['error']}")
            timings["start (all running)"] = time.monotonic() - started

            started = time.monotonic()
            running = c.list(state="running")
            timings["list"] = time.monotonic() - started
            hosts = sorted({d["host"] for d in running})
            print(f"\n{len(running)} guests running on {len(hosts)} host(s):")
            for d in running[:5]:
                print(f"  {d['name']:<10} {d['state']:<8} {d['host']}")
            if len(running) > 5:
                print(f"  ... and {len(running) - 5} more")

            started = time.monotonic()
            jobs = [c.submit(n, "destroy")["job_id"] for n in names]
            failed = [j for j in c.wait(jobs, 300) if j["state"] != "succeeded"]
            timings["destroy (all shut off)"] = time.monotonic() - started
            if failed:
                raise RuntimeError(f"{len(failed)} destroys failed: {failed[0]['error']}")
            timings["undefine"] = _phase("undefine", names, lambda n: c.run(n, "undefine"))
            left = c.list(all=True)
        print(f"\nSummary: {guests} guests, {workers} workers, {uri}")
        for phase, seconds in timings.items():
            print(f"  {phase:<24} {seconds * 1000:8.1f} ms")
        print(f"  domains left defined     {len(left):8d}")
        return 0
    except Exception as e:
        print(f"demo failed: {e}", file=sys.stderr)
        return 1
    finally:
        up.send_signal(signal.SIGTERM)
        try:
            up.wait(timeout=30)
        except subprocess.TimeoutExpired:
            up.kill()
        shutil.rmtree(state_dir, ignore_errors=True)


def _ha_leader(urls: list[str]) -> tuple[str, int] | None:
    """(client URL, pid) of the broker that leads, as its own ping says; None if none does."""
    for url in urls:
        try:
            with Client(url, timeout_s=1.0) as c:
                status = c.ping(timeout_s=1.0)
        except Exception:
            continue
        if status.get("role") == "leader":
            return url, int(status["leader"]["broker_id"].rpartition("/")[2])
    return None


def _ha_wait_ready(urls: list[str], workers: int, up: subprocess.Popen, timeout_s: float = 60.0) -> tuple[str, int]:
    """Until a broker leads and has every worker; its (client URL, pid)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if up.poll() is not None:
            raise RuntimeError(f"virtbroker up --ha exited with {up.returncode} (see the log)")
        leader = _ha_leader(urls)
        if leader is not None:
            with Client(leader[0], timeout_s=1.0) as c:
                try:
                    if c.ping(timeout_s=1.0)["workers"] >= workers:
                        return leader
                except Exception:
                    pass
        time.sleep(0.1)  # a poll interval: readiness is the ping above
    raise RuntimeError("virtbroker up --ha did not come up (see the log)")


def run_ha_demo(guests: int = 20, workers: int = 4, uri: str = "test:///default") -> int:
    """`virtbroker up --ha` in a temporary state dir: define and start guests, kill -9 the
    leading broker, time the standby's takeover (from the kill to the first define it
    acknowledges), and check that every guest defined before the kill is still there."""
    import uuid as uuidlib

    # Short: ipc:// paths are limited to 107 bytes, and each broker's live one level down.
    state_dir = tempfile.mkdtemp(prefix="vb-ha-", dir="/tmp")
    log_path = os.path.join(state_dir, "virtbroker.log")
    urls = [f"ipc://{state_dir}/{name}/client.sock" for name in ("broker-a", "broker-b")]
    # SIGTERM unwinds like Ctrl-C, so the finally below stops up (and etcd) and removes the dir.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    # setpriv --pdeathsig: up gets SIGTERM (and stops its children, etcd last) even if the demo is killed outright.
    with open(log_path, "w") as log:
        up = subprocess.Popen(
            [*([SETPRIV, "--pdeathsig", "TERM"] if SETPRIV else []), sys.executable, "-m", "virtbroker.launcher", "up",
             "--ha", "--state-dir", state_dir, "--workers", str(workers), "--uri", uri],
            stdout=log, stderr=subprocess.STDOUT,
        )
    print(f"virtbroker up --ha: 3 etcd members, 2 brokers and {workers} lifecycle workers on {uri} (log: {log_path})")
    domain_type = "test" if uri.startswith("test:") else "kvm"
    defined: dict[str, str] = {}  # name -> uuid, each acknowledged before the kill
    code = 1
    try:
        leader_url, leader_pid = _ha_wait_ready(urls, workers, up)
        print(f"clients connect at {','.join(urls)}; the leader is {leader_url} (pid {leader_pid})")
        with Client(",".join(urls), timeout_s=30) as c:
            for i in tqdm(range(guests), desc="define ", unit="guest"):
                name, uuid = f"demo-ha-{i:02d}", str(uuidlib.uuid4())
                c.define(minimal_domain_xml(name, domain_type, uuid=uuid))
                defined[name] = uuid
            jobs = [c.submit(name, "start")["job_id"] for name in defined]
            failed = [j for j in c.wait(jobs, 300) if j["state"] != "succeeded"]
            if failed:
                raise RuntimeError(f"{len(failed)} starts failed: {failed[0]['error']}")
            print(f"{guests} guests defined and running; kill -9 of the leading broker (pid {leader_pid})")
            killed_at = time.monotonic()
            os.kill(leader_pid, signal.SIGKILL)
            # The first define after the kill: the client follows to the standby once it leads.
            c.define(minimal_domain_xml("demo-ha-after", domain_type, uuid=str(uuidlib.uuid4())))
            takeover_s = time.monotonic() - killed_at
            new_leader = _ha_leader(urls)
            print(f"takeover: {takeover_s * 1000:.0f} ms from the kill to the first acknowledged define "
                  f"(now led by {new_leader[0] if new_leader else '?'})")
            listed = {d["name"]: d for d in c.list(all=True)}
            lost = [name for name, uuid in defined.items() if listed.get(name, {}).get("uuid") != uuid]
            if lost:
                raise RuntimeError(f"{len(lost)} guests defined before the kill are missing: {lost[:5]}")
            running = sum(1 for name in defined if listed[name]["state"] == "running")
            print(f"all {guests} guests defined before the kill are there ({running} running)")
            # The workers follow too (they re-register with the new leader); shown, not waited on.
            deadline = time.monotonic() + 10
            while (joined := c.ping(timeout_s=5).get("workers") or 0) < workers and time.monotonic() < deadline:
                time.sleep(0.1)  # a poll interval
            print(f"{joined} of {workers} lifecycle workers registered with the new leader")
        code = 0
    except KeyboardInterrupt:
        print("demo interrupted: cleaning up", file=sys.stderr)
        code = 130
    except Exception as e:
        print(f"demo failed: {e} (log: {log_path})", file=sys.stderr)
        with open(log_path, errors="replace") as f:
            print(f.read()[-3000:], file=sys.stderr)
    finally:
        up.send_signal(signal.SIGTERM)
        try:
            up.wait(timeout=60)
        except subprocess.TimeoutExpired:
            up.kill()  # its children, etcd included, get SIGTERM as it dies (pdeathsig)
            up.wait()
        shutil.rmtree(state_dir, ignore_errors=True)
        signal.signal(signal.SIGTERM, previous)
    return code


def _interrupt(signum, frame):
    raise KeyboardInterrupt
