"""libvirt's remote protocol on the wire: framing, the 24-byte header, programs, procedure numbers,
error and event codes (see /work/shared/LIBVIRT-RPC.md and docs/LIBVIRT.md)."""

from __future__ import annotations

import struct
from dataclasses import dataclass

from virtbroker.gateway.xdr import Packer, Unpacker, XdrError

LENGTH_BYTES = 4
HEADER_BYTES = 24
# libvirt's clients refuse frames over 4 + 32 MiB; a frame's length counts its own 4 bytes.
MAX_FRAME_BYTES = LENGTH_BYTES + 32 * 1024 * 1024
MIN_FRAME_BYTES = LENGTH_BYTES + HEADER_BYTES

# Programs and versions.
REMOTE_PROGRAM = 0x20008086
REMOTE_VERSION = 1
QEMU_PROGRAM = 0x20008087
KEEPALIVE_PROGRAM = 0x6B656570
KEEPALIVE_VERSION = 1
KEEPALIVE_PING = 1
KEEPALIVE_PONG = 2

# Message types and statuses.
TYPE_CALL = 0
TYPE_REPLY = 1
TYPE_MESSAGE = 2
TYPE_STREAM = 3
TYPE_CALL_WITH_FDS = 4
STATUS_OK = 0
STATUS_ERROR = 1

# Procedures of program REMOTE (remote_protocol.x's remote_procedure).
PROC_CONNECT_OPEN = 1
PROC_CONNECT_CLOSE = 2
PROC_CONNECT_GET_TYPE = 3
PROC_CONNECT_GET_VERSION = 4
PROC_CONNECT_GET_MAX_VCPUS = 5
PROC_NODE_GET_INFO = 6
PROC_CONNECT_GET_CAPABILITIES = 7
PROC_DOMAIN_CREATE = 9
PROC_DOMAIN_CREATE_XML = 10
PROC_DOMAIN_DEFINE_XML = 11
PROC_DOMAIN_DESTROY = 12
PROC_DOMAIN_GET_XML_DESC = 14
PROC_DOMAIN_GET_AUTOSTART = 15
PROC_DOMAIN_GET_INFO = 16
PROC_DOMAIN_GET_OS_TYPE = 19
PROC_DOMAIN_LOOKUP_BY_ID = 22
PROC_DOMAIN_LOOKUP_BY_NAME = 23
PROC_DOMAIN_LOOKUP_BY_UUID = 24
PROC_CONNECT_LIST_DEFINED_DOMAINS = 21
PROC_CONNECT_NUM_OF_DEFINED_DOMAINS = 25
PROC_DOMAIN_REBOOT = 27
PROC_DOMAIN_RESUME = 28
PROC_DOMAIN_SET_AUTOSTART = 29
PROC_DOMAIN_SHUTDOWN = 33
PROC_DOMAIN_SUSPEND = 34
PROC_DOMAIN_UNDEFINE = 35
PROC_CONNECT_LIST_DOMAINS = 37
PROC_CONNECT_NUM_OF_DOMAINS = 51
PROC_CONNECT_GET_HOSTNAME = 59
PROC_CONNECT_SUPPORTS_FEATURE = 60
PROC_AUTH_LIST = 66
PROC_NODE_GET_SECURITY_MODEL = 122
PROC_DOMAIN_GET_SECURITY_LABEL = 121
PROC_DOMAIN_IS_ACTIVE = 150
PROC_DOMAIN_IS_PERSISTENT = 151
PROC_CONNECT_GET_LIB_VERSION = 157
PROC_CONNECT_BASELINE_CPU = 162
PROC_DOMAIN_HAS_MANAGED_SAVE_IMAGE = 183
PROC_DOMAIN_SNAPSHOT_NUM = 187
PROC_DOMAIN_CREATE_WITH_FLAGS = 196
PROC_DOMAIN_GET_STATE = 212
PROC_DOMAIN_UNDEFINE_FLAGS = 231
PROC_DOMAIN_DESTROY_FLAGS = 234
PROC_DOMAIN_SHUTDOWN_FLAGS = 258
PROC_CONNECT_LIST_ALL_DOMAINS = 273
PROC_CONNECT_LIST_ALL_STORAGE_POOLS = 281
PROC_CONNECT_DOMAIN_EVENT_CALLBACK_REGISTER_ANY = 316
PROC_CONNECT_DOMAIN_EVENT_CALLBACK_DEREGISTER_ANY = 317
PROC_DOMAIN_EVENT_CALLBACK_LIFECYCLE = 318
PROC_DOMAIN_EVENT_CALLBACK_REBOOT = 319
PROC_CONNECT_GET_DOMAIN_CAPABILITIES = 342
PROC_DOMAIN_DEFINE_XML_FLAGS = 350
PROC_CONNECT_REGISTER_CLOSE_CALLBACK = 360
PROC_CONNECT_UNREGISTER_CLOSE_CALLBACK = 361
PROC_CONNECT_BASELINE_HYPERVISOR_CPU = 394
PROC_DOMAIN_GET_MESSAGES = 426

# virErrorNumber.
ERR_INTERNAL_ERROR = 1
ERR_NO_SUPPORT = 3
ERR_INVALID_ARG = 8
ERR_OPERATION_FAILED = 9
ERR_XML_ERROR = 27
ERR_DOM_EXIST = 28
ERR_OPERATION_DENIED = 29
ERR_RPC = 39
ERR_NO_DOMAIN = 42
ERR_OPERATION_INVALID = 55
ERR_OPERATION_TIMEOUT = 68
# virErrorDomain.
FROM_RPC = 7
FROM_QEMU = 10
FROM_REMOTE = 13
FROM_DOMAIN = 20
ERR_LEVEL_ERROR = 2

# Lifecycle events and their details (virDomainEventType / virDomainEvent*DetailType).
EVENT_ID_LIFECYCLE = 0
EVENT_ID_REBOOT = 1
EVENT_ID_LAST = 26  # libvirt 9.0 knows ids 0..25; virsh event --all registers each
EV_DEFINED, EV_UNDEFINED, EV_STARTED, EV_SUSPENDED, EV_RESUMED, EV_STOPPED = 0, 1, 2, 3, 4, 5
DETAIL_DEFINED_ADDED, DETAIL_DEFINED_UPDATED = 0, 1
DETAIL_UNDEFINED_REMOVED = 0
DETAIL_STARTED_BOOTED = 0
DETAIL_SUSPENDED_PAUSED = 0
DETAIL_RESUMED_UNPAUSED = 0
DETAIL_STOPPED_SHUTDOWN, DETAIL_STOPPED_DESTROYED, DETAIL_STOPPED_CRASHED = 0, 1, 2

# virDomainState and reasons.
STATE_NOSTATE, STATE_RUNNING, STATE_PAUSED, STATE_SHUTOFF = 0, 1, 3, 5
REASON_RUNNING_BOOTED = 1
REASON_PAUSED_USER = 1
REASON_SHUTOFF_UNKNOWN, REASON_SHUTOFF_SHUTDOWN, REASON_SHUTOFF_DESTROYED = 0, 1, 2

# virDrvFeature numbers the remote client asks about.
FEATURE_PROGRAM_KEEPALIVE = 10
FEATURE_REMOTE_EVENT_CALLBACK = 14
FEATURE_REMOTE_CLOSE_CALLBACK = 15

AUTH_NONE = 0


@dataclass(frozen=True)
class Header:
    prog: int
    vers: int
    proc: int
    type: int
    serial: int
    status: int

    def pack(self) -> bytes:
        return struct.pack(">IIiiIi", self.prog, self.vers, self.proc, self.type, self.serial, self.status)

    @classmethod
    def unpack(cls, data: bytes) -> Header:
        if len(data) < HEADER_BYTES:
            raise XdrError(f"header of {len(data)} bytes, wanted {HEADER_BYTES}")
        return cls(*struct.unpack(">IIiiIi", data[:HEADER_BYTES]))

    def reply(self, status: int = STATUS_OK) -> Header:
        """The header of the answer to this call: prog, vers, proc and serial echoed."""
        return Header(self.prog, self.vers, self.proc, TYPE_REPLY, self.serial, status)


def frame(header: Header, body: bytes = b"") -> bytes:
    return struct.pack(">I", LENGTH_BYTES + HEADER_BYTES + len(body)) + header.pack() + body


def frame_length(word: bytes) -> int:
    """The length a frame's first 4 bytes announce (counting themselves)."""
    return struct.unpack(">I", word)[0]


@dataclass
class RemoteError(Exception):
    """An error to send as remote_error; raised by handlers, caught by the dispatcher."""

    code: int
    message: str
    domain: int = FROM_QEMU

    def __str__(self) -> str:
        return self.message

    def body(self) -> bytes:
        # remote_error: code, domain, message, level, dom (absent), str1..3, int1, int2, net (absent).
        # str1 carries the message's prefix, as libvirt's own errors do ("Domain not found").
        prefix = self.message.split(":", 1)[0] if ":" in self.message else None
        return bytes(
            Packer().int(self.code).int(self.domain).optional_string(self.message).int(ERR_LEVEL_ERROR)
            .uint(0).optional_string(prefix).optional_string(None).optional_string(None)
            .int(-1).int(-1).uint(0)
        )


def decode_error(data: bytes) -> tuple[int, int, str | None]:
    """(code, domain, message) of a remote_error body: for tests and the bench."""
    u = Unpacker(data)
    return u.int(), u.int(), u.optional_string()


def no_support(proc: int) -> RemoteError:
    # The wording libvirtd uses: the remote client turns "unknown procedure" with code RPC
    # into VIR_ERR_NO_SUPPORT, and callers take their usual fall-backs.
    return RemoteError(ERR_RPC, f"unknown procedure: {proc}", FROM_RPC)
