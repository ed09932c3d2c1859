"""Real QEMU guests through libvirtd on qemu:///system. Every guest a test makes is named
with the test prefix and is destroyed at the end, also when the test fails."""

from __future__ import annotations

import os

import libvirt
import pytest

from virtbroker.client.templates import minimal_domain_xml
from tests.guests import quiet_libvirt_errors, remove_guests

URI = "qemu:///system"
PREFIX = "vbt-"
DOMAIN_TYPE = "kvm" if os.path.exists("/dev/kvm") else "qemu"


def destroy_test_guests(conn: libvirt.virConnect) -> None:
    remove_guests(conn, PREFIX)


@pytest.fixture(scope="session")
def libvirt_conn():
    quiet_libvirt_errors()
    try:
        conn = libvirt.open(URI)
    except libvirt.libvirtError as e:
        pytest.fail(f"libvirtd is not reachable at {URI} (scripts/setup-host.sh starts it): {e}")
    destroy_test_guests(conn)
    yield conn
    destroy_test_guests(conn)
    conn.close()


@pytest.fixture
def kvm_guests(libvirt_conn):
    """Cleans up this test's guests on the hypervisor afterwards, whatever happened."""
    yield libvirt_conn
    destroy_test_guests(libvirt_conn)


def guest_xml(name: str, **kw) -> str:
    return minimal_domain_xml(PREFIX + name, DOMAIN_TYPE, **kw)


def running_on_host(conn: libvirt.virConnect) -> set[str]:
    """What virsh list shows, restricted to this suite's guests."""
    return {d.name() for d in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE) if d.name().startswith(PREFIX)}
