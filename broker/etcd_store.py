"""The broker's state in etcd, for failover: fenced batch writes, a leader campaign, a standby's snapshot and watch."""

from __future__ import annotations

import base64
import json
import logging
import math
import queue
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import msgpack
import requests
from etcd3gw import exceptions as gw
from etcd3gw.client import Etcd3Client

from virtbroker.broker.registry import DomainRecord
from virtbroker.broker.scheduler import Job
from virtbroker.broker.store import Batch, _job_fields, domain_record
from virtbroker.common.errors import LimitError, UnavailableError, VirtbrokerError

log = logging.getLogger("virtbroker.etcd_store")

# etcd's limits (etcd 3.4 defaults, --max-txn-ops and --max-request-bytes): a transaction
# holds at most 128 operations of each kind (compares, success ops, failure ops), and a
# request is at most 1.5 MiB as the protobuf the server proposes to raft. A batch is split
# where these force it, never elsewhere. The byte budget counts keys and values plus a
# generous allowance per op for the protobuf framing, and leaves room for the header.
MAX_TXN_OPS = 128
MAX_TXN_BYTES = 1_400_000
OP_OVERHEAD_BYTES = 32

# Sequence numbers and job ids are zero-padded to the digits of a uint64, so that key order
# is numeric order: a range read returns jobs in job_id order and events in seq order, and
# "every event before seq N" is one delete of a key range.
SEQ_DIGITS = 20

# Key families, under the backend's prefix.
DOMAINS = "domains/"  # domains/<uuid>: the store.py `domains` row
STATES = "states/"  # states/<uuid>: the `domain_state` row
JOBS = "jobs/"  # jobs/<job_id, padded>: the `jobs` row
META = "meta/"  # meta/<key>: the value
EVENTS = "events/"  # events/<seq, padded>: the kept event, msgpack [kind, body] as the broker built it
LEADER = "leader"  # the leader's value (its URLs, JSON), attached to its lease

# Values are msgpack: the rows carry bytes (a job's body, an event) that JSON could only
# carry base64-encoded, and the broker's protocol and SQLite job bodies are msgpack
# already. The JSON gateway base64-encodes every value on the wire either way. The leader
# key holds whatever bytes the campaigner gives (JSON naming its URLs), so any reader can
# decode it without msgpack.

PAGE_KEYS = 500  # keys per range request when reading a whole family (bounds each reply)
RETRY_PAUSE_S = 0.05  # first pause after every endpoint failed at once; doubles up to 0.5 s


class FencedError(VirtbrokerError):
    """A write carried a fencing token that is no longer the leader key's: another broker
    leads (or none does) and nothing of the write was applied."""

    code = "fenced"


class CompactedError(UnavailableError):
    """The revision asked for was compacted away: take a new snapshot."""


@dataclass(frozen=True)
class Change:
    """One key's change as a watch reports it; key is relative to the prefix, value None for a delete."""

    revision: int
    key: str
    value: bytes | None

    @property
    def deleted(self) -> bool:
        return self.value is None


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text)


def _range_end(prefix: bytes) -> bytes:
    """The first key after every key starting with prefix (etcd's prefix range end)."""
    end = bytearray(prefix)
    while end and end[-1] == 0xFF:
        end.pop()
    if not end:
        return b"\0"  # every key
    end[-1] += 1
    return bytes(end)


def _pack(value) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


def _unpack(data: bytes):
    return msgpack.unpackb(data, raw=False)


def _seq_key(family: str, n: int) -> str:
    return f"{family}{n:0{SEQ_DIGITS}d}"


# ---------------------------------------------------------------------------- records


def records_from(raw: dict[str, bytes]) -> tuple[list[DomainRecord], list[Job], dict[str, str]]:
    """Records from a raw copy of the keys (relative key -> value, as snapshot() and a
    watch keep it): the domains as store.py's rule builds them, the jobs in job_id order,
    and the meta keys."""
    domain_rows: dict[str, tuple] = {}
    state_rows: dict[str, tuple] = {}
    job_rows: list[tuple] = []
    meta: dict[str, str] = {}
    for key, value in raw.items():
        if key.startswith(DOMAINS):
            domain_rows[key[len(DOMAINS):]] = tuple(_unpack(value))
        elif key.startswith(STATES):
            state_rows[key[len(STATES):]] = tuple(_unpack(value))
        elif key.startswith(JOBS):
            job_rows.append(tuple(_unpack(value)))
        elif key.startswith(META):
            meta[key[len(META):]] = _unpack(value)
    # A state row without its domain row is never written (both go with the same batch,
    # and an undefine deletes both); like the SQLite LEFT JOIN, it is ignored.
    domains = [domain_record(row, state_rows.get(uuid)) for uuid, row in domain_rows.items()]
    job_rows.sort(key=lambda row: row[0])
    return domains, [Job.from_dict(_job_fields(row)) for row in job_rows], meta


def events_from(raw: dict[str, bytes], since_seq: int = 0) -> list[tuple[int, bytes]]:
    """The kept events of a raw copy with seq > since_seq, oldest first."""
    events = [(int(key[len(EVENTS):]), value) for key, value in raw.items() if key.startswith(EVENTS)]
    return sorted(e for e in events if e[0] > since_seq)


# ---------------------------------------------------------------------------- transactions


def _batch_ops(batch: Batch) -> Iterator[tuple]:
    """A batch as key operations, in store.py's _apply order: ("put", key, value),
    ("delete", key), ("delete_range", start, end) with keys relative to the prefix."""
    for (uuid,) in batch.deleted:
        yield ("delete", DOMAINS + uuid)
        yield ("delete", STATES + uuid)
    for row in batch.domains:
        yield ("put", DOMAINS + row[0], _pack(list(row)))
    for row in batch.states:
        yield ("put", STATES + row[0], _pack(list(row)))
    for row in batch.jobs:
        yield ("put", _seq_key(JOBS, row[0]), _pack(list(row)))
    for (job_id,) in batch.deleted_jobs:
        yield ("delete", _seq_key(JOBS, job_id))
    for key, value in batch.meta:
        yield ("put", META + key, _pack(value))
    # Event history: fields a Batch may carry (getattr: older Batch classes lack them).
    for seq, body in getattr(batch, "events", None) or []:
        yield ("put", _seq_key(EVENTS, seq), bytes(body))
    for (seq,) in getattr(batch, "deleted_events", None) or []:
        yield ("delete", _seq_key(EVENTS, seq))
    events_before = getattr(batch, "events_before", None)
    if events_before is not None:
        yield ("delete_range", EVENTS, _seq_key(EVENTS, events_before))


class _TxnPlan:
    """Splits a stream of key operations into transactions within etcd's limits, in order.

    etcd refuses a transaction that touches one key twice (or puts a key inside a range it
    deletes), so a later op on a key already in the current transaction replaces the
    earlier one: the transaction is atomic, and the last op is what the batches' order
    leaves. A txn boundary falls only where a limit is reached, so every committed prefix
    of the transactions is the state after some prefix of the ops.
    """

    def __init__(self, prefix: bytes):
        self.prefix = prefix
        self.txns: list[list[dict]] = []
        self.ops: dict[bytes, tuple[dict, int]] = {}  # key -> (op, size), in the current txn
        self.ranges: list[tuple[bytes, bytes, dict]] = []
        self.size = 0

    def _flush(self) -> None:
        if self.ops or self.ranges:
            self.txns.append([op for op, _ in self.ops.values()] + [op for _, _, op in self.ranges])
        self.ops, self.ranges, self.size = {}, [], 0

    def _room(self, size: int) -> None:
        if len(self.ops) + len(self.ranges) + 1 > MAX_TXN_OPS or self.size + size > MAX_TXN_BYTES:
            self._flush()

    def add(self, kind: str, key: str, arg) -> None:
        k = self.prefix + key.encode()
        if kind == "delete_range":
            end = self.prefix + arg.encode()
            size = len(k) + len(end) + OP_OVERHEAD_BYTES
            if any(start < end and k < stop for start, stop, _ in self.ranges):
                self._flush()  # overlapping deletes in one txn: keep them apart
            # Puts inside the range are deleted by it anyway: drop them from this txn.
            for inside in [key_ for key_ in self.ops if k <= key_ < end]:
                self.size -= self.ops.pop(inside)[1]
            self._room(size)
            self.ranges.append((k, end, {"request_delete_range": {"key": _b64(k), "range_end": _b64(end)}}))
            self.size += size
            return
        if kind == "put":
            op = {"request_put": {"key": _b64(k), "value": _b64(arg)}}
            size = len(k) + len(arg) + OP_OVERHEAD_BYTES
        else:
            op = {"request_delete_range": {"key": _b64(k)}}
            size = len(k) + OP_OVERHEAD_BYTES
        if size > MAX_TXN_BYTES:
            raise LimitError(
                f"{key} is {size} bytes, more than one etcd request takes ({MAX_TXN_BYTES}): nothing was written"
            )
        if any(start <= k < stop for start, stop, _ in self.ranges):
            self._flush()  # a put after a range delete that covers it: the next txn
        if k in self.ops:
            self.size -= self.ops.pop(k)[1]
        else:
            self._room(size)
        self.ops[k] = (op, size)
        self.size += size

    def finish(self) -> list[list[dict]]:
        self._flush()
        return self.txns


def plan_transactions(prefix: str, batches: list[Batch]) -> list[list[dict]]:
    """The success ops of each transaction that writes the batches, in order (exposed for tests)."""
    plan = _TxnPlan(prefix.encode())
    for batch in batches:
        for kind, key, *arg in _batch_ops(batch):
            plan.add(kind, key, arg[0] if arg else None)
    return plan.finish()


# ---------------------------------------------------------------------------- HTTP


class _Endpoints:
    """The members' JSON gateways, one session each; a request goes to the current member
    and fails over to the next on a connection error, all within one deadline.

    One owner thread: a Leadership and a Watch have _Endpoints of their own.
    """

    def __init__(self, endpoints: list[str], request_timeout_s: float):
        if not endpoints:
            raise ValueError("no etcd endpoints")
        self.names = list(endpoints)
        self.clients = []
        for endpoint in endpoints:
            host, _, port = endpoint.rpartition(":")
            # api_path given: etcd3gw would otherwise ask /version first, one more round trip.
            self.clients.append(Etcd3Client(host=host, port=int(port), api_path="/v3/"))
        self.request_timeout_s = request_timeout_s
        self.current = 0

    def url(self, i: int, path: str) -> str:
        return self.clients[i].get_url(path)

    def next(self) -> None:
        self.current = (self.current + 1) % len(self.clients)

    def post(self, path: str, body: dict, timeout_s: float | None = None) -> dict:
        """POST body to /v3/<path> on the current member, failing over to the others.

        A refused or reset connection, a member that answers it cannot serve now (no
        leader, proposal dropped, server-side timeout), or one that has not answered
        within half the deadline moves the request to the next member; after a round in
        which every member failed fast, a short pause, then another round. Every outcome
        is decided within timeout_s (request_timeout_s by default): UnavailableError then.

        Why half: a member that forwarded a proposal to a leader that has just died never
        hears of it again, and only answers when its own request timeout (7 s) runs out;
        the retry, at another member after the election, is what gets through. The writes
        sent here are idempotent (fenced puts and deletes of given values), so a retry
        after an unknown outcome is safe.
        """
        total_s = self.request_timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + total_s
        attempt_s = max(total_s / 2, 0.5)
        failures_in_round = 0
        pause_s = RETRY_PAUSE_S
        last_error: Exception | None = None
        while True:
            remaining_s = deadline - time.monotonic()
            if remaining_s <= 0:
                raise UnavailableError(f"etcd at {', '.join(self.names)} did not answer in time: {last_error}")
            client = self.clients[self.current]
            client.timeout = min(remaining_s, attempt_s)
            try:
                return client.post(client.get_url(path), json=body)
            except gw.ConnectionTimeoutError as e:
                # No quorum, a lost proposal, or a hung member: try the next one.
                last_error = e
                log.debug("etcd at %s did not answer in %.1f s", self.names[self.current], client.timeout)
                self.next()
                failures_in_round = 0
            except (gw.ConnectionFailedError, gw.InternalServerError) as e:
                last_error = e
                log.debug("etcd at %s failed: %s", self.names[self.current], e.detail_text or e)
                self.next()
                failures_in_round += 1
                if failures_in_round >= len(self.clients):
                    failures_in_round = 0
                    time.sleep(
                        min(pause_s, max(0.0, deadline - time.monotonic()))
                    )  # a retry pause, not a synchronisation
                    pause_s = min(pause_s * 2, 0.5)
            except gw.Etcd3Exception as e:
                text = e.detail_text or str(e)
                if "compacted" in text:
                    raise CompactedError(f"etcd: {text}") from e
                raise VirtbrokerError(f"etcd refused {path}: {text}") from e

    def close(self) -> None:
        for client in self.clients:
            client.session.close()


def _kv_items(reply: dict) -> list[tuple[bytes, bytes, dict]]:
    return [(_unb64(kv["key"]), _unb64(kv.get("value", "")), kv) for kv in reply.get("kvs", [])]


# ---------------------------------------------------------------------------- watch


class Watch:
    """Changes to the keys in [start, end) from a revision on, in revision order.

    A thread reads the gateway's watch stream into a queue. When the member goes away the
    thread resumes at another member from the revision after the last it saw, so a member's
    death loses nothing. A compacted start revision ends the watch with CompactedError.
    Iterate (blocks), or call get(timeout_s) for what arrives within the timeout.
    """

    def __init__(self, endpoints: list[str], prefix: bytes, start: bytes, end: bytes, from_revision: int):
        self.http = _Endpoints(endpoints, request_timeout_s=2.0)
        self.prefix = prefix
        self.start = start
        self.end = end
        self.next_revision = from_revision
        self.changes: queue.Queue = queue.Queue()
        self.closed = threading.Event()
        self.response: requests.Response | None = None
        self.lock = threading.Lock()  # guards self.response between the reader and close()
        self.thread = threading.Thread(target=self._run, name="etcd-watch", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        pause_s = RETRY_PAUSE_S
        while not self.closed.is_set():
            try:
                self._stream()
                pause_s = RETRY_PAUSE_S
            except CompactedError as e:
                self.changes.put(e)
                return
            except (requests.RequestException, UnavailableError, OSError, ValueError) as e:
                # The member went away, refused, or sent what is not JSON: resume at the next one.
                if self.closed.is_set():
                    return
                log.debug("etcd watch at %s ended: %s", self.http.names[self.http.current], e)
            self.http.next()
            self.closed.wait(pause_s)
            pause_s = min(pause_s * 2, 0.5)

    def _stream(self) -> None:
        client = self.http.clients[self.http.current]
        body: dict[str, Any] = {"create_request": {
            "key": _b64(self.start), "range_end": _b64(self.end), "start_revision": self.next_revision,
        }}
        response = client.session.post(
            client.get_url("/watch"), json=body, stream=True, timeout=(self.http.request_timeout_s, None),
        )
        with self.lock:
            if self.closed.is_set():
                response.close()
                return
            self.response = response
        if response.status_code != 200:
            raise UnavailableError(f"etcd watch refused: {response.status_code} {response.text[:200]}")
        for line in response.iter_lines():
            if not line.strip():
                continue
            message = json.loads(line)
            if "error" in message:
                raise UnavailableError(f"etcd watch: {message['error']}")
            result = message.get("result", {})
            if int(result.get("compact_revision", 0) or 0) > 0:
                raise CompactedError(
                    f"etcd compacted revisions before {result['compact_revision']}; watched from {self.next_revision}"
                )
            if result.get("canceled"):
                raise UnavailableError(f"etcd canceled the watch: {result.get('cancel_reason', '')}")
            changes = []
            for event in result.get("events", []):
                kv = event["kv"]
                revision = int(kv["mod_revision"])
                key = _unb64(kv["key"])[len(self.prefix):].decode()
                value = None if event.get("type") == "DELETE" else _unb64(kv.get("value", ""))
                changes.append(Change(revision, key, value))
            if changes:
                self.next_revision = changes[-1].revision + 1
                self.changes.put(changes)
        raise UnavailableError("etcd watch stream ended")

    def get(self, timeout_s: float) -> list[Change]:
        """The changes that arrive within timeout_s (all that are queued, at least one
        message's worth), or [] if none did. Raises CompactedError if the watch ended so."""
        items = []
        try:
            items.append(self.changes.get(timeout=timeout_s))
            while True:
                items.append(self.changes.get_nowait())
        except queue.Empty:
            pass
        out: list[Change] = []
        for item in items:
            if item is None:
                continue  # closed
            if isinstance(item, Exception):
                raise item
            out.extend(item)
        return out

    def __iter__(self) -> Iterator[Change]:
        while not self.closed.is_set():
            item = self.changes.get()
            if item is None:
                return
            if isinstance(item, Exception):
                raise item
            yield from item

    def close(self) -> None:
        self.closed.set()
        self.changes.put(None)
        with self.lock:
            response = self.response
        if response is not None:
            # The reader is blocked in a read of the stream: shut the socket down under it.
            try:
                socket.fromfd(response.raw.fileno(), socket.AF_INET, socket.SOCK_STREAM).shutdown(socket.SHUT_RDWR)
            except (OSError, ValueError, AttributeError):
                pass
            response.close()
        self.thread.join(5.0)
        self.http.close()


# ---------------------------------------------------------------------------- leadership


class Leadership:
    """A won campaign: the leader key, created at revision `token` under lease `lease_id`.

    `fence` goes with every write (write_batches compares the key's create revision to the
    token), because a lease alone is no proof of leadership: a broker paused past its TTL
    still believes it leads. It has connections of its own, so a thread other than the
    writer's may keep it alive.
    """

    def __init__(
        self, endpoints: list[str], key: bytes, token: int, lease_id: int, ttl_s: int, request_timeout_s: float
    ):
        self.http = _Endpoints(endpoints, request_timeout_s)
        self.key = key.decode()
        self.token = token
        self.lease_id = lease_id
        self.ttl_s = ttl_s

    @property
    def fence(self) -> tuple[str, int]:
        return (self.key, self.token)

    def keepalive(self) -> bool:
        """Refresh the lease. False if it has expired (the key is gone: leadership is lost)
        or etcd cannot be reached within the request timeout (it may expire meanwhile)."""
        try:
            reply = self.http.post("/lease/keepalive", {"ID": self.lease_id})
        except UnavailableError as e:
            log.warning("cannot refresh the leader lease %x: %s", self.lease_id, e)
            return False
        # An expired lease answers without a TTL (proto3 leaves the zero out).
        return int(reply.get("result", {}).get("TTL", 0)) > 0

    def resign(self) -> None:
        """Delete the leader key if it is still ours, and revoke the lease (best effort: if
        etcd cannot be reached, the lease expires on its own)."""
        key = _b64(self.key.encode())
        try:
            self.http.post("/kv/txn", {
                "compare": [{"key": key, "target": "CREATE", "result": "EQUAL", "create_revision": self.token}],
                "success": [{"request_delete_range": {"key": key}}],
                "failure": [],
            })
            self.http.post("/kv/lease/revoke", {"ID": self.lease_id})
        except (UnavailableError, VirtbrokerError) as e:
            log.warning("could not resign the leadership cleanly (the lease expires in %d s): %s", self.ttl_s, e)
        finally:
            self.http.close()


# ---------------------------------------------------------------------------- backend


class EtcdBackend:
    """The broker's durable state in etcd under `prefix`, written only under a fence.

    One owner thread (the store writer, or a standby's loader). Every call is decided within
    request_timeout_s, or raises UnavailableError.
    """

    def __init__(self, endpoints: list[str], prefix: str = "/virtbroker/", request_timeout_s: float = 2.0):
        self.endpoints = list(endpoints)
        self.prefix = prefix
        self.request_timeout_s = request_timeout_s
        self.http = _Endpoints(self.endpoints, request_timeout_s)
        self.leader_key = (prefix + LEADER).encode()

    # -- reading
    def _range(
        self, start: bytes, end: bytes, revision: int | None = None
    ) -> tuple[list[tuple[bytes, bytes, dict]], int]:
        """Every key in [start, end) at one revision (the first page's, unless given), a page at a time."""
        items: list[tuple[bytes, bytes, dict]] = []
        key = start
        while True:
            body = {"key": _b64(key), "range_end": _b64(end), "limit": PAGE_KEYS}
            if revision is not None:
                body["revision"] = revision
            reply = self.http.post("/kv/range", body)
            if revision is None:
                revision = int(reply["header"]["revision"])
            page = _kv_items(reply)
            items.extend(page)
            if not reply.get("more") or not page:
                return items, revision
            key = page[-1][0] + b"\0"

    def _family(self, family: str, revision: int | None = None) -> tuple[dict[str, bytes], int]:
        start = (self.prefix + family).encode()
        items, revision = self._range(start, _range_end(start), revision)
        cut = len(self.prefix.encode())
        return {k[cut:].decode(): v for k, v, _ in items}, revision

    def snapshot(self) -> tuple[dict[str, bytes], int]:
        """Every key under the prefix (relative key -> value) at one revision, and that
        revision: watch(revision + 1) then sees every later change."""
        return self._family("")

    def load_domains(self) -> list[DomainRecord]:
        domains, revision = self._family(DOMAINS)
        states, _ = self._family(STATES, revision)
        return records_from(domains | states)[0]

    def load_jobs(self) -> list[Job]:
        return records_from(self._family(JOBS)[0])[1]

    def meta(self, key: str, default: str | None = None) -> str | None:
        reply = self.http.post("/kv/range", {"key": _b64((self.prefix + META + key).encode())})
        items = _kv_items(reply)
        return _unpack(items[0][1]) if items else default

    def load_events(self, since_seq: int) -> list[tuple[int, bytes]]:
        """Kept events with seq > since_seq, oldest first."""
        start = (self.prefix + _seq_key(EVENTS, since_seq + 1)).encode()
        items, _ = self._range(start, _range_end((self.prefix + EVENTS).encode()))
        cut = len((self.prefix + EVENTS).encode())
        return [(int(k[cut:]), v) for k, v, _ in items]

    def oldest_event(self) -> int | None:
        start = (self.prefix + EVENTS).encode()
        reply = self.http.post("/kv/range", {"key": _b64(start), "range_end": _b64(_range_end(start)), "limit": 1})
        items = _kv_items(reply)
        return int(items[0][0][len(start):]) if items else None

    def watch(self, from_revision: int) -> Watch:
        """Every change under the prefix from from_revision on (snapshot's revision + 1)."""
        start = self.prefix.encode()
        return Watch(self.endpoints, start, start, _range_end(start), from_revision)

    # -- writing
    def write_batches(self, batches: list[Batch], fence: tuple[str, int]) -> int:
        """Apply the batches in order, as few transactions as etcd's limits allow, each one
        applied only if the leader key was created at revision fence[1] (the caller still
        leads). Returns the revision of the last transaction.

        Raises FencedError if another broker leads (that transaction and those after it are
        not applied; with several transactions, the ones before it were, under the fence),
        UnavailableError if etcd does not answer within request_timeout_s: the outcome of
        the transaction in flight is unknown, so retry the same batches (the writes are
        idempotent) before anything later, or give up leadership. LimitError if one value
        is too large for etcd, before anything is written.
        """
        leader_key, token = fence
        key = _b64(leader_key.encode())
        txns = plan_transactions(self.prefix, batches) or [[]]  # no ops: still check the fence
        revision = 0
        for ops in txns:
            reply = self.http.post("/kv/txn", {
                "compare": [{"key": key, "target": "CREATE", "result": "EQUAL", "create_revision": token}],
                "success": ops,
                "failure": [{"request_range": {"key": key}}],
            })
            if not reply.get("succeeded"):
                raise FencedError(f"the fence {token} is stale: {self._holder(reply)}; nothing more was written")
            revision = int(reply["header"]["revision"])
        return revision

    @staticmethod
    def _holder(reply: dict) -> str:
        kvs = (reply.get("responses") or [{}])[0].get("response_range", {}).get("kvs", [])
        if not kvs:
            return "no broker leads"
        return f"the leader key was created at revision {kvs[0]['create_revision']}"

    # -- leadership
    def campaign(self, value: bytes, ttl_s: float) -> Leadership | None:
        """One attempt to lead: grant a lease of ttl_s (etcd rounds up to whole seconds and
        to its minimum), and create the leader key with it only if there is none. The
        Leadership, or None (the lease is revoked) if another broker leads."""
        reply = self.http.post("/lease/grant", {"TTL": max(1, math.ceil(ttl_s)), "ID": 0})
        lease_id, granted_ttl_s = int(reply["ID"]), int(reply["TTL"])
        key = _b64(self.leader_key)
        try:
            reply = self.http.post("/kv/txn", {
                "compare": [{"key": key, "target": "CREATE", "result": "EQUAL", "create_revision": 0}],
                "success": [{"request_put": {"key": key, "value": _b64(value), "lease": lease_id}}],
                "failure": [{"request_range": {"key": key}}],
            })
        except UnavailableError:
            self._revoke(lease_id)
            raise
        if reply.get("succeeded"):
            token = int(reply["header"]["revision"])  # the put's revision: the key's create revision
        else:
            kvs = reply["responses"][0].get("response_range", {}).get("kvs", [])
            if kvs and int(kvs[0].get("lease", 0)) == lease_id:
                # A retried request whose first try had created the key: it is ours.
                token = int(kvs[0]["create_revision"])
            else:
                self._revoke(lease_id)
                return None
        return Leadership(self.endpoints, self.leader_key, token, lease_id, granted_ttl_s, self.request_timeout_s)

    def _revoke(self, lease_id: int) -> None:
        try:
            self.http.post("/kv/lease/revoke", {"ID": lease_id})
        except (UnavailableError, VirtbrokerError) as e:
            log.debug("lease %x not revoked (it expires on its own): %s", lease_id, e)

    def leader(self) -> tuple[bytes, int] | None:
        """The leader key's value and create revision (the leader's fencing token), or None."""
        items = _kv_items(self.http.post("/kv/range", {"key": _b64(self.leader_key)}))
        if not items:
            return None
        return items[0][1], int(items[0][2]["create_revision"])

    def wait_for_leader_change(self, token: int, timeout_s: float) -> bool:
        """Wait until the leader key created at revision `token` is deleted or replaced
        (resigned, or its lease expired): True, and the caller campaigns. False if it still
        stands after timeout_s. A watch from token + 1 sees a change that happened before the
        call too, so no change is missed between leader() and this call."""
        watch = Watch(self.endpoints, self.prefix.encode(), self.leader_key, self.leader_key + b"\0", token + 1)
        try:
            return bool(watch.get(timeout_s))
        except CompactedError:
            return True  # history gone: the caller looks at leader() again
        finally:
            watch.close()

    def close(self) -> None:
        self.http.close()
