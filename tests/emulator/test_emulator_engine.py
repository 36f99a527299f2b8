"""The in-memory engine (executor, storage, system tables) without any networking."""

from __future__ import annotations

import struct
from typing import Any

import pytest
from cassandra.metadata import Murmur3Token
from hypothesis import given, settings
from hypothesis import strategies as st

from coalesce.cql.results import ResultRows, ResultSchemaChange, ResultVoid
from coalesce.cql.types import parse_type
from coalesce.emulator.auth import Roles
from coalesce.emulator.errors import (
    AlreadyExists,
    CqlRequestError,
    InvalidRequest,
    Unauthorized,
    Unprepared,
)
from coalesce.emulator.executor import (
    ExecutionOptions,
    Executor,
    Outcome,
    Session,
    prepared_id,
)
from coalesce.emulator.schema import Schema, TableDef
from coalesce.emulator.storage import Storage, routing_key, token_of
from coalesce.emulator.system_tables import NodeInfo, SystemTables
from tests.conftest import examples

MESSAGES = (
    "CREATE TABLE messages (channel_id bigint, bucket int, message_id bigint, author_id bigint, "
    "content text, PRIMARY KEY ((channel_id, bucket), message_id)) "
    "WITH CLUSTERING ORDER BY (message_id DESC)"
)


class Engine:
    """An executor plus a session, returning decoded rows."""

    def __init__(self, *, auth: bool = False) -> None:
        schema, storage = Schema(), Storage()
        self.schema = schema
        self.roles = Roles() if auth else None
        self.executor = Executor(
            schema, storage, SystemTables(schema, storage, NodeInfo()), self.roles
        )
        self.session = Session()

    def run(
        self, text: str, *, page_size: int | None = None, paging_state: bytes | None = None
    ) -> Outcome:
        return self.executor.execute_query(
            text, None, None, self.session, ExecutionOptions(page_size, paging_state)
        )

    def rows(self, text: str) -> list[list[Any]]:
        return decode(self.run(text))

    def setup_messages(self, count: int = 0) -> None:
        self.run(
            "CREATE KEYSPACE ks WITH replication = "
            "{'class': 'SimpleStrategy', 'replication_factor': 1}"
        )
        self.run("USE ks")
        self.run(MESSAGES)
        for i in range(count):
            self.run(
                "INSERT INTO messages (channel_id, bucket, message_id, author_id, content) "
                f"VALUES (1, 0, {i}, 7, 'm{i}')"
            )


def decode(outcome: Outcome) -> list[list[Any]]:
    result = outcome.result
    assert isinstance(result, ResultRows)
    columns = result.metadata.columns
    return [
        [
            None if c is None else spec.type.deserialize(c)
            for spec, c in zip(columns, row, strict=True)
        ]
        for row in result.rows
    ]


@pytest.fixture
def engine() -> Engine:
    e = Engine()
    e.setup_messages(10)
    return e


def test_rows_come_back_in_descending_clustering_order(engine: Engine) -> None:
    ids = engine.rows("SELECT message_id FROM messages WHERE channel_id = 1 AND bucket = 0")
    assert [r[0] for r in ids] == list(range(9, -1, -1))


def test_order_by_reverses_the_clustering_order(engine: Engine) -> None:
    rows = engine.rows(
        "SELECT message_id FROM messages WHERE channel_id = 1 AND bucket = 0 "
        "ORDER BY message_id ASC LIMIT 3"
    )
    assert rows == [[0], [1], [2]]


@pytest.mark.parametrize(
    ("where", "expected"),
    [
        ("message_id > 6", [9, 8, 7]),
        ("message_id >= 6", [9, 8, 7, 6]),
        ("message_id < 2", [1, 0]),
        ("message_id <= 2", [2, 1, 0]),
        ("message_id > 2 AND message_id <= 5", [5, 4, 3]),
        ("message_id = 4", [4]),
        ("message_id IN (8, 1, 100)", [8, 1]),
    ],
)
def test_clustering_restrictions_select_a_slice(
    engine: Engine, where: str, expected: list[int]
) -> None:
    rows = engine.rows(
        f"SELECT message_id FROM messages WHERE channel_id = 1 AND bucket = 0 AND {where}"
    )
    assert [r[0] for r in rows] == expected


def test_in_on_the_partition_key_reads_several_partitions(engine: Engine) -> None:
    engine.run("INSERT INTO messages (channel_id, bucket, message_id) VALUES (1, 1, 100)")
    rows = engine.rows(
        "SELECT bucket, message_id FROM messages WHERE channel_id = 1 "
        "AND bucket IN (0, 1) AND message_id >= 9"
    )
    assert sorted(map(tuple, rows)) == [(0, 9), (1, 100)]


def test_missing_partition_returns_no_rows_but_counts_the_read(engine: Engine) -> None:
    outcome = engine.run("SELECT * FROM messages WHERE channel_id = 5 AND bucket = 5")
    assert decode(outcome) == []
    key = routing_key(engine.schema.table("ks", "messages").partition_key, (5, 5))
    assert outcome.reads == [(token_of(key), 0)]


def test_paging_resumes_after_the_last_row_even_if_rows_are_added_between_pages(
    engine: Engine,
) -> None:
    query = "SELECT message_id FROM messages WHERE channel_id = 1 AND bucket = 0"
    first = engine.run(query, page_size=4)
    assert [r[0] for r in decode(first)] == [9, 8, 7, 6]
    assert isinstance(first.result, ResultRows)
    state = first.result.metadata.paging_state
    assert state is not None
    engine.run("INSERT INTO messages (channel_id, bucket, message_id) VALUES (1, 0, 100)")
    second = engine.run(query, page_size=4, paging_state=state)
    assert [r[0] for r in decode(second)] == [5, 4, 3, 2]
    assert isinstance(second.result, ResultRows)
    third = engine.run(query, page_size=4, paging_state=second.result.metadata.paging_state)
    assert [r[0] for r in decode(third)] == [1, 0]
    assert isinstance(third.result, ResultRows)
    assert third.result.metadata.paging_state is None


def test_paging_honours_limit_across_pages(engine: Engine) -> None:
    query = "SELECT message_id FROM messages WHERE channel_id = 1 AND bucket = 0 LIMIT 5"
    first = engine.run(query, page_size=3)
    assert isinstance(first.result, ResultRows)
    second = engine.run(query, page_size=3, paging_state=first.result.metadata.paging_state)
    assert [r[0] for r in decode(first) + decode(second)] == [9, 8, 7, 6, 5]
    assert isinstance(second.result, ResultRows)
    assert second.result.metadata.paging_state is None


def test_full_scan_pages_through_every_partition_in_token_order(engine: Engine) -> None:
    for bucket in range(1, 30):
        engine.run(f"INSERT INTO messages (channel_id, bucket, message_id) VALUES (2, {bucket}, 1)")
    seen: list[tuple[Any, ...]] = []
    state: bytes | None = None
    while True:
        outcome = engine.run(
            "SELECT channel_id, bucket, message_id FROM messages", page_size=7, paging_state=state
        )
        seen.extend(tuple(r) for r in decode(outcome))
        assert isinstance(outcome.result, ResultRows)
        state = outcome.result.metadata.paging_state
        if state is None:
            break
    assert len(seen) == len(set(seen)) == 39
    assert outcome.scan


@pytest.mark.parametrize("state", [b"", b"garbage", b"\xceP1\x00\x05ab", b"\x00" * 30])
def test_a_bad_paging_state_is_an_invalid_request(engine: Engine, state: bytes) -> None:
    with pytest.raises(InvalidRequest, match="paging state"):
        engine.run(
            "SELECT * FROM messages WHERE channel_id = 1 AND bucket = 0",
            page_size=2,
            paging_state=state,
        )


def test_count_distinct_and_filtering(engine: Engine) -> None:
    assert engine.rows("SELECT COUNT(*) FROM messages") == [[10]]
    assert engine.rows("SELECT COUNT(*) FROM messages LIMIT 3") == [[10]]
    assert engine.rows("SELECT DISTINCT channel_id, bucket FROM messages") == [[1, 0]]
    with pytest.raises(InvalidRequest, match="ALLOW FILTERING"):
        engine.run("SELECT * FROM messages WHERE content = 'm3'")
    rows = engine.rows("SELECT message_id FROM messages WHERE content = 'm3' ALLOW FILTERING")
    assert rows == [[3]]


def test_lightweight_transactions_report_applied_and_current_values(engine: Engine) -> None:
    applied = engine.rows(
        "INSERT INTO messages (channel_id, bucket, message_id, content) "
        "VALUES (1, 0, 3, 'new') IF NOT EXISTS"
    )
    assert applied[0][0] is False
    assert applied[0][-1] == "m3"
    assert engine.rows(
        "UPDATE messages SET content = 'x' WHERE channel_id = 1 AND bucket = 0 "
        "AND message_id = 3 IF content = 'm3'"
    ) == [[True]]
    assert engine.rows(
        "UPDATE messages SET content = 'y' WHERE channel_id = 1 AND bucket = 0 "
        "AND message_id = 3 IF content = 'm3'"
    ) == [[False, "x"]]
    assert engine.rows(
        "DELETE FROM messages WHERE channel_id = 1 AND bucket = 0 AND message_id = 42 IF EXISTS"
    ) == [[False]]


def test_deletes_of_cells_rows_ranges_and_partitions(engine: Engine) -> None:
    base = "FROM messages WHERE channel_id = 1 AND bucket = 0"
    engine.run(f"DELETE content {base} AND message_id = 9")
    assert engine.rows(f"SELECT content {base} AND message_id = 9") == [[None]]
    engine.run(f"DELETE {base} AND message_id = 8")
    engine.run(f"DELETE {base} AND message_id < 3")
    assert [r[0] for r in engine.rows(f"SELECT message_id {base}")] == [9, 7, 6, 5, 4, 3]
    engine.run(f"DELETE {base}")
    assert engine.rows(f"SELECT * {base}") == []


def test_a_batch_is_validated_before_anything_is_applied(engine: Engine) -> None:
    with pytest.raises(InvalidRequest):
        engine.run(
            "BEGIN BATCH "
            "INSERT INTO messages (channel_id, bucket, message_id) VALUES (9, 9, 9); "
            "INSERT INTO messages (channel_id, bucket, nope) VALUES (9, 9, 9); "
            "APPLY BATCH"
        )
    assert engine.rows("SELECT * FROM messages WHERE channel_id = 9 AND bucket = 9") == []
    outcome = engine.run(
        "BEGIN UNLOGGED BATCH "
        "INSERT INTO messages (channel_id, bucket, message_id) VALUES (9, 9, 9) "
        "UPDATE messages SET content = 'b' WHERE channel_id = 9 AND bucket = 9 AND message_id = 9 "
        "APPLY BATCH"
    )
    assert outcome.kind == "batch"
    assert engine.rows("SELECT content FROM messages WHERE channel_id = 9 AND bucket = 9") == [
        ["b"]
    ]


def test_counters_increment_and_reject_plain_assignment() -> None:
    e = Engine()
    e.setup_messages()
    e.run("CREATE TABLE hits (k int PRIMARY KEY, n counter)")
    e.run("UPDATE hits SET n = n + 5 WHERE k = 1")
    e.run("UPDATE hits SET n = n - 2 WHERE k = 1")
    assert e.rows("SELECT n FROM hits WHERE k = 1") == [[3]]
    with pytest.raises(InvalidRequest, match="counter"):
        e.run("UPDATE hits SET n = 1 WHERE k = 1")
    with pytest.raises(InvalidRequest, match="counter"):
        e.run("INSERT INTO hits (k, n) VALUES (2, 1)")


def test_collection_updates_and_static_columns() -> None:
    e = Engine()
    e.setup_messages()
    e.run(
        "CREATE TABLE c (k int, ck int, l list<int>, s set<text>, m map<text, int>, "
        "st text STATIC, PRIMARY KEY (k, ck))"
    )
    e.run("INSERT INTO c (k, ck, l, s, m, st) VALUES (1, 1, [1, 2], {'a', 'b'}, {'x': 1}, 'S')")
    e.run("UPDATE c SET l = l + [3], l = [0] + l, s = s - {'a'}, m['y'] = 2 WHERE k = 1 AND ck = 1")
    e.run("INSERT INTO c (k, ck) VALUES (1, 2)")
    rows = e.rows("SELECT ck, l, s, m, st FROM c WHERE k = 1")
    assert rows[0] == [1, [0, 1, 2, 3], frozenset({"b"}), {"x": 1, "y": 2}, "S"]
    assert rows[1] == [2, None, None, None, "S"]


def test_unknown_names_and_bad_values_are_invalid_requests(engine: Engine) -> None:
    cases = {
        "SELECT * FROM nope": "unconfigured table nope",
        "SELECT * FROM other.messages": "Keyspace other does not exist",
        "SELECT nope FROM messages": "Undefined column name nope",
        "SELECT * FROM messages WHERE channel_id = 'a' AND bucket = 0": "Invalid STRING constant",
        "INSERT INTO messages (channel_id, message_id) VALUES (1, 1)": "partition key parts are "
        "missing: bucket",
        "USE nowhere": "Keyspace 'nowhere' does not exist",
    }
    for text, message in cases.items():
        with pytest.raises(InvalidRequest, match=message):
            engine.run(text)


def test_ddl_reports_changes_and_duplicates(engine: Engine) -> None:
    with pytest.raises(AlreadyExists) as info:
        engine.run(MESSAGES)
    assert (info.value.keyspace, info.value.table) == ("ks", "messages")
    assert isinstance(
        engine.run(MESSAGES.replace("TABLE", "TABLE IF NOT EXISTS", 1)).result, ResultVoid
    )
    outcome = engine.run("DROP TABLE messages")
    assert outcome.schema_change == ResultSchemaChange("DROPPED", "TABLE", "ks", "messages")
    engine.run(MESSAGES)
    assert engine.rows("SELECT * FROM messages") == []


def test_schema_version_changes_with_every_ddl(engine: Engine) -> None:
    query = "SELECT schema_version FROM system.local WHERE key = 'local'"
    before = engine.rows(query)[0][0]
    outcome = engine.run("CREATE TABLE t2 (k int PRIMARY KEY)")
    assert outcome.kind == "ddl"
    after = engine.rows(query)[0][0]
    assert before != after
    assert engine.run(query).kind == "system"


def test_system_schema_describes_keys_and_clustering_order(engine: Engine) -> None:
    rows = engine.rows(
        "SELECT column_name, kind, position, clustering_order, type "
        "FROM system_schema.columns WHERE keyspace_name = 'ks' "
        "AND table_name = 'messages'"
    )
    described = {r[0]: tuple(r[1:]) for r in rows}
    assert described["channel_id"] == ("partition_key", 0, "none", "bigint")
    assert described["bucket"] == ("partition_key", 1, "none", "int")
    assert described["message_id"] == ("clustering", 0, "desc", "bigint")
    assert described["content"] == ("regular", -1, "none", "text")
    keyspaces = engine.rows(
        "SELECT keyspace_name, replication FROM system_schema.keyspaces WHERE keyspace_name = 'ks'"
    )
    assert keyspaces[0][1]["class"] == "org.apache.cassandra.locator.SimpleStrategy"


def test_system_keyspaces_are_not_user_modifiable(engine: Engine) -> None:
    with pytest.raises(Unauthorized):
        engine.run("INSERT INTO system.local (key) VALUES ('x')")
    with pytest.raises(Unauthorized):
        engine.run("DROP KEYSPACE system_schema")


def test_prepared_id_is_md5_of_keyspace_and_query(engine: Engine) -> None:
    query = "SELECT * FROM messages WHERE channel_id = ? AND bucket = ?"
    prepared = engine.executor.prepare(query, engine.session)
    assert prepared.id == prepared_id(query, "ks")
    assert prepared.shape.pk_indexes == [0, 1]
    assert [s.name for s in prepared.shape.specs] == ["channel_id", "bucket"]
    engine.executor.forget_prepared()
    with pytest.raises(Unprepared) as info:
        engine.executor.lookup(prepared.id)
    assert info.value.query_id == prepared.id


def test_bound_values_are_decoded_by_marker_type(engine: Engine) -> None:
    prepared = engine.executor.prepare(
        "SELECT content FROM messages WHERE channel_id = ? AND bucket = ? AND message_id IN ?",
        engine.session,
    )
    assert prepared.shape.specs[2].name == "in(message_id)"
    values = [
        struct.pack(">q", 1),
        struct.pack(">i", 0),
        parse_type("list<bigint>").serialize([2, 5]),
    ]
    outcome = engine.executor.execute_prepared(
        prepared, values, None, engine.session, ExecutionOptions()
    )
    assert decode(outcome) == [["m5"], ["m2"]]
    with pytest.raises(CqlRequestError, match="bigint"):
        engine.executor.execute_prepared(
            prepared, [b"\x01", values[1], values[2]], None, engine.session, ExecutionOptions()
        )


@settings(max_examples=examples(50), deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(-(2**63), 2**63 - 1), st.integers(-(2**31), 2**31 - 1)),
        min_size=1,
        max_size=5,
    )
)
def test_tokens_match_the_driver_murmur3_of_the_routing_key(keys: list[tuple[int, int]]) -> None:
    columns = TableDef.build(
        "ks",
        "messages",
        [("channel_id", "bigint", False), ("bucket", "int", False)],
        ["channel_id", "bucket"],
        [],
        {},
    ).partition_key
    for channel, bucket in keys:
        key = routing_key(columns, (channel, bucket))
        expected = (
            struct.pack(">H", 8)
            + struct.pack(">q", channel)
            + b"\x00"
            + struct.pack(">H", 4)
            + struct.pack(">i", bucket)
            + b"\x00"
        )
        assert key == expected
        assert token_of(key) == Murmur3Token.from_key(key).value


def test_permissions_are_enforced_for_non_superusers() -> None:
    e = Engine(auth=True)
    e.session.role = "cassandra"
    e.setup_messages(1)
    e.run("CREATE ROLE reader WITH PASSWORD = 'pw' AND LOGIN = true")
    e.run("GRANT SELECT ON KEYSPACE ks TO reader")
    e.session.role = "reader"
    assert len(e.rows("SELECT * FROM messages")) == 1
    with pytest.raises(Unauthorized, match="MODIFY"):
        e.run("INSERT INTO messages (channel_id, bucket, message_id) VALUES (1, 1, 1)")
    e.session.role = "cassandra"
    e.run("REVOKE SELECT ON KEYSPACE ks FROM reader")
    e.run("GRANT MODIFY ON TABLE ks.messages TO reader")
    e.session.role = "reader"
    with pytest.raises(Unauthorized, match="SELECT"):
        e.run("SELECT * FROM messages")
    e.run("INSERT INTO messages (channel_id, bucket, message_id) VALUES (1, 1, 1)")
    with pytest.raises(Unauthorized):
        e.run("CREATE ROLE other WITH LOGIN = true")


def test_repeated_identical_reads_are_memoised_but_never_stale(engine: Engine) -> None:
    query = "SELECT message_id FROM messages WHERE channel_id = 1 AND bucket = 0 LIMIT 1"
    first = engine.run(query)
    second = engine.run(query)
    assert second is first
    engine.run("INSERT INTO messages (channel_id, bucket, message_id) VALUES (1, 0, 500)")
    third = engine.run(query)
    assert third is not first
    assert decode(third) == [[500]]
    engine.run("TRUNCATE messages")
    assert decode(engine.run(query)) == []


def test_reads_calling_functions_are_never_memoised(engine: Engine) -> None:
    engine.run("CREATE TABLE events (k timeuuid PRIMARY KEY)")
    query = "SELECT * FROM events WHERE k = now()"
    assert engine.run(query) is not engine.run(query)
