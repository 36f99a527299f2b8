"""The state every client connection shares, and the one upstream round trip they merge.

`Proxy` owns the single-flight group (one flight per coalescing key), the
read-after-write index over it, the prepared statements seen passing through, the
identity the sidecar presents, and the clients listening for schema events. Its
`fetch` is the function a flight runs: one upstream request, retried once after a
transparent re-prepare when the node answers UNPREPARED. `Answer` is what a flight
shares: the response frame, compressed at most once for all LZ4 clients.
"""

from __future__ import annotations

import asyncio
from collections.abc import Hashable
from typing import Final, Protocol

from prometheus_client import CollectorRegistry

from coalesce.cql import (
    COMPRESSION,
    CUSTOM_PAYLOAD,
    TRACING,
    WARNING,
    ErrorCode,
    Frame,
    Opcode,
    Prepare,
    compress_body,
    split_extras,
)
from coalesce.flight import SingleFlight
from coalesce.freshness import FreshnessIndex
from coalesce.sidecar.bodies import error_code
from coalesce.sidecar.config import SidecarConfig
from coalesce.sidecar.errors import UpstreamError
from coalesce.sidecar.pool import Node, Pool, Upstream
from coalesce.sidecar.prepared import PreparedStatement, PreparedStatements
from coalesce.sidecar.stats import SidecarStats
from coalesce.sidecar.topology import Identity
from coalesce.sidecar.upstream import UpstreamConnection

__all__ = ["Answer", "EventListener", "Proxy", "is_unprepared"]

_EXTRAS: Final = TRACING | WARNING | CUSTOM_PAYLOAD
_SCHEMA_CHANGE_PREFIX: Final = b"\x00\x0dSCHEMA_CHANGE"


def is_unprepared(frame: Frame) -> bool:
    """Whether a response frame is the ERROR "unprepared statement"."""
    if frame.opcode != Opcode.ERROR:
        return False
    body = frame.body
    if frame.flags & _EXTRAS:
        _, body = split_extras(frame.flags, body, response=True)
    return error_code(frame.opcode, body) == ErrorCode.UNPREPARED


class Answer:
    """One upstream response as every client of a flight receives it.

    Immutable apart from the compressed body, computed on first demand and reused
    for every LZ4 client (single event loop, so no lock).
    """

    __slots__ = ("_lz4", "body", "flags", "opcode")

    def __init__(self, frame: Frame) -> None:
        self.opcode = frame.opcode
        self.flags = frame.flags & ~COMPRESSION
        self.body = frame.body
        self._lz4: bytes | None = None

    def lz4_body(self) -> bytes:
        if self._lz4 is None:
            self._lz4 = compress_body(self.body)
        return self._lz4


class EventListener(Protocol):
    def send_event(self, body: bytes) -> None: ...


class Proxy:
    """Shared services of the client connections of one sidecar.

    Concurrency: everything runs on one event loop. The single-flight group's bounds
    (``max_waiters``, ``max_inflight``, ``max_queued``) come from the config; callers
    shed by them get `coalesce.errors.Overloaded`, which clients see as OVERLOADED.
    """

    def __init__(
        self,
        config: SidecarConfig,
        upstream: Upstream,
        identity: Identity,
        *,
        registry: CollectorRegistry,
    ) -> None:
        self.config = config
        self.upstream = upstream
        self.identity = identity
        self.stats = SidecarStats()
        self.group: SingleFlight[Answer] = SingleFlight(
            "sidecar",
            max_waiters=config.max_waiters,
            max_inflight=config.max_inflight,
            max_queued=config.max_queued,
            registry=registry,
        )
        self.freshness = FreshnessIndex(self.group)
        self.prepared = PreparedStatements()
        self.listeners: set[EventListener] = set()
        self.in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    # -- in-flight accounting, for drain --------------------------------------------------

    def request_started(self) -> None:
        self.in_flight += 1
        self._idle.clear()

    def request_finished(self) -> None:
        self.in_flight -= 1
        if not self.in_flight:
            self._idle.set()

    async def wait_idle(self) -> None:
        """Return once no client request is waiting for an answer."""
        await self._idle.wait()

    # -- upstream round trips -------------------------------------------------------------

    async def fetch(
        self,
        key: Hashable,
        pool: Pool,
        node: Node | None,
        opcode: int,
        body: bytes,
        flags: int,
        table: Hashable,
        partition: bytes | None,
        statement: PreparedStatement | None,
    ) -> Answer:
        """The call a flight runs: one upstream request, tracked for read-after-write."""
        with self.freshness.reading(key, table, partition):
            frame = await self.exchange(pool, node, opcode, body, flags, statement)
        return Answer(frame)

    async def exchange(
        self,
        pool: Pool,
        node: Node | None,
        opcode: int,
        body: bytes,
        flags: int,
        statement: PreparedStatement | None,
    ) -> Frame:
        """Send one request through `pool` (to `node` if it has a connection).

        An UNPREPARED answer to an EXECUTE of a known `statement` is handled here: the
        statement is prepared again on that node and the request retried once.
        Raises `UpstreamError`.
        """
        try:
            conn = pool.pick(node) or await pool.acquire(node)
            frame = await conn.request(opcode, body, flags)
            if statement is not None and is_unprepared(frame):
                await self.reprepare(pool.role, conn, statement)
                frame = await conn.request(opcode, body, flags)
        except UpstreamError:
            self.upstream.errors += 1
            raise
        return frame

    async def reprepare(
        self, role: str, conn: UpstreamConnection, statement: PreparedStatement
    ) -> bool:
        """Prepare `statement` again on the node behind `conn`; whether it worked.

        Scylla derives a statement's id from its text and the preparing connection's
        keyspace, so the PREPARE goes over a connection of that node using the
        keyspace the statement was first prepared with.
        """
        target: UpstreamConnection | None = conn
        if conn.keyspace != statement.keyspace or conn.closed:
            node = next((n for n in self.upstream.nodes if n.name == conn.node), None)
            pool = self.upstream.pool(role, statement.keyspace)
            target = await pool.acquire(node)
            if target.node != conn.node:
                return False
        assert target is not None
        reply = await target.request(Opcode.PREPARE, Prepare(statement.query).encode())
        return reply.opcode == Opcode.RESULT

    # -- schema events --------------------------------------------------------------------

    def on_upstream_event(self, frame: Frame) -> None:
        """Relay SCHEMA_CHANGE events to listening clients; drop topology and status."""
        body = frame.body
        if frame.flags & COMPRESSION or not body.startswith(_SCHEMA_CHANGE_PREFIX):
            return
        for listener in list(self.listeners):
            listener.send_event(body)
