"""Self-fencing of a lifecycle worker's host: its host lease as the worker sees it, the watchdog
it pets while armed, and destroying the guests virtbroker placed (docs/RELIABILITY.md)."""

from __future__ import annotations

import collections
import logging
import os
import threading

import libvirt

from virtbroker.common import domxml

log = logging.getLogger("virtbroker.worker")

# Heartbeats whose renewal has not come yet, kept at most: a broker away for an hour leaves
# thousands unanswered, and only a renewal of a recent one could matter then.
MAX_UNANSWERED_BEATS = 1000


class HostLease:
    """The host lease, as this worker sees it. Pure: the clock is passed in.

    Each heartbeat carries a seq, which the broker echoes in `renewed`; a hello counts as seq
    0. The lease was last renewed when the newest echoed beat was *sent*, not when its answer
    came: an answer that took long proves only that the broker heard the beat, and the broker
    counts a host alive from what it heard. Renewed tells whether the host is armed (it runs
    HA guests) and after how long without a renewal the worker self-fences.

    States: HELD (renewed within self_fence_s, or not armed) -> EXPIRED (armed, no renewal for
    self_fence_s: self-fence, once) -> HELD (a renewal of a beat sent within self_fence_s).
    """

    def __init__(self) -> None:
        self._beats: dict[int, float] = {}  # seq -> monotonic time sent, oldest first
        # Send times of hellos not answered yet (there are few: one per rejoin).
        self._hellos: collections.deque[float] = collections.deque(maxlen=MAX_UNANSWERED_BEATS)
        self.renewed_at: float | None = None
        self.armed = False
        self.self_fence_s = 0.0
        self.fenced = False  # this outage's self-fence has begun
        self._armed_here_at: float | None = None  # arm(): when this worker armed itself

    def sent(self, seq: int, now: float) -> None:
        """A heartbeat (seq > 0) or a hello (seq 0) went to the broker at `now`."""
        if seq == 0:
            self._hellos.append(now)
            return
        self._beats[seq] = now
        if len(self._beats) > MAX_UNANSWERED_BEATS:
            del self._beats[next(iter(self._beats))]

    def arm(self, now: float) -> None:
        """This worker started an HA guest: armed from now. The broker arms the host too, in
        its answer to a later beat; until then a host cut off would not self-fence."""
        self.armed = True
        self._armed_here_at = now

    def renew(self, seq: int, armed: bool, self_fence_s: float, now: float) -> bool:
        """The broker's `renewed`. True if the lease is held after it: the beat it answers
        was known and, if armed, sent less than self_fence_s ago (pet the watchdog then)."""
        self.self_fence_s = self_fence_s
        sent_at = self._answered(seq)
        if self._armed_here_at is None:
            self.armed = armed
        elif armed or (sent_at is not None and sent_at > self._armed_here_at):
            # The broker's word on a beat sent after this worker armed itself: it knew of
            # the HA guest then, and its word holds from here on.
            self.armed, self._armed_here_at = armed, None
        if sent_at is None:
            return False  # a beat this worker no longer waits for
        if self.renewed_at is None or sent_at > self.renewed_at:
            self.renewed_at = sent_at
        if self._expired(now):
            return False
        self.fenced = False  # EXPIRED -> HELD (renewed again)
        return True

    def _answered(self, seq: int) -> float | None:
        """When the beat (or hello, seq 0) a `renewed` answers was sent; None if unknown."""
        if seq == 0:
            # Hellos are answered in the order they were sent, on one connection.
            sent_at = self._hellos.popleft() if self._hellos else None
        else:
            sent_at = self._beats.pop(seq, None)
            # The broker answers beats in order: an older one still waiting was never heard.
            for older in [s for s in self._beats if s < seq]:
                del self._beats[older]
            while sent_at is not None and self._hellos and self._hellos[0] < sent_at:
                self._hellos.popleft()
        return sent_at

    def expire(self, now: float) -> bool:
        """True once per outage, when the lease runs out while armed: the caller self-fences."""
        if self.fenced or not self._expired(now):
            return False
        self.fenced = True  # HELD -> EXPIRED (no renewal for self_fence_s while armed)
        return True

    def silent_s(self, now: float) -> float:
        """Seconds since the lease was last renewed (0 before the first renewal)."""
        return 0.0 if self.renewed_at is None else now - self.renewed_at

    def _expired(self, now: float) -> bool:
        return (
            self.armed
            and self.self_fence_s > 0
            and self.renewed_at is not None
            and now - self.renewed_at >= self.self_fence_s
        )


class Watchdog:
    """A watchdog device, petted only while armed and only after a renewal (Proxmox's scheme).

    Opened (O_WRONLY) at the first renewal while armed, one byte written after each renewal
    that leaves the host lease held; never on a timer. A worker whose heartbeats go
    unanswered, or whose main thread hangs, stops petting and the device resets the host.
    Disarmed (no HA guest left) or at a clean stop it writes the magic close "V" first, so
    the driver stops its timer instead of resetting the host. An empty path: no watchdog.
    """

    PET = b"\0"  # any byte but the magic close
    MAGIC_CLOSE = b"V"

    def __init__(self, path: str):
        self.path = path
        self._fd: int | None = None
        self._open_failed = False  # logged once, until an open works again

    def renewed(self, armed: bool, held: bool) -> None:
        """After each `renewed`: pet while armed and held, close cleanly once disarmed."""
        if not self.path:
            return
        if not armed:
            self.close()
        elif held:
            self._pet()

    def _pet(self) -> None:
        if self._fd is None:
            try:
                self._fd = os.open(self.path, os.O_WRONLY | os.O_CLOEXEC)
            except OSError as e:
                if not self._open_failed:
                    log.error("cannot open the watchdog %s: %s", self.path, e)
                    self._open_failed = True
                return
            self._open_failed = False
            log.info("watchdog %s armed", self.path)
        try:
            os.write(self._fd, self.PET)
        except OSError as e:
            log.error("cannot pet the watchdog %s: %s", self.path, e)

    @property
    def petting(self) -> bool:
        """The device is open and petted: a silence of this worker now resets the host."""
        return self._fd is not None

    def close(self) -> None:
        """The magic close, then close: the device stops its timer."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            os.write(fd, self.MAGIC_CLOSE)
        except OSError as e:
            log.error("cannot disarm the watchdog %s: %s", self.path, e)
        os.close(fd)
        log.info("watchdog %s disarmed", self.path)


def placed_guests(conn: libvirt.virConnect) -> list[libvirt.virDomain]:
    """The running guests whose definition carries virtbroker's metadata element: those a
    lifecycle worker started (JobRunner.op_start marks each)."""
    out = []
    for dom in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE):
        try:
            dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, domxml.METADATA_NS)
        except libvirt.libvirtError:
            continue  # no element (VIR_ERR_NO_DOMAIN_METADATA): not virtbroker's; or gone meanwhile
        out.append(dom)
    return out


def destroy_all(doms: list[libvirt.virDomain], why: str) -> tuple[list[str], list[dict]]:
    """Destroy every domain at once (a thread each: QEMU may take seconds to go), leaving their
    security labels alone: the guest may run elsewhere by now, relabelled by that host.

    Returns the UUIDs no longer running (destroyed, or gone already) and [{uuid, error}]
    for the others. Logs a WARNING line per guest destroyed.
    """
    outcomes: list[tuple[str, str | None]] = [("", None)] * len(doms)

    def destroy(i: int, dom: libvirt.virDomain) -> None:
        uuid, name = dom.UUIDString(), dom.name()
        try:
            dom.destroy()
            log.warning("%s: destroyed %s (%s)", why, name, uuid)
            outcomes[i] = (uuid, None)
        except libvirt.libvirtError as e:
            if e.get_error_code() in (libvirt.VIR_ERR_NO_DOMAIN, libvirt.VIR_ERR_OPERATION_INVALID):
                outcomes[i] = (uuid, None)  # it stopped meanwhile
            else:
                log.error("%s: cannot destroy %s (%s): %s", why, name, uuid, e.get_error_message())
                outcomes[i] = (uuid, e.get_error_message() or "destroy failed")

    threads = [threading.Thread(target=destroy, args=(i, d), name="destroy", daemon=True) for i, d in enumerate(doms)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    destroyed = [uuid for uuid, error in outcomes if error is None]
    failed = [{"uuid": uuid, "error": error} for uuid, error in outcomes if error is not None]
    return destroyed, failed
