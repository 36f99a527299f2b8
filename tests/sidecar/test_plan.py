"""`plan`: one request in, one decision out, for every kind of request a driver sends."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from coalesce.cql import (
    CUSTOM_PAYLOAD,
    TRACING,
    Batch,
    BatchStatement,
    ColumnSpec,
    Consistency,
    Execute,
    Opcode,
    Prepare,
    Query,
    QueryParameters,
    parse_type,
)
from coalesce.cql.classify import classify
from coalesce.cql.request import Request
from coalesce.sidecar.plan import Forward, Merge, Unprepared, Use, plan, routing_key
from coalesce.sidecar.statements import KnownStatement, StatementCache

ROLE, KEYSPACE = "alice", "chat"
ONE = QueryParameters(Consistency.ONE, [b"\x00\x00\x00\x07"], timestamp=1_700_000_000)
SERIAL = QueryParameters(Consistency.SERIAL, [b"\x00\x00\x00\x07"])


def _statement(query_id: bytes, text: str, keyspace: str | None = KEYSPACE,
               pk: tuple[int, ...] = (0,)) -> KnownStatement:
    columns = (ColumnSpec("chat", "messages", "body", parse_type("text")),)
    return KnownStatement(query_id, text, keyspace, classify(text), pk, columns)


STATEMENTS = {
    b"sel": _statement(b"sel", "SELECT * FROM messages WHERE channel = ?"),
    b"ins": _statement(b"ins", "INSERT INTO messages (channel, body) VALUES (?, ?)"),
    b"lwt": _statement(b"lwt", "UPDATE messages SET body = ? WHERE channel = ? IF EXISTS"),
    b"now": _statement(b"now", "SELECT now() FROM messages WHERE channel = ?"),
    b"loc": _statement(b"loc", "SELECT * FROM system.local", pk=()),
    b"use": _statement(b"use", "USE other", pk=()),
}


def _cache() -> StatementCache:
    cache = StatementCache()
    for query_id, statement in STATEMENTS.items():
        cache.by_id[query_id] = statement
    return cache


def _query(text: str, params: QueryParameters = ONE, flags: int = 0) -> Request:
    body = Query(text, params).encode()
    if flags & CUSTOM_PAYLOAD:
        body = b"\x00\x01\x00\x01k\x00\x00\x00\x01v" + body
    return Request(1, Opcode.QUERY, flags, body)


def _execute(query_id: bytes, params: QueryParameters = ONE, flags: int = 0) -> Request:
    return Request(1, Opcode.EXECUTE, flags, Execute(query_id, params).encode())


@dataclass
class Case:
    request: Request
    expect: type
    writes: str | None = None  # the kind a Forward makes stale, None for reads
    table: tuple[str | None, str | None] | None = None  # a Merge's table


CASES = {
    "plain SELECT query": Case(_query("SELECT * FROM messages WHERE channel = ?"), Merge,
                               table=(KEYSPACE, "messages")),
    "qualified SELECT query": Case(_query("SELECT * FROM ks2.messages"), Merge,
                                   table=("ks2", "messages")),
    "prepared plain SELECT": Case(_execute(b"sel"), Merge, table=(KEYSPACE, "messages")),
    "SELECT now()": Case(_query("SELECT now() FROM messages"), Forward),
    "prepared SELECT now()": Case(_execute(b"now"), Forward),
    "SELECT at SERIAL": Case(_query("SELECT * FROM messages", SERIAL), Forward),
    "prepared SELECT at SERIAL": Case(_execute(b"sel", SERIAL), Forward),
    "traced SELECT": Case(_query("SELECT * FROM messages", flags=TRACING), Forward),
    "traced prepared SELECT": Case(_execute(b"sel", flags=TRACING), Forward),
    "SELECT with a custom payload": Case(
        _query("SELECT * FROM messages", flags=CUSTOM_PAYLOAD), Forward),
    "system.local read": Case(_query("SELECT * FROM system.local"), Forward),
    "prepared system.local read": Case(_execute(b"loc"), Forward),
    "system.peers read": Case(_query("SELECT * FROM system.peers"), Forward),
    "INSERT query": Case(_query("INSERT INTO messages (channel) VALUES (1)"), Forward,
                         writes="insert"),
    "prepared INSERT": Case(_execute(b"ins"), Forward, writes="insert"),
    "LWT": Case(_execute(b"lwt"), Forward, writes="update"),
    "TRUNCATE": Case(_query("TRUNCATE messages"), Forward, writes="ddl"),
    "GRANT": Case(_query("GRANT SELECT ON chat.messages TO bob"), Forward, writes="other"),
    "BATCH": Case(Request(1, Opcode.BATCH, 0, Batch(0, [
        BatchStatement(False, "INSERT INTO messages (channel) VALUES (1)"),
        BatchStatement(True, b"ins", [b"\x00\x00\x00\x01", b"x"])], 1).encode()),
        Forward, writes="batch"),
    "unknown prepared id": Case(_execute(b"nobody-prepared-this"), Unprepared),
    "BATCH with an unknown id": Case(Request(1, Opcode.BATCH, 0, Batch(0, [
        BatchStatement(True, b"nobody-prepared-this", [])], 1).encode()), Unprepared),
    "USE": Case(_query("USE other"), Use),
    "traced USE": Case(_query("USE other", flags=TRACING), Use),
    "USE with a custom payload": Case(_query("USE other", flags=CUSTOM_PAYLOAD), Use),
    "prepared USE": Case(_execute(b"use"), Use),
    "PREPARE": Case(Request(1, Opcode.PREPARE, 0, Prepare("SELECT 1").encode()), Forward),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_every_request_gets_the_plan_its_kind_calls_for(name: str) -> None:
    case = CASES[name]
    p = plan(case.request, ROLE, KEYSPACE, _cache())
    assert type(p) is case.expect
    if isinstance(p, Forward):
        assert (p.writes.kind if p.writes is not None else None) == case.writes
    if isinstance(p, Merge):
        assert p.table == case.table


def test_a_batch_forgets_the_tables_it_writes_resolved_in_the_right_keyspace() -> None:
    p = plan(CASES["BATCH"].request, ROLE, KEYSPACE, _cache())
    assert isinstance(p, Forward) and p.writes is not None
    assert p.writes.tables == ((KEYSPACE, "messages"),)
    unclear = Request(1, Opcode.BATCH, 0, Batch(0, [
        BatchStatement(False, "INSERT INTO messages (channel) VALUES (1)"),
        BatchStatement(False, "BEGIN SOMETHING ODD")], 1).encode())
    p = plan(unclear, ROLE, KEYSPACE, _cache())
    assert isinstance(p, Forward) and p.writes is not None and p.writes.tables == ()


def test_system_tables_are_rewritten_and_use_names_its_keyspace() -> None:
    local = plan(CASES["system.local read"].request, ROLE, KEYSPACE, _cache())
    assert isinstance(local, Forward) and local.rewrite == "local"
    peers = plan(CASES["system.peers read"].request, ROLE, KEYSPACE, _cache())
    assert isinstance(peers, Forward) and peers.rewrite == "peers"
    use = plan(CASES["prepared USE"].request, ROLE, KEYSPACE, _cache())
    assert isinstance(use, Use) and use.keyspace == "other"


def _key(request: Request, role: str = ROLE, keyspace: str | None = KEYSPACE) -> object:
    p = plan(request, role, keyspace, _cache())
    assert isinstance(p, Merge)
    return p.key


def test_merge_keys_ignore_only_the_client_timestamp() -> None:
    text = "SELECT * FROM messages WHERE channel = ?"
    stamped = QueryParameters(Consistency.ONE, [b"\x00\x00\x00\x07"], timestamp=1)
    restamped = QueryParameters(Consistency.ONE, [b"\x00\x00\x00\x07"], timestamp=2)
    unstamped = QueryParameters(Consistency.ONE, [b"\x00\x00\x00\x07"])
    assert _key(_query(text, stamped)) == _key(_query(text, restamped))
    assert _key(_query(text, stamped)) == _key(_query(text, unstamped))
    assert _key(_execute(b"sel", stamped)) == _key(_execute(b"sel", unstamped))
    differing = [
        QueryParameters(Consistency.ONE, [b"\x00\x00\x00\x08"]),
        QueryParameters(Consistency.QUORUM, [b"\x00\x00\x00\x07"]),
        QueryParameters(Consistency.ONE, [b"\x00\x00\x00\x07"], page_size=10),
        QueryParameters(Consistency.ONE, [b"\x00\x00\x00\x07"], paging_state=b"p"),
    ]
    keys = {_key(_execute(b"sel", params)) for params in [unstamped, *differing]}
    assert len(keys) == 1 + len(differing)


def test_merge_keys_hold_the_role_and_the_connection_keyspace() -> None:
    request = _query("SELECT * FROM messages")
    assert _key(request) != _key(request, role="bob")
    assert _key(request) != _key(request, keyspace="other")
    assert _key(request) != _key(_execute(b"sel"))


def test_routing_keys_match_the_drivers_layout() -> None:
    assert routing_key([b"\x00\x00\x00\x07", b"v"], (0,)) == b"\x00\x00\x00\x07"
    assert routing_key([b"ab", b"x", b"c"], (0, 2)) == b"\x00\x02ab\x00" + b"\x00\x01c\x00"
    assert routing_key([None, b"x"], (0,)) is None
    assert routing_key([b"x"], (3,)) is None
    assert routing_key([b"x"], ()) is None
