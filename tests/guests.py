"""Real libvirt guests left behind by a test or a benchmark, found by name prefix and removed."""

from __future__ import annotations

import contextlib
import threading

import libvirt


def remove_guests(conn: libvirt.virConnect, prefix: str) -> int:
    """Destroy and undefine every guest whose name starts with prefix; returns how many.

    One thread per guest: one destroy after another takes 1 to 2 s per guest while QEMU exits.
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
