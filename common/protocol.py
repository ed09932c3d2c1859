"""Every message on virtbroker's sockets: frame layout, message kinds, encode and decode.

Frames (after any ROUTER identity frame):  [version, kind, body]
  version  b"VBC1" on the client socket, b"VBW1" on the worker socket
  kind     ASCII message kind, e.g. b"define"
  body     one msgpack map
Events on the PUB socket are [topic, b"VBE1", body], topic b"domain" or b"job".
Several messages to one peer may travel as one `batch` message: on the worker socket (see
Batch), one send and one wake-up for many jobs; on the client socket (see ClientBatch),
many requests in one round trip, answered by one batch of their replies.

A body's fields are checked against the kind's dataclass: a missing field, a wrong type or
an unknown kind is a ProtocolError carrying what was received. Unknown extra fields are
ignored, so a newer peer can add optional fields. docs/PROTOCOL.md documents each kind.
"""

from __future__ import annotations

import dataclasses
import threading
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar

import msgpack

from virtbroker.common.errors import ProtocolError

CLIENT_VERSION = b"VBC1"
WORKER_VERSION = b"VBW1"
EVENT_VERSION = b"VBE1"

MAX_FRAME_BYTES = 2 * 1024 * 1024  # a request: a definition is at most 1 MiB, plus the envelope
# A reply may be far larger (list --all of 100,000 domains is about 10 MiB); clients trust
# their broker more than the broker trusts its clients, but not without limit.
MAX_REPLY_BYTES = 256 * 1024 * 1024
MAX_NESTING = 16
MAX_INT = 2**63 - 1

JOB_OPS = ("start", "shutdown", "destroy", "reboot", "suspend", "resume", "undefine")
INTERNAL_OPS = ("reconcile",)
JOB_STATES = ("queued", "running", "succeeded", "failed", "cancelled", "lost")
FINAL_JOB_STATES = ("succeeded", "failed", "cancelled", "lost")
DOMAIN_STATES = ("shutoff", "running", "paused")  # what a worker may report
# The registry's states: a domain of an unreachable host is `unknown` (the broker cannot tell).
REGISTRY_STATES = (*DOMAIN_STATES, "unknown")
HOST_ACTIONS = ("fence", "evacuate", "drain", "undrain")

_KINDS: dict[tuple[bytes, str], type[Message]] = {}
_FIELD_NAMES: dict[type, tuple[str, ...]] = {}  # per message class, filled on first encode


@dataclass
class Message:
    """Base of every message kind; subclasses set KIND and VERSION.

    Messages are plain dataclasses, not frozen ones, and nothing changes a message once it
    is built: a frozen dataclass's __init__ sets each field through object.__setattr__,
    which makes it three times as slow, and the broker builds several per job.
    """

    KIND: ClassVar[str] = ""
    VERSION: ClassVar[bytes] = b""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.KIND:
            _KINDS[(cls.VERSION, cls.KIND)] = cls

    def body(self) -> dict[str, Any]:
        names = _FIELD_NAMES.get(type(self))
        if names is None:
            names = _FIELD_NAMES[type(self)] = tuple(f.name for f in dataclasses.fields(self))
        return {name: getattr(self, name) for name in names}


# --------------------------------------------------------------------------- client -> broker
# Every client request carries request_id (any int the client chooses); the reply echoes it.


@dataclass
class Ping(Message):
    KIND = "ping"
    VERSION = CLIENT_VERSION
    request_id: int


@dataclass
class Define(Message):
    KIND = "define"
    VERSION = CLIENT_VERSION
    request_id: int
    xml: str
    # True: mark the domain HA (restarted on another host once its host is fenced); False:
    # unmark it; nil: as the definition's <metadata> says (a redefine keeps the mark).
    ha: bool | None = None


@dataclass
class Lookup(Message):
    """Find a domain by name or UUID; the reply is its record (dominfo)."""

    KIND = "lookup"
    VERSION = CLIENT_VERSION
    request_id: int
    domain: str


@dataclass
class ListDomains(Message):
    KIND = "list"
    VERSION = CLIENT_VERSION
    request_id: int
    all: bool = False  # like virsh list --all: include shut-off domains
    state: str | None = None


@dataclass
class DumpXml(Message):
    KIND = "dumpxml"
    VERSION = CLIENT_VERSION
    request_id: int
    domain: str
    inactive: bool = False


@dataclass
class Submit(Message):
    """Submit a lifecycle job for a domain (named by name or UUID)."""

    KIND = "submit"
    VERSION = CLIENT_VERSION
    request_id: int
    domain: str
    op: str
    timeout_s: float | None = None  # shutdown: seconds of ACPI before destroy
    idempotency_key: str | None = None
    # Seconds the job may run before its worker stops renewing its lease (it then ends
    # `lost`, code deadline); default: the broker's deadline_s for the operation.
    deadline_s: float | None = None


@dataclass
class GetJob(Message):
    KIND = "job"
    VERSION = CLIENT_VERSION
    request_id: int
    job_id: int


@dataclass
class ListJobs(Message):
    KIND = "jobs"
    VERSION = CLIENT_VERSION
    request_id: int
    domain: str | None = None
    state: str | None = None
    limit: int = 100


@dataclass
class Wait(Message):
    """Reply when every job is final, or at timeout_s with the jobs as they are."""

    KIND = "wait"
    VERSION = CLIENT_VERSION
    request_id: int
    job_ids: list[int]
    timeout_s: float = 60.0


@dataclass
class Cancel(Message):
    KIND = "cancel"
    VERSION = CLIENT_VERSION
    request_id: int
    job_id: int


@dataclass
class ListWorkers(Message):
    KIND = "workers"
    VERSION = CLIENT_VERSION
    request_id: int


@dataclass
class SetHa(Message):
    """Mark a domain HA or not (`vbctl ha DOMAIN on|off`); the reply is its record."""

    KIND = "ha"
    VERSION = CLIENT_VERSION
    request_id: int
    domain: str
    ha: bool


@dataclass
class ListHosts(Message):
    """Every host the broker knows, with its state (`vbctl hosts`)."""

    KIND = "hosts"
    VERSION = CLIENT_VERSION
    request_id: int


@dataclass
class HostAction(Message):
    """An operator's word on a host: fence (it is off: `vbctl host-fence HOST --yes-it-is-off`),
    evacuate (restart its domains elsewhere; the host must be fenced), drain, undrain."""

    KIND = "host"
    VERSION = CLIENT_VERSION
    request_id: int
    host: str
    action: str
    # fence only: the operator confirms the host is powered off. Without it nothing changes.
    confirm_off: bool = False


@dataclass
class EventsSince(Message):
    """Replay stored events with seq > since, oldest first, at most `limit` (a page)."""

    KIND = "events"
    VERSION = CLIENT_VERSION
    request_id: int
    since: int
    limit: int = 1000


# --------------------------------------------------------------------------- broker -> client


@dataclass
class Ok(Message):
    KIND = "ok"
    VERSION = CLIENT_VERSION
    request_id: int
    result: Any = None


@dataclass
class Error(Message):
    KIND = "error"
    VERSION = CLIENT_VERSION
    request_id: int | None
    code: str
    message: str
    # With code not-leader: the leading broker's URL for the same kind of endpoint (its
    # client URL, or its local one to a local client); nil while no broker leads.
    leader: str | None = None


# --------------------------------------------------------------------------- worker -> broker


@dataclass
class Hello(Message):
    """A worker joins (or rejoins after a broker restart) and says what it holds."""

    KIND = "hello"
    VERSION = WORKER_VERSION
    worker_id: str
    role: str  # "lifecycle" or "security"
    host_id: str
    uri: str
    slots: int
    drivers: list[str] = field(default_factory=list)  # security workers: ["dac"], ["apparmor"]
    guests: list[dict] = field(default_factory=list)  # [{uuid, name, state}] running on the host
    leases: list[dict] = field(default_factory=list)  # [{lease_id, job_id, epoch}] still being worked
    # Lifecycle workers: extra slots for destroy and reconcile only (libvirtd's priority
    # workers), and the host's capacity from libvirt (0: not reported), for placement.
    priority_slots: int = 0
    memory_mib: int = 0
    cpus: int = 0
    # Lifecycle workers: directories this host shares with others (HA restarts go where
    # every disk of the domain is under one), whether it pets a watchdog while armed, and
    # the guests it destroyed by self-fencing while it could not renew its host lease.
    shared_storage_roots: list[str] = field(default_factory=list)
    watchdog: bool = False
    self_fenced: list[str] = field(default_factory=list)


@dataclass
class Heartbeat(Message):
    KIND = "heartbeat"
    VERSION = WORKER_VERSION
    worker_id: str
    lease_ids: list[str]
    # Every resync_interval_s, and after each reconnect to libvirtd, a lifecycle worker also
    # sends the guests running on its host ([{uuid, name, state}]): a backstop for events.
    guests: list[dict] | None = None
    seq: int = 0  # echoed in the broker's `renewed`: the host lease was renewed at this beat
    # Guests this worker destroyed by self-fencing; sent with every beat until one is renewed.
    self_fenced: list[str] = field(default_factory=list)
    # The worker is armed (it heard `renewed.armed`, or started an HA guest itself): it
    # self-fences, and pets its watchdog, from now on.
    armed: bool = False


@dataclass
class GuestEvent(Message):
    """A lifecycle worker passes on a libvirt lifecycle event of a guest on its host."""

    KIND = "guest-event"
    VERSION = WORKER_VERSION
    worker_id: str
    uuid: str
    state: str  # running, paused or shutoff: the state the event leaves the guest in
    event: str  # libvirt's event name, lowercase: started, stopped, crashed, suspended, resumed, ...
    reason: str = ""
    # The worker's CLOCK_MONOTONIC just before it read `state` from libvirt (the event only
    # triggers the read); the broker drops it if a job's result on that host is newer.
    at: float = 0.0


@dataclass
class StraysDone(Message):
    """The answer to `strays`: these guests were destroyed (or could not be)."""

    KIND = "strays-done"
    VERSION = WORKER_VERSION
    worker_id: str
    destroyed: list[str]
    failed: list[dict] = field(default_factory=list)  # [{uuid, error}]


@dataclass
class Result(Message):
    """A job's outcome, carrying the lease it ran under."""

    KIND = "result"
    VERSION = WORKER_VERSION
    worker_id: str
    job_id: int
    lease_id: str
    epoch: int
    ok: bool
    error: str | None = None
    error_code: str | None = None
    domain_state: str | None = None  # state the worker observed after the job
    # The worker's CLOCK_MONOTONIC (one clock for every process of a host) when the job's
    # libvirt work ended: a guest-event whose state was read before this is older news.
    done_at: float = 0.0


@dataclass
class Bye(Message):
    """A worker leaves on purpose (SIGTERM) after finishing its jobs."""

    KIND = "bye"
    VERSION = WORKER_VERSION
    worker_id: str


@dataclass
class LabelRequest(Message):
    """Lifecycle worker -> broker -> security worker(s) of the same host: label or restore."""

    KIND = "label"
    VERSION = WORKER_VERSION
    worker_id: str
    label_id: str
    host_id: str
    action: str  # "label" or "restore"
    domain_uuid: str
    domain_name: str
    # What the worker started from. The broker does not pass it on: it sends the security
    # worker the definition it owns itself (the domain's live definition).
    xml: str
    driver: str = ""  # which driver must answer; the broker routes to a security worker serving it


@dataclass
class LabelReply(Message):
    """Security worker -> broker -> lifecycle worker."""

    KIND = "label-reply"
    VERSION = WORKER_VERSION
    worker_id: str
    label_id: str
    driver: str
    ok: bool
    error: str | None = None
    detail: dict = field(default_factory=dict)  # driver facts for the start: uid, gid, profile


# --------------------------------------------------------------------------- broker -> worker


@dataclass
class Welcome(Message):
    KIND = "welcome"
    VERSION = WORKER_VERSION
    heartbeat_interval_s: float
    lease_ttl_s: float


@dataclass
class Renewed(Message):
    """The answer to a lifecycle worker's heartbeat: its host lease is renewed.

    armed: the host runs HA guests, so the worker self-fences after self_fence_s without a
    renewal (and pets its watchdog after each renewal while armed)."""

    KIND = "renewed"
    VERSION = WORKER_VERSION
    seq: int
    armed: bool = False
    self_fence_s: float = 0.0


@dataclass
class Strays(Message):
    """To a returning host: destroy these guests before taking any job. Their domains were
    fenced (their epoch raised, maybe restarted elsewhere) while the host was away."""

    KIND = "strays"
    VERSION = WORKER_VERSION
    uuids: list[str]


@dataclass
class Reregister(Message):
    """Sent to a worker the broker does not know (it restarted): say hello again."""

    KIND = "reregister"
    VERSION = WORKER_VERSION


@dataclass
class NotLeader(Message):
    """Sent by a standby broker to a worker that talks to it: go to the leader's worker URL
    (nil while no broker leads: try the others in your list)."""

    KIND = "not-leader"
    VERSION = WORKER_VERSION
    leader_url: str | None = None


@dataclass
class JobAssignment(Message):
    KIND = "job"
    VERSION = WORKER_VERSION
    job_id: int
    op: str
    lease_id: str
    epoch: int
    lease_ttl_s: float
    domain_uuid: str
    domain_name: str
    xml: str
    timeout_s: float | None = None
    security: list[str] = field(default_factory=list)  # security drivers to ask before start
    # Seconds from receipt: the worker renews the lease no longer than this, so a job whose
    # libvirt call hangs ends `lost` (code deadline) one TTL later. None: no deadline.
    deadline_s: float | None = None


@dataclass
class ResultAck(Message):
    KIND = "result-ack"
    VERSION = WORKER_VERSION
    job_id: int
    accepted: bool
    reason: str | None = None


@dataclass
class Shutdown(Message):
    """Broker stopping: workers may finish and wait for it to come back."""

    KIND = "shutdown"
    VERSION = WORKER_VERSION


# --------------------------------------------------------------------------- both ways


@dataclass
class Batch(Message):
    """Several worker-socket messages in one: [[kind, body], ...], each body its own msgpack
    bytes, handled in order exactly as if each had come alone. Batches do not nest."""

    KIND = "batch"
    VERSION = WORKER_VERSION
    messages: list[list]


@dataclass
class ClientBatch(Message):
    """Several client requests in one, [[kind, body], ...] as in Batch, handled in order,
    each as if it had come alone; the broker answers with one ClientBatch of their replies
    (ok or error, each with its request's request_id), in the same order. A `wait` cannot
    travel in a batch (its answer comes later than the others'). Batches do not nest."""

    KIND = "batch"
    VERSION = CLIENT_VERSION
    messages: list[list]


BATCH_MAX_ITEMS = 1000
BATCH_MAX_BYTES = MAX_FRAME_BYTES // 2  # a sender starts a new batch before its bodies pass this


def batch_frames(encoded: list[list[bytes]]) -> list[list[bytes]]:
    """Encoded messages to one peer on one socket ([version, kind, body] each), as few
    messages as the limits allow: one stays itself; more travel as batches, each closed at
    BATCH_MAX_ITEMS messages or BATCH_MAX_BYTES of bodies (a larger message goes alone)."""
    if len(encoded) <= 1:
        return encoded
    version = encoded[0][0]
    out: list[list[bytes]] = []
    items: list[list] = []
    size = 0
    for _, kind, body in encoded:
        if items and (len(items) >= BATCH_MAX_ITEMS or size + len(body) > BATCH_MAX_BYTES):
            out.append(_batch_frames(version, items))
            items, size = [], 0
        items.append([kind.decode(), body])
        size += len(body)
    out.append(_batch_frames(version, items))
    return out


def _batch_frames(version: bytes, items: list[list]) -> list[bytes]:
    if len(items) == 1:
        kind, body = items[0]
        return [version, kind.encode(), body]
    return [version, Batch.KIND.encode(), pack({"messages": items})]


def unbatch(msg: Message) -> list[Any]:
    """The messages a decoded message stands for: a batch's (Batch or ClientBatch), in
    order, or itself.

    Raises ProtocolError for a malformed batch; one bad item spoils the whole batch, as
    a bad body spoils its message.
    """
    if type(msg) is not Batch and type(msg) is not ClientBatch:
        return [msg]
    if not 0 < len(msg.messages) <= BATCH_MAX_ITEMS:
        raise ProtocolError(f"batch of {len(msg.messages)} messages: 1 to {BATCH_MAX_ITEMS} are allowed")
    out = []
    for item in msg.messages:
        if len(item) != 2 or type(item[0]) is not str or type(item[1]) is not bytes:
            raise ProtocolError("batch: each item must be [kind, body bytes]", item)
        if item[0] == Batch.KIND:
            raise ProtocolError("batch: batches do not nest")
        out.append(_decode_body(msg.VERSION, item[0], item[1], MAX_REPLY_BYTES))
    return out


# --------------------------------------------------------------------------- events (PUB)


@dataclass
class DomainEvent(Message):
    KIND = "domain"
    VERSION = EVENT_VERSION
    seq: int
    uuid: str
    name: str
    event: str  # defined, undefined, state
    state: str
    host_id: str | None = None
    # Why the state changed when no job of the domain changed it: "libvirt: stopped" (an
    # event from the host), "host unreachable", "fenced", "self-fenced", "stray destroyed", ...
    reason: str | None = None


@dataclass
class HostEvent(Message):
    """A host changed state: up, unreachable, fencing, fenced, rejoining (topic b"host")."""

    KIND = "host"
    VERSION = EVENT_VERSION
    seq: int
    host_id: str
    state: str
    reason: str | None = None


@dataclass
class JobEvent(Message):
    KIND = "job"
    VERSION = EVENT_VERSION
    seq: int
    job_id: int
    uuid: str
    op: str
    state: str
    error: str | None = None


# --------------------------------------------------------------------------- encode / decode


_local = threading.local()


def pack(value: Any) -> bytes:
    """msgpack.packb(value, use_bin_type=True) with this thread's own Packer.

    packb builds a Packer and its buffer for every call, which for a message's small body
    costs as much as the packing itself. A Packer is not shared between threads.
    """
    try:
        packer = _local.packer
    except AttributeError:
        packer = _local.packer = msgpack.Packer(use_bin_type=True)
    return packer.pack(value)


def encode(msg: Message) -> list[bytes]:
    """Frames for one message: [version, kind, body]."""
    return [msg.VERSION, msg.KIND.encode(), pack(msg.body())]


def encode_event(msg: Message) -> list[bytes]:
    return [msg.KIND.encode(), msg.VERSION, pack(msg.body())]


# Decoding returns the dataclass of the kind received, whichever it is: typed Any, so that
# callers read the fields of the kind they check for.
def decode(frames: list[bytes], version: bytes, max_bytes: int = MAX_FRAME_BYTES) -> Any:
    """Decode [version, kind, body] into its dataclass, or raise ProtocolError."""
    if len(frames) != 3:
        raise ProtocolError(f"expected 3 frames (version, kind, body), got {len(frames)}", frames[:4])
    got_version, kind_raw, raw = frames
    if got_version != version:
        raise ProtocolError(f"unsupported protocol version {bytes(got_version)[:16]!r}, expected {version!r}")
    try:
        kind = bytes(kind_raw).decode("ascii")
    except UnicodeDecodeError:
        raise ProtocolError("message kind is not ASCII", bytes(kind_raw)[:64]) from None
    return _decode_body(version, kind, raw, max_bytes)


def _decode_body(version: bytes, kind: str, raw: bytes, max_bytes: int) -> Any:
    if len(raw) > max_bytes:
        raise ProtocolError(f"body of {len(raw)} bytes is over the limit of {max_bytes}")
    cls = _KINDS.get((version, kind))
    if cls is None:
        raise ProtocolError(f"unknown message kind {kind!r}", kind)
    try:
        body = msgpack.unpackb(raw, raw=False, strict_map_key=True)
    except Exception as e:  # msgpack raises several unrelated types on bad input
        raise ProtocolError(f"{kind}: body is not valid msgpack ({type(e).__name__})", bytes(raw)[:64]) from None
    return from_body(cls, body)


def decode_event(frames: list[bytes]) -> Any:
    if len(frames) != 3:
        raise ProtocolError(f"expected 3 event frames, got {len(frames)}")
    topic, version, raw = frames
    return decode([version, topic, raw], EVENT_VERSION)


def from_body(cls: type[Message], body: Any) -> Any:
    if not isinstance(body, dict):
        raise ProtocolError(f"{cls.KIND}: body must be a map, got {type(body).__name__}", body)
    values = {}
    for name, check, required in _schema(cls):
        value = body.get(name, _ABSENT)
        if value is _ABSENT:
            if required:
                raise ProtocolError(f"{cls.KIND}: missing field {name!r}", sorted(map(str, body))[:20])
        elif check(value, 0):
            values[name] = value
        else:
            raise ProtocolError(
                f"{cls.KIND}: field {name!r} has the wrong type ({type(value).__name__})", {name: value}
            )
    return cls(**values)


_ABSENT = object()  # a field the body does not carry (None is a value)


Check = typing.Callable[[Any, int], bool]
_SCHEMAS: dict[type, tuple[tuple[str, Check, bool], ...]] = {}


def _schema(cls: type) -> tuple[tuple[str, Check, bool], ...]:
    """(field name, type check, required) per field, built once per message class: this
    runs for every message the broker receives."""
    schema = _SCHEMAS.get(cls)
    if schema is None:
        hints = typing.get_type_hints(cls)
        schema = _SCHEMAS[cls] = tuple(
            (f.name, _checker(hints[f.name]),
             f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
            for f in dataclasses.fields(cls)
        )
    return schema


def _checker(hint: Any) -> Check:
    """A structural type check of a decoded msgpack value against a field annotation.

    check(value, depth) is False for a value of the wrong shape or nested deeper than
    MAX_NESTING. bool is not accepted as an int, and ints are bounded to int64.
    """
    if hint is Any:
        return _bounded
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = tuple(_checker(h) for h in typing.get_args(hint))
        if len(options) == 2 and type(None) in typing.get_args(hint):
            # Optional[X], the common case: one test for None, then X's.
            other = options[0] if typing.get_args(hint)[1] is type(None) else options[1]
            return lambda v, depth: v is None or other(v, depth)
        return lambda v, depth: any(check(v, depth) for check in options)
    if hint is type(None):
        return lambda v, depth: v is None
    if hint is bool:
        return lambda v, depth: v is True or v is False
    if hint is int:
        return lambda v, depth: type(v) is int and -MAX_INT <= v <= MAX_INT
    if hint is float:
        return lambda v, depth: type(v) is float or type(v) is int
    if hint is str:
        return lambda v, depth: type(v) is str
    if origin is list or hint is list:
        args = typing.get_args(hint)
        item = _checker(args[0]) if args else _bounded
        return lambda v, depth: (
            depth <= MAX_NESTING and type(v) is list and all(item(x, depth + 1) for x in v)
        )
    if origin is dict or hint is dict:
        return lambda v, depth: type(v) is dict and _bounded(v, depth)
    raise TypeError(f"no wire check for the annotation {hint!r}")


def _bounded(value: Any, depth: int) -> bool:
    """Free-form values (maps, results) may nest, but not without limit: nothing may sit
    deeper than MAX_NESTING.

    Only containers are descended into (a `list --all` of 100,000 domains holds 600,000
    scalars, and a call per scalar would cost more than the decode). Map keys need no
    visit: strict_map_key decoding leaves only str and bytes keys.
    """
    if depth > MAX_NESTING:
        return False
    kind = type(value)
    if kind is dict:
        items = value.values()
    elif kind is list:
        items = value
    else:
        return True
    if value and depth + 1 > MAX_NESTING:
        return False  # its elements would be too deep
    for item in items:
        kind = type(item)
        if (kind is dict or kind is list) and not _bounded(item, depth + 1):
            return False
    return True


def kinds() -> dict[tuple[bytes, str], type[Message]]:
    """Every registered message kind, for documentation and round-trip tests."""
    return dict(_KINDS)
