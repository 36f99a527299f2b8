"""What the sidecar remembers about statements prepared through it.

A PREPARE passes through to Scylla; its RESULT tells the sidecar the statement id, the
bind markers' types and which of them form the partition key. Kept here: enough to
plan an EXECUTE of that id (merge, forward, answer locally), to find its partition
(token-aware routing, read-after-write) and to prepare it again on a node that
answers UNPREPARED.

An EXECUTE of an id the sidecar does not know is never forwarded: it is answered
UNPREPARED, and the driver prepares the statement again through the sidecar. So the
sidecar knows every statement it sends, writes included, and eviction from this
bounded cache costs a client one round trip, never a stale read.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from coalesce.cql import ColumnSpec, CQLProtocolError, ResultPrepared, decode_result
from coalesce.cql.classify import StatementInfo, classify
from coalesce.sidecar.advertised import CLUSTER_TABLES

__all__ = ["KnownStatement", "StatementCache"]


@dataclass(frozen=True, slots=True)
class KnownStatement:
    """One statement prepared through the sidecar.

    `keyspace` is the preparing connection's keyspace (what unqualified names in
    `query` refer to); `table` is ``(keyspace, table)`` resolved the same way reads and
    writes are, so they meet in the read-after-write index. `result_columns` is the
    result metadata, for rewriting rows a client asked to receive without metadata.
    """

    query_id: bytes
    query: str
    keyspace: str | None
    info: StatementInfo
    pk_indexes: tuple[int, ...]
    result_columns: tuple[ColumnSpec, ...]
    table: tuple[str | None, str | None] = field(init=False)
    rewrite: str | None = field(init=False)
    """``local``, ``peers`` or ``peers_v2``: a SELECT whose answer describes the sidecar."""
    merge_table: tuple[str | None, str | None] | None = field(init=False)
    """`table` when its EXECUTEs may share a flight (a plain SELECT), else None."""

    def __post_init__(self) -> None:
        # Derived once: every EXECUTE reads them.
        info = self.info
        table = (info.keyspace or self.keyspace, info.table)
        rewrite = (info.table if info.kind == "select" and table[0] == "system"
                   and info.table in CLUSTER_TABLES else None)
        object.__setattr__(self, "table", table)
        object.__setattr__(self, "rewrite", rewrite)
        object.__setattr__(self, "merge_table",
                           table if info.coalescable and rewrite is None else None)

    @property
    def size(self) -> int:
        """Roughly what keeping it costs, in bytes (for the cache's byte bound)."""
        return 256 + len(self.query) + len(self.query_id) + 64 * len(self.result_columns)


class StatementCache:
    """Statement id -> `KnownStatement`, bounded by count and bytes, least recently used
    evicted first.

    Single event loop, no locks.
    """

    __slots__ = ("_bytes", "_max_bytes", "_max_count", "by_id")

    def __init__(self, max_count: int = 100_000, max_bytes: int = 64 * 1024 * 1024) -> None:
        if max_count < 1 or max_bytes < 1:
            raise ValueError(f"cache bounds must be >= 1, got {max_count} and {max_bytes}")
        self._max_count = max_count
        self._max_bytes = max_bytes
        self._bytes = 0
        self.by_id: OrderedDict[bytes, KnownStatement] = OrderedDict()  # read-only outside

    def __len__(self) -> int:
        return len(self.by_id)

    @property
    def size(self) -> int:
        """What the cached statements cost, in bytes (roughly)."""
        return self._bytes

    def get(self, query_id: bytes | None) -> KnownStatement | None:
        """The statement of `query_id`, marked as just used (least recently used go first,
        so a flood of new statements evicts the idle ones, not those in use)."""
        if query_id is None:
            return None
        statement = self.by_id.get(query_id)
        if statement is not None:
            self.by_id.move_to_end(query_id)
        return statement

    def learn(self, query: str, keyspace: str | None, result_body: bytes) -> KnownStatement:
        """Record the statement a PREPARED result body describes, and return it.

        Raises `CQLProtocolError` if the body is not a well-formed PREPARED result.
        """
        result = decode_result(result_body)
        if not isinstance(result, ResultPrepared):
            raise CQLProtocolError(f"expected a PREPARED result, got {type(result).__name__}")
        statement = KnownStatement(
            query_id=result.query_id,
            query=query,
            keyspace=keyspace,
            info=classify(query),
            pk_indexes=tuple(result.metadata.pk_indexes),
            result_columns=tuple(result.result_metadata.columns),
        )
        by_id = self.by_id
        old = by_id.pop(statement.query_id, None)
        if old is not None:
            self._bytes -= old.size
        by_id[statement.query_id] = statement
        self._bytes += statement.size
        while len(by_id) > self._max_count or (self._bytes > self._max_bytes and len(by_id) > 1):
            _, evicted = by_id.popitem(last=False)
            self._bytes -= evicted.size
        return statement
