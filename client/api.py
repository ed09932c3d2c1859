"""Python client for the broker's client endpoint: one DEALER socket per Client, or one
connection to the local endpoint for a unix:// URL (common/stream.py)."""

from __future__ import annotations

import itertools
import os
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

import zmq

from virtbroker.common import protocol as p
from virtbroker.common.config import default_client_url, url_list
from virtbroker.common.curve import use_as_client
from virtbroker.common.errors import (
    NotLeaderError,
    TimeoutError_,
    UnavailableError,
    VirtbrokerError,
    error_from_code,
)
from virtbroker.common.stream import StreamSocket, is_stream_url

Records = list[dict]  # (named here: inside Client, `list` is the method)
# How often Client.events(since=) reads the history again until the first live event shows
# that the broker has its subscription.
REPLAY_POLL_S = 0.5
EVENT_KINDS = {"domain": p.DomainEvent, "job": p.JobEvent, "host": p.HostEvent}
EVENTS_PAGE = 1000  # events replayed per request
FAILOVER_PAUSE_S = 0.2  # between tries of the next broker while none answers or leads
# With several brokers, how long one may take to answer before the next is tried (a leader
# that died answers nothing; a standby answers at once).
FAILOVER_ATTEMPT_S = 3.0


def _error(reply: p.Error) -> VirtbrokerError:
    """The typed error a reply carries; not-leader keeps the leader it names."""
    if reply.code == "not-leader":
        return NotLeaderError(reply.message, reply.leader)
    return error_from_code(reply.code, reply.message)


class Client:
    """A connection to one broker. Not thread-safe: use one Client per thread.

    >>> with Client() as c:  # the local endpoint: unix://STATE_DIR/local.sock
    ...     c.define(open("guest.xml").read())
    ...     job = c.submit("guest", "start")
    ...     c.wait([job["job_id"]])

    From another host: Client("tcp://broker.example:5640", server_key=..., secret_key=...).
    """

    def __init__(
        self,
        url: str | None = None,
        timeout_s: float = 30.0,
        context: zmq.Context | None = None,
        server_key: str | None = None,
        secret_key: str | None = None,
    ):
        """url: the client endpoint (ipc://, tcp://) or the local endpoint (unix://PATH, on the
        broker's host), or several, comma-separated: brokers sharing an etcd store, of which
        the client follows the leader (a standby's not-leader answer names it; a broker that
        does not answer is passed over for the next). server_key and secret_key (files, see
        `virtbroker keygen`) turn on CURVE over ZeroMQ; they default to $VIRTBROKER_SERVER_KEY
        and $VIRTBROKER_CLIENT_KEY. The local endpoint has no CURVE: its socket file's
        permissions decide who connects."""
        self.urls = url_list(url or default_client_url())
        self.url = self.urls[0]
        self.timeout_s = timeout_s
        self._own_context = context is None
        self.context = context or zmq.Context()
        self.server_key = server_key or os.environ.get("VIRTBROKER_SERVER_KEY")
        self.secret_key = secret_key or os.environ.get("VIRTBROKER_CLIENT_KEY")
        self._ids = itertools.count(1)
        self.sock = self._open(self.url)

    def _open(self, url: str):
        return StreamSocket(url) if is_stream_url(url) else self._connect(zmq.DEALER, url)

    def _move(self, leader: str | None) -> None:
        """To the leader a standby named, else to the next URL of the list."""
        if leader is None:
            leader = (
                self.urls[(self.urls.index(self.url) + 1) % len(self.urls)] if self.url in self.urls else self.urls[0]
            )
        self.sock.close(linger=0)
        self.url = leader
        self.sock = self._open(leader)

    def _connect(self, kind: int, url: str) -> zmq.Socket:
        sock = self.context.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        if self.server_key and self.secret_key:
            use_as_client(sock, self.server_key, self.secret_key)
        sock.connect(url)
        return sock

    def close(self) -> None:
        """Close the request socket and, if this Client made its context, every socket in it,
        including an events() stream the caller stopped reading without closing."""
        self.sock.close(linger=0)
        if self._own_context:
            self.context.destroy(linger=0)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- transport
    def call(self, msg_cls: type[Any], reply_timeout_s: float | None = None, **fields) -> Any:
        """Send one request and return its result, or raise the typed error the broker sent.

        reply_timeout_s bounds the wait for the reply (default: the client's timeout_s);
        every other keyword is a field of the message, timeout_s included.
        """
        msg = msg_cls(request_id=next(self._ids), **fields)
        timeout_s = reply_timeout_s if reply_timeout_s is not None else self.timeout_s
        return self._following(msg, time.monotonic() + timeout_s, lambda left_s: self._receive(msg.request_id, left_s))

    def _following(self, msg: Any, deadline: float, receive, whole_wait: bool = False) -> Any:
        """Send msg and return what receive(seconds left) returns; follow the leader among
        brokers of an etcd store: on not-leader to the one named, and, with several URLs, on
        no answer or no leader to the next. A submit without an idempotency key is sent again
        only when it surely did not run (not-leader): its outcome may be unknown otherwise."""
        may_repeat = msg.KIND != "submit" or getattr(msg, "idempotency_key", None) is not None
        while True:
            self.sock.send_multipart(p.encode(msg))
            left_s = max(0.0, deadline - time.monotonic())
            if len(self.urls) > 1 and not whole_wait:
                left_s = min(left_s, FAILOVER_ATTEMPT_S)  # a broker that died must not take all the time
            try:
                return receive(left_s)
            except NotLeaderError as e:
                if time.monotonic() >= deadline:
                    raise
                self._move(e.leader)
            except UnavailableError:
                if len(self.urls) < 2 or not may_repeat or time.monotonic() >= deadline:
                    raise
                self._move(None)
                time.sleep(min(FAILOVER_PAUSE_S, max(0.0, deadline - time.monotonic())))

    def _receive(self, request_id: int, timeout_s: float) -> Any:
        for reply in self._replies(time.monotonic() + timeout_s):
            if getattr(reply, "request_id", None) not in (request_id, None):
                continue  # the answer to an earlier request that timed out
            if isinstance(reply, p.Error):
                raise _error(reply)
            return reply.result

    def _replies(self, deadline: float) -> Iterator[Any]:
        """Every reply that arrives, a batch's one by one, until the caller has what it
        waits for; UnavailableError once the monotonic deadline passes first."""
        while True:
            remaining_ms = int((deadline - time.monotonic()) * 1000)
            if remaining_ms <= 0 or not self.sock.poll(remaining_ms):
                raise UnavailableError(f"no answer from the broker at {self.url} (is it running?)")
            yield from p.unbatch(p.decode(self.sock.recv_multipart(), p.CLIENT_VERSION, p.MAX_REPLY_BYTES))

    def call_many(self, requests: Sequence[Any], timeout_s: float | None = None) -> list[Any]:
        """Send requests as batches (up to p.BATCH_MAX_ITEMS a round trip), each handled as if
        sent alone, in order; return each one's result, or in its place the typed error it got
        (an instance, not raised). Sets each request's request_id. A `wait` cannot be batched.

        Raises, for the whole call, the error of a batch the broker could not read, and
        UnavailableError if the replies do not all come within timeout_s.
        """
        if not requests:
            return []
        ids = []
        for msg in requests:
            msg.request_id = next(self._ids)
            ids.append(msg.request_id)
        deadline = time.monotonic() + (timeout_s if timeout_s is not None else self.timeout_s)
        while True:
            for frames in p.batch_frames([p.encode(msg) for msg in requests]):
                self.sock.send_multipart(frames)
            results: dict[int, Any] = {}
            wanted = set(ids)
            for reply in self._replies(deadline):
                request_id = getattr(reply, "request_id", None)
                if request_id is None and isinstance(reply, p.Error):
                    raise _error(reply)  # a whole batch refused
                if request_id in wanted:
                    results[request_id] = _error(reply) if isinstance(reply, p.Error) else reply.result
                    if len(results) == len(ids):
                        break
            out = [results[i] for i in ids]
            # A standby refused them all (and ran none): send them to the leader it named.
            if all(isinstance(r, NotLeaderError) for r in out) and time.monotonic() < deadline:
                self._move(out[0].leader)
                continue
            return out

    # -- requests
    def ping(self, timeout_s: float | None = None) -> dict:
        return self.call(p.Ping, reply_timeout_s=timeout_s)

    def define(self, xml: str, ha: bool | None = None) -> dict:
        """Define or redefine a domain; ha True/False sets or clears its HA mark (None: as the XML says)."""
        return self.call(p.Define, xml=xml, ha=ha)

    def set_ha(self, domain: str, on: bool) -> dict:
        """Mark a domain HA (restarted on another host once its host is fenced) or not."""
        return self.call(p.SetHa, domain=domain, ha=on)

    def hosts(self) -> Records:
        """Every host the broker knows, with its state (up, unreachable, fencing, fenced, rejoining)."""
        return self.call(p.ListHosts)

    def host_action(self, host: str, action: str, confirm_off: bool = False) -> dict:
        """fence (with confirm_off: the operator says it is off), evacuate, drain or undrain a host."""
        return self.call(p.HostAction, host=host, action=action, confirm_off=confirm_off)

    def lookup(self, domain: str) -> dict:
        return self.call(p.Lookup, domain=domain)

    def list(self, all: bool = False, state: str | None = None) -> Records:
        return self.call(p.ListDomains, all=all, state=state)

    def dumpxml(self, domain: str, inactive: bool = False) -> str:
        return self.call(p.DumpXml, domain=domain, inactive=inactive)

    def submit(
        self,
        domain: str,
        op: str,
        timeout_s: float | None = None,
        idempotency_key: str | None = None,
        deadline_s: float | None = None,
    ) -> dict:
        """Queue a job. timeout_s: a shutdown's seconds of ACPI before destroy. deadline_s: how
        long the job may run before it ends `lost` (default: the broker's for the operation)."""
        return self.call(
            p.Submit, domain=domain, op=op, timeout_s=timeout_s, idempotency_key=idempotency_key, deadline_s=deadline_s
        )

    def submit_many(self, jobs: Sequence[tuple[str, str]], timeout_s: float | None = None) -> Sequence[Any]:
        """Submit (domain, op) pairs in batches: each one's job, or the error it got, in order.
        timeout_s is every shutdown's, as in submit()."""
        return self.call_many([p.Submit(request_id=0, domain=d, op=op, timeout_s=timeout_s) for d, op in jobs])

    def job(self, job_id: int) -> dict:
        return self.call(p.GetJob, job_id=job_id)

    def jobs(self, domain: str | None = None, state: str | None = None, limit: int = 100) -> Records:
        return self.call(p.ListJobs, domain=domain, state=state, limit=limit)

    def wait(self, job_ids: Sequence[int], timeout_s: float = 300.0) -> Records:
        """Block until every job is final; raise TimeoutError_ if some are not by timeout_s."""
        result = self.wait_status(job_ids, timeout_s)
        if result["timed_out"]:
            pending = [j["job_id"] for j in result["jobs"] if j["state"] in ("queued", "running")]
            raise TimeoutError_(f"jobs {pending} not finished after {timeout_s:g} s")
        return result["jobs"]

    def wait_status(self, job_ids: Sequence[int], timeout_s: float) -> dict:
        """{"jobs": [...], "timed_out": bool}: returns when all are final or at timeout_s."""
        # The broker answers at timeout_s at the latest; allow the transport a margin on top.
        started = time.monotonic()
        msg = p.Wait(request_id=next(self._ids), job_ids=list(job_ids), timeout_s=timeout_s)

        def receive(left_s: float) -> dict:
            # A wait sent again (to a new leader) waits for what is left of its time.
            msg.timeout_s = max(0.0, timeout_s - (time.monotonic() - started))
            return self._receive(msg.request_id, left_s)

        return self._following(msg, started + timeout_s + 10, receive, whole_wait=True)

    def cancel(self, job_id: int) -> dict:
        return self.call(p.Cancel, job_id=job_id)

    def workers(self) -> Records:
        return self.call(p.ListWorkers)

    def run(self, domain: str, op: str, timeout_s: float = 300.0, **kw) -> dict:
        """Submit and wait: the job's final record (check its state)."""
        job = self.submit(domain, op, **kw)
        return self.wait([job["job_id"]], timeout_s)[0]

    def events(
        self, timeout_s: float | None = None, since: int | None = None, stop: threading.Event | None = None
    ) -> Iterator[Any]:
        """Domain, job and host events from the broker's PUB socket, as they happen.

        With `since`, first every kept event with a higher seq (replayed from the broker's
        event history, in order), then the live ones, each once and none missed: a gap in
        the live events' seq (ZeroMQ's slow joiner, a dropped message) is read from the
        history, and until the first live event shows the subscription is in place, the
        history is read again every REPLAY_POLL_S. Raises GoneError if events after `since`
        are no longer kept: re-read the state (list, jobs) instead.

        The stream ends at timeout_s, or within half a second of `stop` being set.

        To follow the state from a consistent start: send `ping` and `list` in one
        call_many (one turn of the broker's loop), then follow events(since=ping's
        event_seq): the listing reflects every event up to that seq, and no later one.
        """
        events_url = self.ping()["events_url"]
        sub = self._connect(zmq.SUB, events_url)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        try:
            last = -1
            live_seen = since is None  # without `since`, no history is read
            if since is not None:
                # Subscribed before the history is read: an event committed meanwhile comes
                # both ways, and its seq drops the second copy.
                last = since
                for event in self._replayed(since):
                    last = event.seq
                    yield event
            deadline = None if timeout_s is None else time.monotonic() + timeout_s
            next_replay = time.monotonic() + REPLAY_POLL_S
            while (deadline is None or time.monotonic() < deadline) and not (stop is not None and stop.is_set()):
                wait_ms = 500 if deadline is None else max(0, int((deadline - time.monotonic()) * 1000))
                if not live_seen:
                    wait_ms = max(0, min(wait_ms, int((next_replay - time.monotonic()) * 1000)))
                if sub.poll(min(wait_ms, 500)):
                    event = p.decode_event(sub.recv_multipart())
                    if since is not None and event.seq > last + 1:
                        for missed in self._replayed(last):  # the gap, and whatever followed it
                            last = missed.seq
                            yield missed
                    live_seen = True
                    if event.seq > last:
                        last = event.seq
                        yield event
                elif not live_seen and time.monotonic() >= next_replay:
                    # The broker may not have had our subscription when an event left.
                    for missed in self._replayed(last):
                        last = missed.seq
                        yield missed
                    next_replay = time.monotonic() + REPLAY_POLL_S
        finally:
            sub.close(linger=0)

    def _replayed(self, since: int) -> Iterator[Any]:
        """Kept events after `since`, in order, page by page."""
        while True:
            page = self.call(p.EventsSince, since=since, limit=EVENTS_PAGE)["events"]
            for body in page:
                kind = body.pop("type")
                event = p.from_body(EVENT_KINDS[kind], body)
                since = event.seq
                yield event
            if len(page) < EVENTS_PAGE:
                return
