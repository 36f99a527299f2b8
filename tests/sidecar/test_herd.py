"""A herd through the sidecar: answers leave while the herd is still being read, and
clients leaving or Scylla dying mid-herd leave nothing behind."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from coalesce.cql import Opcode

from .conftest import BOUND, LoopStack, eventually
from .cqlclient import RawClient, result_of

pytestmark = pytest.mark.timeout(60)

KEYSPACE = (
    "CREATE KEYSPACE ks WITH replication = {'class': 'SimpleStrategy', 'replication_factor': 1}"
)
CONNECTIONS = 50
PER_CONNECTION = 200
KEY = [b"\x00\x00\x00\x01"]


async def _herd_setup(
    loop_stack: Callable[..., Any], read_latency: float
) -> tuple[LoopStack, RawClient, bytes, list[RawClient]]:
    stack: LoopStack = await loop_stack(
        emulator={"read_latency": read_latency, "write_latency": 0.0}
    )
    admin = await RawClient.connect("127.0.0.1", stack.sidecar.port)
    await admin.query(KEYSPACE)
    await admin.query("CREATE TABLE ks.kv (k int PRIMARY KEY, v text)")
    await admin.query("INSERT INTO ks.kv (k, v) VALUES (1, 'one')")
    prepared = await admin.prepare("SELECT v FROM ks.kv WHERE k = ?")
    clients = [await RawClient.connect("127.0.0.1", stack.sidecar.port)
               for _ in range(CONNECTIONS)]
    return stack, admin, prepared.query_id, clients


def _send_herd(clients: list[RawClient], query_id: bytes) -> list[asyncio.Future[Any]]:
    return [c.send_execute(query_id, KEY) for c in clients for _ in range(PER_CONNECTION)]


async def test_a_herds_first_answers_leave_before_its_ingest_ends(
    loop_stack: Callable[..., Any],
) -> None:
    # The read takes 1 ms; reading 10,000 requests takes far longer. The sidecar must
    # answer the requests it has when Scylla's answer comes, not when it has read all.
    stack, admin, query_id, clients = await _herd_setup(loop_stack, read_latency=0.001)
    sidecar = stack.sidecar
    reads_before = stack.emulator.statements["select"]
    executes_before = sidecar.stats.frames[Opcode.EXECUTE]
    dispatched_at_first_answer: list[int] = []

    def first_answer(_: object) -> None:
        if not dispatched_at_first_answer:
            dispatched_at_first_answer.append(
                sidecar.stats.frames[Opcode.EXECUTE] - executes_before)

    waiters = _send_herd(clients, query_id)
    for waiter in waiters:
        waiter.add_done_callback(first_answer)
    frames = await asyncio.wait_for(asyncio.gather(*waiters), BOUND)

    total = CONNECTIONS * PER_CONNECTION
    assert all(result_of(f).rows == [[b"one"]] for f in frames)
    assert dispatched_at_first_answer[0] < total // 2, dispatched_at_first_answer
    # Requests read before the answer came share it even if dispatched after.
    assert stack.emulator.statements["select"] - reads_before <= 3
    for client in clients:
        await client.close()
    await admin.close()


async def test_clients_leaving_mid_herd_leave_the_rest_served_and_the_table_empty(
    loop_stack: Callable[..., Any],
) -> None:
    stack, admin, query_id, clients = await _herd_setup(loop_stack, read_latency=0.2)
    leavers, stayers = clients[:10], clients[10:]
    left = _send_herd(leavers, query_id)
    stayed = _send_herd(stayers, query_id)
    await eventually(lambda: stack.sidecar.flights.running)
    for client in leavers:
        await client.close()
    frames = await asyncio.wait_for(asyncio.gather(*stayed), BOUND)
    assert all(result_of(f).rows == [[b"one"]] for f in frames)
    outcomes = await asyncio.gather(*left, return_exceptions=True)
    assert all(isinstance(o, ConnectionError) or result_of(o).rows == [[b"one"]]
               for o in outcomes)
    await eventually(lambda: not len(stack.sidecar.flights) and not stack.sidecar.flights.running)
    for client in stayers:
        await client.close()
    await admin.close()


async def test_scylla_dying_mid_herd_fails_every_waiter_and_leaves_the_table_empty(
    loop_stack: Callable[..., Any],
) -> None:
    stack, admin, query_id, clients = await _herd_setup(loop_stack, read_latency=30.0)
    waiters = _send_herd(clients, query_id)
    await eventually(lambda: stack.sidecar.flights.running)
    await eventually(lambda: sum(c.pending for c in stack.sidecar._clients) >= len(waiters))
    stack.emulator.stop()
    frames = await asyncio.wait_for(asyncio.gather(*waiters), BOUND)
    assert all(f.opcode == Opcode.ERROR for f in frames)
    assert len(stack.sidecar.flights) == 0 and stack.sidecar.flights.running == 0
    assert stack.sidecar.in_flight == 0
    for client in clients:
        await client.close()
    await admin.close()
