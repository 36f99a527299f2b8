"""Primitive notations of the native protocol ([short], [string], [bytes], ...).

Private to the codec. `Reader` walks a body and raises `CQLProtocolError`
when a length runs past the end; fixed-width reads rely on `struct.error`,
which the public decoders translate (see `decode_guard`).
"""

from __future__ import annotations

import ipaddress
import struct
import uuid
from collections.abc import Callable, Iterable, Mapping
from typing import Final, TypeVar

from .errors import CQLProtocolError

_T = TypeVar("_T")

_BYTE: Final = struct.Struct(">B")
_SHORT: Final = struct.Struct(">H")
_INT: Final = struct.Struct(">i")
_LONG: Final = struct.Struct(">q")

pack_byte: Final = _BYTE.pack
pack_short: Final = _SHORT.pack
pack_int: Final = _INT.pack
pack_long: Final = _LONG.pack

_NULL_LEN: Final = pack_int(-1)
_UNSET_LEN: Final = pack_int(-2)


class _Unset:
    """The v4 "unset" bound value (length -2): leave the column untouched."""

    __slots__ = ()
    _instance: _Unset | None = None

    def __new__(cls) -> _Unset:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "UNSET"

    def __reduce__(self) -> str:
        return "UNSET"


UNSET: Final = _Unset()

Value = bytes | None | _Unset


class Reader:
    """A cursor over one message body. Not thread-safe (nothing here is)."""

    __slots__ = ("data", "pos")

    def __init__(self, data: bytes, pos: int = 0) -> None:
        self.data = data
        self.pos = pos

    def remaining(self) -> int:
        return len(self.data) - self.pos

    def _take(self, n: int) -> bytes:
        start = self.pos
        end = start + n
        if n < 0 or end > len(self.data):
            raise CQLProtocolError(
                f"truncated message: need {n} bytes at offset {start}, "
                f"have {len(self.data) - start}"
            )
        self.pos = end
        return self.data[start:end]

    def byte(self) -> int:
        (v,) = _BYTE.unpack_from(self.data, self.pos)
        self.pos += 1
        return int(v)

    def short(self) -> int:
        (v,) = _SHORT.unpack_from(self.data, self.pos)
        self.pos += 2
        return int(v)

    def int32(self) -> int:
        (v,) = _INT.unpack_from(self.data, self.pos)
        self.pos += 4
        return int(v)

    def int64(self) -> int:
        (v,) = _LONG.unpack_from(self.data, self.pos)
        self.pos += 8
        return int(v)

    def string(self) -> str:
        return _utf8(self._take(self.short()))

    def long_string(self) -> str:
        n = self.int32()
        if n < 0:
            raise CQLProtocolError(f"negative [long string] length {n}")
        return _utf8(self._take(n))

    def nbytes(self) -> bytes | None:
        """A [bytes]: None for a negative length."""
        n = self.int32()
        if n < 0:
            return None
        return self._take(n)

    def value(self) -> Value:
        """A bound [value]: bytes, None (NULL, -1) or UNSET (-2)."""
        n = self.int32()
        if n >= 0:
            return self._take(n)
        if n == -1:
            return None
        if n == -2:
            return UNSET
        raise CQLProtocolError(f"invalid [value] length {n}")

    def short_bytes(self) -> bytes:
        return self._take(self.short())

    def string_list(self) -> list[str]:
        return [self.string() for _ in range(self.short())]

    def string_map(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for _ in range(self.short()):
            k = self.string()
            out[k] = self.string()
        return out

    def string_multimap(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for _ in range(self.short()):
            k = self.string()
            out[k] = self.string_list()
        return out

    def bytes_map(self) -> dict[str, bytes | None]:
        out: dict[str, bytes | None] = {}
        for _ in range(self.short()):
            k = self.string()
            out[k] = self.nbytes()
        return out

    def uuid(self) -> uuid.UUID:
        return uuid.UUID(bytes=self._take(16))

    def inet(self) -> tuple[str, int]:
        """An [inet]: (address as text, port)."""
        size = self.byte()
        if size not in (4, 16):
            raise CQLProtocolError(f"invalid [inet] address size {size}")
        raw = self._take(size)
        addr = ipaddress.IPv4Address(raw) if size == 4 else ipaddress.IPv6Address(raw)
        return str(addr), self.int32()


def _utf8(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CQLProtocolError(f"invalid UTF-8 in string: {exc.reason}") from None


def decode_guard(what: str, fn: Callable[[], _T]) -> _T:
    """Run `fn`, turning any low-level decoding failure into CQLProtocolError."""
    try:
        return fn()
    except CQLProtocolError:
        raise
    except (struct.error, IndexError, ValueError, OverflowError, TypeError) as exc:
        raise CQLProtocolError(f"malformed {what}: {exc}") from None


# -- writers -----------------------------------------------------------------


def w_string(s: str) -> bytes:
    raw = s.encode("utf-8")
    if len(raw) > 0xFFFF:
        raise ValueError(f"[string] too long ({len(raw)} bytes)")
    return pack_short(len(raw)) + raw


def w_long_string(s: str) -> bytes:
    raw = s.encode("utf-8")
    return pack_int(len(raw)) + raw


def w_bytes(b: bytes | None) -> bytes:
    if b is None:
        return _NULL_LEN
    return pack_int(len(b)) + b


def w_value(v: Value) -> bytes:
    if v is None:
        return _NULL_LEN
    if v is UNSET:
        return _UNSET_LEN
    assert isinstance(v, bytes | bytearray | memoryview)
    return pack_int(len(v)) + bytes(v)


def w_short_bytes(b: bytes) -> bytes:
    if len(b) > 0xFFFF:
        raise ValueError(f"[short bytes] too long ({len(b)} bytes)")
    return pack_short(len(b)) + b


def w_string_list(items: Iterable[str]) -> bytes:
    items = list(items)
    return pack_short(len(items)) + b"".join(w_string(s) for s in items)


def w_string_map(m: Mapping[str, str]) -> bytes:
    parts = [pack_short(len(m))]
    for k, v in m.items():
        parts.append(w_string(k))
        parts.append(w_string(v))
    return b"".join(parts)


def w_string_multimap(m: Mapping[str, Iterable[str]]) -> bytes:
    parts = [pack_short(len(m))]
    for k, v in m.items():
        parts.append(w_string(k))
        parts.append(w_string_list(v))
    return b"".join(parts)


def w_bytes_map(m: Mapping[str, bytes | None]) -> bytes:
    parts = [pack_short(len(m))]
    for k, v in m.items():
        parts.append(w_string(k))
        parts.append(w_bytes(v))
    return b"".join(parts)


def w_inet(address: str, port: int) -> bytes:
    packed = ipaddress.ip_address(address).packed
    return pack_byte(len(packed)) + packed + pack_int(port)
