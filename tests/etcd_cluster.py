"""A real etcd cluster of separate `etcd` processes on loopback ports, for tests (not a pytest file)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import urllib.error
import urllib.request
import uuid

from tests.waiting import wait_until

ETCD = shutil.which("etcd") or "/usr/bin/etcd"
# setpriv --pdeathsig KILL: a test run killed outright (SIGKILL, a timeout) leaves no etcd
# behind. (A preexec_fn calling prctl would do the same, but is unsafe once threads run.)
# The signal follows the thread that started the member: start members from the test's thread.
DIE_WITH_PARENT = ["setpriv", "--pdeathsig", "KILL"] if shutil.which("setpriv") else []
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0


def _free_ports(count: int) -> list[int]:
    """Ports the kernel hands out now, all held open together so none repeats."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _get_json(url: str, timeout_s: float = 1.0, body: bytes | None = None) -> dict | None:
    try:
        with urllib.request.urlopen(url, data=body, timeout=timeout_s) as resp:
            return json.loads(resp.read())
    except (OSError, urllib.error.URLError, ValueError):
        return None


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
        ports = _free_ports(2 * members)
        self.client_ports = ports[:members]
        self.peer_ports = ports[members:]
        self.names = [f"m{i}" for i in range(members)]
        self.endpoints = [f"127.0.0.1:{p}" for p in self.client_ports]
        self.token = f"vb-test-{uuid.uuid4().hex[:12]}"  # a cluster of its own, never joins another
        self.initial_cluster = ",".join(
            f"{name}=http://127.0.0.1:{port}" for name, port in zip(self.names, self.peer_ports, strict=True)
        )
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
        return os.path.join(self.base_dir, self.names[i])

    def _spawn(self, i: int) -> None:
        client = f"http://127.0.0.1:{self.client_ports[i]}"
        peer = f"http://127.0.0.1:{self.peer_ports[i]}"
        args = [
            *DIE_WITH_PARENT, ETCD, "--name", self.names[i], "--data-dir", self.data_dir(i),
            "--listen-client-urls", client, "--advertise-client-urls", client,
            "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
            "--initial-cluster", self.initial_cluster, "--initial-cluster-token", self.token,
            "--initial-cluster-state", "new",  # ignored on a restart: the data dir knows the cluster
            "--heartbeat-interval", "100", "--election-timeout", "1000",
            "--logger", "zap", "--log-outputs", "stderr",
        ]
        if self.logs[i] is None:
            # Open for the member's whole life, across restarts; close() closes it.
            self.logs[i] = open(os.path.join(self.base_dir, f"{self.names[i]}.log"), "ab")  # noqa: SIM115
        self.procs[i] = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=self.logs[i], stderr=self.logs[i])

    def healthy(self, i: int) -> bool:
        """The member answers /health as healthy: it is up, has a leader and serves a quorum read."""
        proc = self.procs[i]
        if proc is None or proc.poll() is not None:
            return False
        reply = _get_json(f"http://127.0.0.1:{self.client_ports[i]}/health")
        return bool(reply) and reply.get("health") == "true"

    def wait_healthy(self, i: int, timeout_s: float = START_TIMEOUT_S) -> None:
        def ready() -> bool:
            proc = self.procs[i]
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"etcd member {self.names[i]} exited with {proc.returncode}: {self.log_tail(i)}")
            return self.healthy(i)

        wait_until(ready, timeout_s=timeout_s, what=f"etcd member {self.names[i]} healthy")

    def log_tail(self, i: int, size_bytes: int = 2000) -> str:
        path = os.path.join(self.base_dir, f"{self.names[i]}.log")
        try:
            with open(path, "rb") as f:
                f.seek(max(0, os.path.getsize(path) - size_bytes))
                return f.read().decode(errors="replace")
        except OSError:
            return ""

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
        return _get_json(f"http://127.0.0.1:{self.client_ports[i]}/v3/maintenance/status", body=b"{}")

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
