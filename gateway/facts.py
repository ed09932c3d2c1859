"""Host facts (capabilities, versions, node info, CPU baselines) read from the host's libvirtd over
a read-only connection, opened on first use. Nothing that changes the host goes this way."""

from __future__ import annotations

import threading

import libvirt

from virtbroker.gateway import rpc
from virtbroker.gateway.rpc import RemoteError


class HostFacts:
    """Two lazily opened connections to the host's libvirtd: a read-only one for every fact, and
    a read-write one only for domain capabilities, which libvirtd's access rules refuse to
    read-only clients. Only getters are ever called on either."""

    def __init__(self, uri: str):
        self.uri = uri
        self._lock = threading.Lock()
        self._conns: dict[bool, libvirt.virConnect] = {}

    def conn(self, read_write: bool = False) -> libvirt.virConnect:
        # A libvirt connection may be used from several threads; opening it is what needs the lock.
        with self._lock:
            if read_write not in self._conns:
                try:
                    opener = libvirt.open if read_write else libvirt.openReadOnly
                    self._conns[read_write] = opener(self.uri)
                except libvirt.libvirtError as e:
                    raise _remote(e) from e
            return self._conns[read_write]

    def ask(self, fn, read_write: bool = False):
        """fn(conn) with libvirt's own error passed on; a broken connection is opened again next time."""
        conn = self.conn(read_write)
        try:
            return fn(conn)
        except libvirt.libvirtError as e:
            if not _alive(conn):
                with self._lock:
                    if self._conns.get(read_write) is conn:
                        del self._conns[read_write]
            raise _remote(e) from e

    def close(self) -> None:
        with self._lock:
            conns, self._conns = list(self._conns.values()), {}
        for conn in conns:
            try:
                conn.close()
            except libvirt.libvirtError:
                pass


def _alive(conn: libvirt.virConnect) -> bool:
    try:
        return bool(conn.isAlive())
    except libvirt.libvirtError:
        return False


def _remote(e: libvirt.libvirtError) -> RemoteError:
    return RemoteError(e.get_error_code() or rpc.ERR_INTERNAL_ERROR, e.get_error_message() or str(e),
                       e.get_error_domain() or rpc.FROM_QEMU)
