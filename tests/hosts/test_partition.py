"""Partitions between the broker and its hosts (a host's veth down on the root side).

A host cut off alone destroys its HA guests itself (self-fence, its host lease unrenewed for
self_fence_s), is fenced by the fence program after host_dead_s, and its HA guests start on
the other host; healed, it rejoins and runs nothing twice. A broker cut off from every host
at once fences nobody: the hosts keep their guests.
"""

from __future__ import annotations

import time

import pytest

from tests.hosts.lab import HOST_DEAD_S, PREFIX, SELF_FENCE_S, Guest
from tests.waiting import wait_until

pytestmark = [pytest.mark.kvm, pytest.mark.hosts]

HA_GUESTS = 5
RESTART_WITHIN_S = HOST_DEAD_S + 15  # from the cut to every HA guest running on the other host


def test_a_host_cut_off_self_fences_and_its_ha_guests_restart_on_the_other(lab, watch, fence):
    a, b = lab.hosts
    ha = [f"cut-ha-{i}" for i in range(HA_GUESTS)]
    c, uuids = lab.bring_up(first=[*(Guest(name, ha=True) for name in ha), Guest("cut-plain")])
    plain = uuids.pop("cut-plain")
    watch.fresh()
    assert all(watch.where(u) == {a.host_id} for u in [*uuids.values(), plain]), watch.report()
    # The broker counts the host armed once its HA guests have landed (its worker armed itself at each start).
    wait_until(lambda: next(h for h in c.hosts() if h["host"] == a.host_id)["armed"], 10, what="host a armed")
    ha_pids = {q.pid for q in a.qemus() if q.uuid in uuids.values()}
    assert len(ha_pids) == HA_GUESTS

    cut = time.monotonic()
    a.partition()
    # The worker cannot renew: after self_fence_s it destroys the HA guests it placed there,
    # before the broker may count the host dead (host_dead_s) and run the fence program.
    wait_until(lambda: not (ha_pids & set(a.qemu_pids())), HOST_DEAD_S + 10,
               what="the partitioned host's HA guests destroyed")
    destroyed_after_s = time.monotonic() - cut

    def restarted() -> bool:
        records = [c.lookup(PREFIX + name) for name in ha]
        return all((r["state"], r["host"]) == ("running", b.host_id) for r in records) and all(
            watch.where(u) == {b.host_id} for u in uuids.values())

    try:
        wait_until(restarted, RESTART_WITHIN_S, what=f"all {HA_GUESTS} HA guests running on {b.host_id}")
    except AssertionError:
        raise AssertionError(f"HA guests not restarted on {b.host_id} within {RESTART_WITHIN_S:g} s of the cut: "
                             f"{[(n, c.lookup(PREFIX + n)) for n in ha]}\nhosts: {c.hosts()}\nfence calls: "
                             f"{fence.calls()}\n{lab.logs()}") from None
    calls = fence.calls()
    assert [call["host"] for call in calls] == [a.host_id] and calls[0]["outcome"] == "off", calls
    assert not (set(calls[0]["killed"]) & ha_pids), (
        f"the fence program had to kill HA guests the worker should have destroyed within "
        f"self_fence_s ({SELF_FENCE_S:g} s; they were gone {destroyed_after_s:.1f} s after the cut): {calls}")

    a.heal()
    lab.wait_host_state(c, a, "up", 60)
    lab.wait_workers(c, [a, b])
    record = c.lookup(PREFIX + "cut-plain")
    assert record["state"] == "shutoff", record
    watch.fresh()
    assert not watch.where(plain), f"cut-plain still runs on {watch.where(plain)}"
    assert all(watch.where(u) == {b.host_id} for u in uuids.values()), watch.report()
    assert not watch.doubles, watch.report()


def test_a_broker_cut_off_from_every_host_fences_nobody(lab, watch, fence):
    a, b = lab.hosts
    c, uuids = lab.bring_up(first=[Guest("all-1")], then=[Guest("all-2")])
    placed = {"all-1": (uuids["all-1"], a), "all-2": (uuids["all-2"], b)}
    watch.fresh()
    assert all(watch.where(uuid) == {host.host_id} for uuid, host in placed.values()), watch.report()

    a.partition()
    b.partition()
    # Both hosts lost, and time for the broker to fence (if it wrongly would): the quiet
    # period is 1 s and it tries the fence program every second.
    wait_until(lambda: all(h["state"] != "up" and h["renewed_s_ago"] > HOST_DEAD_S + 3 for h in c.hosts()),
               HOST_DEAD_S + 15, what="both hosts lost, silent for host_dead_s + 3 s")
    assert fence.calls() == [], (
        f"the broker ran the fence program though every host vanished at once: {fence.calls()}\n"
        f"hosts: {c.hosts()}\n{lab.logs()}")
    assert set(lab.host_states(c).values()) == {"unreachable"}, c.hosts()
    for name in placed:
        assert c.lookup(PREFIX + name)["state"] == "unknown"

    a.heal()
    b.heal()
    for host in (a, b):
        lab.wait_host_state(c, host, "up", 60)
    lab.wait_workers(c, [a, b])
    for name, (uuid, host) in placed.items():
        wait_until(lambda n=name: c.lookup(PREFIX + n)["state"] == "running", 30, what=f"{name} running again")
        assert c.lookup(PREFIX + name)["host"] == host.host_id
        wait_until(lambda u=uuid, h=host: watch.fresh() or watch.where(u) == {h.host_id}, 5,
                   what=f"{name} seen running on {host.host_id} by a fresh sample")
    assert all(watch.seen[uuid] == {host.host_id} for uuid, host in placed.values()), watch.seen
    assert fence.calls() == []
    assert not watch.doubles, watch.report()


def test_a_returning_host_destroys_the_guests_fenced_while_it_was_away(lab, watch, fence):
    """The operator fences a cut-off host whose guest still runs (no HA guest there: nothing
    self-fences). Healed, the host must destroy that stray before it takes a job."""
    a, b = lab.hosts
    fence.refuse()
    c, uuids = lab.bring_up(first=[Guest("stray")])
    stray = uuids["stray"]

    a.partition()
    lab.wait_host_state(c, a, {"unreachable", "fencing"}, HOST_DEAD_S + 10)
    c.host_action(a.host_id, "fence", confirm_off=True)  # wrong: its guest still runs
    assert c.lookup(PREFIX + "stray")["state"] == "shutoff"
    watch.fresh()
    assert watch.where(stray) == {a.host_id}

    a.heal()
    lab.wait_host_state(c, a, "up", 60)
    watch.fresh()
    assert not watch.where(stray), f"the stray still runs on {watch.where(stray)} though host a is up again"
    lab.start(c, ["stray"])
    watch.fresh()
    assert len(watch.where(stray)) == 1, watch.report()
    assert not watch.doubles, watch.report()
