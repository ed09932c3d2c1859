"""The demo: `virtbroker up` on the embedded test hypervisor, then 20 guests defined, started, listed, destroyed."""

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
        [sys.executable, "-m", "virtbroker.launcher", "up", "--state-dir", state_dir, "--workers", str(workers), "--uri", uri],
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
