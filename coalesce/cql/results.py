"""RESULT message bodies: void, rows, set_keyspace, prepared, schema_change.

Cells stay raw: a `ResultRows` row is a list of value bodies (`bytes`, or
`None` for NULL); decode them with the column's `CqlType` when needed.
`encode_rows_body` builds a ROWS body straight from serialized cells, which
is what a server wants on its hot path.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Final, Self

from ._wire import (
    Reader,
    decode_guard,
    pack_int,
    pack_short,
    w_short_bytes,
    w_string,
    w_string_list,
)
from .codes import ResultKind
from .errors import CQLProtocolError
from .frame import Opcode
from .types import CqlType, _read_option

__all__ = [
    "ColumnSpec",
    "PreparedMetadata",
    "Result",
    "ResultPrepared",
    "ResultRows",
    "ResultSchemaChange",
    "ResultSetKeyspace",
    "ResultVoid",
    "RowsMetadata",
    "decode_result",
    "encode_rows_body",
]

_GLOBAL_TABLES_SPEC: Final = 0x0001
_HAS_MORE_PAGES: Final = 0x0002
_NO_METADATA: Final = 0x0004

_INT: Final = struct.Struct(">i")
_NULL: Final = b"\xff\xff\xff\xff"


@dataclass(slots=True, frozen=True)
class ColumnSpec:
    """One column of result or bind-marker metadata."""

    keyspace: str
    table: str
    name: str
    type: CqlType


def _encode_specs(flags: int, columns: Sequence[ColumnSpec]) -> tuple[int, bytes]:
    """Column specs, with the global table spec when all columns share a table."""
    if not columns:
        return flags, b""
    ks, table = columns[0].keyspace, columns[0].table
    same = all(c.keyspace == ks and c.table == table for c in columns)
    parts: list[bytes] = []
    if same:
        flags |= _GLOBAL_TABLES_SPEC
        parts.append(w_string(ks) + w_string(table))
    for c in columns:
        if not same:
            parts.append(w_string(c.keyspace) + w_string(c.table))
        parts.append(w_string(c.name))
        parts.append(c.type.encode_option())
    return flags, b"".join(parts)


def _read_specs(r: Reader, flags: int, count: int) -> list[ColumnSpec]:
    if count < 0 or count > r.remaining():
        raise CQLProtocolError(f"impossible column count {count}")
    gks = gtable = ""
    if flags & _GLOBAL_TABLES_SPEC:
        gks = r.string()
        gtable = r.string()
    out: list[ColumnSpec] = []
    for _ in range(count):
        if flags & _GLOBAL_TABLES_SPEC:
            ks, table = gks, gtable
        else:
            ks = r.string()
            table = r.string()
        name = r.string()
        out.append(ColumnSpec(ks, table, name, _read_option(r)))
    return out


@dataclass(slots=True)
class RowsMetadata:
    """<metadata> of a ROWS result or of a prepared statement's result.

    `no_metadata=True` sends only the column count (the client asked for
    `skip_metadata` and already knows the columns); decoding such metadata
    gives empty `columns` and the count in `column_count`. `column_count`
    defaults to `len(columns)`. A non-None `paging_state` sets Has_more_pages.
    """

    columns: list[ColumnSpec] = field(default_factory=list)
    paging_state: bytes | None = None
    no_metadata: bool = False
    column_count: int = -1

    def __post_init__(self) -> None:
        if self.column_count < 0:
            self.column_count = len(self.columns)

    def encode(self) -> bytes:
        flags = 0
        parts: list[bytes] = []
        if self.paging_state is not None:
            flags |= _HAS_MORE_PAGES
            parts.append(pack_int(len(self.paging_state)) + self.paging_state)
        if self.no_metadata:
            flags |= _NO_METADATA
            specs = b""
        else:
            flags, specs = _encode_specs(flags, self.columns)
        return pack_int(flags) + pack_int(self.column_count) + b"".join(parts) + specs

    @classmethod
    def read(cls, r: Reader) -> Self:
        flags = r.int32()
        count = r.int32()
        paging_state = r.nbytes() if flags & _HAS_MORE_PAGES else None
        if flags & _NO_METADATA:
            if count < 0:
                raise CQLProtocolError(f"negative column count {count}")
            return cls([], paging_state, True, count)
        return cls(_read_specs(r, flags, count), paging_state, False, count)


@dataclass(slots=True)
class PreparedMetadata:
    """Bind-marker metadata of a PREPARED result (v4: with partition key indexes)."""

    columns: list[ColumnSpec] = field(default_factory=list)
    pk_indexes: list[int] = field(default_factory=list)

    def encode(self) -> bytes:
        flags, specs = _encode_specs(0, self.columns)
        return (
            pack_int(flags)
            + pack_int(len(self.columns))
            + pack_int(len(self.pk_indexes))
            + b"".join(pack_short(i) for i in self.pk_indexes)
            + specs
        )

    @classmethod
    def read(cls, r: Reader) -> Self:
        flags = r.int32()
        count = r.int32()
        pk_count = r.int32()
        if pk_count < 0 or pk_count * 2 > r.remaining():
            raise CQLProtocolError(f"impossible partition key count {pk_count}")
        pk_indexes = [r.short() for _ in range(pk_count)]
        return cls(_read_specs(r, flags, count), pk_indexes)


class Result:
    """Base of the RESULT kinds; `Result.decode` returns the right subclass."""

    __slots__ = ()
    opcode: ClassVar[Opcode] = Opcode.RESULT
    kind: ClassVar[ResultKind]

    def encode(self) -> bytes:
        raise NotImplementedError

    @classmethod
    def decode(cls, body: bytes) -> Result:
        """Decode any RESULT body. Raises `CQLProtocolError` if malformed."""
        return decode_result(body)


@dataclass(slots=True)
class ResultVoid(Result):
    kind: ClassVar[ResultKind] = ResultKind.VOID

    def encode(self) -> bytes:
        return _VOID_BODY


_VOID_BODY: Final = pack_int(ResultKind.VOID)


@dataclass(slots=True)
class ResultRows(Result):
    """Rows of raw cells; each row has `metadata.column_count` cells."""

    kind: ClassVar[ResultKind] = ResultKind.ROWS
    metadata: RowsMetadata
    rows: list[list[bytes | None]] = field(default_factory=list)

    def encode(self) -> bytes:
        return encode_rows_body(self.metadata, self.rows)


def encode_rows_body(
    metadata: RowsMetadata | bytes, rows: Iterable[Sequence[bytes | None]]
) -> bytes:
    """A whole ROWS result body from already-serialized cells.

    `metadata` may be pre-encoded (`RowsMetadata.encode()`), so a server can
    cache it per statement. Rows are trusted to have the right cell count.
    """
    meta = metadata if isinstance(metadata, bytes) else metadata.encode()
    out = bytearray(_ROWS_KIND)
    out += meta
    count_at = len(out)
    out += b"\x00\x00\x00\x00"
    pack = _INT.pack
    n = 0
    for row in rows:
        n += 1
        for cell in row:
            if cell is None:
                out += _NULL
            else:
                out += pack(len(cell))
                out += cell
    _INT.pack_into(out, count_at, n)
    return bytes(out)


_ROWS_KIND: Final = pack_int(ResultKind.ROWS)


def _read_rows(r: Reader, columns: int) -> list[list[bytes | None]]:
    data = r.data
    pos = r.pos
    end = len(data)
    (count,) = _INT.unpack_from(data, pos)
    pos += 4
    # Every cell takes at least 4 bytes: reject counts the body cannot hold
    # before allocating lists for them. Zero-column rows take no bytes at
    # all, so bound their count by the body size instead.
    if count < 0 or count * columns * 4 > end - pos or (columns == 0 and count > end):
        raise CQLProtocolError(f"impossible row count {count}")
    unpack = _INT.unpack_from
    cells: list[bytes | None] = []
    append = cells.append
    for _ in range(count * columns):
        n = unpack(data, pos)[0]
        pos += 4
        if n < 0:
            append(None)
        else:
            append(data[pos : pos + n])
            pos += n
    # Offsets only grow, so one check after the loop catches any cell that
    # ran past the end (an overrun mid-body already failed in unpack).
    if pos > end:
        raise CQLProtocolError("row cell runs past the end of the body")
    if columns == 0:
        rows: list[list[bytes | None]] = [[] for _ in range(count)]
    else:
        rows = [cells[i : i + columns] for i in range(0, len(cells), columns)]
    r.pos = pos
    return rows


@dataclass(slots=True)
class ResultSetKeyspace(Result):
    kind: ClassVar[ResultKind] = ResultKind.SET_KEYSPACE
    keyspace: str

    def encode(self) -> bytes:
        return pack_int(self.kind) + w_string(self.keyspace)


@dataclass(slots=True)
class ResultPrepared(Result):
    kind: ClassVar[ResultKind] = ResultKind.PREPARED
    query_id: bytes
    metadata: PreparedMetadata = field(default_factory=PreparedMetadata)
    result_metadata: RowsMetadata = field(default_factory=RowsMetadata)

    def encode(self) -> bytes:
        return (
            pack_int(self.kind)
            + w_short_bytes(self.query_id)
            + self.metadata.encode()
            + self.result_metadata.encode()
        )


def _encode_schema_change(
    change_type: str, target: str, keyspace: str, name: str | None, arg_types: list[str] | None
) -> bytes:
    """The schema-change fields shared by RESULT and EVENT (codec-internal)."""
    parts = [w_string(change_type), w_string(target), w_string(keyspace)]
    if target != "KEYSPACE":
        if name is None:
            raise ValueError(f"a {target} schema change needs a name")
        parts.append(w_string(name))
    if target in ("FUNCTION", "AGGREGATE"):
        parts.append(w_string_list(arg_types or []))
    return b"".join(parts)


def _read_schema_change(
    r: Reader,
) -> tuple[str, str, str, str | None, list[str] | None]:
    """Inverse of `_encode_schema_change` (codec-internal)."""
    change_type = r.string()
    target = r.string()
    keyspace = r.string()
    name = None if target == "KEYSPACE" else r.string()
    args = r.string_list() if target in ("FUNCTION", "AGGREGATE") else None
    return change_type, target, keyspace, name, args


@dataclass(slots=True)
class ResultSchemaChange(Result):
    """A DDL statement's result.

    `target` is KEYSPACE, TABLE, TYPE, FUNCTION or AGGREGATE; `name` is None
    for KEYSPACE (and required otherwise); `arg_types` is only sent for
    FUNCTION and AGGREGATE.
    """

    kind: ClassVar[ResultKind] = ResultKind.SCHEMA_CHANGE
    change_type: str
    target: str
    keyspace: str
    name: str | None = None
    arg_types: list[str] | None = None

    def encode(self) -> bytes:
        return pack_int(self.kind) + _encode_schema_change(
            self.change_type, self.target, self.keyspace, self.name, self.arg_types
        )


def decode_result(body: bytes) -> Result:
    """Decode a RESULT body into its kind's class. Raises `CQLProtocolError`."""
    return decode_guard("RESULT", lambda: _decode_result(Reader(body)))


def _decode_result(r: Reader) -> Result:
    kind = r.int32()
    if kind == ResultKind.ROWS:
        meta = RowsMetadata.read(r)
        return ResultRows(meta, _read_rows(r, meta.column_count))
    if kind == ResultKind.VOID:
        return ResultVoid()
    if kind == ResultKind.SET_KEYSPACE:
        return ResultSetKeyspace(r.string())
    if kind == ResultKind.PREPARED:
        query_id = r.short_bytes()
        pmeta = PreparedMetadata.read(r)
        return ResultPrepared(query_id, pmeta, RowsMetadata.read(r))
    if kind == ResultKind.SCHEMA_CHANGE:
        return ResultSchemaChange(*_read_schema_change(r))
    raise CQLProtocolError(f"unknown RESULT kind {kind}")
