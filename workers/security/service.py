"""Security worker: one driver (dac or apparmor) for one host, serving label requests routed by the broker.

Requests run in a thread pool, so two domains are labelled at the same time unless they
share a file; the drivers serialize only on the resolved paths they touch (or on one
host-wide lock when serialization = global, for comparison).
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import struct
import threading
import time
import uuid as uuidlib
from concurrent.futures import ThreadPoolExecutor

import libvirt
import zmq
from lxml import etree

from virtbroker.common import protocol as p
from virtbroker.common.config import Config
from virtbroker.common.errors import ConfigError, SecurityError, VirtbrokerError
from virtbroker.common.guestuser import guest_ids
from virtbroker.common.process import BrokerLink, run_until_signalled
from virtbroker.common.resources import Resource, emulator_path, find_resources
from virtbroker.common.statelock import StateLock
from virtbroker.common.wire import drain
from virtbroker.workers.lifecycle import host_id_for
from virtbroker.workers.security.apparmor import AppArmorDriver
from virtbroker.workers.security.dac import DacDriver

log = logging.getLogger("virtbroker.security")

INPROC_URL = "inproc://labels"




QCOW2_MAGIC = b"QFI\xfb"
QCOW2_HEADER = struct.Struct(">4sIQI")  # magic, version, backing_file_offset, backing_file_size
MAX_BACKING_CHAIN = 64  # QEMU's own limit on chain depth is far lower in practice
_FILE_TYPES = (
    (stat.S_ISLNK, "a symbolic link"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISDIR, "a directory"),
)


def _file_type(mode: int) -> str:
    return next((name for test, name in _FILE_TYPES if test(mode)), "not a regular file")


def qcow2_backing_file(path: str) -> str | None:
    """The backing file a qcow2 image names in its header, or None (no backing, not qcow2,
    a network backing store, or `path` does not exist: the driver reports missing files).

    Read from the header itself, as QEMU does, instead of running `qemu-img info` for
    every label: a fork per disk is what made labelling slow while guests start. Root
    reads it, so the image must be a regular file reached without a symlink in its last
    component: a FIFO would block the reading thread for ever, a device could have side
    effects on open, and a link could point anywhere. Either is a SecurityError, so the
    start fails instead of leaving the backing file unlabelled.
    """
    try:
        before = os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise SecurityError(f"cannot read the image {path}: {e.strerror}") from None
    # Looked at before opening: opening a device or FIFO is already an action on it.
    if not stat.S_ISREG(before.st_mode):
        raise SecurityError(f"refusing the image {path}: it is {_file_type(before.st_mode)}, not a regular file")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise SecurityError(f"refusing the image {path}: it is a symbolic link") from None
        raise SecurityError(f"cannot read the image {path}: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        # Swapped between the lstat and the open: O_NONBLOCK made a FIFO's open return.
        if not stat.S_ISREG(st.st_mode):
            raise SecurityError(f"refusing the image {path}: it is {_file_type(st.st_mode)}, not a regular file")
        header = os.pread(fd, QCOW2_HEADER.size, 0)
        if len(header) < QCOW2_HEADER.size:
            return None
        magic, _version, offset, size = QCOW2_HEADER.unpack(header)
        if magic != QCOW2_MAGIC or offset == 0 or not 0 < size <= 1023:
            return None
        raw = os.pread(fd, size, offset)
    except OSError as e:
        raise SecurityError(f"cannot read the image {path}: {e.strerror}") from None
    finally:
        os.close(fd)
    try:
        name = raw.decode("utf-8", errors="strict")
    except UnicodeDecodeError:
        raise SecurityError(f"refusing the image {path}: its backing file name is not UTF-8") from None
    if "://" in name or name.startswith("json:"):
        return None  # a network backing store has no host path
    return backing_path(path, name)


def backing_path(image: str, name: str) -> str:
    """Where QEMU finds the backing file `name` of `image`: relative names are relative to
    the image's folder. `..` is resolved by the filesystem, as the kernel will when QEMU
    opens the file (after a symlinked folder, `..` is the link target's parent, not the
    lexical one): the folder goes through realpath(), the last component is kept as is so
    that a symlink there is still seen, and refused, when the image is probed."""
    if not name or "\0" in name:
        raise SecurityError(f"refusing the image {image}: its backing file name {name!r} is not a path")
    joined = name if name.startswith("/") else os.path.join(os.path.dirname(image), name)
    folder, last = os.path.split(joined)
    if last in ("", ".", ".."):
        raise SecurityError(f"refusing the image {image}: its backing file name {name!r} names a folder")
    return os.path.join(os.path.realpath(folder or "/"), last)


def with_backing_files(resources: list[Resource], storage_roots: list[str]) -> list[Resource]:
    """Add the backing chain of each qcow2 disk whose definition does not spell it out.

    libvirt probes image headers the same way; QEMU opens the whole chain, so a base image
    left unlabelled makes the start fail. Only files under the storage roots are probed:
    an image outside them is refused by the driver anyway, and probing it would read it.
    A symlink, FIFO or device in the chain raises SecurityError (see qcow2_backing_file).
    """
    roots = [os.path.realpath(r).rstrip("/") + "/" for r in storage_roots]

    def under_roots(resolved: str) -> bool:
        # `resolved` has no symlink but perhaps its last component, which the probe refuses.
        return any(resolved.startswith(root) for root in roots)

    known = {r.path for r in resources}
    out = list(resources)
    for res in resources:
        if res.kind != "disk":
            continue
        # The disk itself may be reached through a symlink (the driver resolves it the same
        # way); a block device or a folder (<disk type='block'|'dir'>) has no header to read.
        current = os.path.realpath(res.path)
        try:
            mode = os.stat(current).st_mode
        except OSError:
            continue  # missing: the driver says so, with the path
        if stat.S_ISBLK(mode) or stat.S_ISDIR(mode):
            continue
        for _ in range(MAX_BACKING_CHAIN):
            if not under_roots(current):
                break
            backing = qcow2_backing_file(current)
            if backing is None or backing in known:
                break
            known.add(backing)
            out.append(Resource(path=backing, readonly=True, shared=True, kind="backing"))
            current = backing
    return out


def capability_emulators(capabilities_xml: str) -> list[str]:
    """The <emulator> paths libvirt's capabilities list, one per guest architecture."""
    parser = etree.XMLParser(resolve_entities=False, no_network=True)
    root = etree.fromstring(capabilities_xml.encode(), parser)
    return sorted({e.text.strip() for e in root.iterfind("guest/arch//emulator") if e.text and e.text.strip()})


class SecurityWorker:
    def __init__(
        self, config: Config, context: zmq.Context, driver: str, worker_id: str | None = None,
        *, label_pause_s: float = 0.0,
    ):
        """label_pause_s: crash tests only (tests/paused_security_worker.py), never a config
        key: the driver sleeps this long after each file or profile it writes."""
        if driver not in ("dac", "apparmor"):
            raise ConfigError(f"unknown security driver '{driver}'")
        self.config = config
        self.context = context
        self.driver_name = driver
        self.worker_id = worker_id or f"sw-{driver}-{uuidlib.uuid4().hex[:8]}"
        state_dir = os.path.join(config.state_dir, f"security-{driver}")
        # Before the store is opened or any file touched: a second worker of this driver
        # would recover() the first one's transactions under way.
        self.state_lock = StateLock(os.path.join(state_dir, "driver.lock"), f"a {driver} security worker")
        try:
            self._start(config, context, driver, state_dir, label_pause_s)
        except BaseException:
            self.state_lock.release()
            raise

    def _start(self, config: Config, context: zmq.Context, driver: str, state_dir: str, label_pause_s: float) -> None:
        try:
            conn = libvirt.open(config.uri)
        except libvirt.libvirtError as e:
            raise ConfigError(f"cannot connect to {config.uri}: {e.get_error_message()}") from e
        try:
            self.host_id = host_id_for(conn, config.uri)
            capabilities = conn.getCapabilities()
        finally:
            conn.close()
        self.static_apparmor = "<model>apparmor</model>" in capabilities
        if not config.storage_roots:
            raise ConfigError(f"the {driver} driver needs at least one storage root (--storage-root DIR)")
        self.driver: DacDriver | AppArmorDriver
        if driver == "dac":
            self.uid, self.gid = guest_ids(config.guest_user)
            self.driver = DacDriver(
                state_dir, self.uid, self.gid, config.storage_roots, config.serialization,
                pause_after_each_s=label_pause_s,
            )
        else:
            emulators = config.allowed_emulators or capability_emulators(capabilities)
            self.driver = AppArmorDriver(
                state_dir, os.path.join(state_dir, "profiles"), config.storage_roots, emulators, config.serialization,
                pause_after_write_s=label_pause_s,
            )
        recovered = self.driver.recover()
        if recovered:
            log.info("%s: rolled back %d unfinished labelling transaction(s) after a restart", driver, len(recovered))
        self.stopping = False
        self.busy = 0
        self.pool = ThreadPoolExecutor(max_workers=config.security_slots, thread_name_prefix=f"sec-{driver}")
        self._local = threading.local()
        self.link = BrokerLink(context, config, self.worker_id)
        self.inproc = context.socket(zmq.PULL)
        self.inproc.setsockopt(zmq.LINGER, 0)
        self.inproc.bind(f"{INPROC_URL}-{self.worker_id}")

    def close(self) -> None:
        """Let go of everything this worker holds, the state-dir lock last."""
        self.pool.shutdown(wait=True)
        self.sock.close(linger=0)
        self.inproc.close(linger=0)
        self.driver.store.close()
        self.state_lock.release()

    # -- what one request does, in a pool thread
    def handle(self, request: p.LabelRequest) -> p.LabelReply:
        try:
            detail = self._apply(request)
            return self._reply(request, ok=True, detail=detail)
        except VirtbrokerError as e:
            return self._reply(request, ok=False, error=e.message)
        except Exception as e:
            log.exception("%s %s of %s crashed", self.driver_name, request.action, request.domain_name)
            return self._reply(request, ok=False, error=f"internal error: {e}")

    def _apply(self, request: p.LabelRequest) -> dict:
        if request.action == "restore":
            restored = self.driver.restore(request.domain_uuid)
            return {"restored": restored if isinstance(restored, list) else [restored] if restored else []}
        if request.action != "label":
            raise VirtbrokerError(f"unknown label action '{request.action}'")
        resources = find_resources(request.xml, model=self.driver_name)
        # Both drivers need the chain: DAC chowns it, AppArmor lists it in the profile.
        resources = with_backing_files(resources, self.config.storage_roots)
        if isinstance(self.driver, DacDriver):
            labelled = self.driver.label(request.domain_uuid, resources)
            return {"uid": self.uid, "gid": self.gid, "labelled": labelled}
        profile = self.driver.label(request.domain_uuid, request.domain_name, resources, emulator_path(request.xml))
        return {"profile": profile, "static_label": self.static_apparmor}

    def _reply(self, request: p.LabelRequest, ok: bool, error: str | None = None, detail: dict | None = None):
        return p.LabelReply(
            worker_id=self.worker_id, label_id=request.label_id, driver=self.driver_name, ok=ok, error=error,
            detail=detail or {},
        )

    def _in_thread(self, request: p.LabelRequest) -> None:
        started = time.monotonic()
        reply = self.handle(request)
        log.info(
            "%s %s %s: %s in %.1f ms%s", self.driver_name, request.action, request.domain_name,
            "ok" if reply.ok else "refused", (time.monotonic() - started) * 1000,
            f": {reply.error}" if reply.error else "",
        )
        sock = getattr(self._local, "sock", None)
        if sock is None:
            sock = self._local.sock = self.context.socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(f"{INPROC_URL}-{self.worker_id}")
        sock.send_multipart(p.encode(reply))

    # -- the main thread owns the broker socket
    def hello(self) -> None:
        self.sock.send_multipart(p.encode(p.Hello(
            worker_id=self.worker_id, role="security", host_id=self.host_id, uri=self.config.uri,
            slots=self.config.security_slots, drivers=[self.driver_name],
        )))

    def run(self) -> None:
        self.hello()
        log.info("%s security worker %s on %s (%s serialization)", self.driver_name, self.worker_id, self.host_id,
                 self.config.serialization)
        self.poller = poller = zmq.Poller()
        for sock in self.link.sockets():
            poller.register(sock, zmq.POLLIN)
        poller.register(self.inproc, zmq.POLLIN)
        interval_s = self.config.heartbeat_interval_s
        next_beat = time.monotonic() + interval_s
        stop_deadline = None
        while True:
            if self.stopping and stop_deadline is None:
                # Stop taking requests; finish the transactions under way so no file is left half done.
                self.sock.send_multipart(p.encode(p.Bye(worker_id=self.worker_id)))
                stop_deadline = time.monotonic() + 30
            if stop_deadline is not None and (self.busy == 0 or time.monotonic() > stop_deadline):
                break
            ready = dict(poller.poll(max(0, min(200, int((next_beat - time.monotonic()) * 1000)))))
            if self.link.lost(ready, time.monotonic()):
                self._rejoin("the broker went away")
            elif self.sock in ready:
                self._drain_broker()
            if self.inproc in ready:
                while True:
                    try:
                        frames = self.inproc.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    self.busy -= 1
                    self.sock.send_multipart(frames)
            if time.monotonic() >= next_beat:
                self.sock.send_multipart(p.encode(p.Heartbeat(worker_id=self.worker_id, lease_ids=[])))
                next_beat = time.monotonic() + interval_s
        self.pool.shutdown(wait=True)
        self.sock.send_multipart(p.encode(p.Bye(worker_id=self.worker_id)))  # now with nothing in flight
        self.close()

    @property
    def sock(self) -> zmq.Socket:
        """The DEALER to the (leading) broker."""
        return self.link.sock

    def _rejoin(self, why: str, leader_url: str | None = None) -> None:
        """After a move to another broker (BrokerLink): watch its socket and register there."""
        self.link.move_polled(self.poller, leader_url)
        log.info("%s: now talking to %s", why, self.link.url)
        self.hello()

    def _drain_broker(self) -> None:
        for msg in drain(self.sock, p.WORKER_VERSION, log):
            if isinstance(msg, p.NotLeader):
                self._rejoin("the broker stands by", msg.leader_url or None)
                return
            if isinstance(msg, p.LabelRequest):
                if self.stopping:
                    self.sock.send_multipart(p.encode(self._reply(msg, ok=False, error="security worker is stopping")))
                    continue
                self.busy += 1
                self.pool.submit(self._in_thread, msg)
            elif isinstance(msg, p.Reregister):
                self.hello()


def run_security_worker(
    config: Config, driver: str, worker_id: str | None = None, *, label_pause_s: float = 0.0
) -> int:
    context = zmq.Context()
    try:
        worker = SecurityWorker(config, context, driver, worker_id, label_pause_s=label_pause_s)
    except BaseException:
        context.destroy(linger=0)
        raise
    return run_until_signalled(worker, context)
