"""XDR (RFC 4506) as libvirt's remote protocol uses it: big-endian 4-byte words, padded opaques."""

from __future__ import annotations

import struct

from virtbroker.common.errors import ProtocolError

# The classes below have methods named int(): annotations inside them name the type by this.
Int = int

# libvirt's REMOTE_STRING_MAX: no string on the wire may be longer.
STRING_MAX_BYTES = 4 * 1024 * 1024
UUID_BYTES = 16


class XdrError(ProtocolError):
    """A body that does not decode as the procedure's arguments."""


class Packer:
    """Appends XDR items to a buffer; `bytes()` gives the body."""

    def __init__(self):
        self._parts: list[bytes] = []

    def __bytes__(self) -> bytes:
        return b"".join(self._parts)

    def int(self, value: Int) -> Packer:
        self._parts.append(struct.pack(">i", value))
        return self

    def uint(self, value: Int) -> Packer:
        self._parts.append(struct.pack(">I", value))
        return self

    def hyper(self, value: Int) -> Packer:
        self._parts.append(struct.pack(">q", value))
        return self

    def uhyper(self, value: Int) -> Packer:
        self._parts.append(struct.pack(">Q", value))
        return self

    def opaque_fixed(self, data: bytes) -> Packer:
        self._parts.append(data + b"\0" * (-len(data) % 4))
        return self

    def opaque(self, data: bytes) -> Packer:
        self.uint(len(data))
        return self.opaque_fixed(data)

    def string(self, text: str) -> Packer:
        return self.opaque(text.encode())

    def optional_string(self, text: str | None) -> Packer:
        """remote_string: a pointer, 0 for NULL, else 1 and the string."""
        if text is None:
            return self.uint(0)
        return self.uint(1).string(text)

    def char_array(self, text: str, fixed: Int | None = None) -> Packer:
        """`char x[N]` / `char x<N>`: rpcgen encodes each char as a whole word."""
        data = text.encode()
        if fixed is None:
            self.uint(len(data))
        else:
            data = data[:fixed].ljust(fixed, b"\0")
        for byte in data:
            self.int(byte - 256 if byte > 127 else byte)
        return self


class Unpacker:
    """Reads XDR items from a body; every read checks the bounds, `done()` checks nothing is left."""

    def __init__(self, data: bytes):
        self._data = memoryview(data)
        self._pos = 0

    def _take(self, n: Int) -> bytes:
        end = self._pos + n
        if n < 0 or end > len(self._data):
            raise XdrError(f"body ends early: wanted {n} bytes at offset {self._pos} of {len(self._data)}")
        out = bytes(self._data[self._pos:end])
        self._pos = end
        return out

    def int(self) -> Int:
        return struct.unpack(">i", self._take(4))[0]

    def uint(self) -> Int:
        return struct.unpack(">I", self._take(4))[0]

    def hyper(self) -> Int:
        return struct.unpack(">q", self._take(8))[0]

    def uhyper(self) -> Int:
        return struct.unpack(">Q", self._take(8))[0]

    def bool(self) -> bool:
        value = self.uint()
        if value > 1:
            raise XdrError(f"boolean word {value} is neither 0 nor 1")
        return bool(value)

    def opaque_fixed(self, n: Int) -> bytes:
        data = self._take(n)
        pad = self._take(-n % 4)
        if pad.strip(b"\0"):
            raise XdrError("non-zero padding")
        return data

    def opaque(self, max_bytes: Int = STRING_MAX_BYTES) -> bytes:
        n = self.uint()
        if n > max_bytes:
            raise XdrError(f"length {n} is over the limit of {max_bytes}")
        return self.opaque_fixed(n)

    def string(self, max_bytes: Int = STRING_MAX_BYTES) -> str:
        data = self.opaque(max_bytes)
        try:
            return data.decode()
        except UnicodeDecodeError as e:
            raise XdrError(f"string is not UTF-8: {e}") from None

    def optional_string(self) -> str | None:
        return self.string() if self.bool() else None

    def array_length(self, max_items: Int) -> Int:
        n = self.uint()
        if n > max_items:
            raise XdrError(f"array of {n} items is over the limit of {max_items}")
        return n

    def done(self) -> None:
        if self._pos != len(self._data):
            raise XdrError(f"{len(self._data) - self._pos} bytes left over after the arguments")
