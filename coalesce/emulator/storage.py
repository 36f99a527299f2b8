"""In-memory table data: partitions keyed by partition key, rows in clustering order.

Cells hold Python values (as the codec's `CqlType.deserialize` returns
them). A partition is found by its *routing key* -- the partition key
serialized exactly as Cassandra does before hashing (one component: the
value bytes; several: each as a 2-byte length, the bytes and a 0x00) -- and
carries its Murmur3 `token`, computed as Scylla's partitioner does
(`coalesce.cql.token`), so token-aware drivers and the emulator agree on placement.

Rows are kept sorted by their clustering *sort key* (see `ordering`), so
an ascending walk yields the table's clustering order and every clustering
slice is two binary searches. Each cell keeps its serialized bytes next to
its value, so reads never re-serialize.

Not thread-safe; the emulator touches storage only from its event loop.
"""

from __future__ import annotations

import bisect
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from coalesce.cql.token import murmur3_token
from coalesce.emulator.errors import InvalidRequest
from coalesce.emulator.schema import Column, TableDef

__all__ = [
    "Cells",
    "Partition",
    "Row",
    "Storage",
    "TableData",
    "routing_key",
    "token_of",
]


def routing_key(columns: Sequence[Column], values: Sequence[Any]) -> bytes:
    """The serialized partition key, as Cassandra feeds it to the partitioner.

    Raises `InvalidRequest` for a null component or an empty single key.
    """
    parts: list[bytes] = []
    for column, value in zip(columns, values, strict=True):
        if value is None:
            raise InvalidRequest(f"Invalid null value for partition key part {column.name}")
        parts.append(column.type.serialize(value))
    if len(parts) == 1:
        if not parts[0]:
            raise InvalidRequest("Key may not be empty")
        return parts[0]
    return b"".join(struct.pack(">H", len(p)) + p + b"\x00" for p in parts)


def token_of(key: bytes) -> int:
    """The Murmur3Partitioner token of a routing key."""
    return murmur3_token(key)


class Cells:
    """The non-null cells of a row (or a partition's static cells).

    Keeps each value next to its serialized bytes so reads never
    re-serialize. An empty collection is stored as absent: CQL treats it as
    null.
    """

    __slots__ = ("raw", "values")

    def __init__(self) -> None:
        self.values: dict[str, Any] = {}
        self.raw: dict[str, bytes] = {}

    def __bool__(self) -> bool:
        return bool(self.values)

    def __contains__(self, name: object) -> bool:
        return name in self.values

    def get(self, name: str) -> Any:
        return self.values.get(name)

    def put(self, column: Column, value: Any) -> None:
        """Set a cell (None or an empty collection deletes it)."""
        name = column.name
        if value is None or (isinstance(value, list | dict | frozenset | set) and not value):
            self.values.pop(name, None)
            self.raw.pop(name, None)
            return
        self.raw[name] = column.type.serialize(value)
        self.values[name] = value

    def pop(self, name: str) -> None:
        self.values.pop(name, None)
        self.raw.pop(name, None)


@dataclass(slots=True)
class Row:
    """One CQL row: clustering values (and their bytes), regular cells, write time.

    `marker` is True when the row was created by INSERT: such a row stays
    visible with all regular cells null, while an UPDATE-only row vanishes
    when its last cell is deleted, as in Cassandra.
    """

    clustering: tuple[Any, ...]
    sort_key: tuple[Any, ...]
    clustering_raw: tuple[bytes, ...] = ()
    cells: Cells = field(default_factory=Cells)
    marker: bool = False
    timestamp: int = 0

    @property
    def live(self) -> bool:
        return self.marker or bool(self.cells)


class Partition:
    """The rows of one partition, in clustering order, plus its static cells."""

    __slots__ = ("_keys", "key", "raw_values", "rows", "static", "token", "values")

    def __init__(
        self, key: bytes, values: tuple[Any, ...], raw_values: tuple[bytes, ...], token: int
    ) -> None:
        self.key = key
        self.values = values
        self.raw_values = raw_values
        self.token = token
        self.static = Cells()
        self.rows: list[Row] = []
        self._keys: list[tuple[Any, ...]] = []

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def empty(self) -> bool:
        return not self.rows and not self.static

    def find(self, sort_key: tuple[Any, ...]) -> Row | None:
        """The row with exactly this clustering sort key, if any."""
        i = bisect.bisect_left(self._keys, sort_key)
        if i < len(self._keys) and self._keys[i] == sort_key:
            return self.rows[i]
        return None

    def upsert(
        self, clustering: tuple[Any, ...], sort_key: tuple[Any, ...], raw: tuple[bytes, ...]
    ) -> Row:
        """The row at this clustering key, created (empty) if missing."""
        i = bisect.bisect_left(self._keys, sort_key)
        if i < len(self._keys) and self._keys[i] == sort_key:
            return self.rows[i]
        row = Row(clustering, sort_key, raw)
        self._keys.insert(i, sort_key)
        self.rows.insert(i, row)
        return row

    def remove(self, row: Row) -> None:
        """Drop `row` (no-op if it is not here)."""
        i = bisect.bisect_left(self._keys, row.sort_key)
        if i < len(self.rows) and self.rows[i] is row:
            del self._keys[i]
            del self.rows[i]

    def bounds(self, low: tuple[Any, ...], high: tuple[Any, ...]) -> tuple[int, int]:
        """Index range [start, stop) of rows whose sort key is in [low, high)."""
        start = bisect.bisect_left(self._keys, low)
        stop = bisect.bisect_left(self._keys, high)
        return start, max(start, stop)

    def position_after(self, sort_key: tuple[Any, ...]) -> int:
        """Index of the first row sorting strictly after `sort_key`."""
        return bisect.bisect_right(self._keys, sort_key)

    def position_of(self, sort_key: tuple[Any, ...]) -> int:
        """Index of the first row sorting at or after `sort_key`."""
        return bisect.bisect_left(self._keys, sort_key)


class TableData:
    """All partitions of one table, with a token-ordered view for full scans."""

    __slots__ = ("_ordered", "definition", "partitions", "version")

    def __init__(self, definition: TableDef) -> None:
        self.definition = definition
        self.partitions: dict[bytes, Partition] = {}
        self._ordered: list[Partition] | None = None
        # Bumped by every change (see `changed`), so readers can tell whether
        # what they computed earlier still holds.
        self.version = 0

    def changed(self) -> None:
        """Record that rows of this table were modified."""
        self.version += 1

    def get(self, key: bytes) -> Partition | None:
        return self.partitions.get(key)

    def partition_for_write(self, key: bytes, values: tuple[Any, ...]) -> Partition:
        """The partition at `key`, created if missing."""
        partition = self.partitions.get(key)
        if partition is None:
            raw = tuple(
                c.type.serialize(v)
                for c, v in zip(self.definition.partition_key, values, strict=True)
            )
            partition = Partition(key, values, raw, token_of(key))
            self.partitions[key] = partition
            self._ordered = None
        return partition

    def discard_if_empty(self, partition: Partition) -> None:
        """Forget a partition with no rows and no static cells left."""
        if partition.empty and self.partitions.get(partition.key) is partition:
            del self.partitions[partition.key]
            self._ordered = None

    def drop_partition(self, key: bytes) -> None:
        if self.partitions.pop(key, None) is not None:
            self._ordered = None

    def in_token_order(self) -> list[Partition]:
        """Every partition ordered by (token, routing key), as a full scan returns them."""
        if self._ordered is None:
            self._ordered = sorted(self.partitions.values(), key=lambda p: (p.token, p.key))
        return self._ordered

    def clear(self) -> None:
        self.partitions.clear()
        self._ordered = None
        self.version += 1

    def __iter__(self) -> Iterator[Partition]:
        return iter(self.in_token_order())


class Storage:
    """Table data for every table, keyed by (keyspace, table)."""

    def __init__(self) -> None:
        self._tables: dict[tuple[str, str], TableData] = {}

    def table(self, definition: TableDef) -> TableData:
        """The data of `definition`'s table, created empty on first use.

        A table dropped and re-created under the same name gets fresh data
        (matched by the definition's id).
        """
        key = (definition.keyspace, definition.name)
        data = self._tables.get(key)
        if data is None or data.definition.id != definition.id:
            data = TableData(definition)
            self._tables[key] = data
        return data

    def drop_table(self, keyspace: str, name: str) -> None:
        self._tables.pop((keyspace, name), None)

    def drop_keyspace(self, keyspace: str) -> None:
        for key in [k for k in self._tables if k[0] == keyspace]:
            del self._tables[key]
