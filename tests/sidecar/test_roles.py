"""Answers are shared only inside one authenticated role; Scylla still checks every permission."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
from cassandra import AuthenticationFailed, Unauthorized
from cassandra.auth import PlainTextAuthProvider
from cassandra.cluster import NoHostAvailable

from coalesce.cql import ErrorCode, Opcode, Query, QueryParameters

from .conftest import LoopStack, ThreadStack
from .cqlclient import CqlError, RawClient, result_of, rows_of

pytestmark = pytest.mark.timeout(60)

READ = "SELECT k, v FROM ks.kv WHERE k = 1"
SETUP = [
    "CREATE KEYSPACE ks WITH replication = {'class': 'SimpleStrategy', 'replication_factor': 1}",
    "CREATE TABLE ks.kv (k int PRIMARY KEY, v text)",
    "INSERT INTO ks.kv (k, v) VALUES (1, 'one')",
    "CREATE ROLE alice WITH PASSWORD = 'alice-pw' AND LOGIN = true",
    "CREATE ROLE bob WITH PASSWORD = 'bob-pw' AND LOGIN = true",
    "CREATE ROLE mallory WITH PASSWORD = 'mallory-pw' AND LOGIN = true",
    "GRANT SELECT ON KEYSPACE ks TO alice",
    "GRANT SELECT ON KEYSPACE ks TO bob",
]


def test_a_role_without_select_joining_a_permitted_herd_gets_unauthorized_not_rows(
    thread_stack: Callable[..., ThreadStack],
) -> None:
    stack = thread_stack(emulator={"auth": True, "read_latency": 0.5, "write_latency": 0.0})
    admin = stack.cluster(auth_provider=PlainTextAuthProvider("cassandra", "cassandra"))
    admin_session = admin.connect()
    for statement in SETUP:
        admin_session.execute(statement)
    alice = stack.cluster(auth_provider=PlainTextAuthProvider("alice", "alice-pw")).connect()
    mallory = stack.cluster(auth_provider=PlainTextAuthProvider("mallory", "mallory-pw"))
    mallory_session = mallory.connect()

    herd = [alice.execute_async(READ) for _ in range(20)]
    group = stack.sidecar.sidecar.flights
    stack.sidecar.eventually(lambda: group.running)  # alice's read is in flight upstream
    with pytest.raises(Unauthorized):
        mallory_session.execute(READ)
    assert all([(r.k, r.v) for r in f.result()] == [(1, "one")] for f in herd)


def test_wrong_credentials_are_refused_by_scylla_through_the_sidecar(
    thread_stack: Callable[..., ThreadStack],
) -> None:
    stack = thread_stack(emulator={"auth": True})
    cluster = stack.cluster(auth_provider=PlainTextAuthProvider("cassandra", "wrong"))
    with pytest.raises(NoHostAvailable) as refused:
        cluster.connect()
    assert any(isinstance(e, AuthenticationFailed) for e in refused.value.errors.values())


async def _auth_stack(loop_stack: Callable[..., Any]) -> LoopStack:
    stack: LoopStack = await loop_stack(
        emulator={"auth": True, "read_latency": 0.3, "write_latency": 0.0}
    )
    admin = await RawClient.connect("127.0.0.1", stack.sidecar.port,
                                    credentials=("cassandra", "cassandra"))
    for statement in SETUP:
        await admin.query(statement)
    await admin.close()
    return stack


async def test_two_permitted_roles_each_get_their_own_flight(
    loop_stack: Callable[..., Any],
) -> None:
    stack = await _auth_stack(loop_stack)
    alice = await RawClient.connect("127.0.0.1", stack.sidecar.port,
                                    credentials=("alice", "alice-pw"))
    bob = await RawClient.connect("127.0.0.1", stack.sidecar.port, credentials=("bob", "bob-pw"))
    before = stack.emulator.statements["select"]
    frames = await asyncio.gather(*(c.send_query(READ) for c in (alice, bob, alice, bob)))
    assert all(rows_of(f) == [[b"\x00\x00\x00\x01", b"one"]] for f in frames)
    assert stack.emulator.statements["select"] - before == 2
    await alice.close()
    await bob.close()


async def test_a_client_that_has_not_logged_in_gets_nothing_but_the_login(
    loop_stack: Callable[..., Any],
) -> None:
    stack = await _auth_stack(loop_stack)
    alice = await RawClient.connect("127.0.0.1", stack.sidecar.port,
                                    credentials=("alice", "alice-pw"))
    herd = alice.send_query(READ)
    stranger = await RawClient.connect("127.0.0.1", stack.sidecar.port, startup=False)
    reply = await stranger.request(Opcode.STARTUP, b"\x00\x00")
    assert reply.opcode == Opcode.AUTHENTICATE
    body = Query(READ, QueryParameters(1)).encode()
    for opcode in (Opcode.QUERY, Opcode.PREPARE, Opcode.REGISTER):
        with pytest.raises(CqlError) as refused:
            result_of(await stranger.request(opcode, body))
        assert refused.value.code == ErrorCode.PROTOCOL_ERROR
    assert rows_of(await herd) == [[b"\x00\x00\x00\x01", b"one"]]
    await stranger.close()
    await alice.close()
