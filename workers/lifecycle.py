"""Lifecycle worker: runs domain jobs through libvirt-python under the broker's leases, and tells
the broker what happens to its host's guests.

The main thread owns the DEALER socket to the broker. Jobs run in a fixed set of job
threads. A finished job's result goes into the Mailbox, which the main thread empties and
forwards to the broker in one batch. A job thread that needs labels talks to the main
thread over its own inproc DEALER (never a shared socket): the main thread forwards label
requests to the broker and label replies back.

The other threads hand what they have for the broker to the main thread through a second
Mailbox (`notices`), never through its socket:
  libvirt-events  libvirt's event loop (workers/events.py), once per process; its
                  lifecycle-event callback queues each event for the events thread.
  events          owns the events connection: reads the state of each guest an event names
                  and sends it as a guest-event; registers again after libvirtd restarts and
                  then sends the host's full guest list.
  resync          every resync_interval_s, the host's full guest list (a backstop for events).
  self-fence      destroys the guests virtbroker placed when the host lease ran out while
                  armed (workers/fencing.py); the main thread notices it and starts it.
  strays          destroys the guests a `strays` names, then answers strays-done.
The main thread owns the host lease (heartbeat seqs and their renewals) and the watchdog.
"""

from __future__ import annotations

import collections
import logging
import os
import queue
import threading
import time
import uuid as uuidlib
from dataclasses import dataclass

import libvirt
import zmq

from virtbroker.common import domxml
from virtbroker.common import protocol as p
from virtbroker.common.config import Config
from virtbroker.common.errors import DriverError, OperationInvalidError, SecurityError, VirtbrokerError
from virtbroker.common.guestuser import guest_ids
from virtbroker.common.process import BrokerLink, run_until_signalled
from virtbroker.common.wire import drain, send_frames
from virtbroker.workers import events, fencing

log = logging.getLogger("virtbroker.worker")

INPROC_URL = "inproc://jobs"
LABEL_TIMEOUT_S = 120.0
STOP_GRACE_S = 30.0
# Job threads run this much nicer than the worker's main thread. A worker may have hundreds
# of job threads runnable at once, and the kernel shares the CPU between threads: at equal
# priority they starve the one thread that sends heartbeats and results (and, on a shared
# machine, the broker's loop); with no-op jobs the worker finishes more jobs a second.
JOB_THREAD_NICE = 5
SHUTDOWN_POLL_S = 0.25
ALIVE_CHECK_S = 1.0
# A self-fence that cannot list the host's guests (libvirtd restarting) tries again this
# often, this many times: it has until host_dead_s, when the broker may count them dead.
SELF_FENCE_TRIES = 5
SELF_FENCE_RETRY_S = 1.0
_NOBLOCK = int(zmq.NOBLOCK)

_STATE_NAMES = {
    libvirt.VIR_DOMAIN_RUNNING: "running",
    libvirt.VIR_DOMAIN_BLOCKED: "running",
    libvirt.VIR_DOMAIN_SHUTDOWN: "running",  # shutting down, still there
    libvirt.VIR_DOMAIN_PAUSED: "paused",
    libvirt.VIR_DOMAIN_PMSUSPENDED: "paused",
    libvirt.VIR_DOMAIN_SHUTOFF: "shutoff",
    libvirt.VIR_DOMAIN_CRASHED: "shutoff",
}


def state_name(state: int, reason: int) -> str:
    """libvirt's (state, reason) as a virtbroker domain state.

    QEMU guests pass through PAUSED/STARTING_UP while they start: that is a guest on its
    way to running, not one a user paused, and a reconcile must not record it as paused.
    """
    if state == libvirt.VIR_DOMAIN_PAUSED and reason == libvirt.VIR_DOMAIN_PAUSED_STARTING_UP:
        return "running"
    return _STATE_NAMES.get(state, "running")


def _quiet_libvirt(_ctx, _err):
    """libvirt prints every error to stderr by default; we raise and log them instead."""


def host_id_for(conn: libvirt.virConnect, uri: str) -> str:
    """Workers of one machine on qemu:///system share a host; test:///default lives in each process."""
    host = f"{conn.getHostname()}/{conn.getType().lower()}"
    if uri.startswith("test:///"):
        host += f"/pid{os.getpid()}"
    return host


class _Link:
    """One thread's connection and when it last proved to work (monotonic seconds)."""

    __slots__ = ("conn", "checked_at")

    def __init__(self, conn: libvirt.virConnect):
        self.conn = conn
        self.checked_at = 0.0


class Hypervisor:
    """libvirt-python for one URI: a connection per thread, reopened when libvirtd restarts.

    libvirtd runs at most 5 calls of one connection at a time (max_client_requests) and
    queues the rest. On one shared connection a worker with more slots than that would
    queue its jobs' calls behind each other: a destroy's lookup waits for another guest's
    destroy to finish. With a connection per job thread every slot has its calls in
    flight at once, like a client with a thread and a connection per guest.
    """

    def __init__(self, uri: str):
        self.uri = uri
        self._local = threading.local()
        self._link()  # fail now, in the worker's start-up, if libvirtd cannot be reached

    def _open(self) -> libvirt.virConnect:
        try:
            return libvirt.open(self.uri)
        except libvirt.libvirtError as e:
            raise DriverError(f"cannot connect to {self.uri}: {e.get_error_message()}") from e

    def _link(self) -> _Link:
        link = getattr(self._local, "link", None)
        if link is None:
            link = self._local.link = _Link(self._open())
        return link

    @property
    def conn(self) -> libvirt.virConnect:
        """This thread's connection, as it is (see connection() and ensure_alive())."""
        return self._link().conn

    def connection(self) -> libvirt.virConnect:
        """This thread's connection, reopened first if libvirt already knows it is dead."""
        link = self._link()
        try:
            alive = link.conn.isAlive()
        except libvirt.libvirtError:
            alive = False
        if not alive:
            log.warning("connection to %s lost; reconnecting", self.uri)
            link.conn = self._open()
        return link.conn

    def ensure_alive(self) -> None:
        """Before a job: one cheap call proves this thread's connection. isAlive() stays true
        after libvirtd restarts until the first call fails ("Cannot write data: Broken
        pipe"). At most once per ALIVE_CHECK_S per thread: a check per job would double the
        calls of a storm. A restart inside that window is caught by JobRunner.run, which
        reconnects and runs the job again when its first call could not be sent.
        """
        link = self._link()
        if time.monotonic() - link.checked_at < ALIVE_CHECK_S:
            return
        try:
            link.conn.getLibVersion()
        except libvirt.libvirtError:
            self.reconnect()
        link.checked_at = time.monotonic()

    def reconnect(self) -> None:
        """Replace this thread's connection with a new one."""
        link = self._link()
        log.warning("connection to %s is stale (libvirtd restarted?); reconnecting", self.uri)
        try:
            link.conn.close()
        except libvirt.libvirtError:
            pass
        link.conn = self._open()
        link.checked_at = time.monotonic()

    @staticmethod
    def never_sent(e: libvirt.libvirtError) -> bool:
        """The call failed writing its request to a daemon that is gone (it restarted), so
        no libvirtd ever received it, and running it again on a new connection is safe."""
        return e.get_error_domain() == libvirt.VIR_FROM_RPC and (e.get_error_message() or "").startswith(
            "Cannot write data"
        )

    def suspect(self) -> None:
        """A call failed in the RPC layer: check this thread's connection before its next job."""
        self._link().checked_at = 0.0

    def lookup(self, uuid: str):
        try:
            return self.connection().lookupByUUIDString(uuid)
        except libvirt.libvirtError as e:
            if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return None
            raise

    def state(self, uuid: str) -> str:
        dom = self.lookup(uuid)
        if dom is None:
            return "shutoff"
        try:
            return state_name(*dom.state())
        except libvirt.libvirtError as e:
            if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return "shutoff"
            raise

    def guests(self) -> list[dict]:
        return list_guests(self.connection())


def list_guests(conn: libvirt.virConnect) -> list[dict]:
    """The host's running guests, [{uuid, name, state}], as a hello or a resync reports them."""
    out = []
    for dom in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE):
        try:
            out.append({"uuid": dom.UUIDString(), "name": dom.name(), "state": state_name(*dom.state())})
        except libvirt.libvirtError:
            continue  # it went away while we listed
    return out


def host_capacity(conn: libvirt.virConnect) -> tuple[int, int]:
    """The host's memory (MiB) and CPUs, from libvirt's node info; (0, 0) if it cannot tell.

    libvirt's test driver reports a fixed node (3 GiB) that its guests never use: its memory
    is reported as unknown (0), and placement then spreads by guest count alone.
    """
    if conn.getURI().startswith("test:"):
        return 0, 0
    try:
        info = conn.getInfo()  # [model, memory MiB, cpus, MHz, nodes, sockets, cores, threads]
        return int(info[1]), int(info[2])
    except libvirt.libvirtError as e:
        log.warning("cannot read the host's capacity: %s", e)
        return 0, 0


class JobRunner:
    """What one job thread does for one job. Holds the thread's inproc socket (for labels)."""

    def __init__(self, worker: LifecycleWorker, sock: zmq.Socket):
        self.worker = worker
        self.hv = worker.hv
        self.sock = sock

    def run(self, job: p.JobAssignment) -> p.Result:
        try:
            op = getattr(self, "op_" + job.op)
            self.hv.ensure_alive()
            try:
                state = op(job)
            except libvirt.libvirtError as e:
                if not self.hv.never_sent(e):
                    raise
                self.hv.reconnect()  # libvirtd restarted since this thread's last check
                state = op(job)
            return self._result(job, ok=True, state=state, done_at=time.monotonic())
        except libvirt.libvirtError as e:
            error, code = e.get_error_message(), "driver"
            if e.get_error_domain() == libvirt.VIR_FROM_RPC:
                self.hv.suspect()
        except VirtbrokerError as e:
            error, code = e.message, e.code
        except Exception as e:  # a bug in this worker: the job fails, the worker goes on
            log.exception("job %d (%s %s) crashed", job.job_id, job.op, job.domain_name)
            error, code = f"internal error: {e}", "internal"
        try:
            state = self.hv.state(job.domain_uuid)
        except Exception:
            state = None
        return self._result(job, ok=False, state=state, done_at=time.monotonic(), error=error, code=code)

    def _result(self, job, ok, state, done_at, error=None, code=None) -> p.Result:
        """done_at: CLOCK_MONOTONIC (one clock for the host's processes) when the job's libvirt
        work ended; a guest-event read before it is older news than this result."""
        return p.Result(
            worker_id=self.worker.worker_id,
            job_id=job.job_id,
            lease_id=job.lease_id,
            epoch=job.epoch,
            ok=ok,
            error=error,
            error_code=code,
            domain_state=state,
            done_at=done_at,
        )

    # -- operations; each returns the domain state it leaves behind
    def op_start(self, job: p.JobAssignment) -> str:
        xml = job.xml
        if job.security:
            # Who QEMU runs as is this worker's own setting, never a security worker's answer.
            uid_gid = self.worker.guest_uid_gid() if "dac" in job.security else None
            facts = self._label(job, "label")
            try:
                if "dac" in facts:
                    answered = (facts["dac"].get("uid"), facts["dac"].get("gid"))
                    if answered != uid_gid:
                        raise SecurityError(
                            f"dac: the security worker labelled for uid:gid {answered[0]}:{answered[1]}, but this "
                            f"host's guest user is {uid_gid[0]}:{uid_gid[1]}; not starting"
                        )
                    xml = domxml.with_static_dac_label(xml, *uid_gid)
                if facts.get("apparmor", {}).get("static_label"):
                    xml = domxml.with_static_label(xml, "apparmor", facts["apparmor"]["profile"])
                self.hv.connection().createXML(domxml.with_placed_mark(xml), 0)
            except BaseException:
                self._restore_quietly(job)  # a failed start leaves no label behind
                raise
        else:
            # The mark tells the guests virtbroker placed from any other: self-fencing
            # destroys those alone.
            self.hv.connection().createXML(domxml.with_placed_mark(xml), 0)
        return "running"

    def op_destroy(self, job: p.JobAssignment) -> str:
        dom = self.hv.lookup(job.domain_uuid)
        if dom is not None:
            try:
                dom.destroy()
            except libvirt.libvirtError as e:
                if e.get_error_code() not in (libvirt.VIR_ERR_NO_DOMAIN, libvirt.VIR_ERR_OPERATION_INVALID):
                    raise
        self._after_stop(job)
        return "shutoff"

    def op_shutdown(self, job: p.JobAssignment) -> str:
        """ACPI shutdown, then destroy after timeout_s: `virsh shutdown` followed by `virsh destroy`."""
        dom = self.hv.lookup(job.domain_uuid)
        if dom is not None:
            try:
                dom.shutdown()
            except libvirt.libvirtError as e:
                if e.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                    raise
            deadline = time.monotonic() + (job.timeout_s or 60.0)
            while time.monotonic() < deadline and self.hv.state(job.domain_uuid) != "shutoff":
                time.sleep(SHUTDOWN_POLL_S)
            if self.hv.state(job.domain_uuid) != "shutoff":
                log.info("%s ignored ACPI shutdown for %.0f s; destroying", job.domain_name, job.timeout_s or 60)
                dom = self.hv.lookup(job.domain_uuid)
                if dom is not None:
                    dom.destroy()
        self._after_stop(job)
        return "shutoff"

    def op_reboot(self, job: p.JobAssignment) -> str:
        self._must_exist(job).reboot(0)
        return self.hv.state(job.domain_uuid)

    def op_suspend(self, job: p.JobAssignment) -> str:
        self._must_exist(job).suspend()
        return "paused"

    def op_resume(self, job: p.JobAssignment) -> str:
        self._must_exist(job).resume()
        return "running"

    def op_reconcile(self, job: p.JobAssignment) -> str:
        state = self.hv.state(job.domain_uuid)
        if state == "shutoff" and job.security:
            self._after_stop(job)
        log.info("reconciled %s: %s", job.domain_name, state)
        return state

    def _must_exist(self, job):
        dom = self.hv.lookup(job.domain_uuid)
        if dom is None:
            raise OperationInvalidError(f"Requested operation is not valid: domain '{job.domain_name}' is not running")
        return dom

    # -- security, through the broker to this host's security workers
    def _after_stop(self, job: p.JobAssignment) -> None:
        if job.security:
            self._label(job, "restore")

    def _restore_quietly(self, job: p.JobAssignment) -> None:
        try:
            self._label(job, "restore")
        except VirtbrokerError as e:
            log.error("restoring labels of %s after a failed start: %s", job.domain_name, e)

    def _label(self, job: p.JobAssignment, action: str) -> dict:
        """Ask every driver in job.security at once to label or restore; returns their facts.

        The drivers touch different things (owners, profiles), so they work in parallel.
        If any fails, the others' work is undone: a driver that refused rolled its own
        transaction back, and one that never answered is asked to restore as well.
        """
        replies = self._ask_all(job, action, job.security)
        failed = {d: r for d, r in replies.items() if r is None or not r.ok}
        if failed:
            if action == "label":
                undo = [d for d, r in replies.items() if r is None or r.ok]
                for driver, reply in self._ask_all(job, "restore", undo).items():
                    if reply is None or not reply.ok:
                        log.error("restoring %s labels of %s: %s", driver, job.domain_name,
                                  reply.error if reply else "no answer")
            driver, reply = next(iter(failed.items()))
            error = reply.error if reply is not None else f"no answer within {LABEL_TIMEOUT_S:g} s"
            raise SecurityError(f"{driver}: {error}")
        return {driver: reply.detail for driver, reply in replies.items()}

    def _ask_all(self, job: p.JobAssignment, action: str, drivers: list[str]) -> dict[str, p.LabelReply | None]:
        """Send one request per driver, then collect the replies; None for a driver that did not answer."""
        waiting: dict[str, str] = {}  # label_id -> driver
        for driver in drivers:
            label_id = uuidlib.uuid4().hex
            waiting[label_id] = driver
            request = p.LabelRequest(
                worker_id=self.worker.worker_id,
                label_id=label_id,
                host_id=self.worker.host_id,
                action=action,
                domain_uuid=job.domain_uuid,
                domain_name=job.domain_name,
                xml=job.xml,
                driver=driver,
            )
            self.sock.send_multipart([b"label", label_id.encode(), *p.encode(request)])
        replies: dict[str, p.LabelReply | None] = {driver: None for driver in drivers}
        deadline = time.monotonic() + LABEL_TIMEOUT_S
        while waiting:
            remaining_ms = int((deadline - time.monotonic()) * 1000)
            if remaining_ms <= 0 or not self.sock.poll(remaining_ms):
                break
            reply = p.decode(self.sock.recv_multipart(), p.WORKER_VERSION)
            if isinstance(reply, p.LabelReply) and reply.label_id in waiting:
                replies[waiting.pop(reply.label_id)] = reply
            # else: a late reply to an earlier request of this thread: ignore
        return replies


class Mailbox:
    """Finished jobs, handed from the job threads to the main thread.

    A deque, and an eventfd that the main thread's poller watches. A job thread writes to
    the eventfd only for the first item since the main thread last emptied the box, so a
    burst of results costs one wake-up of the main thread, not a socket message each.
    """

    def __init__(self):
        self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._items: collections.deque = collections.deque()
        self._signalled = False

    def put(self, item) -> None:
        self._items.append(item)
        if not self._signalled:
            self._signalled = True
            os.eventfd_write(self.fd, 1)

    def take(self) -> list:
        """Everything in the box, oldest first.

        The order matters. The eventfd is reset first, then the flag is cleared, then the
        box is emptied: a put that comes after the emptying finds the flag clear (or set
        by a put that signals after the reset) and wakes the main thread again. Clearing
        the flag before the reset would let a put see it still set after the reset had
        consumed its signal, and its item would wait for the next put.
        """
        try:
            os.eventfd_read(self.fd)
        except BlockingIOError:
            pass
        self._signalled = False
        items = []
        while self._items:
            items.append(self._items.popleft())
        return items

    def close(self) -> None:
        os.close(self.fd)


class JobThreads:
    """`count` threads that run `target(job)` for each submitted job; the next free thread
    takes the oldest job.

    Leaner than a ThreadPoolExecutor (no future per job), which a worker does not need:
    results travel through the Mailbox. The threads are daemons: at exit a thread stuck in
    a libvirt call must not hold the process, its lease expires instead.
    """

    def __init__(self, count: int, target, name: str = "job"):
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._target = target
        self._threads = [threading.Thread(target=self._loop, name=f"{name}-{i}", daemon=True) for i in range(count)]
        for thread in self._threads:
            thread.start()

    def submit(self, job) -> None:
        self._queue.put(job)

    def stop(self) -> None:
        """Each thread leaves after the job it is running, if any; jobs not started are dropped."""
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        for _ in self._threads:
            self._queue.put(None)

    def _loop(self) -> None:
        _lower_priority(JOB_THREAD_NICE)
        while (job := self._queue.get()) is not None:
            self._target(job)


def _lower_priority(by: int) -> None:
    """Raise this thread's nice value by `by` (Linux keeps one per thread). Never fatal."""
    tid = threading.get_native_id()
    try:
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + by))
    except OSError as e:
        log.debug("cannot lower the priority of job thread %d: %s", tid, e)


@dataclass
class GuestList:
    """A notice: the host's full guest list, for the main thread to send in a heartbeat."""

    guests: list[dict]


@dataclass
class SelfFenced:
    """A notice: the self-fence thread destroyed these guests."""

    uuids: list[str]


class LifecycleWorker:
    def __init__(self, config: Config, context: zmq.Context, worker_id: str | None = None):
        self.config = config
        self.context = context
        self.worker_id = worker_id or f"lw-{uuidlib.uuid4().hex[:12]}"
        # Before any connection: libvirt watches a connection's socket (events, keepalive,
        # its close) only if the event loop was registered when it opened.
        events.start_event_loop()
        libvirt.registerErrorHandler(_quiet_libvirt, None)
        self.hv = Hypervisor(config.uri)
        self.host_id = host_id_for(self.hv.conn, config.uri)
        self.slots = config.slots
        # Threads for destroy and reconcile only when every ordinary slot is busy (libvirtd's
        # priority workers). The broker never sends more than slots ordinary jobs plus
        # priority_slots of those, so one thread pool of both sizes never makes a destroy wait.
        self.priority_slots = config.priority_slots
        self.memory_mib, self.cpus = host_capacity(self.hv.conn)
        self.running: dict[int, p.JobAssignment] = {}
        # job_id -> monotonic time its lease stops being renewed (its deadline)
        self.deadlines: dict[int, float] = {}
        self.unacked: dict[int, list[bytes]] = {}  # job_id -> encoded Result awaiting the broker's ack
        self.label_threads: dict[str, bytes] = {}  # label_id -> inproc identity of the asking thread
        self.stopping = False
        self.broker_gone = False
        self.heartbeat_interval_s = config.heartbeat_interval_s
        self.resync_stop = threading.Event()
        self._local = threading.local()
        self.mailbox = Mailbox()
        # What the other threads have for the broker: guest events, guest lists, strays-done,
        # the self-fence's outcome (p.Message, GuestList or SelfFenced).
        self.notices = Mailbox()
        self.threads = JobThreads(self.slots + self.priority_slots, self._in_thread)
        # The host lease: heartbeats are numbered, the broker's `renewed` echoes the number.
        self.beat_seq = 0
        self.lease = fencing.HostLease()
        self.watchdog = fencing.Watchdog(config.watchdog_device)
        # Guests destroyed by self-fencing: in every heartbeat and hello until one that carried
        # them is renewed (the broker has read it). The seq of the first beat that did, and
        # whether a hello did.
        self.self_fenced: list[str] = []
        self.self_fenced_seq: int | None = None
        self.self_fenced_in_hello = False

        self.link = BrokerLink(context, config, self.worker_id)
        self.poller: zmq.Poller | None = None
        self.inproc = context.socket(zmq.ROUTER)
        self.inproc.setsockopt(zmq.LINGER, 0)
        self.inproc.bind(INPROC_URL + "-" + self.worker_id)
        # Registered before the first hello lists the guests: no event falls between the two.
        self.events = events.EventWatch(config.uri, self._on_guest_events, self._after_reregistering)
        self.events.open()

    def guest_uid_gid(self) -> tuple[int, int]:
        """The uid:gid QEMU runs as under the dac driver: this worker's guest_user."""
        if not self.config.guest_user:
            raise SecurityError("dac: this lifecycle worker has no guest_user (USER[:GROUP]) configured")
        return guest_ids(self.config.guest_user)

    def renewable(self) -> list[p.JobAssignment]:
        """Running jobs whose lease is still renewed: those before their deadline.

        A job past its deadline is left to expire (the broker ends it `lost`, code deadline,
        one TTL later); its thread may still be stuck in libvirt, and its late result, if
        any, is refused and answered by a reconcile.
        """
        now = time.monotonic()
        out = []
        for job in self.running.values():
            deadline = self.deadlines.get(job.job_id)
            if deadline is not None and now >= deadline:
                if deadline > 0:
                    log.warning("job %d (%s %s) passed its deadline of %g s: no longer renewing its lease",
                                job.job_id, job.op, job.domain_name, job.deadline_s)
                    self.deadlines[job.job_id] = 0.0  # logged once
                continue
            out.append(job)
        return out

    # -- the main thread
    def hello(self) -> None:
        leases = [{"lease_id": j.lease_id, "job_id": j.job_id, "epoch": j.epoch} for j in self.renewable()]
        msg = p.Hello(
            worker_id=self.worker_id,
            role="lifecycle",
            host_id=self.host_id,
            uri=self.config.uri,
            slots=self.slots,
            guests=self.hv.guests(),
            leases=leases,
            priority_slots=self.priority_slots,
            memory_mib=self.memory_mib,
            cpus=self.cpus,
            shared_storage_roots=list(self.config.shared_storage_roots),
            watchdog=bool(self.config.watchdog_device),
            self_fenced=list(self.self_fenced),
        )
        self.sock.send_multipart(p.encode(msg))
        self.lease.sent(0, time.monotonic())  # the broker answers a hello with renewed, seq 0
        self.self_fenced_in_hello = bool(self.self_fenced)

    def run(self) -> None:
        self.events.start()
        self.hello()
        log.info("lifecycle worker %s on %s (%s), %d slots", self.worker_id, self.host_id, self.config.uri, self.slots)
        self.poller = poller = zmq.Poller()
        for sock in self.link.sockets():
            poller.register(sock, zmq.POLLIN)
        poller.register(self.inproc, zmq.POLLIN)
        poller.register(self.mailbox.fd, zmq.POLLIN)
        poller.register(self.notices.fd, zmq.POLLIN)
        resync = threading.Thread(target=self._resync_loop, name="resync", daemon=True)
        resync.start()
        next_beat = time.monotonic() + self.heartbeat_interval_s
        stop_deadline = None
        while True:
            if self.stopping and stop_deadline is None:
                stop_deadline = time.monotonic() + STOP_GRACE_S
                self.sock.send_multipart(p.encode(p.Bye(worker_id=self.worker_id)))
                log.info("stopping: finishing %d running job(s)", len(self.running))
            if stop_deadline is not None and (
                (not self.running and not self.unacked) or time.monotonic() > stop_deadline
            ):
                break
            timeout_ms = max(0, int((next_beat - time.monotonic()) * 1000))
            ready = dict(poller.poll(min(timeout_ms, 200)))
            if self.link.lost(ready, time.monotonic()):
                self._rejoin("the broker went away")
            elif self.sock in ready:
                self._drain_broker()
            if self.inproc in ready or self.mailbox.fd in ready or self.notices.fd in ready:
                self._drain_threads()
            if self.lease.expire(time.monotonic()):
                self._start_self_fence()
            if time.monotonic() >= next_beat:
                self._heartbeat()
                next_beat = time.monotonic() + self.heartbeat_interval_s
        if self.running:
            log.warning("leaving with %d job(s) unfinished; their leases will expire", len(self.running))
        self.sock.send_multipart(p.encode(p.Bye(worker_id=self.worker_id)))
        self.watchdog.close()  # a clean stop: the magic close, the host is not reset
        self.resync_stop.set()
        self.events.stop()
        resync.join(timeout=5)
        self.threads.stop()
        self.sock.close(linger=0)
        self.inproc.close(linger=0)
        # The mailboxes' eventfds stay open until the process exits: a job thread still in a
        # libvirt call may finish after this, and must not write to a reused descriptor.

    def _heartbeat(self, guests: list[dict] | None = None) -> None:
        send_frames(self.sock, self._heartbeat_frames(guests))

    def _heartbeat_frames(self, guests: list[dict] | None = None) -> list[bytes]:
        self.beat_seq += 1
        lease_ids = [j.lease_id for j in self.renewable()]
        if self.self_fenced and self.self_fenced_seq is None:
            self.self_fenced_seq = self.beat_seq
        self.lease.sent(self.beat_seq, time.monotonic())
        return p.encode(p.Heartbeat(worker_id=self.worker_id, lease_ids=lease_ids, guests=guests, seq=self.beat_seq,
                                    self_fenced=list(self.self_fenced), armed=self._armed()))

    def _armed(self) -> bool:
        """What the broker hears as `armed`: this worker self-fences, and if it has a watchdog,
        the watchdog is open and petted (one it could not open vouches for nothing)."""
        return self.lease.armed and (not self.config.watchdog_device or self.watchdog.petting)

    def _resync_loop(self) -> None:
        """Lists the host's guests every resync_interval_s in a thread of its own: a slow or
        restarting libvirtd must never delay the main thread's heartbeats (leases would expire)."""
        while not self.resync_stop.wait(self.config.resync_interval_s):
            try:
                self.hv.ensure_alive()
                guests = self.hv.guests()
            except (libvirt.libvirtError, DriverError) as e:
                log.warning("cannot list guests for resync: %s", e)
                continue
            self.notices.put(GuestList(guests))

    @property
    def sock(self) -> zmq.Socket:
        """The DEALER to the (leading) broker."""
        return self.link.sock

    def _rejoin(self, why: str, leader_url: str | None = None) -> None:
        """After a move to another broker (BrokerLink): watch its socket and register there."""
        self.link.move_polled(self.poller, leader_url)
        log.info("%s: now talking to %s", why, self.link.url)
        self.hello()
        for frames_out in p.batch_frames(list(self.unacked.values())):
            send_frames(self.sock, frames_out)

    def _drain_broker(self) -> None:
        for msg in drain(self.sock, p.WORKER_VERSION, log):
            if isinstance(msg, p.NotLeader):
                # A standby: go to the leader it names, or to the next broker of the list.
                self._rejoin("the broker stands by", msg.leader_url or None)
                return
            if isinstance(msg, p.JobAssignment):
                self._start_job(msg)
            elif isinstance(msg, p.ResultAck):
                self.unacked.pop(msg.job_id, None)
                if not msg.accepted:
                    log.warning("broker refused the result of job %d: %s", msg.job_id, msg.reason)
            elif isinstance(msg, p.Renewed):
                self._renewed(msg)
            elif isinstance(msg, p.LabelReply):
                identity = self.label_threads.pop(msg.label_id, None)
                if identity is not None:
                    send_frames(self.inproc, [identity, *p.encode(msg)])
            elif isinstance(msg, p.Strays):
                log.warning("the broker names %d stray guest(s) on this host: destroying them", len(msg.uuids))
                threading.Thread(target=self._destroy_strays, args=(msg.uuids,), name="strays", daemon=True).start()
            elif isinstance(msg, p.Reregister):
                # The broker restarted: say hello with the leases we still work under, and
                # send again every result it may not have committed.
                log.info("broker asks us to register again (it restarted)")
                self.hello()
                for frames_out in p.batch_frames(list(self.unacked.values())):
                    send_frames(self.sock, frames_out)
            elif isinstance(msg, p.Welcome):
                self.heartbeat_interval_s = msg.heartbeat_interval_s
            elif isinstance(msg, p.Shutdown):
                log.info("broker is stopping; will reconnect when it is back")

    def _renewed(self, msg: p.Renewed) -> None:
        held = self.lease.renew(msg.seq, msg.armed, msg.self_fence_s, time.monotonic())
        self.watchdog.renewed(self.lease.armed, held)
        first = self.self_fenced_seq
        if (first is not None and msg.seq >= first) or (msg.seq == 0 and self.self_fenced_in_hello):
            # A beat (or hello) that carried them was renewed: the broker has read them. (A
            # renewed of an older hello may pass for the one that carried them; the broker reads
            # that one next all the same, unless the connection breaks in between.)
            log.info("the broker has heard of the %d guest(s) destroyed by self-fencing", len(self.self_fenced))
            self.self_fenced = []
            self.self_fenced_seq = None
            self.self_fenced_in_hello = False

    def _start_job(self, job: p.JobAssignment) -> None:
        if job.job_id in self.running:
            return
        self.running[job.job_id] = job
        if job.deadline_s is not None:
            self.deadlines[job.job_id] = time.monotonic() + job.deadline_s
        log.debug("job %d: %s %s (epoch %d)", job.job_id, job.op, job.domain_name, job.epoch)
        self.threads.submit(job)

    def _drain_threads(self) -> None:
        """Forward what the other threads sent: every finished job in the mailbox, every
        notice, and every label request waiting on the inproc socket go to the broker in one
        batch, in that order."""
        out: list[list[bytes]] = []
        for job, result, frames, elapsed_s in self.mailbox.take():
            self.running.pop(job.job_id, None)
            self.deadlines.pop(job.job_id, None)
            self.unacked[job.job_id] = frames
            out.append(frames)
            if result.ok and job.op == "start" and not self.lease.armed and domxml.is_ha(job.xml):
                # Self-fencing counts from now, not from the broker's next `renewed`.
                self.lease.arm(time.monotonic())
            # A failure is news; a success is in the broker's job records and events, and a
            # line for each would cost more than the job itself at bulk rates.
            log.log(
                logging.DEBUG if result.ok else logging.WARNING,
                "job %d: %s %s %s in %.2f s%s",
                job.job_id,
                job.op,
                job.domain_name,
                "succeeded" if result.ok else "failed",
                elapsed_s,
                f": {result.error}" if result.error else "",
            )
        for notice in self.notices.take():
            if isinstance(notice, GuestList):
                out.append(self._heartbeat_frames(guests=notice.guests))
            elif isinstance(notice, SelfFenced):
                # The next heartbeat says so: the broker restarts the HA ones elsewhere.
                self.self_fenced += [u for u in notice.uuids if u not in self.self_fenced]
                self.self_fenced_seq = None  # no beat has carried the new ones yet
                self.self_fenced_in_hello = False
            else:
                out.append(p.encode(notice))
        while True:
            try:
                identity, tag, *rest = self.inproc.recv_multipart(_NOBLOCK)
            except zmq.Again:
                break
            if tag == b"label":
                self.label_threads[rest[0].decode()] = identity
                out.append(rest[1:])
        for frames in p.batch_frames(out):
            send_frames(self.sock, frames)

    # -- the events thread
    def _on_guest_events(self, happened: list[events.Happened]) -> None:
        """Lifecycle events: a guest-event for the broker per guest, with its state as read now.

        The event only says that something happened; the state sent is what libvirt says
        after it, read at `at` (CLOCK_MONOTONIC, as a result's done_at): an event that comes
        late never carries an old state, and the broker drops one read before the result of
        a job that ended later. A guest with several events waiting is read once, under its
        last event. A QEMU guest on its way up (PAUSED/STARTING_UP) reads as running.
        """
        last: dict[str, tuple[libvirt.virDomain, str, str]] = {}
        for dom, event, detail in happened:
            meaning = events.guest_event(event, detail)
            if meaning is not None:
                last[dom.UUIDString()] = (dom, *meaning)
        for uuid, (dom, name, reason) in last.items():
            at = time.monotonic()
            try:
                state = state_name(*dom.state())
            except libvirt.libvirtError as e:
                if e.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                    # The connection is going: the guest list sent after registering again says it.
                    log.warning("cannot read the state of %s after its %s event: %s", uuid, name, e)
                    continue
                state = "shutoff"  # a transient guest that stopped is gone
            self.notices.put(p.GuestEvent(worker_id=self.worker_id, uuid=uuid, state=state, event=name,
                                          reason=reason, at=at))

    def _after_reregistering(self, conn: libvirt.virConnect) -> None:
        """Registered for events again on a new connection (the events thread): events of the
        time without one are lost, so the broker gets the host's full guest list at once."""
        self.notices.put(GuestList(list_guests(conn)))

    # -- self-fence and strays, each in a thread of its own
    def _start_self_fence(self) -> None:
        log.warning(
            "SELF-FENCE: no renewal of the host lease for %.1f s (self_fence_s %g) while this host runs HA "
            "guests: destroying every guest virtbroker placed here",
            self.lease.silent_s(time.monotonic()), self.lease.self_fence_s,
        )
        threading.Thread(target=self._self_fence, name="self-fence", daemon=True).start()

    def _self_fence(self) -> None:
        """Destroy every guest virtbroker placed on this host, labels left as they are (the
        broker may restart them elsewhere, on shared storage, relabelled by that host)."""
        for attempt in range(1, SELF_FENCE_TRIES + 1):
            try:
                self.hv.ensure_alive()
                doms = fencing.placed_guests(self.hv.connection())
                break
            except (libvirt.libvirtError, DriverError) as e:
                log.error("SELF-FENCE: cannot list this host's guests (try %d of %d): %s", attempt, SELF_FENCE_TRIES, e)
                self.hv.suspect()
                if attempt == SELF_FENCE_TRIES:
                    return  # a watchdog, if there is one, is what stops them now
                time.sleep(SELF_FENCE_RETRY_S)
        destroyed, failed = fencing.destroy_all(doms, "self-fence")
        if failed:
            log.error("SELF-FENCE: %d guest(s) could not be destroyed and may still run", len(failed))
        self.notices.put(SelfFenced(destroyed))

    def _destroy_strays(self, uuids: list[str]) -> None:
        """Destroy the guests a `strays` names (their domains were fenced while this host was
        away), labels left as they are; then answer strays-done."""
        gone: list[str] = []
        doms: list[libvirt.virDomain] = []
        failed: list[dict] = []
        for uuid in uuids:
            try:
                dom = self.hv.lookup(uuid)
            except (libvirt.libvirtError, DriverError) as e:
                failed.append({"uuid": uuid, "error": str(e)})
                continue
            if dom is None:
                gone.append(uuid)  # not on this host (any more): nothing to destroy
            else:
                doms.append(dom)
        destroyed, not_destroyed = fencing.destroy_all(doms, "stray")
        self.notices.put(
            p.StraysDone(worker_id=self.worker_id, destroyed=gone + destroyed, failed=failed + not_destroyed)
        )

    # -- job threads
    def _thread_socket(self) -> zmq.Socket:
        sock = getattr(self._local, "sock", None)
        if sock is None:
            sock = self.context.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(INPROC_URL + "-" + self.worker_id)
            self._local.sock = sock
        return sock

    def _in_thread(self, job: p.JobAssignment) -> None:
        started = time.monotonic()
        result = JobRunner(self, self._thread_socket()).run(job)
        self.mailbox.put((job, result, p.encode(result), time.monotonic() - started))


def run_worker(config: Config, worker_id: str | None = None) -> int:
    context = zmq.Context()
    worker = LifecycleWorker(config, context, worker_id)

    return run_until_signalled(worker, context)


__all__ = ["LifecycleWorker", "run_worker", "Hypervisor", "host_id_for"]
