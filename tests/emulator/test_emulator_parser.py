"""The CQL subset parser: what it accepts, what it builds, and how it refuses."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coalesce.emulator.errors import CqlSyntaxError, InvalidRequest
from coalesce.emulator.lexer import TokenKind, tokenize
from coalesce.emulator.parser import parse
from coalesce.emulator.statements import (
    Batch,
    BindMarker,
    Constant,
    CreateKeyspace,
    CreateRole,
    CreateTable,
    Delete,
    Grant,
    InList,
    Insert,
    MapLiteral,
    Select,
    SetLiteral,
    TupleLiteral,
    Update,
)
from tests.conftest import examples


def test_keywords_are_case_insensitive_and_identifiers_lowercased() -> None:
    statement = parse("SeLeCt Content FROM Ks.Messages WHERE Channel_Id = 1")
    assert isinstance(statement, Select)
    assert statement.table.keyspace == "ks"
    assert statement.table.name == "messages"
    assert statement.selectors[0].column == "content"
    assert statement.where[0].column == "channel_id"


def test_quoted_identifiers_keep_case_and_escapes() -> None:
    statement = parse('SELECT "MixedCase", "a""b" FROM "Ks"."T"')
    assert isinstance(statement, Select)
    assert [s.column for s in statement.selectors] == ["MixedCase", 'a"b']
    assert statement.table.keyspace == "Ks"


def test_literals_of_every_kind_tokenize() -> None:
    kinds = [
        t.kind
        for t in tokenize(
            "'it''s' $$raw$$ 42 -1.5e3 0xCAFE 123e4567-e89b-12d3-a456-426614174000 true null ?"
        )
    ]
    assert kinds == [
        TokenKind.STRING,
        TokenKind.STRING,
        TokenKind.INTEGER,
        TokenKind.PUNCT,
        TokenKind.FLOAT,
        TokenKind.BLOB,
        TokenKind.UUID,
        TokenKind.IDENT,
        TokenKind.IDENT,
        TokenKind.PUNCT,
        TokenKind.EOF,
    ]
    assert tokenize("'it''s'")[0].text == "it's"


def test_comments_are_skipped() -> None:
    statement = parse("SELECT /* all */ * FROM t -- trailing\n WHERE k = 1 // more")
    assert isinstance(statement, Select)
    assert statement.where[0].column == "k"


def test_create_table_with_composite_partition_key_and_clustering_order() -> None:
    statement = parse(
        "CREATE TABLE IF NOT EXISTS ks.messages (channel_id bigint, bucket int, message_id bigint,"
        " author_id bigint, content text, PRIMARY KEY ((channel_id, bucket), message_id))"
        " WITH CLUSTERING ORDER BY (message_id DESC) AND comment = 'x'"
        " AND compaction = {'class': 'LeveledCompactionStrategy'}"
    )
    assert isinstance(statement, CreateTable)
    assert statement.if_not_exists
    assert statement.partition_key == ("channel_id", "bucket")
    assert statement.clustering_key == ("message_id",)
    assert statement.clustering_order == {"message_id": "DESC"}
    assert statement.options["comment"] == "x"


def test_inline_primary_key_and_nested_collection_types() -> None:
    statement = parse(
        "create table t (k int primary key, m map<text, frozen<list<int>>>, s set<text>, "
        "tu tuple<int,text>)"
    )
    assert isinstance(statement, CreateTable)
    assert statement.partition_key == ("k",)
    assert [c[1] for c in statement.columns] == [
        "int",
        "map<text, frozen<list<int>>>",
        "set<text>",
        "tuple<int, text>",
    ]


def test_create_keyspace_reads_replication_and_durable_writes() -> None:
    statement = parse(
        "CREATE KEYSPACE IF NOT EXISTS ks WITH replication = "
        "{'class': 'SimpleStrategy', 'replication_factor': 1} AND durable_writes = false"
    )
    assert isinstance(statement, CreateKeyspace)
    assert statement.replication == {"class": "SimpleStrategy", "replication_factor": "1"}
    assert statement.durable_writes is False


def test_bind_markers_are_numbered_in_text_order_across_a_batch() -> None:
    statement = parse(
        "BEGIN UNLOGGED BATCH INSERT INTO t (a, b) VALUES (?, :named); "
        "UPDATE t SET b = ? WHERE a = ? APPLY BATCH"
    )
    assert isinstance(statement, Batch)
    assert statement.kind == "unlogged"
    insert, update = statement.statements
    assert isinstance(insert, Insert) and isinstance(update, Update)
    assert insert.values == (BindMarker(0), BindMarker(1, "named"))
    assert update.assignments[0].value == BindMarker(2)
    assert update.where[0].value == BindMarker(3)


def test_update_assignment_forms() -> None:
    statement = parse(
        "UPDATE t USING TTL 10 SET c = c + 1, l = [1] + l, s = s - {'x'}, m['k'] = 2 "
        "WHERE a = 1 IF b = 3 AND d IN (1, 2)"
    )
    assert isinstance(statement, Update)
    assert [a.kind for a in statement.assignments] == ["add", "prepend", "remove", "set_element"]
    assert isinstance(statement.assignments[2].value, SetLiteral)
    assert [c.column for c in statement.conditions] == ["b", "d"]
    assert isinstance(statement.conditions[1].value, InList)


def test_delete_and_select_clauses() -> None:
    delete = parse("DELETE m['k'], x FROM t WHERE a IN ? AND b >= -3 IF EXISTS")
    assert isinstance(delete, Delete)
    assert delete.if_exists
    assert delete.where[0].value == BindMarker(0)
    assert delete.where[1].value == Constant("integer", "-3")
    select = parse(
        "SELECT DISTINCT a, COUNT(*) AS n FROM t WHERE a = 1 ORDER BY b DESC "
        "PER PARTITION LIMIT 2 LIMIT ? ALLOW FILTERING;"
    )
    assert isinstance(select, Select)
    assert select.distinct and select.allow_filtering
    assert select.order_by == (("b", "DESC"),)
    assert select.selectors[1].kind == "count" and select.selectors[1].alias == "n"
    assert select.limit == BindMarker(0)


def test_collection_and_tuple_literals() -> None:
    statement = parse("INSERT INTO t (a, b, c, d) VALUES ({}, {1: 'x'}, (1, 'y'), [])")
    assert isinstance(statement, Insert)
    assert statement.values[0] == MapLiteral(())
    assert isinstance(statement.values[1], MapLiteral)
    assert isinstance(statement.values[2], TupleLiteral)


def test_roles_and_grants() -> None:
    role = parse("CREATE ROLE IF NOT EXISTS bob WITH PASSWORD = 'pw' AND LOGIN = true")
    assert role == CreateRole("bob", True, "pw", True, None)
    grant = parse("GRANT SELECT ON TABLE ks.t TO bob")
    assert grant == Grant("select", ("table", "ks", "t"), "bob", False)
    revoke = parse("REVOKE ALL PERMISSIONS ON KEYSPACE ks FROM bob")
    assert revoke == Grant("all", ("keyspace", "ks"), "bob", True)


@pytest.mark.parametrize(
    ("text", "without"),
    [
        # What scylla-driver sends once a node advertises Scylla's sharding.
        (
            "SELECT * FROM system.local WHERE key='local' USING TIMEOUT 2000ms",
            "SELECT * FROM system.local WHERE key='local'",
        ),
        (
            "SELECT * FROM t WHERE k = 1 LIMIT 5 ALLOW FILTERING BYPASS CACHE USING TIMEOUT 1h30m",
            "SELECT * FROM t WHERE k = 1 LIMIT 5 ALLOW FILTERING",
        ),
        ("SELECT * FROM t BYPASS CACHE", "SELECT * FROM t"),
        (
            "INSERT INTO t (k) VALUES (1) USING TTL 5 AND TIMEOUT 10s",
            "INSERT INTO t (k) VALUES (1) USING TTL 5",
        ),
        (
            "UPDATE t USING TIMEOUT 500us SET v = 1 WHERE k = 1",
            "UPDATE t SET v = 1 WHERE k = 1",
        ),
        ("DELETE FROM t USING TIMEOUT 1S WHERE k = 1", "DELETE FROM t WHERE k = 1"),
        (
            "BEGIN BATCH USING TIMEOUT 2ms INSERT INTO t (k) VALUES (1) APPLY BATCH",
            "BEGIN BATCH INSERT INTO t (k) VALUES (1) APPLY BATCH",
        ),
    ],
)
def test_scyllas_using_timeout_and_bypass_cache_are_accepted_and_ignored(
    text: str, without: str
) -> None:
    assert parse(text) == parse(without)


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("SELECT * FROM t USING TIMEOUT 5", CqlSyntaxError),
        ("SELECT * FROM t USING TTL 5", CqlSyntaxError),
        ("SELECT * FROM t USING TIMEOUT ?", InvalidRequest),
    ],
)
def test_using_timeout_wants_a_duration_literal(text: str, error: type[Exception]) -> None:
    with pytest.raises(error):
        parse(text)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("SELEC * FROM t", "line 1:0 no viable alternative at input 'SELEC'"),
        ("SELECT * FROM", "line 1:13 mismatched input '<EOF>' expecting an identifier"),
        ("SELECT * FROM t WHERE", "mismatched input '<EOF>'"),
        ("INSERT INTO t (a) VALUES ('unterminated)", "unterminated"),
        ("SELECT * FROM t extra", "no viable alternative at input 'extra'"),
    ],
)
def test_unparsable_text_is_a_syntax_error_with_position(text: str, message: str) -> None:
    with pytest.raises(CqlSyntaxError) as info:
        parse(text)
    assert message in info.value.message
    assert info.value.code == 0x2000


@pytest.mark.parametrize(
    "text",
    [
        "CREATE INDEX ON t (x)",
        "ALTER TABLE t ADD x int",
        "SELECT * FROM t WHERE token(k) > 0",
        "SELECT * FROM t WHERE (a, b) > (1, 2)",
        "INSERT INTO t JSON '{}'",
        "INSERT INTO t (a, b) VALUES (1)",
    ],
)
def test_known_but_unsupported_cql_is_invalid_not_a_syntax_error(text: str) -> None:
    with pytest.raises(InvalidRequest):
        parse(text)


@settings(max_examples=examples(300), deadline=None)
@given(st.text(max_size=80))
def test_parse_never_fails_with_anything_but_a_cql_error(text: str) -> None:
    with contextlib.suppress(CqlSyntaxError, InvalidRequest):
        parse(text)


_FRAGMENTS = st.sampled_from(
    [
        "SELECT",
        "*",
        "FROM",
        "t",
        "ks.t",
        "WHERE",
        "a",
        "=",
        "?",
        "IN",
        "(",
        ")",
        ",",
        "1",
        "'x'",
        "AND",
        "LIMIT",
        "INSERT",
        "INTO",
        "VALUES",
        "UPDATE",
        "SET",
        "DELETE",
        "IF",
        "EXISTS",
        "BEGIN",
        "BATCH",
        "APPLY",
        "{",
        "}",
        "[",
        "]",
        ":",
        "<",
        ">",
        "+",
        "-",
        ";",
        "CREATE",
        "TABLE",
        "PRIMARY",
        "KEY",
        "int",
        "list",
        "ORDER",
        "BY",
        "DESC",
    ]
)


@settings(max_examples=examples(300), deadline=None)
@given(st.lists(_FRAGMENTS, max_size=25))
def test_parse_of_keyword_soup_never_fails_with_anything_but_a_cql_error(
    words: list[str],
) -> None:
    with contextlib.suppress(CqlSyntaxError, InvalidRequest):
        parse(" ".join(words))
