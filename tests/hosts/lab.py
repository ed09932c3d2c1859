"""Separate hypervisor hosts on one machine: users with their own qemu:///session, each in a
network namespace (scripts/test-hosts.sh), a broker on the bridge, a lifecycle worker inside
each host, a watcher of which host runs which guest's QEMU, and the test fence agent's gate.

A host here is user vbhI in namespace vbnsI at 198.18.0.(10+I); its workers reach the broker
at tcp://198.18.0.1:PORT with CURVE, and its worker key records the host id vbhI. A partition
is the host's veth going down on the root side; a host crash is kill -9 of its workers and
its QEMUs.
"""

from __future__ import annotations

import contextlib
import grp
import hashlib
import json
import os
import pwd
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tests.procs import ROOT, Proc
from tests.waiting import wait_until
from virtbroker.client.api import Client
from virtbroker.client.templates import minimal_domain_xml

SCRIPT = ROOT / "scripts" / "test-hosts.sh"
FENCE_HOST = ROOT / "tests" / "fence_host.py"
FENCE_DIR_ENV = "VIRTBROKER_TEST_FENCE_DIR"  # tests/fence_host.py logs there and reads its gate
BROKER_ADDR = "198.18.0.1"  # vbbr0, the root namespace's end of every host's link
SHARED_DIR = Path("/var/lib/virtbroker-test/shared")  # storage every host shares
LOCKSPACE_DIR = SHARED_DIR / "lockspace"  # libvirt lockd's indirect lockspace (qemu-lockd.conf)
PIDS_FILE = Path("/var/lib/virtbroker-test/pids")  # brokers test-hosts.sh down ends after a killed run
RUNTIME_DIR = Path("/run/vbh")
HOSTS_GROUP = "vbhosts"  # every host's user: the shared storage's group
PREFIX = "vbt-hosts-"  # every guest of these tests
SESSION_URI = "qemu:///session"
HOST_PATH = "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin"

# Host-failure timing for the tests: a host is unreachable after HOST_DEAD_S without a
# renewal; an armed worker self-fences after SELF_FENCE_S. The broker forgets a silent
# worker after LEASE_TTL_S, and a heartbeat goes every LEASE_TTL_S / 4.
LEASE_TTL_S = 2.0
HOST_DEAD_S = 8.0
SELF_FENCE_S = 5.0
FENCE_QUIET_S = 1.0
FENCE_RETRY_S = 1.0


def hosts_script(*args: str, timeout_s: float = 300.0) -> str:
    """Run scripts/test-hosts.sh; its output, or RuntimeError with what it printed."""
    done = subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout_s)
    if done.returncode != 0:
        raise RuntimeError(f"test-hosts.sh {' '.join(args)} failed ({done.returncode}):\n{done.stdout}{done.stderr}")
    return done.stdout


# --------------------------------------------------------------------------- QEMU processes


@dataclass(frozen=True)
class QemuProcess:
    pid: int
    uid: int
    uuid: str  # the guest's, from -uuid on QEMU's command line


def qemu_processes() -> list[QemuProcess]:
    """Every QEMU running now, as /proc shows it: pid, real uid, and the guest's UUID."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
            if not os.path.basename(args[0]).startswith(b"qemu-system") or b"-uuid" not in args:
                continue  # a zombie's cmdline is empty: it runs nothing any more
            uuid = args[args.index(b"-uuid") + 1].decode()
            with open(f"/proc/{entry.name}/status") as f:
                uid = next(int(line.split()[1]) for line in f if line.startswith("Uid:"))
        except (OSError, IndexError, StopIteration):
            continue  # it exited while we read it
        found.append(QemuProcess(int(entry.name), uid, uuid.lower()))
    return found


def ps_uids(uuid: str) -> set[int]:
    """The uids `ps` shows for this guest's QEMU (-ww: no line is cut at 80 columns)."""
    out = subprocess.run(["ps", "-eww", "-o", "uid=,args="], capture_output=True, text=True, check=True).stdout
    return {int(line.split(None, 1)[0]) for line in out.splitlines() if "qemu-system" in line and uuid in line}


def kill_pids(pids: list[int], timeout_s: float = 15.0) -> None:
    """SIGKILL each pid, then wait until none of them runs any more (a zombie counts as gone)."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not any(_running(pid) for pid in pids), timeout_s, what=f"processes {pids} gone")


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class QemuWatcher:
    """Samples /proc every interval_s: which host (by QEMU's uid) runs each guest's QEMU, and
    every sample in which one guest runs on two hosts at once (`doubles`)."""

    def __init__(self, host_by_uid: dict[int, str], interval_s: float = 0.1):
        self.host_by_uid = host_by_uid
        self.interval_s = interval_s
        self.samples = 0
        self.doubles: list[tuple[float, str, list[str]]] = []  # (monotonic time, uuid, hosts)
        self.seen: dict[str, set[str]] = {}  # uuid -> every host it ever ran on
        self._now: dict[str, frozenset[str]] = {}  # the latest sample: uuid -> hosts
        self._lock = threading.Lock()
        self._sampled = threading.Condition(self._lock)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="qemu-watcher")

    def start(self) -> QemuWatcher:
        self._sample()  # one sample before the test acts
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def _sample(self) -> None:
        now: dict[str, set[str]] = {}
        for proc in qemu_processes():
            host = self.host_by_uid.get(proc.uid)
            if host is not None:
                now.setdefault(proc.uuid, set()).add(host)
        at = time.monotonic()
        with self._lock:
            self.samples += 1
            for uuid, hosts in now.items():
                self.seen.setdefault(uuid, set()).update(hosts)
                if len(hosts) > 1:
                    self.doubles.append((at, uuid, sorted(hosts)))
            self._now = {uuid: frozenset(hosts) for uuid, hosts in now.items()}
            self._sampled.notify_all()

    def where(self, uuid: str) -> frozenset[str]:
        """The hosts running this guest's QEMU in the latest sample."""
        with self._lock:
            return self._now.get(uuid.lower(), frozenset())

    def fresh(self) -> None:
        """Wait for a sample taken after this call (so that `where` reflects what just happened)."""
        with self._lock:
            # The next sample may have begun before this call: wait for the one after it.
            target = self.samples + 2
            self._sampled.wait_for(lambda: self.samples >= target or self._stop.is_set(), timeout=5)

    def report(self) -> str:
        with self._lock:
            return f"{self.samples} samples; doubles: {self.doubles[:10]}"


# --------------------------------------------------------------------------- one host


@dataclass(frozen=True)
class LabHost:
    """Host I: user vbhI with its own session libvirtd, in namespace vbnsI."""

    index: int

    @property
    def user(self) -> str:
        return f"vbh{self.index}"

    @property
    def host_id(self) -> str:
        return self.user  # what its worker key records (keygen --host)

    @property
    def pw(self) -> pwd.struct_passwd:
        return pwd.getpwnam(self.user)

    @property
    def uid(self) -> int:
        return self.pw.pw_uid

    @property
    def home(self) -> Path:
        return Path(self.pw.pw_dir)

    @property
    def runtime_dir(self) -> Path:
        return RUNTIME_DIR / str(self.uid)

    @property
    def netns(self) -> str:
        return f"vbns{self.index}"

    @property
    def veth(self) -> str:
        return f"vbv{self.index}"  # the root namespace's end, on the bridge

    @property
    def addr(self) -> str:
        return f"198.18.0.{10 + self.index}"

    @property
    def worker_id(self) -> str:
        return f"{self.user}-lw"

    def argv(self, *command: str) -> list[str]:
        """COMMAND as this host: inside its namespace, as its user, with its own runtime dir.

        setpriv execs (runuser would fork and wait), so the pid a test gets is the command's
        own, and a kill -9 of it is a kill -9 of the worker.
        """
        return [
            "ip", "netns", "exec", self.netns,
            "setpriv", f"--reuid={self.user}", f"--regid={self.pw.pw_gid}", "--init-groups", "--",
            "env", "-i", f"PATH={HOST_PATH}", f"HOME={self.home}", f"USER={self.user}",
            f"XDG_RUNTIME_DIR={self.runtime_dir}", *command,
        ]

    def run(self, *command: str, check: bool = True, timeout_s: float = 60.0) -> subprocess.CompletedProcess:
        done = subprocess.run(self.argv(*command), capture_output=True, text=True, timeout=timeout_s)
        if check and done.returncode != 0:
            raise RuntimeError(f"{self.user}: {' '.join(command)} failed ({done.returncode}): {done.stderr.strip()}")
        return done

    def virsh(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return self.run("virsh", "-q", "-c", SESSION_URI, *args, check=check)

    def give(self, source: Path, name: str, mode: int) -> Path:
        """Copy a file into the host user's home, owned by it."""
        return self.write(name, source.read_bytes(), mode)

    def write(self, name: str, content: bytes | str, mode: int = 0o600) -> Path:
        """A file in the host user's home, owned by it."""
        target = self.home / name
        target.write_bytes(content.encode() if isinstance(content, str) else content)
        os.chown(target, self.uid, self.pw.pw_gid)
        os.chmod(target, mode)
        return target

    def partition(self) -> None:
        """Cut the host off: its link goes down on the root side."""
        subprocess.run(["ip", "link", "set", self.veth, "down"], check=True)

    def heal(self) -> None:
        subprocess.run(["ip", "link", "set", self.veth, "up"], check=True)

    def qemus(self) -> list[QemuProcess]:
        return [q for q in qemu_processes() if q.uid == self.uid]

    def qemu_pids(self) -> list[int]:
        return [q.pid for q in self.qemus()]

    def kill_qemus(self) -> None:
        """Power the host's guests off: kill -9 every QEMU of its user."""
        kill_pids(self.qemu_pids())

    def remove_guests(self) -> None:
        """Kill every QEMU of the host and undefine its test guests (tests leave none behind)."""
        self.kill_qemus()
        names = self.virsh("list", "--all", "--name", check=False).stdout.split()
        for name in names:
            if name.startswith(PREFIX):
                self.virsh("destroy", name, check=False)
                self.virsh("undefine", name, check=False)


# --------------------------------------------------------------------------- shared storage


def make_disk(name: str) -> Path:
    """A small qcow2 disk on the shared storage that every host's user may open (group vbhosts)."""
    path = SHARED_DIR / name
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), "16M"], check=True)
    os.chown(path, 0, grp.getgrnam(HOSTS_GROUP).gr_gid)
    os.chmod(path, 0o660)
    return path


def lease_path(disk: Path) -> Path:
    """The lease libvirt's lockd takes for a disk in its indirect lockspace: the SHA-256 of its path."""
    return LOCKSPACE_DIR / hashlib.sha256(str(disk).encode()).hexdigest()


def share_lease(disk: Path) -> Path:
    """Make the disk's lease file beforehand, open to every host's user.

    virtlockd creates a missing lease file with mode 0600 for its own user, and removes it
    when the lease is released. On real hosts every virtlockd runs as root, so any host can
    open any lease; here each host is another user, and the second host's virtlockd would
    fail to open the first one's lease ("Permission denied") instead of finding it locked.
    """
    path = lease_path(disk)
    path.touch(mode=0o660)
    os.chown(path, 0, grp.getgrnam(HOSTS_GROUP).gr_gid)
    os.chmod(path, 0o660)
    return path


# --------------------------------------------------------------------------- the fence agent's gate


class FenceGate:
    """tests/fence_host.py's folder: calls.log (a JSON line per call) and the `refuse` gate."""

    def __init__(self, folder: Path):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.log = folder / "calls.log"

    def refuse(self) -> None:
        (self.folder / "refuse").touch()

    def allow(self) -> None:
        (self.folder / "refuse").unlink(missing_ok=True)

    def calls(self) -> list[dict]:
        try:
            return [json.loads(line) for line in self.log.read_text().splitlines() if line.strip()]
        except FileNotFoundError:
            return []


# --------------------------------------------------------------------------- broker and workers


@dataclass(frozen=True)
class Guest:
    """A guest for HostLab.bring_up: PREFIX+name, HA or not, on these disks."""

    name: str
    ha: bool = False
    disks: tuple[str, ...] = ()


def free_port(addr: str) -> int:
    with socket.socket() as s:
        s.bind((addr, 0))
        return s.getsockname()[1]


class HostLab:
    """A broker in the root namespace on tcp://198.18.0.1:PORT with CURVE, and a lifecycle
    worker per host running as the host's user inside its namespace on qemu:///session."""

    def __init__(self, hosts: list[LabHost], state_dir: Path, fence: FenceGate):
        self.hosts = hosts
        self.state_dir = state_dir
        self.fence = fence
        self.curve = state_dir / "curve"
        self.worker_url = f"tcp://{BROKER_ADDR}:{free_port(BROKER_ADDR)}"
        self.client_url = f"ipc://{state_dir}/client.sock"
        self.timing = [
            "--lease-ttl", str(LEASE_TTL_S), "--host-dead", str(HOST_DEAD_S), "--self-fence", str(SELF_FENCE_S),
        ]
        self.broker: Proc | None = None
        self.workers: dict[str, Proc] = {}  # host_id -> its worker
        self._clients: list[Client] = []
        self._keygen()

    def _keygen(self) -> None:
        self._virtbroker("keygen", str(self.curve))
        self._virtbroker("keygen", str(self.curve), "--client", "admin")
        for host in self.hosts:
            self._virtbroker("keygen", str(self.curve), "--worker", host.worker_id, "--role", "lifecycle",
                             "--host", host.host_id)
            host.give(self.curve / "server.key", "server.key", 0o644)
            host.give(self.curve / "keys" / f"{host.worker_id}.key_secret", "worker.key_secret", 0o600)

    @staticmethod
    def _virtbroker(*args: str) -> None:
        subprocess.run([sys.executable, "-m", "virtbroker.launcher", *args], check=True, capture_output=True,
                       cwd=str(ROOT))

    @property
    def client_env(self) -> dict[str, str]:
        """What vbctl needs to reach this broker."""
        return {
            "VIRTBROKER_URL": self.client_url,
            "VIRTBROKER_SERVER_KEY": str(self.curve / "server.key"),
            "VIRTBROKER_CLIENT_KEY": str(self.curve / "keys" / "admin.key_secret"),
        }

    def start_broker(self, *extra: str) -> Proc:
        """The broker, fencing with tests/fence_host.py (its gate decides whether that works)."""
        os.environ[FENCE_DIR_ENV] = str(self.fence.folder)  # the broker passes it to fence_host.py
        argv = [
            sys.executable, "-m", "virtbroker.launcher", "broker", "--state-dir", str(self.state_dir),
            "--client-url", self.client_url, "--worker-url", self.worker_url, "--curve-dir", str(self.curve),
            *self.timing, "--fence-quiet", str(FENCE_QUIET_S), "--fence-retry", str(FENCE_RETRY_S),
            "--fence-command", str(FENCE_HOST), *extra,
        ]
        self.broker = Proc("broker", argv, self.state_dir).start()
        with open(PIDS_FILE, "a") as f:  # scripts/test-hosts.sh down ends it if this run is killed
            f.write(f"{self.broker.pid}\n")
        with self.client(timeout_s=2.0) as c:

            def answers() -> bool:
                if not self.broker.alive():
                    raise RuntimeError("broker exited:\n" + self.broker.log()[-3000:])
                try:
                    c.ping(timeout_s=0.5)
                    return True
                except Exception:
                    return False

            wait_until(answers, 20, what="the broker answers a ping")
        return self.broker

    def start_worker(self, host: LabHost, *extra: str) -> Proc:
        """host's lifecycle worker, as its user inside its namespace, on its qemu:///session."""
        home = host.home
        argv = host.argv(
            sys.executable, "-m", "virtbroker.launcher", "worker", "--worker-id", host.worker_id,
            "--uri", SESSION_URI, "--worker-url", self.worker_url, "--state-dir", str(home / "state"),
            "--curve-server-key", str(home / "server.key"), "--curve-secret-key", str(home / "worker.key_secret"),
            "--shared-storage-root", str(SHARED_DIR), "--slots", "6", *self.timing, *extra,
        )
        proc = Proc(host.worker_id, argv, self.state_dir).start()
        self.workers[host.host_id] = proc
        return proc

    def client(self, timeout_s: float = 30.0) -> Client:
        c = Client(self.client_url, timeout_s=timeout_s, server_key=str(self.curve / "server.key"),
                   secret_key=str(self.curve / "keys" / "admin.key_secret"))
        self._clients.append(c)
        return c

    def listed_workers(self, c: Client) -> dict[str, dict]:
        """worker_id -> the broker's record of it, for the lifecycle workers it knows now."""
        return {w["worker_id"]: w for w in c.workers() if w["role"] == "lifecycle"}

    def wait_workers(self, c: Client, hosts: list[LabHost], timeout_s: float = 30.0) -> None:
        """Until each host's worker is registered (and no other), under that host's id."""

        def joined() -> bool:
            listed = self.listed_workers(c)
            return all(listed.get(h.worker_id, {}).get("host") == h.host_id for h in hosts)

        try:
            wait_until(joined, timeout_s, what=f"workers of {[h.host_id for h in hosts]} joined")
        except AssertionError:
            raise AssertionError(f"workers did not join: {c.workers()}\n{self.logs()}") from None

    def host_states(self, c: Client) -> dict[str, str]:
        return {h["host"]: h["state"] for h in c.hosts()}

    def wait_host_state(self, c: Client, host: LabHost, states: str | set[str], timeout_s: float) -> None:
        """Until the broker lists host in one of states (unreachable and fencing alternate
        while a failing fence program is tried again)."""
        wanted = {states} if isinstance(states, str) else states
        try:
            wait_until(lambda: self.host_states(c).get(host.host_id) in wanted, timeout_s,
                       what=f"host {host.host_id} {'/'.join(sorted(wanted))}")
        except AssertionError:
            raise AssertionError(f"host {host.host_id} not {'/'.join(sorted(wanted))} within {timeout_s:g} s: "
                                 f"{c.hosts()}\n{self.logs()}") from None

    def define(self, c: Client, name: str, ha: bool = False, disks: list[str] | None = None) -> str:
        """Define guest PREFIX+name (KVM, 64 MiB, 1 vCPU); its UUID."""
        xml = minimal_domain_xml(PREFIX + name, "kvm", memory_mib=64, disks=disks)
        record = c.define(xml, ha=True) if ha else c.define(xml)
        return record["uuid"]

    def start(self, c: Client, names: list[str], timeout_s: float = 120.0) -> list[dict]:
        """Start these guests; their jobs, all succeeded."""
        jobs = [c.submit(PREFIX + n, "start")["job_id"] for n in names]
        done = c.wait(jobs, timeout_s)
        failed = [j for j in done if j["state"] != "succeeded"]
        assert not failed, f"starts failed: {failed}\n{self.logs()}"
        return done

    def run_guests(self, c: Client, guests: Sequence[Guest]) -> dict[str, str]:
        """Define these guests, then start them all in one batch; name -> UUID."""
        uuids = {g.name: self.define(c, g.name, ha=g.ha, disks=list(g.disks)) for g in guests}
        self.start(c, list(uuids))
        return uuids

    def bring_up(self, first: Sequence[Guest], then: Sequence[Guest] = (), broker_args: Sequence[str] = ()
                 ) -> tuple[Client, dict[str, str]]:
        """The broker; the first host's worker alone, so that the guests `first` can only land
        there; then every other host's worker, and the guests `then`, which the broker places
        on the emptier hosts. Every guest started (its job succeeded). A client of the broker,
        and each guest's UUID by name."""
        alone, *others = self.hosts
        self.start_broker(*broker_args)
        c = self.client()
        self.start_worker(alone)
        self.wait_workers(c, [alone])
        uuids = self.run_guests(c, first)
        for host in others:
            self.start_worker(host)
        self.wait_workers(c, self.hosts)
        if then:
            uuids |= self.run_guests(c, then)
        return c, uuids

    def logs(self) -> str:
        procs = ([self.broker] if self.broker else []) + list(self.workers.values())
        return "\n".join(f"--- {p.name}\n{p.log()[-4000:]}" for p in procs)

    def stop(self) -> None:
        """Workers first (they leave their guests running), then the broker."""
        for c in self._clients:
            c.close()
        for proc in self.workers.values():
            proc.stop(timeout_s=10)
        if self.broker:
            self.broker.stop(timeout_s=10)
        os.environ.pop(FENCE_DIR_ENV, None)
