"""Real KVM guests stopped behind virtbroker's back: the broker hears it from libvirt's lifecycle
events within a second, with a domain event saying so.

The worker's periodic resync is an hour here: nothing but an event can tell the broker in time.
"""

from __future__ import annotations

import subprocess
import time

import libvirt
import pytest

from tests.kvm.conftest import PREFIX, URI, guest_xml
from tests.waiting import wait_until
from virtbroker.client.api import Client

pytestmark = pytest.mark.kvm

EVENT_WITHIN_S = 1.0
NO_RESYNC = ["--resync-interval", "3600"]


@pytest.fixture
def events_cluster(cluster_factory, kvm_guests):
    cluster = cluster_factory(uri=URI, lease_ttl_s=3.0, extra=NO_RESYNC)
    cluster.start_broker()
    cluster.start_worker("ev1", slots=2)
    cluster.wait_workers(1)
    return cluster  # kvm_guests destroys its guests through the broker, then on the hypervisor


def start(c: Client, name: str) -> dict:
    """Define and start PREFIX+name through the broker; its record."""
    c.define(guest_xml(name))
    job = c.run(PREFIX + name, "start", 60)
    assert (job["state"], job["error"]) == ("succeeded", None)
    return c.lookup(PREFIX + name)


def last_seq(c: Client) -> int:
    """The newest event's seq: what a listener that starts now has seen."""
    return max((e.seq for e in c.events(since=0, timeout_s=0)), default=0)


def shutoff_within(c: Client, name: str, within_s: float, since: float) -> float:
    """Wait until the broker lists `name` shut off, at most within_s after `since`
    (monotonic); how long after `since` it did."""
    wait_until(lambda: c.lookup(name)["state"] == "shutoff", max(0.0, since + within_s - time.monotonic()),
               interval_s=0.02, what=f"{name} shutoff in the broker within {within_s:g} s")
    return time.monotonic() - since


def the_domain_event(c: Client, uuid: str, seq: int) -> object:
    """The broker's domain event after `seq` that shut the guest off, read from its history.

    (Replayed, not heard live: a subscription made just now may reach the broker after the
    event left, and the replay, read before it was stored, would miss it too.)"""

    def stored():
        return next((e for e in c.events(since=seq, timeout_s=0)
                     if e.KIND == "domain" and e.uuid == uuid and e.state == "shutoff"), None)

    return wait_until(stored, 5, interval_s=0.05, what=f"a domain event shutting {uuid} off")


def test_a_guest_destroyed_behind_virtbrokers_back_shows_shutoff_within_a_second(events_cluster):
    c = events_cluster.client()
    record = start(c, "evdestroy")
    seq = last_seq(c)
    subprocess.run(["virsh", "-c", URI, "destroy", record["name"]], check=True, capture_output=True, timeout=60)
    took_s = shutoff_within(c, record["name"], EVENT_WITHIN_S, since=time.monotonic())
    event = the_domain_event(c, record["uuid"], seq)
    assert event.reason and "libvirt" in event.reason and "stopped" in event.reason, event
    print(f"destroyed outside virtbroker: shutoff in the broker {took_s * 1000:.0f} ms after virsh returned")


def test_a_guest_whose_qemu_quits_on_its_own_shows_shutoff_within_a_second(events_cluster, kvm_guests):
    """QMP `quit` makes QEMU exit by itself, as a guest that powers off does (a firmware-only
    guest ignores ACPI): libvirt says shutdown, then stopped once QEMU has gone. The second
    counts from when libvirt itself shows the guest inactive."""
    c = events_cluster.client()
    record = start(c, "evquit")
    seq = last_seq(c)
    dom = kvm_guests.lookupByUUIDString(record["uuid"])
    # virsh may fail to read the answer ("Connection reset by peer"): QEMU can exit first.
    quit = subprocess.run(["virsh", "-c", URI, "qemu-monitor-command", record["name"], '{"execute":"quit"}'],
                          capture_output=True, text=True, timeout=60)

    def inactive() -> bool:
        try:
            return not dom.isActive()
        except libvirt.libvirtError:
            return True  # transient and gone

    wait_until(inactive, 30, interval_s=0.02, what=f"QEMU gone after quit ({quit.stderr.strip()})")
    took_s = shutoff_within(c, record["name"], EVENT_WITHIN_S, since=time.monotonic())
    event = the_domain_event(c, record["uuid"], seq)
    assert event.reason and "stopped" in event.reason, event
    print(f"QEMU quit: shutoff in the broker {took_s * 1000:.0f} ms after libvirt showed it inactive")
