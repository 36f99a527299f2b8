"""CoalescingSession over the real cassandra-driver, against the emulator over TCP."""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

import pytest
from cassandra import InvalidRequest
from cassandra.cluster import Cluster
from cassandra.policies import ConstantReconnectionPolicy
from cassandra.query import BatchStatement, SimpleStatement

from coalesce import SingleFlight
from coalesce.emulator import EmulatorThread
from coalesce.scylla import CoalescingSession, Rows
from tests.conftest import settle
from tests.scylla.conftest import SCHEMA

_channels = itertools.count(1000)


def new_channel(session: Any, messages: int = 3) -> int:
    channel = next(_channels)
    insert = session.prepare(
        "INSERT INTO messages (channel_id, bucket, message_id, author_id, content)"
        " VALUES (?, 0, ?, 7, ?)"
    )
    for message_id in range(messages):
        session.execute(insert, (channel, message_id, f"m{message_id}"))
    return channel


def selects(emu: EmulatorThread) -> int:
    return int(emu.statements["select"])


async def herd(n: int, read: Any) -> list[Any]:
    return await asyncio.gather(*(read() for _ in range(n)))


async def test_thousand_identical_text_reads_reach_the_database_once(
    driver_session, slow_emulator, coalescing
):
    channel = new_channel(driver_session)
    cs = coalescing(driver_session)
    query = "SELECT message_id, content FROM messages WHERE channel_id = %s AND bucket = 0"
    before = selects(slow_emulator)
    results = await herd(1000, lambda: cs.execute(query, (channel,)))
    assert selects(slow_emulator) - before == 1
    assert all(r is results[0] for r in results)
    assert [(row.message_id, row.content) for row in results[0]] == [
        (2, "m2"), (1, "m1"), (0, "m0"),
    ]


async def test_thousand_identical_prepared_reads_reach_the_database_once(
    driver_session, slow_emulator, coalescing
):
    channel = new_channel(driver_session)
    cs = coalescing(driver_session)
    select = await cs.prepare("SELECT * FROM messages WHERE channel_id = ? AND bucket = ?")
    before = selects(slow_emulator)
    results = await herd(1000, lambda: cs.execute(select, (channel, 0)))
    assert selects(slow_emulator) - before == 1
    assert isinstance(results[0], Rows) and len(results[0]) == 3


async def test_pages_are_coalesced_reads_of_their_own(driver_session, slow_emulator, coalescing):
    channel = new_channel(driver_session, messages=250)
    cs = coalescing(driver_session)
    query = SimpleStatement(
        f"SELECT message_id FROM messages WHERE channel_id = {channel} AND bucket = 0",
        fetch_size=100,
    )
    seen: list[int] = []
    state = None
    before = selects(slow_emulator)
    for expected in (100, 100, 50):
        pages = await herd(200, lambda s=state: cs.execute(query, paging_state=s))
        assert all(p is pages[0] for p in pages) and len(pages[0]) == expected
        seen += [row.message_id for row in pages[0]]
        state = pages[0].paging_state
    assert state is None
    assert seen == list(range(249, -1, -1))
    assert selects(slow_emulator) - before == 3


async def test_different_partitions_and_values_are_not_merged(
    driver_session, slow_emulator, coalescing
):
    channels = [new_channel(driver_session) for _ in range(3)]
    cs = coalescing(driver_session)
    select = await cs.prepare("SELECT * FROM messages WHERE channel_id = ? AND bucket = 0")
    before = selects(slow_emulator)
    results = await asyncio.gather(*(cs.execute(select, (c,)) for c in channels * 10))
    assert selects(slow_emulator) - before == 3
    assert [r[0].channel_id for r in results[:3]] == channels


async def test_a_read_after_a_write_sees_the_write(driver_session, coalescing):
    channel = new_channel(driver_session, messages=1)
    cs = coalescing(driver_session)
    select = await cs.prepare("SELECT * FROM messages WHERE channel_id = ? AND bucket = 0")
    insert = await cs.prepare(
        "INSERT INTO messages (channel_id, bucket, message_id, author_id, content)"
        " VALUES (?, 0, ?, 1, 'new')"
    )
    assert len(await cs.execute(select, (channel,))) == 1
    await cs.execute(insert, (channel, 99))
    rows = await cs.execute(select, (channel,))
    assert rows[0].message_id == 99 and len(rows) == 2


async def test_write_makes_later_reads_of_its_partition_leave_an_older_read_in_flight(
    driver_session, slow_emulator, coalescing
):
    written, untouched = new_channel(driver_session), new_channel(driver_session)
    cs = coalescing(driver_session)
    # Every partition-key column bound: the driver knows each statement's partition.
    select = await cs.prepare("SELECT * FROM messages WHERE channel_id = ? AND bucket = ?")
    insert = await cs.prepare(
        "INSERT INTO messages (channel_id, bucket, message_id, author_id, content)"
        " VALUES (?, ?, 50, 1, 'fresh')"
    )
    hold = slow_emulator.call(slow_emulator.emulator.hold_reads)
    try:
        before = selects(slow_emulator)
        older = asyncio.create_task(cs.execute(select, (written, 0)))
        other = asyncio.create_task(cs.execute(select, (untouched, 0)))
        await asyncio.to_thread(
            slow_emulator.run, slow_emulator.emulator.wait_for_statements("select", before + 2)
        )
        slow_emulator.call(hold.close)  # both reads are in flight, held; new reads flow

        await cs.execute(insert, (written, 0))
        assert not older.done()
        later = await cs.execute(select, (written, 0))  # a fresh flight: it sees the write
        same_other = asyncio.create_task(cs.execute(select, (untouched, 0)))  # joins: untouched
        await settle()
        assert selects(slow_emulator) - before == 3
    finally:
        slow_emulator.call(hold.release)
    assert 50 not in [row.message_id for row in await older]
    assert later[0].message_id == 50
    assert await other is await same_other


async def test_lwt_and_batches_pass_through_uncoalesced(driver_session, slow_emulator, coalescing):
    cs = coalescing(driver_session)
    channel = next(_channels)
    lwt = (
        "INSERT INTO messages (channel_id, bucket, message_id, author_id, content)"
        f" VALUES ({channel}, 0, 1, 1, 'x') IF NOT EXISTS"
    )
    before = dict(slow_emulator.statements)
    results = await herd(10, lambda: cs.execute(lwt))
    assert slow_emulator.statements["insert"] - before["insert"] == 10
    assert sorted(r[0][0] for r in results) == [False] * 9 + [True]

    insert = driver_session.prepare(
        "INSERT INTO messages (channel_id, bucket, message_id, author_id, content)"
        " VALUES (?, 0, ?, 1, 'b')"
    )

    def batch() -> BatchStatement:
        b = BatchStatement()
        b.add(insert, (channel, 2))
        return b

    before = dict(slow_emulator.statements)
    await herd(5, lambda: cs.execute(batch()))
    assert slow_emulator.statements["batch"] - before["batch"] == 5


async def test_volatile_selects_are_not_merged(driver_session, coalescing):
    channel = new_channel(driver_session, messages=1)
    cs = coalescing(driver_session, metrics=True, name="volatile")
    query = f"SELECT message_id, now() FROM messages WHERE channel_id = {channel} AND bucket = 0"
    # The emulator has no now(): every caller's own request is refused, none is shared.
    results = await asyncio.gather(*(cs.execute(query) for _ in range(5)), return_exceptions=True)
    assert all(isinstance(r, InvalidRequest) for r in results)
    assert cs.group.stats is not None and cs.group.stats.started == 0


async def test_driver_errors_reach_every_waiter_unchanged(driver_session, coalescing):
    cs = coalescing(driver_session, metrics=True, name="errors")
    results = await asyncio.gather(
        *(cs.execute("SELECT * FROM no_such_table WHERE k = 1") for _ in range(20)),
        return_exceptions=True,
    )
    assert all(isinstance(r, InvalidRequest) for r in results)
    assert cs.group.stats is not None
    assert cs.group.stats.upstream_error == 1


async def test_one_callers_timeout_and_the_first_callers_cancellation_spare_the_rest(
    driver_session, coalescing
):
    channel = new_channel(driver_session)
    cs = coalescing(driver_session)
    query = f"SELECT * FROM messages WHERE channel_id = {channel} AND bucket = 0"
    first = asyncio.create_task(cs.execute(query))
    await settle()
    impatient = asyncio.create_task(cs.execute(query, timeout=0.0001))
    rest = [asyncio.create_task(cs.execute(query)) for _ in range(5)]
    await settle()
    first.cancel()
    with pytest.raises(TimeoutError):
        await impatient
    results = await asyncio.gather(*rest)
    assert all(len(r) == 3 for r in results)
    assert first.cancelled()


async def test_scopes_and_keyspaces_never_share_an_answer(
    driver_session, slow_emulator, coalescing
):
    channel = new_channel(driver_session)
    group: SingleFlight[Rows] = SingleFlight(metrics=False)
    alice = coalescing(driver_session, group=group, scope="alice")
    bob = coalescing(driver_session, group=group, scope="bob")
    query = f"SELECT * FROM messages WHERE channel_id = {channel} AND bucket = 0"
    before = selects(slow_emulator)
    await asyncio.gather(*(s.execute(query) for s in (alice, bob) * 5))
    assert selects(slow_emulator) - before == 2


async def test_rows_are_immutable_named_tuples(driver_session, coalescing):
    channel = new_channel(driver_session, messages=1)
    cs = coalescing(driver_session)
    rows = await cs.execute(f"SELECT * FROM messages WHERE channel_id = {channel} AND bucket = 0")
    assert rows.one().content == "m0"
    assert isinstance(rows[0], tuple)
    with pytest.raises(TypeError):
        rows[0] = None  # type: ignore[index]
    with pytest.raises(AttributeError):
        rows.one().content = "changed"  # type: ignore[union-attr]


def test_unknown_session_types_are_refused():
    with pytest.raises(TypeError, match="cassandra-driver or acsylla"):
        CoalescingSession(object())


async def test_database_dying_mid_herd_fails_every_waiter_promptly(coalescing):
    with EmulatorThread(read_latency=0.0, per_row=0.0) as emu:
        cluster = Cluster(
            [emu.host], port=emu.port, protocol_version=4,
            reconnection_policy=ConstantReconnectionPolicy(60.0),
        )
        session = await asyncio.to_thread(cluster.connect)
        try:
            for ddl in SCHEMA:
                await asyncio.to_thread(session.execute, ddl)
            cs = coalescing(session, metrics=True, name="dying")
            query = "SELECT * FROM chat.messages WHERE channel_id = 1 AND bucket = 0"
            emu.call(emu.emulator.hold_reads)  # the read reaches the database, no answer
            before = selects(emu)
            herd_tasks = [asyncio.create_task(cs.execute(query)) for _ in range(50)]
            await asyncio.to_thread(
                emu.run, emu.emulator.wait_for_statements("select", before + 1)
            )
            emu.call(emu.emulator.stop)  # the node crashes with the read in flight
            results = await asyncio.wait_for(
                asyncio.gather(*herd_tasks, return_exceptions=True), timeout=20
            )
            assert all(isinstance(r, Exception) for r in results)
            assert len({id(r) for r in results}) == 1  # one upstream error, shared
            assert cs.group.stats is not None and cs.group.stats.upstream_error == 1
        finally:
            await asyncio.to_thread(cluster.shutdown)


async def test_quick_key_of_a_prepared_read_is_the_key_its_call_gets(driver_session, coalescing):
    cs = coalescing(driver_session)
    select = await cs.prepare("SELECT * FROM messages WHERE channel_id = ? AND bucket = ?")
    driver = cs._driver
    for values in ((1, 0), [1, 0], (1.0, 0), (True, 0)):
        quick = driver.quick_key(select, values, {})
        assert quick is not None and quick == driver.call(select, values, {}).key
    assert driver.quick_key(select, (1, 0), {}) != driver.quick_key(select, (1.0, 0), {})
    assert driver.quick_key(select, (1, 0), {"paging_state": b"x"}) is None  # `call` decides
    assert driver.quick_key(select, {"channel_id": 1, "bucket": 0}, {}) is None
    write = await cs.prepare("DELETE FROM messages WHERE channel_id = ? AND bucket = ?")
    assert driver.quick_key(write, (1, 0), {}) is None


async def test_callers_with_and_without_explicit_default_options_share_one_read(
    driver_session, slow_emulator, coalescing
):
    channel = new_channel(driver_session)
    cs = coalescing(driver_session)
    select = await cs.prepare("SELECT * FROM messages WHERE channel_id = ? AND bucket = ?")
    before = selects(slow_emulator)
    results = await asyncio.gather(
        *(cs.execute(select, (channel, 0)) for _ in range(50)),
        *(cs.execute(select, [channel, 0], paging_state=None) for _ in range(50)),
    )
    assert selects(slow_emulator) - before == 1
    assert all(r is results[0] for r in results)
