"""Host facts (capabilities, versions, node info, CPU baselines) read from the host's libvirtd over
a read-only connection, opened on first use. Nothing that changes the host goes this way."""

from __future__ import annotations

import threading

import libvirt

from virtbroker.gateway import rpc
from virtbroker.gateway.rpc import RemoteError


class HostFacts:
    def __init__(self, uri: str):
        self.uri = uri
        self._lock = threading.Lock()
        self._conn: libvirt.virConnect | None = None

    def conn(self) -> libvirt.virConnect:
        # A libvirt connection may be used from several threads; opening it is what needs the lock.
        with self._lock:
            if self._conn is None:
                try:
                    self._conn = libvirt.openReadOnly(self.uri)
                except libvirt.libvirtError as e:
                    raise _remote(e) from e
            return self._conn

    def ask(self, fn):
        """fn(conn) with libvirt's own error passed on; a broken connection is opened again next time."""
        conn = self.conn()
        try:
            return fn(conn)
        except libvirt.libvirtError as e:
            if e.get_error_code() in (libvirt.VIR_ERR_SYSTEM_ERROR, libvirt.VIR_ERR_INTERNAL_ERROR) and not conn.isAlive():
                with self._lock:
                    self._conn = None
            raise _remote(e) from e

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                try:
                    self._conn.close()
                except libvirt.libvirtError:
                    pass
                self._conn = None


def _remote(e: libvirt.libvirtError) -> RemoteError:
    return RemoteError(e.get_error_code() or rpc.ERR_INTERNAL_ERROR, e.get_error_message() or str(e),
                       e.get_error_domain() or rpc.FROM_QEMU)
