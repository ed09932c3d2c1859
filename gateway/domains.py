"""The domain side of the gateway: numeric ids, transient guests, and virtbroker calls and jobs
with their errors mapped to libvirt's."""

from __future__ import annotations

import logging
import threading
import uuid as uuidlib

from virtbroker.client.api import Client
from virtbroker.common import domxml
from virtbroker.common.errors import (
    ConflictError,
    InvalidError,
    LimitError,
    NotFoundError,
    OperationInvalidError,
    PermissionError_,
    UnavailableError,
    VirtbrokerError,
)
from virtbroker.gateway import rpc
from virtbroker.gateway.rpc import RemoteError

log = logging.getLogger("virtbroker.gateway")

# `unknown`: on an unreachable host, last known active (it keeps its id).
ACTIVE_STATES = ("running", "paused", "unknown")
# A job call waits for its job to end; each wait is one broker round trip of at most this long.
WAIT_SLICE_S = 600.0


class DomainIds:
    """libvirt's numeric ids: a guest gets the next id when it is first seen active and keeps it
    while it runs; a shut-off guest has -1. Also the set of transient guests (CREATE_XML), which
    the gateway undefines when they stop, as libvirt forgets a transient domain.

    Shared by the handler threads and the event thread; one lock, held only for dict updates.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._by_uuid: dict[str, int] = {}
        self._by_id: dict[int, str] = {}
        self._next_id = 1
        self._transient: set[str] = set()

    def for_state(self, uuid: str, state: str) -> int:
        with self._lock:
            if state in ACTIVE_STATES:
                domain_id = self._by_uuid.get(uuid)
                if domain_id is None:
                    domain_id = self._next_id
                    self._next_id += 1
                    self._by_uuid[uuid] = domain_id
                    self._by_id[domain_id] = uuid
                return domain_id
            domain_id = self._by_uuid.pop(uuid, None)
            if domain_id is not None:
                del self._by_id[domain_id]
            return -1

    def uuid_of(self, domain_id: int) -> str | None:
        with self._lock:
            return self._by_id.get(domain_id)

    def mark_transient(self, uuid: str) -> None:
        with self._lock:
            self._transient.add(uuid)

    def unmark_transient(self, uuid: str) -> None:
        with self._lock:
            self._transient.discard(uuid)

    def is_transient(self, uuid: str) -> bool:
        with self._lock:
            return uuid in self._transient


def uuid_text(raw: bytes) -> str:
    return str(uuidlib.UUID(bytes=raw))


def uuid_raw(text: str) -> bytes:
    return uuidlib.UUID(text).bytes


def remote_error(e: VirtbrokerError, invalid_code: int = rpc.ERR_INVALID_ARG) -> RemoteError:
    """A virtbroker error as libvirt's error number and message prefix."""
    if isinstance(e, NotFoundError):
        return RemoteError(rpc.ERR_NO_DOMAIN, f"Domain not found: {e.message}")
    if isinstance(e, InvalidError):
        if invalid_code == rpc.ERR_XML_ERROR:
            return RemoteError(rpc.ERR_XML_ERROR, f"XML error: {e.message}")
        return RemoteError(invalid_code, f"invalid argument: {e.message}")
    if isinstance(e, (ConflictError, LimitError)):
        return RemoteError(rpc.ERR_OPERATION_FAILED, f"operation failed: {e.message}")
    if isinstance(e, OperationInvalidError):
        return RemoteError(rpc.ERR_OPERATION_INVALID, _prefixed("Requested operation is not valid: ", e.message))
    if isinstance(e, PermissionError_):
        return RemoteError(rpc.ERR_OPERATION_DENIED, f"operation forbidden: {e.message}")
    if isinstance(e, UnavailableError):
        return RemoteError(rpc.ERR_OPERATION_TIMEOUT, f"Timed out during operation: {e.message}")
    return RemoteError(rpc.ERR_INTERNAL_ERROR, f"internal error: {e.message}")


def _prefixed(prefix: str, message: str) -> str:
    return message if message.startswith(prefix) else prefix + message


def job_error(job: dict) -> RemoteError:
    """The libvirt error for a job that did not succeed."""
    state, code, text = job["state"], job.get("error_code"), job.get("error") or ""
    if state == "failed" and code == "operation-invalid":
        return RemoteError(rpc.ERR_OPERATION_INVALID, _prefixed("Requested operation is not valid: ", text))
    if state == "failed" and code == "not-found":
        return RemoteError(rpc.ERR_NO_DOMAIN, f"Domain not found: {text}")
    if state == "lost":
        return RemoteError(
            rpc.ERR_OPERATION_FAILED, f"operation failed: virtbroker job {job['job_id']} was lost ({code}): {text}"
        )
    if state == "cancelled":
        return RemoteError(rpc.ERR_OPERATION_FAILED, f"operation failed: virtbroker job {job['job_id']} was cancelled")
    return RemoteError(rpc.ERR_OPERATION_FAILED, f"operation failed: {text or 'virtbroker job ' + str(job['job_id'])}")


class Broker:
    """virtbroker through its local endpoint: one persistent Client per thread (Clients are not
    thread-safe), made on the thread's first call."""

    def __init__(self, url: str, timeout_s: float = 30.0, context=None):
        self.url = url
        self.timeout_s = timeout_s
        self.context = context
        self._local = threading.local()
        self._lock = threading.Lock()
        self._clients: list[Client] = []

    def client(self) -> Client:
        c = getattr(self._local, "client", None)
        if c is None:
            c = Client(self.url, timeout_s=self.timeout_s, context=self.context)
            self._local.client = c
            with self._lock:
                self._clients.append(c)
        return c

    def call(self, method: str, *args, invalid_code: int = rpc.ERR_INVALID_ARG, **kw):
        try:
            return getattr(self.client(), method)(*args, **kw)
        except UnavailableError as e:
            self._drop_client()  # a late reply must not be read as the next call's
            raise remote_error(e) from e
        except VirtbrokerError as e:
            raise remote_error(e, invalid_code) from e

    def run_job(self, domain: str, op: str) -> dict:
        """Submit op and wait for the job to end: its final record, or the libvirt error it maps to."""
        job = self.call("submit", domain, op)
        job_id = job["job_id"]
        while True:
            status = self.call("wait_status", [job_id], WAIT_SLICE_S)
            final = status["jobs"][0]
            if not status["timed_out"]:
                break
        if final["state"] != "succeeded":
            raise job_error(final)
        return final

    def release_thread_client(self) -> None:
        """Close this thread's Client, if it made one (a connection's thread, when it ends)."""
        self._drop_client()

    def _drop_client(self) -> None:
        c = getattr(self._local, "client", None)
        if c is not None:
            self._local.client = None
            with self._lock:
                if c not in self._clients:
                    return  # closed already, by close()
                self._clients.remove(c)
            c.close()

    def close(self) -> None:
        with self._lock:
            clients, self._clients = self._clients, []
        for c in clients:
            c.close()


def ensure_uuid(xml: str) -> tuple[str, str]:
    """(xml, uuid): the definition with a <uuid> filled in if it had none, so the gateway knows a
    transient guest's uuid before the broker's events about it arrive."""
    root = domxml.parse(xml)
    el = root.find("uuid")
    if el is not None and (el.text or "").strip():
        return xml, domxml.normalize_uuid(el.text.strip())
    new = str(uuidlib.uuid4())
    if el is None:
        from lxml import etree

        el = etree.Element("uuid")
        name = root.find("name")
        if name is not None:
            name.addnext(el)
        else:
            root.insert(0, el)
    el.text = new
    from lxml import etree

    return etree.tostring(root, encoding="unicode"), new


def guest_facts(xml: str) -> tuple[int, int, int, str]:
    """(max memory KiB, current memory KiB, vCPUs, OS type) from a definition."""
    root = domxml.parse(xml)
    max_kib = _kib(root.find("memory"))
    current = root.find("currentMemory")
    cur_kib = _kib(current) if current is not None else max_kib
    vcpu_el = root.find("vcpu")
    try:
        vcpus = int((vcpu_el.text or "1").strip()) if vcpu_el is not None else 1
    except ValueError:
        vcpus = 1
    os_type = root.findtext("os/type") or "hvm"
    return max_kib, cur_kib, vcpus, os_type.strip()


_UNITS_KIB = {
    "b": 1 / 1024, "bytes": 1 / 1024, "k": 1, "kib": 1, "kb": 1000 / 1024, "m": 1024, "mib": 1024,
    "mb": 1e6 / 1024, "g": 1024**2, "gib": 1024**2, "gb": 1e9 / 1024, "t": 1024**3, "tib": 1024**3,
}


def _kib(el) -> int:
    if el is None or not (el.text or "").strip():
        return 0
    try:
        return int(float(el.text.strip()) * _UNITS_KIB.get((el.get("unit") or "KiB").lower(), 1))
    except ValueError:
        return 0
