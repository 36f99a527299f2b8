"""A QUERY, EXECUTE, BATCH or PREPARE request, read once, as far as a proxy needs.

A proxy forwards request bodies untouched. `Request` reads the few fields its
decisions need at fixed offsets when it is made (the statement text or prepared id,
the consistency, the query-parameter flags), and walks the rest of the body only
when asked: `check` proves the body is well-formed before anyone sends it on (a
malformed body must cost its sender an error, never break a shared upstream
connection), `values` returns the bound values for routing, `statements` the members
of a BATCH. Malformed input raises `CQLProtocolError`.
"""

from __future__ import annotations

import struct
from typing import Final

from .errors import CQLProtocolError
from .frame import CUSTOM_PAYLOAD, Opcode

__all__ = ["SERIAL_CONSISTENCIES", "BatchMember", "Request"]

# Plain ints: comparing with an IntEnum member costs a class attribute lookup each time.
_QUERY: Final = int(Opcode.QUERY)
_EXECUTE: Final = int(Opcode.EXECUTE)
_PREPARE: Final = int(Opcode.PREPARE)
_BATCH: Final = int(Opcode.BATCH)
_CUSTOM_PAYLOAD: Final = CUSTOM_PAYLOAD
_SHORT: Final = struct.Struct(">H")
_INT: Final = struct.Struct(">i")

# <query_parameters> flags of protocol v4.
_VALUES: Final = 0x01
_PAGE_SIZE: Final = 0x04
_PAGING_STATE: Final = 0x08
_SERIAL: Final = 0x10
_TIMESTAMP: Final = 0x20
_NAMES: Final = 0x40
_KNOWN_QUERY_FLAGS: Final = 0x7F
_KNOWN_BATCH_FLAGS: Final = _SERIAL | _TIMESTAMP  # named values in a BATCH: never worked in v4
_MAX_CONSISTENCY: Final = 0x000A  # LOCAL_ONE

_FLAG_BYTES: Final = tuple(bytes((i,)) for i in range(256))

SERIAL_CONSISTENCIES: Final = frozenset({0x0008, 0x0009})
"""SERIAL and LOCAL_SERIAL: a read at either must see every write completed before it."""

BatchMember = tuple[str | None, bytes | None]
"""One statement of a BATCH: its text (kind 0) or its prepared id (kind 1)."""


class Request:
    """One client request as a proxy sees it.

    `body` is the frame body after decompression; `core` is `body` without its
    custom payload (the same object when there is none). For QUERY and EXECUTE,
    `params` is where <query_parameters> start in `core`, and `consistency` and
    `query_flags` are read from there; `text` is the statement of a QUERY or
    PREPARE, `query_id` the prepared id of an EXECUTE. BATCH and PREPARE read
    nothing more until asked.
    """

    __slots__ = (
        "_values", "body", "consistency", "core", "flags", "opcode", "params", "query_flags",
        "query_id", "stream", "text",
    )

    text: str | None
    query_id: bytes | None

    def __init__(self, stream: int, opcode: int, flags: int, body: bytes) -> None:
        self.stream = stream
        self.opcode = opcode
        self.flags = flags
        self.body = body
        self._values: list[bytes | None] | None = None  # collected by `check`
        core = _strip_payload(body) if flags & _CUSTOM_PAYLOAD else body
        self.core = core
        try:
            if opcode == _EXECUTE:
                params = 2 + (core[0] << 8 | core[1])
                self.query_id = core[2:params]
                self.text = None
            elif opcode in (_QUERY, _PREPARE):
                (n,) = _INT.unpack_from(core)
                if n < 0 or 4 + n > len(core):
                    raise CQLProtocolError("statement text runs past the end of the body")
                self.text = _utf8(core[4 : 4 + n])
                self.query_id = None
                params = 4 + n
                if opcode == _PREPARE:
                    if params != len(core):
                        raise CQLProtocolError("PREPARE body has bytes after its statement")
                    self.params = self.consistency = -1
                    self.query_flags = 0
                    return
            else:
                self.text = self.query_id = None
                self.params = self.consistency = -1
                self.query_flags = 0
                return
            self.params = params
            self.consistency = core[params] << 8 | core[params + 1]
            self.query_flags = core[params + 2]
        except (IndexError, struct.error):
            raise CQLProtocolError("body too short for its query parameters") from None

    def __repr__(self) -> str:
        return f"<Request stream={self.stream} opcode=0x{self.opcode:02x} {len(self.body)}B>"

    @property
    def serial(self) -> bool:
        """Reads at SERIAL or LOCAL_SERIAL consistency (never shared with earlier reads)."""
        return self.consistency in SERIAL_CONSISTENCIES

    def key_body(self) -> bytes:
        """`body` without the client's default timestamp: what a coalescing key holds.

        Drivers stamp every request with their clock (flag 0x20: an 8-byte [long], the
        last field of v4 <query_parameters>), so identical reads never have identical
        bodies. The answer of a read does not depend on it; every other byte does
        (statement, values, consistency, page size, paging state, other flags). The
        timestamp flag is set in every key, so a stamped read and an unstamped one meet.
        """
        qflags = self.query_flags
        body = self.body
        if qflags & _TIMESTAMP:
            return body[:-8]  # the flag stays set: unstamped bodies set it below
        if self.core is not body or self.params < 0:
            return body
        at = self.params + 2
        return b"".join((body[:at], _FLAG_BYTES[qflags | _TIMESTAMP], body[at + 1 :]))

    def check(self) -> None:
        """Walk the whole body; raise `CQLProtocolError` unless it is well-formed v4."""
        opcode = self.opcode
        if opcode in (_QUERY, _EXECUTE):
            qflags = self.query_flags
            if qflags & _VALUES and not qflags & _NAMES:
                self._values = []
            end = _skip_parameters(self.core, self.params, self._values)
        elif opcode == _BATCH:
            end = _walk_batch(self.core, None)
        else:
            return
        if end != len(self.core):
            raise CQLProtocolError(f"{len(self.core) - end} unexpected bytes after the request")

    def values(self) -> list[bytes | None] | None:
        """The positional bound values of a QUERY or EXECUTE (unset and NULL as None).

        None when there are none or they are named (names cannot be mapped to
        partition-key positions without the statement's metadata).
        """
        qflags = self.query_flags
        if not qflags & _VALUES or qflags & _NAMES or self.params < 0:
            return None
        if self._values is not None:  # `check` read them already
            return self._values
        values: list[bytes | None] = []
        _read_values(self.core, self.params + 3, False, values)
        return values

    def statements(self) -> list[BatchMember]:
        """The members of a BATCH, in order (checks the body as it goes)."""
        members: list[BatchMember] = []
        _walk_batch(self.core, members)
        return members


def _utf8(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise CQLProtocolError("statement text is not valid UTF-8") from None


def _skip_string(body: bytes, pos: int) -> int:
    """Past the [string] at `pos`, which must be UTF-8 (a server refuses it otherwise)."""
    end: int = pos + 2 + _SHORT.unpack_from(body, pos)[0]
    if end > len(body):
        raise CQLProtocolError("string runs past the end of the body")
    try:
        body[pos + 2 : end].decode("utf-8")
    except UnicodeDecodeError:
        raise CQLProtocolError("string is not valid UTF-8") from None
    return end


def _strip_payload(body: bytes) -> bytes:
    """`body` after its leading custom payload ([bytes map])."""
    try:
        (count,) = _SHORT.unpack_from(body)
        pos = 2
        for _ in range(count):
            pos = _skip_string(body, pos)
            (size,) = _INT.unpack_from(body, pos)
            pos += 4 + max(size, 0)
    except struct.error:
        raise CQLProtocolError("custom payload runs past the end of the body") from None
    if pos > len(body):
        raise CQLProtocolError("custom payload runs past the end of the body")
    return body[pos:]


def _read_values(
    body: bytes, pos: int, named: bool, out: list[bytes | None] | None
) -> int:
    """Skip (or collect into `out`) a [short] n + n values; return the end offset."""
    try:
        (count,) = _SHORT.unpack_from(body, pos)
        pos += 2
        for _ in range(count):
            if named:
                pos = _skip_string(body, pos)
            (size,) = _INT.unpack_from(body, pos)
            pos += 4
            if size < 0:
                if size < -2:
                    raise CQLProtocolError(f"invalid value length {size}")
                if out is not None:
                    out.append(None)
                continue
            end = pos + size
            if end > len(body):
                raise CQLProtocolError("bound value runs past the end of the body")
            if out is not None:
                out.append(body[pos:end])
            pos = end
    except struct.error:
        raise CQLProtocolError("body too short for its bound values") from None
    if pos > len(body):
        raise CQLProtocolError("bound value runs past the end of the body")
    return pos


def _check_consistency(value: int, what: str) -> None:
    if value > _MAX_CONSISTENCY:
        raise CQLProtocolError(f"unknown {what} 0x{value:04x}")


def _skip_parameters(body: bytes, pos: int, values: list[bytes | None] | None = None) -> int:
    """Validate <query_parameters> at `pos`; return where they end. Positional values
    are collected into `values` when it is given."""
    try:
        _check_consistency(_SHORT.unpack_from(body, pos)[0], "consistency")
        qflags = body[pos + 2]
        if qflags & ~_KNOWN_QUERY_FLAGS:
            raise CQLProtocolError(f"unknown query flags 0x{qflags:02x}")
        pos += 3
        if qflags & _VALUES:
            pos = _read_values(body, pos, bool(qflags & _NAMES), values)
        if qflags & _PAGE_SIZE:
            (page_size,) = _INT.unpack_from(body, pos)
            if page_size <= 0:
                raise CQLProtocolError(f"invalid page size {page_size}")
            pos += 4
        if qflags & _PAGING_STATE:
            (size,) = _INT.unpack_from(body, pos)
            pos += 4 + max(size, 0)
        if qflags & _SERIAL:
            _check_consistency(_SHORT.unpack_from(body, pos)[0], "serial consistency")
            pos += 2
        if qflags & _TIMESTAMP:
            _INT.unpack_from(body, pos + 4)
            pos += 8
    except (IndexError, struct.error):
        raise CQLProtocolError("body too short for its query parameters") from None
    if pos > len(body):
        raise CQLProtocolError("query parameters run past the end of the body")
    return pos


def _walk_batch(body: bytes, members: list[BatchMember] | None) -> int:
    """Validate a BATCH body (collecting its statements); return where it ends."""
    try:
        if body[0] > 2:
            raise CQLProtocolError(f"unknown batch type {body[0]}")
        (count,) = _SHORT.unpack_from(body, 1)
        pos = 3
        for _ in range(count):
            kind = body[pos]
            if kind == 0:
                (n,) = _INT.unpack_from(body, pos + 1)
                if n < 0 or pos + 5 + n > len(body):
                    raise CQLProtocolError("batch statement runs past the end of the body")
                text = _utf8(body[pos + 5 : pos + 5 + n])
                if members is not None:
                    members.append((text, None))
                pos += 5 + n
            elif kind == 1:
                (n,) = _SHORT.unpack_from(body, pos + 1)
                if pos + 3 + n > len(body):
                    raise CQLProtocolError("batch statement id runs past the end of the body")
                if members is not None:
                    members.append((None, body[pos + 3 : pos + 3 + n]))
                pos += 3 + n
            else:
                raise CQLProtocolError(f"unknown batch statement kind {kind}")
            pos = _read_values(body, pos, False, None)
        _check_consistency(_SHORT.unpack_from(body, pos)[0], "consistency")
        bflags = body[pos + 2]
        if bflags & ~_KNOWN_BATCH_FLAGS:
            raise CQLProtocolError(f"unknown batch flags 0x{bflags:02x}")
        pos += 3
        if bflags & _SERIAL:
            _check_consistency(_SHORT.unpack_from(body, pos)[0], "serial consistency")
            pos += 2
        if bflags & _TIMESTAMP:
            _INT.unpack_from(body, pos + 4)
            pos += 8
    except (IndexError, struct.error):
        raise CQLProtocolError("BATCH body too short") from None
    if pos > len(body):
        raise CQLProtocolError("BATCH body too short")
    return pos
