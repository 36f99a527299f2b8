"""Adversarial tests of runs: frames compared on the shortest path must mean what the
frames they are taken for mean, and everything a run defers must be settled.

As in test_runs.py, each test writes its frames in one TCP write, so they arrive in
one read and are dispatched in one pass: the conditions under which a run forms.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from coalesce.cql import (
    TRACING,
    Consistency,
    Error,
    ErrorCode,
    Execute,
    Frame,
    Opcode,
    Query,
    QueryParameters,
    encode_frame,
)

from .conftest import LoopStack, eventually
from .cqlclient import RawClient, rows_of
from .test_runs import SETUP, MakeStack, _burst, _int

pytestmark = pytest.mark.timeout(60)

ONE = [[b"one"]]


async def _ready(loop_stack: MakeStack, **config: Any) -> tuple[LoopStack, RawClient, bytes]:
    stack = await loop_stack(**config)
    client = await RawClient.connect("127.0.0.1", stack.sidecar.port)
    for statement in SETUP:
        await client.query(statement)
    read = (await client.prepare("SELECT v FROM ks.kv WHERE k = ?")).query_id
    return stack, client, read


def _execute(query_id: bytes, stream: int, params: QueryParameters, **frame: Any) -> bytes:
    return encode_frame(Opcode.EXECUTE, Execute(query_id, params).encode(), stream=stream,
                        **frame)


def _stamped(key: int, timestamp: int, consistency: int = Consistency.ONE) -> QueryParameters:
    return QueryParameters(consistency, [_int(key)], timestamp=timestamp)


async def _settle(*waiters: asyncio.Future[Frame]) -> list[Frame | BaseException]:
    return list(await asyncio.gather(*waiters, return_exceptions=True))


def _error_code(frame: Frame | BaseException) -> int | None:
    if isinstance(frame, BaseException) or frame.opcode != Opcode.ERROR:
        return None
    return Error.decode(frame.body).code


# -- frames that must not be taken for the run's request ----------------------------------


async def test_a_response_bit_frame_inside_a_run_is_a_protocol_error(
    loop_stack: MakeStack,
) -> None:
    # Equal to the frame before it in every compared field but the direction bit: a
    # client that sends a response is broken, and must not be served as if it were not.
    stack, client, read = await _ready(loop_stack)
    hold = stack.emulator.hold_reads()
    frames = [(s, _execute(read, s, _stamped(1, s))) for s in range(1, 4)]
    frames.append((4, _execute(read, 4, _stamped(1, 4), response=True)))
    errors = stack.sidecar.stats.protocol_errors
    waiters = _burst(client, frames)
    await eventually(lambda: len(hold) == 1)
    hold.release()
    results = await _settle(*waiters)
    assert _error_code(results[3]) == ErrorCode.PROTOCOL_ERROR, results[3]
    assert stack.sidecar.stats.protocol_errors == errors + 1
    await asyncio.wait_for(client.closed.wait(), 10)
    await client.close()


async def test_a_v3_frame_inside_a_run_is_refused(loop_stack: MakeStack) -> None:
    stack, client, read = await _ready(loop_stack)
    hold = stack.emulator.hold_reads()
    frames = [(s, _execute(read, s, _stamped(1, s))) for s in range(1, 4)]
    frames.append((4, _execute(read, 4, _stamped(1, 4), version=3)))
    waiters = _burst(client, frames)
    await eventually(lambda: len(hold) == 1)
    hold.release()
    results = await _settle(*waiters)
    assert not isinstance(results[3], Frame) or results[3].opcode == Opcode.ERROR
    await asyncio.wait_for(client.closed.wait(), 10)
    await client.close()


async def test_an_unstamped_request_as_long_as_a_stamped_one_is_not_merged(
    loop_stack: MakeStack,
) -> None:
    # Same length: the unstamped one's last 8 bytes are a page size, a serial
    # consistency and two bytes of its statement, not a timestamp, and it reads k = 2.
    stack, client, _ = await _ready(loop_stack)
    text = "SELECT v FROM ks.kv WHERE k = 1"
    stamped = Query(text, QueryParameters(Consistency.ONE, timestamp=7)).encode()
    other = Query("SELECT v FROM ks.kv WHERE k =   2", QueryParameters(
        Consistency.ONE, page_size=100, serial_consistency=Consistency.SERIAL)).encode()
    assert len(other) == len(stamped)
    hold = stack.emulator.hold_reads()
    frames = [(s, encode_frame(Opcode.QUERY, Query(text, QueryParameters(
        Consistency.ONE, timestamp=s)).encode(), stream=s)) for s in range(1, 4)]
    frames.append((4, encode_frame(Opcode.QUERY, other, stream=4)))
    before = stack.emulator.statements["select"]
    waiters = _burst(client, frames)
    await eventually(lambda: len(hold) == 2)
    hold.release()
    results = await asyncio.gather(*waiters)
    assert [rows_of(r) for r in results[:3]] == [ONE] * 3
    assert rows_of(results[3]) == []
    assert stack.emulator.statements["select"] - before == 2
    await client.close()


async def test_a_different_consistency_in_a_run_is_its_own_flight(
    loop_stack: MakeStack,
) -> None:
    stack, client, read = await _ready(loop_stack)
    hold = stack.emulator.hold_reads()
    levels = [Consistency.ONE] * 5 + [Consistency.QUORUM] * 5
    frames = [(s, _execute(read, s, _stamped(1, s, c))) for s, c in enumerate(levels, start=1)]
    waiters = _burst(client, frames)
    await eventually(lambda: len(hold) == 2)
    hold.release()
    assert all(rows_of(r) == ONE for r in await asyncio.gather(*waiters))
    await client.close()


async def test_a_traced_frame_inside_a_run_is_traced(loop_stack: MakeStack) -> None:
    stack, client, read = await _ready(loop_stack)
    hold = stack.emulator.hold_reads()
    frames = [(s, _execute(read, s, _stamped(1, s))) for s in range(1, 4)]
    frames.append((4, _execute(read, 4, _stamped(1, 4), flags=TRACING)))
    forwarded = stack.sidecar.stats.forwarded
    waiters = _burst(client, frames)
    await eventually(lambda: len(hold) == 2)
    hold.release()
    results = await asyncio.gather(*waiters)
    assert stack.sidecar.stats.forwarded == forwarded + 1  # traced: never merged
    assert all(rows_of(r) == ONE for r in results)
    await client.close()


# -- what a run defers must be settled ----------------------------------------------------


async def test_a_run_broken_by_max_client_requests_leaves_in_flight_exact(
    loop_stack: MakeStack,
) -> None:
    stack, client, read = await _ready(loop_stack, max_client_requests=8)
    hold = stack.emulator.hold_reads()
    waiters = _burst(client, [(s, _execute(read, s, _stamped(1, s))) for s in range(1, 41)])
    await eventually(lambda: len(hold) == 1)
    await eventually(lambda: stack.sidecar.in_flight == 8)
    hold.close()
    hold.release()
    assert all(rows_of(r) == ONE for r in await asyncio.gather(*waiters))
    assert stack.sidecar.in_flight == 0
    assert await stack.sidecar.drain(timeout=5)
    await client.close()


async def test_a_client_gone_in_the_middle_of_its_runs_leaves_nothing_in_flight(
    loop_stack: MakeStack,
) -> None:
    # 300 frames: a run, the budget's end, the backlog's runs; then the client is gone.
    # (A client over max_client_requests is not read, so its going is seen only when
    # its answers are written: not a run's doing.)
    stack, client, read = await _ready(loop_stack)
    other = await RawClient.connect("127.0.0.1", stack.sidecar.port)
    hold = stack.emulator.hold_reads()
    frames = [(s, _execute(read, s, _stamped(1, s))) for s in range(1, 301)]
    client.writer.write(b"".join(frame for _, frame in frames))
    await eventually(lambda: len(hold) == 1)
    await eventually(lambda: stack.sidecar.in_flight == 300)
    keep = other.send_execute(read, [_int(1)])
    await eventually(lambda: stack.sidecar.in_flight == 301)
    client.writer.transport.abort()
    await eventually(lambda: stack.sidecar.in_flight == 1)
    hold.close()
    hold.release()
    assert rows_of(await keep) == ONE
    assert stack.sidecar.in_flight == 0
    assert await stack.sidecar.drain(timeout=5)
    await other.close()


async def test_runs_split_by_the_ingest_budget_count_every_frame_once(
    loop_stack: MakeStack,
) -> None:
    stack, client, read = await _ready(loop_stack)
    hold = stack.emulator.hold_reads()
    frames_before = stack.sidecar.stats.frames[Opcode.EXECUTE]
    merged_before = stack.sidecar.stats.merged
    waiters = _burst(client, [(s, _execute(read, s, _stamped(1, s))) for s in range(1, 1001)])
    await eventually(lambda: stack.sidecar.in_flight == 1000)
    assert len(hold) == 1
    hold.release()
    assert all(rows_of(r) == ONE for r in await asyncio.gather(*waiters))
    assert stack.sidecar.stats.frames[Opcode.EXECUTE] - frames_before == 1000
    assert stack.sidecar.stats.merged - merged_before == 1000
    assert stack.sidecar.in_flight == 0
    await client.close()


async def test_a_reused_stream_id_inside_a_run_is_answered_as_without_runs(
    loop_stack: MakeStack,
) -> None:
    stack, client, read = await _ready(loop_stack)
    hold = stack.emulator.hold_reads()
    frames = [(s, _execute(read, s, _stamped(1, s))) for s in (1, 2, 2, 3)]
    waiters = [client.expect(s) for s in (1, 2, 3)]
    client.writer.write(b"".join(frame for _, frame in frames))
    await eventually(lambda: len(hold) == 1)
    assert stack.sidecar.in_flight == 4
    hold.release()
    assert all(rows_of(r) == ONE for r in await asyncio.gather(*waiters))
    await eventually(lambda: stack.sidecar.in_flight == 0)
    await client.close()


# -- answered runs: requests read before their flight's answer, dispatched after -------


async def _answered_run(
    loop_stack: MakeStack, tail: Callable[[bytes], list[tuple[int, bytes]]],
) -> tuple[LoopStack, RawClient, list[Frame | BaseException], int]:
    """10 identical requests (then `tail`) read before their flight's answer came, and
    dispatched after: another client keeps the ingest budget busy, and this one is at
    max_client_requests (its flight and a read of another key), so they wait in its
    backlog; the flight's answer is kept for them (settled), and they are answered from
    it when the flight's answer makes room."""
    stack, client, read = await _ready(loop_stack, max_client_requests=2)
    flooder = await RawClient.connect("127.0.0.1", stack.sidecar.port)
    proxy = stack.sidecar._require_proxy()
    hold = stack.emulator.hold_reads()
    first = client.expect(1)
    client.writer.write(_execute(read, 1, _stamped(1, 1)))
    await eventually(lambda: len(hold) == 1)
    flooder.writer.write(encode_frame(Opcode.OPTIONS, b"", stream=0) * 20_000)
    await eventually(lambda: proxy.backlogged)
    other = client.expect(2)
    frames = [(2, _execute(read, 2, _stamped(3, 2)))]
    frames += [(s, _execute(read, s, _stamped(1, s))) for s in range(3, 13)] + tail(read)
    waiters = [client.expect(stream) for stream, _ in frames[1:]]
    client.writer.write(b"".join(frame for _, frame in frames))
    await eventually(lambda: len(hold) == 2)
    await eventually(lambda: sum(len(f) for c in stack.sidecar._clients
                                 for _, _, f, _ in c._backlog) >= len(frames) - 1)
    joined = stack.sidecar.flights.stats.joined
    hold._pending.pop(0)()  # the flight's answer, not the other read's
    assert rows_of(await first) == ONE
    results = await _settle(*waiters)
    hold.release()
    results += await _settle(other)  # last: the read of another key (k = 3)
    await flooder.close()
    return stack, client, results, joined


async def test_an_answered_run_is_answered_and_counted(loop_stack: MakeStack) -> None:
    stack, client, results, joined = await _answered_run(loop_stack, lambda _: [])
    assert [rows_of(r) for r in results] == [ONE] * 10 + [[]]  # type: ignore[arg-type]
    assert stack.sidecar.flights.stats.joined - joined == 10
    assert stack.sidecar.in_flight == 0
    await client.close()


async def test_a_response_bit_frame_inside_an_answered_run_is_a_protocol_error(
    loop_stack: MakeStack,
) -> None:
    def tail(read: bytes) -> list[tuple[int, bytes]]:
        return [(13, _execute(read, 13, _stamped(1, 13), response=True))]

    stack, client, results, _ = await _answered_run(loop_stack, tail)
    errors = stack.sidecar.stats.protocol_errors
    assert [rows_of(r) for r in results[:10]] == [ONE] * 10  # type: ignore[arg-type]
    assert _error_code(results[10]) == ErrorCode.PROTOCOL_ERROR, results[10]
    assert errors == 1
    await asyncio.wait_for(client.closed.wait(), 10)
    await client.close()
