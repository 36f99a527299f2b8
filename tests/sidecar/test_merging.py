"""Identical concurrent reads reach Scylla once; everything else passes through alone."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from coalesce.cql import TRACING, Consistency, ErrorCode, Opcode, Query, QueryParameters

from .conftest import LoopStack, ThreadStack, eventually
from .cqlclient import CqlError, RawClient, result_of, rows_of

pytestmark = pytest.mark.timeout(60)

KEYSPACE = (
    "CREATE KEYSPACE ks WITH replication = {'class': 'SimpleStrategy', 'replication_factor': 1}"
)
READ = "SELECT k, v FROM ks.kv WHERE k = 1"
HERD_LATENCY = 0.5  # an in-flight window long enough for every request of a herd to land


def _schema(session: Any) -> None:
    session.execute(KEYSPACE)
    session.execute("CREATE TABLE ks.kv (k int PRIMARY KEY, v text)")
    session.execute("INSERT INTO ks.kv (k, v) VALUES (1, 'one')")


def _herd_stack(thread_stack: Callable[..., ThreadStack]) -> tuple[ThreadStack, list[Any]]:
    stack = thread_stack(emulator={"read_latency": HERD_LATENCY, "write_latency": 0.0})
    cluster = stack.cluster()
    _schema(cluster.connect())
    # One Cluster, 50 sessions: each session opens its own connection to the sidecar.
    sessions = [cluster.connect() for _ in range(50)]
    return stack, sessions


def test_thousand_identical_queries_from_fifty_connections_reach_scylla_once_per_window(
    thread_stack: Callable[..., ThreadStack],
) -> None:
    stack, sessions = _herd_stack(thread_stack)
    group_stats = stack.sidecar.sidecar.flights.stats
    assert group_stats is not None
    reads_before = stack.emulator.statements["select"]
    joined_before = stack.sidecar.call(lambda: group_stats.joined)

    futures = [s.execute_async(READ) for s in sessions for _ in range(20)]
    results = [f.result() for f in futures]

    assert all([(r.k, r.v) for r in rows] == [(1, "one")] for rows in results)
    reads = stack.emulator.statements["select"] - reads_before
    assert 1 <= reads <= 3  # 1,000 requests landed in one (rarely two or three) windows
    # Everyone else joined a flight (the drivers' own schema reads may join some too).
    assert stack.sidecar.call(lambda: group_stats.joined) - joined_before >= 1000 - reads


def test_thousand_identical_executes_from_fifty_connections_reach_scylla_once_per_window(
    thread_stack: Callable[..., ThreadStack],
) -> None:
    stack, sessions = _herd_stack(thread_stack)
    prepared = [s.prepare("SELECT k, v FROM ks.kv WHERE k = ?") for s in sessions]
    reads_before = stack.emulator.statements["select"]

    futures = [s.execute_async(p, (1,)) for s, p in zip(sessions, prepared, strict=True)
               for _ in range(20)]
    results = [f.result() for f in futures]

    assert all([(r.k, r.v) for r in rows] == [(1, "one")] for rows in results)
    assert 1 <= stack.emulator.statements["select"] - reads_before <= 3


def test_the_sidecar_runs_on_uvloop(thread_stack: Callable[..., ThreadStack]) -> None:
    stack = thread_stack(uvloop=True, emulator={"read_latency": 0.3, "write_latency": 0.0})
    cluster = stack.cluster()
    _schema(cluster.connect())
    sessions = [cluster.connect() for _ in range(5)]
    reads_before = stack.emulator.statements["select"]
    futures = [s.execute_async(READ) for s in sessions for _ in range(20)]
    assert all([(r.k, r.v) for r in f.result()] == [(1, "one")] for f in futures)
    assert stack.emulator.statements["select"] - reads_before <= 3


async def _loop_setup(
    loop_stack: Callable[..., Any], latency: float = HERD_LATENCY, **config: Any
) -> tuple[LoopStack, Any]:
    stack: LoopStack = await loop_stack(
        emulator={"read_latency": latency, "write_latency": 0.0}, **config
    )
    admin = await RawClient.connect("127.0.0.1", stack.sidecar.port)
    await admin.query(KEYSPACE)
    await admin.query("CREATE TABLE ks.kv (k int PRIMARY KEY, v text)")
    await admin.query("INSERT INTO ks.kv (k, v) VALUES (1, 'one')")
    return stack, admin


async def test_reads_differing_only_in_client_timestamp_share_one_flight(
    loop_stack: Callable[..., Any],
) -> None:
    stack, admin = await _loop_setup(loop_stack)
    other = await RawClient.connect("127.0.0.1", stack.sidecar.port)
    before = stack.emulator.statements["select"]
    first = admin.send_query(READ, timestamp=1_700_000_000_000_001)
    second = other.send_query(READ, timestamp=1_700_000_000_999_999)
    third = other.send_query(READ, timestamp=None)
    frames = await asyncio.gather(first, second, third)
    assert all(rows_of(f) == [[b"\x00\x00\x00\x01", b"one"]] for f in frames)
    assert stack.emulator.statements["select"] - before == 1
    await admin.close()
    await other.close()


async def test_answers_go_back_under_each_clients_own_stream_id(
    loop_stack: Callable[..., Any],
) -> None:
    _, admin = await _loop_setup(loop_stack)
    body = Query(READ, QueryParameters(1)).encode()
    waiters = [admin.expect(stream) for stream in (7, 300, 32000)]
    for stream in (7, 300, 32000):
        admin.send(Opcode.QUERY, body, stream=stream)
    frames = await asyncio.gather(*waiters)
    assert [f.stream for f in frames] == [7, 300, 32000]
    assert all(rows_of(f) == [[b"\x00\x00\x00\x01", b"one"]] for f in frames)
    await admin.close()


async def test_lz4_and_plain_clients_share_a_flight_and_both_read_it(
    loop_stack: Callable[..., Any],
) -> None:
    stack, admin = await _loop_setup(loop_stack)
    lz4_clients = [await RawClient.connect("127.0.0.1", stack.sidecar.port, lz4=True)
                   for _ in range(3)]
    before = stack.emulator.statements["select"]
    waiters = [admin.send_query(READ)] + [c.send_query(READ) for c in lz4_clients]
    frames = await asyncio.gather(*waiters)
    assert all(rows_of(f) == [[b"\x00\x00\x00\x01", b"one"]] for f in frames)
    assert stack.emulator.statements["select"] - before == 1
    for client in [admin, *lz4_clients]:
        await client.close()


async def test_different_consistency_or_page_size_means_different_flights(
    loop_stack: Callable[..., Any],
) -> None:
    stack, admin = await _loop_setup(loop_stack, latency=0.05)
    before = stack.emulator.statements["select"]
    bodies = [
        Query(READ, QueryParameters(1)).encode(),
        Query(READ, QueryParameters(4)).encode(),  # QUORUM
        Query(READ, QueryParameters(1, page_size=10)).encode(),
    ]
    frames = await asyncio.gather(*(admin.request(Opcode.QUERY, b) for b in bodies))
    assert all(rows_of(f) == [[b"\x00\x00\x00\x01", b"one"]] for f in frames)
    assert stack.emulator.statements["select"] - before == 3
    await admin.close()


async def test_serial_reads_are_never_merged(loop_stack: Callable[..., Any]) -> None:
    stack, admin = await _loop_setup(loop_stack, latency=0.05)
    before = stack.emulator.statements["select"]
    body = Query(READ, QueryParameters(Consistency.SERIAL)).encode()
    frames = await asyncio.gather(*(admin.request(Opcode.QUERY, body) for _ in range(3)))
    assert all(rows_of(f) == [[b"\x00\x00\x00\x01", b"one"]] for f in frames)
    assert stack.emulator.statements["select"] - before == 3
    await admin.close()


async def test_writes_and_traced_reads_are_never_merged(
    loop_stack: Callable[..., Any],
) -> None:
    stack, admin = await _loop_setup(loop_stack, latency=0.05)
    inserts_before = stack.emulator.statements["insert"]
    write = "INSERT INTO ks.kv (k, v) VALUES (2, 'two')"
    await asyncio.gather(*(admin.send_query(write) for _ in range(5)))
    assert stack.emulator.statements["insert"] - inserts_before == 5

    reads_before = stack.emulator.statements["select"]
    body = Query(READ, QueryParameters(1)).encode()
    frames = await asyncio.gather(
        *(admin.request(Opcode.QUERY, body, flags=TRACING) for _ in range(3))
    )
    assert all(f.opcode == Opcode.RESULT for f in frames)
    assert stack.emulator.statements["select"] - reads_before == 3
    await admin.close()


async def test_volatile_selects_are_forwarded_one_by_one(
    loop_stack: Callable[..., Any],
) -> None:
    stack, admin = await _loop_setup(loop_stack, latency=0.05)
    await admin.query("CREATE TABLE ks.events (k int, t timeuuid, v text, PRIMARY KEY (k, t))")
    await admin.query("INSERT INTO ks.events (k, t, v) VALUES (1, now(), 'x')")
    before = stack.emulator.statements["select"]
    text = "SELECT v FROM ks.events WHERE k = 1 AND t < now()"
    frames = await asyncio.gather(*(admin.send_query(text) for _ in range(3)))
    assert all(f.opcode == Opcode.RESULT for f in frames)
    assert stack.emulator.statements["select"] - before == 3
    await admin.close()


async def test_max_waiters_sheds_extra_callers_with_overloaded(
    loop_stack: Callable[..., Any],
) -> None:
    _, admin = await _loop_setup(loop_stack, max_waiters=2)
    frames = await asyncio.gather(*(admin.send_query(READ) for _ in range(5)))
    outcomes: list[object] = []
    for frame in frames:
        try:
            result_of(frame)
            outcomes.append("rows")
        except CqlError as exc:
            outcomes.append(exc.code)
    assert outcomes.count("rows") == 2
    assert outcomes.count(ErrorCode.OVERLOADED) == 3
    await admin.close()


async def test_shedding_is_logged_once_when_it_starts_and_once_when_it_stops(
    loop_stack: Callable[..., Any], caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from coalesce.sidecar import flights

    monkeypatch.setattr(flights, "_SHED_QUIET", 0.05)
    _, admin = await _loop_setup(loop_stack, max_waiters=1)
    with caplog.at_level("WARNING", logger="coalesce.sidecar.flights"):
        await asyncio.gather(*(admin.send_query(READ) for _ in range(6)))
        await eventually(lambda: any("stopped" in r.getMessage() for r in caplog.records))
    messages = [r.getMessage() for r in caplog.records]
    assert sum("shedding load" in m for m in messages) == 1
    assert messages[-1] == "shedding stopped after 5 refused requests"
    await admin.close()
