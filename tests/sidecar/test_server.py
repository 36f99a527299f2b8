"""The sidecar as a whole: what it says about itself, metrics, health, events, SIGTERM."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import uuid
from collections.abc import Callable
from typing import Any

import pytest

from coalesce.cql import ErrorCode, Event, Opcode, Register, SchemaChangeEvent
from coalesce.sidecar.advertised import host_id_for

from .conftest import BOUND, LoopStack, eventually
from .cqlclient import CqlError, RawClient, rows_of

pytestmark = pytest.mark.timeout(60)

KEYSPACE = (
    "CREATE KEYSPACE ks WITH replication = {'class': 'SimpleStrategy', 'replication_factor': 1}"
)


async def _http_get(port: int, path: str) -> tuple[int, str]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: test\r\n\r\n".encode())
    async with asyncio.timeout(BOUND):
        data = await reader.read()
    writer.close()
    head, _, body = data.decode().partition("\r\n\r\n")
    return int(head.split(" ")[1]), body


async def test_system_local_describes_the_sidecar_and_peers_are_empty(
    loop_stack: Callable[..., Any],
) -> None:
    stack: LoopStack = await loop_stack(data_center="dc-side", rack="rack-side")
    client = await RawClient.connect("127.0.0.1", stack.sidecar.port)
    result = await client.query(
        "SELECT host_id, rpc_address, data_center, rack, tokens, schema_version, "
        "cluster_name FROM system.local WHERE key='local'"
    )
    names = [c.name for c in result.metadata.columns]
    row = dict(zip(names, result.rows[0], strict=True))
    types = {c.name: c.type for c in result.metadata.columns}
    assert uuid.UUID(bytes=row["host_id"]) == host_id_for("127.0.0.1", stack.sidecar.port)
    assert types["rpc_address"].deserialize(row["rpc_address"]) == "127.0.0.1"
    assert row["data_center"] == b"dc-side"
    assert row["rack"] == b"rack-side"
    assert len(types["tokens"].deserialize(row["tokens"])) == 8  # the emulator's whole ring
    assert row["cluster_name"] == b"coalesce-emulator"  # everything else stays Scylla's
    for table in ("peers", "peers_v2"):
        peers = await client.query(f"SELECT * FROM system.{table}")
        assert peers.rows == []
        assert peers.metadata.columns  # same metadata as Scylla's
    await client.close()


async def test_schema_change_events_are_relayed_to_registered_clients(
    loop_stack: Callable[..., Any],
) -> None:
    stack: LoopStack = await loop_stack()
    listener = await RawClient.connect("127.0.0.1", stack.sidecar.port)
    reply = await listener.request(
        Opcode.REGISTER, Register(["SCHEMA_CHANGE", "STATUS_CHANGE", "TOPOLOGY_CHANGE"]).encode()
    )
    assert reply.opcode == Opcode.READY
    writer = await RawClient.connect("127.0.0.1", stack.sidecar.port)
    await writer.query(KEYSPACE)
    async with asyncio.timeout(BOUND):
        frame = await listener.events.get()
    event = Event.decode(frame.body)
    assert isinstance(event, SchemaChangeEvent)
    assert (event.change_type, event.keyspace) == ("CREATED", "ks")
    await listener.close()
    await writer.close()


async def test_metrics_and_health_endpoints(loop_stack: Callable[..., Any]) -> None:
    stack: LoopStack = await loop_stack(emulator={"read_latency": 0.05})
    client = await RawClient.connect("127.0.0.1", stack.sidecar.port)
    await client.query(KEYSPACE)
    await client.query("CREATE TABLE ks.kv (k int PRIMARY KEY, v text)")
    read = "SELECT v FROM ks.kv WHERE k = 1"
    await asyncio.gather(*(client.send_query(read) for _ in range(3)))

    port = stack.sidecar.metrics_port
    assert port is not None
    status, text = await _http_get(port, "/metrics")
    assert status == 200
    for line in (
        "coalesce_sidecar_client_connections 1.0",
        'coalesce_sidecar_frames_total{opcode="QUERY"} 5.0',
        'coalesce_sidecar_requests_total{path="merged"} 3.0',
        'coalesce_callers_total{group="sidecar",outcome="joined"} 2.0',
        "coalesce_sidecar_upstream_errors_total 0.0",
    ):
        assert line in text, line
    assert "coalesce_sidecar_upstream_connections{node=" in text

    status, body = await _http_get(port, "/healthz")
    assert status == 200
    assert json.loads(body)["reachable"] is True
    assert (await _http_get(port, "/readyz"))[0] == 200
    assert (await _http_get(port, "/livez"))[0] == 200

    await stack.emulator.aclose()
    # The pooled connections notice the emulator is gone.
    await eventually(lambda: not stack.sidecar.upstream.any_reachable)
    status, body = await _http_get(port, "/healthz")
    assert status == 503
    assert json.loads(body)["reachable"] is False
    assert (await _http_get(port, "/readyz"))[0] == 503
    assert (await _http_get(port, "/livez"))[0] == 200  # restarting us would not help
    assert (await _http_get(port, "/nope"))[0] == 404
    await client.close()


async def test_sigterm_drains_requests_in_flight_then_exits_cleanly(
    loop_stack: Callable[..., Any],
) -> None:
    stack: LoopStack = await loop_stack(emulator={"read_latency": 0.3, "write_latency": 0.0})
    setup = await RawClient.connect("127.0.0.1", stack.sidecar.port)
    await setup.query(KEYSPACE)
    await setup.query("CREATE TABLE ks.kv (k int PRIMARY KEY, v text)")
    await setup.query("INSERT INTO ks.kv (k, v) VALUES (1, 'one')")
    await setup.close()

    script = (
        "import argparse, sys\n"
        "from coalesce.sidecar.command import configure_parser\n"
        "parser = argparse.ArgumentParser()\n"
        "configure_parser(parser)\n"
        "args = parser.parse_args(sys.argv[1:])\n"
        "sys.exit(args.run(args))\n"
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", script, "--listen", "127.0.0.1:0",
        "--upstream", f"127.0.0.1:{stack.emulator.port}", "--metrics", "off",
        stderr=asyncio.subprocess.PIPE, env={**os.environ, "PYTHONPATH": os.getcwd()},
    )
    try:
        assert proc.stderr is not None
        async with asyncio.timeout(BOUND):
            line = (await proc.stderr.readline()).decode()
        assert "listening on 127.0.0.1:" in line, line
        port = int(line.split("listening on 127.0.0.1:")[1].split(",")[0])
        client = await RawClient.connect("127.0.0.1", port)
        waiter = client.send_query("SELECT v FROM ks.kv WHERE k = 1")
        # The read is in the sidecar once the emulator has started serving it.
        await eventually(lambda: any(stack.emulator.shard_queue_depths()))
        proc.send_signal(signal.SIGTERM)
        assert rows_of(await asyncio.wait_for(waiter, BOUND)) == [[b"one"]]
        async with asyncio.timeout(BOUND):
            assert await proc.wait() == 0
            rest = (await proc.stderr.read()).decode()
        assert "draining" in rest
        await client.close()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_use_of_a_missing_keyspace_gets_scyllas_own_error(
    loop_stack: Callable[..., Any],
) -> None:
    stack: LoopStack = await loop_stack()
    client = await RawClient.connect("127.0.0.1", stack.sidecar.port)
    with pytest.raises(CqlError) as refused:
        await client.query("USE nowhere")
    assert refused.value.code == ErrorCode.INVALID
    assert "nowhere" in refused.value.message
    await client.query(KEYSPACE)
    result = await client.query('USE "ks"')
    assert result.keyspace == "ks"
    await client.query("CREATE TABLE kv (k int PRIMARY KEY, v text)")  # unqualified: in ks
    assert (await client.query("SELECT * FROM ks.kv")).rows == []
    await client.close()


async def test_readyz_turns_unready_while_draining_and_livez_stays_live(
    loop_stack: Callable[..., Any],
) -> None:
    stack: LoopStack = await loop_stack(emulator={"read_latency": 0.5, "write_latency": 0.0})
    client = await RawClient.connect("127.0.0.1", stack.sidecar.port)
    await client.query(KEYSPACE)
    await client.query("CREATE TABLE ks.kv (k int PRIMARY KEY, v text)")
    port = stack.sidecar.metrics_port
    assert port is not None
    assert (await _http_get(port, "/readyz"))[0] == 200
    read = client.send_query("SELECT * FROM ks.kv WHERE k = 1")
    await eventually(lambda: stack.sidecar.in_flight)
    drained = asyncio.get_running_loop().create_task(stack.sidecar.drain(timeout=BOUND))
    await eventually(lambda: stack.sidecar.health()["draining"])
    assert (await _http_get(port, "/readyz"))[0] == 503
    assert (await _http_get(port, "/healthz"))[0] == 200
    assert (await _http_get(port, "/livez"))[0] == 200
    await read
    assert await drained
    await client.close()
