"""What a decision needs from a raw QUERY/EXECUTE/ERROR body, read without decoding it.

The sidecar forwards bodies untouched. These helpers read the few fields it decides
on -- the default timestamp (to leave it out of a coalescing key), the bound values
(for a routing key) and an error's code -- at fixed offsets, allocating only their
result. Malformed input raises `CQLProtocolError`, as the codec's own peeks do.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Final

from coalesce.cql import CQLProtocolError, Opcode, query_parameters_offset

__all__ = [
    "bound_values",
    "error_code",
    "is_serial",
    "key_body",
    "routing_key",
]

_VALUES: Final = 0x01
_DEFAULT_TIMESTAMP: Final = 0x20
_NAMES_FOR_VALUES: Final = 0x40
_SHORT: Final = struct.Struct(">H")
_SERIAL: Final = frozenset({0x0008, 0x0009})  # SERIAL, LOCAL_SERIAL
_INT: Final = struct.Struct(">i")


def key_body(opcode: int, body: bytes) -> bytes:
    """`body` without its client-side default timestamp, for use in a coalescing key.

    cassandra-driver stamps every request with the client's clock (flag 0x20, an 8-byte
    [long] that is the last field of a v4 <query_parameters>), so two identical reads
    never have identical bodies. A read's answer does not depend on that timestamp;
    every other byte (statement or id, values, consistency, page size, paging state,
    serial consistency, the other flags) stays, because each may change the answer.
    """
    offset = query_parameters_offset(opcode, body)
    flags = body[offset + 2]
    if not flags & _DEFAULT_TIMESTAMP:
        return body
    if len(body) < offset + 3 + 8:
        raise CQLProtocolError("query parameters too short for their timestamp")
    return b"".join(
        (body[: offset + 2], bytes((flags & ~_DEFAULT_TIMESTAMP,)), body[offset + 3 : -8])
    )


def is_serial(opcode: int, body: bytes) -> bool:
    """Whether a QUERY or EXECUTE reads at SERIAL or LOCAL_SERIAL consistency.

    Such a read promises linearizability: it must see every write that completed
    before it started, even one made without the sidecar, so it never joins a read
    that started earlier.
    """
    offset = query_parameters_offset(opcode, body)
    return int(_SHORT.unpack_from(body, offset)[0]) in _SERIAL


def bound_values(opcode: int, body: bytes) -> list[bytes | None] | None:
    """The positional bound values of a QUERY or EXECUTE body.

    None when the request has no values or names them (named values cannot be mapped
    to partition-key positions without the statement's metadata). An "unset" value
    comes back as None, like NULL: neither can be part of a routing key.
    """
    offset = query_parameters_offset(opcode, body)
    flags = body[offset + 2]
    if not flags & _VALUES or flags & _NAMES_FOR_VALUES:
        return None
    pos = offset + 3
    try:
        (count,) = _SHORT.unpack_from(body, pos)
        pos += 2
        values: list[bytes | None] = []
        for _ in range(count):
            (size,) = _INT.unpack_from(body, pos)
            pos += 4
            if size < 0:
                values.append(None)
                continue
            end = pos + size
            if end > len(body):
                raise CQLProtocolError("bound value runs past the end of the body")
            values.append(body[pos:end])
            pos = end
    except struct.error:
        raise CQLProtocolError("body too short for its bound values") from None
    return values


def routing_key(values: Sequence[bytes | None], pk_indexes: Sequence[int]) -> bytes | None:
    """The serialized partition key, as Scylla hashes it, or None if a part is missing.

    One component is its value as is; a composite key is each component as a [short]
    length, the bytes and a zero byte, the layout the drivers hash too.
    """
    if not pk_indexes:
        return None
    parts: list[bytes] = []
    for index in pk_indexes:
        if index >= len(values):
            return None
        value = values[index]
        if value is None:
            return None
        parts.append(value)
    if len(parts) == 1:
        return parts[0]
    out = bytearray()
    for part in parts:
        if len(part) > 0xFFFF:
            return None
        out += _SHORT.pack(len(part))
        out += part
        out += b"\x00"
    return bytes(out)


def error_code(opcode: int, body: bytes) -> int | None:
    """The code of an ERROR body (extras already stripped), None for other opcodes."""
    if opcode != Opcode.ERROR or len(body) < 4:
        return None
    return int(_INT.unpack_from(body)[0])
