"""Read-after-write: which in-flight reads touch which partition, so a write can forget them."""

from __future__ import annotations

import asyncio
from collections.abc import Hashable, Iterator
from contextlib import contextmanager
from typing import Any

from coalesce.flight import SingleFlight

__all__ = ["FreshnessIndex"]

Table = Hashable  # e.g. (keyspace, table)
Partition = Hashable | None  # e.g. the serialized partition key; None: unknown


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

    def __init__(self, group: SingleFlight[Any]) -> None:
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
        keys = self._tables.setdefault(table, {}).setdefault(partition, {})
        keys[key] = keys.get(key, 0) + 1
        try:
            yield
        finally:
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
