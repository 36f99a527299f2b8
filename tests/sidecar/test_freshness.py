"""Read-after-write: a read that starts after a write's answer never joins an older flight."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Callable
from typing import Any

import pytest

from coalesce.emulator import shard_of
from coalesce.sidecar.ring import token_of

from .conftest import LoopStack, ThreadStack, eventually
from .cqlclient import RawClient, rows_of

pytestmark = pytest.mark.timeout(60)

KEYSPACE = (
    "CREATE KEYSPACE ks WITH replication = {'class': 'SimpleStrategy', 'replication_factor': 1}"
)
SHARDS = 4


def _int(value: int) -> bytes:
    return struct.pack(">i", value)


def _keys_on_different_shards() -> tuple[int, int]:
    """Two int partition keys that live on different emulator shards."""
    first = 1
    shard = shard_of(token_of(_int(first)), SHARDS)
    other = next(k for k in range(2, 1000) if shard_of(token_of(_int(k)), SHARDS) != shard)
    return first, other


def test_a_write_then_a_read_returns_the_write(
    thread_stack: Callable[..., ThreadStack],
) -> None:
    stack = thread_stack(emulator={"read_latency": 0.2, "write_latency": 0.0})
    session = stack.cluster().connect()
    session.execute(KEYSPACE)
    session.execute("CREATE TABLE ks.kv (k int PRIMARY KEY, v text)")
    session.execute("INSERT INTO ks.kv (k, v) VALUES (1, 'old')")
    read = session.prepare("SELECT v FROM ks.kv WHERE k = ?")
    write = session.prepare("INSERT INTO ks.kv (k, v) VALUES (?, ?)")

    herd = [session.execute_async(read, (1,)) for _ in range(10)]
    session.execute(write, (1, "new"))
    assert session.execute(read, (1,)).one().v == "new"
    assert session.execute("SELECT v FROM ks.kv WHERE k = 1").one().v == "new"
    for future in herd:
        assert future.result().one().v in ("old", "new")  # concurrent with the write


async def _stack(loop_stack: Callable[..., Any]) -> tuple[LoopStack, RawClient]:
    stack: LoopStack = await loop_stack(
        emulator={"shards": SHARDS, "read_latency": 0.3, "write_latency": 0.0}
    )
    client = await RawClient.connect("127.0.0.1", stack.sidecar.port)
    await client.query(KEYSPACE)
    await client.query("CREATE TABLE ks.kv (k int PRIMARY KEY, v text)")
    return stack, client


async def test_a_write_to_a_table_makes_later_reads_of_it_start_a_fresh_flight(
    loop_stack: Callable[..., Any],
) -> None:
    stack, client = await _stack(loop_stack)
    hot, other = _keys_on_different_shards()
    read = f"SELECT v FROM ks.kv WHERE k = {hot}"
    before = stack.emulator.statements["select"]
    early = client.send_query(read)
    await eventually(lambda: stack.sidecar.flights.running)
    # A write on another shard finishes while the read is still in flight.
    await client.query(f"INSERT INTO ks.kv (k, v) VALUES ({other}, 'x')")
    late = client.send_query(read)
    await asyncio.gather(early, late)
    assert stack.emulator.statements["select"] - before == 2
    await client.close()


async def test_a_prepared_write_leaves_reads_of_other_partitions_merged(
    loop_stack: Callable[..., Any],
) -> None:
    stack, client = await _stack(loop_stack)
    hot, other = _keys_on_different_shards()
    await client.query(f"INSERT INTO ks.kv (k, v) VALUES ({hot}, 'hot')")
    read = await client.prepare("SELECT v FROM ks.kv WHERE k = ?")
    write = await client.prepare("INSERT INTO ks.kv (k, v) VALUES (?, ?)")
    before = stack.emulator.statements["select"]
    early = client.send_execute(read.query_id, [_int(hot)])
    await eventually(lambda: stack.sidecar.flights.running)
    await client.send_execute(write.query_id, [_int(other), b"x"])
    late = client.send_execute(read.query_id, [_int(hot)])
    frames = await asyncio.gather(early, late)
    assert all(rows_of(f) == [[b"hot"]] for f in frames)
    assert stack.emulator.statements["select"] - before == 1  # the late read joined
    await client.close()
