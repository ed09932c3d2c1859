"""Local etcd members on loopback: the cluster `virtbroker up --ha` runs under STATE_DIR/etcd/ (and the tests run)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import asdict, dataclass, replace
from typing import Any

from virtbroker.common.config import Config
from virtbroker.common.errors import ConfigError, VirtbrokerError

ETCD = shutil.which("etcd") or "/usr/bin/etcd"
# setpriv --pdeathsig: a member dies with the process that started it, even if that one is
# killed outright (SIGKILL, a test timeout), so no etcd is left behind. (A preexec_fn calling
# prctl would do the same, but is unsafe once threads run.) The signal follows the thread that
# started the member: start members from the main thread.
SETPRIV = shutil.which("setpriv")
# etcd's own timing, tighter than its defaults (100 ms and 1 s are its defaults too on a LAN,
# stated so a reader sees what a member's failure costs): a new raft leader within about 1 s.
HEARTBEAT_MS = 100
ELECTION_TIMEOUT_MS = 1000
LAYOUT_FILE = "cluster.json"
STOP_TIMEOUT_S = 10.0


def free_ports(count: int) -> list[int]:
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


def get_json(url: str, timeout_s: float = 1.0, body: bytes | None = None) -> dict | None:
    """GET (or POST body to) url and decode its JSON; None if it does not answer so."""
    try:
        with urllib.request.urlopen(url, data=body, timeout=timeout_s) as resp:
            return json.loads(resp.read())
    except (OSError, urllib.error.URLError, ValueError):
        return None


def check_installed() -> None:
    if not os.path.exists(ETCD):
        raise ConfigError(f"etcd is not installed ({ETCD}; Debian's etcd-server, scripts/setup-host.sh installs it)")


@dataclass(frozen=True)
class LocalCluster:
    """Where each member of a cluster on 127.0.0.1 listens and keeps its data: member i is
    names[i], serves clients on client_ports[i] and its peers on peer_ports[i], and keeps its
    data in base_dir/names[i]. A member restarted on its data dir rejoins as itself, so the
    layout must stay the same for the cluster's whole life (load_or_create keeps it in
    base_dir/cluster.json)."""

    base_dir: str
    names: tuple[str, ...]
    client_ports: tuple[int, ...]
    peer_ports: tuple[int, ...]
    token: str  # --initial-cluster-token: a cluster of its own, never joins another

    @classmethod
    def new(cls, base_dir: str, members: int = 3, base_port: int = 0, token: str = "") -> LocalCluster:
        """base_port 0: free ports; else clients on base_port.. and peers right after them."""
        if base_port:
            ports = list(range(base_port, base_port + 2 * members))
            if ports[-1] > 65535:
                raise ConfigError(f"etcd ports {ports[0]}..{ports[-1]} run past 65535")
        else:
            ports = free_ports(2 * members)
        return cls(
            base_dir=os.path.abspath(base_dir),
            names=tuple(f"m{i}" for i in range(members)),
            client_ports=tuple(ports[:members]),
            peer_ports=tuple(ports[members:]),
            token=token or f"virtbroker-{uuid.uuid4().hex[:12]}",
        )

    @classmethod
    def load_or_create(cls, base_dir: str, members: int = 3, base_port: int = 0) -> LocalCluster:
        """The layout kept in base_dir/cluster.json, or a new one written there. A kept
        layout is used as it is (its members' data dirs know their peers by these ports);
        a base_port that disagrees with it is a configuration error."""
        path = os.path.join(base_dir, LAYOUT_FILE)
        try:
            with open(path) as f:
                kept = json.load(f)
        except FileNotFoundError:
            kept = None
        except (OSError, ValueError) as e:
            raise ConfigError(f"cannot read the local etcd cluster's layout {path}: {e}") from e
        if kept is not None:
            layout = cls(base_dir=os.path.abspath(base_dir), names=tuple(kept["names"]),
                         client_ports=tuple(kept["client_ports"]), peer_ports=tuple(kept["peer_ports"]),
                         token=kept["token"])
            if len(layout.names) != members:
                raise ConfigError(f"{path} describes {len(layout.names)} members, not {members}")
            if base_port and layout.client_ports[0] != base_port:
                raise ConfigError(
                    f"the etcd cluster in {base_dir} listens from port {layout.client_ports[0]}, not {base_port} "
                    "(its members know each other by their ports: give that port, or move the directory away)")
            return layout
        layout = cls.new(base_dir, members, base_port)
        os.makedirs(base_dir, exist_ok=True)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump({k: v for k, v in asdict(layout).items() if k != "base_dir"}, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return layout

    @property
    def endpoints(self) -> list[str]:
        """HOST:PORT of every member's client port, as --store etcd://... takes them."""
        return [f"127.0.0.1:{port}" for port in self.client_ports]

    @property
    def store_url(self) -> str:
        return "etcd://" + ",".join(self.endpoints)

    @property
    def initial_cluster(self) -> str:
        pairs = zip(self.names, self.peer_ports, strict=True)
        return ",".join(f"{name}=http://127.0.0.1:{port}" for name, port in pairs)

    def data_dir(self, i: int) -> str:
        return os.path.join(self.base_dir, self.names[i])

    def log_path(self, i: int) -> str:
        return os.path.join(self.base_dir, f"{self.names[i]}.log")

    def argv(self, i: int, die_with_parent: str = "KILL") -> list[str]:
        """The command line of member i; die_with_parent: the signal it gets when its starter
        dies (setpriv --pdeathsig), or "" for none."""
        client = f"http://127.0.0.1:{self.client_ports[i]}"
        peer = f"http://127.0.0.1:{self.peer_ports[i]}"
        prefix = [SETPRIV, "--pdeathsig", die_with_parent] if die_with_parent and SETPRIV else []
        return [
            *prefix, ETCD, "--name", self.names[i], "--data-dir", self.data_dir(i),
            "--listen-client-urls", client, "--advertise-client-urls", client,
            "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
            "--initial-cluster", self.initial_cluster, "--initial-cluster-token", self.token,
            "--initial-cluster-state", "new",  # ignored on a restart: the data dir knows the cluster
            "--heartbeat-interval", str(HEARTBEAT_MS), "--election-timeout", str(ELECTION_TIMEOUT_MS),
            "--logger", "zap", "--log-outputs", "stderr",
        ]

    def healthy(self, i: int) -> bool:
        """Member i answers /health as healthy: it is up, has a leader and serves a quorum read."""
        reply = get_json(f"http://127.0.0.1:{self.client_ports[i]}/health")
        return bool(reply) and reply.get("health") == "true"

    def status(self, i: int) -> dict | None:
        """Member i's /v3/maintenance/status reply, or None if it does not answer."""
        return get_json(f"http://127.0.0.1:{self.client_ports[i]}/v3/maintenance/status", body=b"{}")

    def log_tail(self, i: int, size_bytes: int = 2000) -> str:
        path = self.log_path(i)
        try:
            with open(path, "rb") as f:
                f.seek(max(0, os.path.getsize(path) - size_bytes))
                return f.read().decode(errors="replace")
        except OSError:
            return ""


class MemberProcess:
    """One running etcd member, with the part of multiprocessing.Process's interface `up`
    supervises its children by (pid, sentinel, exitcode, is_alive, terminate, kill, join).

    Its output goes to the member's log file (etcd logs a line per raft event: too much for
    up's merged log). The sentinel is a pidfd, readable once the member has exited, so `up`
    waits on members and forked children alike.
    """

    def __init__(self, layout: LocalCluster, i: int, die_with_parent: str = "TERM"):
        os.makedirs(layout.base_dir, exist_ok=True)
        self.name = layout.names[i]
        with open(layout.log_path(i), "ab") as log:
            self.popen = subprocess.Popen(layout.argv(i, die_with_parent), stdin=subprocess.DEVNULL, stdout=log,
                                          stderr=log, close_fds=True)
        self.pid = self.popen.pid
        self.sentinel = os.pidfd_open(self.pid)

    @property
    def exitcode(self) -> int | None:
        return self.popen.poll()

    def is_alive(self) -> bool:
        return self.popen.poll() is None

    def terminate(self) -> None:
        self._signal(signal.SIGTERM)

    def kill(self) -> None:
        self._signal(signal.SIGKILL)

    def _signal(self, signum: int) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signum)

    def join(self, timeout: float | None = None) -> None:
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
        if self.popen.returncode is not None and self.sentinel >= 0:
            os.close(self.sentinel)
            self.sentinel = -1

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """SIGTERM (etcd leaves its peers cleanly), SIGKILL after timeout_s."""
        self.terminate()
        self.join(timeout_s)
        if self.is_alive():
            self.kill()
            self.join(timeout_s)


def wait_healthy(layout: LocalCluster, members: list[MemberProcess], timeout_s: float, give_up=lambda: False) -> None:
    """Until every member answers healthy; an error naming the member if one exits or
    timeout_s passes (VirtbrokerError; its log's tail says why). give_up(): stop waiting early, quietly."""
    deadline = time.monotonic() + timeout_s
    waiting = set(range(len(members)))
    while waiting and not give_up():
        for i in sorted(waiting):
            if members[i].exitcode is not None:
                raise VirtbrokerError(f"etcd member {layout.names[i]} exited with {members[i].exitcode}: "
                                  f"{layout.log_tail(i, 600)}")
            if layout.healthy(i):
                waiting.discard(i)
        if waiting and time.monotonic() > deadline:
            names = ", ".join(layout.names[i] for i in sorted(waiting))
            raise VirtbrokerError(f"etcd member(s) {names} not healthy within {timeout_s:g} s "
                                  f"(logs in {layout.base_dir})")
        if waiting:
            time.sleep(0.1)  # a poll interval: the members have no readiness notification


# ---------------------------------------------------------------------------- `virtbroker up --ha`
HA_BROKERS = ("broker-a", "broker-b")
# Endpoints each broker of `up --ha` derives from its own state dir; given for up, one value
# would be bound by both brokers.
HA_DERIVED_URLS = ("client_url", "worker_url", "events_url", "local_url", "readonly_url")


def ha_configs(config: Config, layout: LocalCluster) -> tuple[list[tuple[str, Config]], Config]:
    """The configs of `up --ha`'s children: each broker's (its state dir STATE_DIR/broker-a or
    -b, its endpoints there, the store on the local cluster) and the workers' (every
    broker's worker endpoint, so they follow the leader). A metrics port given is broker-a's;
    broker-b takes the next one."""
    # Each broker derives its own endpoints from its own state dir.
    blank_urls: dict[str, Any] = {key: "" for key in (*HA_DERIVED_URLS, "libvirt_url", "libvirt_readonly_url")}
    brokers = []
    for n, name in enumerate(HA_BROKERS):
        brokers.append((name, replace(
            config, state_dir=os.path.join(config.state_dir, name), store=layout.store_url,
            metrics_port=config.metrics_port + n if config.metrics_port else 0,
            **blank_urls,
        )))
    workers = replace(config, store=layout.store_url,
                      worker_url=",".join(broker.worker_url for _, broker in brokers))
    return brokers, workers


def client_urls(brokers: list[tuple[str, Config]], key: str = "client_url") -> str:
    """What clients connect to: every broker's endpoint, comma-separated (Client follows the leader)."""
    return ",".join(getattr(broker, key) for _, broker in brokers)


def wait_leader(brokers: list[tuple[str, Config]], timeout_s: float, give_up=lambda: False) -> str:
    """Until one of the brokers says it leads (its ping over the local endpoint); its name.

    `up --ha` starts the workers only then: a worker that arrives while no broker leads is
    sent from one broker to the other, and one sent back to a broker it has just left may
    go unheard: the worker endpoint's ROUTER drops a new connection that reuses the identity of
    one it has not yet seen close (no ZMQ_ROUTER_HANDOVER).
    """
    from virtbroker.client.api import Client
    from virtbroker.common.errors import VirtbrokerError as Error

    deadline = time.monotonic() + timeout_s
    while not give_up():
        for name, broker in brokers:
            try:
                with Client(broker.local_url, timeout_s=0.5) as c:
                    if c.ping(timeout_s=0.5).get("role") == "leader":
                        return name
            except Error:
                continue
        if time.monotonic() > deadline:
            raise Error(f"no broker leads within {timeout_s:g} s of their start (is etcd healthy? see the log)")
        time.sleep(0.1)  # a poll interval: readiness is the ping above
    return ""
