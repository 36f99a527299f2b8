"""The real scylla-driver against a shard-aware emulator: one connection per shard, no hops.

scylla-driver installs the same `cassandra` package as cassandra-driver;
this module runs only where that package is scylla-driver's (it has
`cassandra.shard_info`) and is skipped in a cassandra-driver environment.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

pytest.importorskip("cassandra.shard_info", reason="needs scylla-driver, not cassandra-driver")

from cassandra.cluster import EXEC_PROFILE_DEFAULT, Cluster, ExecutionProfile
from cassandra.policies import RoundRobinPolicy, TokenAwarePolicy

from coalesce.emulator import EmulatorThread

pytestmark = pytest.mark.timeout(90)

SHARDS = 4
KEYS = range(200)
POOL_DEADLINE = 20.0


def _cluster(emu: EmulatorThread) -> Any:
    profile = ExecutionProfile(load_balancing_policy=TokenAwarePolicy(RoundRobinPolicy()))
    return Cluster(
        [emu.host],
        port=emu.port,
        protocol_version=4,
        execution_profiles={EXEC_PROFILE_DEFAULT: profile},
        connect_timeout=5,
    )


def _wait_for_a_connection_per_shard(cluster: Any) -> None:
    """Poll the driver's pool (bounded) until it holds a connection to every shard."""
    deadline = time.monotonic() + POOL_DEADLINE
    while True:
        stats = list((cluster.shard_aware_stats() or {}).values())
        if stats and all(s["connected"] == s["shards_count"] == SHARDS for s in stats):
            return
        if time.monotonic() > deadline:
            pytest.fail(f"pool did not reach every shard in {POOL_DEADLINE}s: {stats}")
        time.sleep(0.01)


def _write_and_read_every_key(session: Any) -> None:
    session.execute(
        "CREATE KEYSPACE IF NOT EXISTS ks WITH replication = "
        "{'class': 'SimpleStrategy', 'replication_factor': 1}"
    )
    session.execute("CREATE TABLE IF NOT EXISTS ks.kv (k int PRIMARY KEY, v text)")
    insert = session.prepare("INSERT INTO ks.kv (k, v) VALUES (?, ?)")
    select = session.prepare("SELECT v FROM ks.kv WHERE k = ?")
    for key in KEYS:
        session.execute(insert, (key, f"v{key}"))
    for key in KEYS:
        assert session.execute(select, (key,)).one().v == f"v{key}"


@pytest.fixture
def shard_aware_emulator() -> Iterator[EmulatorThread]:
    with EmulatorThread(shards=SHARDS, read_latency=0.0, per_row=0.0, shard_aware=True) as emu:
        yield emu


def test_scylla_driver_opens_one_connection_per_shard_on_the_shard_aware_port(
    shard_aware_emulator: EmulatorThread,
) -> None:
    emu = shard_aware_emulator
    cluster = _cluster(emu)
    try:
        session = cluster.connect()  # the cluster holds its sessions weakly: keep it
        _wait_for_a_connection_per_shard(cluster)
        assert cluster.is_shard_aware()
        connections = emu.connections()
        assert {c.shard for c in connections} == set(range(SHARDS))
        # Only the pool's first connection, which taught the driver the sharding, and the
        # control connection use the CQL port; the rest chose their shard by client port.
        aware = [c for c in connections if c.shard_aware_port]
        assert len(aware) >= SHARDS - 1, connections
        assert all(c.client_port % SHARDS == c.shard for c in aware)
        session.shutdown()
    finally:
        cluster.shutdown()


def test_scylla_driver_sends_every_token_aware_request_to_its_partitions_shard(
    shard_aware_emulator: EmulatorThread,
) -> None:
    emu = shard_aware_emulator
    cluster = _cluster(emu)
    try:
        session = cluster.connect()
        _wait_for_a_connection_per_shard(cluster)
        _write_and_read_every_key(session)
    finally:
        cluster.shutdown()
    requests = emu.emulator.metrics.shard_requests
    assert sum(requests) == 2 * len(KEYS)
    assert all(n > 0 for n in requests), requests
    assert emu.wrong_shard_requests == 0


def test_scylla_drivers_metadata_queries_with_using_timeout_are_answered(
    shard_aware_emulator: EmulatorThread,
) -> None:
    # Seeing SCYLLA_* keys, scylla-driver appends USING TIMEOUT to every schema and
    # topology query; before the emulator parsed it, connect() itself failed.
    emu = shard_aware_emulator
    cluster = _cluster(emu)
    try:
        session = cluster.connect()
        _write_and_read_every_key(session)
        cluster.refresh_schema_metadata()
        assert "kv" in cluster.metadata.keyspaces["ks"].tables
        assert cluster.metadata.get_host(emu.host) is not None
    finally:
        cluster.shutdown()


def test_without_a_shard_aware_port_scylla_driver_fills_its_pool_on_the_cql_port() -> None:
    with EmulatorThread(
        shards=SHARDS, read_latency=0.0, per_row=0.0, shard_aware=True, shard_aware_port=None
    ) as emu:
        cluster = _cluster(emu)
        try:
            session = cluster.connect()
            _wait_for_a_connection_per_shard(cluster)
            assert not any(c.shard_aware_port for c in emu.connections())
            _write_and_read_every_key(session)
        finally:
            cluster.shutdown()
        assert emu.wrong_shard_requests == 0


def test_without_the_extension_scylla_driver_works_unaware_and_pays_hops() -> None:
    with EmulatorThread(shards=SHARDS, read_latency=0.0, per_row=0.0) as emu:
        cluster = _cluster(emu)
        try:
            session = cluster.connect()
            assert not cluster.is_shard_aware()
            _write_and_read_every_key(session)
        finally:
            cluster.shutdown()
        # One pool connection, on one shard: the other shards' partitions are remote.
        assert emu.wrong_shard_requests > 0
