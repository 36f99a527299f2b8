"""Herd targets that read through a real driver: the built-in emulator or a real cluster.

`ScyllaTarget` reads the newest messages of hot channels, Discord-style
(``messages ((channel_id, bucket), message_id)``), with cassandra-driver or acsylla.
Direct reads go straight through the driver; coalesced reads go through one
`CoalescingSession` per *instance*. Several instances stand for several data-service
processes in front of one database: a `Router` sends each channel to its owner
(``hash``) or a caller picks any instance (``random``), which is what routing is for.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from typing import Any

from coalesce.emulator import Emulator
from coalesce.router import Router
from coalesce.scylla import CoalescingSession
from coalesce.scylla.cassandra_driver import as_asyncio

__all__ = ["ScyllaTarget", "TargetUnreachable"]

KEYSPACE = "coalesce_bench"
_SCHEMA = (
    f"CREATE KEYSPACE IF NOT EXISTS {KEYSPACE} WITH replication = "
    "{'class': 'SimpleStrategy', 'replication_factor': 1}",
    f"CREATE TABLE IF NOT EXISTS {KEYSPACE}.messages (channel_id bigint, bucket int,"
    " message_id bigint, author_id bigint, content text,"
    " PRIMARY KEY ((channel_id, bucket), message_id)) WITH CLUSTERING ORDER BY (message_id DESC)",
)
_INSERT = (
    f"INSERT INTO {KEYSPACE}.messages (channel_id, bucket, message_id, author_id, content)"
    " VALUES (?, ?, ?, ?, ?)"
)
_SELECT = f"SELECT * FROM {KEYSPACE}.messages WHERE channel_id = ? AND bucket = ? LIMIT 50"
_MESSAGES_PER_CHANNEL = 50


class TargetUnreachable(ConnectionError):
    """The database did not take a connection; the message says where and why."""


class ScyllaTarget:
    """Hot channels behind a real driver; use as ``async with``.

    With no ``hosts`` it starts an in-process emulator with the given latency model
    (one shard serves a partition's reads one at a time, as in Scylla) and counts
    upstream reads on the emulator itself; against a real cluster it counts the
    reads that left this process. Entering raises `TargetUnreachable` when no node
    takes a connection.
    """

    def __init__(
        self,
        *,
        driver: str = "cassandra-driver",
        hosts: list[tuple[str, int]] | None = None,
        channels: int = 1,
        latency: float = 0.001,
        shards: int = 4,
    ) -> None:
        if driver not in ("cassandra-driver", "acsylla"):
            raise ValueError(f"unknown driver {driver!r}: use cassandra-driver or acsylla")
        self.driver = driver
        self.hosts = hosts
        self.channels = channels
        self._latency = latency
        self._shards = shards
        self._emulator: Emulator | None = None
        self._session: Any = None
        self._cluster: Any = None
        self._select: Any = None
        self._reads_sent = 0
        self._coalescers: list[CoalescingSession] = []
        where = "a real cluster" if hosts else "the built-in emulator"
        self.name = f"{driver} -> {where}"

    async def __aenter__(self) -> ScyllaTarget:
        hosts = self.hosts
        if not hosts:
            self._emulator = Emulator(
                shards=self._shards, read_latency=self._latency, per_row=0.0
            )
            await self._emulator.start()
            hosts = [(self._emulator.host, self._emulator.port)]
        try:
            if self.driver == "acsylla":
                await self._connect_acsylla(hosts)
            else:
                await self._connect_cassandra(hosts)
        except Exception as exc:
            reason = _unreachable_reason(exc)
            await self.__aexit__(None, None, None)
            if reason is None:
                raise
            where = ",".join(f"{host}:{port}" for host, port in hosts)
            raise TargetUnreachable(f"cannot connect to {where}: {reason}") from exc
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None and self.driver == "acsylla":
            await self._session.close()
        if self._cluster is not None:
            await asyncio.to_thread(self._cluster.shutdown)
        if self._emulator is not None:
            await self._emulator.aclose()

    async def _connect_cassandra(self, hosts: list[tuple[str, int]]) -> None:
        from cassandra.cluster import Cluster

        def connect() -> tuple[Any, Any, Any]:
            cluster = Cluster(
                [h for h, _ in hosts], port=hosts[0][1], protocol_version=4,
                schema_metadata_enabled=False,
            )
            try:
                session = cluster.connect()
                for ddl in _SCHEMA:
                    session.execute(ddl)
                insert = session.prepare(_INSERT)
                for channel in range(self.channels):
                    for message in range(_MESSAGES_PER_CHANNEL):
                        session.execute(insert, (channel, 0, message, 1, f"message {message}"))
                return cluster, session, session.prepare(_SELECT)
            except BaseException:
                cluster.shutdown()  # its threads would keep the process alive
                raise

        # Blocking driver calls leave the loop free: the emulator may live on it.
        self._cluster, self._session, self._select = await asyncio.to_thread(connect)

    async def _connect_acsylla(self, hosts: list[tuple[str, int]]) -> None:
        import acsylla

        cluster = acsylla.create_cluster(
            [h for h, _ in hosts], port=hosts[0][1], protocol_version=4
        )
        setup = await cluster.create_session()
        for ddl in _SCHEMA:
            await setup.execute(acsylla.create_statement(ddl))
        await setup.close()
        self._session = await cluster.create_session(keyspace=KEYSPACE)
        insert = await self._session.create_prepared(_INSERT)
        for channel in range(self.channels):
            for message in range(_MESSAGES_PER_CHANNEL):
                await self._session.execute(
                    insert.bind([channel, 0, message, 1, f"message {message}"])
                )
        self._select = await self._session.create_prepared(_SELECT)

    async def read(self, key: int) -> object:
        """One direct read of channel `key`, no coalescing."""
        self._reads_sent += 1
        if self.driver == "acsylla":
            return await self._session.execute(self._select.bind([key, 0]))
        response = self._session.execute_async(self._select, (key, 0))
        return await as_asyncio(response, asyncio.get_running_loop())

    def upstream_reads(self) -> int:
        if self._emulator is not None:
            return int(self._emulator.statements["select"])
        flights = sum(
            c.group.stats.upstream_ok + c.group.stats.upstream_error
            for c in self._coalescers
            if c.group.stats is not None
        )
        return self._reads_sent + flights

    async def coalesced(
        self, instances: int = 1, routing: str = "hash", seed: int = 7
    ) -> Callable[[int], Awaitable[object]]:
        """A read function going through `instances` coalescing instances.

        ``hash``: a consistent-hash `Router` sends each channel to one instance, so all
        its callers meet there. ``random``: each caller picks an instance at random.
        """
        if routing not in ("hash", "random"):
            raise ValueError(f"unknown routing {routing!r}: use hash or random")
        names = [f"instance-{i}" for i in range(instances)]
        sessions: dict[str, CoalescingSession] = {}
        for name in names:
            sessions[name] = CoalescingSession(
                self._session, name=f"bench-{name}", scope="bench"
            )
            self._coalescers.append(sessions[name])
        prepared = self._select
        if self.driver == "acsylla":
            from coalesce.scylla.acsylla_driver import Prepared

            prepared = Prepared(self._select, _SELECT, KEYSPACE)
        params: Callable[[int], Any] = (
            (lambda key: [key, 0]) if self.driver == "acsylla" else (lambda key: (key, 0))
        )
        router: Router[str] = Router(names)
        chooser = random.Random(seed)

        if instances == 1:
            only = sessions[names[0]]

            async def read_one(key: int) -> object:
                return await only.execute(prepared, params(key))

            return read_one

        async def read(key: int) -> object:
            if routing == "hash":
                name = router.node_for(key)
            else:
                name = names[chooser.randrange(instances)]
            return await sessions[name].execute(prepared, params(key))

        return read


def _unreachable_reason(exc: Exception) -> str | None:
    """Why no node took a connection, in a few words; None if `exc` is another failure."""
    from cassandra.cluster import NoHostAvailable

    if isinstance(exc, NoHostAvailable):
        errors = exc.errors if isinstance(exc.errors, dict) else {}
        if not errors:
            return "no host available"
        inner = next(iter(errors.values()))
        text = str(getattr(inner, "strerror", None) or inner)
        return text.rpartition("Last error: ")[2].lower() or "no host available"
    if isinstance(exc, OSError):
        return (exc.strerror or str(exc)).lower()
    if type(exc).__name__ == "CassErrorLibNoHostsAvailable":  # acsylla
        return str(exc)
    return None
