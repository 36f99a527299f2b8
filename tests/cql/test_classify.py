"""Statement classification: what may be coalesced, and what a write touches."""

from __future__ import annotations

import pytest

from coalesce.cql.classify import classify


@pytest.mark.parametrize(
    "query, keyspace, table",
    [
        ("SELECT * FROM messages WHERE channel_id = ?", None, "messages"),
        ("select content from chat.messages where channel_id=1", "chat", "messages"),
        ('SELECT "Body" FROM "Chat"."Messages" WHERE k = 1', "Chat", "Messages"),
        ("SELECT count(*) FROM ks.t WHERE k = 'from x'", "ks", "t"),
        ("SELECT writetime(v), token(k) FROM ks.t WHERE k = 1", "ks", "t"),
        ("/* hi */ SELECT * -- comment\n FROM t WHERE k = 1", None, "t"),
    ],
)
def test_plain_selects_are_coalescable(query, keyspace, table):
    info = classify(query)
    assert info.coalescable and not info.is_write
    assert (info.keyspace, info.table) == (keyspace, table)


@pytest.mark.parametrize(
    "query",
    [
        "SELECT now() FROM system.local",
        "SELECT * FROM t WHERE id = uuid()",
        "SELECT currentTimestamp() FROM ks.t WHERE k = 1",
        "SELECT toTimestamp(now()) FROM ks.t WHERE k = 1",
    ],
)
def test_selects_calling_volatile_functions_are_not(query):
    assert not classify(query).coalescable


def test_a_column_named_like_a_function_is_not_a_call():
    assert classify("SELECT now FROM ks.t WHERE k = 1").coalescable


@pytest.mark.parametrize(
    "query, kind, table, conditional",
    [
        ("INSERT INTO ks.t (k, v) VALUES (1, 'if')", "insert", "t", False),
        ("INSERT INTO t (k) VALUES (?) IF NOT EXISTS", "insert", "t", True),
        ("UPDATE ks.t USING TTL 5 SET v = 1 WHERE k = 1", "update", "t", False),
        ("UPDATE t SET v = 2 WHERE k = 1 IF v = 1", "update", "t", True),
        ("DELETE FROM ks.t WHERE k = 1 IF EXISTS", "delete", "t", True),
        ("DELETE v FROM t WHERE k = 1", "delete", "t", False),
        ("TRUNCATE ks.t", "ddl", "t", False),
        ("DROP TABLE IF EXISTS ks.t", "ddl", "t", False),
    ],
)
def test_writes_name_their_table_and_condition(query, kind, table, conditional):
    info = classify(query)
    assert (info.kind, info.table, info.conditional) == (kind, table, conditional)
    assert info.is_write and not info.coalescable


def test_batches_list_every_table_they_write():
    info = classify(
        "BEGIN UNLOGGED BATCH INSERT INTO a.x (k) VALUES (1); UPDATE y SET v = 1 WHERE k = 1;"
        " DELETE FROM a.z WHERE k = 2; APPLY BATCH"
    )
    assert info.kind == "batch" and info.is_write
    assert info.tables == (("a", "x"), (None, "y"), ("a", "z"))


def test_use_and_unknown_statements():
    assert classify('USE "Chat"').keyspace == "Chat"
    assert classify("GRANT SELECT ON ks.t TO bob").kind == "other"
    assert classify("").kind == "other"
