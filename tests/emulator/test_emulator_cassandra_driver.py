"""The real cassandra-driver against the emulator, on both the asyncio and libev reactors.

Tests marked `scylla` also run against a real cluster when SCYLLA_HOSTS is set.
"""

from __future__ import annotations

import datetime
import decimal
import importlib.util
import ipaddress
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from cassandra import AlreadyExists, InvalidRequest
from cassandra.cluster import EXEC_PROFILE_DEFAULT, Cluster, ExecutionProfile, Session
from cassandra.io.asyncioreactor import AsyncioConnection
from cassandra.io.libevreactor import LibevConnection
from cassandra.policies import RoundRobinPolicy, TokenAwarePolicy
from cassandra.protocol import SyntaxException
from cassandra.query import BatchStatement, BatchType, SimpleStatement
from cassandra.util import Date, Duration, Time

from coalesce.emulator import EmulatorThread
from tests.fixtures_emulator import CqlTarget

REACTORS = {"asyncio": AsyncioConnection, "libev": LibevConnection}

MESSAGES = (
    "CREATE TABLE IF NOT EXISTS {ks}.messages (channel_id bigint, bucket int, message_id bigint, "
    "author_id bigint, content text, PRIMARY KEY ((channel_id, bucket), message_id)) "
    "WITH CLUSTERING ORDER BY (message_id DESC)"
)

ALL_TYPES = (
    "CREATE TABLE IF NOT EXISTS {ks}.all_types (k int PRIMARY KEY, i int, bi bigint, si smallint, "
    "ti tinyint, b boolean, f float, d double, dec decimal, vi varint, t text, a ascii, bl blob, "
    "u uuid, tu timeuuid, ts timestamp, dt date, tm time, ip inet, l list<int>, s set<text>, "
    "m map<text, int>, tup tuple<int, text, boolean>, dur duration)"
)

SAMPLE: dict[str, Any] = {
    "i": -(2**31),
    "bi": 2**63 - 1,
    "si": -(2**15),
    "ti": 127,
    "b": True,
    "f": 1.5,
    "d": -2.25e300,
    "dec": decimal.Decimal("-12345.678900"),
    "vi": -(10**30),
    "t": "héllo wörld ✓",
    "a": "plain ascii",
    "bl": b"\x00\xffbinary",
    "u": uuid.UUID("123e4567-e89b-12d3-a456-426614174000"),
    "tu": uuid.UUID("d2177dd0-eaa2-11de-a572-001b779c76e3"),
    "ts": datetime.datetime(2024, 2, 29, 12, 34, 56, 789000),
    "dt": Date(datetime.date(1999, 12, 31)),
    "tm": Time(datetime.time(23, 59, 58, 123456)),
    "ip": "2001:db8::1",
    "l": [3, 1, 2],
    "s": {"x", "y"},
    "m": {"one": 1, "two": 2},
    "tup": (7, "seven", False),
    "dur": Duration(1, 2, 3_000_000_000),
}


def _normalise(column: str, value: Any) -> Any:
    if column == "s" and value is not None:
        return set(value)
    if column == "m" and value is not None:
        return dict(value)
    if column == "ip":
        return ipaddress.ip_address(value)
    return value


def connect(target: CqlTarget, reactor: str, **kwargs: Any) -> Cluster:
    profile = ExecutionProfile(
        load_balancing_policy=TokenAwarePolicy(RoundRobinPolicy()), request_timeout=10
    )
    return Cluster(
        [host for host, _ in target.hosts],
        port=target.port,
        connection_class=REACTORS[reactor],
        execution_profiles={EXEC_PROFILE_DEFAULT: profile},
        connect_timeout=5,
        control_connection_timeout=5,
        **kwargs,
    )


@pytest.fixture(scope="module", params=sorted(REACTORS))
def reactor(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def driver(cql_target: CqlTarget, reactor: str) -> Iterator[tuple[Cluster, Session, str]]:
    """A connected cluster and session with a fresh keyspace holding the test tables."""
    cluster = connect(cql_target, reactor)
    session = cluster.connect()
    keyspace = f"coalesce_driver_{reactor}"
    session.execute(f"DROP KEYSPACE IF EXISTS {keyspace}")
    session.execute(
        f"CREATE KEYSPACE {keyspace} WITH replication = "
        "{'class': 'SimpleStrategy', 'replication_factor': 1}"
    )
    session.execute(MESSAGES.format(ks=keyspace))
    session.execute(ALL_TYPES.format(ks=keyspace))
    session.set_keyspace(keyspace)
    try:
        yield cluster, session, keyspace
    finally:
        session.execute(f"DROP KEYSPACE IF EXISTS {keyspace}")
        cluster.shutdown()


pytestmark = pytest.mark.timeout(60)


def test_driver_negotiates_protocol_v4_from_its_default(
    driver: tuple[Cluster, Session, str],
) -> None:
    cluster, session, _ = driver
    assert cluster.protocol_version == 4
    row = session.execute("SELECT release_version, cql_version FROM system.local").one()
    assert row.cql_version.startswith("3.")


@pytest.mark.scylla
def test_insert_then_select_with_and_without_prepared_statements(
    driver: tuple[Cluster, Session, str],
) -> None:
    _, session, _ = driver
    session.execute(
        "INSERT INTO messages (channel_id, bucket, message_id, author_id, content) "
        "VALUES (%s, %s, %s, %s, %s)",
        (1, 1, 10, 5, "simple"),
    )
    insert = session.prepare(
        "INSERT INTO messages (channel_id, bucket, message_id, author_id, content) "
        "VALUES (?, ?, ?, ?, ?)"
    )
    for message_id in (11, 12):
        session.execute(insert, (1, 1, message_id, 5, f"prepared {message_id}"))
    select = session.prepare(
        "SELECT message_id, content FROM messages WHERE channel_id = ? AND bucket = ?"
    )
    assert select.routing_key_indexes == [0, 1]
    rows = [(r.message_id, r.content) for r in session.execute(select, (1, 1))]
    assert rows == [(12, "prepared 12"), (11, "prepared 11"), (10, "simple")]
    simple = session.execute(
        "SELECT content FROM messages WHERE channel_id = %s AND bucket = %s AND message_id = %s",
        (1, 1, 10),
    ).one()
    assert simple.content == "simple"


@pytest.mark.scylla
@pytest.mark.parametrize("prepared", [True, False], ids=["prepared", "literals"])
def test_every_type_round_trips(driver: tuple[Cluster, Session, str], prepared: bool) -> None:
    _, session, _ = driver
    # The driver renders tuples as list literals and has no duration literal,
    # which Scylla rejects too: those two only go through bound values.
    columns = [c for c in SAMPLE if prepared or c not in ("dur", "tup")]
    names = ", ".join(["k", *columns])
    key = 1 if prepared else 2
    if prepared:
        statement: Any = session.prepare(
            f"INSERT INTO all_types ({names}) VALUES ({', '.join('?' * (len(columns) + 1))})"
        )
    else:
        markers = ", ".join(["%s"] * (len(columns) + 1))
        statement = f"INSERT INTO all_types ({names}) VALUES ({markers})"
    session.execute(statement, [key, *(SAMPLE[c] for c in columns)])
    row = session.execute("SELECT * FROM all_types WHERE k = %s", (key,)).one()._asdict()
    for column in columns:
        assert _normalise(column, row[column]) == _normalise(column, SAMPLE[column]), column


@pytest.mark.scylla
def test_null_and_unset_values(driver: tuple[Cluster, Session, str]) -> None:
    _, session, _ = driver
    insert = session.prepare("INSERT INTO all_types (k, t, i) VALUES (?, ?, ?)")
    session.execute(insert, (3, "kept", 5))
    from cassandra.query import UNSET_VALUE

    session.execute(insert, (3, UNSET_VALUE, None))
    row = session.execute("SELECT t, i FROM all_types WHERE k = 3").one()
    assert (row.t, row.i) == ("kept", None)


@pytest.mark.scylla
def test_paging_through_ten_thousand_rows(driver: tuple[Cluster, Session, str]) -> None:
    _, session, _ = driver
    insert = session.prepare(
        "INSERT INTO messages (channel_id, bucket, message_id, content) VALUES (?, ?, ?, ?)"
    )
    for start in range(0, 10_000, 500):
        batch = BatchStatement(batch_type=BatchType.UNLOGGED)
        for i in range(start, start + 500):
            batch.add(insert, (77, 0, i, "x"))
        session.execute(batch)
    statement = SimpleStatement(
        "SELECT message_id FROM messages WHERE channel_id = 77 AND bucket = 0", fetch_size=700
    )
    result = session.execute(statement)
    ids = [row.message_id for row in result]
    assert ids == list(range(9_999, -1, -1))


@pytest.mark.scylla
def test_metadata_shows_partition_and_clustering_keys(
    driver: tuple[Cluster, Session, str],
) -> None:
    cluster, _, keyspace = driver
    table = cluster.metadata.keyspaces[keyspace].tables["messages"]
    assert [c.name for c in table.partition_key] == ["channel_id", "bucket"]
    assert [c.name for c in table.clustering_key] == ["message_id"]
    assert table.clustering_key[0].is_reversed
    assert table.columns["content"].cql_type == "text"
    assert "CLUSTERING ORDER BY (message_id DESC)" in table.export_as_string()


@pytest.mark.scylla
def test_token_aware_routing_finds_the_replica(driver: tuple[Cluster, Session, str]) -> None:
    cluster, session, keyspace = driver
    select = session.prepare("SELECT * FROM messages WHERE channel_id = ? AND bucket = ?")
    bound = select.bind((123, 4))
    token_map = cluster.metadata.token_map
    token = token_map.token_class.from_key(bound.routing_key)
    replicas = token_map.get_replicas(keyspace, token)
    assert len(replicas) == 1
    assert replicas[0] in cluster.metadata.all_hosts()


def test_driver_and_emulator_agree_on_tokens(
    driver: tuple[Cluster, Session, str], cql_target: CqlTarget
) -> None:
    cluster, session, keyspace = driver
    if cql_target.emulator is None:
        pytest.skip("inspects the emulator itself")
    select = session.prepare("SELECT * FROM messages WHERE channel_id = ? AND bucket = ?")
    bound = select.bind((99, 3))
    expected = cluster.metadata.token_map.token_class.from_key(bound.routing_key).value
    emulator = cql_target.emulator.emulator

    def token() -> int:
        table = emulator.executor.schema.table(keyspace, "messages")
        from coalesce.emulator.storage import routing_key, token_of

        return token_of(routing_key(table.partition_key, (99, 3)))

    assert cql_target.emulator.call(token) == expected


@pytest.mark.scylla
def test_errors_map_to_driver_exceptions(driver: tuple[Cluster, Session, str]) -> None:
    _, session, keyspace = driver
    with pytest.raises(SyntaxException):
        session.execute("SELEKT * FROM messages")
    with pytest.raises(InvalidRequest, match="unconfigured table"):
        session.execute("SELECT * FROM no_such_table")
    with pytest.raises(InvalidRequest):
        session.execute("SELECT nope FROM messages")
    with pytest.raises(AlreadyExists):
        session.execute(MESSAGES.format(ks=keyspace).replace(" IF NOT EXISTS", ""))
    # The session is still usable after every one of those.
    assert session.execute("SELECT COUNT(*) FROM system.local").one()[0] == 1


@pytest.mark.scylla
def test_lightweight_transactions_and_batches(driver: tuple[Cluster, Session, str]) -> None:
    _, session, _ = driver
    first = session.execute(
        "INSERT INTO messages (channel_id, bucket, message_id, content) VALUES (5, 5, 1, 'a') "
        "IF NOT EXISTS"
    )
    assert first.was_applied
    second = session.execute(
        "INSERT INTO messages (channel_id, bucket, message_id, content) VALUES (5, 5, 1, 'b') "
        "IF NOT EXISTS"
    )
    assert not second.was_applied
    insert = session.prepare(
        "INSERT INTO messages (channel_id, bucket, message_id, content) VALUES (?, ?, ?, ?)"
    )
    batch = BatchStatement()
    batch.add(insert, (6, 6, 1, "one"))
    batch.add(
        "UPDATE messages SET content = %s WHERE channel_id = %s AND bucket = %s "
        "AND message_id = %s",
        ("two", 6, 6, 2),
    )
    session.execute(batch)
    rows = session.execute(
        "SELECT message_id, content FROM messages WHERE channel_id = 6 AND bucket = 6"
    )
    assert [(r.message_id, r.content) for r in rows] == [(2, "two"), (1, "one")]


def test_statements_are_counted_by_kind_apart_from_system_reads(
    driver: tuple[Cluster, Session, str], cql_target: CqlTarget
) -> None:
    _, session, _ = driver
    if cql_target.emulator is None:
        pytest.skip("inspects the emulator itself")
    before = dict(cql_target.emulator.statements)
    session.execute("SELECT * FROM messages WHERE channel_id = 1 AND bucket = 1")
    session.execute("SELECT * FROM system.local")
    after = cql_target.emulator.statements
    assert after["select"] == before["select"] + 1
    assert after["system"] >= before["system"] + 1


def test_execute_after_forget_prepared_transparently_reprepares(
    driver: tuple[Cluster, Session, str], cql_target: CqlTarget
) -> None:
    _, session, _ = driver
    if cql_target.emulator is None:
        pytest.skip("inspects the emulator itself")
    select = session.prepare("SELECT content FROM messages WHERE channel_id = ? AND bucket = ?")
    session.execute(select, (1, 1))
    cql_target.emulator.forget_prepared()
    rows = session.execute(select, (1, 1))
    assert [r.content for r in rows][:1] == ["prepared 12"]


def test_new_tables_reach_driver_metadata_through_schema_events(
    emulator_thread: EmulatorThread, reactor: str
) -> None:
    target = CqlTarget(((emulator_thread.host, emulator_thread.port),), emulator_thread)
    cluster = connect(target, reactor)
    try:
        session = cluster.connect()
        keyspace = f"events_{reactor}"
        session.execute(
            f"CREATE KEYSPACE {keyspace} WITH replication = "
            "{'class': 'SimpleStrategy', 'replication_factor': 1}"
        )
        session.execute(f"CREATE TABLE {keyspace}.fresh (k int PRIMARY KEY, v text)")
        assert "fresh" in cluster.metadata.keyspaces[keyspace].tables
        session.execute(f"DROP TABLE {keyspace}.fresh")
        assert "fresh" not in cluster.metadata.keyspaces[keyspace].tables
    finally:
        cluster.shutdown()


def test_counter_updates(driver: tuple[Cluster, Session, str]) -> None:
    _, session, keyspace = driver
    session.execute(f"CREATE TABLE IF NOT EXISTS {keyspace}.hits (k int PRIMARY KEY, n counter)")
    increment = session.prepare("UPDATE hits SET n = n + ? WHERE k = ?")
    for _ in range(3):
        session.execute(increment, (2, 1))
    assert session.execute("SELECT n FROM hits WHERE k = 1").one().n == 6


def test_protocol_v3_clients_are_served(emulator_thread: EmulatorThread) -> None:
    cluster = Cluster([emulator_thread.host], port=emulator_thread.port, protocol_version=3)
    try:
        session = cluster.connect()
        session.execute(
            "CREATE KEYSPACE IF NOT EXISTS v3ks WITH replication = "
            "{'class': 'SimpleStrategy', 'replication_factor': 1}"
        )
        session.execute("CREATE TABLE IF NOT EXISTS v3ks.t (k int PRIMARY KEY, v text)")
        insert = session.prepare("INSERT INTO v3ks.t (k, v) VALUES (?, ?)")
        session.execute(insert, (1, "three"))
        select = session.prepare("SELECT v FROM v3ks.t WHERE k = ?")
        assert select.routing_key_indexes == [0]
        assert session.execute(select, (1,)).one().v == "three"
        assert cluster.protocol_version == 3
    finally:
        cluster.shutdown()


@pytest.mark.parametrize("reactor_name", sorted(REACTORS))
def test_a_driver_without_shard_awareness_ignores_scyllas_keys_and_pays_the_hops(
    reactor_name: str,
) -> None:
    if importlib.util.find_spec("cassandra.shard_info") is not None:
        pytest.skip("scylla-driver reads the keys: see test_emulator_scylla_driver.py")
    with EmulatorThread(shards=4, read_latency=0.0, per_row=0.0, shard_aware=True) as emu:
        cluster = connect(CqlTarget(((emu.host, emu.port),), emu), reactor_name)
        try:
            session = cluster.connect()
            session.execute(
                "CREATE KEYSPACE ks WITH replication = "
                "{'class': 'SimpleStrategy', 'replication_factor': 1}"
            )
            session.execute("CREATE TABLE ks.kv (k int PRIMARY KEY, v text)")
            insert = session.prepare("INSERT INTO ks.kv (k, v) VALUES (?, ?)")
            select = session.prepare("SELECT v FROM ks.kv WHERE k = ?")
            for key in range(40):
                session.execute(insert, (key, str(key)))
            assert [session.execute(select, (k,)).one().v for k in range(40)] == [
                str(k) for k in range(40)
            ]
        finally:
            cluster.shutdown()
        # cassandra-driver never opens the shard-aware port; its one pool connection
        # sits on one shard, so the other shards' partitions cost a hop each.
        assert not any(c.shard_aware_port for c in emu.connections())
        assert emu.wrong_shard_requests > 0
