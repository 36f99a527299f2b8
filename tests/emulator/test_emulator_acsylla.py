"""The real acsylla (Scylla C++ driver) against an emulator on the test's own loop."""

from __future__ import annotations

import asyncio
import datetime
import decimal
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import acsylla
import pytest

from coalesce.emulator import Emulator

pytestmark = pytest.mark.timeout(60)

MESSAGES = (
    "CREATE TABLE ks.messages (channel_id bigint, bucket int, message_id bigint, "
    "author_id bigint, content text, PRIMARY KEY ((channel_id, bucket), message_id)) "
    "WITH CLUSTERING ORDER BY (message_id DESC)"
)


async def run(session: Any, text: str) -> Any:
    return await session.execute(acsylla.create_statement(text))


@pytest.fixture
async def session(emulator: Emulator) -> AsyncIterator[Any]:
    cluster = acsylla.create_cluster(
        [emulator.host],
        port=emulator.port,
        log_level="error",
        connect_timeout=5,
        request_timeout=10,
    )
    session = await cluster.create_session()
    await run(
        session,
        "CREATE KEYSPACE ks WITH replication = "
        "{'class': 'SimpleStrategy', 'replication_factor': 1}",
    )
    await run(session, MESSAGES)
    await session.use_keyspace("ks")
    try:
        yield session
    finally:
        await session.close()


async def test_acsylla_inserts_and_selects_with_prepared_statements(session: Any) -> None:
    insert = await session.create_prepared(
        "INSERT INTO messages (channel_id, bucket, message_id, author_id, content) "
        "VALUES (?, ?, ?, ?, ?)"
    )
    for message_id in range(3):
        statement = insert.bind()
        statement.bind_list([10, 1, message_id, 99, f"hello {message_id}"])
        await session.execute(statement)
    select = await session.create_prepared(
        "SELECT message_id, content FROM messages WHERE channel_id = ? AND bucket = ?"
    )
    statement = select.bind()
    statement.bind_list([10, 1])
    result = await session.execute(statement)
    rows = [(row.as_dict()["message_id"], row.as_dict()["content"]) for row in result]
    assert rows == [(2, "hello 2"), (1, "hello 1"), (0, "hello 0")]


async def test_acsylla_unprepared_query_with_literals(session: Any) -> None:
    await run(
        session,
        "INSERT INTO messages (channel_id, bucket, message_id, content) "
        "VALUES (1, 1, 1, 'literal')",
    )
    result = await run(session, "SELECT content FROM messages WHERE channel_id = 1 AND bucket = 1")
    assert [row.as_dict()["content"] for row in result] == ["literal"]


async def test_acsylla_pages_with_page_size_and_page_state(session: Any) -> None:
    insert = await session.create_prepared(
        "INSERT INTO messages (channel_id, bucket, message_id, content) VALUES (?, ?, ?, ?)"
    )
    batch = acsylla.create_batch_unlogged()
    for i in range(1000):
        statement = insert.bind()
        statement.bind_list([5, 5, i, "x"])
        batch.add_statement(statement)
    await session.execute_batch(batch)
    seen: list[int] = []
    page_state: bytes | None = None
    pages = 0
    while True:
        statement = acsylla.create_statement(
            "SELECT message_id FROM messages WHERE channel_id = 5 AND bucket = 5",
            page_size=128,
            page_state=page_state,
        )
        result = await session.execute(statement)
        seen.extend(row.as_dict()["message_id"] for row in result)
        pages += 1
        if not result.has_more_pages():
            break
        page_state = result.page_state()
    assert seen == list(range(999, -1, -1))
    assert pages == 8


async def test_acsylla_round_trips_common_types(session: Any) -> None:
    await run(
        session,
        "CREATE TABLE types (k int PRIMARY KEY, b boolean, d double, "
        "dec decimal, u uuid, ts timestamp, l list<int>, m map<text, int>)",
    )
    insert = await session.create_prepared(
        "INSERT INTO types (k, b, d, dec, u, ts, l, m) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
    )
    values: list[Any] = [
        1,
        True,
        2.5,
        decimal.Decimal("3.14"),
        uuid.UUID(int=42),
        datetime.datetime(2024, 1, 2, 3, 4, 5),
        [1, 2, 3],
        {"a": 1},
    ]
    statement = insert.bind()
    statement.bind_list(values)
    await session.execute(statement)
    result = await run(session, "SELECT * FROM types WHERE k = 1")
    row = result.first().as_dict()
    assert row["b"] is True
    assert row["d"] == 2.5
    assert row["dec"] == decimal.Decimal("3.14")
    assert uuid.UUID(str(row["u"])) == uuid.UUID(int=42)
    assert row["l"] == [1, 2, 3]
    assert dict(row["m"]) == {"a": 1}


async def test_acsylla_sees_errors_without_losing_the_session(session: Any) -> None:
    with pytest.raises(acsylla.errors.CassErrorServerSyntaxError):
        await run(session, "SELEKT 1")
    with pytest.raises(acsylla.errors.CassErrorServerInvalidQuery):
        await run(session, "SELECT * FROM nowhere")
    result = await run(session, "SELECT key FROM system.local")
    assert result.first().as_dict()["key"] == "local"


async def test_acsylla_metadata_sees_the_table(session: Any) -> None:
    meta = session.get_metadata().get_table_meta("ks", "messages")
    kinds = {c.name: (c.kind, c.position, c.clustering_order) for c in meta.columns}
    assert kinds["channel_id"] == ("partition_key", 0, "none")
    assert kinds["bucket"] == ("partition_key", 1, "none")
    assert kinds["message_id"] == ("clustering", 0, "desc")


# ------------------------------------------------------------ shard awareness

SHARDS = 4


def _local_ports_outside_the_ephemeral_range() -> tuple[int, int]:
    """Where acsylla may bind its shard-aware connections without meeting TIME_WAIT.

    acsylla's default, 49152-65535, overlaps Linux's ephemeral range: a port some
    other socket left in TIME_WAIT fails the connection ("address already in use")
    and can fail the whole session. Above the ephemeral range only acsylla binds.
    """
    try:
        high = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        high = 60999
    if 65535 - high < 256:
        pytest.skip(f"no room above the ephemeral port range (ends at {high})")
    return high + 1, 65535


async def _wait_for_shard_aware_connections(emu: Emulator) -> None:
    """Poll (bounded) until every shard has a connection made through the shard-aware port."""
    deadline = time.monotonic() + 20.0
    while {c.shard for c in emu.connections() if c.shard_aware_port} != set(range(SHARDS)):
        if time.monotonic() > deadline:
            pytest.fail(f"acsylla did not reach every shard: {emu.connections()}")
        await asyncio.sleep(0.01)


@pytest.fixture
async def shard_aware() -> AsyncIterator[tuple[Emulator, Any]]:
    """A shard-aware emulator and an acsylla session whose pool has reached every shard.

    The emulator is closed first: its connections are reset, so no client port is
    left in TIME_WAIT for the next test's acsylla to trip over.
    """
    low, high = _local_ports_outside_the_ephemeral_range()
    emu = Emulator(shards=SHARDS, read_latency=0.0, per_row=0.0, shard_aware=True)
    await emu.start()
    cluster = acsylla.create_cluster(
        [emu.host],
        port=emu.port,
        log_level="error",
        connect_timeout=5,
        request_timeout=10,
        local_port_range_min=low,
        local_port_range_max=high,
    )
    session = await cluster.create_session()
    try:
        await run(
            session,
            "CREATE KEYSPACE ks WITH replication = "
            "{'class': 'SimpleStrategy', 'replication_factor': 1}",
        )
        await run(session, "CREATE TABLE ks.kv (k int PRIMARY KEY, v text)")
        await _wait_for_shard_aware_connections(emu)
        yield emu, session
    finally:
        await emu.aclose()
        await session.close()


async def test_acsylla_opens_a_connection_per_shard_through_the_shard_aware_port(
    shard_aware: tuple[Emulator, Any],
) -> None:
    emu, _ = shard_aware
    aware = [c for c in emu.connections() if c.shard_aware_port]
    assert sorted(c.shard for c in aware) == list(range(SHARDS))
    assert all(c.client_port % SHARDS == c.shard for c in aware)


async def test_acsylla_sends_each_prepared_request_to_its_partitions_shard(
    shard_aware: tuple[Emulator, Any],
) -> None:
    emu, session = shard_aware
    insert = await session.create_prepared("INSERT INTO ks.kv (k, v) VALUES (?, ?)")
    select = await session.create_prepared("SELECT v FROM ks.kv WHERE k = ?")
    keys = range(200)
    for key in keys:
        statement = insert.bind()
        statement.bind_list([key, f"v{key}"])
        await session.execute(statement)
    for key in keys:
        statement = select.bind()
        statement.bind_list([key])
        rows = [row.as_dict()["v"] for row in await session.execute(statement)]
        assert rows == [f"v{key}"]
    assert sum(emu.metrics.shard_requests) == 2 * len(keys)
    assert all(n > 0 for n in emu.metrics.shard_requests), emu.metrics.shard_requests
    assert emu.wrong_shard_requests == 0
