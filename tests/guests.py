"""Real libvirt guests left behind by a test or a benchmark, found by name prefix and removed.

The kvm_guests fixture (tests/conftest.py) is the one cleanup every KVM test uses: guests
first through each broker the test ran, then whatever is left on the hypervisor.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import subprocess
import threading

import libvirt

from virtbroker.client.api import Client

URI = "qemu:///system"
PREFIX = "vbt-"  # every KVM test guest's name starts with it; tests/faults uses a longer one
DOMAIN_TYPE = "kvm" if os.path.exists("/dev/kvm") else "qemu"


def remove_guests(conn: libvirt.virConnect, prefix: str) -> int:
    """Destroy and undefine every guest whose name starts with prefix; returns how many.

    One thread per guest: one destroy after another would wait for each QEMU to exit in turn.
    """
    doms = [d for d in conn.listAllDomains() if d.name().startswith(prefix)]

    def remove(dom: libvirt.virDomain) -> None:
        with contextlib.suppress(libvirt.libvirtError):
            if dom.isActive():
                dom.destroy()
        with contextlib.suppress(libvirt.libvirtError):
            if dom.isPersistent():
                dom.undefine()

    threads = [threading.Thread(target=remove, args=(d,)) for d in doms]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return len(doms)


def quiet_libvirt_errors() -> None:
    """libvirt prints every error to stderr by default; the tests read them from exceptions."""
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)


def destroy_through_broker(cluster, prefix: str) -> None:
    """Best effort: destroy, through the cluster's broker, the guests it says run, so that
    their labels and profiles come off and the broker's view ends clean too."""
    if cluster.broker is None or not cluster.broker.alive():
        return
    if not any(w.alive() for w in cluster.workers.values()):
        return  # nobody would run the destroys; the hypervisor cleanup removes the guests
    try:
        with Client(cluster.client_url, timeout_s=10) as c:
            running = [d["name"] for d in c.list() if d["name"].startswith(prefix)]
            if running:
                c.wait([c.submit(n, "destroy")["job_id"] for n in running], 60)
    except Exception:  # best effort: the hypervisor cleanup follows
        pass


GUEST_USER = "vbguest"


def ensure_guest_user() -> pwd.struct_passwd:
    """The unprivileged user guests run as in the security and fault tests (made if absent),
    in group kvm so that its QEMU may open /dev/kvm."""
    try:
        pw = pwd.getpwnam(GUEST_USER)
    except KeyError:
        subprocess.run(["useradd", "-r", "-M", "-U", "-s", "/usr/sbin/nologin", "-G", "kvm", GUEST_USER], check=True)
        pw = pwd.getpwnam(GUEST_USER)
    subprocess.run(["usermod", "-aG", "kvm", GUEST_USER], check=True)
    return pw
