"""A ring of sidecars in the test's loop: every partition merged at its owner.

Three (or more) sidecars in front of one emulator, told of each other with a static
list. Requests go through raw connections, so where each one lands is the test's
choice: the worst case for merging, a round-robin client, is just a loop.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import pytest

from coalesce.cql import CUSTOM_PAYLOAD, Consistency, ErrorCode, Execute, Opcode, QueryParameters
from coalesce.cql._wire import w_bytes_map
from coalesce.emulator import Emulator
from coalesce.sidecar import Sidecar
from coalesce.sidecar.members import member_name
from coalesce.sidecar.peers import HOP

from .conftest import _settled, eventually, sidecar_config
from .cqlclient import CqlError, RawClient, result_of, rows_of

pytestmark = pytest.mark.timeout(60)

SETUP = [
    "CREATE KEYSPACE ks WITH replication = {'class': 'SimpleStrategy', 'replication_factor': 1}",
    "CREATE TABLE ks.kv (k int PRIMARY KEY, v text)",
]
READ = "SELECT k, v FROM ks.kv WHERE k = ?"
WRITE = "INSERT INTO ks.kv (k, v) VALUES (?, ?)"


def _int(value: int) -> bytes:
    return value.to_bytes(4, "big", signed=True)


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass
class Ring:
    emulator: Emulator
    sidecars: list[Sidecar]

    def owner_of(self, key: int) -> int:
        """Index of the sidecar owning partition `key` (every member agrees)."""
        ring = self.sidecars[0].ring
        assert ring is not None
        owner = ring.owner_of(_int(key))
        assert owner is not None
        return next(i for i, s in enumerate(self.sidecars)
                    if member_name("127.0.0.1", s.port) == owner.name)

    def key_owned_by(self, index: int, start: int = 0) -> int:
        return next(k for k in range(start, start + 10_000) if self.owner_of(k) == index)

    async def client(self, index: int, **kwargs: Any) -> RawClient:
        return await RawClient.connect("127.0.0.1", self.sidecars[index].port, **kwargs)


MakeRing = Callable[..., Coroutine[Any, Any, Ring]]


@pytest.fixture
async def ring_stack() -> AsyncIterator[MakeRing]:
    made: list[Ring] = []

    async def make(n: int = 3, *, emulator: dict[str, Any] | None = None,
                   setup: list[str] = SETUP, credentials: tuple[str, str] | None = None,
                   **config: Any) -> Ring:
        emu = Emulator(**{"read_latency": 0.0, "per_row": 0.0, "write_latency": 0.0,
                          **(emulator or {})})
        await emu.start()
        ports = _free_ports(n)
        if "membership" not in config:
            config["peers"] = tuple(("127.0.0.1", p) for p in ports)
        sidecars = [Sidecar(sidecar_config((emu.host, emu.port), listen=("127.0.0.1", p),
                                           vnodes=16, **config))
                    for p in ports]
        ring = Ring(emu, [])
        made.append(ring)
        for sidecar in sidecars:
            await sidecar.start()
            ring.sidecars.append(sidecar)
        admin = await ring.client(0, credentials=credentials)
        for statement in setup:
            await admin.query(statement)
        await admin.close()
        return ring

    yield make
    for ring in made:
        try:
            for sidecar in ring.sidecars:
                await eventually(lambda s=sidecar: _settled(s.flights))
                assert not len(sidecar.flights.freshness), "a read is still tracked"
        finally:
            for sidecar in ring.sidecars:
                await sidecar.stop()
            await ring.emulator.aclose()


async def _write(client: RawClient, query_id: bytes, key: int, value: str) -> None:
    result_of(await client.send_execute(query_id, [_int(key), value.encode()]))


async def test_each_member_lists_the_others_and_their_tokens_cover_the_ring_once(
    ring_stack: MakeRing,
) -> None:
    ring = await ring_stack(4)
    seen_tokens: list[str] = []
    for index in range(4):
        client = await ring.client(index)
        local = rows_of(await client.send_query("SELECT rpc_address, tokens FROM system.local"))
        peers = rows_of(await client.send_query("SELECT peer, tokens FROM system.peers"))
        await client.close()
        assert len(local) == 1 and len(peers) == 3
        own = _text_set(local[0][1])
        assert len(own) == 16
        seen_tokens.extend(own)
        peer_tokens = set().union(*(_text_set(row[1]) for row in peers))
        assert len(peer_tokens) == 48 and not peer_tokens & own
    assert len(seen_tokens) == len(set(seen_tokens)) == 64  # each token owned exactly once


def _text_set(cell: bytes | None) -> set[str]:
    assert cell is not None
    count = int.from_bytes(cell[:4], "big")
    out, at = set(), 4
    for _ in range(count):
        size = int.from_bytes(cell[at:at + 4], "big")
        out.add(cell[at + 4:at + 4 + size].decode())
        at += 4 + size
    return out


async def test_a_round_robin_herd_on_one_partition_costs_one_upstream_read(
    ring_stack: MakeRing,
) -> None:
    ring = await ring_stack(3)
    clients = [await ring.client(i % 3) for i in range(6)]
    prepared = [await c.prepare(READ) for c in clients]
    writer_id = (await clients[0].prepare(WRITE)).query_id
    await _write(clients[0], writer_id, 7, "seven")
    before = ring.emulator.statements["select"]
    hold = ring.emulator.hold_reads()
    herd = [c.send_execute(p.query_id, [_int(7)]) for c, p in zip(clients * 50, prepared * 50,
                                                                   strict=True)]
    owner = ring.sidecars[ring.owner_of(7)]
    await eventually(lambda: owner.flights.running)
    await asyncio.sleep(0.05)  # let the other members' forwards land (joins are counted)
    hold.release()
    answers = await asyncio.gather(*herd)
    assert all(rows_of(a) == [[_int(7), b"seven"]] for a in answers)
    assert ring.emulator.statements["select"] - before == 1
    non_owners = [s for i, s in enumerate(ring.sidecars) if i != ring.owner_of(7)]
    assert all(s.stats.ring_forwarded == 1 for s in non_owners)  # one forward per flight
    assert owner.stats.ring_served == 2  # one from each other member
    for c in clients:
        await c.close()


async def test_a_write_through_one_member_is_read_through_another_despite_a_read_in_flight(
    ring_stack: MakeRing,
) -> None:
    ring = await ring_stack(3)
    key = ring.key_owned_by(2)
    a, b = await ring.client(0), await ring.client(1)
    write_id = (await a.prepare(WRITE)).query_id
    read_a, read_b = (await a.prepare(READ)).query_id, (await b.prepare(READ)).query_id
    await _write(a, write_id, key, "old")
    hold = ring.emulator.hold_reads()
    stale = b.send_execute(read_b, [_int(key)])  # through B, merged at C: held in flight
    await eventually(lambda: len(hold) == 1)
    hold.close()  # later reads are answered; this one stays held (it saw "old")
    await _write(a, write_id, key, "new")
    assert len(ring.sidecars[1].flights) == 0  # B forgot its forwarded flight
    assert len(ring.sidecars[2].flights) == 0  # the owner forgot its own
    assert rows_of(await b.send_execute(read_b, [_int(key)])) == [[_int(key), b"new"]]
    assert not stale.done()
    hold.release()
    assert rows_of(await stale) == [[_int(key), b"old"]]  # concurrent with the write
    assert rows_of(await a.send_execute(read_a, [_int(key)])) == [[_int(key), b"new"]]
    await a.close()
    await b.close()


def _execute_body(query_id: bytes, values: list[bytes | None]) -> bytes:
    return Execute(query_id, QueryParameters(Consistency.ONE, values)).encode()


async def test_a_forged_hop_marker_only_keeps_the_read_where_it_landed(
    ring_stack: MakeRing,
) -> None:
    ring = await ring_stack(3)
    key = ring.key_owned_by(1)
    client = await ring.client(0)
    writer = (await client.prepare(WRITE)).query_id
    await _write(client, writer, key, "v")
    read_id = (await client.prepare(READ)).query_id
    before = ring.emulator.statements["select"]
    marked = await client.request(Opcode.EXECUTE, HOP + _execute_body(read_id, [_int(key)]),
                                  flags=CUSTOM_PAYLOAD)
    assert rows_of(marked) == [[_int(key), b"v"]]  # served, under the client's own role
    member = ring.sidecars[0]
    assert member.stats.ring_forwarded == 0 and member.stats.ring_served == 1
    assert ring.emulator.statements["select"] - before == 1
    # The marker with anything else in the payload is just a custom payload: passed on.
    payload = w_bytes_map({"coalesce-hop": b"", "role": b"cassandra"})
    forwarded_before = member.stats.forwarded
    other = await client.request(Opcode.EXECUTE, payload + _execute_body(read_id, [_int(key)]),
                                 flags=CUSTOM_PAYLOAD)
    assert rows_of(other) == [[_int(key), b"v"]]
    assert member.stats.forwarded == forwarded_before + 1  # alone, not merged
    await client.close()


async def test_forgets_from_a_client_are_answered_and_a_malformed_one_hurts_nobody(
    ring_stack: MakeRing,
) -> None:
    ring = await ring_stack(2)
    client = await ring.client(0)
    from coalesce.cql.classify import StatementInfo
    from coalesce.sidecar.peers import forget_frame

    body = forget_frame(StatementInfo("insert", "ks", "kv"), None, _int(1))
    reply = await client.request(Opcode.QUERY, body, flags=CUSTOM_PAYLOAD)
    assert reply.opcode == Opcode.RESULT
    bad = body[:-3] + b"}}}"
    with pytest.raises(CqlError) as refused:
        result_of(await client.request(Opcode.QUERY, bad, flags=CUSTOM_PAYLOAD))
    assert refused.value.code == ErrorCode.INVALID
    assert rows_of(await client.send_query("SELECT k FROM ks.kv WHERE k = 1")) == []
    await client.close()


async def test_a_dead_owner_costs_a_refused_connect_and_reads_are_served_here(
    ring_stack: MakeRing,
) -> None:
    ring = await ring_stack(3, reconnect_delay=5.0, reconnect_max_delay=10.0)
    key = ring.key_owned_by(2)
    client = await ring.client(0)
    writer = (await client.prepare(WRITE)).query_id
    await _write(client, writer, key, "kept")
    read_id = (await client.prepare(READ)).query_id
    await ring.sidecars[2].stop()  # still in everyone's view
    started = time.monotonic()
    answers = await asyncio.gather(*(client.send_execute(read_id, [_int(key)])
                                     for _ in range(20)))
    assert time.monotonic() - started < ring.sidecars[0].config.peer_timeout
    assert all(rows_of(a) == [[_int(key), b"kept"]] for a in answers)
    assert ring.sidecars[0].flights.fallbacks == 1  # one flight, one failed forward
    # The first failure may have been the old connection's (not yet seen closed); once a
    # connect was refused, the owner is left alone for its back-off: no read tries it.
    assert rows_of(await client.send_execute(read_id, [_int(key)])) == [[_int(key), b"kept"]]
    tried = ring.sidecars[0].flights.fallbacks
    assert tried <= 2
    for _ in range(3):
        assert rows_of(await client.send_execute(read_id, [_int(key)])) == [
            [_int(key), b"kept"]]
    assert ring.sidecars[0].flights.fallbacks == tried
    await client.close()


async def test_an_owner_that_never_saw_the_statement_is_taught_it(
    ring_stack: MakeRing,
) -> None:
    ring = await ring_stack(3)
    key = ring.key_owned_by(1)
    client = await ring.client(0)
    writer = (await client.prepare(WRITE)).query_id
    await _write(client, writer, key, "taught")
    read_id = (await client.prepare(READ)).query_id
    assert ring.sidecars[1]._require_proxy().statements.get(read_id) is None
    assert rows_of(await client.send_execute(read_id, [_int(key)])) == [[_int(key), b"taught"]]
    assert ring.sidecars[1]._require_proxy().statements.get(read_id) is not None
    assert ring.sidecars[0].flights.fallbacks == 0  # it was served by the owner
    assert ring.sidecars[1].stats.ring_served == 2  # answered UNPREPARED, then again
    await client.close()


ROLES = [
    *SETUP,
    "CREATE ROLE alice WITH PASSWORD = 'alice-pw' AND LOGIN = true",
    "CREATE ROLE bob WITH PASSWORD = 'bob-pw' AND LOGIN = true",
    "CREATE ROLE mallory WITH PASSWORD = 'mallory-pw' AND LOGIN = true",
    "GRANT SELECT ON KEYSPACE ks TO alice",
    "GRANT SELECT ON KEYSPACE ks TO bob",
]


async def test_two_roles_never_share_an_answer_across_members(ring_stack: MakeRing) -> None:
    ring = await ring_stack(3, emulator={"auth": True}, setup=ROLES,
                            credentials=("cassandra", "cassandra"))
    key = ring.key_owned_by(2)
    admin = await ring.client(0, credentials=("cassandra", "cassandra"))
    await _write(admin, (await admin.prepare(WRITE)).query_id, key, "secret")
    alice = await ring.client(0, credentials=("alice", "alice-pw"))
    bob = await ring.client(1, credentials=("bob", "bob-pw"))
    mallory = await ring.client(1, credentials=("mallory", "mallory-pw"))
    ids = [(await c.prepare(READ)).query_id for c in (alice, bob, mallory)]
    before = ring.emulator.statements["select"]
    hold = ring.emulator.hold_reads()
    reads = [c.send_execute(i, [_int(key)]) for c, i in zip((alice, bob), ids, strict=False)]
    await eventually(lambda: len(hold) == 2)  # one read per role at the owner
    denied = mallory.send_execute(ids[2], [_int(key)])
    await eventually(lambda: ring.sidecars[2].flights.running == 3 or denied.done())
    hold.release()
    assert [rows_of(r) for r in await asyncio.gather(*reads)] == [[[_int(key), b"secret"]]] * 2
    with pytest.raises(CqlError) as refused:
        result_of(await denied)
    assert refused.value.code == ErrorCode.UNAUTHORIZED
    assert ring.emulator.statements["select"] - before >= 2
    for c in (admin, alice, bob, mallory):
        await c.close()


async def test_ring_changes_reach_registered_drivers_and_the_peers_table(
    ring_stack: MakeRing,
) -> None:
    ring = await ring_stack(2)
    from coalesce.cql import Event, Register, StatusChangeEvent, TopologyChangeEvent

    client = await ring.client(0)
    reply = await client.request(Opcode.REGISTER,
                                 Register(["TOPOLOGY_CHANGE", "STATUS_CHANGE"]).encode())
    assert reply.opcode == Opcode.READY
    names = tuple(member_name("127.0.0.1", s.port) for s in ring.sidecars)
    ring.sidecars[0].ring_changed((*names, "127.0.0.9:9042"))
    events = [Event.decode((await client.events.get()).body) for _ in range(2)]
    assert events == [TopologyChangeEvent("NEW_NODE", ("127.0.0.9", 9042)),
                      StatusChangeEvent("UP", ("127.0.0.9", 9042))]
    peers = rows_of(await client.send_query("SELECT peer FROM system.peers"))
    assert sorted(row[0] for row in peers) == sorted(
        [socket.inet_aton("127.0.0.1"), socket.inet_aton("127.0.0.9")])
    ring.sidecars[0].ring_changed(names)
    events = [Event.decode((await client.events.get()).body) for _ in range(2)]
    assert events == [StatusChangeEvent("DOWN", ("127.0.0.9", 9042)),
                      TopologyChangeEvent("REMOVED_NODE", ("127.0.0.9", 9042))]
    await client.close()


async def test_a_member_out_of_the_ring_claims_nothing_and_forwards_everything(
    ring_stack: MakeRing,
) -> None:
    ring = await ring_stack(2)
    others = (member_name("127.0.0.1", ring.sidecars[1].port),)
    ring.sidecars[0].ring_changed(others)  # as when its etcd lease is lost
    client = await ring.client(0)
    local = rows_of(await client.send_query("SELECT tokens FROM system.local"))
    assert _text_set(local[0][0]) == set()
    writer = (await client.prepare(WRITE)).query_id
    await _write(client, writer, 3, "three")
    read_id = (await client.prepare(READ)).query_id
    assert rows_of(await client.send_execute(read_id, [_int(3)])) == [[_int(3), b"three"]]
    assert ring.sidecars[0].stats.ring_forwarded == 1
    assert ring.sidecars[1].stats.ring_served == 2  # UNPREPARED there first, then served
    await client.close()


async def test_bounded_loads_serve_here_what_would_pile_onto_one_owner(
    ring_stack: MakeRing,
) -> None:
    ring = await ring_stack(3, load_factor=1.25)
    keys = []
    while len(keys) < 8:
        keys.append(ring.key_owned_by(1, start=keys[-1] + 1 if keys else 0))
    client = await ring.client(0)
    read_id = (await client.prepare(READ)).query_id
    hold = ring.emulator.hold_reads()
    reads = [client.send_execute(read_id, [_int(k)]) for k in keys]
    await eventually(lambda: len(hold) == 8)
    member = ring.sidecars[0]
    sent = member.stats.ring_forwarded
    # ceil(1.25 * (total + 1) / 3) bounds the owner: 4 of the 8, the rest read here.
    assert sent == 4 and member.flights.running == 8
    assert member.ring is not None and member.ring.load(member.ring.me) == 4
    hold.release()
    assert all(rows_of(r) == [] for r in await asyncio.gather(*reads))
    assert member.ring.load(member.ring.me) == 0  # every flight gave its load back
    await client.close()


async def test_the_first_peers_read_of_a_fresh_member_is_complete(ring_stack: MakeRing) -> None:
    # Drivers pipeline system.peers with system.local on a new control connection: the
    # peers rows must already carry Scylla's data center and rack (a driver ignores a
    # peer without them), although nothing has read system.local through this member.
    ring = await ring_stack(3)
    client = await ring.client(2)
    peers, local = await asyncio.gather(
        client.send_query("SELECT peer, data_center, rack, schema_version FROM system.peers"),
        client.send_query("SELECT data_center FROM system.local"))
    rows = rows_of(peers)
    assert len(rows) == 2
    assert all(all(cell is not None for cell in row) for row in rows)
    assert {row[1] for row in rows} == {rows_of(local)[0][0]}
    await client.close()


async def test_owner_and_scylla_both_gone_fail_every_waiter_once(ring_stack: MakeRing) -> None:
    # The forward fails, the read falls back here, and that fails too: every waiter
    # gets one error, promptly, and nothing stays in flight on either member.
    ring = await ring_stack(2, reconnect_delay=5.0, reconnect_max_delay=10.0)
    key = ring.key_owned_by(1)
    client = await ring.client(0)
    read_id = (await client.prepare(READ)).query_id
    await ring.sidecars[1].stop()
    await ring.emulator.aclose()
    started = time.monotonic()
    outcomes = await asyncio.gather(*(client.send_execute(read_id, [_int(key)])
                                      for _ in range(10)))
    assert time.monotonic() - started < ring.sidecars[0].config.peer_timeout + 1.0
    assert all(frame.opcode == Opcode.ERROR for frame in outcomes)
    assert ring.sidecars[0].flights.fallbacks == 1
    await client.close()
