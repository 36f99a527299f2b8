"""CoalescingSession over the real acsylla driver, against an in-loop emulator over TCP."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import acsylla
import pytest

from coalesce.emulator import Emulator
from coalesce.scylla import Rows
from tests.scylla.conftest import SCHEMA


@pytest.fixture
async def emu() -> AsyncIterator[Emulator]:
    async with Emulator(read_latency=0.002, per_row=0.0) as emulator:
        yield emulator


@pytest.fixture
async def session(emu: Emulator) -> AsyncIterator[Any]:
    cluster = acsylla.create_cluster([emu.host], port=emu.port, protocol_version=4)
    setup = await cluster.create_session()
    for ddl in SCHEMA:
        await setup.execute(acsylla.create_statement(ddl))
    await setup.close()
    session = await cluster.create_session(keyspace="chat")
    insert = await session.create_prepared(
        "INSERT INTO messages (channel_id, bucket, message_id, author_id, content)"
        " VALUES (?, ?, ?, ?, ?)"
    )
    for channel in (1, 2):
        for message_id in range(3):
            await session.execute(insert.bind([channel, 0, message_id, 7, f"m{message_id}"]))
    try:
        yield session
    finally:
        await session.close()


async def test_thousand_identical_prepared_reads_reach_the_database_once(emu, session, coalescing):
    cs = coalescing(session)
    select = await cs.prepare("SELECT * FROM messages WHERE channel_id = ? AND bucket = ?")
    before = emu.statements["select"]
    results = await asyncio.gather(*(cs.execute(select, [1, 0]) for _ in range(1000)))
    assert emu.statements["select"] - before == 1
    assert all(r is results[0] for r in results)
    assert isinstance(results[0], Rows)
    assert [row.message_id for row in results[0]] == [2, 1, 0]


async def test_identical_text_reads_reach_the_database_once(emu, session, coalescing):
    cs = coalescing(session)
    query = "SELECT content FROM messages WHERE channel_id = 2 AND bucket = 0"
    before = emu.statements["select"]
    results = await asyncio.gather(*(cs.execute(query) for _ in range(500)))
    assert emu.statements["select"] - before == 1
    assert [row.content for row in results[0]] == ["m2", "m1", "m0"]


async def test_values_of_other_types_are_other_keys(emu, session, coalescing):
    cs = coalescing(session)
    select = await cs.prepare("SELECT * FROM messages WHERE channel_id = ? AND bucket = ?")
    before = emu.statements["select"]
    await asyncio.gather(*(cs.execute(select, [c, 0]) for c in (1, 2, 1, 2)))
    assert emu.statements["select"] - before == 2


async def test_paging_state_makes_the_next_page_a_coalesced_read(emu, session, coalescing):
    cs = coalescing(session)
    select = await cs.prepare("SELECT message_id FROM messages WHERE channel_id = ? AND bucket = ?")
    before = emu.statements["select"]
    firsts = await asyncio.gather(*(cs.execute(select, [1, 0], page_size=2) for _ in range(50)))
    assert [r.message_id for r in firsts[0]] == [2, 1] and firsts[0].has_more_pages
    state = firsts[0].paging_state
    seconds = await asyncio.gather(
        *(cs.execute(select, [1, 0], page_size=2, paging_state=state) for _ in range(50))
    )
    assert [r.message_id for r in seconds[0]] == [0]
    assert emu.statements["select"] - before == 2


async def test_a_read_after_a_write_sees_the_write(session, coalescing):
    cs = coalescing(session)
    select = await cs.prepare("SELECT * FROM messages WHERE channel_id = ? AND bucket = ?")
    insert = await cs.prepare(
        "INSERT INTO messages (channel_id, bucket, message_id, author_id, content)"
        " VALUES (?, ?, ?, ?, ?)"
    )
    assert len(await cs.execute(select, [1, 0])) == 3
    await cs.execute(insert, [1, 0, 10, 1, "new"])
    rows = await cs.execute(select, [1, 0])
    assert rows[0].message_id == 10


async def test_lwt_passes_through(emu, session, coalescing):
    cs = coalescing(session)
    lwt = await cs.prepare(
        "INSERT INTO messages (channel_id, bucket, message_id, author_id, content)"
        " VALUES (?, ?, ?, ?, ?) IF NOT EXISTS"
    )
    before = emu.statements["insert"]
    results = await asyncio.gather(*(cs.execute(lwt, [3, 0, 1, 1, "x"]) for _ in range(5)))
    assert emu.statements["insert"] - before == 5
    assert sorted(r[0][0] for r in results) == [False] * 4 + [True]


async def test_errors_reach_every_waiter_unchanged(session, coalescing):
    cs = coalescing(session)
    results = await asyncio.gather(
        *(cs.execute("SELECT * FROM nope WHERE k = 1") for _ in range(10)),
        return_exceptions=True,
    )
    assert len({type(r) for r in results}) == 1
    assert isinstance(results[0], acsylla.errors.CassException)


async def test_unknown_options_are_refused(session, coalescing):
    cs = coalescing(session)
    with pytest.raises(TypeError, match="fetch_size"):
        await cs.execute("SELECT * FROM messages WHERE channel_id = 1 AND bucket = 0", fetch_size=3)


async def test_quick_key_of_a_prepared_read_is_the_key_its_call_gets(session, coalescing):
    cs = coalescing(session)
    select = await cs.prepare("SELECT * FROM messages WHERE channel_id = ? AND bucket = ?")
    driver = cs._driver
    for values in ([1, 0], (1, 0), [1.0, 0], [True, 0], None):
        quick = driver.quick_key(select, values, {})
        assert quick is not None and quick == driver.call(select, values, {}).key
    assert driver.quick_key(select, [1, 0], {}) != driver.quick_key(select, [1.0, 0], {})
    assert driver.quick_key(select, [1, 0], {"page_size": 10}) is None  # options: `call`
    assert driver.quick_key(select, [[1], 0], {}) is None  # nested values: `call` freezes
    write = await cs.prepare("DELETE FROM messages WHERE channel_id = ? AND bucket = ?")
    assert driver.quick_key(write, [1, 0], {}) is None


async def test_callers_with_and_without_explicit_default_options_share_one_read(
    emu, session, coalescing
):
    cs = coalescing(session)
    select = await cs.prepare("SELECT * FROM messages WHERE channel_id = ? AND bucket = ?")
    before = emu.statements["select"]
    results = await asyncio.gather(
        *(cs.execute(select, [1, 0]) for _ in range(50)),
        *(cs.execute(select, (1, 0), page_size=None) for _ in range(50)),
    )
    assert emu.statements["select"] - before == 1
    assert all(r is results[0] for r in results)
