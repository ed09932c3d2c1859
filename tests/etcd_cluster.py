"""A real etcd cluster of separate `etcd` processes on loopback ports, for tests (not a pytest file)."""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid

from tests.waiting import wait_until
from virtbroker.launcher.etcd import ETCD, LocalCluster

START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0


class EtcdCluster:
    """`members` etcd processes on 127.0.0.1, each with its data dir under base_dir.

    Members keep their ports and data dirs across stop()/start(), so a restarted member
    rejoins as itself. close() kills every member and removes the data dirs; it is safe
    to call twice, and a member whose start failed is cleaned up too.
    """

    def __init__(self, base_dir: str, members: int = 3):
        if not os.path.exists(ETCD):
            raise RuntimeError("etcd is not installed (scripts/setup-host.sh installs etcd-server)")
        self.base_dir = os.path.join(str(base_dir), f"etcd-{uuid.uuid4().hex[:8]}")
        os.makedirs(self.base_dir)
        # The layout and command lines are the product's (launcher/etcd.py, `virtbroker up --ha`);
        # the members are started here, each from the test's thread, killed with it.
        self.layout = LocalCluster.new(self.base_dir, members, token=f"vb-test-{uuid.uuid4().hex[:12]}")
        self.client_ports = list(self.layout.client_ports)
        self.peer_ports = list(self.layout.peer_ports)
        self.names = list(self.layout.names)
        self.endpoints = self.layout.endpoints
        self.token = self.layout.token
        self.initial_cluster = self.layout.initial_cluster
        self.procs: list[subprocess.Popen | None] = [None] * members
        self.logs: list = [None] * members
        self.closed = False
        try:
            for i in range(members):
                self._spawn(i)
            for i in range(members):
                self.wait_healthy(i)
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ members
    def data_dir(self, i: int) -> str:
        return self.layout.data_dir(i)

    def _spawn(self, i: int) -> None:
        if self.logs[i] is None:
            # Open for the member's whole life, across restarts; close() closes it.
            self.logs[i] = open(self.layout.log_path(i), "ab")  # noqa: SIM115
        self.procs[i] = subprocess.Popen(self.layout.argv(i, die_with_parent="KILL"), stdin=subprocess.DEVNULL,
                                         stdout=self.logs[i], stderr=self.logs[i])

    def healthy(self, i: int) -> bool:
        """The member answers /health as healthy: it is up, has a leader and serves a quorum read."""
        proc = self.procs[i]
        if proc is None or proc.poll() is not None:
            return False
        return self.layout.healthy(i)

    def wait_healthy(self, i: int, timeout_s: float = START_TIMEOUT_S) -> None:
        def ready() -> bool:
            proc = self.procs[i]
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"etcd member {self.names[i]} exited with {proc.returncode}: {self.log_tail(i)}")
            return self.healthy(i)

        wait_until(ready, timeout_s=timeout_s, what=f"etcd member {self.names[i]} healthy")

    def log_tail(self, i: int, size_bytes: int = 2000) -> str:
        return self.layout.log_tail(i, size_bytes)

    def running(self, i: int) -> bool:
        proc = self.procs[i]
        return proc is not None and proc.poll() is None

    def kill9(self, i: int) -> None:
        """SIGKILL the member: no shutdown, no goodbye to its peers."""
        proc = self.procs[i]
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(STOP_TIMEOUT_S)

    def stop(self, i: int) -> None:
        """SIGTERM, and SIGKILL if it has not exited within STOP_TIMEOUT_S."""
        proc = self.procs[i]
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(STOP_TIMEOUT_S)

    def start(self, i: int, wait: bool = True) -> None:
        """Start a stopped member again on its data dir. wait: until it is healthy, which
        needs a quorum: restarting the first of two stopped members, pass wait=False."""
        if self.running(i):
            return
        self._spawn(i)
        if wait:
            self.wait_healthy(i)

    def status(self, i: int) -> dict | None:
        """The member's /v3/maintenance/status reply, or None if it does not answer."""
        if not self.running(i):
            return None
        return self.layout.status(i)

    def leader_index(self) -> int | None:
        """Which member is the raft leader, as the running members report it; None if none knows."""
        ids: dict[str, int] = {}
        leader = None
        for i in range(len(self.procs)):
            status = self.status(i)
            if status is None:
                continue
            ids[status["header"]["member_id"]] = i
            if status.get("leader") and status["leader"] != "0":
                leader = status["leader"]
        return ids.get(leader) if leader is not None else None

    def close(self) -> None:
        """Kill every member and remove the data dirs; safe to call twice."""
        if self.closed:
            return
        self.closed = True
        for proc in self.procs:
            if proc is not None and proc.poll() is None:
                proc.kill()
        for proc in self.procs:
            if proc is not None:
                try:
                    proc.wait(STOP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    pass
        for log in self.logs:
            if log is not None:
                log.close()
        shutil.rmtree(self.base_dir, ignore_errors=True)

    def __enter__(self) -> EtcdCluster:  # noqa: PYI034
        return self

    def __exit__(self, *exc) -> None:
        self.close()
