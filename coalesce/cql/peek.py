"""Reading one field of a body without decoding the whole message.

For a proxy that forwards bodies untouched and only needs to classify them.
Each function reads a few bytes at fixed offsets, allocates only its
result, and raises `CQLProtocolError` if the body is too short or holds the
wrong kind of message.
"""

from __future__ import annotations

import struct
from typing import Final

from ._wire import Reader, decode_guard
from .codes import ResultKind
from .errors import CQLProtocolError
from .frame import Opcode

__all__ = [
    "peek_consistency",
    "peek_execute_id",
    "peek_prepared_id",
    "peek_query_string",
    "peek_result_kind",
    "query_parameters_offset",
]

_SHORT: Final = struct.Struct(">H")
_INT: Final = struct.Struct(">i")


def peek_query_string(body: bytes) -> str:
    """The CQL text of a QUERY or PREPARE body (its leading [long string])."""
    return decode_guard("QUERY/PREPARE", lambda: Reader(body).long_string())


def peek_execute_id(body: bytes) -> bytes:
    """The prepared statement id of an EXECUTE body (its leading [short bytes])."""
    return decode_guard("EXECUTE", lambda: Reader(body).short_bytes())


def peek_result_kind(body: bytes) -> int:
    """The kind of a RESULT body (a `ResultKind` value)."""
    if len(body) < 4:
        raise CQLProtocolError("RESULT body shorter than its kind")
    return int(_INT.unpack_from(body)[0])


def peek_prepared_id(body: bytes) -> bytes:
    """The statement id of a RESULT body of kind PREPARED."""
    kind = peek_result_kind(body)
    if kind != ResultKind.PREPARED:
        raise CQLProtocolError(f"RESULT kind {kind} is not PREPARED")
    return decode_guard("RESULT", lambda: Reader(body, 4).short_bytes())


def query_parameters_offset(opcode: int, body: bytes) -> int:
    """Where <query_parameters> start in a QUERY or EXECUTE body.

    The [consistency] is at that offset and the flags [byte] right after;
    the bytes from there to the end are everything that parameterizes the
    statement.
    """
    try:
        if opcode == Opcode.QUERY:
            (n,) = _INT.unpack_from(body)
            if n < 0:
                raise CQLProtocolError(f"negative query length {n}")
            offset = 4 + int(n)
        elif opcode == Opcode.EXECUTE:
            offset = 2 + int(_SHORT.unpack_from(body)[0])
        else:
            raise CQLProtocolError(f"opcode 0x{opcode:02x} has no query parameters")
    except struct.error:
        raise CQLProtocolError("body too short for its statement") from None
    if offset + 3 > len(body):
        raise CQLProtocolError("body too short for its query parameters")
    return offset


def peek_consistency(opcode: int, body: bytes) -> int:
    """The [consistency] of a QUERY or EXECUTE body."""
    return int(_SHORT.unpack_from(body, query_parameters_offset(opcode, body))[0])
