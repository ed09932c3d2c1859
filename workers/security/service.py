"""Security worker: one driver (dac or apparmor) for one host, serving label requests routed by the broker.

Requests run in a thread pool, so two domains are labelled at the same time unless they
share a file; the drivers serialize only on the resolved paths they touch (or on one
host-wide lock when serialization = global, for comparison).
"""

from __future__ import annotations

import grp
import logging
import os
import pwd
import struct
import threading
import time
import uuid as uuidlib
from concurrent.futures import ThreadPoolExecutor

import libvirt
import zmq

from common import protocol as p
from common.config import Config
from common.process import connect_worker_socket, run_until_signalled
from common.errors import ConfigError, VirtbrokerError
from common.resources import Resource, emulator_path, find_resources
from common.wire import drain
from workers.lifecycle import host_id_for
from workers.security.apparmor import AppArmorDriver
from workers.security.dac import DacDriver

log = logging.getLogger("virtbroker.security")

INPROC_URL = "inproc://labels"


def guest_ids(spec: str) -> tuple[int, int]:
    """USER[:GROUP] -> (uid, gid); the group defaults to the user's primary group."""
    user, _, group = spec.partition(":")
    try:
        pw = pwd.getpwnam(user) if not user.isdigit() else pwd.getpwuid(int(user))
    except KeyError:
        raise ConfigError(f"guest user '{user}' does not exist") from None
    if not group:
        return pw.pw_uid, pw.pw_gid
    try:
        gid = int(group) if group.isdigit() else grp.getgrnam(group).gr_gid
    except KeyError:
        raise ConfigError(f"guest group '{group}' does not exist") from None
    return pw.pw_uid, gid


QCOW2_MAGIC = b"QFI\xfb"
QCOW2_HEADER = struct.Struct(">4sIQI")  # magic, version, backing_file_offset, backing_file_size
MAX_BACKING_CHAIN = 64  # QEMU's own limit on chain depth is far lower in practice


def qcow2_backing_file(path: str) -> str | None:
    """The backing file a qcow2 image names in its header (absolute), or None.

    Read from the header itself, as QEMU does, instead of running `qemu-img info` for
    every label: a fork per disk is what made labelling slow while guests start.
    """
    try:
        with open(path, "rb") as f:
            header = f.read(QCOW2_HEADER.size)
            if len(header) < QCOW2_HEADER.size:
                return None
            magic, _version, offset, size = QCOW2_HEADER.unpack(header)
            if magic != QCOW2_MAGIC or offset == 0 or not 0 < size <= 1023:
                return None
            f.seek(offset)
            name = f.read(size).decode("utf-8", errors="strict")
    except (OSError, UnicodeDecodeError):
        return None  # the driver reports missing or unreadable files with the path
    if "://" in name or name.startswith("json:"):
        return None  # a network backing store has no host path
    return os.path.normpath(os.path.join(os.path.dirname(path), name))


def with_backing_files(resources: list[Resource], storage_roots: list[str]) -> list[Resource]:
    """Add the backing chain of each qcow2 disk whose definition does not spell it out.

    libvirt probes image headers the same way; QEMU opens the whole chain, so a base image
    left unlabelled makes the start fail. Only files under the storage roots are probed:
    an image outside them is refused by the driver anyway, and probing it would read it.
    """
    roots = [os.path.realpath(r).rstrip("/") + "/" for r in storage_roots]

    def under_roots(path: str) -> bool:
        real = os.path.realpath(path)
        return any((real + "/").startswith(root) for root in roots)

    known = {r.path for r in resources}
    out = list(resources)
    for res in resources:
        if res.kind != "disk":
            continue
        current = res.path
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


def libvirt_has_apparmor(conn: libvirt.virConnect) -> bool:
    """Whether libvirt's capabilities list the apparmor security model (not on this kernel)."""
    return "<model>apparmor</model>" in conn.getCapabilities()


class SecurityWorker:
    def __init__(self, config: Config, context: zmq.Context, driver: str, worker_id: str | None = None):
        if driver not in ("dac", "apparmor"):
            raise ConfigError(f"unknown security driver '{driver}'")
        self.config = config
        self.context = context
        self.driver_name = driver
        self.worker_id = worker_id or f"sw-{driver}-{uuidlib.uuid4().hex[:8]}"
        conn = libvirt.open(config.uri)
        try:
            self.host_id = host_id_for(conn, config.uri)
            self.static_apparmor = libvirt_has_apparmor(conn)
        finally:
            conn.close()
        state_dir = os.path.join(config.state_dir, f"security-{driver}")
        if driver == "dac":
            if not config.storage_roots:
                raise ConfigError("the dac driver needs at least one storage root (--storage-root DIR)")
            self.uid, self.gid = guest_ids(config.guest_user)
            self.driver = DacDriver(
                state_dir, self.uid, self.gid, config.storage_roots, config.serialization,
                pause_after_each_s=config.label_pause_s,
            )
        else:
            self.driver = AppArmorDriver(
                state_dir, os.path.join(state_dir, "profiles"), config.serialization,
                pause_after_write_s=config.label_pause_s,
            )
        recovered = self.driver.recover()
        if recovered:
            log.info("%s: rolled back %d unfinished labelling transaction(s) after a restart", driver, len(recovered))
        self.stopping = False
        self.busy = 0
        self.pool = ThreadPoolExecutor(max_workers=config.security_slots, thread_name_prefix=f"sec-{driver}")
        self._local = threading.local()
        self.sock = connect_worker_socket(context, config, self.worker_id)
        self.inproc = context.socket(zmq.PULL)
        self.inproc.setsockopt(zmq.LINGER, 0)
        self.inproc.bind(f"{INPROC_URL}-{self.worker_id}")

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
        if self.config.storage_roots:
            resources = with_backing_files(resources, self.config.storage_roots)
        if self.driver_name == "dac":
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
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
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
            if self.sock in ready:
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
        self.sock.close(linger=0)
        self.inproc.close(linger=0)

    def _drain_broker(self) -> None:
        for msg in drain(self.sock, p.WORKER_VERSION, log):
            if isinstance(msg, p.LabelRequest):
                if self.stopping:
                    self.sock.send_multipart(p.encode(self._reply(msg, ok=False, error="security worker is stopping")))
                    continue
                self.busy += 1
                self.pool.submit(self._in_thread, msg)
            elif isinstance(msg, p.Reregister):
                self.hello()


def run_security_worker(config: Config, driver: str, worker_id: str | None = None) -> int:
    context = zmq.Context()
    worker = SecurityWorker(config, context, driver, worker_id)

    return run_until_signalled(worker, context)
