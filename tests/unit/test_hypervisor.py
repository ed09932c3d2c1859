"""The lifecycle worker's libvirt connections, on libvirt's embedded test driver."""

from __future__ import annotations

import threading

from virtbroker.workers.lifecycle import Hypervisor

URI = "test:///default"


def test_each_thread_has_its_own_connection_to_the_same_host():
    hv = Hypervisor(URI)
    mine = hv.connection()
    assert hv.connection() is mine
    seen = {}

    def other():
        seen["conn"] = hv.connection()
        # test:///default is one host per process: what one connection changes, all see.
        seen["state"] = seen["conn"].lookupByName("test").state()[0]

    mine.lookupByName("test").suspend()
    try:
        t = threading.Thread(target=other)
        t.start()
        t.join(10)
        assert seen["conn"] is not mine
        assert seen["state"] == 3  # VIR_DOMAIN_PAUSED
    finally:
        mine.lookupByName("test").resume()


def test_ensure_alive_replaces_a_connection_that_stopped_working():
    hv = Hypervisor(URI)
    old = hv.connection()
    hv.ensure_alive()  # proves it now, so the next check would wait ALIVE_CHECK_S
    old.close()
    hv.suspect()  # what a job does after an RPC failure
    hv.ensure_alive()
    assert hv.conn is not old
    assert hv.conn.lookupByName("test").name() == "test"
