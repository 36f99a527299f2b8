"""What the sidecar remembers about statements prepared through it.

A PREPARE passes through to Scylla; its RESULT tells the sidecar the statement id, the
bind markers' types and which of them form the partition key. Kept here: enough to
decide whether an EXECUTE of that id may be merged (a plain SELECT), where its
partition lives (token-aware routing, read-after-write), and how to prepare it again on
a node that answers UNPREPARED.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from coalesce.cql import ColumnSpec, CQLProtocolError, ResultPrepared, decode_result
from coalesce.cql.classify import StatementInfo, classify
from coalesce.sidecar.topology import CLUSTER_TABLES

__all__ = ["PreparedStatement", "PreparedStatements"]


@dataclass(frozen=True, slots=True)
class PreparedStatement:
    """One prepared statement as seen passing through.

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
    cluster_table: str | None = field(init=False)
    """``local``, ``peers`` or ``peers_v2`` for a SELECT the sidecar rewrites."""
    mergeable: bool = field(init=False)
    """Its EXECUTEs may share a flight: a plain SELECT the sidecar need not rewrite."""

    def __post_init__(self) -> None:
        # Derived once here: EXECUTEs read them on the hot path.
        info = self.info
        table = (info.keyspace or self.keyspace, info.table)
        cluster_table = (
            info.table
            if info.kind == "select" and table[0] == "system" and info.table in CLUSTER_TABLES
            else None
        )
        object.__setattr__(self, "table", table)
        object.__setattr__(self, "cluster_table", cluster_table)
        object.__setattr__(self, "mergeable", info.coalescable and cluster_table is None)


class PreparedStatements:
    """Statement id -> `PreparedStatement`, bounded, most recently prepared kept.

    Forgetting an id is harmless: its EXECUTEs are then forwarded unmerged, and an
    UNPREPARED answer reaches the client, whose driver prepares it again (through the
    sidecar, which learns it anew). Single event loop, no locks.
    """

    __slots__ = ("_by_id", "_capacity")

    def __init__(self, capacity: int = 100_000) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self._capacity = capacity
        self._by_id: OrderedDict[bytes, PreparedStatement] = OrderedDict()

    def __len__(self) -> int:
        return len(self._by_id)

    def get(self, query_id: bytes) -> PreparedStatement | None:
        return self._by_id.get(query_id)

    def learn(self, query: str, keyspace: str | None, result_body: bytes) -> PreparedStatement:
        """Record the statement a PREPARED result body describes, and return it.

        Raises `CQLProtocolError` if the body is not a well-formed PREPARED result.
        """
        result = decode_result(result_body)
        if not isinstance(result, ResultPrepared):
            raise CQLProtocolError(f"expected a PREPARED result, got {type(result).__name__}")
        statement = PreparedStatement(
            query_id=result.query_id,
            query=query,
            keyspace=keyspace,
            info=classify(query),
            pk_indexes=tuple(result.metadata.pk_indexes),
            result_columns=tuple(result.result_metadata.columns),
        )
        self._by_id[statement.query_id] = statement
        self._by_id.move_to_end(statement.query_id)
        while len(self._by_id) > self._capacity:
            self._by_id.popitem(last=False)
        return statement
