"""libvirt's domain lifecycle events for a lifecycle worker: the process's event loop, an events
connection registered again after every libvirtd restart, and which events change a guest's state."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable

import libvirt

from virtbroker.common.errors import DriverError

log = logging.getLogger("virtbroker.worker")

# Keepalive on the events connection: a probe every 5 s, the connection closed after 3 go
# unanswered. A libvirtd that exits closes the socket and is noticed at once; one that hangs
# is noticed this way, within about 20 s.
KEEPALIVE_INTERVAL_S = 5
KEEPALIVE_COUNT = 3
RECONNECT_FIRST_S = 0.1
RECONNECT_MAX_S = 5.0
LOOP_ERROR_PAUSE_S = 0.1

# Each lifecycle event: its name, and whether it changes the guest's state (started,
# suspended, resumed, stopped, pmsuspended and crashed do). SHUTDOWN says a guest is on its way
# out, STOPPED follows once QEMU has gone; definitions are the broker's business.
LIFECYCLE_EVENTS: dict[int, tuple[str, bool]] = {
    libvirt.VIR_DOMAIN_EVENT_DEFINED: ("defined", False),
    libvirt.VIR_DOMAIN_EVENT_UNDEFINED: ("undefined", False),
    libvirt.VIR_DOMAIN_EVENT_STARTED: ("started", True),
    libvirt.VIR_DOMAIN_EVENT_SUSPENDED: ("suspended", True),
    libvirt.VIR_DOMAIN_EVENT_RESUMED: ("resumed", True),
    libvirt.VIR_DOMAIN_EVENT_STOPPED: ("stopped", True),
    libvirt.VIR_DOMAIN_EVENT_SHUTDOWN: ("shutdown", False),
    libvirt.VIR_DOMAIN_EVENT_PMSUSPENDED: ("pmsuspended", True),
    libvirt.VIR_DOMAIN_EVENT_CRASHED: ("crashed", True),
}


def _detail_names(event_name: str) -> dict[int, str]:
    """libvirt's names of one event's details (VIR_DOMAIN_EVENT_STOPPED_DESTROYED -> "destroyed"),
    read from the binding: each libvirt release may add some."""
    prefix = f"VIR_DOMAIN_EVENT_{event_name.upper()}_"
    return {
        getattr(libvirt, name): name[len(prefix):].lower()
        for name in dir(libvirt)
        if name.startswith(prefix) and not name.endswith("_LAST")
    }


_DETAILS = {event: _detail_names(name) for event, (name, _) in LIFECYCLE_EVENTS.items()}


def guest_event(event: int, detail: int) -> tuple[str, str] | None:
    """A lifecycle event as (event name, reason: its detail's name), or None for one that does
    not change the guest's state (defined, undefined, shutdown, unknown)."""
    known = LIFECYCLE_EVENTS.get(event)
    if known is None or not known[1]:
        return None
    return known[0], _DETAILS[event].get(detail, f"detail {detail}")


# libvirt keeps one event implementation per process (virEventRegisterImpl), and a connection
# has its socket watched, keepalive and events delivered only if one was registered before it
# was opened. So the loop is the process's, started once, like the implementation it runs:
# this guard mirrors libvirt's own process-wide state.
_loop_lock = threading.Lock()
_loop_thread: threading.Thread | None = None


def start_event_loop() -> None:
    """Register libvirt's default event implementation and run it in a daemon thread, once
    per process. Call it before opening any connection whose events or close the process needs."""
    global _loop_thread
    with _loop_lock:
        if _loop_thread is not None and _loop_thread.is_alive():
            return
        try:
            libvirt.virEventRegisterDefaultImpl()
        except libvirt.libvirtError as e:
            raise DriverError(f"cannot register libvirt's event loop: {e.get_error_message()}") from e
        _loop_thread = threading.Thread(target=_run_event_loop, name="libvirt-events", daemon=True)
        _loop_thread.start()


def _run_event_loop() -> None:
    """libvirt's event loop: callbacks of every connection of the process run in this thread."""
    while True:
        try:
            libvirt.virEventRunDefaultImpl()
        except libvirt.libvirtError as e:
            log.error("libvirt's event loop failed: %s", e.get_error_message())
            time.sleep(LOOP_ERROR_PAUSE_S)


_CLOSE_REASONS = {
    libvirt.VIR_CONNECT_CLOSE_REASON_ERROR: "an error",
    libvirt.VIR_CONNECT_CLOSE_REASON_EOF: "end of file",
    libvirt.VIR_CONNECT_CLOSE_REASON_KEEPALIVE: "no keepalive answer",
    libvirt.VIR_CONNECT_CLOSE_REASON_CLIENT: "the client",
}


Happened = tuple[libvirt.virDomain, int, int]  # a lifecycle event: (domain, event, detail)


class EventWatch:
    """A connection to `uri` that hears every guest's lifecycle events, opened again with
    back-off whenever it closes.

    libvirtd forgets its clients' event registrations when it restarts, and a closed
    connection stays closed: a client that does not register again on a new connection
    hears no event again (kubevirt/kubevirt#194). After each new registration, the host's
    guests are listed through the new connection and handed to on_resync: an event of the
    time without a connection is lost, the list says where each guest ended.

    libvirt's event-loop thread (start_event_loop) only queues each event; the watch's own
    thread ("events") hands them to on_events, a batch at a time, and may call libvirt
    there (the connection is free then: no call of the loop thread waits on it). That
    thread also opens, lists and closes the connection, so a libvirtd that hangs holds it
    alone.
    """

    def __init__(
        self,
        uri: str,
        on_events: Callable[[list[Happened]], None],
        on_resync: Callable[[libvirt.virConnect], None],
    ):
        self.uri = uri
        self.on_events = on_events
        self.on_resync = on_resync
        self.registrations = 0  # connections registered so far (the first, then one per reconnect)
        self._conn: libvirt.virConnect | None = None
        self._callback_id: int | None = None
        # Events from the loop thread; None wakes the watch's thread (closed, or stop()).
        self._inbox: queue.SimpleQueue[Happened | None] = queue.SimpleQueue()
        self._closed = False
        self._close_reason: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def open(self) -> None:
        """The first registration, in the caller's thread: DriverError if libvirtd cannot be reached."""
        self._register()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="events", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        self._inbox.put(None)
        if self._thread is None:
            self._drop()
        else:
            self._thread.join(timeout_s)  # one stuck opening a hung libvirtd is a daemon

    def reconnect(self) -> None:
        """Close the connection and register again, as after a libvirtd restart."""
        self._closed_by(libvirt.VIR_CONNECT_CLOSE_REASON_CLIENT)

    def _register(self) -> libvirt.virConnect:
        try:
            conn = libvirt.open(self.uri)
        except libvirt.libvirtError as e:
            raise DriverError(f"cannot connect to {self.uri} for events: {e.get_error_message()}") from e
        try:
            try:
                conn.setKeepAlive(KEEPALIVE_INTERVAL_S, KEEPALIVE_COUNT)
            except libvirt.libvirtError as e:
                if e.get_error_code() != libvirt.VIR_ERR_NO_SUPPORT:
                    raise
                # test:/// lives in this process: there is no daemon to lose.
            self._closed = False
            self._close_reason = None
            conn.registerCloseCallback(self._on_close, None)
            self._callback_id = conn.domainEventRegisterAny(
                None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._on_event, None
            )
        except libvirt.libvirtError as e:
            _quietly(conn.close)
            raise DriverError(f"cannot register for {self.uri}'s events: {e.get_error_message()}") from e
        self._conn = conn
        self.registrations += 1
        if not conn.isAlive():
            self._closed_by(libvirt.VIR_CONNECT_CLOSE_REASON_EOF)  # before its close callback was there
        return conn

    def _run(self) -> None:
        while True:
            batch = [self._inbox.get()]
            while True:
                try:
                    batch.append(self._inbox.get_nowait())
                except queue.Empty:
                    break
            if self._stop.is_set():
                break
            if self._closed:
                reason = _CLOSE_REASONS.get(self._close_reason or 0, "an unknown reason")
                log.warning("the events connection to %s closed (%s); registering again", self.uri, reason)
                self._drop()
                if not self._register_again():
                    break
                continue  # the old connection's events: the guest list just sent says where they ended
            happened = [item for item in batch if item is not None]
            if happened:
                try:
                    self.on_events(happened)
                except Exception:
                    log.exception("handling lifecycle events failed")
        self._drop()

    def _register_again(self) -> bool:
        """Open, register and list the guests until it works (or stop()); False if stopped."""
        delay_s = RECONNECT_FIRST_S
        while not self._stop.is_set():
            try:
                self.on_resync(self._register())
                log.info("registered again for %s's events (registration %d)", self.uri, self.registrations)
                return True
            except (DriverError, libvirt.libvirtError) as e:
                log.warning("events of %s: %s; next try in %.1f s", self.uri, e, delay_s)
                self._drop()
                self._stop.wait(delay_s)
                delay_s = min(delay_s * 2, RECONNECT_MAX_S)
        return False

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        if self._callback_id is not None:
            _quietly(conn.domainEventDeregisterAny, self._callback_id)
            self._callback_id = None
        _quietly(conn.unregisterCloseCallback)
        _quietly(conn.close)

    def _closed_by(self, reason: int) -> None:
        self._close_reason = reason
        self._closed = True
        self._inbox.put(None)

    # -- in libvirt's event-loop thread: queue and return, never call libvirt here
    def _on_event(self, _conn, dom: libvirt.virDomain, event: int, detail: int, _opaque) -> None:
        self._inbox.put((dom, event, detail))

    def _on_close(self, _conn, reason: int, _opaque) -> None:
        self._closed_by(reason)


def _quietly(call, *args) -> None:
    """Undo on a connection that may be dead already: its errors say nothing new."""
    try:
        call(*args)
    except libvirt.libvirtError:
        pass
