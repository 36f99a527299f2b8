"""Read-after-write: which in-flight reads touch which partition, so a write can forget them.

The one rule of what a CQL statement makes stale lives here (`FreshnessIndex.written_by`),
used by the coalescing sessions and the sidecar alike.
"""

from __future__ import annotations

import asyncio
from collections.abc import Hashable, Iterator
from contextlib import contextmanager
from typing import Protocol

from coalesce.cql.classify import StatementInfo

__all__ = ["FlightTable", "FreshnessIndex"]

Table = Hashable  # e.g. (keyspace, table)
Partition = Hashable | None  # e.g. the serialized partition key; None: unknown

_ROW_WRITES = frozenset({"insert", "update", "delete"})
_READS = frozenset({"select", "use"})


class FlightTable(Protocol):
    """What the index needs of an in-flight table (`SingleFlight` is one)."""

    @property
    def linger(self) -> float: ...

    def forget(self, key: Hashable) -> bool: ...

    def forget_all(self) -> None: ...


class FreshnessIndex:
    """Maps tables and partitions to the flight keys of reads running against them.

    The guarantee it gives a `SingleFlight` group: once `written` has returned, no
    caller arriving later joins a read that started before it. Reads already waiting
    keep their flight (they were concurrent with the write, so either answer is
    valid). A write to a known partition forgets the reads of that partition and the
    reads of the table whose partition is unknown; a write whose partition is unknown
    forgets every read of the table. Call `written` when the write has completed (or
    failed: a failed write may still have been applied).

    The `reading` block must cover the whole upstream call. With a ``linger`` on the
    group, a read stays forgettable for ``linger`` seconds after it ended (its own
    timer, not the group's: a write landing in the instant between the two is not
    seen by a lingering result). Single event loop, no locks: the thread that runs
    the group calls it.
    """

    __slots__ = ("_group", "_tables")

    def __init__(self, group: FlightTable) -> None:
        self._group = group
        # table -> partition (None = unknown) -> flight key -> reads running
        self._tables: dict[Table, dict[Partition, dict[Hashable, int]]] = {}

    def __len__(self) -> int:
        """Reads being tracked (zero when nothing is in flight)."""
        return sum(
            count
            for partitions in self._tables.values()
            for keys in partitions.values()
            for count in keys.values()
        )

    @contextmanager
    def reading(self, key: Hashable, table: Table, partition: Partition) -> Iterator[None]:
        """Track the read running under flight `key` for as long as the block runs."""
        self.track(key, table, partition)
        try:
            yield
        finally:
            self.untrack(key, table, partition)

    def track(self, key: Hashable, table: Table, partition: Partition) -> None:
        """A read under flight `key` started; pair with exactly one `untrack`."""
        partitions = self._tables.get(table)
        if partitions is None:
            partitions = self._tables[table] = {}
        keys = partitions.get(partition)
        if keys is None:
            partitions[partition] = {key: 1}
        else:
            keys[key] = keys.get(key, 0) + 1

    def untrack(self, key: Hashable, table: Table, partition: Partition) -> None:
        """The read `track` announced ended (its result may still linger)."""
        linger = self._group.linger
        if linger:  # the result stays servable that long: keep it forgettable too
            loop = asyncio.get_running_loop()
            loop.call_later(linger, self._untrack, key, table, partition)
        else:
            self._untrack(key, table, partition)

    def _untrack(self, key: Hashable, table: Table, partition: Partition) -> None:
        partitions = self._tables[table]
        keys = partitions[partition]
        if keys[key] > 1:
            keys[key] -= 1
            return
        del keys[key]
        if not keys:
            del partitions[partition]
            if not partitions:
                del self._tables[table]

    def written_by(
        self, info: StatementInfo, keyspace: str | None, partition: Partition = None
    ) -> None:
        """Read-after-write for one statement that completed (or failed: it may have
        been applied), run on `keyspace` (what its unqualified names resolve to).

        The rule: a SELECT or USE changes nothing. An INSERT, UPDATE or DELETE of a
        known table forgets the reads of `partition` (its serialized partition key;
        None: unknown, so the whole table). TRUNCATE and CREATE/ALTER/DROP TABLE
        forget the table's reads; a BATCH whose written tables are all known
        forgets those tables' reads. Anything else (other schema changes, BATCHes of
        unknown statements, GRANT, statements the classifier does not know) forgets
        every read in flight.
        """
        kind = info.kind
        if kind in _READS:
            return
        if info.table is not None and (kind in _ROW_WRITES or kind == "ddl"):
            self.written((info.keyspace or keyspace, info.table),
                         partition if kind in _ROW_WRITES else None)
        elif kind == "batch" and info.tables:
            for table_keyspace, table in info.tables:
                self.written((table_keyspace or keyspace, table))
        else:
            self._group.forget_all()

    def written(self, table: Table, partition: Partition = None) -> int:
        """Make later reads of `partition` (None: the whole table) start fresh.

        Returns how many flights were forgotten.
        """
        partitions = self._tables.get(table)
        if not partitions:
            return 0
        if partition is None:
            groups = list(partitions.values())
        else:
            groups = [partitions.get(partition, {}), partitions.get(None, {})]
        forget = self._group.forget
        return sum(forget(key) for keys in groups for key in list(keys))
