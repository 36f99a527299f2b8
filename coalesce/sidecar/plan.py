"""What the sidecar does with one request: a pure decision, made once per request.

`plan` reads a `Request` and what the sidecar knows (the client's role and keyspace,
the statements prepared through it) and returns one of:

- `Merge`: a read whose answer depends only on the request: it joins (or starts) the
  single flight of its key (role, keyspace, opcode, body minus the client timestamp);
- `Forward`: sent upstream alone; `writes` is what its completion makes stale (the
  one read-after-write rule, `FreshnessIndex.written_by`), `learn` marks a PREPARE
  whose answer teaches the sidecar a statement, `rewrite` a ``system.local`` or peers
  read whose answer is rewritten to describe the sidecar;
- `Use`: a ``USE`` (however it is sent: as a query with any flags, or as an EXECUTE of
  a prepared USE), run by the sidecar itself, because a keyspace is a property of the
  pooled upstream connections other clients share;
- `Unprepared`: an EXECUTE (or a BATCH member) of an id the sidecar does not know,
  answered UNPREPARED so the driver prepares it again through the sidecar. Nothing the
  sidecar does not know is ever sent, so no write can go unnoticed.

Nothing here does I/O or changes state; the client connection executes the plan.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Final

from coalesce.cql import CUSTOM_PAYLOAD, TRACING, CQLProtocolError, Opcode
from coalesce.cql.classify import StatementInfo, classify
from coalesce.cql.request import SERIAL_CONSISTENCIES, Request
from coalesce.cql.token import routing_key as compose_key
from coalesce.sidecar.advertised import CLUSTER_TABLES
from coalesce.sidecar.statements import KnownStatement, StatementCache

__all__ = [
    "Forward",
    "Merge",
    "Plan",
    "Unprepared",
    "Use",
    "partition_of",
    "plan",
    "routing_key",
]

_UNMERGEABLE: Final = TRACING | CUSTOM_PAYLOAD
_QUERY: Final = int(Opcode.QUERY)  # plain ints: IntEnum member lookups are slow
_EXECUTE: Final = int(Opcode.EXECUTE)
_PREPARE: Final = int(Opcode.PREPARE)
_BATCH: Final = int(Opcode.BATCH)
_ROW_WRITES: Final = frozenset({"insert", "update", "delete"})


class Plan:
    __slots__ = ()


class Merge(Plan):
    """Share the answer of every identical request in flight."""

    __slots__ = ("key", "statement", "table")

    def __init__(self, key: Hashable, table: Hashable, statement: KnownStatement | None) -> None:
        self.key = key
        self.table = table
        self.statement = statement

    def __repr__(self) -> str:
        return f"Merge(table={self.table!r})"


class Forward(Plan):
    """Send alone; see the module docstring for `writes`, `learn` and `rewrite`."""

    __slots__ = ("keyspace", "learn", "rewrite", "statement", "writes")

    def __init__(
        self,
        statement: KnownStatement | None = None,
        *,
        writes: StatementInfo | None = None,
        keyspace: str | None = None,
        learn: bool = False,
        rewrite: str | None = None,
    ) -> None:
        self.statement = statement
        self.writes = writes
        self.keyspace = keyspace
        self.learn = learn
        self.rewrite = rewrite

    def __repr__(self) -> str:
        what = (f"writes={self.writes.kind}" if self.writes is not None
                else "learn" if self.learn else f"rewrite={self.rewrite}" if self.rewrite
                else "read")
        return f"Forward({what})"


class Use(Plan):
    __slots__ = ("keyspace",)

    def __init__(self, keyspace: str) -> None:
        self.keyspace = keyspace

    def __repr__(self) -> str:
        return f"Use({self.keyspace!r})"


class Unprepared(Plan):
    __slots__ = ("query_id",)

    def __init__(self, query_id: bytes) -> None:
        self.query_id = query_id

    def __repr__(self) -> str:
        return f"Unprepared({self.query_id.hex()})"


_LEARN: Final = Forward(learn=True)


def plan(request: Request, role: str, keyspace: str | None, statements: StatementCache) -> Plan:
    """Decide what to do with a QUERY, EXECUTE, PREPARE or BATCH (see the module doc).

    `keyspace` is the client connection's (None before any USE). Raises
    `CQLProtocolError` for a body it cannot read.
    """
    opcode = request.opcode
    if opcode == _EXECUTE:
        query_id = request.query_id
        assert query_id is not None
        statement = statements.get(query_id)
        if statement is None:
            return Unprepared(query_id)
        table = statement.merge_table
        if table is not None:
            if request.flags & _UNMERGEABLE or request.consistency in SERIAL_CONSISTENCIES:
                return Forward(statement)
            # The id names the statement and the keyspace it was prepared in: the
            # connection's own keyspace changes nothing, so it is not in the key (and a
            # read a ring member forwards merges with the owner's own clients').
            return Merge((role, None, opcode, request.key_body()), table, statement)
        if statement.rewrite is not None:
            return Forward(statement, rewrite=statement.rewrite)
        info = statement.info
        if info.kind == "use" and info.keyspace is not None:
            return Use(info.keyspace)
        if info.kind == "select":
            return Forward(statement)
        return Forward(statement, writes=info, keyspace=statement.keyspace)
    if opcode == _QUERY:
        assert request.text is not None
        info = classify(request.text)
        kind = info.kind
        if kind == "select":
            select_table = (info.keyspace or keyspace, info.table)
            if select_table[0] == "system" and info.table in CLUSTER_TABLES:
                return Forward(rewrite=info.table)
            if (info.coalescable and not request.flags & _UNMERGEABLE
                    and request.consistency not in SERIAL_CONSISTENCIES):
                return Merge((role, keyspace, opcode, request.key_body()), select_table, None)
            return Forward()
        if kind == "use" and info.keyspace is not None:
            return Use(info.keyspace)
        return Forward(writes=info, keyspace=keyspace)
    if opcode == _PREPARE:
        return _LEARN
    if opcode == _BATCH:
        return _batch(request, keyspace, statements)
    raise CQLProtocolError(f"opcode 0x{opcode:02x} is not a request to plan")


def _batch(request: Request, keyspace: str | None, statements: StatementCache) -> Plan:
    """A BATCH forgets the tables it writes, or everything when one member is unclear."""
    tables: list[tuple[str | None, str]] = []
    clear = True
    for text, query_id in request.statements():
        if text is not None:
            info = classify(text)
            resolve = keyspace
        else:
            statement = statements.get(query_id)
            if statement is None:
                assert query_id is not None
                return Unprepared(query_id)
            info = statement.info
            resolve = statement.keyspace
        if info.kind in _ROW_WRITES and info.table is not None:
            tables.append((info.keyspace or resolve, info.table))
        else:
            clear = False
    writes = StatementInfo("batch", tables=tuple(dict.fromkeys(tables)) if clear else ())
    return Forward(writes=writes, keyspace=keyspace)


def routing_key(values: list[bytes | None], pk_indexes: tuple[int, ...]) -> bytes | None:
    """The serialized partition key of `values` (as Scylla hashes it), None if a part is
    missing or too long for a composite key."""
    if not pk_indexes:
        return None
    parts: list[bytes] = []
    for index in pk_indexes:
        value = values[index] if index < len(values) else None
        if value is None:
            return None
        parts.append(value)
    try:
        return compose_key(parts)
    except ValueError:
        return None


def partition_of(request: Request, statement: KnownStatement | None) -> bytes | None:
    """The serialized partition key of an EXECUTE of `statement`, when it can be known."""
    if statement is None or not statement.pk_indexes:
        return None
    values = request.values()
    if values is None:
        return None
    return routing_key(values, statement.pk_indexes)
