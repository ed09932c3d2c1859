"""Real QEMU guests through libvirtd on qemu:///system. Every guest a test makes is named
with the test prefix; the kvm_guests fixture (tests/conftest.py) removes them at the end,
also when the test fails."""

from __future__ import annotations

import libvirt

from tests.guests import DOMAIN_TYPE, PREFIX, URI
from virtbroker.client.templates import minimal_domain_xml

__all__ = ["DOMAIN_TYPE", "PREFIX", "URI", "guest_xml", "running_on_host"]


def guest_xml(name: str, **kw) -> str:
    return minimal_domain_xml(PREFIX + name, DOMAIN_TYPE, **kw)


def running_on_host(conn: libvirt.virConnect) -> set[str]:
    """What virsh list shows, restricted to this suite's guests."""
    return {d.name() for d in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE) if d.name().startswith(PREFIX)}
