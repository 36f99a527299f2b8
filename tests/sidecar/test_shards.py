"""The sidecar's upstream is shard-aware: each request with a known partition goes to the
connection of the shard that owns it, through Scylla's shard-aware port."""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

import pytest

from coalesce.cql import TRACING, Consistency, Execute, Opcode, QueryParameters

from .conftest import LoopStack, eventually
from .cqlclient import CqlError, RawClient, result_of

pytestmark = pytest.mark.timeout(60)

SHARDS = 4
KEYSPACE = (
    "CREATE KEYSPACE ks WITH replication = {'class': 'SimpleStrategy', 'replication_factor': 1}"
)


async def _setup(loop_stack: Callable[..., Any], **emulator: Any) -> tuple[LoopStack, RawClient,
                                                                          bytes]:
    stack: LoopStack = await loop_stack(emulator={"shards": SHARDS, **emulator})
    client = await RawClient.connect("127.0.0.1", stack.sidecar.port)
    await client.query(KEYSPACE)
    await client.query("CREATE TABLE ks.kv (k int PRIMARY KEY, v text)")
    prepared = await client.prepare("SELECT v FROM ks.kv WHERE k = ?")
    return stack, client, prepared.query_id


def _shard_connections(stack: LoopStack) -> int:
    return sum(len(pool._by_shard) for pool in stack.sidecar.upstream._pools.values())


async def _reads(client: RawClient, query_id: bytes, keys: range, flags: int = 0) -> None:
    for k in keys:
        params = QueryParameters(Consistency.ONE, [struct.pack(">i", k)])
        result_of(await client.request(Opcode.EXECUTE, Execute(query_id, params).encode(),
                                       flags=flags))


async def test_reads_and_forwards_go_to_the_shard_owning_their_partition(
    loop_stack: Callable[..., Any],
) -> None:
    stack, client, query_id = await _setup(loop_stack, shard_aware=True)
    await eventually(lambda: _shard_connections(stack) >= SHARDS)
    before = stack.emulator.wrong_shard_requests
    await _reads(client, query_id, range(200))  # merged path
    await _reads(client, query_id, range(200), flags=TRACING)  # forwarded path
    assert stack.emulator.wrong_shard_requests - before == 0
    by_shard = stack.emulator.connections_by_shard()
    assert all(count >= 1 for count in by_shard), by_shard
    await client.close()


async def test_without_a_shard_aware_port_the_sidecar_keeps_to_the_cql_port(
    loop_stack: Callable[..., Any],
) -> None:
    stack, client, query_id = await _setup(loop_stack, shard_aware=True, shard_aware_port=None)
    await _reads(client, query_id, range(50))
    assert _shard_connections(stack) == 0
    await client.close()


async def test_a_node_that_does_not_advertise_shards_is_used_as_before(
    loop_stack: Callable[..., Any],
) -> None:
    stack, client, query_id = await _setup(loop_stack)
    await _reads(client, query_id, range(50))
    assert _shard_connections(stack) == 0
    assert all(node.sharding is None for node in stack.sidecar.upstream.nodes)
    await client.close()


async def test_a_node_down_for_a_while_keeps_its_shard_aware_port(
    loop_stack: Callable[..., Any],
) -> None:
    stack, client, query_id = await _setup(loop_stack, shard_aware=True)
    await eventually(lambda: _shard_connections(stack) >= SHARDS)
    stack.emulator.stop()
    await eventually(lambda: _shard_connections(stack) == 0)
    with pytest.raises(CqlError):  # while it is down: connects to its shards fail
        await _reads(client, query_id, range(1))
    await stack.emulator.start()
    await stack.sidecar.wait_upstream_reachable()
    await eventually(lambda: _shard_connections(stack) >= SHARDS)
    before = stack.emulator.wrong_shard_requests
    await _reads(client, query_id, range(100))
    assert stack.emulator.wrong_shard_requests - before == 0
    assert all(node.sharding is not None and node.sharding.port is not None
               for node in stack.sidecar.upstream.nodes)
    await client.close()
