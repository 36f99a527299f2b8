"""The state every client connection shares.

`Proxy` owns the in-flight table of merged reads (with its read-after-write index),
the statements prepared through the sidecar, the identity the sidecar presents (and,
in a ring, the ring and the connections to its other members), the clients listening
for events, the count of requests waiting for an answer (for drain), and the ingest
budget.

The ingest budget keeps answers from waiting behind ingest. Client connections
dispatch at most ``INGEST_BUDGET`` frames between two budget refills; a connection
that has more keeps them in its backlog (and stops reading) until the next refill.
A refill happens two loop turns after a connection first had to wait, so every
upstream socket that became readable in between is served first: a herd's answer
leaves soon after Scylla sends it, however many requests are still being read.
Light traffic never waits: it only draws the budget down, one request in
``INGEST_BUDGET`` waits two loop turns for the refill.
Single event loop.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Final, Protocol

from prometheus_client import CollectorRegistry

from coalesce.cql import COMPRESSION, Frame, StatusChangeEvent, TopologyChangeEvent
from coalesce.metrics import FlightStats, register
from coalesce.sidecar.advertised import Cells, Identity, advertised_tokens
from coalesce.sidecar.config import SidecarConfig, parse_address
from coalesce.sidecar.flights import Flights
from coalesce.sidecar.members import Member, SidecarRing
from coalesce.sidecar.peers import Peers
from coalesce.sidecar.statements import StatementCache
from coalesce.sidecar.stats import SidecarStats
from coalesce.sidecar.upstream import Upstream

if TYPE_CHECKING:
    from coalesce.sidecar.client import ClientConnection

__all__ = ["INGEST_BUDGET", "EventListener", "Proxy"]

_log = logging.getLogger(__name__)

INGEST_BUDGET: Final = 256
"""Frames all client connections together dispatch between two refills."""

_SCHEMA_CHANGE_PREFIX: Final = b"\x00\x0dSCHEMA_CHANGE"


class EventListener(Protocol):
    @property
    def events(self) -> frozenset[str]:
        """The event types it registered for."""

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
        self.peers: Peers | None = None  # set by `join_ring`
        # Scylla's latest system.local cells, for the peers tables' rows.
        self.cluster: Cells = upstream.local_row
        self.in_flight = 0
        loop = asyncio.get_running_loop()
        self.loop_time = loop.time
        self._call_soon: Callable[..., object] = loop.call_soon
        self._idle = asyncio.Event()
        self._idle.set()
        self.partial_bytes = 0  # bytes of unfinished frames, all connections together
        self.ingest_seq = 0  # reads from clients so far
        self._budget = INGEST_BUDGET
        self._refill_due = False
        self._deferred: deque[ClientConnection] = deque()
        self.flights.ingest = self

    # -- the ingest budget ----------------------------------------------------------------

    @property
    def backlogged(self) -> bool:
        return bool(self._deferred)

    def take_budget(self, frames: int) -> int:
        """How many of `frames` a connection may dispatch now (it keeps the rest)."""
        budget = self._budget
        taken = frames if frames <= budget else budget
        self._budget = budget - taken
        return taken  # a refill is scheduled once a connection has to wait (`defer`)

    def defer(self, client: ClientConnection) -> None:
        """`client` has a backlog: it is served from the next refills, in turn."""
        self._deferred.append(client)
        if not self._refill_due:
            self._refill_due = True
            self._call_soon(self._call_soon, self._refill)

    def _refill(self) -> None:
        self._refill_due = False
        self._budget = INGEST_BUDGET
        deferred = self._deferred
        while deferred and self._budget > 0:
            client = deferred.popleft()  # take_backlog queues it again if it has more
            self._budget -= client.take_backlog(self._budget)
        oldest = min((c.backlog_seq or 0 for c in deferred), default=None)
        self.flights.drop_settled(oldest)
        if deferred and not self._refill_due:
            self._refill_due = True
            self._call_soon(self._call_soon, self._refill)

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

    # -- the ring ----------------------------------------------------------------------------

    def join_ring(self, ring: SidecarRing) -> None:
        """Merge reads with the other sidecars of `ring` (see `coalesce.sidecar.peers`)."""
        self.peers = Peers(self.config, self.upstream, ring)
        if ring.bounded:
            self.flights.ring = ring
        self.stats.ring_members = len(ring)

    def ring_changed(self, names: tuple[str, ...]) -> None:
        """The ring is now `names`: update it and tell drivers listening for topology.

        A name that is not ``IP:port`` (members advertise IP literals: ``system.peers``
        and events carry inet values) is left out, with a warning.
        """
        peers = self.peers
        assert peers is not None
        usable = [name for name in names if _ip_name(name)]
        if len(usable) != len(names):
            _log.warning("ring members must be named IP:port; ignoring %s",
                         sorted(set(names) - set(usable)))
        added, removed = peers.ring.update(usable)
        self.stats.ring_members = len(peers.ring)
        me = peers.ring.me
        for member in removed:
            peers.member_left(member)
            if member.name != me:
                self._tell("STATUS_CHANGE", StatusChangeEvent("DOWN", _inet(member)).encode())
                self._tell("TOPOLOGY_CHANGE",
                           TopologyChangeEvent("REMOVED_NODE", _inet(member)).encode())
        for member in added:
            if member.name != me:
                self._tell("TOPOLOGY_CHANGE",
                           TopologyChangeEvent("NEW_NODE", _inet(member)).encode())
                self._tell("STATUS_CHANGE", StatusChangeEvent("UP", _inet(member)).encode())

    def peer_members(self) -> tuple[Member, ...]:
        """The members ``system.peers`` lists: every other one."""
        return self.peers.ring.others if self.peers is not None else ()

    def advertised_tokens(self, seen: frozenset[str]) -> frozenset[str]:
        """The tokens of ``system.local``: this member's ring positions in a ring (none
        while it is out of it), else the whole upstream ring."""
        if self.peers is None:
            return advertised_tokens(self.upstream.ring, seen)
        member = self.peers.ring.member(self.peers.ring.me)
        return frozenset(str(t) for t in member.tokens) if member is not None else frozenset()

    # -- events ---------------------------------------------------------------------------

    def on_upstream_event(self, frame: Frame) -> None:
        """Relay SCHEMA_CHANGE events to listening clients; drop Scylla's topology and
        status events (drivers see sidecars, not Scylla nodes)."""
        body = frame.body
        if frame.flags & COMPRESSION or not body.startswith(_SCHEMA_CHANGE_PREFIX):
            return
        self._tell("SCHEMA_CHANGE", body)

    def _tell(self, event_type: str, body: bytes) -> None:
        for listener in list(self.listeners):
            if event_type in listener.events:
                listener.send_event(body)


def _ip_name(name: str) -> bool:
    try:
        host, _ = parse_address(name, default_port=0)
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _inet(member: Member) -> tuple[str, int]:
    return member.host, member.port
