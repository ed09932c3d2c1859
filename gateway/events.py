"""libvirt lifecycle events from virtbroker's own `domain` and `job` events: a pure translator,
and the thread that feeds it from the broker's events endpoint."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

import zmq

from virtbroker.client.api import Client
from virtbroker.common import protocol as p
from virtbroker.common.errors import UnavailableError
from virtbroker.gateway import rpc

log = logging.getLogger("virtbroker.gateway")


@dataclass(frozen=True)
class Lifecycle:
    """One libvirt event to send: event id LIFECYCLE (event, detail) or REBOOT."""

    event_id: int
    uuid: str
    name: str
    state: str  # the domain's state after the change, for its numeric id
    event: int = 0
    detail: int = 0


class LifecycleTranslator:
    """Turns virtbroker's events into libvirt's. Keeps each domain's last known name and state
    (from a `list --all` and the events since) and the op of its last job that ran, which
    says whether a stop was a destroy or a shutdown.

    is_transient(uuid): transient guests get no DEFINED or UNDEFINED events, as in libvirt.
    """

    def __init__(self, is_transient: Callable[[str], bool] = lambda uuid: False):
        self.is_transient = is_transient
        self.domains: dict[str, tuple[str, str]] = {}  # uuid -> (name, state)
        self.last_op: dict[str, str] = {}

    def seed(self, listing: list[dict]) -> None:
        self.domains = {d["uuid"]: (d["name"], d["state"]) for d in listing}

    def on_job(self, ev: p.JobEvent) -> list[Lifecycle]:
        if ev.state == "running":
            self.last_op[ev.uuid] = ev.op
        if ev.op == "reboot" and ev.state == "succeeded":
            name, state = self.domains.get(ev.uuid, ("", "running"))
            return [Lifecycle(rpc.EVENT_ID_REBOOT, ev.uuid, name, state)]
        return []

    def on_domain(self, ev: p.DomainEvent) -> list[Lifecycle]:
        known = self.domains.get(ev.uuid)
        if ev.event == "undefined":
            self.domains.pop(ev.uuid, None)
            self.last_op.pop(ev.uuid, None)
            if self.is_transient(ev.uuid):
                return []
            return [self._lc(ev.uuid, ev.name, "shutoff", rpc.EV_UNDEFINED, rpc.DETAIL_UNDEFINED_REMOVED)]
        self.domains[ev.uuid] = (ev.name, ev.state)
        out = []
        if ev.event == "defined" and not self.is_transient(ev.uuid):
            detail = rpc.DETAIL_DEFINED_UPDATED if known else rpc.DETAIL_DEFINED_ADDED
            out.append(self._lc(ev.uuid, ev.name, ev.state, rpc.EV_DEFINED, detail))
        before = known[1] if known else "shutoff"
        return out + self._transition(ev.uuid, ev.name, before, ev.state)

    def resync(self, listing: list[dict]) -> list[Lifecycle]:
        """After a gap in the event sequence: the differences between what was known and now."""
        out: list[Lifecycle] = []
        now = {d["uuid"]: (d["name"], d["state"]) for d in listing}
        for uuid, (name, _state) in self.domains.items():
            if uuid not in now and not self.is_transient(uuid):
                out.append(self._lc(uuid, name, "shutoff", rpc.EV_UNDEFINED, rpc.DETAIL_UNDEFINED_REMOVED))
        for uuid, (name, state) in now.items():
            known = self.domains.get(uuid)
            if known is None and not self.is_transient(uuid):
                out.append(self._lc(uuid, name, state, rpc.EV_DEFINED, rpc.DETAIL_DEFINED_ADDED))
            out += self._transition(uuid, name, known[1] if known else "shutoff", state)
        self.domains = now
        return out

    def _transition(self, uuid: str, name: str, before: str, after: str) -> list[Lifecycle]:
        if before == after:
            return []
        if after == "shutoff":
            # A stop by a destroy job is DESTROYED; a shutdown job's, or one seen from outside
            # (the guest powered off), is SHUTDOWN.
            detail = (
                rpc.DETAIL_STOPPED_DESTROYED if self.last_op.get(uuid) == "destroy" else rpc.DETAIL_STOPPED_SHUTDOWN
            )
            return [self._lc(uuid, name, after, rpc.EV_STOPPED, detail)]
        out = []
        if before == "shutoff":
            out.append(self._lc(uuid, name, "running", rpc.EV_STARTED, rpc.DETAIL_STARTED_BOOTED))
            before = "running"
        if before == "running" and after == "paused":
            out.append(self._lc(uuid, name, after, rpc.EV_SUSPENDED, rpc.DETAIL_SUSPENDED_PAUSED))
        elif before == "paused" and after == "running":
            out.append(self._lc(uuid, name, after, rpc.EV_RESUMED, rpc.DETAIL_RESUMED_UNPAUSED))
        return out

    @staticmethod
    def _lc(uuid: str, name: str, state: str, event: int, detail: int) -> Lifecycle:
        return Lifecycle(rpc.EVENT_ID_LIFECYCLE, uuid, name, state, event, detail)


class EventFeed(threading.Thread):
    """Subscribes to the broker's events endpoint, translates, and hands each libvirt event to
    `deliver` (which must be thread-safe: the server passes it to its loop). `on_stopped(uuid)`
    is called when a transient guest stops."""

    def __init__(self, local_url: str, translator: LifecycleTranslator, deliver, on_stopped):
        super().__init__(name="gateway-events", daemon=True)
        self.local_url = local_url
        self.translator = translator
        self.deliver = deliver
        self.on_stopped = on_stopped
        self.stopping = threading.Event()
        self.subscribed = threading.Event()  # set once the registry is read and events follow it
        self.seeded = False

    def run(self) -> None:
        context = zmq.Context()
        try:
            with Client(self.local_url, timeout_s=10.0, context=context) as client:
                while not self.stopping.is_set():
                    try:
                        self._follow(client)
                    except Exception as e:  # the broker went away, or its history ran out
                        log.warning("event feed: %s; reading the registry again", e)
                        self.stopping.wait(1.0)
        finally:
            context.destroy(linger=0)

    def _follow(self, client: Client) -> None:
        """The registry, then every event after it, none missed: ping and list in one batch
        are answered in one turn of the broker's loop, so the listing reflects every event
        up to ping's event_seq and none after; Client.events(since=) then replays the kept
        events after that seq before the live ones, and fills any gap in them from the
        history (a subscription the broker had not read yet, a dropped message)."""
        status, listing = client.call_many([p.Ping(request_id=0), p.ListDomains(request_id=0, all=True)])
        for reply in (status, listing):
            if isinstance(reply, Exception):
                raise reply
        if status.get("event_seq") is None:
            raise UnavailableError("the broker does not lead (no event_seq in its ping)")
        if self.seeded:
            # Following again (the broker restarted, or its history no longer reached back):
            # what changed meanwhile, as events.
            self._emit(self.translator.resync(listing))
        else:
            self.translator.seed(listing)
            self.seeded = True
        self.subscribed.set()
        for ev in client.events(since=status["event_seq"], stop=self.stopping):
            if isinstance(ev, p.JobEvent):
                self._emit(self.translator.on_job(ev))
            elif isinstance(ev, p.DomainEvent):
                self._emit(self.translator.on_domain(ev))
            # host events have no libvirt counterpart

    def _emit(self, events: list[Lifecycle]) -> None:
        for lc in events:
            self.deliver(lc)
            if lc.event_id == rpc.EVENT_ID_LIFECYCLE and lc.event == rpc.EV_STOPPED:
                self.on_stopped(lc.uuid)
