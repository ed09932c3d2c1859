"""The lifecycle worker on libvirt's test driver, facing a fake broker: guest events instead of
polling, numbered heartbeats and the host lease, self-fencing, the watchdog, strays, and the
mark on every guest it starts.

test:///default is one host per process, so guests made here through a connection of the
test's own are the worker's guests too, and the test driver emits their lifecycle events in
this process. The fake broker is a ROUTER on the worker's endpoint that reads what the
worker sends and answers what each test says.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time

import libvirt
import pytest
import zmq

from tests.fakeworker import expect_message
from tests.waiting import wait_until
from virtbroker.client.templates import minimal_domain_xml
from virtbroker.common import domxml
from virtbroker.common import protocol as p
from virtbroker.common.config import Config
from virtbroker.workers import events
from virtbroker.workers.fencing import HostLease, Watchdog
from virtbroker.workers.lifecycle import LifecycleWorker

URI = "test:///default"
PREFIX = "vbt-ev-"
LEASE_TTL_S = 1.0  # heartbeats every 0.25 s


# --------------------------------------------------------------------------- pure parts


@pytest.mark.parametrize(
    ("event", "detail", "expected"),
    [
        (libvirt.VIR_DOMAIN_EVENT_STARTED, libvirt.VIR_DOMAIN_EVENT_STARTED_BOOTED, ("started", "booted")),
        (libvirt.VIR_DOMAIN_EVENT_RESUMED, libvirt.VIR_DOMAIN_EVENT_RESUMED_UNPAUSED, ("resumed", "unpaused")),
        (libvirt.VIR_DOMAIN_EVENT_SUSPENDED, libvirt.VIR_DOMAIN_EVENT_SUSPENDED_PAUSED, ("suspended", "paused")),
        (libvirt.VIR_DOMAIN_EVENT_SUSPENDED, libvirt.VIR_DOMAIN_EVENT_SUSPENDED_IOERROR, ("suspended", "ioerror")),
        (libvirt.VIR_DOMAIN_EVENT_PMSUSPENDED, libvirt.VIR_DOMAIN_EVENT_PMSUSPENDED_MEMORY, ("pmsuspended", "memory")),
        (libvirt.VIR_DOMAIN_EVENT_STOPPED, libvirt.VIR_DOMAIN_EVENT_STOPPED_DESTROYED, ("stopped", "destroyed")),
        (libvirt.VIR_DOMAIN_EVENT_STOPPED, libvirt.VIR_DOMAIN_EVENT_STOPPED_SHUTDOWN, ("stopped", "shutdown")),
        (libvirt.VIR_DOMAIN_EVENT_CRASHED, libvirt.VIR_DOMAIN_EVENT_CRASHED_PANICKED, ("crashed", "panicked")),
        (libvirt.VIR_DOMAIN_EVENT_STOPPED, 99, ("stopped", "detail 99")),
        # No change of the guest's state: STOPPED follows SHUTDOWN; definitions are the broker's.
        (libvirt.VIR_DOMAIN_EVENT_SHUTDOWN, libvirt.VIR_DOMAIN_EVENT_SHUTDOWN_GUEST, None),
        (libvirt.VIR_DOMAIN_EVENT_DEFINED, libvirt.VIR_DOMAIN_EVENT_DEFINED_ADDED, None),
        (libvirt.VIR_DOMAIN_EVENT_UNDEFINED, libvirt.VIR_DOMAIN_EVENT_UNDEFINED_REMOVED, None),
        (42, 0, None),
    ],
)
def test_the_lifecycle_events_that_change_a_guests_state(event, detail, expected):
    assert events.guest_event(event, detail) == expected


def test_the_lease_counts_from_when_the_renewed_beat_was_sent():
    lease = HostLease()
    lease.sent(0, now=100.0)  # hello
    assert lease.renew(0, armed=True, self_fence_s=5.0, now=100.1)
    lease.sent(1, now=101.0)
    lease.sent(2, now=102.0)
    # Beat 2's answer comes late: the lease was renewed when beat 2 left, not on arrival.
    assert lease.renew(2, armed=True, self_fence_s=5.0, now=106.5)
    assert lease.renewed_at == 102.0
    assert not lease.expire(now=106.9)
    assert lease.expire(now=107.0)
    # A late answer to beat 1 (the broker never answers out of order: beat 1 was dropped) counts for nothing.
    assert not lease.renew(1, armed=True, self_fence_s=5.0, now=107.1)
    assert lease.renewed_at == 102.0


def test_the_lease_expires_once_per_outage_and_only_while_armed():
    lease = HostLease()
    lease.sent(1, now=0.0)
    assert lease.renew(1, armed=False, self_fence_s=1.0, now=0.1)
    assert not lease.expire(now=50.0)  # disarmed: no HA guest here, nothing to fence
    lease.sent(2, now=50.0)
    assert lease.renew(2, armed=True, self_fence_s=1.0, now=50.1)
    assert not lease.expire(now=50.9)
    assert lease.expire(now=51.0)
    assert not lease.expire(now=52.0)  # the same outage: fenced already
    lease.sent(3, now=51.5)  # sent during the outage, answered when it ends
    assert not lease.renew(3, armed=True, self_fence_s=1.0, now=52.6)  # too old to hold the lease
    assert not lease.expire(now=52.7)
    lease.sent(4, now=53.0)
    assert lease.renew(4, armed=True, self_fence_s=1.0, now=53.1)  # held again: a new outage may fence
    assert lease.expire(now=54.0)


def test_a_renewal_of_a_beat_clears_the_hellos_sent_before_it():
    lease = HostLease()
    lease.sent(0, now=1.0)  # a hello the broker never answered (it was away)
    lease.sent(1, now=2.0)
    assert lease.renew(1, armed=True, self_fence_s=5.0, now=2.1)
    lease.sent(0, now=3.0)
    assert lease.renew(0, armed=True, self_fence_s=5.0, now=3.1)
    assert lease.renewed_at == 3.0  # the second hello's, not the first's


def test_a_worker_arms_itself_when_it_starts_an_ha_guest_before_the_broker_says_so():
    lease = HostLease()
    lease.sent(1, now=0.0)
    assert lease.renew(1, armed=False, self_fence_s=5.0, now=0.1)
    lease.sent(2, now=1.0)  # a beat that left before the HA guest started
    lease.arm(now=1.5)
    assert lease.armed
    # The broker's answer to that beat predates the start: it does not disarm.
    assert lease.renew(2, armed=False, self_fence_s=5.0, now=1.6)
    assert lease.armed
    assert not lease.expire(now=5.9)
    assert lease.expire(now=6.0)  # 5 s after beat 2 left: the self-fence starts
    # The broker's word on a beat sent after the start holds, whatever it says.
    lease.sent(3, now=6.5)
    assert lease.renew(3, armed=False, self_fence_s=5.0, now=6.6)  # (the HA guest was stopped since)
    assert not lease.armed
    lease.sent(4, now=7.0)
    assert lease.renew(4, armed=False, self_fence_s=5.0, now=7.1)
    assert not lease.expire(now=100.0)


# --------------------------------------------------------------------------- a worker and a fake broker


class FakeBroker:
    """The broker's worker endpoint by hand: every receive under a deadline."""

    def __init__(self, context: zmq.Context, url: str):
        self.sock = context.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(url)
        self.inbox: list[p.Message] = []
        self.peer: bytes | None = None

    def receive(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            remaining_ms = int((deadline - time.monotonic()) * 1000)
            if remaining_ms <= 0 or not self.sock.poll(remaining_ms):
                return
            identity, *frames = self.sock.recv_multipart()
            self.peer = identity
            self.inbox += p.unbatch(p.decode(frames, p.WORKER_VERSION))

    def expect(self, kind: type[p.Message], timeout_s: float = 10.0, where=lambda m: True) -> p.Message:
        """Take the first message of this kind for which `where` holds, waiting up to timeout_s."""
        return expect_message(self.inbox, self.receive, kind, where, timeout_s, poll_s=0.1, what=f"such {kind.KIND}")

    def taken(self, kind: type[p.Message], where=lambda m: True) -> list[p.Message]:
        """Every message of this kind received so far (left in the inbox)."""
        self.receive(0)
        return [m for m in self.inbox if isinstance(m, kind) and where(m)]

    def send(self, msg: p.Message) -> None:
        assert self.peer is not None, "the worker has not spoken yet"
        self.sock.send_multipart([self.peer, *p.encode(msg)])

    def close(self) -> None:
        self.sock.close(linger=0)


@pytest.fixture
def context():
    ctx = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


@pytest.fixture
def worker_factory(tmp_path, context):
    """start(**config) -> (worker, fake broker): a lifecycle worker on test:///default running in
    a thread, facing a fake broker of its own; each is stopped at the end, pass or fail."""
    made: list[tuple[LifecycleWorker, threading.Thread, FakeBroker]] = []

    def start(**config) -> tuple[LifecycleWorker, FakeBroker]:
        n = len(made)
        broker = FakeBroker(context, f"ipc://{tmp_path}/worker-{n}.sock")
        cfg = Config(
            state_dir=str(tmp_path), uri=URI, worker_url=f"ipc://{tmp_path}/worker-{n}.sock",
            lease_ttl_s=LEASE_TTL_S, resync_interval_s=3600.0, **config,
        )
        worker = LifecycleWorker(cfg, context, worker_id=f"lw-ev-{n}")
        thread = threading.Thread(target=worker.run, name=f"worker-{n}", daemon=True)
        thread.start()
        made.append((worker, thread, broker))
        return worker, broker

    yield start
    for worker, thread, broker in made:
        worker.stopping = True
        thread.join(10)
        broker.close()
        assert not thread.is_alive(), f"worker {worker.worker_id} did not stop"


@pytest.fixture
def guests():
    """start(name, placed=False) -> virDomain: a transient guest on test:///default (with
    virtbroker's metadata element if placed); every one is destroyed at the end."""
    conn = libvirt.open(URI)
    made: list[str] = []

    def start(name: str, placed: bool = False, ha: bool = False) -> libvirt.virDomain:
        xml = minimal_domain_xml(PREFIX + name, "test")
        if ha:
            xml = domxml.with_ha(xml, True)
        if placed:
            xml = domxml.with_placed_mark(xml)
        dom = conn.createXML(xml, 0)
        made.append(dom.UUIDString())
        return dom

    start.conn = conn  # type: ignore[attr-defined]
    yield start
    for uuid in made:
        with contextlib.suppress(libvirt.libvirtError):
            conn.lookupByUUIDString(uuid).destroy()
    conn.close()


def running(conn: libvirt.virConnect, uuid: str) -> bool:
    try:
        return bool(conn.lookupByUUIDString(uuid).isActive())
    except libvirt.libvirtError:
        return False


def of(uuid: str):
    return lambda m: m.uuid == uuid


def test_hello_carries_storage_roots_and_watchdog_and_heartbeats_count_up(worker_factory, tmp_path):
    shared = tmp_path / "shared"
    worker, broker = worker_factory(shared_storage_roots=[str(shared)])
    hello = broker.expect(p.Hello)
    assert (hello.shared_storage_roots, hello.watchdog, hello.self_fenced) == ([str(shared)], False, [])
    seqs = [broker.expect(p.Heartbeat).seq for _ in range(3)]
    assert seqs == [1, 2, 3]


def test_guest_changes_reach_the_broker_as_guest_events(worker_factory, guests):
    worker, broker = worker_factory()
    broker.expect(p.Hello)
    dom = guests("life")
    uuid = dom.UUIDString()
    seen = [broker.expect(p.GuestEvent, where=of(uuid))]
    for change in (dom.suspend, dom.resume, dom.destroy):
        before = time.monotonic()
        change()
        seen.append(broker.expect(p.GuestEvent, where=of(uuid)))
        assert seen[-1].at >= before  # read after the change, by the host's monotonic clock
    assert [(e.event, e.state, e.reason) for e in seen] == [
        ("started", "running", "booted"),
        ("suspended", "paused", "paused"),
        ("resumed", "running", "unpaused"),
        ("stopped", "shutoff", "destroyed"),
    ]
    assert {e.worker_id for e in seen} == {worker.worker_id}


def event_from_late_events(worker_factory, guests, name: str, change, late: list[tuple[int, int]]):
    """Guest `name` started and changed by change(dom), the broker told of both; then the
    (event, detail) pairs in `late` handed to the worker at once, as libvirt delivers events
    that waited: (broker, the guest's uuid, the one guest event they caused)."""
    worker, broker = worker_factory()
    broker.expect(p.Hello)
    dom = guests(name)
    uuid = dom.UUIDString()
    broker.expect(p.GuestEvent, where=of(uuid))
    change(dom)
    broker.expect(p.GuestEvent, where=of(uuid))
    worker._on_guest_events([(dom, event, detail) for event, detail in late])
    return broker, uuid, broker.expect(p.GuestEvent, where=of(uuid))


def test_an_event_carries_the_state_read_after_it_not_the_one_it_implies(worker_factory, guests):
    """An event that comes late (here: a started handled after the guest was destroyed) must
    not tell the broker an old state: the worker reads the state when it handles the event."""
    _, _, late = event_from_late_events(
        worker_factory, guests, "late", libvirt.virDomain.destroy,
        [(libvirt.VIR_DOMAIN_EVENT_STARTED, libvirt.VIR_DOMAIN_EVENT_STARTED_BOOTED)],
    )
    assert (late.event, late.state) == ("started", "shutoff")


def test_several_events_of_a_guest_waiting_together_are_read_once(worker_factory, guests):
    broker, uuid, got = event_from_late_events(
        worker_factory, guests, "burst", libvirt.virDomain.suspend,
        [
            (libvirt.VIR_DOMAIN_EVENT_RESUMED, libvirt.VIR_DOMAIN_EVENT_RESUMED_UNPAUSED),
            (libvirt.VIR_DOMAIN_EVENT_SUSPENDED, libvirt.VIR_DOMAIN_EVENT_SUSPENDED_PAUSED),
            (libvirt.VIR_DOMAIN_EVENT_SHUTDOWN, libvirt.VIR_DOMAIN_EVENT_SHUTDOWN_GUEST),  # no state change
        ],
    )
    assert (got.event, got.state, got.reason) == ("suspended", "paused", "paused")
    # A later event of another guest marks how far to look: no second one for the burst.
    other = guests("marker").UUIDString()
    broker.expect(p.GuestEvent, where=of(other))
    assert broker.taken(p.GuestEvent, where=of(uuid)) == []


def test_guest_events_are_heard_from_changes_made_in_other_threads(worker_factory):
    """Through the worker's own Hypervisor, from threads of their own, as job threads would."""
    worker, broker = worker_factory()
    broker.expect(p.Hello)
    made: dict[str, str] = {}

    def in_a_thread(work) -> None:
        thread = threading.Thread(target=work)
        thread.start()
        thread.join(10)

    def create() -> None:
        made["uuid"] = worker.hv.connection().createXML(minimal_domain_xml(PREFIX + "thread", "test"), 0).UUIDString()

    try:
        in_a_thread(create)
        assert broker.expect(p.GuestEvent, where=of(made["uuid"])).state == "running"
        in_a_thread(lambda: worker.hv.connection().lookupByUUIDString(made["uuid"]).destroy())
        assert broker.expect(p.GuestEvent, where=of(made["uuid"])).state == "shutoff"
    finally:
        with contextlib.suppress(libvirt.libvirtError, KeyError):
            worker.hv.conn.lookupByUUIDString(made["uuid"]).destroy()


def test_after_the_events_connection_closes_the_worker_registers_again_and_sends_every_guest(
    worker_factory, guests
):
    worker, broker = worker_factory()
    broker.expect(p.Hello)
    dom = guests("before")
    uuid = dom.UUIDString()
    broker.expect(p.GuestEvent, where=of(uuid))
    worker.events.reconnect()  # what a libvirtd restart does to the connection
    full = broker.expect(p.Heartbeat, where=lambda m: m.guests is not None)
    assert {"uuid": uuid, "name": PREFIX + "before", "state": "running"} in full.guests
    assert worker.events.registrations == 2
    dom.destroy()
    stopped = broker.expect(p.GuestEvent, where=of(uuid))
    assert (stopped.event, stopped.state) == ("stopped", "shutoff")
    # Heard once: the old registration is gone. A later guest's event marks how far to look.
    after = guests("after").UUIDString()
    broker.expect(p.GuestEvent, where=of(after))
    assert broker.taken(p.GuestEvent, where=of(uuid)) == []


def renew_heartbeats(broker: FakeBroker, count: int, armed: bool, self_fence_s: float) -> list[p.Heartbeat]:
    """Answer `count` heartbeats with `renewed`; the beats answered."""
    beats = []
    for _ in range(count):
        beat = broker.expect(p.Heartbeat)
        broker.send(p.Renewed(seq=beat.seq, armed=armed, self_fence_s=self_fence_s))
        beats.append(beat)
    return beats


def test_self_fence_destroys_the_placed_guests_once_renewals_stop_while_armed(worker_factory, guests, caplog):
    caplog.set_level(logging.WARNING, logger="virtbroker.worker")
    placed = guests("placed", placed=True, ha=True).UUIDString()
    other = guests("other").UUIDString()  # not started by virtbroker: never fenced
    worker, broker = worker_factory()
    broker.expect(p.Hello)
    broker.send(p.Renewed(seq=0, armed=True, self_fence_s=0.5))
    # Renewed for 1.5 s, three times self_fence_s: nothing happens. The beats say the worker
    # is armed (the broker trusts a host's watchdog only then).
    assert renew_heartbeats(broker, 6, armed=True, self_fence_s=0.5)[-1].armed
    assert running(guests.conn, placed) and running(guests.conn, other)
    assert broker.taken(p.GuestEvent, where=of(placed)) == []
    # The broker goes quiet.
    stopped = broker.expect(p.GuestEvent, where=of(placed))
    assert (stopped.state, stopped.reason) == ("shutoff", "destroyed")
    beat = broker.expect(p.Heartbeat, where=lambda m: m.self_fenced)
    assert beat.self_fenced == [placed]
    assert not running(guests.conn, placed) and running(guests.conn, other)
    lines = [r for r in caplog.records if r.levelno == logging.WARNING and placed in r.getMessage()]
    assert len(lines) == 1 and PREFIX + "placed" in lines[0].getMessage()
    assert any("SELF-FENCE" in r.getMessage() for r in caplog.records)
    # Once per outage: a placed guest started after the fence is left alone while the
    # broker stays quiet (here for three times self_fence_s).
    again = guests("again", placed=True).UUIDString()
    quiet_from = time.monotonic()
    wait_until(lambda: broker.expect(p.Heartbeat) and time.monotonic() - quiet_from > 1.5, 10,
               interval_s=0, what="1.5 s of unanswered heartbeats")
    assert running(guests.conn, again)
    # Every beat and hello says what was fenced until one that did is renewed.
    broker.send(p.Reregister())
    assert broker.expect(p.Hello).self_fenced == [placed]
    later = broker.expect(p.Heartbeat, where=lambda m: m.seq > beat.seq)
    assert later.self_fenced == [placed]
    broker.send(p.Renewed(seq=later.seq, armed=False, self_fence_s=0.5))
    broker.expect(p.Heartbeat, where=lambda m: m.seq > later.seq and m.self_fenced == [])
    broker.send(p.Reregister())
    assert broker.expect(p.Hello).self_fenced == []
    assert running(guests.conn, again) and running(guests.conn, other)


def test_no_self_fence_while_disarmed(worker_factory, guests):
    placed = guests("placed", placed=True).UUIDString()
    worker, broker = worker_factory()
    broker.expect(p.Hello)
    broker.send(p.Renewed(seq=0, armed=False, self_fence_s=0.3))
    answered_at = time.monotonic()
    # Then silence: heartbeats go unanswered for five times self_fence_s, and more beats
    # after that show the worker's loop went on turning (it checks the lease each turn).
    wait_until(lambda: broker.expect(p.Heartbeat) and time.monotonic() - answered_at > 1.5, 10,
               interval_s=0, what="1.5 s of unanswered heartbeats")
    for _ in range(4):
        broker.expect(p.Heartbeat)
    assert running(guests.conn, placed)
    assert broker.taken(p.GuestEvent, where=of(placed)) == []
    assert broker.taken(p.Heartbeat, where=lambda m: m.self_fenced) == []


class FifoReader:
    """The reading end of a FIFO that stands in for /dev/watchdog: what was written, with
    "EOF" each time the writer closed; reopened until stopped."""

    def __init__(self, path: str):
        self.path = path
        self.got: list[bytes | str] = []
        self.changed = threading.Condition()
        self.stopping = False
        self.thread = threading.Thread(target=self._run, name="fifo-reader", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stopping:
            with open(self.path, "rb", buffering=0) as fifo:  # blocks until a writer opens it
                while byte := fifo.read(1):
                    self._add(byte)
            self._add("EOF")

    def _add(self, item: bytes | str) -> None:
        with self.changed:
            self.got.append(item)
            self.changed.notify_all()

    def wait_for(self, count: int, timeout_s: float = 10.0) -> list[bytes | str]:
        with self.changed:
            assert self.changed.wait_for(lambda: len(self.got) >= count, timeout_s), f"only {self.got}"
            return list(self.got)

    def stop(self) -> None:
        self.stopping = True
        # A reader waiting in open() is let go by a writer that opens and closes at once.
        with contextlib.suppress(OSError):
            os.close(os.open(self.path, os.O_WRONLY | os.O_NONBLOCK))
        self.thread.join(5)


PET, CLOSE = Watchdog.PET, Watchdog.MAGIC_CLOSE


def test_watchdog_is_petted_after_each_renewal_only_and_closed_with_v(worker_factory, tmp_path):
    fifo = str(tmp_path / "watchdog")
    os.mkfifo(fifo)
    reader = FifoReader(fifo)
    try:
        worker, broker = worker_factory(watchdog_device=fifo)
        assert broker.expect(p.Hello).watchdog is True
        broker.send(p.Renewed(seq=0, armed=True, self_fence_s=5.0))
        assert reader.wait_for(1) == [PET]
        renew_heartbeats(broker, 3, armed=True, self_fence_s=5.0)
        assert reader.wait_for(4) == [PET] * 4
        # Heartbeats without renewals: no pet.
        for _ in range(4):
            broker.expect(p.Heartbeat)
        renew_heartbeats(broker, 1, armed=False, self_fence_s=5.0)  # disarmed: the magic close
        assert reader.wait_for(6) == [PET] * 4 + [CLOSE, "EOF"]
        renew_heartbeats(broker, 1, armed=True, self_fence_s=5.0)  # armed again: opened again
        assert reader.wait_for(7) == [PET] * 4 + [CLOSE, "EOF", PET]
        worker.stopping = True  # a clean stop closes it with the magic close too
        assert reader.wait_for(9) == [PET] * 4 + [CLOSE, "EOF", PET, CLOSE, "EOF"]
    finally:
        reader.stop()


def test_a_watchdog_that_cannot_be_opened_vouches_for_nothing(worker_factory, tmp_path):
    """armed in a heartbeat tells the broker a silence of this host resets it: not so when
    the device cannot be opened, whatever renewed.armed said."""
    worker, broker = worker_factory(watchdog_device=str(tmp_path / "no-such-watchdog"))
    broker.expect(p.Hello)
    broker.send(p.Renewed(seq=0, armed=True, self_fence_s=5.0))
    assert not any(beat.armed for beat in renew_heartbeats(broker, 4, armed=True, self_fence_s=5.0))


def test_strays_are_destroyed_and_answered(worker_factory, guests):
    stray = guests("stray", placed=True).UUIDString()
    keep = guests("keep", placed=True).UUIDString()
    absent = "00000000-0000-4000-8000-00000000abcd"
    worker, broker = worker_factory()
    broker.expect(p.Hello)
    broker.send(p.Strays(uuids=[stray, absent, "not-a-uuid"]))
    done = broker.expect(p.StraysDone)
    assert done.worker_id == worker.worker_id
    assert sorted(done.destroyed) == sorted([stray, absent])
    assert [f["uuid"] for f in done.failed] == ["not-a-uuid"] and done.failed[0]["error"]
    assert not running(guests.conn, stray) and running(guests.conn, keep)


@contextlib.contextmanager
def ha_start(broker: FakeBroker, conn: libvirt.virConnect, name: str):
    """The worker is assigned a start of an HA domain named PREFIX+name: (its definition,
    its result, acknowledged); the guest is destroyed at the end, pass or fail."""
    definition = domxml.load_definition(domxml.with_ha(minimal_domain_xml(PREFIX + name, "test"), True))
    broker.send(p.JobAssignment(job_id=1, op="start", lease_id="l-1", epoch=1, lease_ttl_s=LEASE_TTL_S,
                                domain_uuid=definition.uuid, domain_name=definition.name, xml=definition.xml))
    try:
        result = broker.expect(p.Result)
        broker.send(p.ResultAck(job_id=1, accepted=True))
        yield definition, result
    finally:
        with contextlib.suppress(libvirt.libvirtError):
            conn.lookupByUUIDString(definition.uuid).destroy()


def test_a_worker_that_starts_an_ha_guest_self_fences_without_waiting_for_armed(worker_factory, guests):
    """The broker arms a host in its next `renewed`, a heartbeat later: the worker arms
    itself when an HA guest's start succeeds, so a cut off right after still fences it."""
    worker, broker = worker_factory()
    broker.expect(p.Hello)
    broker.send(p.Renewed(seq=0, armed=False, self_fence_s=0.5))
    with ha_start(broker, guests.conn, "ha-now") as (definition, result):
        assert (result.ok, result.domain_state) == (True, "running")
        # No `renewed` from here on, and none has said armed: the worker says so itself.
        assert broker.expect(p.Heartbeat).armed
        stopped = broker.expect(p.GuestEvent, where=lambda m: m.uuid == definition.uuid and m.state == "shutoff")
        assert stopped.reason == "destroyed"
        assert broker.expect(p.Heartbeat, where=lambda m: m.self_fenced).self_fenced == [definition.uuid]
        assert not running(guests.conn, definition.uuid)


def test_every_guest_the_worker_starts_carries_the_placed_mark(worker_factory, guests):
    worker, broker = worker_factory()
    broker.expect(p.Hello)
    with ha_start(broker, guests.conn, "started") as (definition, result):
        assert (result.ok, result.error, result.domain_state) == (True, None, "running")
        assert 0 < result.done_at <= time.monotonic()  # when its libvirt work ended, the host's clock
        dom = guests.conn.lookupByUUIDString(definition.uuid)
        element = dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, domxml.METADATA_NS)
        assert 'ha="yes"' in element  # the mark kept the HA mark it found
