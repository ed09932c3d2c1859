"""Two hosts register over tcp:// with CURVE from their namespaces, each runs the guests the
broker places there as its own user, and a partition cuts a host's worker off until healed."""

from __future__ import annotations

import pytest

from tests.hosts.lab import LEASE_TTL_S, PREFIX, Guest, ps_uids
from tests.waiting import wait_until

pytestmark = [pytest.mark.kvm, pytest.mark.hosts]


def test_two_hosts_run_their_own_guests_and_a_partition_cuts_one_off(lab, watch):
    a, b = lab.hosts
    # Host a alone gets the first guest; host b, emptier, then gets the next.
    c, uuids = lab.bring_up(first=[Guest("smoke-1")], then=[Guest("smoke-2")])
    first, second = uuids["smoke-1"], uuids["smoke-2"]

    for uuid, name, host in ((first, "smoke-1", a), (second, "smoke-2", b)):
        assert c.lookup(PREFIX + name)["host"] == host.host_id
        watch.fresh()
        assert watch.where(uuid) == {host.host_id}
        assert ps_uids(uuid) == {host.uid}, f"{name} should run as {host.user}"
        assert PREFIX + name in host.virsh("list", "--name").stdout.split()

    b.partition()
    wait_until(lambda: b.worker_id not in lab.listed_workers(c), 4 * LEASE_TTL_S + 5,
               what=f"the broker forgets {b.worker_id} (no heartbeat through the partition)")
    assert a.worker_id in lab.listed_workers(c)
    b.heal()
    lab.wait_workers(c, [a, b], timeout_s=60)
    assert watch.where(second) == {b.host_id}, "the partition itself touches no guest"
    assert not watch.doubles, watch.report()
