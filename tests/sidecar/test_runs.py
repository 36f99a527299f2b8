"""Runs: identical requests arriving back to back join their flight on the shortest path.

Each test writes its frames in one TCP write, so they arrive in one read and are
dispatched in one pass: the conditions under which a run forms.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from coalesce.cql import (
    CUSTOM_PAYLOAD,
    Consistency,
    ErrorCode,
    Execute,
    Opcode,
    QueryParameters,
    encode_frame,
)
from coalesce.cql.classify import StatementInfo
from coalesce.sidecar.peers import forget_frame

from .conftest import KS_KV, LoopStack, MakeStack, eventually
from .cqlclient import CqlError, RawClient, rows_of

pytestmark = pytest.mark.timeout(60)

SETUP = KS_KV


def _int(value: int) -> bytes:
    return value.to_bytes(4, "big", signed=True)


async def _ready(loop_stack: MakeStack, **config: Any) -> tuple[LoopStack, RawClient, bytes,
                                                                   bytes]:
    stack = await loop_stack(**config)
    client = await RawClient.connect("127.0.0.1", stack.sidecar.port)
    for statement in SETUP:
        await client.query(statement)
    read = (await client.prepare("SELECT v FROM ks.kv WHERE k = ?")).query_id
    write = (await client.prepare("UPDATE ks.kv SET v = ? WHERE k = ?")).query_id
    return stack, client, read, write


def _execute(query_id: bytes, values: list[bytes | None], stream: int, timestamp: int,
             *, compress: bool = False) -> bytes:
    body = Execute(query_id, QueryParameters(Consistency.ONE, values,
                                             timestamp=timestamp)).encode()
    return encode_frame(Opcode.EXECUTE, body, stream=stream, compress=compress)


def _burst(client: RawClient, frames: list[tuple[int, bytes]]) -> list[asyncio.Future[Any]]:
    waiters = [client.expect(stream) for stream, _ in frames]
    client.writer.write(b"".join(frame for _, frame in frames))
    return waiters


async def test_a_forget_in_the_middle_of_a_run_splits_it_into_two_flights(
    loop_stack: MakeStack,
) -> None:
    # A write's completion comes from upstream, between passes; a ring member's forget
    # is the one thing that can make a flight stale in the middle of a pass.
    stack, client, read, _ = await _ready(loop_stack)
    hold = stack.emulator.hold_reads()
    frames = [(s, _execute(read, [_int(1)], s, 1000 + s)) for s in range(1, 101)]
    forget = forget_frame(StatementInfo("update", "ks", "kv"), None, _int(1))
    frames.append((101, encode_frame(Opcode.QUERY, forget, stream=101, flags=CUSTOM_PAYLOAD)))
    frames += [(s, _execute(read, [_int(1)], s, 1000 + s)) for s in range(102, 202)]
    before = stack.emulator.statements["select"]
    waiters = _burst(client, frames)
    await eventually(lambda: len(hold) == 2)  # one flight before the forget, one after
    hold.release()
    results = await asyncio.gather(*waiters)
    assert stack.emulator.statements["select"] - before == 2
    assert results[100].opcode == Opcode.RESULT
    assert all(rows_of(r) == [[b"one"]] for i, r in enumerate(results) if i != 100)
    assert stack.sidecar.flights.stats.joined == 198
    await client.close()


async def test_a_run_stops_at_max_waiters_and_the_rest_are_refused(
    loop_stack: MakeStack,
) -> None:
    stack, client, read, _ = await _ready(loop_stack, max_waiters=10)
    hold = stack.emulator.hold_reads()
    waiters = _burst(client, [(s, _execute(read, [_int(1)], s, s)) for s in range(1, 31)])
    await eventually(lambda: len(hold) == 1)
    hold.release()
    outcomes = await asyncio.gather(*(_outcome(w) for w in waiters))
    assert outcomes.count("rows") == 10
    assert outcomes.count(ErrorCode.OVERLOADED) == 20
    assert stack.sidecar.stats.merged == 30
    await client.close()


async def _outcome(waiter: asyncio.Future[Any]) -> object:
    try:
        rows_of(await waiter)
    except CqlError as exc:
        return exc.code
    return "rows"


async def test_a_run_keeps_to_max_client_requests(loop_stack: MakeStack) -> None:
    stack, client, read, _ = await _ready(loop_stack, max_client_requests=16)
    hold = stack.emulator.hold_reads()
    waiters = _burst(client, [(s, _execute(read, [_int(1)], s, s)) for s in range(1, 65)])
    await eventually(lambda: len(hold) == 1)
    await eventually(lambda: stack.sidecar.in_flight == 16)
    flight = next(iter(stack.sidecar.flights._by_key.values()))
    assert flight.count == 16  # the rest waits, unread, until answers make room
    hold.close()
    hold.release()
    assert all(rows_of(r) == [[b"one"]] for r in await asyncio.gather(*waiters))
    assert stack.sidecar.in_flight == 0
    await client.close()


async def test_compressed_identical_requests_merge_without_a_run(
    loop_stack: MakeStack,
) -> None:
    stack = await loop_stack()
    setup = await RawClient.connect("127.0.0.1", stack.sidecar.port)
    for statement in SETUP:
        await setup.query(statement)
    await setup.close()
    client = await RawClient.connect("127.0.0.1", stack.sidecar.port, lz4=True)
    read = (await client.prepare("SELECT v FROM ks.kv WHERE k = ?")).query_id
    hold = stack.emulator.hold_reads()
    before = stack.emulator.statements["select"]
    waiters = _burst(client, [(s, _execute(read, [_int(1)], s, s, compress=True))
                              for s in range(1, 41)])
    await eventually(lambda: len(hold) == 1)
    hold.release()
    assert all(rows_of(r) == [[b"one"]] for r in await asyncio.gather(*waiters))
    assert stack.emulator.statements["select"] - before == 1
    assert stack.sidecar.flights.stats.joined >= 39
    await client.close()


async def test_a_different_value_in_a_run_is_its_own_flight(loop_stack: MakeStack) -> None:
    stack, client, read, _ = await _ready(loop_stack)
    hold = stack.emulator.hold_reads()
    keys = [1] * 20 + [2] + [1] * 20
    waiters = _burst(client, [(s, _execute(read, [_int(k)], s, s))
                              for s, k in enumerate(keys, start=1)])
    await eventually(lambda: len(hold) == 2)
    hold.release()
    results = [rows_of(r) for r in await asyncio.gather(*waiters)]
    assert results[20] == []  # k = 2 has no row
    assert all(r == [[b"one"]] for i, r in enumerate(results) if i != 20)
    await client.close()


async def test_requests_that_differ_only_in_their_last_eight_bytes_are_not_one_run(
    loop_stack: MakeStack,
) -> None:
    # With no timestamp, a body's last 8 bytes are its last bound value: a bigint key.
    # Such requests arrive folded (equal but for those bytes) and must not be merged.
    stack = await loop_stack()
    client = await RawClient.connect("127.0.0.1", stack.sidecar.port)
    await client.query(SETUP[0])
    await client.query("CREATE TABLE ks.big (k bigint PRIMARY KEY, v text)")
    for k in (1, 2):
        await client.query(f"INSERT INTO ks.big (k, v) VALUES ({k}, 'v{k}')")
    read = (await client.prepare("SELECT v FROM ks.big WHERE k = ?")).query_id
    hold = stack.emulator.hold_reads()
    keys = [1] * 30 + [2] * 30 + [1] * 5 + [2]
    frames = [(s, encode_frame(Opcode.EXECUTE, Execute(read, QueryParameters(
        Consistency.ONE, [k.to_bytes(8, "big")])).encode(), stream=s))
        for s, k in enumerate(keys, start=1)]
    waiters = _burst(client, frames)
    await eventually(lambda: len(hold) == 2)  # one flight per key, held at the emulator
    hold.release()
    results = [rows_of(r) for r in await asyncio.gather(*waiters)]
    assert results == [[[f"v{k}".encode()]] for k in keys]
    await client.close()


async def test_a_run_of_timestamped_requests_spanning_many_reads_costs_one_upstream_read(
    loop_stack: MakeStack,
) -> None:
    stack, client, read, _ = await _ready(loop_stack)
    hold = stack.emulator.hold_reads()
    frames = [(s, _execute(read, [_int(1)], s, 10_000 + s)) for s in range(1, 1001)]
    waiters = [client.expect(stream) for stream, _ in frames]
    data = b"".join(frame for _, frame in frames)
    for i in range(0, len(data), 997):  # reads cut in the middle of frames
        client.writer.write(data[i:i + 997])
        await client.writer.drain()
    await eventually(lambda: stack.sidecar.flights.stats.joined >= 999)
    assert len(hold) == 1
    hold.release()
    results = [rows_of(r) for r in await asyncio.gather(*waiters)]
    assert all(r == [[b"one"]] for r in results)
    await client.close()
