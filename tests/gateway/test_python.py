"""libvirt-python, unmodified, against the gateway on test:///default guests: transient guests,
numeric ids, list flags, events through domainEventRegisterAny, and a slow call that holds
nothing else."""

from __future__ import annotations

import threading
import time

import libvirt
import pytest

from tests.gateway.helpers import start_gateway
from tests.guests import quiet_libvirt_errors
from virtbroker.client.templates import minimal_domain_xml


@pytest.fixture
def conn(test_gateway):
    quiet_libvirt_errors()
    cluster, gw = test_gateway
    c = libvirt.open(gw.uri)
    yield cluster, c
    c.close()


def test_transient_guest(conn):
    cluster, c = conn
    dom = c.createXML(minimal_domain_xml("gw-t"), 0)
    assert dom.isActive() == 1 and dom.isPersistent() == 0 and dom.ID() > 0
    assert c.lookupByID(dom.ID()).name() == "gw-t"
    names = lambda flags: sorted(d.name() for d in c.listAllDomains(flags))  # noqa: E731
    assert names(libvirt.VIR_CONNECT_LIST_DOMAINS_TRANSIENT) == ["gw-t"]
    assert names(libvirt.VIR_CONNECT_LIST_DOMAINS_PERSISTENT) == []
    with pytest.raises(libvirt.libvirtError) as e:
        dom.undefine()
    assert e.value.get_error_code() == libvirt.VIR_ERR_OPERATION_INVALID
    dom.destroy()
    # Gone from the registry once it stopped, as libvirt forgets a transient domain.
    deadline = time.monotonic() + 20
    while cluster.client().list(all=True):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    with pytest.raises(libvirt.libvirtError) as e:
        c.lookupByName("gw-t")
    assert e.value.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN


def test_ids_lists_and_errors(conn):
    cluster, c = conn
    a = c.defineXML(minimal_domain_xml("gw-a"))
    b = c.defineXML(minimal_domain_xml("gw-b"))
    assert a.ID() == -1 and a.isPersistent() == 1 and a.state() == [libvirt.VIR_DOMAIN_SHUTOFF, 0]
    a.create()
    a = c.lookupByName("gw-a")
    first_id = a.ID()
    assert first_id > 0 and c.lookupByID(first_id).UUIDString() == a.UUIDString()
    assert c.lookupByUUIDString(a.UUIDString()).ID() == first_id
    names = lambda flags: sorted(d.name() for d in c.listAllDomains(flags))  # noqa: E731
    assert names(0) == ["gw-a", "gw-b"]
    assert names(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE) == ["gw-a"]
    assert names(libvirt.VIR_CONNECT_LIST_DOMAINS_SHUTOFF) == ["gw-b"]
    assert names(libvirt.VIR_CONNECT_LIST_DOMAINS_MANAGEDSAVE) == []
    assert c.numOfDomains() == 1 and c.numOfDefinedDomains() == 1
    assert c.listDomainsID() == [first_id] and c.listDefinedDomains() == ["gw-b"]
    info = a.info()
    assert info[0] == libvirt.VIR_DOMAIN_RUNNING and info[1] == 65536 and info[3] == 1
    with pytest.raises(libvirt.libvirtError) as e:
        a.create()
    assert e.value.get_error_code() == libvirt.VIR_ERR_OPERATION_INVALID
    with pytest.raises(libvirt.libvirtError) as e:
        c.lookupByID(first_id + 100)
    assert e.value.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN
    with pytest.raises(libvirt.libvirtError) as e:
        c.defineXML(minimal_domain_xml("gw-a2", uuid=a.UUIDString()))
    assert e.value.get_error_code() == libvirt.VIR_ERR_OPERATION_FAILED
    a.destroy()
    assert c.lookupByName("gw-a").ID() == -1
    # Undefining a running guest leaves it running as a transient one, gone when it stops.
    b.create()
    b.undefine()
    assert c.lookupByName("gw-b").isPersistent() == 0 and c.lookupByName("gw-b").isActive() == 1
    c.lookupByName("gw-b").destroy()
    deadline = time.monotonic() + 20
    while "gw-b" in [d["name"] for d in cluster.client().list(all=True)]:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    with pytest.raises(libvirt.libvirtError):
        c.lookupByID(first_id)
    # Host facts come from libvirtd (test:///default here: the worker's URI).
    assert c.getType() and c.getLibVersion() > 0 and "<capabilities>" in c.getCapabilities()
    a.undefine()


def test_events_through_python(conn):
    cluster, c = conn
    libvirt.virEventRegisterDefaultImpl()
    seen: list[tuple[str, int, int]] = []
    loop_stop = threading.Event()

    def run_loop():
        while not loop_stop.is_set():
            libvirt.virEventRunDefaultImpl()

    ec = libvirt.open(c.getURI())
    callback_id = ec.domainEventRegisterAny(
        None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, lambda _c, dom, event, detail, _o: seen.append((dom.name(), event, detail)), None)
    thread = threading.Thread(target=run_loop, daemon=True)
    thread.start()
    try:
        vb = cluster.client()
        vb.define(minimal_domain_xml("gw-e"))
        vb.run("gw-e", "start")
        vb.run("gw-e", "destroy")
        vb.run("gw-e", "undefine")
        expected = [
            ("gw-e", libvirt.VIR_DOMAIN_EVENT_DEFINED, libvirt.VIR_DOMAIN_EVENT_DEFINED_ADDED),
            ("gw-e", libvirt.VIR_DOMAIN_EVENT_STARTED, libvirt.VIR_DOMAIN_EVENT_STARTED_BOOTED),
            ("gw-e", libvirt.VIR_DOMAIN_EVENT_STOPPED, libvirt.VIR_DOMAIN_EVENT_STOPPED_DESTROYED),
            ("gw-e", libvirt.VIR_DOMAIN_EVENT_UNDEFINED, libvirt.VIR_DOMAIN_EVENT_UNDEFINED_REMOVED),
        ]
        deadline = time.monotonic() + 20
        while len(seen) < len(expected) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert seen == expected
    finally:
        # Close while the event loop still runs (libvirt's client needs it for the close),
        # then stop the loop: a one-shot timer wakes it to see the stop.
        ec.domainEventDeregisterAny(callback_id)
        ec.close()
        loop_stop.set()
        libvirt.virEventAddTimeout(0, lambda timer_id, _o: libvirt.virEventRemoveTimeout(timer_id), None)
        thread.join(timeout=10)


def test_slow_call_holds_nothing_else(cluster_factory):
    """A start waits for a worker that is not there; lookups on other connections go on."""
    quiet_libvirt_errors()
    cluster = cluster_factory(lease_ttl_s=3.0)
    cluster.start_broker()
    gw = start_gateway(cluster)
    c1, c2 = libvirt.open(gw.uri), libvirt.open(gw.uri)
    try:
        dom = c1.defineXML(minimal_domain_xml("gw-slow"))
        outcome = {}

        def start():
            try:
                dom.create()
                outcome["ok"] = True
            except libvirt.libvirtError as e:
                outcome["error"] = e

        t = threading.Thread(target=start, daemon=True)
        t.start()
        deadline = time.monotonic() + 10
        while not cluster.client().jobs(state="queued"):
            assert time.monotonic() < deadline
            time.sleep(0.02)
        for _ in range(50):
            assert c2.lookupByName("gw-slow").name() == "gw-slow"
        c2.defineXML(minimal_domain_xml("gw-other"))
        assert sorted(d.name() for d in c1.listAllDomains(0)) == ["gw-other", "gw-slow"]  # the same connection too
        # The start completes once a worker comes.
        cluster.start_worker("w1")
        t.join(timeout=60)
        assert outcome == {"ok": True}
        assert c2.lookupByName("gw-slow").isActive() == 1
    finally:
        c1.close()
        c2.close()


def test_sigterm_stops_cleanly(test_gateway):
    """First SIGTERM: no new connections, calls under way finish, exit 0, sockets removed."""
    import os

    cluster, gw = test_gateway
    c = libvirt.open(gw.uri)
    c.defineXML(minimal_domain_xml("gw-stop"))
    assert gw.stop(timeout_s=40) == 0
    assert not os.path.exists(gw.path) and not os.path.exists(gw.ro_path)
    with pytest.raises(libvirt.libvirtError):
        c.lookupByName("gw-stop")
    c.close()
