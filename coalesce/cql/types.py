"""CQL value types: parsing type names, (de)serializing values, [option] codec.

A `CqlType` turns one Python value into the bytes of a CQL value body and
back. It never sees NULL: a null cell is a [bytes] of length -1 one level up,
so `serialize(None)` is a `TypeError`.

Python mapping (as cassandra-driver 3.x, except where noted):

=================  =================================================================
int/bigint/...     `int`
boolean            `bool`
float/double       `float` (an `int` is accepted on serialize)
decimal            `decimal.Decimal` (`int`/`str` accepted on serialize)
varint             `int`
text/varchar       `str` (text and varchar are the same type, named "text")
ascii              `str`
blob               `bytes` (`bytearray`/`memoryview` accepted on serialize)
uuid / timeuuid    `uuid.UUID`; timeuuid must be version 1
timestamp          `datetime.datetime`, decoded as naive UTC; naive input is taken
                   as UTC, aware input is converted; an `int` is milliseconds since
                   the epoch. Values outside datetime's range decode to that `int`.
date               `datetime.date`; an `int` is the raw wire value (2**31 = epoch),
                   as in the driver; out-of-range dates decode to that `int`.
time               `int` nanoseconds since midnight (`datetime.time` accepted)
inet               decoded as `str` (as the driver); `str` or `ipaddress` objects in
duration           `Duration(months, days, nanoseconds)`; any object with those
                   three attributes (the driver's `Duration`) is accepted
list               `list`
set                `frozenset`, or a `list` in wire order when an element is not
                   hashable (e.g. `set<frozen<list<int>>>`)
map                `dict`, or a `list` of `(key, value)` pairs when a key is not
                   hashable
tuple              `tuple`, padded with `None` when the wire carries fewer fields
user type          `dict` of field name to value
=================  =================================================================

An empty value body (zero bytes) of a fixed-width type decodes to `None`, as
Cassandra's legacy "empty" values do in the driver; text, ascii and blob
decode it to the empty string/bytes.

Errors: `deserialize` raises `InvalidValueError` (a `CQLProtocolError` with
code INVALID) for bytes that are not a valid value of the type;
`serialize` raises `TypeError` for a Python value of the wrong kind and
`ValueError` for one out of range. Types are immutable, hashable, compare
equal by `cql_name`, and are safe to share between threads.
"""

from __future__ import annotations

import datetime
import decimal
import ipaddress
import struct
import uuid
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, ClassVar, Final, NamedTuple

from ._wire import Reader, decode_guard, pack_short, w_string
from .errors import CQLProtocolError, InvalidValueError

__all__ = [
    "TYPE_BY_NAME",
    "CqlType",
    "CustomType",
    "Duration",
    "ListType",
    "MapType",
    "SetType",
    "TupleType",
    "UserType",
    "decode_option",
    "parse_type",
]

# [option] ids, native protocol v4 section 4.2.5.2.
_ID_CUSTOM: Final = 0x0000
_ID_LIST: Final = 0x0020
_ID_MAP: Final = 0x0021
_ID_SET: Final = 0x0022
_ID_UDT: Final = 0x0030
_ID_TUPLE: Final = 0x0031
# v5 gives duration its own id; v4 sends it as this custom class.
_ID_DURATION_V5: Final = 0x0015
_DURATION_CLASS: Final = "org.apache.cassandra.db.marshal.DurationType"

# A hostile [option] could nest list<list<...>> until the stack overflows.
_MAX_NESTING: Final = 32

_EPOCH: Final = datetime.datetime(1970, 1, 1)
_EPOCH_ORDINAL: Final = datetime.date(1970, 1, 1).toordinal()
_DATE_CENTER: Final = 2**31
_NANOS_PER_DAY: Final = 86_400 * 10**9

_INT32: Final = struct.Struct(">i")
_UINT32: Final = struct.Struct(">I")
_INT64: Final = struct.Struct(">q")
_FLOAT: Final = struct.Struct(">f")
_DOUBLE: Final = struct.Struct(">d")


class CqlType:
    """One CQL type: its name, value codec and [option] encoding.

    Subclasses implement `serialize`/`deserialize`; `cql_name` is the
    canonical name (`"map<text, int>"`, `"frozen<list<int>>"`). The
    `frozen` marker is part of the name and of equality, but not of the wire
    [option] (the protocol does not carry it): `decode_option` returns an
    unfrozen collection at the top level and frozen ones nested inside it
    (the only kind CQL allows there).
    """

    __slots__ = ("cql_name",)
    type_id: ClassVar[int]

    def __init__(self, cql_name: str) -> None:
        self.cql_name = cql_name

    def serialize(self, value: Any) -> bytes:
        """The value body for `value` (no length prefix)."""
        raise NotImplementedError

    def deserialize(self, data: bytes) -> Any:
        """The Python value for a value body (no length prefix)."""
        raise NotImplementedError

    def encode_option(self) -> bytes:
        """This type as a protocol [option] (for result metadata)."""
        return pack_short(self.type_id)

    @property
    def is_collection(self) -> bool:
        """True for list, set and map (not tuple or user types)."""
        return False

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, CqlType):
            return NotImplemented
        return self.cql_name == other.cql_name

    def __hash__(self) -> int:
        return hash(self.cql_name)

    def __repr__(self) -> str:
        return f"parse_type({self.cql_name!r})"

    def __str__(self) -> str:
        return self.cql_name


def _bad(t: CqlType, data: bytes, why: str) -> InvalidValueError:
    return InvalidValueError(f"invalid {t.cql_name} value ({len(data)} bytes): {why}")


def _type_error(t: CqlType, value: object) -> TypeError:
    return TypeError(f"cannot serialize {type(value).__name__} {value!r:.60} as {t.cql_name}")


# -- fixed-width numbers ------------------------------------------------------


class _IntegerType(CqlType):
    __slots__ = ("_hi", "_lo", "_pack", "_size", "_unpack")
    _format: ClassVar[str]

    def __init__(self, cql_name: str) -> None:
        super().__init__(cql_name)
        s = struct.Struct(self._format)
        self._pack = s.pack
        self._unpack = s.unpack
        self._size = s.size
        self._lo = -(1 << (s.size * 8 - 1))
        self._hi = (1 << (s.size * 8 - 1)) - 1

    def serialize(self, value: Any) -> bytes:
        if not isinstance(value, int):
            raise _type_error(self, value)
        if not self._lo <= value <= self._hi:
            raise ValueError(f"{value} out of range for {self.cql_name}")
        return self._pack(value)

    def deserialize(self, data: bytes) -> Any:
        if len(data) != self._size:
            if not data:
                return None
            raise _bad(self, data, f"expected {self._size} bytes")
        return self._unpack(data)[0]


class _IntType(_IntegerType):
    __slots__ = ()
    type_id = 0x0009
    _format = ">i"


class _BigintType(_IntegerType):
    __slots__ = ()
    type_id = 0x0002
    _format = ">q"


class _CounterType(_BigintType):
    __slots__ = ()
    type_id = 0x0005


class _SmallintType(_IntegerType):
    __slots__ = ()
    type_id = 0x0013
    _format = ">h"


class _TinyintType(_IntegerType):
    __slots__ = ()
    type_id = 0x0014
    _format = ">b"


class _BooleanType(CqlType):
    __slots__ = ()
    type_id = 0x0004

    def serialize(self, value: Any) -> bytes:
        if not isinstance(value, bool | int):
            raise _type_error(self, value)
        return b"\x01" if value else b"\x00"

    def deserialize(self, data: bytes) -> Any:
        if len(data) != 1:
            if not data:
                return None
            raise _bad(self, data, "expected 1 byte")
        return data[0] != 0


class _FloatingType(CqlType):
    __slots__ = ("_struct",)

    def __init__(self, cql_name: str, s: struct.Struct) -> None:
        super().__init__(cql_name)
        self._struct = s

    def serialize(self, value: Any) -> bytes:
        if not isinstance(value, float | int) or isinstance(value, bool):
            raise _type_error(self, value)
        try:
            return self._struct.pack(value)
        except (struct.error, OverflowError) as exc:
            raise ValueError(f"{value!r} out of range for {self.cql_name}") from exc

    def deserialize(self, data: bytes) -> Any:
        if len(data) != self._struct.size:
            if not data:
                return None
            raise _bad(self, data, f"expected {self._struct.size} bytes")
        return self._struct.unpack(data)[0]


class _FloatType(_FloatingType):
    __slots__ = ()
    type_id = 0x0008


class _DoubleType(_FloatingType):
    __slots__ = ()
    type_id = 0x0007


def _varint_bytes(n: int) -> bytes:
    # Minimal two's complement, as Cassandra's BigInteger.toByteArray().
    return n.to_bytes(((n if n >= 0 else ~n).bit_length() + 8) // 8, "big", signed=True)


class _VarintType(CqlType):
    __slots__ = ()
    type_id = 0x000E

    def serialize(self, value: Any) -> bytes:
        if not isinstance(value, int):
            raise _type_error(self, value)
        return _varint_bytes(value)

    def deserialize(self, data: bytes) -> Any:
        if not data:
            return None
        return int.from_bytes(data, "big", signed=True)


class _DecimalType(CqlType):
    __slots__ = ()
    type_id = 0x0006

    def serialize(self, value: Any) -> bytes:
        if isinstance(value, decimal.Decimal):
            dec = value
        elif isinstance(value, int | str) and not isinstance(value, bool):
            try:
                dec = decimal.Decimal(value)
            except decimal.InvalidOperation as exc:
                raise ValueError(f"{value!r} is not a decimal") from exc
        else:
            raise _type_error(self, value)
        if not dec.is_finite():
            raise ValueError(f"{value!r} cannot be stored in a decimal")
        sign, digits, exponent = dec.as_tuple()
        assert isinstance(exponent, int)
        unscaled = int("".join(map(str, digits)) or "0")
        if sign:
            unscaled = -unscaled
        if not -(2**31) <= -exponent < 2**31:
            raise ValueError(f"decimal scale out of range: {value!r}")
        return _INT32.pack(-exponent) + _varint_bytes(unscaled)

    def deserialize(self, data: bytes) -> Any:
        if len(data) < 5:
            if not data:
                return None
            raise _bad(self, data, "expected a 4-byte scale and a varint")
        scale = _INT32.unpack_from(data)[0]
        unscaled = int.from_bytes(data[4:], "big", signed=True)
        # Built from the digit tuple: exact, whatever the decimal context.
        sign, digits, _ = decimal.Decimal(unscaled).as_tuple()
        return decimal.Decimal((sign, digits, -scale))


# -- strings and bytes ---------------------------------------------------------


class _TextType(CqlType):
    __slots__ = ()
    type_id = 0x000D

    def serialize(self, value: Any) -> bytes:
        if isinstance(value, str):
            return value.encode("utf-8")
        if isinstance(value, bytes):
            return value
        raise _type_error(self, value)

    def deserialize(self, data: bytes) -> Any:
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise _bad(self, data, f"not UTF-8 ({exc.reason})") from None


class _AsciiType(CqlType):
    __slots__ = ()
    type_id = 0x0001

    def serialize(self, value: Any) -> bytes:
        if isinstance(value, str):
            return value.encode("ascii")  # UnicodeEncodeError is a ValueError
        if isinstance(value, bytes):
            if not value.isascii():
                raise ValueError(f"{value!r:.60} is not ASCII")
            return value
        raise _type_error(self, value)

    def deserialize(self, data: bytes) -> Any:
        if not data.isascii():
            raise _bad(self, data, "not ASCII")
        return data.decode("ascii")


class _BlobType(CqlType):
    __slots__ = ()
    type_id = 0x0003

    def serialize(self, value: Any) -> bytes:
        if isinstance(value, bytes):
            return value
        if isinstance(value, bytearray | memoryview):
            return bytes(value)
        raise _type_error(self, value)

    def deserialize(self, data: bytes) -> Any:
        return bytes(data)


# -- uuids ---------------------------------------------------------------------


class _UUIDType(CqlType):
    __slots__ = ()
    type_id = 0x000C

    def serialize(self, value: Any) -> bytes:
        if isinstance(value, uuid.UUID):
            return value.bytes
        raise _type_error(self, value)

    def deserialize(self, data: bytes) -> Any:
        if len(data) != 16:
            if not data:
                return None
            raise _bad(self, data, "expected 16 bytes")
        return uuid.UUID(bytes=bytes(data))


class _TimeUUIDType(_UUIDType):
    __slots__ = ()
    type_id = 0x000F

    def serialize(self, value: Any) -> bytes:
        if isinstance(value, uuid.UUID):
            if value.version != 1:
                raise ValueError(f"{value} is not a time-based (version 1) UUID")
            return value.bytes
        raise _type_error(self, value)

    def deserialize(self, data: bytes) -> Any:
        u = super().deserialize(data)
        if u is not None and u.version != 1:
            raise _bad(self, data, "not a version 1 UUID")
        return u


# -- time ----------------------------------------------------------------------


class _TimestampType(CqlType):
    __slots__ = ()
    type_id = 0x000B

    def serialize(self, value: Any) -> bytes:
        if isinstance(value, datetime.datetime):
            if value.tzinfo is not None:
                value = value.astimezone(datetime.UTC).replace(tzinfo=None)
            delta = value - _EPOCH
            millis = (delta.days * 86_400 + delta.seconds) * 1000 + delta.microseconds // 1000
        elif isinstance(value, datetime.date):
            millis = (value.toordinal() - _EPOCH_ORDINAL) * 86_400_000
        elif isinstance(value, int) and not isinstance(value, bool):
            millis = value
        else:
            raise _type_error(self, value)
        try:
            return _INT64.pack(millis)
        except struct.error as exc:
            raise ValueError(f"{value!r} out of range for timestamp") from exc

    def deserialize(self, data: bytes) -> Any:
        if len(data) != 8:
            if not data:
                return None
            raise _bad(self, data, "expected 8 bytes")
        millis: int = _INT64.unpack(data)[0]
        try:
            return _EPOCH + datetime.timedelta(milliseconds=millis)
        except OverflowError:
            return millis


class _DateType(CqlType):
    __slots__ = ()
    type_id = 0x0011

    def serialize(self, value: Any) -> bytes:
        if isinstance(value, datetime.datetime):
            value = value.date()
        if isinstance(value, datetime.date):
            raw = value.toordinal() - _EPOCH_ORDINAL + _DATE_CENTER
        elif isinstance(value, int) and not isinstance(value, bool):
            raw = value
        elif isinstance(value, str):
            try:
                raw = datetime.date.fromisoformat(value).toordinal() - _EPOCH_ORDINAL + _DATE_CENTER
            except ValueError as exc:
                raise ValueError(f"{value!r} is not a YYYY-MM-DD date") from exc
        else:
            raise _type_error(self, value)
        if not 0 <= raw < 2**32:
            raise ValueError(f"{value!r} out of range for date")
        return _UINT32.pack(raw)

    def deserialize(self, data: bytes) -> Any:
        if len(data) != 4:
            if not data:
                return None
            raise _bad(self, data, "expected 4 bytes")
        raw: int = _UINT32.unpack(data)[0]
        ordinal = raw - _DATE_CENTER + _EPOCH_ORDINAL
        if 1 <= ordinal <= _MAX_ORDINAL:
            return datetime.date.fromordinal(ordinal)
        return raw


_MAX_ORDINAL: Final = datetime.date.max.toordinal()


class _TimeType(CqlType):
    __slots__ = ()
    type_id = 0x0012

    def serialize(self, value: Any) -> bytes:
        if isinstance(value, datetime.time):
            nanos = (
                value.hour * 3600 + value.minute * 60 + value.second
            ) * 10**9 + value.microsecond * 1000
        elif isinstance(value, int) and not isinstance(value, bool):
            nanos = value
        else:
            raise _type_error(self, value)
        if not 0 <= nanos < _NANOS_PER_DAY:
            raise ValueError(f"{value!r} is not a time of day in nanoseconds")
        return _INT64.pack(nanos)

    def deserialize(self, data: bytes) -> Any:
        if len(data) != 8:
            if not data:
                return None
            raise _bad(self, data, "expected 8 bytes")
        nanos: int = _INT64.unpack(data)[0]
        if not 0 <= nanos < _NANOS_PER_DAY:
            raise _bad(self, data, f"{nanos} ns is not a time of day")
        return nanos


class Duration(NamedTuple):
    """A CQL duration: months, days and nanoseconds, each signed."""

    months: int = 0
    days: int = 0
    nanoseconds: int = 0


def _zigzag_vint(n: int) -> bytes:
    # Cassandra's VIntCoding: zig-zag, then N leading one-bits for N extra bytes.
    v = (n << 1) ^ (n >> 63)
    if v < 0x80:
        return bytes((v,))
    extra = 1
    while extra < 8 and v >= 1 << (7 * (extra + 1)):
        extra += 1
    if extra == 8:
        return b"\xff" + v.to_bytes(8, "big")
    raw = bytearray(v.to_bytes(extra + 1, "big"))
    raw[0] |= (0xFF << (8 - extra)) & 0xFF
    return bytes(raw)


def _read_vint(data: bytes, pos: int) -> tuple[int, int]:
    first = data[pos]
    extra = 8 - (~first & 0xFF).bit_length()
    end = pos + 1 + extra
    if end > len(data):
        raise IndexError("truncated vint")
    v = first & (0xFF >> extra) if extra < 8 else 0
    for b in data[pos + 1 : end]:
        v = (v << 8) | b
    return (v >> 1) ^ -(v & 1), end


class _DurationType(CqlType):
    __slots__ = ()
    type_id = _ID_CUSTOM

    def encode_option(self) -> bytes:
        return pack_short(_ID_CUSTOM) + w_string(_DURATION_CLASS)

    def serialize(self, value: Any) -> bytes:
        try:
            m, d, n = int(value.months), int(value.days), int(value.nanoseconds)
        except AttributeError:
            raise _type_error(self, value) from None
        if not (-(2**31) <= m < 2**31 and -(2**31) <= d < 2**31 and -(2**63) <= n < 2**63):
            raise ValueError(f"{value!r} out of range for duration")
        if not (m <= 0 and d <= 0 and n <= 0) and not (m >= 0 and d >= 0 and n >= 0):
            raise ValueError(f"{value!r}: months, days and nanoseconds must share a sign")
        return _zigzag_vint(m) + _zigzag_vint(d) + _zigzag_vint(n)

    def deserialize(self, data: bytes) -> Any:
        if not data:
            return None
        try:
            m, pos = _read_vint(data, 0)
            d, pos = _read_vint(data, pos)
            n, pos = _read_vint(data, pos)
        except IndexError:
            raise _bad(self, data, "truncated") from None
        if pos != len(data):
            raise _bad(self, data, "trailing bytes")
        return Duration(m, d, n)


# -- inet ----------------------------------------------------------------------


class _InetType(CqlType):
    __slots__ = ()
    type_id = 0x0010

    def serialize(self, value: Any) -> bytes:
        if isinstance(value, ipaddress.IPv4Address | ipaddress.IPv6Address):
            return value.packed
        if isinstance(value, str):
            try:
                return ipaddress.ip_address(value).packed
            except ValueError as exc:
                raise ValueError(f"cannot interpret {value!r} as an inet address") from exc
        raise _type_error(self, value)

    def deserialize(self, data: bytes) -> Any:
        if len(data) == 4:
            return str(ipaddress.IPv4Address(bytes(data)))
        if len(data) == 16:
            return str(ipaddress.IPv6Address(bytes(data)))
        if not data:
            return None
        raise _bad(self, data, "expected 4 or 16 bytes")


# -- custom --------------------------------------------------------------------


class CustomType(CqlType):
    """A custom (Java class) type: values pass through as raw bytes."""

    __slots__ = ("class_name",)
    type_id = _ID_CUSTOM

    def __init__(self, class_name: str) -> None:
        super().__init__(f"'{class_name}'")
        self.class_name = class_name

    def encode_option(self) -> bytes:
        return pack_short(_ID_CUSTOM) + w_string(self.class_name)

    def serialize(self, value: Any) -> bytes:
        if isinstance(value, bytes | bytearray | memoryview):
            return bytes(value)
        raise _type_error(self, value)

    def deserialize(self, data: bytes) -> Any:
        return bytes(data)


# -- collections ---------------------------------------------------------------


def _frozen_name(inner: str, frozen: bool) -> str:
    return f"frozen<{inner}>" if frozen else inner


def _pack_items(t: CqlType, items: Iterable[Any], elem: CqlType) -> list[bytes]:
    parts: list[bytes] = []
    ser = elem.serialize
    for item in items:
        if item is None:
            parts.append(b"\xff\xff\xff\xff")
        else:
            b = ser(item)
            parts.append(_INT32.pack(len(b)))
            parts.append(b)
    return parts


class _ItemReader:
    """Reads [int]-length-prefixed items out of a collection value body."""

    __slots__ = ("_t", "data", "pos")

    def __init__(self, t: CqlType, data: bytes) -> None:
        self._t = t
        self.data = data
        self.pos = 0

    def count(self) -> int:
        if len(self.data) - self.pos < 4:
            raise _bad(self._t, self.data, "truncated element count")
        (n,) = _INT32.unpack_from(self.data, self.pos)
        self.pos += 4
        if n < 0 or n * 4 > len(self.data) - self.pos:
            raise _bad(self._t, self.data, f"impossible element count {n}")
        return int(n)

    def item(self, elem: CqlType) -> Any:
        data, pos = self.data, self.pos
        if len(data) - pos < 4:
            raise _bad(self._t, data, "truncated element")
        (n,) = _INT32.unpack_from(data, pos)
        pos += 4
        if n < 0:
            self.pos = pos
            return None
        end = pos + n
        if end > len(data):
            raise _bad(self._t, data, "element runs past the end")
        self.pos = end
        return elem.deserialize(data[pos:end])

    def done(self) -> None:
        if self.pos != len(self.data):
            raise _bad(self._t, self.data, "trailing bytes")


def _hashable(items: list[Any]) -> bool:
    try:
        for i in items:
            hash(i)
    except TypeError:
        return False
    return True


class ListType(CqlType):
    """`list<T>` (or `frozen<list<T>>`); decodes to a `list`."""

    __slots__ = ("element", "frozen")
    type_id = _ID_LIST

    def __init__(self, element: CqlType, *, frozen: bool = False) -> None:
        super().__init__(_frozen_name(f"list<{element.cql_name}>", frozen))
        self.element = element
        self.frozen = frozen

    @property
    def is_collection(self) -> bool:
        return True

    def encode_option(self) -> bytes:
        return pack_short(self.type_id) + self.element.encode_option()

    def serialize(self, value: Any) -> bytes:
        if isinstance(value, str | bytes | Mapping) or not isinstance(value, Iterable):
            raise _type_error(self, value)
        items = list(value)
        return b"".join([_INT32.pack(len(items)), *_pack_items(self, items, self.element)])

    def deserialize(self, data: bytes) -> Any:
        if not data:
            return None
        r = _ItemReader(self, data)
        elem = self.element
        out = [r.item(elem) for _ in range(r.count())]
        r.done()
        return out


class SetType(ListType):
    """`set<T>`; decodes to a `frozenset` (a `list` if elements are unhashable).

    Serializing emits elements in iteration order; Scylla itself keeps sets
    sorted, which is the caller's concern.
    """

    __slots__ = ()
    type_id = _ID_SET

    def __init__(self, element: CqlType, *, frozen: bool = False) -> None:
        super().__init__(element, frozen=frozen)
        self.cql_name = _frozen_name(f"set<{element.cql_name}>", frozen)

    def deserialize(self, data: bytes) -> Any:
        items = super().deserialize(data)
        if items is None or not _hashable(items):
            return items
        return frozenset(items)


class MapType(CqlType):
    """`map<K, V>`; decodes to a `dict` (pairs list if keys are unhashable)."""

    __slots__ = ("frozen", "key", "value")
    type_id = _ID_MAP

    def __init__(self, key: CqlType, value: CqlType, *, frozen: bool = False) -> None:
        super().__init__(_frozen_name(f"map<{key.cql_name}, {value.cql_name}>", frozen))
        self.key = key
        self.value = value
        self.frozen = frozen

    @property
    def is_collection(self) -> bool:
        return True

    def encode_option(self) -> bytes:
        return pack_short(self.type_id) + self.key.encode_option() + self.value.encode_option()

    def serialize(self, value: Any) -> bytes:
        if isinstance(value, Mapping):
            pairs = list(value.items())
        elif isinstance(value, Iterable) and not isinstance(value, str | bytes):
            pairs = [tuple(p) for p in value]
            if any(len(p) != 2 for p in pairs):
                raise _type_error(self, value)
        else:
            raise _type_error(self, value)
        parts = [_INT32.pack(len(pairs))]
        kser, vser = self.key.serialize, self.value.serialize
        for k, v in pairs:
            for item, ser in ((k, kser), (v, vser)):
                if item is None:
                    parts.append(b"\xff\xff\xff\xff")
                else:
                    b = ser(item)
                    parts.append(_INT32.pack(len(b)))
                    parts.append(b)
        return b"".join(parts)

    def deserialize(self, data: bytes) -> Any:
        if not data:
            return None
        r = _ItemReader(self, data)
        kt, vt = self.key, self.value
        pairs = []
        for _ in range(r.count()):
            k = r.item(kt)
            pairs.append((k, r.item(vt)))
        r.done()
        if _hashable([k for k, _ in pairs]):
            return dict(pairs)
        return pairs


class TupleType(CqlType):
    """`tuple<A, B, ...>`; decodes to a `tuple` padded with `None`.

    Tuples are always frozen in CQL, so the canonical name is
    `frozen<tuple<...>>` whichever way it was written.
    """

    __slots__ = ("elements",)
    type_id = _ID_TUPLE
    frozen: Final = True

    def __init__(self, elements: Sequence[CqlType]) -> None:
        inner = ", ".join(e.cql_name for e in elements)
        super().__init__(f"frozen<tuple<{inner}>>")
        self.elements = tuple(elements)

    def encode_option(self) -> bytes:
        return (
            pack_short(self.type_id)
            + pack_short(len(self.elements))
            + b"".join(e.encode_option() for e in self.elements)
        )

    def serialize(self, value: Any) -> bytes:
        if not isinstance(value, tuple | list):
            raise _type_error(self, value)
        if len(value) > len(self.elements):
            raise ValueError(f"{len(value)} values for {self.cql_name}")
        parts: list[bytes] = []
        for item, elem in zip(value, self.elements, strict=False):
            if item is None:
                parts.append(b"\xff\xff\xff\xff")
            else:
                b = elem.serialize(item)
                parts.append(_INT32.pack(len(b)))
                parts.append(b)
        return b"".join(parts)

    def deserialize(self, data: bytes) -> Any:
        if not data:
            return None
        r = _ItemReader(self, data)
        out: list[Any] = []
        for elem in self.elements:
            if r.pos >= len(data):
                out.append(None)
            else:
                out.append(r.item(elem))
        r.done()
        return tuple(out)


class UserType(CqlType):
    """A user-defined type `keyspace.name`; decodes to a `dict` by field name."""

    __slots__ = ("fields", "frozen", "keyspace", "name")
    type_id = _ID_UDT

    def __init__(
        self,
        keyspace: str,
        name: str,
        fields: Sequence[tuple[str, CqlType]],
        *,
        frozen: bool = False,
    ) -> None:
        super().__init__(_frozen_name(f"{keyspace}.{name}", frozen))
        self.keyspace = keyspace
        self.name = name
        self.fields = tuple(fields)
        self.frozen = frozen

    def encode_option(self) -> bytes:
        parts = [
            pack_short(self.type_id),
            w_string(self.keyspace),
            w_string(self.name),
            pack_short(len(self.fields)),
        ]
        for fname, ftype in self.fields:
            parts.append(w_string(fname))
            parts.append(ftype.encode_option())
        return b"".join(parts)

    def serialize(self, value: Any) -> bytes:
        if isinstance(value, Mapping):
            unknown = set(value) - {f for f, _ in self.fields}
            if unknown:
                raise ValueError(f"unknown fields {sorted(unknown)} for {self.cql_name}")
            items = [value.get(f) for f, _ in self.fields]
        elif isinstance(value, tuple | list):
            items = list(value)
        else:
            raise _type_error(self, value)
        return TupleType([t for _, t in self.fields]).serialize(items)

    def deserialize(self, data: bytes) -> Any:
        values = TupleType([t for _, t in self.fields]).deserialize(data)
        if values is None:
            return None
        return {f: v for (f, _), v in zip(self.fields, values, strict=True)}


# -- registry ------------------------------------------------------------------

_NATIVE: Final[tuple[CqlType, ...]] = (
    _AsciiType("ascii"),
    _BigintType("bigint"),
    _BlobType("blob"),
    _BooleanType("boolean"),
    _CounterType("counter"),
    _DecimalType("decimal"),
    _DoubleType("double", _DOUBLE),
    _FloatType("float", _FLOAT),
    _IntType("int"),
    _TimestampType("timestamp"),
    _UUIDType("uuid"),
    _TextType("text"),
    _VarintType("varint"),
    _TimeUUIDType("timeuuid"),
    _InetType("inet"),
    _DateType("date"),
    _TimeType("time"),
    _SmallintType("smallint"),
    _TinyintType("tinyint"),
    _DurationType("duration"),
)

TYPE_BY_NAME: Final[Mapping[str, CqlType]] = {
    **{t.cql_name: t for t in _NATIVE},
    "varchar": next(t for t in _NATIVE if t.cql_name == "text"),
}
"""Every native (non-parameterized) type by CQL name; varchar is text."""

_BY_ID: Final[dict[int, CqlType]] = {t.type_id: t for t in _NATIVE if t.type_id != _ID_CUSTOM}
_BY_ID[_ID_DURATION_V5] = TYPE_BY_NAME["duration"]

_CUSTOM_BY_CLASS: Final[dict[str, CqlType]] = {_DURATION_CLASS: TYPE_BY_NAME["duration"]}


# -- [option] decoding --------------------------------------------------------


def decode_option(buf: bytes, offset: int = 0) -> tuple[CqlType, int]:
    """Decode one [option] at `offset`; return the type and the next offset.

    Raises `CQLProtocolError` on truncated input, an unknown type id or
    nesting deeper than 32 levels.
    """
    r = Reader(buf, offset)
    t = decode_guard("type [option]", lambda: _read_option(r, 0))
    return t, r.pos


def _read_option(r: Reader, depth: int = 0) -> CqlType:
    if depth > _MAX_NESTING:
        raise CQLProtocolError("type [option] nested too deeply")
    type_id = r.short()
    native = _BY_ID.get(type_id)
    if native is not None:
        return native
    # CQL only allows frozen collections inside others, so anything below
    # the top level is known to be frozen even though the wire omits it.
    nested = depth > 0
    if type_id == _ID_LIST:
        return ListType(_read_option(r, depth + 1), frozen=nested)
    if type_id == _ID_SET:
        return SetType(_read_option(r, depth + 1), frozen=nested)
    if type_id == _ID_MAP:
        k = _read_option(r, depth + 1)
        return MapType(k, _read_option(r, depth + 1), frozen=nested)
    if type_id == _ID_TUPLE:
        return TupleType([_read_option(r, depth + 1) for _ in range(r.short())])
    if type_id == _ID_UDT:
        ks = r.string()
        name = r.string()
        fields = []
        for _ in range(r.short()):
            fname = r.string()
            fields.append((fname, _read_option(r, depth + 1)))
        return UserType(ks, name, fields)
    if type_id == _ID_CUSTOM:
        class_name = r.string()
        return _CUSTOM_BY_CLASS.get(class_name) or CustomType(class_name)
    raise CQLProtocolError(f"unknown type [option] id 0x{type_id:04x}")


# -- parsing CQL type names ----------------------------------------------------


def parse_type(name: str) -> CqlType:
    """Parse a CQL type name such as ``"map<text, frozen<list<int>>>"``.

    Case-insensitive, whitespace-tolerant. A quoted Java class name
    (``"'org.apache...Type'"``) gives a `CustomType`. Raises `ValueError`
    naming the problem for unknown types, bad syntax, a wrong number of type
    parameters, or a non-frozen collection nested inside another collection
    (which CQL forbids).
    """
    if not isinstance(name, str):
        raise TypeError(f"type name must be str, not {type(name).__name__}")
    p = _TypeNameParser(name)
    t = p.parse(top_level=True)
    p.expect_end()
    return t


class _TypeNameParser:
    __slots__ = ("_i", "_src", "_toks")

    def __init__(self, src: str) -> None:
        self._src = src
        self._toks = _tokenize(src)
        self._i = 0

    def _err(self, why: str) -> ValueError:
        return ValueError(f"invalid CQL type {self._src!r}: {why}")

    def _next(self) -> str:
        if self._i >= len(self._toks):
            raise self._err("unexpected end")
        tok = self._toks[self._i]
        self._i += 1
        return tok

    def _peek(self) -> str | None:
        return self._toks[self._i] if self._i < len(self._toks) else None

    def expect_end(self) -> None:
        if self._i != len(self._toks):
            raise self._err(f"unexpected {self._toks[self._i]!r}")

    def _params(self) -> list[CqlType]:
        if self._next() != "<":
            raise self._err("expected '<'")
        out = [self.parse(top_level=False)]
        while (tok := self._next()) == ",":
            out.append(self.parse(top_level=False))
        if tok != ">":
            raise self._err(f"expected ',' or '>', got {tok!r}")
        return out

    def parse(self, *, top_level: bool, frozen: bool = False) -> CqlType:
        tok = self._next()
        if tok.startswith("'"):
            return CustomType(tok[1:-1])
        word = tok.lower()
        if word == "frozen":
            (inner,) = self._arity(self._params_frozen(), 1, "frozen")
            return inner
        if word in ("list", "set", "map", "tuple"):
            params = self._params()
            if word != "tuple":
                for p in params:
                    if p.is_collection and not getattr(p, "frozen", True):
                        raise self._err(
                            f"non-frozen collection {p.cql_name} is not allowed inside a "
                            f"collection; use frozen<{p.cql_name}>"
                        )
            if word == "list":
                (e,) = self._arity(params, 1, word)
                return ListType(e, frozen=frozen)
            if word == "set":
                (e,) = self._arity(params, 1, word)
                return SetType(e, frozen=frozen)
            if word == "map":
                k, v = self._arity(params, 2, word)
                return MapType(k, v, frozen=frozen)
            return TupleType(params)
        native = TYPE_BY_NAME.get(word)
        if native is None:
            raise self._err(f"unknown type {tok!r}")
        if frozen:
            raise self._err(f"frozen<> applies to collections and tuples, not {word}")
        return native

    def _params_frozen(self) -> list[CqlType]:
        if self._next() != "<":
            raise self._err("expected '<' after frozen")
        inner = self.parse(top_level=False, frozen=True)
        if self._next() != ">":
            raise self._err("frozen<> takes exactly one type")
        return [inner]

    def _arity(self, params: list[CqlType], n: int, what: str) -> list[CqlType]:
        if len(params) != n:
            raise self._err(f"{what}<> takes {n} type parameter(s), got {len(params)}")
        return params


def _tokenize(src: str) -> list[str]:
    toks: list[str] = []
    i, n = 0, len(src)
    while i < n:
        c = src[i]
        if c.isspace():
            i += 1
        elif c in "<>,":
            toks.append(c)
            i += 1
        elif c == "'":
            end = src.find("'", i + 1)
            if end < 0:
                raise ValueError(f"invalid CQL type {src!r}: unterminated quote")
            toks.append(src[i : end + 1])
            i = end + 1
        else:
            j = i
            while j < n and (src[j].isalnum() or src[j] in "_."):
                j += 1
            if j == i:
                raise ValueError(f"invalid CQL type {src!r}: unexpected {c!r}")
            toks.append(src[i:j])
            i = j
    if not toks:
        raise ValueError("invalid CQL type '': empty")
    return toks
