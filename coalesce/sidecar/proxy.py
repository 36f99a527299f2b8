"""The state every client connection shares.

`Proxy` owns the in-flight table of merged reads (with its read-after-write index),
the statements prepared through the sidecar, the identity the sidecar presents, the
clients listening for schema events, and the count of requests waiting for an answer
(for drain). Single event loop.
"""

from __future__ import annotations

import asyncio
from typing import Final, Protocol

from prometheus_client import CollectorRegistry

from coalesce.cql import COMPRESSION, Frame
from coalesce.metrics import FlightStats, register
from coalesce.sidecar.advertised import Identity
from coalesce.sidecar.config import SidecarConfig
from coalesce.sidecar.flights import Flights
from coalesce.sidecar.statements import StatementCache
from coalesce.sidecar.stats import SidecarStats
from coalesce.sidecar.upstream import Upstream

__all__ = ["EventListener", "Proxy"]

_SCHEMA_CHANGE_PREFIX: Final = b"\x00\x0dSCHEMA_CHANGE"


class EventListener(Protocol):
    def send_event(self, body: bytes) -> None: ...


class Proxy:
    """Shared services of the client connections of one sidecar.

    The flight table's bounds (``max_waiters``, ``max_inflight``, ``max_queued``) come
    from the config; requests refused by them get OVERLOADED. Its counts are exported
    as the single-flight group ``sidecar`` (`coalesce.metrics`).
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
        self.flights: Flights
        flight_stats = FlightStats("sidecar", lambda: len(self.flights))
        register(flight_stats, registry)
        self.flights = Flights(
            flight_stats,
            max_waiters=config.max_waiters,
            max_inflight=config.max_inflight,
            max_queued=config.max_queued,
        )
        self.statements = StatementCache(config.prepared_cache, config.prepared_cache_bytes)
        self.listeners: set[EventListener] = set()
        self.in_flight = 0
        self.loop_time = asyncio.get_running_loop().time
        self._idle = asyncio.Event()
        self._idle.set()

    # -- in-flight accounting, for drain --------------------------------------------------

    # Client connections add to `in_flight` themselves (the herd's path is kept flat).

    def requests_finished(self, count: int = 1) -> None:
        self.in_flight -= count
        if not self.in_flight:
            self._idle.set()

    async def wait_idle(self) -> None:
        """Return once no client request is waiting for an answer."""
        while self.in_flight:
            self._idle.clear()
            await self._idle.wait()

    # -- schema events --------------------------------------------------------------------

    def on_upstream_event(self, frame: Frame) -> None:
        """Relay SCHEMA_CHANGE events to listening clients; drop topology and status."""
        body = frame.body
        if frame.flags & COMPRESSION or not body.startswith(_SCHEMA_CHANGE_PREFIX):
            return
        for listener in list(self.listeners):
            listener.send_event(body)
