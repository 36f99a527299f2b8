"""A node that forgot a prepared statement gets it again from the sidecar, unseen by clients."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from coalesce.cql import ErrorCode, Opcode

from .conftest import LoopStack, ThreadStack
from .cqlclient import CqlError, RawClient, result_of, rows_of

pytestmark = pytest.mark.timeout(60)

KEYSPACE = (
    "CREATE KEYSPACE ks WITH replication = {'class': 'SimpleStrategy', 'replication_factor': 1}"
)


def test_executes_keep_working_after_scylla_forgets_its_prepared_statements(
    thread_stack: Callable[..., ThreadStack],
) -> None:
    stack = thread_stack()
    session = stack.cluster().connect()
    session.execute(KEYSPACE)
    session.execute("CREATE TABLE ks.kv (k int PRIMARY KEY, v text)")
    session.set_keyspace("ks")
    write = session.prepare("INSERT INTO kv (k, v) VALUES (?, ?)")
    read = session.prepare("SELECT v FROM kv WHERE k = ?")
    session.execute(write, (1, "one"))
    prepares = stack.sidecar.call(lambda: stack.sidecar.sidecar.stats.frames[Opcode.PREPARE])

    stack.emulator.forget_prepared()
    session.execute(write, (2, "two"))  # forwarded path
    stack.emulator.forget_prepared()
    assert session.execute(read, (2,)).one().v == "two"  # merged path

    # The driver never had to prepare again: the sidecar did it.
    after = stack.sidecar.call(lambda: stack.sidecar.sidecar.stats.frames[Opcode.PREPARE])
    assert after == prepares


async def test_a_merged_herd_re_prepares_once_for_all_its_waiters(
    loop_stack: Callable[..., Any],
) -> None:
    stack: LoopStack = await loop_stack(emulator={"read_latency": 0.2, "write_latency": 0.0})
    client = await RawClient.connect("127.0.0.1", stack.sidecar.port)
    await client.query(KEYSPACE)
    await client.query("CREATE TABLE ks.kv (k int PRIMARY KEY, v text)")
    await client.query("INSERT INTO ks.kv (k, v) VALUES (1, 'one')")
    read = await client.prepare("SELECT v FROM ks.kv WHERE k = ?")
    stack.emulator.forget_prepared()
    frames = await asyncio.gather(
        *(client.send_execute(read.query_id, [b"\x00\x00\x00\x01"]) for _ in range(10))
    )
    assert all(rows_of(f) == [[b"one"]] for f in frames)
    await client.close()


async def test_an_id_the_sidecar_never_saw_prepared_gets_unprepared(
    loop_stack: Callable[..., Any],
) -> None:
    stack: LoopStack = await loop_stack()
    client = await RawClient.connect("127.0.0.1", stack.sidecar.port)
    with pytest.raises(CqlError) as unknown:
        result_of(await client.send_execute(b"\x01" * 16, []))
    assert unknown.value.code == ErrorCode.UNPREPARED
    await client.close()
