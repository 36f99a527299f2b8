"""FreshnessIndex: a completed write makes later reads of what it touched start fresh."""

from __future__ import annotations

import asyncio

from coalesce.freshness import FreshnessIndex
from tests.conftest import settle


async def test_write_to_a_partition_forgets_its_reads_and_the_tables_unknown_ones(groups):
    group = groups()
    index = FreshnessIndex(group)
    gate = asyncio.Event()

    async def read(key, table, partition):
        with index.reading(key, table, partition):
            await gate.wait()
            return key

    reads = {
        "p1": ("t", b"1"),
        "p2": ("t", b"2"),
        "text": ("t", None),
        "other-table": ("u", b"1"),
    }
    tasks = [asyncio.create_task(group.do(k, read, k, *where)) for k, where in reads.items()]
    await settle()
    assert len(index) == 4
    assert index.written("t", b"1") == 2  # p1 and the text read of the table
    assert "p1" not in group and "text" not in group
    assert "p2" in group and "other-table" in group
    assert index.written("t") == 1  # the rest of the table
    gate.set()
    assert await asyncio.gather(*tasks) == list(reads)
    assert len(index) == 0


async def test_a_fresh_flight_and_the_forgotten_one_are_both_tracked(groups):
    group = groups()
    index = FreshnessIndex(group)
    gates = [asyncio.Event(), asyncio.Event()]
    started = []

    async def read():
        gate = gates[len(started)]
        started.append(gate)
        with index.reading("k", "t", b"1"):
            await gate.wait()

    old = asyncio.create_task(group.do("k", read))
    await settle()
    index.written("t", b"1")
    new = asyncio.create_task(group.do("k", read))
    await settle()
    gates[0].set()
    await old
    assert index.written("t", b"1") == 1  # the new flight is still tracked
    gates[1].set()
    await new
    assert len(index) == 0


def test_writes_to_untracked_tables_forget_nothing(groups):
    index = FreshnessIndex(groups())
    assert index.written("t", b"1") == 0 and index.written("t") == 0
