"""Fault injection helpers: a printed seed, settling the broker, this folder's guest prefix and a private libvirtd.

Every fault happens at a point drawn from a seeded random.Random. The seed is printed (and
kept as a user property of the test); rerun with VB_FAULT_SEED=<seed> to draw the same points.
Timings on a shared machine still differ from run to run, so a seed fixes where the fault is
aimed, not the exact instant it lands.
"""

from __future__ import annotations

import os
import pwd
import random
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import libvirt
import pytest

from tests import guests
from tests.guests import DOMAIN_TYPE, quiet_libvirt_errors
from virtbroker.broker.core import RESYNC_QUIET_S
from virtbroker.client.api import Client
from virtbroker.client.templates import minimal_domain_xml
from virtbroker.common.protocol import FINAL_JOB_STATES

# Guests of this folder only: other suites (and benchmarks) share the host's libvirtd.
FAULT_PREFIX = "vbt-flt-"

# Lifecycle workers report their host's guests this often (--resync-interval); the broker
# applies such a report only to domains whose state has not changed for RESYNC_QUIET_S.
# A registry that disagrees with the host after a fault must agree again within
# RESYNC_CONVERGE_S; how often it disagreed at first is printed, not asserted.
RESYNC_S = 2.0
RESYNC_ARGS = ["--resync-interval", str(RESYNC_S)]
RESYNC_CONVERGE_S = RESYNC_QUIET_S + 2 * RESYNC_S + 5.0


@pytest.fixture
def fault_rng(request) -> random.Random:
    seed_text = os.environ.get("VB_FAULT_SEED")
    seed = int(seed_text) if seed_text else random.SystemRandom().randrange(2**32)
    print(f"\n{request.node.nodeid}: fault seed {seed} (rerun with VB_FAULT_SEED={seed})")
    request.node.user_properties.append(("fault_seed", seed))
    rng = random.Random(seed)
    rng.seed_value = seed  # for assertion messages
    return rng


def settle(client: Client, timeout_s: float = 60.0, quiet_s: float = 0.5) -> list[dict]:
    """Wait until no job is queued or running (reconciles included) for quiet_s; return every job.

    Reconcile jobs are queued by the broker itself (lost leases, refused late results), so
    waiting on the client's own job ids is not enough to know the registry has settled.
    """
    deadline = time.monotonic() + timeout_s
    quiet_since = None
    while True:
        jobs = client.jobs(limit=10000)
        busy = [j for j in jobs if j["state"] not in FINAL_JOB_STATES]
        now = time.monotonic()
        if busy:
            quiet_since = None
        elif quiet_since is None:
            quiet_since = now
        elif now - quiet_since >= quiet_s:
            return jobs
        if now > deadline:
            raise AssertionError(f"jobs still not final after {timeout_s:g} s: {busy[:10]}")
        time.sleep(0.1)


# --------------------------------------------------------------------------- KVM guests


def fault_guest_xml(name: str, **kw) -> str:
    return minimal_domain_xml(FAULT_PREFIX + name, DOMAIN_TYPE, **kw)


@pytest.fixture
def guest_prefix() -> str:
    """kvm_guests (tests/conftest.py) removes this folder's guests only."""
    return FAULT_PREFIX


def active_guests(uri: str, prefix: str = FAULT_PREFIX) -> dict[str, str]:
    """`virsh list` (active guests) as {name: state}, restricted to prefix; state as the registry spells it."""
    out = subprocess.run(["virsh", "-c", uri, "list"], capture_output=True, text=True, check=True, timeout=30).stdout
    guests = {}
    for line in out.splitlines()[2:]:
        parts = line.split(None, 2)
        if len(parts) == 3 and parts[1].startswith(prefix):
            guests[parts[1]] = "paused" if parts[2].strip() == "paused" else "running"
    return guests


def registry_active(client: Client, prefix: str = FAULT_PREFIX) -> dict[str, str]:
    return {d["name"]: d["state"] for d in client.list() if d["name"].startswith(prefix)}


def converge(read_registry, read_truth, context: str, timeout_s: float = RESYNC_CONVERGE_S) -> float:
    """Wait until the registry agrees with the truth; return how long that took (0: at once)."""
    started = time.monotonic()
    first = True
    while True:
        registry, truth = read_registry(), read_truth()
        if registry == truth:
            return 0.0 if first else time.monotonic() - started
        first = False
        if time.monotonic() - started > timeout_s:
            raise AssertionError(f"{context}: registry {registry} != host {truth} after {timeout_s:g} s")
        time.sleep(0.25)


# --------------------------------------------------------------------------- a private libvirtd

GUEST_USER = "vbguest"


def ensure_guest_user() -> str:
    """The unprivileged user the private libvirtd runs as (the security tests' guest user)."""
    return guests.ensure_guest_user().pw_name


class PrivateLibvirtd:
    """A libvirtd this test starts, owns and may restart: the QEMU session driver of an
    unprivileged user, with real KVM guests, reached by root through its socket.

    The host's system libvirtd serves other suites and benchmarks running at the same time,
    and was not started by these tests, so it is never signalled; this daemon is stopped
    by its pid only.
    """

    def __init__(self, user: str):
        self.user = user
        pw = pwd.getpwnam(user)
        self.base = Path(tempfile.mkdtemp(prefix="vbt-libvirtd-", dir="/tmp"))
        self.base.chmod(0o755)
        self.home = self.base / "home"
        self.run_dir = self.base / "run"
        for d in (self.home, self.run_dir):
            d.mkdir(mode=0o700)
            os.chown(d, pw.pw_uid, pw.pw_gid)
        self.log_path = self.base / "libvirtd.log"
        self.uri = f"qemu+unix:///session?socket={self.run_dir}/libvirt/libvirt-sock"
        self.popen: subprocess.Popen | None = None
        self.restarts = 0

    def start(self, timeout_s: float = 30.0) -> None:
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": str(self.home), "XDG_RUNTIME_DIR": str(self.run_dir)}
        argv = ["setpriv", "--reuid", self.user, "--regid", self.user, "--init-groups", "libvirtd", "--timeout", "0"]
        with open(self.log_path, "ab") as log:
            self.popen = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=str(self.base))
        deadline = time.monotonic() + timeout_s
        while not self.answers():
            if self.popen.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"private libvirtd did not answer:\n{self.log_path.read_text()[-2000:]}")
            time.sleep(0.1)

    def answers(self) -> bool:
        """What the brief asks for after a restart: `virsh version` answers."""
        proc = subprocess.run(["virsh", "-c", self.uri, "version"], capture_output=True, timeout=30)
        return proc.returncode == 0

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def stop(self, timeout_s: float = 15.0) -> None:
        """SIGTERM by pid, as an init system would; guests keep running."""
        if not self.alive():
            return
        self.popen.send_signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(timeout=10)

    def restart(self) -> None:
        self.stop()
        self.start()
        self.restarts += 1

    def close(self) -> None:
        """Destroy every guest of this daemon, stop it and the virtlogd it spawned, remove its files."""
        try:
            if not self.alive():
                self.start()
            conn = libvirt.open(self.uri)
            try:
                for dom in conn.listAllDomains():
                    try:
                        if dom.isActive():
                            dom.destroy()
                        if dom.isPersistent():
                            dom.undefine()
                    except libvirt.libvirtError:
                        pass
            finally:
                conn.close()
        finally:
            self.stop()
            pid_file = self.run_dir / "libvirt" / "virtlogd.pid"
            try:
                os.kill(int(pid_file.read_text().strip()), signal.SIGTERM)
            except (OSError, ValueError):
                pass
            shutil.rmtree(self.base, ignore_errors=True)


@pytest.fixture
def private_libvirtd():
    daemon = PrivateLibvirtd(ensure_guest_user())
    quiet_libvirt_errors()
    try:
        daemon.start()
        yield daemon
    finally:
        daemon.close()
