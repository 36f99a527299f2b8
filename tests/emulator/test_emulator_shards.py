"""The shard-per-core latency model: hot partitions queue, spread load does not.

No wall-clock assertions: serialisation is observed through queue depths,
reservation times on the loop clock, and the order responses arrive in.
"""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coalesce.cql.frame import Opcode, encode_frame
from coalesce.cql.messages import Query, QueryParameters
from coalesce.emulator import Emulator, ShardModel, shard_of
from coalesce.emulator.storage import routing_key, token_of
from tests.conftest import examples
from tests.emulator.rawcql import RawConnection

pytestmark = pytest.mark.timeout(60)


def test_shard_of_follows_scyllas_formula_at_the_edges() -> None:
    assert shard_of(-(2**63), 4) == 0
    assert shard_of(2**63 - 1, 4) == 3
    assert shard_of(-(2**63), 1) == 0


@settings(max_examples=examples(200), deadline=None)
@given(st.integers(-(2**63), 2**63 - 1), st.integers(1, 64))
def test_shard_of_is_always_a_valid_shard(token: int, shards: int) -> None:
    assert 0 <= shard_of(token, shards) < shards


def test_reservations_on_one_shard_queue_and_on_different_shards_overlap() -> None:
    model = ShardModel(4)
    first = model.reserve(100.0, [(0, 0.001)])
    second = model.reserve(100.0, [(0, 0.001)])
    elsewhere = model.reserve(100.0, [(1, 0.001)])
    assert first.done == pytest.approx(100.001)
    assert second.done == pytest.approx(100.002)
    assert elsewhere.done == pytest.approx(100.001)
    assert model.queue_depths() == [2, 1, 0, 0]
    for reservation in (first, second, elsewhere):
        model.release(reservation)
    assert model.queue_depths() == [0, 0, 0, 0]


def test_a_multi_shard_request_completes_with_its_slowest_part() -> None:
    model = ShardModel(2)
    model.reserve(0.0, [(1, 0.005)])
    both = model.reserve(0.0, [(0, 0.001), (1, 0.001)])
    assert both.done == pytest.approx(0.006)
    assert both.shards == (0, 1)


def test_zero_cost_work_reserves_nothing() -> None:
    model = ShardModel(2)
    reservation = model.reserve(5.0, [(0, 0.0)])
    assert reservation.done == 5.0
    assert reservation.shards == ()
    assert model.queue_depths() == [0, 0]


async def test_serve_waits_for_its_turn_in_fifo_order() -> None:
    model = ShardModel(1)
    finished: list[int] = []

    async def request(i: int) -> None:
        await model.serve([(0, 0.001)])
        finished.append(i)

    tasks = [asyncio.create_task(request(i)) for i in range(5)]
    await asyncio.sleep(0)
    assert model.queue_depth(0) == 5
    await asyncio.gather(*tasks)
    assert finished == [0, 1, 2, 3, 4]
    assert model.queue_depth(0) == 0


# ------------------------------------------------------------ end to end


async def _prepare_table(conn: RawConnection) -> None:
    await conn.startup()
    for text in (
        "CREATE KEYSPACE ks WITH replication = {'class': 'SimpleStrategy', "
        "'replication_factor': 1}",
        "CREATE TABLE ks.kv (k int PRIMARY KEY, v text)",
    ):
        assert (await conn.query(text)).opcode == Opcode.RESULT


def _keys_on_distinct_shards(emu: Emulator, shards: int) -> list[int]:
    column = emu.executor.schema.table("ks", "kv").partition_key
    chosen: dict[int, int] = {}
    key = 0
    while len(chosen) < shards:
        shard = shard_of(token_of(routing_key(column, (key,))), shards)
        chosen.setdefault(shard, key)
        key += 1
    return [chosen[s] for s in range(shards)]


def _select(key: int, stream: int) -> bytes:
    body = Query(f"SELECT * FROM ks.kv WHERE k = {key}", QueryParameters(1)).encode()
    return encode_frame(Opcode.QUERY, body, stream=stream)


async def _wait_for_depths(emu: Emulator, total: int) -> list[int]:
    await emu.wait_for_statements("select", total)
    return emu.shard_queue_depths()


async def test_reads_of_one_hot_partition_are_served_one_at_a_time_in_order() -> None:
    async with Emulator(shards=4, read_latency=0.002) as emu:
        conn = await RawConnection.open(emu.host, emu.port)
        await _prepare_table(conn)
        await conn.send_raw(b"".join(_select(7, stream) for stream in range(1, 51)))
        depths = await _wait_for_depths(emu, 50)
        assert sorted(depths) == [0, 0, 0, 50]
        order = []
        for _ in range(50):
            frame = await conn.read_frame()
            assert frame is not None and frame.opcode == Opcode.RESULT
            order.append(frame.stream)
        assert order == list(range(1, 51))
        assert emu.shard_queue_depths() == [0, 0, 0, 0]
        assert emu.statements["select"] == 50
        await conn.aclose()


async def test_reads_spread_over_shards_do_not_queue_behind_each_other() -> None:
    async with Emulator(shards=4, read_latency=0.002) as emu:
        conn = await RawConnection.open(emu.host, emu.port)
        await _prepare_table(conn)
        keys = _keys_on_distinct_shards(emu, 4)
        await conn.send_raw(b"".join(_select(key, i + 1) for i, key in enumerate(keys)))
        assert await _wait_for_depths(emu, 4) == [1, 1, 1, 1]
        for _ in keys:
            frame = await conn.read_frame()
            assert frame is not None and frame.opcode == Opcode.RESULT
        await conn.aclose()


async def test_system_reads_and_ddl_bypass_the_model() -> None:
    async with Emulator(shards=2, read_latency=10.0) as emu:
        conn = await RawConnection.open(emu.host, emu.port)
        await _prepare_table(conn)  # would take 20 s if DDL were charged
        frame = await conn.query("SELECT * FROM system.local")
        assert frame.opcode == Opcode.RESULT
        assert emu.shard_queue_depths() == [0, 0]
        assert emu.statements["system"] == 1
        assert emu.statements["ddl"] == 2
        await conn.aclose()
