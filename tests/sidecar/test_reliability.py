"""The redesign's reliability promises, each pinned by a test that failed before it.

Stale reads after writes of statements the sidecar never saw prepared, one client's
request failing others', health during an upstream black hole, and authentication
that changes while the sidecar runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sys
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from cassandra.auth import PlainTextAuthProvider

from coalesce.cql import (
    CUSTOM_PAYLOAD,
    Batch,
    BatchStatement,
    Consistency,
    Error,
    ErrorCode,
    Execute,
    Opcode,
    Query,
    QueryParameters,
)
from coalesce.emulator import Emulator
from coalesce.sidecar import Sidecar

from .conftest import BOUND, LoopStack, ThreadStack, eventually, sidecar_config
from .cqlclient import CqlError, RawClient, result_of, rows_of

pytestmark = pytest.mark.timeout(60)

KEYSPACE = (
    "CREATE KEYSPACE ks WITH replication = {'class': 'SimpleStrategy', 'replication_factor': 1}"
)
READ = "SELECT k, v FROM ks.kv WHERE k = 1"
ONE_ROW = [[b"\x00\x00\x00\x01", b"one"]]
INT1 = b"\x00\x00\x00\x01"


async def _setup(loop_stack: Callable[..., Any], **config: Any) -> tuple[LoopStack, RawClient]:
    stack: LoopStack = await loop_stack(**config)
    admin = await RawClient.connect("127.0.0.1", stack.sidecar.port)
    await admin.query(KEYSPACE)
    await admin.query("CREATE TABLE ks.kv (k int PRIMARY KEY, v text)")
    await admin.query("INSERT INTO ks.kv (k, v) VALUES (1, 'one')")
    return stack, admin


# -- 1. no write goes unnoticed: unknown prepared ids are answered UNPREPARED -------------


async def test_an_id_prepared_directly_on_scylla_is_answered_unprepared_never_sent(
    loop_stack: Callable[..., Any],
) -> None:
    stack, admin = await _setup(loop_stack)
    direct = await RawClient.connect(stack.emulator.host, stack.emulator.port)
    write = await direct.prepare("INSERT INTO ks.kv (k, v) VALUES (?, ?)")
    await direct.close()
    inserts = stack.emulator.statements["insert"]

    with pytest.raises(CqlError) as execute:
        result_of(await admin.send_execute(write.query_id, [INT1, b"two"]))
    assert execute.value.code == ErrorCode.UNPREPARED
    batch = Batch(0, [BatchStatement(True, write.query_id, [INT1, b"two"])], Consistency.ONE)
    with pytest.raises(CqlError) as batched:
        result_of(await admin.request(Opcode.BATCH, batch.encode()))
    assert batched.value.code == ErrorCode.UNPREPARED
    assert stack.emulator.statements["insert"] == inserts  # nothing reached Scylla
    assert rows_of(await admin.send_query(READ)) == ONE_ROW
    await admin.close()


def test_a_write_of_an_evicted_prepared_id_lands_and_later_reads_see_it_past_a_held_read(
    thread_stack: Callable[..., ThreadStack],
) -> None:
    stack = thread_stack(prepared_cache=2)
    session = stack.cluster().connect()
    session.execute(KEYSPACE)
    session.execute("CREATE TABLE ks.kv (k int PRIMARY KEY, v text)")
    session.execute("INSERT INTO ks.kv (k, v) VALUES (1, 'one')")
    read = session.prepare("SELECT v FROM ks.kv WHERE k = ?")
    write = session.prepare("INSERT INTO ks.kv (k, v) VALUES (?, ?)")

    emu = stack.emulator
    hold = emu.call(emu.emulator.hold_reads)
    older = session.execute_async(read, (1,))
    emu.run(eventually(lambda: len(hold) == 1))  # the older read executed, answer held
    emu.call(hold.close)

    async def flood() -> None:  # two other PREPAREs evict both statements
        client = await RawClient.connect("127.0.0.1", stack.sidecar.port)
        await client.prepare("SELECT v FROM ks.kv WHERE k = 2")
        await client.prepare("SELECT v FROM ks.kv WHERE k = 3")
        await client.close()

    stack.sidecar.run(flood())
    cache = stack.sidecar.sidecar._require_proxy().statements
    assert stack.sidecar.call(lambda: write.query_id not in cache.by_id)

    session.execute(write, (1, "two"))  # UNPREPARED, re-prepared by the driver, applied
    assert session.execute(read, (1,)).one().v == "two"
    emu.call(hold.release)
    assert older.result().one().v == "one"


async def test_an_id_prepared_before_a_sidecar_restart_is_answered_unprepared_by_the_new_one(
    loop_stack: Callable[..., Any],
) -> None:
    stack, admin = await _setup(loop_stack)
    write = await admin.prepare("INSERT INTO ks.kv (k, v) VALUES (?, ?)")
    await admin.close()
    config = sidecar_config((stack.emulator.host, stack.emulator.port))
    async with Sidecar(config) as restarted:
        client = await RawClient.connect("127.0.0.1", restarted.port)
        inserts = stack.emulator.statements["insert"]
        with pytest.raises(CqlError) as unknown:
            result_of(await client.send_execute(write.query_id, [INT1, b"two"]))
        assert unknown.value.code == ErrorCode.UNPREPARED
        assert stack.emulator.statements["insert"] == inserts
        again = await client.prepare("INSERT INTO ks.kv (k, v) VALUES (?, ?)")
        assert again.query_id == write.query_id
        result_of(await client.send_execute(write.query_id, [INT1, b"two"]))
        assert rows_of(await client.send_query("SELECT v FROM ks.kv WHERE k = 1")) == [[b"two"]]
        await client.close()


async def test_a_statement_evicted_by_the_byte_bound_is_answered_unprepared_then_works(
    loop_stack: Callable[..., Any],
) -> None:
    stack, admin = await _setup(loop_stack, prepared_cache_bytes=64 * 1024)
    write = await admin.prepare("INSERT INTO ks.kv (k, v) VALUES (?, ?)")
    padding = "x" * 40_000
    for i in range(2):
        await admin.prepare(f"SELECT v FROM ks.kv WHERE k = {i} AND v = '{padding}' "
                            "ALLOW FILTERING")
    cache = stack.sidecar._require_proxy().statements
    assert write.query_id not in cache.by_id and cache.size <= 64 * 1024
    with pytest.raises(CqlError) as evicted:
        result_of(await admin.send_execute(write.query_id, [INT1, b"two"]))
    assert evicted.value.code == ErrorCode.UNPREPARED
    await admin.prepare("INSERT INTO ks.kv (k, v) VALUES (?, ?)")
    result_of(await admin.send_execute(write.query_id, [INT1, b"two"]))
    assert rows_of(await admin.send_query("SELECT v FROM ks.kv WHERE k = 1")) == [[b"two"]]
    await admin.close()


async def test_a_prepare_flood_evicts_idle_statements_not_those_in_use(
    loop_stack: Callable[..., Any],
) -> None:
    _, admin = await _setup(loop_stack, prepared_cache=2)
    used = await admin.prepare("SELECT v FROM ks.kv WHERE k = ?")
    idle = await admin.prepare("INSERT INTO ks.kv (k, v) VALUES (?, ?)")
    result_of(await admin.send_execute(used.query_id, [INT1]))  # in use: kept
    await admin.prepare("SELECT k FROM ks.kv WHERE k = ?")  # one more than fits
    assert rows_of(await admin.send_execute(used.query_id, [INT1])) == [[b"one"]]
    with pytest.raises(CqlError) as evicted:
        result_of(await admin.send_execute(idle.query_id, [INT1, b"x"]))
    assert evicted.value.code == ErrorCode.UNPREPARED
    await admin.close()


# -- 5. one request never fails another client's ------------------------------------------


def _malformed_bodies(query_id: bytes) -> dict[str, tuple[int, bytes]]:
    good_execute = Execute(query_id, QueryParameters(Consistency.ONE, [INT1])).encode()
    good_batch = Batch(
        0, [BatchStatement(False, "INSERT INTO ks.kv (k, v) VALUES (9, 'x')")], Consistency.ONE
    ).encode()
    return {
        "query with trailing bytes": (
            Opcode.QUERY,
            b"\x00\x00\x00\x0bSELECT 1 \x00\x01\x00junk",
        ),
        "query with a value past the end": (
            Opcode.QUERY,
            b"\x00\x00\x00\x20SELECT v FROM ks.kv WHERE k = ?\x00\x01\x01\x00\x01\x00\x00\x10\x00",
        ),
        "execute truncated": (Opcode.EXECUTE, good_execute[:-2]),
        # <short bytes id> <consistency>: the query flags byte follows
        "execute with unknown flags": (Opcode.EXECUTE, good_execute[:20] + b"\xff" +
                                       good_execute[21:]),
        "batch truncated": (Opcode.BATCH, good_batch[:-2]),
        "batch of unknown kind": (Opcode.BATCH, b"\x00\x00\x01\x07" + good_batch[4:]),
        # Found by differential fuzzing of Request.check against the emulator's decoder.
        "query with a value name not in utf-8": (
            Opcode.QUERY,
            b"\x00\x00\x00\x1fSELECT v FROM ks.kv WHERE k = ?\x00\x01\x41\x00\x01"
            b"\x00\x01\x9a\x00\x00\x00\x04\x00\x00\x00\x01",
        ),
        # flags=CUSTOM_PAYLOAD: a [bytes map] whose one key is b"\x95".
        "custom payload key not in utf-8": (
            Opcode.QUERY,
            b"\x00\x01\x00\x01\x95\x00\x00\x00\x01y"
            + Query(READ, QueryParameters(Consistency.ONE)).encode(),
        ),
    }


async def _forty_in_flight(
    stack: LoopStack,
) -> tuple[list[RawClient], list[asyncio.Future[Any]], Any]:
    clients = [await RawClient.connect("127.0.0.1", stack.sidecar.port) for _ in range(40)]
    hold = stack.emulator.hold_reads()
    # Forty distinct reads (a LIMIT each), so forty flights share the pooled connections.
    futures = [c.send_query(f"SELECT k, v FROM ks.kv WHERE k = 1 LIMIT {i + 1}")
               for i, c in enumerate(clients)]
    await eventually(lambda: len(hold) == 40)
    return clients, futures, hold


@pytest.mark.parametrize("case", sorted(_malformed_bodies(b"\x00" * 16)))
async def test_a_malformed_body_fails_only_its_sender_while_forty_reads_are_in_flight(
    loop_stack: Callable[..., Any], case: str,
) -> None:
    stack, admin = await _setup(loop_stack, connections_per_node=1)
    known = await admin.prepare("SELECT v FROM ks.kv WHERE k = ?")
    clients, futures, hold = await _forty_in_flight(stack)
    opcode, body = _malformed_bodies(known.query_id)[case]
    bad = await RawClient.connect("127.0.0.1", stack.sidecar.port)
    flags = CUSTOM_PAYLOAD if case.startswith("custom payload") else 0
    reply = await asyncio.wait_for(bad.request(opcode, body, flags=flags), BOUND)
    assert reply.opcode == Opcode.ERROR
    hold.release()
    for frame in await asyncio.wait_for(asyncio.gather(*futures), BOUND):
        assert rows_of(frame) == ONE_ROW
    for client in [*clients, bad, admin]:
        await client.close()


async def test_an_alias_named_like_a_rewritten_column_fails_no_other_read(
    loop_stack: Callable[..., Any],
) -> None:
    stack, admin = await _setup(loop_stack, connections_per_node=1)
    clients, futures, hold = await _forty_in_flight(stack)
    odd = await RawClient.connect("127.0.0.1", stack.sidecar.port)
    for text in ("SELECT host_id AS tokens FROM system.local",
                 "SELECT release_version AS rpc_address FROM system.local",
                 "SELECT key AS peer FROM system.peers"):
        reply = await asyncio.wait_for(odd.send_query(text), BOUND)
        assert reply.opcode in (Opcode.RESULT, Opcode.ERROR)
    hold.release()
    for frame in await asyncio.wait_for(asyncio.gather(*futures), BOUND):
        assert rows_of(frame) == ONE_ROW
    assert not odd.closed.is_set()
    assert rows_of(await odd.send_query(READ)) == ONE_ROW
    for client in [*clients, odd, admin]:
        await client.close()


# -- 7. /healthz during a black hole ---------------------------------------------------


async def _http_get(port: int, path: str) -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    data = await reader.read()
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), body


@contextlib.asynccontextmanager
async def _emulator_process() -> AsyncIterator[tuple[asyncio.subprocess.Process, int]]:
    """`coalesce emulator` in a process of its own on a free port, stopped on the way out."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "coalesce", "emulator", "--listen", "127.0.0.1:0",
        "--read-latency", "0",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        assert proc.stdout is not None
        port = 0
        async with asyncio.timeout(BOUND):
            while not port:
                line = (await proc.stdout.readline()).decode()
                assert line, "the emulator exited before listening"
                found = re.search(r"listening on [\d.]+:(\d+)", line)
                port = int(found.group(1)) if found else 0
        yield proc, port
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGCONT)
            proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), BOUND)
        except TimeoutError:
            proc.kill()
            await proc.wait()


async def _status(port: int | None) -> int:
    assert port is not None
    return (await _http_get(port, "/healthz"))[0]


async def _until_status(port: int | None, wanted: int) -> None:
    async with asyncio.timeout(BOUND):
        while await _status(port) != wanted:  # noqa: ASYNC110 -- polls the endpoint itself
            await asyncio.sleep(0.02)


async def _black_hole(check: str, **config: Any) -> None:
    async with _emulator_process() as (proc, port):
        settings = {"heartbeat_interval": 0.2, "heartbeat_timeout": 0.2,
                    "connect_timeout": 0.3, **config}
        async with Sidecar(sidecar_config(("127.0.0.1", port), **settings)) as sidecar:
            client = await RawClient.connect("127.0.0.1", sidecar.port)
            await client.query("SELECT key FROM system.local")  # a pooled connection is used
            assert await _status(sidecar.metrics_port) == 200

            os.kill(proc.pid, signal.SIGSTOP)
            loop = asyncio.get_running_loop()
            frozen = loop.time()
            await _until_status(sidecar.metrics_port, 503)
            took = loop.time() - frozen
            if check == "prompt":
                # interval + timeout = 0.4 s, with slack; request_timeout is 3 s.
                assert took < 1.5, f"healthz took {took:.2f}s to notice the black hole"
            if check == "steady":
                # Sampled while still frozen: the node answers nothing, so it is not healthy.
                seen = []
                for _ in range(50):
                    seen.append(await _status(sidecar.metrics_port))
                    await asyncio.sleep(0.02)
                assert seen.count(200) == 0, f"healthy in {seen.count(200)} of 50 samples"

            os.kill(proc.pid, signal.SIGCONT)
            await _until_status(sidecar.metrics_port, 200)
            assert result_of(await client.send_query("SELECT key FROM system.local"))
            await client.close()


async def test_healthz_turns_unhealthy_within_a_heartbeat_of_a_frozen_upstream() -> None:
    await _black_hole("prompt", request_timeout=3.0)


async def test_healthz_stays_unhealthy_while_the_upstream_stays_frozen() -> None:
    await _black_hole("steady", request_timeout=0.3)


async def test_healthz_recovers_once_a_frozen_upstream_thaws() -> None:
    await _black_hole("recover", request_timeout=0.3)


# -- 8. authentication switched on behind the sidecar ------------------------------------


async def _restart_with_auth(emu: Emulator) -> Emulator:
    port = emu.port
    await emu.aclose()
    secured = Emulator(port=port, auth=True, read_latency=0.0, per_row=0.0)
    await secured.start()
    return secured


@pytest.mark.parametrize("idle", [
    False,
    True,
], ids=["clients-connected", "sidecar-idle"])
async def test_clients_get_authenticate_after_the_upstream_restarts_with_auth(
    idle: bool,
) -> None:
    emu = Emulator(read_latency=0.0, per_row=0.0)
    await emu.start()
    config = sidecar_config((emu.host, emu.port), pool_idle_timeout=0.05,
                            heartbeat_interval=0.1, heartbeat_timeout=0.2)
    try:
        async with Sidecar(config) as sidecar:
            first = await RawClient.connect("127.0.0.1", sidecar.port)
            await first.query("SELECT key FROM system.local")
            if idle:
                await first.close()
                await eventually(lambda: sidecar.upstream.pool_count == 0)
            emu = await _restart_with_auth(emu)
            if not idle:
                await eventually(lambda: sidecar.upstream.auth_required)

            stranger = await RawClient.connect("127.0.0.1", sidecar.port, startup=False)
            reply = await stranger.request(Opcode.STARTUP, b"\x00\x01\x00\x0bCQL_VERSION"
                                                           b"\x00\x053.0.0")
            assert reply.opcode == Opcode.AUTHENTICATE, Error.decode(reply.body) if \
                reply.opcode == Opcode.ERROR else reply
            await stranger.close()
            user = await RawClient.connect("127.0.0.1", sidecar.port,
                                           credentials=("cassandra", "cassandra"))
            assert result_of(await user.send_query("SELECT key FROM system.local"))
            await user.close()
            if not idle:
                await first.close()
    finally:
        await emu.aclose()


def test_the_driver_logs_in_after_the_upstream_restarts_with_auth(
    thread_stack: Callable[..., ThreadStack],
) -> None:
    stack = thread_stack()
    plain = stack.cluster()
    plain.connect().execute("SELECT key FROM system.local")
    plain.shutdown()
    emu = stack.emulator
    port = emu.port
    emu.close()
    from coalesce.emulator import EmulatorThread

    secured = EmulatorThread(port=port, auth=True, read_latency=0.0, per_row=0.0)
    secured.start()
    stack.emulator = secured
    stack.sidecar.eventually(lambda: stack.sidecar.sidecar.upstream.auth_required)
    cluster = stack.cluster(auth_provider=PlainTextAuthProvider("cassandra", "cassandra"))
    assert cluster.connect().execute("SELECT key FROM system.local").one().key == "local"
