"""Isolation between clients: keyspaces, roles and statements never leak across them."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from coalesce.cql import (
    CUSTOM_PAYLOAD,
    TRACING,
    Consistency,
    ErrorCode,
    Execute,
    Opcode,
    Prepare,
    Query,
    QueryParameters,
)

from .conftest import BOUND, LoopStack, eventually
from .cqlclient import CqlError, RawClient, result_of, rows_of

pytestmark = pytest.mark.timeout(60)

INT1 = b"\x00\x00\x00\x01"
UNQUALIFIED = "SELECT v FROM kv WHERE k = 1"


def _replication(name: str) -> str:
    return (f"CREATE KEYSPACE {name} WITH replication = "
            "{'class': 'SimpleStrategy', 'replication_factor': 1}")


async def _two_keyspaces(loop_stack: Callable[..., Any], **config: Any) -> LoopStack:
    stack: LoopStack = await loop_stack(connections_per_node=1, **config)
    admin = await RawClient.connect("127.0.0.1", stack.sidecar.port)
    for ks in ("ks1", "ks2"):
        await admin.query(_replication(ks))
        await admin.query(f"CREATE TABLE {ks}.kv (k int PRIMARY KEY, v text)")
        await admin.query(f"INSERT INTO {ks}.kv (k, v) VALUES (1, '{ks}')")
    await admin.close()
    return stack


async def _use_ks2(client: RawClient, form: str) -> None:
    if form == "prepared":
        prepared = await client.prepare("USE ks2")
        reply = await client.request(
            Opcode.EXECUTE, Execute(prepared.query_id, QueryParameters(Consistency.ONE)).encode()
        )
    elif form == "tracing":
        body = Query("USE ks2", QueryParameters(Consistency.ONE)).encode()
        reply = await client.request(Opcode.QUERY, body, flags=TRACING)
    elif form == "custom payload":
        payload = b"\x00\x01\x00\x01x\x00\x00\x00\x01y"  # {"x": b"y"}
        body = payload + Query("USE ks2", QueryParameters(Consistency.ONE)).encode()
        reply = await client.request(Opcode.QUERY, body, flags=CUSTOM_PAYLOAD)
    else:
        reply = await client.send_query(form)
    assert reply.opcode == Opcode.RESULT, reply


# -- 2. another keyspace's rows -----------------------------------------------------------


@pytest.mark.parametrize("form", [
    "prepared", "tracing", "custom payload", "/* hint */ use KS2;", '-- c\nUSE "ks2"',
])
async def test_a_use_in_any_form_moves_only_its_own_client_to_the_other_keyspace(
    loop_stack: Callable[..., Any], form: str,
) -> None:
    stack = await _two_keyspaces(loop_stack)
    stayer = await RawClient.connect("127.0.0.1", stack.sidecar.port)
    mover = await RawClient.connect("127.0.0.1", stack.sidecar.port)
    await stayer.query("USE ks1")
    await mover.query("USE ks1")
    await _use_ks2(mover, form)
    frames = await asyncio.wait_for(asyncio.gather(
        *(c.send_query(UNQUALIFIED, timestamp=i) for i in range(20) for c in (stayer, mover))
    ), BOUND)
    stayed, moved = frames[0::2], frames[1::2]
    assert [rows_of(f) for f in stayed] == [[[b"ks1"]]] * 20
    assert [rows_of(f) for f in moved] == [[[b"ks2"]]] * 20
    await stayer.close()
    await mover.close()


async def test_a_prepare_answered_after_its_client_switched_keyspace_keeps_writes_fresh(
    loop_stack: Callable[..., Any],
) -> None:
    """The keyspace a PREPARE resolves names in is the one it was sent with.

    A client may pipeline PREPARE and USE; the USE of a keyspace whose pool is open is
    answered before Scylla answers the PREPARE. The statement it learns is shared by
    every client, so a wrong keyspace in it makes honest writes forget the wrong
    table's reads.
    """
    stack = await _two_keyspaces(loop_stack)
    text = "INSERT INTO kv (k, v) VALUES (?, ?)"
    keeper = await RawClient.connect("127.0.0.1", stack.sidecar.port)
    await keeper.query("USE ks2")  # the ks2 pool stays open
    writer = await RawClient.connect("127.0.0.1", stack.sidecar.port)
    reader = await RawClient.connect("127.0.0.1", stack.sidecar.port)
    attacker = await RawClient.connect("127.0.0.1", stack.sidecar.port)
    for client in (writer, reader, attacker):
        await client.query("USE ks1")
    write = await writer.prepare(text)
    read = await reader.prepare("SELECT v FROM kv WHERE k = ?")

    stream = attacker.send(Opcode.PREPARE, Prepare(text).encode())
    prepared = attacker.expect(stream)
    switched = attacker.send_query("USE ks2")
    await asyncio.wait_for(asyncio.gather(prepared, switched), BOUND)
    learned = stack.sidecar._require_proxy().statements.by_id[write.query_id]

    hold = stack.emulator.hold_reads()
    older = reader.send_execute(read.query_id, [INT1])
    await eventually(lambda: len(hold) == 1)
    hold.close()
    result_of(await writer.send_execute(write.query_id, [INT1, b"new"]))
    newer = reader.send_execute(read.query_id, [INT1])
    await eventually(lambda: stack.sidecar.in_flight == 2 or newer.done())
    hold.release()
    assert rows_of(await asyncio.wait_for(older, BOUND)) == [[b"ks1"]]
    assert rows_of(await asyncio.wait_for(newer, BOUND)) == [[b"new"]], (
        f"stale read: the statement was learned in keyspace {learned.keyspace!r}")
    for client in (keeper, writer, reader, attacker):
        await client.close()


# -- roles --------------------------------------------------------------------------------

ROLES = [
    "CREATE KEYSPACE ks WITH replication = {'class': 'SimpleStrategy', 'replication_factor': 1}",
    "CREATE TABLE ks.kv (k int PRIMARY KEY, v text)",
    "CREATE TABLE ks.other (k int PRIMARY KEY, v text)",
    "INSERT INTO ks.kv (k, v) VALUES (1, 'one')",
    "CREATE ROLE alice WITH PASSWORD = 'alice-pw' AND LOGIN = true",
    "CREATE ROLE bob WITH PASSWORD = 'bob-pw' AND LOGIN = true",
    "GRANT SELECT ON TABLE ks.kv TO alice",
    "GRANT SELECT ON TABLE ks.other TO bob",
]
READ = "SELECT k, v FROM ks.kv WHERE k = 1"


async def _roles(loop_stack: Callable[..., Any]) -> tuple[LoopStack, RawClient, RawClient]:
    stack: LoopStack = await loop_stack(emulator={"auth": True})
    admin = await RawClient.connect("127.0.0.1", stack.sidecar.port,
                                    credentials=("cassandra", "cassandra"))
    for statement in ROLES:
        await admin.query(statement)
    await admin.close()
    alice = await RawClient.connect("127.0.0.1", stack.sidecar.port,
                                    credentials=("alice", "alice-pw"))
    bob = await RawClient.connect("127.0.0.1", stack.sidecar.port, credentials=("bob", "bob-pw"))
    return stack, alice, bob


@pytest.mark.parametrize("first", ["permitted", "forbidden"])
async def test_concurrent_reads_of_one_table_by_two_roles_share_neither_rows_nor_refusals(
    loop_stack: Callable[..., Any], first: str,
) -> None:
    stack, alice, bob = await _roles(loop_stack)
    hold = stack.emulator.hold_reads()
    order = (alice, bob) if first == "permitted" else (bob, alice)
    waiters = {}
    for client in order:
        waiters[client] = [client.send_query(READ, timestamp=i) for i in range(10)]
        if client is alice:
            await eventually(lambda: len(hold) == 1)  # alice's read is held upstream
    bob_frames = await asyncio.wait_for(asyncio.gather(*waiters[bob]), BOUND)
    hold.release()
    for frame in bob_frames:
        with pytest.raises(CqlError) as refused:
            result_of(frame)
        assert refused.value.code == ErrorCode.UNAUTHORIZED
    for frame in await asyncio.wait_for(asyncio.gather(*waiters[alice]), BOUND):
        assert rows_of(frame) == [[INT1, b"one"]]
    await alice.close()
    await bob.close()


async def test_a_role_is_the_user_scylla_checked_whatever_the_authzid_says(
    loop_stack: Callable[..., Any],
) -> None:
    stack, alice, bob = await _roles(loop_stack)
    # SASL PLAIN: authzid \0 user \0 password. An authzid naming alice gives bob nothing.
    from coalesce.cql import AuthResponse

    sneaky = await RawClient.connect("127.0.0.1", stack.sidecar.port, startup=False)
    reply = await sneaky.request(Opcode.STARTUP, b"\x00\x01\x00\x0bCQL_VERSION\x00\x053.0.0")
    assert reply.opcode == Opcode.AUTHENTICATE
    reply = await sneaky.request(Opcode.AUTH_RESPONSE,
                                 AuthResponse(b"alice\x00bob\x00bob-pw").encode())
    assert reply.opcode == Opcode.AUTH_SUCCESS
    hold = stack.emulator.hold_reads()
    permitted = alice.send_query(READ)
    await eventually(lambda: len(hold) == 1)
    with pytest.raises(CqlError) as refused:
        result_of(await asyncio.wait_for(sneaky.send_query(READ), BOUND))
    assert refused.value.code == ErrorCode.UNAUTHORIZED
    hold.release()
    assert rows_of(await permitted) == [[INT1, b"one"]]
    for client in (alice, bob, sneaky):
        await client.close()
