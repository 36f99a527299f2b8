"""Faults stay contained: upstream deaths fail waiters at once, bad clients hurt only themselves."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Callable
from typing import Any

import pytest
from cassandra.cluster import NoHostAvailable

from coalesce.cql import (
    COMPRESSION,
    Error,
    ErrorCode,
    Opcode,
    Query,
    QueryParameters,
    Startup,
    encode_frame,
)

from .conftest import BOUND, LoopStack, ThreadStack, eventually
from .cqlclient import CqlError, RawClient, result_of, rows_of

pytestmark = pytest.mark.timeout(60)

KEYSPACE = (
    "CREATE KEYSPACE ks WITH replication = {'class': 'SimpleStrategy', 'replication_factor': 1}"
)
READ = "SELECT k, v FROM ks.kv WHERE k = 1"
ONE_ROW = [[b"\x00\x00\x00\x01", b"one"]]


async def _setup(loop_stack: Callable[..., Any], latency: float = 0.3,
                 **config: Any) -> tuple[LoopStack, RawClient]:
    stack: LoopStack = await loop_stack(
        emulator={"read_latency": latency, "write_latency": 0.0}, **config
    )
    admin = await RawClient.connect("127.0.0.1", stack.sidecar.port)
    await admin.query(KEYSPACE)
    await admin.query("CREATE TABLE ks.kv (k int PRIMARY KEY, v text)")
    await admin.query("INSERT INTO ks.kv (k, v) VALUES (1, 'one')")
    return stack, admin


def test_killing_scylla_mid_herd_fails_every_waiter_promptly_and_recovers_after_restart(
    thread_stack: Callable[..., ThreadStack],
) -> None:
    # Reads take 30 s upstream and the sidecar would wait 60 s: any answer within
    # BOUND seconds can only come from the lost connection being noticed.
    stack = thread_stack(emulator={"read_latency": 30.0, "write_latency": 0.0},
                         request_timeout=60.0)
    cluster = stack.cluster()
    session = cluster.connect()
    session.execute(KEYSPACE)
    session.execute("CREATE TABLE ks.kv (k int PRIMARY KEY, v text)")
    session.execute("INSERT INTO ks.kv (k, v) VALUES (1, 'one')")
    sessions = [cluster.connect() for _ in range(5)]
    # The driver's own timeout bounds each wait: timing out would raise OperationTimedOut.
    futures = [s.execute_async(READ, timeout=BOUND) for s in sessions for _ in range(20)]
    sidecar = stack.sidecar
    # The herd is in flight once the sidecar has sent its one upstream read.
    group = sidecar.sidecar.flights
    sidecar.eventually(lambda: group.running)

    stack.emulator.call(stack.emulator.emulator.stop)

    for future in futures:
        with pytest.raises(NoHostAvailable):
            future.result()
    assert sidecar.flights() == (0, 0)

    stack.emulator.run(stack.emulator.emulator.start())
    sidecar.run(sidecar.sidecar.wait_upstream_reachable(), timeout=BOUND)
    # Writes are instant here: one going through shows the sidecar is back in business.
    session.execute("INSERT INTO ks.kv (k, v) VALUES (2, 'two')")
    assert sidecar.flights() == (0, 0)


async def test_a_client_leaving_mid_flight_leaves_the_others_served(
    loop_stack: Callable[..., Any],
) -> None:
    stack, admin = await _setup(loop_stack)
    leaver = await RawClient.connect("127.0.0.1", stack.sidecar.port)
    stayer = await RawClient.connect("127.0.0.1", stack.sidecar.port)
    leaver_waiter = leaver.send_query(READ)  # starts the flight
    stayer_waiter = stayer.send_query(READ)
    await eventually(lambda: stack.sidecar.flights.running)
    await leaver.close()
    with pytest.raises(ConnectionError):
        await leaver_waiter
    assert rows_of(await asyncio.wait_for(stayer_waiter, BOUND)) == ONE_ROW
    await stayer.close()
    await admin.close()


async def test_when_every_caller_leaves_the_upstream_read_is_abandoned(
    loop_stack: Callable[..., Any],
) -> None:
    stack, admin = await _setup(loop_stack)
    clients = [await RawClient.connect("127.0.0.1", stack.sidecar.port) for _ in range(3)]
    for client in clients:
        client.send_query(READ).add_done_callback(lambda f: f.exception())
    await eventually(lambda: stack.sidecar.flights.running)
    for client in clients:
        await client.close()
    await eventually(lambda: not stack.sidecar.flights.running and not len(stack.sidecar.flights))
    # The sidecar is still fine for everyone else.
    assert rows_of(await asyncio.wait_for(admin.send_query(READ), BOUND)) == ONE_ROW
    await admin.close()


def _garbage_frames() -> dict[str, bytes]:
    header = struct.Struct(">BBhBi")
    query = Query(READ, QueryParameters(1)).encode()
    return {
        "unknown opcode": header.pack(4, 0, 1, 0x33, 0),
        "oversized body": header.pack(4, 0, 1, Opcode.QUERY, 64 * 1024 * 1024),
        "negative length": header.pack(4, 0, 1, Opcode.QUERY, -5),
        "truncated query": encode_frame(Opcode.QUERY, query[:6], stream=1),
        "corrupt lz4": encode_frame(Opcode.QUERY, b"\x00\x00\x10\x00garbage", stream=1,
                                    flags=COMPRESSION),
        "response direction": encode_frame(Opcode.QUERY, query, stream=1, response=True),
    }


@pytest.mark.parametrize("garbage", sorted(_garbage_frames()))
async def test_a_malformed_frame_closes_only_that_connection(
    loop_stack: Callable[..., Any], garbage: str,
) -> None:
    stack, admin = await _setup(loop_stack, max_frame_size=1024 * 1024)
    good = [await RawClient.connect("127.0.0.1", stack.sidecar.port) for _ in range(3)]
    herd = [client.send_query(READ) for client in good]
    bad = await RawClient.connect("127.0.0.1", stack.sidecar.port, lz4=garbage == "corrupt lz4")
    waiter = bad.expect(1)
    bad.writer.write(_garbage_frames()[garbage])

    async with asyncio.timeout(BOUND):
        reply = await waiter
        await bad.closed.wait()
    assert reply.opcode == Opcode.ERROR
    assert Error.decode(reply.body).code == ErrorCode.PROTOCOL_ERROR
    for frame in await asyncio.wait_for(asyncio.gather(*herd), BOUND):
        assert rows_of(frame) == ONE_ROW
    assert rows_of(await admin.send_query(READ)) == ONE_ROW
    for client in [*good, admin]:
        await client.close()


async def test_an_unsupported_protocol_version_gets_the_reply_drivers_downgrade_on(
    loop_stack: Callable[..., Any],
) -> None:
    stack: LoopStack = await loop_stack()
    reader, writer = await asyncio.open_connection("127.0.0.1", stack.sidecar.port)
    writer.write(encode_frame(Opcode.OPTIONS, b"", stream=3, version=5))
    async with asyncio.timeout(BOUND):
        data = await reader.read()  # everything until the sidecar closes
    assert data[:4] == bytes([0x84, 0, 0, 3])
    assert b"Invalid or unsupported protocol version: 5" in data
    writer.close()


async def test_requests_before_startup_are_refused_and_the_connection_survives(
    loop_stack: Callable[..., Any],
) -> None:
    stack: LoopStack = await loop_stack()
    client = await RawClient.connect("127.0.0.1", stack.sidecar.port, startup=False)
    with pytest.raises(CqlError) as refused:
        result_of(await client.send_query("SELECT key FROM system.local"))
    assert refused.value.code == ErrorCode.PROTOCOL_ERROR
    reply = await client.request(Opcode.STARTUP, Startup({"CQL_VERSION": "3.0.0"}).encode())
    assert reply.opcode == Opcode.READY
    await client.close()


async def test_an_upstream_timeout_fails_merged_and_forwarded_requests_with_a_cql_error(
    loop_stack: Callable[..., Any],
) -> None:
    stack: LoopStack = await loop_stack(
        emulator={"read_latency": 5.0, "write_latency": 5.0}, request_timeout=0.05
    )
    admin = await RawClient.connect("127.0.0.1", stack.sidecar.port)
    await admin.query(KEYSPACE)  # schema changes cost nothing in the emulator
    await admin.query("CREATE TABLE ks.kv (k int PRIMARY KEY, v text)")
    merged = [admin.send_query(READ), admin.send_query(READ)]
    forwarded = admin.send_query("INSERT INTO ks.kv (k, v) VALUES (1, 'one')")
    frames = await asyncio.wait_for(asyncio.gather(*merged, forwarded), BOUND)
    for frame in frames:
        with pytest.raises(CqlError) as failed:
            result_of(frame)
        assert failed.value.code == ErrorCode.SERVER_ERROR
        assert "no answer" in failed.value.message
    await admin.close()


async def test_drain_answers_requests_in_flight_then_stops(
    loop_stack: Callable[..., Any],
) -> None:
    stack, admin = await _setup(loop_stack)
    waiter = admin.send_query(READ)
    await eventually(lambda: stack.sidecar.in_flight)
    drained = await asyncio.wait_for(stack.sidecar.drain(), BOUND)
    assert drained is True
    assert rows_of(await waiter) == ONE_ROW
    with pytest.raises(OSError):
        await RawClient.connect("127.0.0.1", stack.sidecar.port)
    await admin.close()
