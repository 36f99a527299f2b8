"""Fixtures for coalescing sessions: an emulator with latency, and real driver sessions."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from cassandra.cluster import Cluster, Session
from cassandra.policies import ConstantReconnectionPolicy

from coalesce.emulator import EmulatorThread
from coalesce.scylla import CoalescingSession

SCHEMA = (
    "CREATE KEYSPACE IF NOT EXISTS chat WITH replication = "
    "{'class': 'SimpleStrategy', 'replication_factor': 1}",
    "CREATE TABLE IF NOT EXISTS chat.messages (channel_id bigint, bucket int, message_id bigint,"
    " author_id bigint, content text, PRIMARY KEY ((channel_id, bucket), message_id))"
    " WITH CLUSTERING ORDER BY (message_id DESC)",
)


@pytest.fixture(scope="module")
def slow_emulator() -> Iterator[EmulatorThread]:
    """An emulator whose reads take 2 ms, so that herds overlap a read in flight."""
    with EmulatorThread(read_latency=0.002, per_row=0.0) as emu:
        yield emu


@pytest.fixture(scope="module")
def driver_session(slow_emulator: EmulatorThread) -> Iterator[Session]:
    cluster = Cluster(
        [slow_emulator.host],
        port=slow_emulator.port,
        protocol_version=4,
        reconnection_policy=ConstantReconnectionPolicy(0.2),
    )
    session = cluster.connect()
    for ddl in SCHEMA:
        session.execute(ddl)
    session.set_keyspace("chat")
    try:
        yield session
    finally:
        cluster.shutdown()


@pytest.fixture
def coalescing() -> Iterator[Any]:
    """Build CoalescingSessions; after the test none may have reads in flight."""
    made: list[CoalescingSession] = []

    def make(session: Any, **kwargs: Any) -> CoalescingSession:
        kwargs.setdefault("metrics", False)
        wrapped = CoalescingSession(session, **kwargs)
        made.append(wrapped)
        return wrapped

    yield make
    for wrapped in made:
        assert len(wrapped.group) == 0 and wrapped.group.running == 0
        assert len(wrapped.freshness) == 0
