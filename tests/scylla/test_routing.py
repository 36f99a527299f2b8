"""Routed sessions against real drivers talking to in-process emulators over TCP.

Each emulator is an independent instance; which one served a request is read
from its ``statements["select"]`` counter.
"""

from __future__ import annotations

import contextlib
import threading
from collections import Counter
from collections.abc import AsyncIterator, Iterator, Mapping
from typing import Any

import acsylla
import pytest
from cassandra.cluster import EXEC_PROFILE_DEFAULT, Cluster, ExecutionProfile, NoHostAvailable
from cassandra.policies import ConstantReconnectionPolicy, HostStateListener, RoundRobinPolicy

from coalesce.router import Router
from coalesce.scylla.routing import (
    NoInstanceAvailable,
    RoutedAcsyllaSession,
    RoutedSession,
    split_endpoint,
)

try:
    from coalesce.emulator import EmulatorThread
except ImportError:  # pragma: no cover - until the emulator lands
    pytest.skip("coalesce.emulator.EmulatorThread is not available", allow_module_level=True)

_SCHEMA = [
    "CREATE KEYSPACE IF NOT EXISTS chat WITH replication = "
    "{'class': 'SimpleStrategy', 'replication_factor': 1}",
    "CREATE TABLE IF NOT EXISTS chat.messages "
    "(channel_id bigint, ts bigint, body text, PRIMARY KEY (channel_id, ts))",
]
_SELECT = "SELECT ts, body FROM chat.messages WHERE channel_id = ?"
_SELECT_UNPREPARED = "SELECT ts, body FROM chat.messages WHERE channel_id = %s"


def _driver_options() -> dict[str, Any]:
    # No schema/token metadata: fewer background queries on each instance, and
    # a long reconnect delay so a stopped instance is not re-probed mid-test.
    return {
        "protocol_version": 4,
        "schema_metadata_enabled": False,
        "token_metadata_enabled": False,
        "reconnection_policy": ConstantReconnectionPolicy(60.0),
    }


def _cluster(contact_points: list[Any], port: int = 9042) -> Any:
    profile = ExecutionProfile(load_balancing_policy=RoundRobinPolicy())
    return Cluster(
        contact_points=contact_points,
        port=port,
        execution_profiles={EXEC_PROFILE_DEFAULT: profile},
        **_driver_options(),
    )


class _Instances:
    """Running emulators by endpoint; each can be stopped on its own."""

    def __init__(self) -> None:
        self._stacks: dict[str, contextlib.ExitStack] = {}
        self.emulators: dict[str, Any] = {}

    def start(self) -> str:
        stack = contextlib.ExitStack()
        emu = stack.enter_context(EmulatorThread(read_latency=0.0, per_row=0.0))
        endpoint = f"{emu.host}:{emu.port}"
        self._stacks[endpoint] = stack
        self.emulators[endpoint] = emu
        return endpoint

    def stop(self, endpoint: str) -> None:
        self._stacks.pop(endpoint).close()

    def stop_all(self) -> None:
        for endpoint in list(self._stacks):
            self.stop(endpoint)

    def selects(self) -> dict[str, int]:
        return {e: int(emu.statements["select"]) for e, emu in self.emulators.items()}


def _delta(before: Mapping[str, int], after: Mapping[str, int]) -> dict[str, int]:
    return {e: after[e] - before.get(e, 0) for e in after}


@pytest.fixture
def instances() -> Iterator[_Instances]:
    running = _Instances()
    try:
        for _ in range(3):
            running.start()
        yield running
    finally:
        running.stop_all()


@pytest.fixture
def routed(instances: _Instances) -> Iterator[RoutedSession]:
    with RoutedSession.connect(
        list(instances.emulators), down_for=600.0, **_driver_options()
    ) as session:
        for driver_session in session.sessions.values():
            for ddl in _SCHEMA:
                driver_session.execute(ddl)
        yield session


# -- cassandra-driver ---------------------------------------------------------------


def test_one_driver_cluster_over_independent_instances_keeps_only_one_host(
    instances: _Instances,
) -> None:
    # Why RoutedSession holds one Cluster per instance: a single Cluster drops
    # the contact points its control connection's system.peers does not list.
    points = [split_endpoint(e) for e in instances.emulators]
    cluster = _cluster(points)
    try:
        # cassandra-driver keeps the control connection's host; scylla-driver takes the
        # host from system.local at the default port, reaches none, and says so.
        with contextlib.suppress(NoHostAvailable):
            cluster.connect()
        assert len(cluster.metadata.all_hosts()) == 1
    finally:
        cluster.shutdown()


def test_every_request_for_a_channel_lands_on_its_owner(
    instances: _Instances, routed: RoutedSession
) -> None:
    select = routed.prepare(_SELECT)
    channels = range(1, 31)
    before = instances.selects()
    for channel in channels:
        for _ in range(3):
            routed.execute(select, [channel])
    owners = Counter(routed.endpoint_for(c) for c in channels)
    assert len(owners) == 3  # the channels really are spread, so the check below bites
    assert _delta(before, instances.selects()) == {e: 3 * owners[e] for e in instances.emulators}


def test_prepared_routing_key_and_explicit_channel_id_pick_the_same_instance(
    instances: _Instances, routed: RoutedSession
) -> None:
    select = routed.prepare(_SELECT)
    for channel in [1, 2, 77, -5, 2**40]:
        assert select.routing_key([channel]) == channel.to_bytes(8, "big", signed=True)
        owner = routed.endpoint_for(channel)
        before = instances.selects()
        routed.execute(select, [channel])
        routed.execute(_SELECT_UNPREPARED, [channel], key=channel)
        delta = _delta(before, instances.selects())
        assert delta[owner] == 2 and sum(delta.values()) == 2


def test_adding_a_fourth_instance_moves_about_a_quarter_of_channels_to_it(
    instances: _Instances, routed: RoutedSession
) -> None:
    select = routed.prepare(_SELECT)
    channels = range(5000)
    owners_before = {c: routed.endpoint_for(c) for c in channels}

    fourth = instances.start()
    host, port = split_endpoint(fourth)
    cluster = _cluster([host], port)
    session = cluster.connect()
    for ddl in _SCHEMA:
        session.execute(ddl)
    routed.add(fourth, session)

    moved = [c for c in channels if routed.endpoint_for(c) != owners_before[c]]
    assert 0.15 <= len(moved) / len(channels) <= 0.35
    assert {routed.endpoint_for(c) for c in moved} == {fourth}

    sample = moved[:20]
    before = instances.selects()
    for channel in sample:
        routed.execute(select, [channel])  # prepared on the new instance by add()
    delta = _delta(before, instances.selects())
    assert delta[fourth] == len(sample)
    assert sum(delta.values()) == len(sample)


def test_a_downed_instances_channels_fail_over_to_the_next_instance_of_the_walk(
    instances: _Instances, routed: RoutedSession
) -> None:
    router = Router(routed.endpoints)
    victim = routed.endpoints[0]
    theirs = [c for c in range(200) if router.node_for(c) == victim][:10]
    successors = Counter(list(router.nodes_for(c))[1] for c in theirs)
    instances.stop(victim)

    before = instances.selects()
    for channel in theirs:
        routed.execute(_SELECT_UNPREPARED, [channel], key=channel)
    delta = _delta(before, instances.selects())
    assert delta[victim] == 0
    assert {e: n for e, n in delta.items() if n} == dict(successors)
    assert routed.down == {victim}
    # Marked down, the victim is no longer tried first.
    channel = theirs[0]
    assert routed.session_for(channel) is routed.sessions[list(router.nodes_for(channel))[1]]


def test_an_instance_the_driver_saw_go_down_is_skipped_before_any_request(
    instances: _Instances, routed: RoutedSession
) -> None:
    victim = routed.endpoints[2]
    channel = next(c for c in range(1000) if routed.endpoint_for(c) == victim)
    went_down = threading.Event()

    class _Listener(HostStateListener):  # type: ignore[misc]
        def on_down(self, host: Any) -> None:
            went_down.set()

        def on_up(self, host: Any) -> None: ...
        def on_add(self, host: Any) -> None: ...
        def on_remove(self, host: Any) -> None: ...

    routed.sessions[victim].cluster.register_listener(_Listener())
    instances.stop(victim)
    # The driver notices a closed connection when it next uses it (or at its
    # idle heartbeat); use it directly, past the routed session.
    with pytest.raises(NoHostAvailable):
        routed.sessions[victim].execute("SELECT key FROM system.local")
    assert went_down.wait(timeout=30)
    assert routed.down == frozenset()  # not our mark: the driver's own host state
    successor = list(Router(routed.endpoints).nodes_for(channel))[1]
    assert routed.session_for(channel) is routed.sessions[successor]


def test_removed_instance_hands_back_its_session_and_its_channels_move_along_the_walk(
    instances: _Instances, routed: RoutedSession
) -> None:
    select = routed.prepare(_SELECT)
    leaving = routed.endpoints[0]
    channel = next(c for c in range(1000) if routed.endpoint_for(c) == leaving)
    successor = list(Router(routed.endpoints).nodes_for(channel))[1]
    session = routed.remove(leaving)
    try:
        assert session is not None and leaving not in routed.endpoints
        before = instances.selects()
        routed.execute(select, [channel])
        assert _delta(before, instances.selects())[successor] == 1
        with pytest.raises(KeyError, match=leaving):
            routed.remove(leaving)
    finally:
        session.cluster.shutdown()


def test_all_instances_down_raises_no_instance_available_naming_each(
    instances: _Instances, routed: RoutedSession
) -> None:
    for endpoint in routed.endpoints:
        instances.stop(endpoint)
    with pytest.raises(NoInstanceAvailable) as raised:
        routed.execute(_SELECT_UNPREPARED, [1], key=1)
    assert set(raised.value.errors) == set(routed.endpoints)


def test_statements_without_a_routing_key_go_round_robin(
    instances: _Instances, routed: RoutedSession
) -> None:
    before = instances.selects()
    for _ in range(6):
        routed.execute("SELECT ts FROM chat.messages WHERE channel_id = 1")
    assert set(_delta(before, instances.selects()).values()) == {2}


def test_driver_prepared_statements_are_refused(routed: RoutedSession) -> None:
    one_session = next(iter(routed.sessions.values()))
    prepared = one_session.prepare(_SELECT)
    with pytest.raises(TypeError, match=r"RoutedSession\.prepare"):
        routed.execute(prepared.bind([1]))


def test_execute_async_returns_the_owners_response_future(
    instances: _Instances, routed: RoutedSession
) -> None:
    select = routed.prepare(_SELECT)
    before = instances.selects()
    routed.execute_async(select, [42]).result()
    assert _delta(before, instances.selects())[routed.endpoint_for(42)] == 1


# -- acsylla ------------------------------------------------------------------------


@pytest.fixture
async def routed_acsylla(instances: _Instances) -> AsyncIterator[RoutedAcsyllaSession]:
    session = await RoutedAcsyllaSession.connect(
        list(instances.emulators), down_for=600.0, protocol_version=4
    )
    async with session:
        for acsylla_session in session.sessions.values():
            for ddl in _SCHEMA:
                await acsylla_session.execute(acsylla.create_statement(ddl))
        yield session


async def test_acsylla_requests_for_a_channel_land_on_its_owner(
    instances: _Instances, routed_acsylla: RoutedAcsyllaSession
) -> None:
    select = await routed_acsylla.prepare(_SELECT)
    channels = range(1, 31)
    before = instances.selects()
    for channel in channels:
        for _ in range(3):
            await routed_acsylla.execute(select, [channel], key=channel)
    owners = Counter(routed_acsylla.endpoint_for(c) for c in channels)
    assert len(owners) == 3
    assert _delta(before, instances.selects()) == {e: 3 * owners[e] for e in instances.emulators}


async def test_acsylla_channels_of_a_downed_instance_fail_over_along_the_walk(
    instances: _Instances, routed_acsylla: RoutedAcsyllaSession
) -> None:
    router = Router(routed_acsylla.endpoints)
    victim = routed_acsylla.endpoints[1]
    theirs = [c for c in range(200) if router.node_for(c) == victim][:10]
    successors = Counter(list(router.nodes_for(c))[1] for c in theirs)
    instances.stop(victim)

    before = instances.selects()
    for channel in theirs:
        await routed_acsylla.execute(
            f"SELECT ts FROM chat.messages WHERE channel_id = {channel}", key=channel
        )
    delta = _delta(before, instances.selects())
    assert delta[victim] == 0
    assert {e: n for e, n in delta.items() if n} == dict(successors)
    assert routed_acsylla.down == {victim}
    channel = theirs[0]
    successor = list(router.nodes_for(channel))[1]
    assert routed_acsylla.session_for(channel) is routed_acsylla.sessions[successor]


async def test_acsylla_fourth_instance_gets_prepared_statements_and_its_channels(
    instances: _Instances, routed_acsylla: RoutedAcsyllaSession
) -> None:
    select = await routed_acsylla.prepare(_SELECT)
    before_owner = {c: routed_acsylla.endpoint_for(c) for c in range(2000)}
    fourth = instances.start()
    host, port = split_endpoint(fourth)
    session = await acsylla.create_cluster([host], port=port, protocol_version=4).create_session()
    for ddl in _SCHEMA:
        await session.execute(acsylla.create_statement(ddl))
    await routed_acsylla.add(fourth, session)

    moved = [c for c, e in before_owner.items() if routed_acsylla.endpoint_for(c) != e]
    assert 0.15 <= len(moved) / len(before_owner) <= 0.35
    before = instances.selects()
    for channel in moved[:10]:
        await routed_acsylla.execute(select, [channel], key=channel)
    assert _delta(before, instances.selects())[fourth] == 10


async def test_acsylla_unprepared_query_with_parameters_is_refused(
    routed_acsylla: RoutedAcsyllaSession,
) -> None:
    with pytest.raises(TypeError, match="RoutedAcsyllaPrepared"):
        await routed_acsylla.execute(_SELECT, [1], key=1)


async def test_acsylla_prepared_statement_reads_back_what_was_written_on_the_owner(
    instances: _Instances, routed_acsylla: RoutedAcsyllaSession
) -> None:
    insert = await routed_acsylla.prepare(
        "INSERT INTO chat.messages (channel_id, ts, body) VALUES (?, ?, ?)"
    )
    select = await routed_acsylla.prepare(_SELECT)
    await routed_acsylla.execute(insert, [7, 1, "hello"], key=7)
    rows = [row.as_dict() for row in await routed_acsylla.execute(select, [7], key=7)]
    assert rows == [{"ts": 1, "body": "hello"}]
    owner = routed_acsylla.endpoint_for(7)
    assert instances.emulators[owner].statements["insert"] == 1
    assert sum(emu.statements["insert"] for emu in instances.emulators.values()) == 1
