"""A host whose workers die (kill -9) while its guests keep running.

Nobody renews its host lease: after host_dead_s it is unreachable and its domains unknown.
No worker there can self-fence, so its guests keep running, and nothing may start them
elsewhere until the host is known to be off: while the fence program fails, nothing moves.
Once the fence program succeeds, or the operator says the host is off (`vbctl host-fence
HOST --yes-it-is-off`), the HA guests start on the other host and the rest are shutoff.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.hosts.lab import HOST_DEAD_S, PREFIX, Guest, HostLab, LabHost
from tests.waiting import wait_until
from virtbroker.client.api import Client

pytestmark = [pytest.mark.kvm, pytest.mark.hosts]

HA_GUESTS = 3
QUEUE_TIMEOUT_S = 4.0
RESTART_WITHIN_S = 30.0  # from the fence to every HA guest running on the other host
VBCTL = Path(sys.executable).parent / "vbctl"
LOST = {"unreachable", "fencing"}  # fencing: the fence program runs (and fails) again


@dataclass
class Crashed:
    c: Client
    a: LabHost  # the crashed host
    b: LabHost
    ha: dict[str, str]  # name -> uuid
    plain: str  # uuid of the one guest that is not HA
    pids: set[int]  # host a's QEMUs when its worker died


def crash_a_host(lab: HostLab, watch, fence) -> Crashed:
    """HA guests and a plain one on host a, its worker killed, the fence program refusing:
    host a unreachable, its domains unknown, its guests still running there, none elsewhere."""
    a, b = lab.hosts
    fence.refuse()
    ha_guests = [Guest(f"crash-ha-{i}", ha=True) for i in range(HA_GUESTS)]
    c, ha = lab.bring_up(first=[*ha_guests, Guest("crash-plain")], broker_args=["--queue-timeout", str(QUEUE_TIMEOUT_S)])
    plain = ha.pop("crash-plain")
    pids = set(a.qemu_pids())
    assert len(pids) == HA_GUESTS + 1

    lab.workers[a.host_id].kill9()
    lab.wait_host_state(c, a, LOST, HOST_DEAD_S + 10)
    for name in [*ha, "crash-plain"]:
        assert c.lookup(PREFIX + name)["state"] == "unknown"
    # The broker tries the fence program (every fence_retry_s) and it fails.
    try:
        wait_until(lambda: len(fence.calls()) >= 2, 20, what="two refused fence calls")
    except AssertionError:
        raise AssertionError(f"the broker did not try to fence {a.host_id}: {c.hosts()}\n{lab.logs()}") from None
    assert {(call["host"], call["outcome"]) for call in fence.calls()} == {(a.host_id, "refused")}, fence.calls()

    # A job for a domain of the lost host waits for no one for ever: it fails after queue_timeout_s.
    job = c.submit(PREFIX + "crash-plain", "destroy")
    done = c.wait([job["job_id"]], QUEUE_TIMEOUT_S + 15)[0]
    assert done["state"] == "failed" and "queue_timeout_s" in done["error"] and a.host_id in done["error"], done

    assert lab.host_states(c)[a.host_id] in LOST, c.hosts()
    watch.fresh()
    assert set(a.qemu_pids()) == pids, "the crashed host's guests keep running"
    assert not any(watch.seen[u] - {a.host_id} for u in [*ha.values(), plain]), f"nothing starts elsewhere: {watch.seen}"
    return Crashed(c, a, b, ha, plain, pids)


def check_restarted(lab: HostLab, watch, crashed: Crashed) -> None:
    c, a, b = crashed.c, crashed.a, crashed.b

    def restarted() -> bool:
        records = [c.lookup(PREFIX + name) for name in crashed.ha]
        return all((r["state"], r["host"]) == ("running", b.host_id) for r in records) and all(
            watch.where(u) == {b.host_id} for u in crashed.ha.values())

    try:
        wait_until(restarted, RESTART_WITHIN_S, what=f"the HA guests running on {b.host_id}")
    except AssertionError:
        raise AssertionError(f"HA guests not restarted on {b.host_id}: "
                             f"{[c.lookup(PREFIX + n) for n in crashed.ha]}\nhosts: {c.hosts()}\n{lab.logs()}") from None
    assert lab.host_states(c)[a.host_id] == "fenced", c.hosts()
    assert c.lookup(PREFIX + "crash-plain")["state"] == "shutoff"
    watch.fresh()
    assert not watch.where(crashed.plain)
    assert not a.qemu_pids()
    assert not watch.doubles, watch.report()


def test_a_crashed_host_is_fenced_by_the_fence_program_once_it_works(lab, watch, fence):
    crashed = crash_a_host(lab, watch, fence)
    fence.allow()
    check_restarted(lab, watch, crashed)
    calls = fence.calls()
    assert calls[-1]["outcome"] == "off" and set(calls[-1]["killed"]) == crashed.pids, calls


def test_a_crashed_host_is_fenced_by_the_operator(lab, watch, fence):
    crashed = crash_a_host(lab, watch, fence)
    crashed.a.kill_qemus()  # the operator powers the host off, then says so
    refused = len(fence.calls())
    done = subprocess.run([str(VBCTL), "host-fence", crashed.a.host_id, "--yes-it-is-off"], capture_output=True,
                          text=True, env=lab.client_env, timeout=30)
    assert done.returncode == 0, done.stderr
    check_restarted(lab, watch, crashed)
    assert all(call["outcome"] == "refused" for call in fence.calls()[refused:]), fence.calls()
