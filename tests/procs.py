"""Real virtbroker processes for tests: start, wait until ready by a ping, kill with real signals."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.waiting import wait_until
from virtbroker.client.api import Client

ROOT = Path(__file__).resolve().parents[1]


class Proc:
    def __init__(self, name: str, argv: list[str], log_dir: Path):
        self.name = name
        self.argv = argv
        self.log_path = log_dir / f"{name}.log"
        self.popen: subprocess.Popen | None = None

    def start(self) -> Proc:
        log = open(self.log_path, "ab")
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        self.popen = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(ROOT))
        log.close()
        return self

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def signal(self, signum: int) -> None:
        if self.alive():
            os.kill(self.popen.pid, signum)

    def kill9(self) -> None:
        if self.alive():
            self.popen.kill()
            self.popen.wait(timeout=10)

    def stop(self, timeout_s: float = 20.0) -> int | None:
        if not self.alive():
            return self.popen.returncode if self.popen else None
        self.popen.send_signal(signal.SIGTERM)
        try:
            return self.popen.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(timeout=10)
            return None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""


class Cluster:
    """A broker and workers as separate processes sharing one state directory."""

    def __init__(self, state_dir: Path, uri: str = "test:///default", lease_ttl_s: float = 3.0, extra: list[str] = ()):
        self.state_dir = state_dir
        self.uri = uri
        self.lease_ttl_s = lease_ttl_s
        self.extra = list(extra)
        self.broker: Proc | None = None
        self.workers: dict[str, Proc] = {}
        self.security: dict[str, Proc] = {}
        self.client_url = f"ipc://{state_dir}/client.sock"
        self.local_url = f"unix://{state_dir}/local.sock"
        self._clients: list[Client] = []

    def _argv(self, command: str, *more: str) -> list[str]:
        return [
            sys.executable, "-m", "virtbroker.launcher", command, "--state-dir", str(self.state_dir),
            "--uri", self.uri, "--lease-ttl", str(self.lease_ttl_s), *self.extra, *more,
        ]

    def start_broker(self) -> Proc:
        self.broker = Proc("broker", self._argv("broker"), self.state_dir).start()
        self.wait_ready()
        return self.broker

    def start_worker(self, worker_id: str, slots: int | None = 4) -> Proc:
        """slots=None: the worker's defaults (slots and priority_slots), as an operator gets them."""
        more = ["--slots", str(slots)] if slots is not None else []
        proc = Proc(worker_id, self._argv("worker", "--worker-id", worker_id, *more), self.state_dir)
        self.workers[worker_id] = proc.start()
        return proc

    def start_security_worker(self, driver: str, label_pause_s: float = 0.0) -> Proc:
        """`virtbroker security-worker`; with label_pause_s, tests/paused_security_worker.py,
        whose driver pauses that long after each file it labels (crash tests aim into it)."""
        worker_id = f"sec-{driver}"
        argv = self._argv("security-worker", "--driver", driver, "--worker-id", worker_id)
        if label_pause_s:
            # [python -m virtbroker.launcher security-worker OPTIONS] becomes
            # [python -m tests.paused_security_worker --label-pause S OPTIONS]
            argv = [
                sys.executable, "-m", "tests.paused_security_worker", "--label-pause", str(label_pause_s), *argv[4:],
            ]
        proc = Proc(worker_id, argv, self.state_dir)
        self.security[driver] = proc.start()
        return proc

    def client(self, timeout_s: float = 30.0, url: str | None = None) -> Client:
        c = Client(url or self.client_url, timeout_s=timeout_s)
        self._clients.append(c)
        return c

    def wait_ready(self, timeout_s: float = 20.0) -> None:
        with Client(self.client_url, timeout_s=1.0) as c:
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                try:
                    c.ping(timeout_s=0.5)
                    return
                except Exception:
                    if self.broker and not self.broker.alive():
                        raise RuntimeError("broker exited:\n" + self.broker.log()[-3000:]) from None
            raise RuntimeError("broker did not answer a ping:\n" + (self.broker.log()[-3000:] if self.broker else ""))

    def wait_workers(self, count: int, role: str = "lifecycle", timeout_s: float = 30.0) -> list[dict]:
        def joined() -> list[dict]:
            workers = [w for w in c.workers() if w["role"] == role]
            return workers if len(workers) >= count else []

        with Client(self.client_url, timeout_s=2.0) as c:
            try:
                return wait_until(joined, timeout_s, what=f"{count} {role} worker(s) joined")
            except AssertionError:
                raise RuntimeError(f"fewer than {count} {role} workers joined:\n" + self.logs()) from None

    def logs(self) -> str:
        procs = ([self.broker] if self.broker else []) + list(self.workers.values()) + list(self.security.values())
        return "\n".join(f"--- {p.name}\n{p.log()[-4000:]}" for p in procs)

    def stop(self) -> None:
        for c in self._clients:
            c.close()
        for proc in list(self.workers.values()) + list(self.security.values()):
            proc.stop()
        if self.broker:
            self.broker.stop()
