"""Section 8: host failures and outside changes: a partition to HA guests running elsewhere, an outside destroy."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import time
from pathlib import Path

import libvirt
import zmq

from bench.common import (
    PREFIX,
    URI,
    Settings,
    cleanup_guests,
    guest_xml,
    median,
    open_libvirt,
    percentile,
    run_jobs,
    say,
    vb_client,
    vb_cluster,
)
from bench.verdict import LOWER, decide

# The two-hypervisor lab of the host-failure tests (scripts/test-hosts.sh, tests/hosts/lab.py):
# the benchmark reuses its hosts, broker and worker launchers, QEMU watcher and fence gate
# rather than keeping a second copy of them.
from tests.hosts import lab as hostlab
from tests.waiting import wait_until
from virtbroker.common import protocol as p

HA_GUESTS = 5
# The broker's defaults (common/config.py), which the full run measures.
DEFAULT_TIMING = {"lease_ttl_s": 10.0, "host_dead_s": 30.0, "self_fence_s": 20.0}
# The lab's shortened timing (tests/hosts/lab.py), which --short measures.
SHORT_TIMING = {"lease_ttl_s": hostlab.LEASE_TTL_S, "host_dead_s": hostlab.HOST_DEAD_S,
                "self_fence_s": hostlab.SELF_FENCE_S}
RESTART_MARGIN_S = 10.0  # target: every HA guest running elsewhere within host_dead_s + this
GIVE_UP_AFTER_S = 60.0  # past host_dead_s, a partition whose guests never came back counts as failed
PARTITION_REPS = 5
DESTROYS = 100
DESTROYS_SHORT = 10
DESTROY_BATCH = 10  # guests started through virtbroker at once, then destroyed outside one by one
RESYNC_INTERVAL_S = 120.0  # the worker's default full report, which outside changes waited for before events
EVENT_WAIT_S = 30.0


# ---------------------------------------------------------------------------- partition
def _timing_args(timing: dict) -> list[str]:
    return ["--lease-ttl", f"{timing['lease_ttl_s']:g}", "--host-dead", f"{timing['host_dead_s']:g}",
            "--self-fence", f"{timing['self_fence_s']:g}"]


def _reset(hosts: list[hostlab.LabHost], watch: hostlab.QemuWatcher | None) -> None:
    """Links up, every QEMU of the hosts killed, their guests undefined, the shared storage emptied."""
    for host in hosts:
        host.heal()
        host.remove_guests()
    if watch is not None:
        watch.fresh()
        wait_until(lambda: not any(watch.where(u) for u in list(watch.seen)), 15, what="no lab guest runs")
    for entry in hostlab.SHARED_DIR.iterdir():
        if entry.name != "lockspace":
            entry.unlink()


def partition_once(hosts: list[hostlab.LabHost], timing: dict, rep: int) -> dict:
    """HA_GUESTS HA guests on host a, b up beside it; a's veth down. From the cut: when the
    last HA guest's QEMU is gone from a (self-fence), when the watcher last sees one not yet
    running on b, a's states as the broker lists them; then healed, a rejoins, and the
    watcher's samples with a guest on both hosts are counted."""
    a, b = hosts
    state_dir = Path(tempfile.mkdtemp(prefix=f"vbb-hosts{rep}-", dir="/tmp"))
    fence = hostlab.FenceGate(state_dir / "fence")
    lab = hostlab.HostLab(hosts, state_dir, fence)
    lab.timing = _timing_args(timing)  # the workers get the same host timing as the broker
    watch = hostlab.QemuWatcher({h.uid: h.host_id for h in hosts}).start()
    try:
        _reset(hosts, None)
        lab.start_broker()  # the lab's fence_quiet_s (1 s) and fence_retry_s (1 s)
        c = lab.client()
        lab.start_worker(a)
        lab.wait_workers(c, [a])
        names = [f"part-{rep}-{i}" for i in range(HA_GUESTS)]
        uuids = [lab.define(c, name, ha=True) for name in names]
        lab.start(c, names)
        lab.start_worker(b)
        lab.wait_workers(c, [a, b])
        # Self-fencing is armed only once the worker heard so (a `renewed` after its HA guests landed).
        wait_until(lambda: next(h for h in c.hosts() if h["host"] == a.host_id)["armed"],
                   timing["lease_ttl_s"] * 3, what="host a armed")
        # The broker lists the host armed at once; its worker hears so in the `renewed` of its
        # next heartbeat (every lease_ttl_s / 4). Two heartbeats, so that a cut comes after it.
        time.sleep(timing["lease_ttl_s"] / 2)
        watch.fresh()
        if not all(watch.where(u) == {a.host_id} for u in uuids):
            raise RuntimeError(f"HA guests not all on {a.host_id}: {watch.report()}")

        transitions: list[list] = []
        last_state = None
        self_fenced_s = restarted_s = None
        cut = time.monotonic()
        a.partition()
        deadline = cut + timing["host_dead_s"] + GIVE_UP_AFTER_S
        while time.monotonic() < deadline:
            now_s = time.monotonic() - cut
            state = lab.host_states(c).get(a.host_id)
            if state != last_state:
                transitions.append([round(now_s, 2), state])
                last_state = state
            where = [watch.where(u) for u in uuids]
            if self_fenced_s is None and not any(a.host_id in w for w in where):
                self_fenced_s = now_s
            if all(w == {b.host_id} for w in where):
                restarted_s = now_s
                break
            time.sleep(0.05)

        a.heal()
        healed_at = time.monotonic()
        with contextlib.suppress(AssertionError):  # a host that never rejoins is recorded, not fatal
            lab.wait_host_state(c, a, "up", 120)
        rejoined_s = time.monotonic() - healed_at if lab.host_states(c).get(a.host_id) == "up" else None
        transitions.append([round(time.monotonic() - cut, 2), lab.host_states(c).get(a.host_id)])
        watch.fresh()
        return {
            "restarted_s": restarted_s,
            "self_fenced_s": self_fenced_s,
            "transitions": transitions,
            "rejoined_s": rejoined_s,
            "double_samples": len(watch.doubles),
            "double_guests": len({uuid for _, uuid, _ in watch.doubles}),
            "watcher_samples": watch.samples,
            "fence_calls": [{"host": x.get("host"), "outcome": x.get("outcome"), "killed": len(x.get("killed", []))}
                            for x in fence.calls()],
            # QEMUs the fence program had to kill: 0 when the worker self-fenced first.
            "fence_killed": sum(len(x.get("killed", [])) for x in fence.calls()),
        }
    finally:
        for host in hosts:
            host.heal()
        lab.stop()
        with contextlib.suppress(Exception):
            _reset(hosts, watch)
        watch.stop()
        shutil.rmtree(state_dir, ignore_errors=True)


def partitions(settings: Settings) -> dict:
    timing = SHORT_TIMING if settings.short else DEFAULT_TIMING
    reps_n = 1 if settings.short else PARTITION_REPS
    hostlab.hosts_script("down")  # what a killed earlier run left
    reps = []
    try:
        hostlab.hosts_script("up", "2")
        hosts = [hostlab.LabHost(1), hostlab.LabHost(2)]
        for rep in range(reps_n):
            say(f"hosts: partition {rep + 1}/{reps_n} (host_dead_s {timing['host_dead_s']:g}, self_fence_s "
                f"{timing['self_fence_s']:g}, lease_ttl_s {timing['lease_ttl_s']:g})")
            row = partition_once(hosts, timing, rep)
            reps.append(row)
            say(f"  HA guests gone from a after {_s(row['self_fenced_s'])}, all running on b after "
                f"{_s(row['restarted_s'])}; the fence program killed {row['fence_killed']} QEMU(s); "
                f"{row['double_samples']} double-run samples; a: "
                + ", ".join(f"{state} at {t:g} s" for t, state in row["transitions"]))
    finally:
        hostlab.hosts_script("down")
    restarted = [r["restarted_s"] for r in reps if r["restarted_s"] is not None]
    return {
        "timing": timing,
        "fence_quiet_s": hostlab.FENCE_QUIET_S,
        "fence_retry_s": hostlab.FENCE_RETRY_S,
        "ha_guests": HA_GUESTS,
        "reps": reps,
        "median_s": median(restarted),
        "max_s": max(restarted) if restarted else None,
        "failed": sum(r["restarted_s"] is None for r in reps),
    }


# ---------------------------------------------------------------------------- outside destroys
def _events_socket(context: zmq.Context, events_url: str) -> zmq.Socket:
    sock = context.socket(zmq.SUB)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SUBSCRIBE, b"")
    sock.connect(events_url)
    return sock


def _shutoff_seen_s(sock: zmq.Socket, uuid: str, since: float) -> float | None:
    """Seconds from `since` (monotonic) to receiving the broker's domain event that says
    uuid is shut off; an event already waiting counts as received now (0 or more)."""
    deadline = since + EVENT_WAIT_S
    while (left_s := deadline - time.monotonic()) > 0:
        if not sock.poll(int(left_s * 1000) + 1):
            continue
        event = p.decode_event(sock.recv_multipart())
        if event.KIND == "domain" and event.uuid == uuid and event.state == "shutoff":
            return time.monotonic() - since
    return None


def outside_destroys(settings: Settings, conn: libvirt.virConnect) -> dict:
    """Guests started through virtbroker (DESTROY_BATCH at once), each then destroyed with
    libvirt-python on a connection of its own; from the destroy call's return to the
    broker's domain event with state shutoff, read from a subscription made beforehand."""
    count = DESTROYS_SHORT if settings.short else DESTROYS
    names = [f"{PREFIX}ext-{i:02d}" for i in range(min(DESTROY_BATCH, count))]
    samples_s: list[float] = []
    calls_s: list[float] = []  # the destroy calls themselves (libvirt waits for QEMU to exit)
    missed = 0
    context = zmq.Context()
    # The worker's default resync interval: the next full report is two minutes away at
    # most moments, so an event, not a resync, tells the broker.
    with vb_cluster(1, 4, extra=["--resync-interval", f"{RESYNC_INTERVAL_S:g}"]) as cluster:
        c = vb_client(cluster)
        sock = _events_socket(context, c.ping()["events_url"])
        try:
            uuids = {name: c.define(guest_xml(name))["uuid"] for name in names}
            first = True
            while len(samples_s) + missed < count:
                batch = names[: count - len(samples_s) - missed]
                run_jobs(c, batch, "start")
                if first:
                    # The subscription is live once it hears anything: the starts' events.
                    wait_until(lambda: sock.poll(100), 10, what="the event subscription hears the broker")
                    first = False
                while sock.poll(0):  # the starts' events
                    sock.recv_multipart()
                for name in batch:
                    dom = conn.lookupByName(name)
                    called = time.monotonic()
                    dom.destroy()
                    returned = time.monotonic()
                    calls_s.append(returned - called)
                    took_s = _shutoff_seen_s(sock, uuids[name], returned)
                    if took_s is None:
                        missed += 1
                    else:
                        samples_s.append(took_s)
                say(f"  {len(samples_s) + missed}/{count} outside destroys, {missed} unseen")
        finally:
            sock.close(linger=0)
            context.term()
            with contextlib.suppress(Exception):
                run_jobs(c, names, "destroy")
            cleanup_guests(conn)
    return {
        "destroys": count,
        "missed": missed,
        "samples_s": samples_s,
        "p50_ms": _ms(percentile(samples_s, 50)),
        "p99_ms": _ms(percentile(samples_s, 99)),
        "max_ms": _ms(max(samples_s) if samples_s else None),
        "destroy_call_p50_ms": _ms(percentile(calls_s, 50)),
        "destroy_call_max_ms": _ms(max(calls_s) if calls_s else None),
        "resync_interval_s": RESYNC_INTERVAL_S,
    }


# ---------------------------------------------------------------------------- the section
def run(settings: Settings, conn: libvirt.virConnect) -> dict:
    say("hosts: outside destroys (libvirt-python on its own connection) to the broker's shutoff event")
    outside = outside_destroys(settings, conn)
    say(f"  p50 {_f(outside['p50_ms'])} ms, max {_f(outside['max_ms'])} ms, {outside['missed']} unseen")
    part = partitions(settings)
    t = part["timing"]
    return {
        "status": "ok",
        "baseline": (f"the configured timeouts (host_dead_s {t['host_dead_s']:g} s, self_fence_s "
                     f"{t['self_fence_s']:g} s, lease_ttl_s {t['lease_ttl_s']:g} s) and the resync interval "
                     f"({RESYNC_INTERVAL_S:g} s) that outside changes waited for before events"),
        "note": (
            f"Partition: the two-hypervisor lab of tests/hosts (scripts/test-hosts.sh up 2: users with their own "
            f"qemu:///session in network namespaces); {HA_GUESTS} HA guests on host a, then a's veth down. "
            f"{'The lab' if settings.short else 'The broker'}'s timing, but the lab's fence_quiet_s "
            f"({part['fence_quiet_s']:g} s instead of 60) and fence_retry_s ({part['fence_retry_s']:g} s), and "
            "a fresh broker each time; the fence program is tests/fence_host.py (kill -9 of the host user's "
            "QEMUs). A watcher samples /proc every 100 ms: 'restarted' is the first sample with every HA guest "
            "on b only, 'self-fenced' the first with none on a, double runs the samples with a guest on both. "
            f"Outside destroys: {outside['destroys']} guests started through virtbroker on {URI} "
            f"({DESTROY_BATCH} at a time), each destroyed with libvirt-python on the bench's own connection, "
            "timed from the destroy call's return to the broker's domain event with state shutoff on a "
            f"subscription made beforehand; worker resync interval {RESYNC_INTERVAL_S:g} s."
        ),
        "partition": part,
        "outside": outside,
        "targets": targets(part, outside, settings.short),
    }


def targets(part: dict, outside: dict, short: bool) -> list[dict]:
    t = part["timing"]
    limit_s = t["host_dead_s"] + RESTART_MARGIN_S
    unjudged = "a short run: one partition at the lab's timing" if short else None
    restarted = [r["restarted_s"] for r in part["reps"]]
    note = f"{len(part['reps'])} partitions, host_dead_s {t['host_dead_s']:g} s, self_fence_s {t['self_fence_s']:g} s"
    self_fenced = sum(r["fence_killed"] == 0 for r in part["reps"])
    note += (f"; the worker self-fenced before the fence program in {self_fenced} of {len(part['reps'])} "
             "(otherwise the fence program killed the HA guests)")
    if part["failed"]:
        note += f"; {part['failed']} not restarted within host_dead_s + {GIVE_UP_AFTER_S:g} s"
    return [
        decide(f"Partition to every HA guest running on the other host ({HA_GUESTS} HA guests)", restarted,
               limit_s, LOWER, fmt="{:.1f} s", limit_text=f"<= host_dead_s + {RESTART_MARGIN_S:g} s ({limit_s:g} s)",
               counted="partitions", unjudged=unjudged, note=note,
               requires=[("every partition's HA guests restarted", not part["failed"])]),
        decide("Partition: samples with a guest running on both hosts, per partition",
               [r["double_samples"] for r in part["reps"]], 0, LOWER, fmt="{:.0f}", statistic="max",
               limit_text="0", counted="partitions", unjudged=unjudged),
        decide("Outside destroy to the broker's shutoff event, max", outside["samples_s"], 1.0, LOWER,
               fmt="{:.3f} s", statistic="max", counted="destroys", min_pairs=DESTROYS,
               unjudged="a short run: 10 destroys" if short else None,
               note=f"p50 {_f(outside['p50_ms'])} ms; {outside['missed']} not seen within {EVENT_WAIT_S:g} s; "
                    f"the destroy call itself p50 {_f(outside['destroy_call_p50_ms'])} ms; before events: the next "
                    f"resync (then 15 s, now {outside['resync_interval_s']:g} s)",
               requires=[("every destroy seen", not outside["missed"])]),
    ]


def _ms(value_s: float | None) -> float | None:
    return None if value_s is None else value_s * 1000


def _s(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} s"


def _f(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def main() -> int:
    """Run the section alone, without touching any results file or report."""
    import json
    import sys

    settings = Settings.make("--short" in sys.argv)
    conn = open_libvirt()
    try:
        print(json.dumps(run(settings, conn), indent=1, sort_keys=True))
    finally:
        cleanup_guests(conn)
        conn.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
