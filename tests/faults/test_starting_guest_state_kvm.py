"""What a reconcile reads while another connection is still starting the guest.

A worker killed in the middle of a start leaves libvirtd finishing createXML. Until QEMU's
vCPUs are started libvirt reports the guest as (PAUSED, STARTING_UP); a reconcile that maps
that to 'paused' writes a state the guest leaves a moment later, and nothing reads it again:
the registry then says paused while `virsh list` says running (seen in
test_worker_kill9_kvm.py under load). The worker's state read must not report a guest that
is still starting up as paused.
"""

from __future__ import annotations

import threading

import libvirt
import pytest

from tests.faults.conftest import FAULT_PREFIX, fault_guest_xml
from tests.kvm.conftest import URI
from virtbroker.workers.lifecycle import Hypervisor

pytestmark = pytest.mark.kvm


def test_a_guest_still_starting_is_not_read_as_paused(kvm_guests):
    hv = Hypervisor(URI)
    name = f"{FAULT_PREFIX}starting"
    xml = fault_guest_xml("starting")
    starter = libvirt.open(URI)  # another client, like the worker that died
    done = threading.Event()
    errors: list[BaseException] = []

    def start():
        try:
            starter.createXML(xml, 0)
        except BaseException as e:
            errors.append(e)
        finally:
            done.set()

    thread = threading.Thread(target=start)
    thread.start()
    seen: list[tuple[str, tuple[int, int] | None]] = []
    try:
        while not done.is_set():
            dom = _lookup(hv, name)
            if dom is None:
                continue
            raw = None
            try:
                raw = tuple(dom.state())
            except libvirt.libvirtError:
                pass
            seen.append((hv.state(dom.UUIDString()), raw))
    finally:
        thread.join(30)
        starter.close()
    assert not errors, errors
    assert hv.state(_lookup(hv, name).UUIDString()) == "running"
    starting = [s for s, raw in seen if raw == (libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_PAUSED_STARTING_UP)]
    assert "paused" not in starting, (
        f"Hypervisor.state() read a guest that was still starting as 'paused' {starting.count('paused')} time(s) "
        f"of {len(seen)} reads"
    )


def _lookup(hv: Hypervisor, name: str):
    try:
        return hv.connection().lookupByName(name)
    except libvirt.libvirtError:
        return None
