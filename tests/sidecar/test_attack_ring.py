"""Attack round 3: the ring of sidecars, as a hostile client or a misbehaving member.

Forged hop markers and forgets, peer pools pushed past their bound, clients and
members going away mid-forward, a member that stops answering (SIGSTOP), an owner
that keeps forgetting statements or sheds load, ring views that disagree, and what
``system.local``/``system.peers`` tell one client after another one's queries. The
`ring_stack` fixture checks afterwards that every member's in-flight table is empty.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from coalesce.cql import (
    CUSTOM_PAYLOAD,
    TRACING,
    Batch,
    BatchStatement,
    Consistency,
    ErrorCode,
    Opcode,
    Query,
    QueryParameters,
    Register,
)
from coalesce.cql._wire import w_bytes_map
from coalesce.cql.classify import StatementInfo
from coalesce.sidecar import Sidecar
from coalesce.sidecar.members import member_name
from coalesce.sidecar.peers import FORGET_PREFIX, HOP, forget_frame
from coalesce.sidecar.statements import KnownStatement, StatementCache

from .conftest import BOUND, eventually, sidecar_config
from .cqlclient import CqlError, RawClient, result_of, rows_of
from .test_ring import READ, ROLES, WRITE, MakeRing, Ring, _execute_body, _int, ring_stack

__all__ = ["ring_stack"]  # the fixture, imported to be used here

pytestmark = pytest.mark.timeout(60)

ADMIN = ("cassandra", "cassandra")
AUTH: dict[str, Any] = {"emulator": {"auth": True}, "setup": ROLES, "credentials": ADMIN}


def _name(sidecar: Sidecar) -> str:
    return member_name("127.0.0.1", sidecar.port)


def _key_owned_by(ring: Ring, name: str, start: int = 0) -> int:
    """A partition key the members' (shared) view gives to member `name`."""
    view = ring.sidecars[0].ring
    assert view is not None
    for key in range(start, start + 10_000):
        owner = view.owner_of(_int(key))
        if owner is not None and owner.name == name:
            return key
    raise AssertionError(f"no key owned by {name}")


async def _error_of(frame: Any) -> int:
    with pytest.raises(CqlError) as refused:
        result_of(await frame)
    return refused.value.code


async def _write(client: RawClient, query_id: bytes, key: int, value: str) -> None:
    result_of(await client.send_execute(query_id, [_int(key), value.encode()]))


# -- what system.local and system.peers tell everybody else -----------------------------


async def test_an_aliased_system_local_read_does_not_change_the_peers_rows_others_see(
    ring_stack: MakeRing,
) -> None:
    """The peers rows' other columns are Scylla's own system.local cells, recorded from
    every system.local read a client makes. An alias put any column under any name:
    ``cluster_name AS data_center`` moved every other member into another data center
    for every driver (a DC-aware policy then never sends them a request), and
    ``host_id AS schema_version`` made schema agreement fail for everybody."""
    ring = await ring_stack(2)
    honest = await ring.client(0)
    query = "SELECT peer, data_center, schema_version FROM system.peers"
    local = rows_of(await honest.send_query(  # as a driver does: local, then peers
        "SELECT data_center, schema_version FROM system.local"))
    before = rows_of(await honest.send_query(query))
    assert before[0][1:] == local[0]  # the other member is in this one's DC and schema
    attacker = await ring.client(0)
    for alias in ("cluster_name AS data_center", "host_id AS schema_version",
                  "rack AS data_center"):
        rows_of(await attacker.send_query(f"SELECT {alias} FROM system.local"))
    after = rows_of(await honest.send_query(query))
    assert after == before
    # An unaliased read still keeps the recorded cells current.
    assert rows_of(await attacker.send_query("SELECT * FROM system.local"))
    assert rows_of(await honest.send_query(query)) == before
    await attacker.close()
    await honest.close()


@pytest.mark.parametrize("query", [
    "SELECT count(*) FROM system.peers",
    "SELECT peer AS tokens, tokens AS peer FROM system.peers",
    "SELECT peer, peer, host_id FROM system.peers WHERE peer = '10.9.9.9'",
    "SELECT JSON * FROM system.peers",
    "SELECT * FROM system.peers LIMIT 1",
    "SELECT * FROM system.peers_v2",
    "SELECT writetime(data_center) FROM system.peers",
    "SELECT no_such_column FROM system.peers",
    "SELECT tokens AS host_id FROM system.local",
    "SELECT * FROM system.local WHERE key = 'nope'",
])
async def test_odd_system_peers_and_local_queries_get_an_answer_and_keep_the_connection(
    ring_stack: MakeRing, query: str,
) -> None:
    ring = await ring_stack(3)
    client = await ring.client(0)
    frame = await client.send_query(query)
    if frame.opcode == Opcode.ERROR:  # Scylla's own refusal, passed on: not ours
        assert await _error_of(asyncio.sleep(0, frame)) != ErrorCode.SERVER_ERROR
    else:
        result_of(frame)
    peers = rows_of(await client.send_query("SELECT peer FROM system.peers"))
    assert len(peers) == 2  # the connection still works, and still lists the members
    await client.close()


# -- the ring's own names -----------------------------------------------------------------


@pytest.mark.skipif(socket.getaddrinfo("localhost", None, type=socket.SOCK_STREAM)[0][4][0]
                    != "127.0.0.1", reason="localhost is not 127.0.0.1 first here")
async def test_members_named_by_host_name_or_listed_twice_form_one_ring() -> None:
    """``--peers`` takes host names (``sidecar-0.svc:9042``). Every member's own name is
    its advertised address as an IP literal, and system.peers and topology events carry
    inet values: a member named by a host name made the sidecar fail to start."""
    from coalesce.emulator import Emulator

    from .test_ring import _free_ports

    emu = Emulator(read_latency=0.0, per_row=0.0)
    await emu.start()
    ports = _free_ports(2)
    peers = (("localhost", ports[0]), ("127.0.0.1", ports[1]), ("127.0.0.1", ports[1]))
    sidecars = [Sidecar(sidecar_config((emu.host, emu.port), listen=("127.0.0.1", p),
                                       peers=peers, vnodes=16)) for p in ports]
    try:
        for sidecar in sidecars:
            await sidecar.start()
        for sidecar in sidecars:
            view = sidecar.ring
            assert view is not None and len(view) == 2 and view.me in view
        client = await RawClient.connect("127.0.0.1", sidecars[0].port)
        peer_rows = rows_of(await client.send_query("SELECT peer, tokens FROM system.peers"))
        assert len(peer_rows) == 1
        local = rows_of(await client.send_query("SELECT tokens FROM system.local"))
        assert local[0][0] is not None and local[0][0] != b"\x00\x00\x00\x00"
        await client.close()
    finally:
        for sidecar in sidecars:
            await sidecar.stop()
        await emu.aclose()


# -- forged and malformed forgets ------------------------------------------------------


def _forget_body(message: Any, *, raw: bytes | None = None) -> bytes:
    payload = raw if raw is not None else json.dumps(message).encode()
    params = Query("SELECT 1", QueryParameters(Consistency.ONE)).encode()
    return w_bytes_map({"coalesce-forget": payload}) + params


MALFORMED_FORGETS = {
    "deeply nested": _forget_body(None, raw=b"[" * 30_000 + b"]" * 30_000),
    "nested object": _forget_body(None, raw=b'{"a":' * 10_000 + b"1" + b"}" * 10_000),
    "a list": _forget_body([1, 2, 3]),
    "a number": _forget_body(7),
    "kind a number": _forget_body({"kind": 1, "keyspace": None, "table": None, "tables": [],
                                   "session_keyspace": None, "partition": None}),
    "tables of three": _forget_body({"kind": "batch", "keyspace": None, "table": None,
                                     "tables": [["a", "b", "c"]], "session_keyspace": None,
                                     "partition": None}),
    "tables a string": _forget_body({"kind": "batch", "keyspace": None, "table": None,
                                     "tables": "ab", "session_keyspace": None,
                                     "partition": None}),
    "partition not hex": _forget_body({"kind": "insert", "keyspace": "ks", "table": "kv",
                                       "tables": [], "session_keyspace": None,
                                       "partition": "zz"}),
    "huge number": _forget_body(None, raw=b"9" * 60_000),
    "not utf-8": _forget_body(None, raw=b"\xff\xfe{"),
    "over 64 KiB": _forget_body({"kind": "insert", "keyspace": "ks", "table": "kv",
                                 "tables": [["ks", "t" * 70_000]], "session_keyspace": None,
                                 "partition": None}),
    "size past the end": FORGET_PREFIX + (1_000).to_bytes(4, "big") + b"{}",
    "negative size": FORGET_PREFIX + (-5).to_bytes(4, "big", signed=True),
}


@pytest.mark.parametrize("name", sorted(MALFORMED_FORGETS))
async def test_a_malformed_forget_is_refused_as_invalid_and_the_connection_carries_on(
    ring_stack: MakeRing, name: str,
) -> None:
    """Any client may send a forget; one it cannot read is INVALID, nothing more. A
    deeply nested one raised RecursionError inside json.loads: the sidecar answered
    SERVER_ERROR, logged a traceback, and closed the connection."""
    ring = await ring_stack(2)
    client = await ring.client(0)
    other = await ring.client(0)
    reply = client.request(Opcode.QUERY, MALFORMED_FORGETS[name], flags=CUSTOM_PAYLOAD)
    assert await _error_of(reply) == ErrorCode.INVALID
    assert rows_of(await client.send_query("SELECT k FROM ks.kv WHERE k = 1")) == []
    assert rows_of(await other.send_query("SELECT k FROM ks.kv WHERE k = 1")) == []
    await client.close()
    await other.close()


# -- forged hop markers ------------------------------------------------------------------


def _outcome(frame: Any) -> tuple[str, Any]:
    """("rows", rows) or ("error", code) of a frame, extras (tracing id...) skipped."""
    from coalesce.cql import Error, decode_result, split_extras

    body = split_extras(frame.flags, frame.body, response=True)[1] if frame.flags else frame.body
    if frame.opcode == Opcode.ERROR:
        return "error", Error.decode(body).code
    return "rows", decode_result(body).rows


async def test_a_forged_hop_marker_never_lets_a_role_share_another_roles_read(
    ring_stack: MakeRing,
) -> None:
    """Alice's read is in flight at its owner (forwarded there by another member);
    Mallory, who may not read the table, sends the same read to the owner with the hop
    marker in every form: alone, with TRACING, as a QUERY, LZ4-compressed, with more
    in the payload. Each is Mallory's own read, refused by Scylla."""
    ring = await ring_stack(3, **AUTH)
    owner = _name(ring.sidecars[2])
    key = _key_owned_by(ring, owner)
    admin = await ring.client(0, credentials=ADMIN)
    await _write(admin, (await admin.prepare(WRITE)).query_id, key, "secret")
    alice = await ring.client(1, credentials=("alice", "alice-pw"))
    mallory = await ring.client(2, credentials=("mallory", "mallory-pw"))
    squeezed = await ring.client(2, credentials=("mallory", "mallory-pw"), lz4=True)
    alice_id = (await alice.prepare(READ)).query_id
    mallory_id = (await mallory.prepare(READ)).query_id
    assert mallory_id == alice_id  # the same statement: the same id, the same body
    body = _execute_body(mallory_id, [_int(key)])
    text = Query(f"SELECT k, v FROM ks.kv WHERE k = {key}",
                 QueryParameters(Consistency.ONE)).encode()
    hold = ring.emulator.hold_reads()
    alices = alice.send_execute(alice_id, [_int(key)])
    await eventually(lambda: len(hold) == 1)
    assert ring.sidecars[1].stats.ring_forwarded == 1
    forged = [asyncio.ensure_future(request) for request in (
        mallory.request(Opcode.EXECUTE, HOP + body, flags=CUSTOM_PAYLOAD),
        mallory.request(Opcode.EXECUTE, HOP + body, flags=CUSTOM_PAYLOAD | TRACING),
        mallory.request(Opcode.QUERY, HOP + text, flags=CUSTOM_PAYLOAD),
        squeezed.request(Opcode.EXECUTE, HOP + body, flags=CUSTOM_PAYLOAD),
        mallory.request(Opcode.EXECUTE, w_bytes_map({"coalesce-hop": b"", "x": b""}) + body,
                        flags=CUSTOM_PAYLOAD),
        mallory.request(Opcode.EXECUTE, w_bytes_map({"coalesce-hop": b"alice"}) + body,
                        flags=CUSTOM_PAYLOAD),
    )]
    await eventually(lambda: ring.sidecars[2].stats.ring_served >= 5)
    hold.release()
    assert rows_of(await alices) == [[_int(key), b"secret"]]
    for frame in await asyncio.wait_for(asyncio.gather(*forged), BOUND):
        assert _outcome(frame) == ("error", ErrorCode.UNAUTHORIZED)
    for c in (admin, alice, mallory, squeezed):
        await c.close()


async def test_a_write_carrying_the_hop_marker_still_makes_every_member_forget(
    ring_stack: MakeRing,
) -> None:
    """The hop marker keeps a request where it landed; a write with it (EXECUTE, QUERY
    or BATCH) still tells every member to forget before its client hears of it."""
    ring = await ring_stack(3)
    key = _key_owned_by(ring, _name(ring.sidecars[2]))
    a, b = await ring.client(0), await ring.client(1)
    write_id = (await a.prepare(WRITE)).query_id
    read_b = (await b.prepare(READ)).query_id
    writes = [
        lambda v: a.request(Opcode.EXECUTE, HOP + _execute_body(write_id, [_int(key), v]),
                            flags=CUSTOM_PAYLOAD),
        lambda v: a.request(Opcode.QUERY, HOP + Query(
            f"INSERT INTO ks.kv (k, v) VALUES ({key}, '{v.decode()}')",
            QueryParameters(Consistency.ONE)).encode(), flags=CUSTOM_PAYLOAD),
        lambda v: a.request(Opcode.BATCH, HOP + Batch(0, [BatchStatement(
            True, write_id, [_int(key), v])], Consistency.ONE).encode(), flags=CUSTOM_PAYLOAD),
    ]
    for i, write in enumerate(writes):
        old, new = f"old{i}".encode(), f"new{i}".encode()
        result_of(await write(old))
        hold = ring.emulator.hold_reads()
        stale = b.send_execute(read_b, [_int(key)])  # B forwards it to C: held there
        await eventually(lambda h=hold: len(h) == 1)  # type: ignore[misc]
        hold.close()
        result_of(await write(new))
        assert rows_of(await asyncio.wait_for(b.send_execute(read_b, [_int(key)]), BOUND)) == [
            [_int(key), new]]
        hold.release()
        assert rows_of(await stale) == [[_int(key), old]]
    await a.close()
    await b.close()


@pytest.mark.parametrize("what", ["hop alone", "truncated", "forget behind the hop",
                                  "hop behind a forget"])
async def test_a_malformed_request_behind_the_hop_marker_closes_only_its_connection(
    ring_stack: MakeRing, what: str,
) -> None:
    ring = await ring_stack(2)
    key = _key_owned_by(ring, _name(ring.sidecars[1]))
    honest = await ring.client(0)
    read_id = (await honest.prepare(READ)).query_id
    hold = ring.emulator.hold_reads()
    waiting = [honest.send_execute(read_id, [_int(key)]) for _ in range(3)]  # forwarded
    await eventually(lambda: len(hold) == 1)
    forget = forget_frame(StatementInfo("insert", "ks", "kv"), None, _int(key))
    body = {
        "hop alone": HOP,
        "truncated": HOP + _execute_body(read_id, [_int(key)])[:-7],
        "forget behind the hop": HOP + forget,
        "hop behind a forget": forget[:len(FORGET_PREFIX)] + (len(HOP)).to_bytes(4, "big")
        + HOP,
    }[what]
    hostile = await ring.client(0)
    reply = await hostile.request(Opcode.EXECUTE if what == "truncated" else Opcode.QUERY,
                                  body, flags=CUSTOM_PAYLOAD)
    assert _outcome(reply)[0] == "error"
    assert _outcome(reply)[1] in (ErrorCode.PROTOCOL_ERROR, ErrorCode.INVALID)
    if _outcome(reply)[1] == ErrorCode.PROTOCOL_ERROR:
        await asyncio.wait_for(hostile.closed.wait(), BOUND)
    hold.release()
    for frame in await asyncio.wait_for(asyncio.gather(*waiting), BOUND):
        assert rows_of(frame) == []
    await hostile.close()
    await honest.close()


# -- clients and members going away mid-forward ----------------------------------------------


async def test_clients_gone_mid_forward_leave_nothing_held_on_any_member(
    ring_stack: MakeRing,
) -> None:
    """A non-owner's first caller goes away: the callers who joined it are still answered.
    Then every caller goes away: the non-owner abandons the flight, the owner's own flight
    ends when Scylla answers, and every member's table ends empty (fixture)."""
    ring = await ring_stack(3)
    key = _key_owned_by(ring, _name(ring.sidecars[2]))
    first, joiner = await ring.client(1), await ring.client(1)
    ids = [(await c.prepare(READ)).query_id for c in (first, joiner)]
    hold = ring.emulator.hold_reads()
    first.send_execute(ids[0], [_int(key)])
    await eventually(lambda: len(hold) == 1)
    joined = [joiner.send_execute(ids[1], [_int(key)]) for _ in range(5)]
    await eventually(lambda: ring.sidecars[1].stats.merged == 6)
    await first.close()
    hold.release()
    for frame in await asyncio.wait_for(asyncio.gather(*joined), BOUND):
        assert rows_of(frame) == []
    # Everybody gone: many keys, many clients, all at a non-owner.
    hold = ring.emulator.hold_reads()
    keys = [_key_owned_by(ring, _name(ring.sidecars[2]), start=k) for k in range(0, 400, 40)]
    quitters = [await ring.client(1) for _ in range(4)]
    for q in quitters:
        read_id = (await q.prepare(READ)).query_id
        for k in keys:
            q.send_execute(read_id, [_int(k)])
    await eventually(lambda: len(hold) == len(set(keys)))
    for q in quitters:
        await q.close()
    await eventually(lambda: not len(ring.sidecars[1].flights) and not ring.sidecars[1].in_flight)
    hold.release()
    await eventually(lambda: all(not s.in_flight for s in ring.sidecars))
    await joiner.close()


async def test_an_owner_dying_mid_flight_leaves_no_waiter_unanswered(
    ring_stack: MakeRing,
) -> None:
    """The owner stops listening and drops every connection while a forwarded read (with
    joiners on two members) waits there: each member serves its waiters itself."""
    ring = await ring_stack(3, reconnect_delay=5.0, reconnect_max_delay=10.0)
    owner = ring.sidecars[2]
    key = _key_owned_by(ring, _name(owner))
    clients = [await ring.client(i) for i in (0, 0, 1, 1)]
    ids = [(await c.prepare(READ)).query_id for c in clients]
    writer = (await clients[0].prepare(WRITE)).query_id
    await _write(clients[0], writer, key, "v")
    hold = ring.emulator.hold_reads()
    reads = [c.send_execute(i, [_int(key)]) for c, i in zip(clients * 5, ids * 5, strict=True)]
    # One flight at the owner, with the forwarded read of each other member waiting.
    await eventually(lambda: len(hold) == 1 and [f.count for f in owner.flights._by_key.values()]
                     == [2])
    hold.close()  # what the members read themselves now is answered
    assert owner._server is not None
    owner._server.close()
    for client in list(owner._clients):
        client.abort()
    started = time.monotonic()
    answers = await asyncio.wait_for(asyncio.gather(*reads), BOUND)
    assert time.monotonic() - started < owner.config.peer_timeout
    assert all(rows_of(a) == [[_int(key), b"v"]] for a in answers)
    assert ring.sidecars[0].flights.fallbacks == 1 and ring.sidecars[1].flights.fallbacks == 1
    hold.release()
    for c in clients:
        await c.close()


# -- a member that stops answering -----------------------------------------------------------


class FakeMember:
    """A ring member that shakes hands and answers forgets until `frozen`; frozen, it
    keeps accepting connections and reading, and answers nothing (a SIGSTOPped process,
    whose kernel still accepts and buffers). It never answers a read."""

    def __init__(self, *, frozen: bool = False) -> None:
        self.frozen = frozen
        self.port = 0
        self.forgets = 0
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self) -> FakeMember:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    @property
    def name(self) -> str:
        return member_name("127.0.0.1", self.port)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.append(writer)
        try:
            while True:
                header = await reader.readexactly(9)
                await reader.readexactly(int.from_bytes(header[5:9], "big"))
                if self.frozen:
                    continue
                stream, opcode = header[2:4], header[4]
                if opcode == Opcode.STARTUP:
                    writer.write(b"\x84\x00" + stream + bytes([Opcode.READY]) + bytes(4))
                elif opcode == Opcode.QUERY:  # a forget
                    self.forgets += 1
                    writer.write(b"\x84\x00" + stream + bytes([Opcode.RESULT]) + b"\x00\x00\x00"
                                 b"\x04\x00\x00\x00\x01")
        except (asyncio.IncompleteReadError, ConnectionError):
            pass

    async def close(self) -> None:
        for writer in self._writers:
            writer.close()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


@pytest.fixture
async def fake_member() -> AsyncIterator[FakeMember]:
    member = await FakeMember().start()
    yield member
    await member.close()


def _join(ring: Ring, *extra: str) -> None:
    names = tuple(_name(s) for s in ring.sidecars) + extra
    for sidecar in ring.sidecars:
        sidecar.ring_changed(names)


async def _timed(frame: Any) -> tuple[float, Any]:
    started = time.monotonic()
    result = await asyncio.wait_for(frame, BOUND)
    return time.monotonic() - started, result


async def test_a_member_that_accepts_but_never_answers_costs_one_bounded_wait(
    ring_stack: MakeRing, fake_member: FakeMember,
) -> None:
    """Frozen from the start: the first read it owns waits ``peer_timeout`` for the
    login, then is served here; the first write waits as long for its forget; after
    that the member is left alone for its back-off and nothing waits for it."""
    ring = await ring_stack(2, peer_timeout=0.3, reconnect_delay=5.0, reconnect_max_delay=10.0)
    fake_member.frozen = True
    _join(ring, fake_member.name)
    key = _key_owned_by(ring, fake_member.name)
    client = await ring.client(0)
    read_id = (await client.prepare(READ)).query_id
    write_id = (await client.prepare(WRITE)).query_id
    took, frame = await _timed(client.send_execute(read_id, [_int(key)]))
    assert rows_of(frame) == [] and 0.25 < took < 0.3 + 0.5
    took, frame = await _timed(client.send_execute(write_id, [_int(key), b"w"]))
    result_of(frame)
    assert took < 0.15  # backing off since the read's failed login: not even tried
    took, frame = await _timed(client.send_execute(read_id, [_int(key)]))
    assert rows_of(frame) == [[_int(key), b"w"]] and took < 0.15
    await client.close()


async def test_a_member_frozen_after_its_connections_opened_is_left_alone_after_one_timeout(
    ring_stack: MakeRing, fake_member: FakeMember,
) -> None:
    """Frozen once the connections are open (SIGSTOP): every write waited ``peer_timeout``
    for its forget and every read it owns ``request_timeout``, for as long as the open
    connection lived (forever: nothing closed it). One timeout is enough to know."""
    ring = await ring_stack(2, peer_timeout=0.3, request_timeout=0.6, reconnect_delay=5.0,
                            reconnect_max_delay=10.0)
    _join(ring, fake_member.name)
    key = _key_owned_by(ring, fake_member.name)
    client = await ring.client(0)
    read_id = (await client.prepare(READ)).query_id
    write_id = (await client.prepare(WRITE)).query_id
    result_of(await client.send_execute(write_id, [_int(key), b"w"]))  # opens the connection
    assert fake_member.forgets == 1
    fake_member.frozen = True
    took, frame = await _timed(client.send_execute(write_id, [_int(key), b"x"]))
    result_of(frame)
    assert 0.25 < took < 0.3 + 0.5  # its forget waited peer_timeout
    took, frame = await _timed(client.send_execute(write_id, [_int(key), b"y"]))
    result_of(frame)
    assert took < 0.15, f"the next write waited {took:.2f}s for the frozen member again"
    took, frame = await _timed(client.send_execute(read_id, [_int(key)]))
    assert rows_of(frame) == [[_int(key), b"y"]]
    assert took < 0.15, f"a read it owns waited {took:.2f}s for the frozen member"
    await client.close()


async def test_a_member_frozen_for_reads_only_is_left_alone_after_one_timeout(
    ring_stack: MakeRing, fake_member: FakeMember,
) -> None:
    """No writes to notice it: the first read it owns waits until a ping is left
    unanswered (about twice ``peer_timeout``, well before ``request_timeout``) and is
    served here; the next ones do not wait for it at all."""
    ring = await ring_stack(2, peer_timeout=0.3, request_timeout=5.0, reconnect_delay=5.0,
                            reconnect_max_delay=10.0)
    _join(ring, fake_member.name)
    key = _key_owned_by(ring, fake_member.name)
    client = await ring.client(0)
    read_id = (await client.prepare(READ)).query_id
    took, frame = await _timed(client.send_execute(read_id, [_int(key)]))
    assert rows_of(frame) == [] and 0.3 <= took < 0.3 * 2 + 0.5  # served here after the ping
    took, frame = await _timed(client.send_execute(read_id, [_int(key)]))
    assert rows_of(frame) == []
    assert took < 0.15, f"the next read waited {took:.2f}s for the frozen member again"
    await client.close()


# -- an owner that cannot serve a read it was sent -----------------------------------------


class _Forgetful(StatementCache):
    """A statement cache that another client's PREPAREs always evicted just now."""

    def get(self, query_id: bytes | None) -> KnownStatement | None:
        return None


async def test_an_owner_that_keeps_forgetting_the_statement_costs_one_reprepare_then_here(
    ring_stack: MakeRing, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An owner whose statement cache is thrashed (a flood of PREPAREs from anyone
    evicts the LRU statement) answers UNPREPARED to every forwarded EXECUTE. The
    member that sent it re-prepares there once, as for Scylla; the second UNPREPARED
    went to the client, although this member knows the statement: its driver prepares
    again here and retries, and gets UNPREPARED again, for as long as the owner forgets."""
    ring = await ring_stack(3)
    owner = ring.sidecars[2]
    key = _key_owned_by(ring, _name(owner))
    client = await ring.client(0)
    writer = (await client.prepare(WRITE)).query_id
    await _write(client, writer, key, "v")
    read_id = (await client.prepare(READ)).query_id
    monkeypatch.setattr(owner._require_proxy(), "statements", _Forgetful(1000, 1 << 20))
    served = owner.stats.ring_served
    for _ in range(3):
        frame = await asyncio.wait_for(client.send_execute(read_id, [_int(key)]), BOUND)
        assert _outcome(frame) == ("rows", [[_int(key), b"v"]])
    assert owner.stats.ring_served - served == 6  # UNPREPARED, re-prepared, UNPREPARED: x3
    assert ring.sidecars[0].flights.fallbacks == 3
    await client.close()


async def test_an_owner_shedding_load_does_not_refuse_another_members_clients(
    ring_stack: MakeRing,
) -> None:
    """``max_inflight`` full at the owner (one client there holds its only slot): a
    read another member forwards there got the owner's OVERLOADED, although the member
    that got it had room to read it itself (as bounded loads would have it)."""
    ring = await ring_stack(3, max_inflight=1, max_queued=0)
    owner = ring.sidecars[2]
    keys = [_key_owned_by(ring, _name(owner))]
    keys.append(_key_owned_by(ring, _name(owner), start=keys[0] + 1))
    hog, victim = await ring.client(2), await ring.client(0)
    hog_id, victim_id = (await hog.prepare(READ)).query_id, (await victim.prepare(READ)).query_id
    hold = ring.emulator.hold_reads()
    try:
        hogging = hog.send_execute(hog_id, [_int(keys[0])])
        await eventually(lambda: len(hold) == 1)
        read = victim.send_execute(victim_id, [_int(keys[1])])
        await eventually(lambda: len(hold) == 2 or read.done())
        assert not read.done(), f"refused: {_outcome(read.result())}"
    finally:
        hold.release()
    assert rows_of(await read) == [] and rows_of(await hogging) == []
    await hog.close()
    await victim.close()


# -- peer pools -------------------------------------------------------------------------------


async def test_many_roles_and_keyspaces_open_at_most_max_pools_peer_pools(
    ring_stack: MakeRing,
) -> None:
    """Four roles, two keyspaces each, reading through one member: at most
    ``max_pools`` (role, keyspace) pools to the others at any time, so at most that many
    connections from it on each other member; every read is answered."""
    setup = [*ROLES, "CREATE KEYSPACE ks2 WITH replication = {'class': 'SimpleStrategy', "
             "'replication_factor': 1}", "CREATE TABLE ks2.kv (k int PRIMARY KEY, v text)",
             "GRANT SELECT ON KEYSPACE ks2 TO alice", "GRANT SELECT ON KEYSPACE ks2 TO bob",
             "GRANT SELECT ON KEYSPACE ks TO mallory", "GRANT SELECT ON KEYSPACE ks2 TO mallory"]
    ring = await ring_stack(3, max_pools=2, emulator={"auth": True}, setup=setup,
                            credentials=ADMIN)
    member = ring.sidecars[0]
    peers = member._require_proxy().peers
    assert peers is not None
    most = 0
    logins = [ADMIN, ("alice", "alice-pw"), ("bob", "bob-pw"), ("mallory", "mallory-pw")]
    keys = [_key_owned_by(ring, _name(ring.sidecars[i])) for i in (1, 2)]
    for _ in range(2):
        for login in logins:
            client = await ring.client(0, credentials=login)
            for keyspace in ("ks", "ks2"):
                await client.query(f"USE {keyspace}")
                read_id = (await client.prepare("SELECT k, v FROM kv WHERE k = ?")).query_id
                frames = [client.send_execute(read_id, [_int(k)]) for k in keys]
                for frame in await asyncio.wait_for(asyncio.gather(*frames), BOUND):
                    assert rows_of(frame) == []
                most = max(most, len(peers._pools))
            await client.close()
    assert most <= 2
    for other in ring.sidecars[1:]:  # no connection left over from evicted pools
        await eventually(lambda o=other: len(o._clients) <= 2)  # type: ignore[misc]


async def test_a_role_the_owner_refuses_costs_a_login_per_back_off_not_per_read(
    ring_stack: MakeRing, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Mallory's password is rotated while her session stays (sessions outlive it). Her
    forwarded reads log in at their owner with the token she logged in with, which
    Scylla now refuses: the member is not backed off (it is fine for other roles), and
    every read of hers cost a connection to the owner, and one from the owner to Scylla
    with a password check, then was served here: 200 reads, 200 logins."""
    setup = [*ROLES, "GRANT SELECT ON KEYSPACE ks TO mallory"]
    ring = await ring_stack(3, emulator={"auth": True}, setup=setup, credentials=ADMIN,
                            reconnect_delay=5.0, reconnect_max_delay=10.0)
    owner = ring.sidecars[2]
    key = _key_owned_by(ring, _name(owner))
    upstream = owner._upstream
    assert upstream is not None
    logins = 0
    open_login = upstream.open_login

    async def counted() -> Any:
        nonlocal logins
        logins += 1
        return await open_login()

    monkeypatch.setattr(upstream, "open_login", counted)
    mallory = await ring.client(0, credentials=("mallory", "mallory-pw"))
    read_id = (await mallory.prepare(READ)).query_id
    assert rows_of(await mallory.send_execute(read_id, [_int(key)])) == []
    assert logins == 1  # her peer connection to the owner
    admin = await ring.client(1, credentials=ADMIN)
    await admin.query("ALTER ROLE mallory WITH PASSWORD = 'rotated'")
    peers = ring.sidecars[0]._require_proxy().peers
    assert peers is not None
    for pool in peers._pools.values():  # as when the owner restarts
        pool.close()
    peers._pools.clear()
    logins = 0  # (the ALTER's forgets logged the admin in at the owner)
    for _ in range(200):
        frame = await asyncio.wait_for(mallory.send_execute(read_id, [_int(key)]), BOUND)
        assert rows_of(frame) == []
    assert logins == 1, f"200 reads cost {logins} logins at the owner"
    honest = await ring.client(0, credentials=("alice", "alice-pw"))
    alice_id = (await honest.prepare(READ)).query_id
    assert rows_of(await honest.send_execute(alice_id, [_int(key)])) == []
    assert owner.stats.ring_served >= 2  # the member still forwards other roles' reads
    for c in (mallory, admin, honest):
        await c.close()


async def test_a_pool_evicted_while_a_forget_opens_does_not_lose_the_forget(
    ring_stack: MakeRing,
) -> None:
    """``max_pools`` full: another role's request evicts the writer's (role, None) pool
    while its forgets are still logging in. The cancelled login escaped as
    CancelledError through ``forget_everywhere``: the write was answered before any
    member had forgotten (not even counted as missed), and a read through another member
    joined the flight that started before the write."""
    ring = await ring_stack(3, max_pools=1, **AUTH)
    a = ring.sidecars[0]
    key = _key_owned_by(ring, _name(ring.sidecars[2]))
    writer = await ring.client(0, credentials=ADMIN)
    reader = await ring.client(1, credentials=ADMIN)
    write_id = (await writer.prepare(WRITE)).query_id
    read_id = (await reader.prepare(READ)).query_id
    result_of(await reader.send_execute((await reader.prepare(WRITE)).query_id,
                                        [_int(key), b"old"]))
    hold = ring.emulator.hold_reads()
    try:
        stale = reader.send_execute(read_id, [_int(key)])  # B forwards it to C: held there
        await eventually(lambda: len(hold) == 1)
        hold.close()
        peers = a._require_proxy().peers
        assert peers is not None
        # What alice's forwarded reads at A do (`_start_flight`): a pool of their own,
        # here in the very turn the writer's pool (opened by the setup) is needed again.
        peers.pool("alice", None)
        write = writer.send_execute(write_id, [_int(key), b"new"])
        await eventually(lambda: bool(getattr(peers._pools.get(("cassandra", None)),
                                              "_opening", None)))
        peers.pool("alice", None)
        result_of(await asyncio.wait_for(write, BOUND))
        fresh = await asyncio.wait_for(reader.send_execute(read_id, [_int(key)]), 2.0)
        assert rows_of(fresh) == [[_int(key), b"new"]]
        assert a.stats.forgets_missed == 0
    finally:
        hold.release()
    assert rows_of(await stale) == [[_int(key), b"old"]]
    await writer.close()
    await reader.close()


async def test_a_clients_flood_of_forwarded_reads_does_not_stall_another_clients_read(
    ring_stack: MakeRing,
) -> None:
    """A member sends one role's forwarded reads over one connection per owner, and at
    the owner that connection is a client like any other, bounded by
    ``max_client_requests``. One client filling that bound with slow reads left the
    next client's read, through the same member, unsent behind them (the owner stops
    reading the connection) until they were answered, though that member could serve
    it: one client's requests delayed another's."""
    ring = await ring_stack(3, max_client_requests=4)
    owner = _name(ring.sidecars[2])
    keys = [_key_owned_by(ring, owner)]
    while len(keys) < 9:
        keys.append(_key_owned_by(ring, owner, start=keys[-1] + 1))
    flooders = [await ring.client(1) for _ in range(2)]
    victim = await ring.client(1)
    hold = ring.emulator.hold_reads()
    try:
        flood = []
        for i, flooder in enumerate(flooders):
            read_id = (await flooder.prepare(READ)).query_id
            flood += [flooder.send_execute(read_id, [_int(k)]) for k in keys[4 * i:4 * i + 4]]
        await eventually(lambda: ring.sidecars[1].stats.ring_forwarded == 8)
        await eventually(lambda: len(hold) >= 4)
        victim_id = (await victim.prepare(READ)).query_id
        read = victim.send_execute(victim_id, [_int(keys[8])])
        await eventually(lambda: len(hold) >= 5 or read.done(), timeout=2.0)
        # A write's forget, on the same connection as the flood, is read at once.
        write_id = (await victim.prepare(WRITE)).query_id
        took, frame = await _timed(victim.send_execute(write_id, [_int(keys[8]), b"w"]))
        result_of(frame)
        assert took < 0.5 and ring.sidecars[1].stats.forgets_missed == 0
    finally:
        hold.release()
    assert rows_of(await read) in ([], [[_int(keys[8]), b"w"]])
    for frame in await asyncio.gather(*flood):
        assert rows_of(frame) == []
    for c in (*flooders, victim):
        await c.close()


async def test_a_client_filling_a_members_connection_slots_cannot_make_a_read_stale(
    ring_stack: MakeRing,
) -> None:
    """A client that takes every connection slot of the owner keeps the writing member
    from logging in there (the owner answers OVERLOADED), while another member's
    connection, opened before, still forwards reads to it: the owner missed the forget.
    It is counted (``forgets_missed``), and the members that confirmed it are told to
    send the owner no read for ``request_timeout``: a read after the write, through any
    of them, does not join the owner's flight that started before the write. (The same
    for any partial partition: the writer cannot reach the owner, the others can.)"""
    ring = await ring_stack(3, max_connections=8)
    owner = ring.sidecars[2]
    key = _key_owned_by(ring, _name(owner))
    a_peers = ring.sidecars[0]._require_proxy().peers
    assert a_peers is not None
    for pool in list(a_peers._pools.values()):  # the setup's forgets opened them
        pool.close()
    a_peers._pools.clear()
    writer, reader = await ring.client(0), await ring.client(1)
    write_id = (await writer.prepare(WRITE)).query_id
    read_id = (await reader.prepare(READ)).query_id
    result_of(await reader.send_execute((await reader.prepare(WRITE)).query_id,
                                        [_int(key), b"old"]))
    hold = ring.emulator.hold_reads()
    squatters: list[asyncio.StreamWriter] = []
    try:
        stale = reader.send_execute(read_id, [_int(key)])  # B forwards it to C: held there
        await eventually(lambda: len(hold) == 1)
        hold.close()
        while len(owner._clients) < 8:  # the attacker takes every slot left at the owner
            squatters.append((await asyncio.open_connection("127.0.0.1", owner.port))[1])
            await eventually(lambda: len(owner._clients) >= len(squatters))
        result_of(await asyncio.wait_for(writer.send_execute(write_id, [_int(key), b"new"]),
                                         BOUND))
        assert ring.sidecars[0].stats.forgets_missed == 1
        fresh = await asyncio.wait_for(reader.send_execute(read_id, [_int(key)]), 2.0)
        assert rows_of(fresh) == [[_int(key), b"new"]]
    finally:
        hold.release()
        for squatter in squatters:
            squatter.close()
    assert rows_of(await stale) == [[_int(key), b"old"]]
    await writer.close()
    await reader.close()


# -- ring views that disagree -------------------------------------------------------------


async def test_members_whose_views_disagree_never_send_a_read_in_circles(
    ring_stack: MakeRing,
) -> None:
    """A thinks C owns the key; C has left its own view (its etcd lease lapsed) and
    thinks A or B does; B's view has a member nobody runs. Every read is answered after
    at most one hop, with one upstream read each."""
    ring = await ring_stack(3, reconnect_delay=5.0, reconnect_max_delay=10.0)
    a, b, c = ring.sidecars
    key = _key_owned_by(ring, _name(c))
    c.ring_changed((_name(a), _name(b)))
    b.ring_changed((_name(a), _name(b), _name(c), "127.0.0.1:1"))
    clients = [await ring.client(i) for i in range(3)]
    ids = [(await cl.prepare(READ)).query_id for cl in clients]
    for cl, read_id in zip(clients, ids, strict=True):
        for _ in range(2):  # the first one teaches the statement to whoever serves it
            before = ring.emulator.statements["select"]
            frame = await asyncio.wait_for(cl.send_execute(read_id, [_int(key)]), BOUND)
            assert rows_of(frame) == []
            assert ring.emulator.statements["select"] - before == 1
    served = sum(s.stats.ring_served for s in ring.sidecars)
    forwarded = sum(s.stats.ring_forwarded for s in ring.sidecars)
    assert served <= 2 * forwarded  # each forward served once (twice when unprepared)
    assert all(s.stats.ring_forwarded <= 2 for s in ring.sidecars)
    for cl in clients:
        await cl.close()


# -- forget storms ---------------------------------------------------------------------------


async def test_a_forget_storm_only_does_what_failed_writes_already_do(
    ring_stack: MakeRing,
) -> None:
    """Quantified: a client with no permission at all, sending forgets that forget every
    read (an unknown ``kind``), makes each honest read that arrives after one start a
    flight of its own, for everybody on that member, and costs Scylla nothing itself.
    The same client gets the same effect on every member from an INSERT that Scylla
    refuses (a failed write may have been applied, so it forgets too), at one Scylla
    request each. Neither lasts: once the storm stops, herds merge again."""
    ring = await ring_stack(2, **AUTH)
    key = _key_owned_by(ring, _name(ring.sidecars[0]))
    honest = await ring.client(0, credentials=("alice", "alice-pw"))
    storm = await ring.client(0, credentials=("mallory", "mallory-pw"))
    read_id = (await honest.prepare(READ)).query_id
    forget_all = _forget_body({"kind": "other", "keyspace": None, "table": None, "tables": [],
                               "session_keyspace": None, "partition": None})
    refused = Query(f"INSERT INTO ks.kv (k, v) VALUES ({key}, 'x')",
                    QueryParameters(Consistency.ONE)).encode()

    async def herd(between: Any) -> int:
        """Upstream reads for 20 honest reads with `between` sent between each two."""
        hold = ring.emulator.hold_reads()
        before = ring.emulator.statements["select"]
        reads = []
        for i in range(20):
            reads.append(honest.send_execute(read_id, [_int(key)]))
            await eventually(lambda n=i: len(hold) >= 1 and ring.sidecars[0].stats.merged  # type: ignore[misc]
                             >= merged_before + n + 1)
            if between is not None:
                await between()
        hold.release()
        for frame in await asyncio.wait_for(asyncio.gather(*reads), BOUND):
            assert rows_of(frame) == []
        return int(ring.emulator.statements["select"] - before)

    async def forget() -> None:
        result_of(await storm.request(Opcode.QUERY, forget_all, flags=CUSTOM_PAYLOAD))

    async def failed_write() -> None:
        assert _outcome(await storm.request(Opcode.QUERY, refused)) == (
            "error", ErrorCode.UNAUTHORIZED)

    merged_before = ring.sidecars[0].stats.merged
    assert await herd(None) == 1
    writes_before = ring.emulator.statements["insert"]
    merged_before = ring.sidecars[0].stats.merged
    assert await herd(forget) == 20  # each forget: one more upstream read, no more
    assert ring.emulator.statements["insert"] == writes_before  # forgets cost Scylla nothing
    merged_before = ring.sidecars[0].stats.merged
    assert await herd(failed_write) == 20  # a refused write: the same, on every member
    merged_before = ring.sidecars[0].stats.merged
    assert await herd(None) == 1
    started = time.monotonic()
    for _ in range(2000):
        storm.send(Opcode.QUERY, forget_all, flags=CUSTOM_PAYLOAD)
    result_of(await storm.request(Opcode.QUERY, forget_all, flags=CUSTOM_PAYLOAD))
    rate = 2000 / (time.monotonic() - started)
    print(f"forgets answered: {rate:,.0f}/s")
    await honest.close()
    await storm.close()


# -- events ------------------------------------------------------------------------------


async def test_event_registrations_cost_nothing_shared_and_odd_ones_are_refused(
    ring_stack: MakeRing,
) -> None:
    """REGISTER for every type, for unknown types, many times over, and a listener that
    never reads its events while the ring changes: the other listener hears each change."""
    ring = await ring_stack(2)
    hostile = await ring.client(0)
    names = tuple(_name(s) for s in ring.sidecars)
    for _ in range(50):
        reply = await hostile.request(Opcode.REGISTER, Register(
            ["TOPOLOGY_CHANGE", "STATUS_CHANGE", "SCHEMA_CHANGE"] * 20).encode())
        assert reply.opcode == Opcode.READY
    odd = await hostile.request(Opcode.REGISTER, Register(["NOT_AN_EVENT"]).encode())
    assert odd.opcode in (Opcode.READY, Opcode.ERROR)
    deaf = await ring.client(0)
    result_of_ready = await deaf.request(Opcode.REGISTER, Register(["TOPOLOGY_CHANGE"]).encode())
    assert result_of_ready.opcode == Opcode.READY
    deaf._reader_task.cancel()  # reads nothing more
    listener = await ring.client(0)
    await listener.request(Opcode.REGISTER, Register(["TOPOLOGY_CHANGE"]).encode())
    for i in range(200):
        ring.sidecars[0].ring_changed((*names, f"127.0.0.{2 + i % 50}:9042"))
        ring.sidecars[0].ring_changed(names)
    for _ in range(400):
        await asyncio.wait_for(listener.events.get(), BOUND)
    assert len(ring.sidecars[0]._require_proxy().listeners) <= 3
    for c in (hostile, listener):
        await c.close()
    deaf.writer.close()
