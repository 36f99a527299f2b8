"""cassandra-driver, acsylla and cqlsh work through the sidecar unchanged."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import acsylla
import pytest
from cassandra.query import SimpleStatement

from coalesce.sidecar.advertised import host_id_for

from .conftest import LoopStack, ThreadStack

pytestmark = pytest.mark.timeout(60)

KEYSPACE = (
    "CREATE KEYSPACE {} WITH replication = {{'class': 'SimpleStrategy', "
    "'replication_factor': 1}}"
)


def test_cassandra_driver_negotiates_v4_and_only_ever_sees_the_sidecar(
    thread_stack: Callable[..., ThreadStack],
) -> None:
    stack = thread_stack()
    cluster = stack.cluster(negotiate=True)  # starts at DSE v2 and steps down
    session = cluster.connect()
    assert cluster.protocol_version == 4
    hosts = cluster.metadata.all_hosts()
    assert [(h.endpoint.address, h.endpoint.port) for h in hosts] == [
        ("127.0.0.1", stack.sidecar.port)
    ]
    assert hosts[0].host_id == host_id_for("127.0.0.1", stack.sidecar.port)
    local = session.execute("SELECT rpc_address, tokens, schema_version FROM system.local").one()
    assert local.rpc_address == "127.0.0.1"
    assert local.tokens  # the whole upstream ring
    assert list(session.execute("SELECT * FROM system.peers")) == []
    assert list(session.execute("SELECT * FROM system.peers_v2")) == []
    pools = session.get_pool_state()
    assert [host.endpoint.port for host in pools] == [stack.sidecar.port]


def test_cassandra_driver_schema_writes_reads_prepares_and_pages(
    thread_stack: Callable[..., ThreadStack],
) -> None:
    stack = thread_stack()
    cluster = stack.cluster()
    session = cluster.connect()
    session.execute(KEYSPACE.format("shop"))
    session.execute("CREATE TABLE shop.items (cat int, id int, name text, PRIMARY KEY (cat, id))")
    insert = session.prepare("INSERT INTO shop.items (cat, id, name) VALUES (?, ?, ?)")
    for i in range(25):
        session.execute(insert, (1, i, f"item {i}"))
    session.execute("INSERT INTO shop.items (cat, id, name) VALUES (2, 0, 'other')")

    select = session.prepare("SELECT id, name FROM shop.items WHERE cat = ?")
    assert [r.id for r in session.execute(select, (1,))] == list(range(25))
    statement = SimpleStatement("SELECT id FROM shop.items WHERE cat = 1", fetch_size=10)
    result = session.execute(statement)
    assert result.has_more_pages
    assert [r.id for r in result] == list(range(25))  # iterating fetches pages 2 and 3

    session.set_keyspace("shop")
    assert session.execute("SELECT name FROM items WHERE cat = 2").one().name == "other"

    table = cluster.metadata.keyspaces["shop"].tables["items"]
    assert [c.name for c in table.partition_key] == ["cat"]
    replicas = cluster.metadata.get_replicas("shop", select.bind((1,)).routing_key)
    assert [h.endpoint.port for h in replicas] == [stack.sidecar.port]


async def test_acsylla_schema_writes_reads_prepares_and_pages(
    loop_stack: Callable[..., Any],
) -> None:
    stack: LoopStack = await loop_stack()
    cluster = acsylla.create_cluster(
        ["127.0.0.1"], port=stack.sidecar.port, log_level="error", connect_timeout=5,
        request_timeout=10,
    )
    session = await cluster.create_session()
    try:
        run = session.execute
        await run(acsylla.create_statement(KEYSPACE.format("ks")))
        await run(acsylla.create_statement(
            "CREATE TABLE ks.events (day int, seq int, what text, PRIMARY KEY (day, seq))"
        ))
        await session.use_keyspace("ks")
        insert = await session.create_prepared(
            "INSERT INTO events (day, seq, what) VALUES (?, ?, ?)"
        )
        for seq in range(300):
            statement = insert.bind()
            statement.bind_list([7, seq, f"e{seq}"])
            await run(statement)
        select = await session.create_prepared("SELECT seq, what FROM events WHERE day = ?")
        seen: list[int] = []
        page_state: bytes | None = None
        while True:
            statement = select.bind(page_size=128, page_state=page_state)
            statement.bind_list([7])
            result = await run(statement)
            seen.extend(row.as_dict()["seq"] for row in result)
            if not result.has_more_pages():
                break
            page_state = result.page_state()
        assert seen == list(range(300))
        meta = session.get_metadata().get_table_meta("ks", "events")
        assert {c.name for c in meta.columns} == {"day", "seq", "what"}
    finally:
        await session.close()


async def test_cqlsh_runs_statements_through_the_sidecar(
    loop_stack: Callable[..., Any],
) -> None:
    stack: LoopStack = await loop_stack()
    script = (
        KEYSPACE.format("notes") + ";"
        "CREATE TABLE notes.n (id int PRIMARY KEY, body text);"
        "INSERT INTO notes.n (id, body) VALUES (1, 'through the sidecar');"
        "SELECT body FROM notes.n WHERE id = 1;"
    )
    cqlsh = os.path.join(os.path.dirname(sys.executable), "cqlsh")
    proc = await asyncio.create_subprocess_exec(
        cqlsh, "127.0.0.1", str(stack.sidecar.port), "-e", script,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    async with asyncio.timeout(45):
        out, _ = await proc.communicate()
    text = out.decode()
    assert proc.returncode == 0, text
    assert "through the sidecar" in text
    assert "(1 rows)" in text
