"""A bare client of libvirt's remote protocol for tests: frames, calls, the connect sequence."""

from __future__ import annotations

import socket
import struct
import time

from virtbroker.gateway import rpc
from virtbroker.gateway.rpc import Header
from virtbroker.gateway.xdr import Packer


class RawClient:
    def __init__(self, path: str, timeout_s: float = 10.0):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout_s)
        self.sock.connect(path)
        self.serial = 0
        self.buffer = b""

    def close(self) -> None:
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def send_call(self, proc: int, body: bytes = b"", prog: int = rpc.REMOTE_PROGRAM, vers: int = rpc.REMOTE_VERSION,
                  kind: int = rpc.TYPE_CALL) -> int:
        serial = self.serial
        self.serial += 1
        self.sock.sendall(rpc.frame(Header(prog, vers, proc, kind, serial, rpc.STATUS_OK), body))
        return serial

    def recv(self) -> tuple[Header, bytes] | None:
        """The next frame, or None when the server closed the connection."""
        while True:
            if len(self.buffer) >= 4:
                length = struct.unpack(">I", self.buffer[:4])[0]
                if len(self.buffer) >= length:
                    data, self.buffer = self.buffer[4:length], self.buffer[length:]
                    return Header.unpack(data), data[rpc.HEADER_BYTES:]
            chunk = self.sock.recv(65536)
            if not chunk:
                return None
            self.buffer += chunk

    def reply_to(self, serial: int) -> tuple[Header, bytes] | None:
        while True:
            got = self.recv()
            if got is None or (got[0].type == rpc.TYPE_REPLY and got[0].serial == serial):
                return got

    def call(self, proc: int, body: bytes = b"") -> tuple[Header, bytes]:
        got = self.reply_to(self.send_call(proc, body))
        assert got is not None, f"connection closed instead of answering procedure {proc}"
        return got

    def open(self, read_only: bool = False) -> RawClient:
        header, _ = self.call(rpc.PROC_AUTH_LIST)
        assert header.status == rpc.STATUS_OK
        header, body = self.call(rpc.PROC_CONNECT_OPEN, bytes(Packer().optional_string("qemu:///system").uint(int(read_only))))
        assert header.status == rpc.STATUS_OK, rpc.decode_error(body)
        return self


def wait_for_gateway(path: str, alive, timeout_s: float = 20.0) -> None:
    """Until an AUTH_LIST is answered on path; alive() false means the process died."""
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        if not alive():
            raise RuntimeError("gateway exited")
        try:
            with RawClient(path, timeout_s=1.0) as c:
                header, _ = c.call(rpc.PROC_AUTH_LIST)
                if header.status == rpc.STATUS_OK:
                    return
        except OSError as e:
            last = e
        time.sleep(0.05)
    raise RuntimeError(f"gateway did not answer on {path}: {last}")
