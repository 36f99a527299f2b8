"""What one client can make the sidecar hold is bounded, and costs nobody else.

Pools and upstream connections after USE storms, buffers for a client that does not
read, handshake and idle deadlines, the connection cap, and floods of PREPARE, USE,
REGISTER and OPTIONS.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from coalesce.cql import (
    Error,
    ErrorCode,
    FrameDecoder,
    Opcode,
    Query,
    QueryParameters,
    Register,
    Startup,
    encode_frame,
)
from coalesce.sidecar import Sidecar

from .conftest import BOUND, LoopStack, eventually
from .cqlclient import CqlError, RawClient, result_of, rows_of

pytestmark = pytest.mark.timeout(90)

KEYSPACE = (
    "CREATE KEYSPACE {} WITH replication = {{'class': 'SimpleStrategy', "
    "'replication_factor': 1}}"
)
READ = "SELECT k, v FROM ks.kv WHERE k = 1"
ONE_ROW = [[b"\x00\x00\x00\x01", b"one"]]
STARTUP = Startup({"CQL_VERSION": "3.0.0"}).encode()


async def _setup(loop_stack: Callable[..., Any], **config: Any) -> tuple[LoopStack, RawClient]:
    stack: LoopStack = await loop_stack(**config)
    admin = await RawClient.connect("127.0.0.1", stack.sidecar.port)
    await admin.query(KEYSPACE.format("ks"))
    await admin.query("CREATE TABLE ks.kv (k int PRIMARY KEY, v text)")
    await admin.query("INSERT INTO ks.kv (k, v) VALUES (1, 'one')")
    return stack, admin


def _clients(sidecar: Sidecar) -> set[Any]:
    return sidecar._clients


@contextmanager
def _peaks(sample: Callable[[], dict[str, int]]) -> Iterator[dict[str, int]]:
    """The largest value each reading of `sample` took, sampled every loop turn."""
    peaks: dict[str, int] = {}
    loop = asyncio.get_running_loop()
    running = True

    def tick() -> None:
        for name, value in sample().items():
            peaks[name] = max(peaks.get(name, value), value)
        if running:
            loop.call_soon(tick)

    tick()
    try:
        yield peaks
    finally:
        running = False


# -- 3. USE storms --------------------------------------------------------------------


async def test_a_thousand_uses_of_missing_keyspaces_leave_pools_and_connections_as_they_were(
    loop_stack: Callable[..., Any],
) -> None:
    stack, admin = await _setup(loop_stack, max_pools=8)
    upstream = stack.sidecar.upstream
    pools, connections = upstream.pool_count, dict(upstream.connections_by_node())
    emulator_connections = stack.emulator.connection_count
    stormer = await RawClient.connect("127.0.0.1", stack.sidecar.port)
    with _peaks(lambda: {"pools": upstream.pool_count,
                         "emulator": stack.emulator.connection_count}) as peak:
        frames = await asyncio.wait_for(asyncio.gather(
            *(stormer.send_query(f"USE missing_{i}") for i in range(1000))
        ), 60)
    codes = {Error.decode(f.body).code for f in frames}
    assert codes <= {ErrorCode.INVALID, ErrorCode.OVERLOADED}, codes
    assert peak["pools"] <= 8
    assert peak["emulator"] <= emulator_connections + 8 + 1  # at most 8 opened at once
    await eventually(lambda: upstream.pool_count == pools)
    assert upstream.connections_by_node() == connections
    await eventually(lambda: stack.emulator.connection_count == emulator_connections)
    assert rows_of(await stormer.send_query(READ)) == ONE_ROW  # the stormer still works
    await stormer.close()
    await admin.close()


async def test_more_keyspaces_than_max_pools_get_a_clear_error_not_more_pools(
    loop_stack: Callable[..., Any],
) -> None:
    stack, admin = await _setup(loop_stack, max_pools=4)
    for i in range(6):
        await admin.query(KEYSPACE.format(f"ks{i}"))
    clients = [await RawClient.connect("127.0.0.1", stack.sidecar.port) for _ in range(6)]
    refused = []
    for i, client in enumerate(clients):
        frame = await client.send_query(f"USE ks{i}")
        if frame.opcode == Opcode.ERROR:
            error = Error.decode(frame.body)
            assert error.code == ErrorCode.OVERLOADED
            assert "keyspaces" in error.message
            refused.append(client)
        assert stack.sidecar.upstream.pool_count <= 4
    assert refused, "six keyspaces in use fit in four pools?"
    for client in refused:  # still connected, still in their keyspace (none): they work
        assert rows_of(await client.send_query(READ)) == ONE_ROW
    for client in [*clients, admin]:
        await client.close()


async def test_one_client_cycling_through_more_keyspaces_than_max_pools_stays_bounded(
    loop_stack: Callable[..., Any],
) -> None:
    stack, admin = await _setup(loop_stack, max_pools=4, pool_idle_timeout=60.0)
    for i in range(10):
        await admin.query(KEYSPACE.format(f"ks{i}"))
        await admin.query(f"CREATE TABLE ks{i}.kv (k int PRIMARY KEY, v text)")
    upstream = stack.sidecar.upstream
    cycler = await RawClient.connect("127.0.0.1", stack.sidecar.port)
    with _peaks(lambda: {"pools": upstream.pool_count,
                         "connections": sum(upstream.connections_by_node().values())}) as peak:
        for _ in range(5):
            for i in range(10):
                await cycler.query(f"USE ks{i}")  # idle pools make room: every USE works
                assert rows_of(await cycler.send_query("SELECT v FROM kv WHERE k = 1")) == []
    assert peak["pools"] <= 4
    assert peak["connections"] <= 4 * stack.sidecar.config.connections_per_node
    await cycler.close()
    await admin.close()


async def test_after_an_upstream_restart_only_pools_in_use_reconnect(
    loop_stack: Callable[..., Any],
) -> None:
    stack, admin = await _setup(loop_stack, max_pools=32, pool_idle_timeout=60.0,
                                connections_per_node=2)
    for i in range(20):
        await admin.query(KEYSPACE.format(f"ks{i}"))
    for i in range(20):  # twenty pools, used once, then idle (kept for 60 s)
        visitor = await RawClient.connect("127.0.0.1", stack.sidecar.port)
        await visitor.query(f"USE ks{i}")
        await visitor.close()
    upstream = stack.sidecar.upstream
    assert upstream.pool_count == 21
    emu = stack.emulator
    emu.stop()
    await eventually(lambda: sum(upstream.connections_by_node().values()) == 0)
    with _peaks(lambda: {"emulator": emu.connection_count}) as peak:
        await emu.start()
        await stack.sidecar.wait_upstream_reachable()
        assert rows_of(await asyncio.wait_for(admin.send_query(READ), BOUND)) == ONE_ROW
        await eventually(lambda: sum(upstream.connections_by_node().values()) == 2)
    # The admin's pool (2) plus a probe; the twenty idle pools open nothing.
    assert peak["emulator"] <= 4, peak
    assert emu.connection_count <= 3
    await admin.close()


# -- 4. a client that does not read --------------------------------------------------------


async def _deaf_connection(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # small: the sidecar sees it
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    reader, writer = await asyncio.open_connection(sock=sock, limit=1 << 24)
    writer.write(encode_frame(Opcode.STARTUP, STARTUP, stream=0))
    header = await reader.readexactly(9)
    assert header[4] == Opcode.READY
    return reader, writer


async def _never_reads(stack: LoopStack, admin: RawClient, what: str) -> tuple[dict[str, int],
                                                                               int]:
    """Flood from a client that does not read; the peaks of what the sidecar held for it,
    and the size of one answer. Checks the others are served meanwhile and that the
    client gets every answer once it reads."""
    await admin.query(f"INSERT INTO ks.kv (k, v) VALUES (2, '{'x' * 1000}')")
    count = 10_000 if what == "reads" else 100_000  # answers of ~1.1 KB and ~110 B
    if what == "reads":
        body = Query("SELECT k, v FROM ks.kv WHERE k = 2", QueryParameters(1)).encode()
        frames = b"".join(encode_frame(Opcode.QUERY, body, stream=i % 32768)
                          for i in range(count))
    else:
        frames = b"".join(encode_frame(Opcode.OPTIONS, b"", stream=i % 32768)
                          for i in range(count))
    reader, writer = await _deaf_connection(stack.sidecar.port)
    await eventually(lambda: len(_clients(stack.sidecar)) == 2)
    port = writer.get_extra_info("sockname")[1]
    deaf = next(c for c in _clients(stack.sidecar)
                if c._transport.get_extra_info("peername")[1] == port)

    def sample() -> dict[str, int]:
        transport = deaf._transport
        return {"pending": deaf.pending,
                "unsent": transport.get_write_buffer_size() if transport else 0}

    with _peaks(sample) as peak:
        writer.write(frames)
        # Stalled: answers fill the socket, the sidecar stops writing and reading (what
        # it has read but not dispatched waits in the connection's backlog).
        await eventually(lambda: deaf._write_paused and not deaf._reading and not deaf.pending)
        assert rows_of(await asyncio.wait_for(admin.send_query(READ), BOUND)) == ONE_ROW
    decoder = FrameDecoder()
    got = 0
    async with asyncio.timeout(30):
        while got < count:
            got += len(decoder.feed(await reader.read(1 << 20)))
    assert got == count
    writer.close()
    await admin.close()
    return peak, 9 + 1100 if what == "reads" else 9 + 110


@pytest.mark.parametrize("what", ["reads", "options"])
async def test_a_client_that_never_reads_gets_every_answer_later_and_others_are_served(
    loop_stack: Callable[..., Any], what: str,
) -> None:
    stack, admin = await _setup(loop_stack, max_client_requests=64,
                                max_client_buffer=64 * 1024)
    await _never_reads(stack, admin, what)


@pytest.mark.parametrize("what", ["reads", "options"])
async def test_a_client_that_never_reads_is_held_to_max_client_requests_and_buffer(
    loop_stack: Callable[..., Any], what: str,
) -> None:
    stack, admin = await _setup(loop_stack, max_client_requests=64,
                                max_client_buffer=64 * 1024)
    peak, answer = await _never_reads(stack, admin, what)
    assert peak["pending"] <= 64, peak
    # Requests already taken are answered: the buffer's bound plus their answers.
    assert peak["unsent"] <= 64 * 1024 + 64 * answer, peak


# -- 6. handshake, idle, connection cap ------------------------------------------------


async def _closed_after(port: int, payload: bytes) -> float:
    loop = asyncio.get_running_loop()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    started = loop.time()
    writer.write(payload)
    async with asyncio.timeout(BOUND):
        while await reader.read(65536):
            pass
    writer.close()
    return loop.time() - started


async def test_a_half_open_connection_is_closed_after_the_handshake_timeout(
    loop_stack: Callable[..., Any],
) -> None:
    stack: LoopStack = await loop_stack(handshake_timeout=0.2)
    took = await _closed_after(stack.sidecar.port, b"")
    assert 0.15 <= took < 2.0
    partial = encode_frame(Opcode.STARTUP, STARTUP, stream=0)[:5]  # half a header
    assert 0.15 <= await _closed_after(stack.sidecar.port, partial) < 2.0
    assert stack.sidecar.stats.timed_out == 2


async def test_logins_left_unfinished_are_closed_and_cost_no_upstream_connection(
    loop_stack: Callable[..., Any],
) -> None:
    stack: LoopStack = await loop_stack(emulator={"auth": True}, handshake_timeout=0.3)
    admin = await RawClient.connect("127.0.0.1", stack.sidecar.port,
                                    credentials=("cassandra", "cassandra"))
    upstream = stack.sidecar.upstream
    connections = dict(upstream.connections_by_node())
    emulator_connections = stack.emulator.connection_count
    strangers = []
    for _ in range(20):
        stranger = await RawClient.connect("127.0.0.1", stack.sidecar.port, startup=False)
        reply = await stranger.request(Opcode.STARTUP, STARTUP)
        assert reply.opcode == Opcode.AUTHENTICATE
        strangers.append(stranger)
    assert upstream.connections_by_node() == connections
    assert stack.emulator.connection_count == emulator_connections
    for stranger in strangers:
        await asyncio.wait_for(stranger.closed.wait(), BOUND)
    assert stack.sidecar.stats.timed_out == 20
    assert result_of(await admin.send_query("SELECT key FROM system.local"))
    await admin.close()


async def test_an_idle_client_is_closed_after_the_idle_timeout_and_a_busy_one_is_not(
    loop_stack: Callable[..., Any],
) -> None:
    stack, admin = await _setup(loop_stack, idle_timeout=0.3)
    idle = await RawClient.connect("127.0.0.1", stack.sidecar.port)
    await asyncio.wait_for(idle.closed.wait(), BOUND)
    hold = stack.emulator.hold_reads()
    busy = await RawClient.connect("127.0.0.1", stack.sidecar.port)
    waiting = busy.send_query(READ)  # pending past the idle timeout: not idle
    await eventually(lambda: len(hold) == 1)
    await asyncio.wait_for(admin.closed.wait(), BOUND)  # the admin went quiet meanwhile
    assert not busy.closed.is_set()
    hold.release()
    assert rows_of(await waiting) == ONE_ROW
    await busy.close()


async def _metric(port: int | None, name: str) -> str:
    assert port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    text = (await reader.read()).decode()
    writer.close()
    return "\n".join(line for line in text.splitlines() if line.startswith(name))


async def test_a_client_over_max_connections_gets_overloaded_at_startup_and_is_closed(
    loop_stack: Callable[..., Any],
) -> None:
    stack, admin = await _setup(loop_stack, max_connections=2)
    other = await RawClient.connect("127.0.0.1", stack.sidecar.port)
    extra = await RawClient.connect("127.0.0.1", stack.sidecar.port, startup=False)
    with pytest.raises(CqlError) as refused:
        result_of(await extra.request(Opcode.STARTUP, STARTUP))
    assert refused.value.code == ErrorCode.OVERLOADED
    await asyncio.wait_for(extra.closed.wait(), BOUND)
    metric = await _metric(stack.sidecar.metrics_port, "coalesce_sidecar_connections_closed")
    assert 'coalesce_sidecar_connections_closed_total{reason="limit"} 1.0' in metric, metric
    assert rows_of(await other.send_query(READ)) == ONE_ROW
    await other.close()
    await eventually(lambda: len(_clients(stack.sidecar)) == 1)
    welcome = await RawClient.connect("127.0.0.1", stack.sidecar.port)  # room again
    assert rows_of(await welcome.send_query(READ)) == ONE_ROW
    for client in (welcome, admin):
        await client.close()


async def test_a_client_over_max_connections_is_refused_on_its_first_frame_even_options(
    loop_stack: Callable[..., Any],
) -> None:
    stack, admin = await _setup(loop_stack, max_connections=1)
    extra = await RawClient.connect("127.0.0.1", stack.sidecar.port, startup=False)
    try:
        with pytest.raises(CqlError) as refused:
            result_of(await extra.request(Opcode.OPTIONS, b""))
        assert refused.value.code == ErrorCode.OVERLOADED
    finally:
        await extra.close()
        await admin.close()


# -- floods ------------------------------------------------------------------------------


async def test_a_flood_of_distinct_prepares_keeps_the_statement_cache_in_its_bounds(
    loop_stack: Callable[..., Any],
) -> None:
    stack, admin = await _setup(loop_stack, prepared_cache=50,
                                prepared_cache_bytes=64 * 1024)
    cache = stack.sidecar._require_proxy().statements
    hold = stack.emulator.hold_reads()
    victim = admin.send_query(READ)
    await eventually(lambda: len(hold) == 1)
    flooder = await RawClient.connect("127.0.0.1", stack.sidecar.port)
    padding = "x" * 4000
    with _peaks(lambda: {"count": len(cache), "bytes": cache.size}) as peak:
        for i in range(0, 500, 50):
            await asyncio.gather(*(flooder.prepare(
                f"SELECT v FROM ks.kv WHERE k = {j} AND v = '{padding}' ALLOW FILTERING")
                for j in range(i, i + 50)))
    assert peak["count"] <= 50
    assert peak["bytes"] <= 64 * 1024
    hold.release()
    assert rows_of(await asyncio.wait_for(victim, BOUND)) == ONE_ROW
    await flooder.close()
    await admin.close()


async def test_floods_of_use_register_and_options_cost_bounded_state_and_no_one_else(
    loop_stack: Callable[..., Any],
) -> None:
    stack, admin = await _setup(loop_stack)
    hold = stack.emulator.hold_reads()
    victim = admin.send_query(READ)
    await eventually(lambda: len(hold) == 1)
    flooder = await RawClient.connect("127.0.0.1", stack.sidecar.port)
    upstream = stack.sidecar.upstream
    proxy = stack.sidecar._require_proxy()
    register = Register(["SCHEMA_CHANGE", "STATUS_CHANGE"]).encode()
    with _peaks(lambda: {"pools": upstream.pool_count, "listeners": len(proxy.listeners),
                         "connections": sum(upstream.connections_by_node().values())}) as peak:
        frames = await asyncio.wait_for(asyncio.gather(
            *(flooder.send_query("USE ks") for _ in range(1000)),
            *(flooder.request(Opcode.REGISTER, register) for _ in range(1000)),
            *(flooder.request(Opcode.OPTIONS, b"") for _ in range(1000)),
        ), 30)
    assert all(f.opcode in (Opcode.RESULT, Opcode.READY, Opcode.SUPPORTED) for f in frames)
    assert peak["pools"] <= 2
    assert peak["listeners"] <= 1
    assert peak["connections"] <= 2 * stack.sidecar.config.connections_per_node
    hold.release()
    assert rows_of(await asyncio.wait_for(victim, BOUND)) == ONE_ROW
    await flooder.close()
    await admin.close()



async def test_answers_a_client_never_reads_stop_piling_up_past_four_times_its_buffer(
    loop_stack: Callable[..., Any],
) -> None:
    # Distinct reads of ~100 KB answers, all read before the first answer comes back:
    # the request bound cannot stop them, the answers are what piles up.
    stack, admin = await _setup(loop_stack, max_client_buffer=64 * 1024)
    await admin.query(f"INSERT INTO ks.kv (k, v) VALUES (2, '{'x' * 100_000}')")
    reader, writer = await _deaf_connection(stack.sidecar.port)
    await eventually(lambda: len(_clients(stack.sidecar)) == 2)
    port = writer.get_extra_info("sockname")[1]
    deaf = next(c for c in _clients(stack.sidecar)
                if c._transport.get_extra_info("peername")[1] == port)
    count = 100
    writer.write(b"".join(
        encode_frame(Opcode.QUERY, Query("SELECT v FROM ks.kv WHERE k = 2",  # distinct keys:
                                         QueryParameters(1, page_size=i + 1)).encode(),
                     stream=i + 1)
        for i in range(count)))
    with _peaks(lambda: {"unsent": deaf._transport.get_write_buffer_size()}) as peak:
        await eventually(lambda: not deaf.pending)
        assert rows_of(await asyncio.wait_for(admin.send_query(READ), BOUND)) == ONE_ROW
    assert peak["unsent"] <= 4 * 64 * 1024 + 2 * 100_100, peak
    decoder = FrameDecoder()
    frames: list[Any] = []
    async with asyncio.timeout(BOUND):
        while len(frames) < count:
            frames += decoder.feed(await reader.read(1 << 20))
    codes = [Error.decode(f.body).code for f in frames if f.opcode == Opcode.ERROR]
    assert codes and set(codes) == {ErrorCode.OVERLOADED}
    assert len(frames) == count
    writer.close()
    await admin.close()


async def test_a_client_stopping_in_the_middle_of_a_frame_is_closed_after_the_deadline(
    loop_stack: Callable[..., Any],
) -> None:
    stack, admin = await _setup(loop_stack, handshake_timeout=0.2)
    reader, writer = await _deaf_connection(stack.sidecar.port)
    frame = encode_frame(Opcode.QUERY, Query("SELECT * FROM ks.kv", QueryParameters(1)).encode()
                         + b"\x00" * 500_000, stream=1)
    writer.write(frame[:-1])  # all but its last byte
    await eventually(lambda: stack.sidecar._require_proxy().partial_bytes > 0)
    async with asyncio.timeout(BOUND):
        while await reader.read(65536):
            pass  # closed by the sidecar
    assert stack.sidecar._require_proxy().partial_bytes == 0
    assert rows_of(await asyncio.wait_for(admin.send_query(READ), BOUND)) == ONE_ROW
    writer.close()
    await admin.close()
