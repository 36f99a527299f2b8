"""The sidecar's in-flight table: one upstream read per key, any number of waiters.

A waiter is a client connection and a stream id, nothing more: joining a flight
appends the stream to that connection's list in the flight, so a herd of 10,000
costs no task, coroutine or future per request. When the answer arrives it is
written to each waiting connection in one buffer, the frame copied once per stream
with only the stream id patched.

The contract the sidecar relies on (`SingleFlight`'s, for callbacks):

- a key has at most one flight that new requests may join; `forget(key)` detaches it
  (its waiters keep their answer, later requests start fresh): read-after-write;
- ``max_waiters`` per flight, ``max_inflight`` flights sending at once, and a queue of
  at most ``max_queued`` flights waiting for a slot; a request over a bound is refused
  at once (the client sees OVERLOADED) and nothing else changes;
- a connection that closes leaves every flight it waits on; a flight nobody waits for
  is abandoned: out of the table, its slot freed, its late answer dropped;
- an upstream failure reaches every waiter of the flight at once;
- a request read from its socket before a flight's answer arrived, but dispatched
  after (it waited in a backlog, see `ClientConnection`), still gets that answer: it
  was concurrent with the flight. Such answers are kept until no request read before
  them waits any more, and a write forgets them like any flight.

`len(flights)` counts joinable keys and `running` the flights holding a slot: both are
zero whenever nothing is in flight. Single event loop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Hashable
from typing import TYPE_CHECKING, Any, Final, Protocol, cast

from coalesce.cql import COMPRESSION, ErrorCode, Frame, compress_body
from coalesce.freshness import FreshnessIndex
from coalesce.metrics import FlightStats
from coalesce.sidecar.errors import UpstreamError
from coalesce.sidecar.exchange import Exchange, error_code
from coalesce.sidecar.statements import KnownStatement

if TYPE_CHECKING:
    from coalesce.sidecar.connection import Outcome
    from coalesce.sidecar.exchange import Connections
    from coalesce.sidecar.members import SidecarRing
    from coalesce.sidecar.upstream import Pool

__all__ = ["FULL", "Answer", "Flight", "Flights", "Ingest", "Waiter"]

_log = logging.getLogger(__name__)
_RESPONSE_V4: Final = 0x84
# What a ring owner answers when it cannot serve a read another member could: it sheds
# load, or it forgot the statement again right after being taught it (a thrashed cache).
_SERVE_HERE: Final = frozenset({ErrorCode.OVERLOADED, ErrorCode.UNPREPARED})
_SHED_QUIET: Final = 5.0  # seconds without a refusal before shedding is said to stop


class Answer:
    """One upstream response as every waiter of a flight receives it.

    `frame(lz4)` is the 9-byte header (stream 0) and body, built once per encoding;
    a waiter's copy differs only in its stream id (bytes 2-3).
    """

    __slots__ = ("_frames", "_lz4", "body", "flags", "opcode")

    def __init__(self, frame: Frame) -> None:
        self.opcode = frame.opcode
        self.flags = frame.flags & ~COMPRESSION
        self.body = frame.body
        self._frames: list[bytes | None] = [None, None]
        self._lz4: bytes | None = None

    def lz4_body(self) -> bytes:
        """The body compressed, once for every LZ4 client."""
        if self._lz4 is None:
            self._lz4 = compress_body(self.body)
        return self._lz4

    def frame(self, lz4: bool) -> bytes:
        frames = self._frames
        built = frames[lz4]
        if built is None:
            body = self.body
            flags = self.flags
            if lz4 and body:
                body = self.lz4_body()
                flags |= COMPRESSION
            built = frames[lz4] = b"".join((
                bytes((_RESPONSE_V4, flags, 0, 0, self.opcode)),
                len(body).to_bytes(4, "big"),
                body,
            ))
        return built


class Ingest(Protocol):
    """How far the sidecar has read from its clients (`Proxy`)."""

    @property
    def ingest_seq(self) -> int:
        """The number of the latest read from any client."""

    @property
    def backlogged(self) -> bool:
        """Some client has frames read but not dispatched."""


class Waiter(Protocol):
    """A client connection, as a flight sees it.

    `answer` and `refuse` do not raise: a waiter keeps its own failure to itself, since
    the flight's other waiters are answered after it.
    """

    @property
    def read_at(self) -> float:
        """Loop time of the read that brought the request being dispatched."""

    def answer(self, flight: Flight, streams: list[int], answer: Answer) -> None: ...

    def refuse(self, flight: Flight, streams: list[int], error: UpstreamError) -> None: ...


class Flight(Exchange):
    """One merged read: its key, its waiters, and the exchange that answers them all."""

    __slots__ = ("answer", "arrived", "count", "fallback", "flights", "joinable", "key",
                 "load_on", "partition", "prepared", "settled_seq",
                 "started", "starter", "state", "table", "waiters")

    def __init__(
        self,
        flights: Flights,
        key: Hashable,
        pool: Connections,
        node: Any,
        opcode: int,
        flags: int,
        body: bytes,
        statement: KnownStatement | None,
        table: Hashable,
        partition: bytes | None,
        shard: int | None = None,
    ) -> None:
        super().__init__(pool, node, opcode, flags, body, statement, shard)
        self.prepared = statement
        # Sent to its owner on the ring: the pool that serves it here if that fails, or
        # if the owner cannot serve it (`_SERVE_HERE`).
        self.fallback: Pool | None = None
        self.load_on: str | None = None  # the ring member its load counts on (bounded loads)
        self.flights = flights
        self.key = key
        self.table = table
        self.partition = partition
        self.waiters: dict[Waiter, list[int]] = {}
        # When each waiter's first request in the flight was read (for its latency).
        self.arrived: dict[Waiter, float] = {}
        self.count = 0
        self.state = _QUEUED
        self.started = 0.0
        self.joinable = False  # the key's current flight: new requests may join it
        self.answer: Answer | None = None
        self.starter: Waiter | None = None  # holds the request bytes until answered
        # Requests read up to this ingest sequence number may still be given `answer`.
        self.settled_seq = -1

    def __repr__(self) -> str:
        return f"<Flight waiters={self.count} state={self.state}>"

    @property
    def abandoned(self) -> bool:
        return self.state != _SENT

    def leave(self, waiter: Waiter) -> None:
        """`waiter` closed: drop its streams; abandon the flight if nobody is left."""
        streams = self.waiters.pop(waiter, None)
        self.arrived.pop(waiter, None)
        if streams is None:
            return
        self.flights.stats.cancelled += len(streams)
        self.count -= len(streams)
        if not self.waiters and self.state != _DONE:
            self.flights._abandon(self)

    def finish(self, outcome: Outcome) -> None:
        if self.state == _DONE:
            return  # abandoned: a late answer nobody waits for
        if self.fallback is not None and (isinstance(outcome, UpstreamError)
                                          or error_code(outcome) in _SERVE_HERE):
            self._serve_here(self.fallback)
            return
        flights = self.flights
        current = self.joinable  # not forgotten by a write: its answer is still current
        waiters = self.waiters
        self.waiters = {}
        # The answers leave first: the table's bookkeeping after them is nobody's latency,
        # and nothing else runs in between.
        if isinstance(outcome, UpstreamError):
            for waiter, streams in waiters.items():
                waiter.refuse(self, streams, outcome)
            flights._ended(self, outcome)
        else:
            answer = self.answer = Answer(outcome)
            for waiter, streams in waiters.items():
                waiter.answer(self, streams, answer)
            flights._ended(self, outcome)
            if current:
                flights._settle(self)
            if self.settled_seq < 0:
                self.answer = None  # kept only while requests read before it may need it
        self.arrived = {}

    def _serve_here(self, pool: Pool) -> None:
        """The owner could not be reached: read from Scylla after all."""
        self.flights.fallbacks += 1
        self.fallback = None
        self.hop = False
        self.pool = pool
        self.node, self.shard = pool.upstream.route(self.partition)
        self.statement = self.prepared
        self.conn = None
        ring = self.flights.ring
        self.flights.ring_moved(self, ring.me if ring is not None else None)
        self.start()

    def fail(self, error: UpstreamError) -> None:
        if self.state != _DONE:
            self.flights._ended(self, error)
        waiters = self.waiters
        self.waiters = {}
        for waiter, streams in waiters.items():
            waiter.refuse(self, streams, error)


_QUEUED, _SENT, _DONE = "queued", "sent", "done"

FULL: Final = cast(Flight, object())
"""What `Flights.join` returns for a flight that has all the waiters it may have."""


class Flights:
    """Keys to the `Flight` new requests may join, with the bounds above.

    `freshness` is this table's read-after-write index: every flight is tracked in it
    from the moment it is sent until it ends or is abandoned.
    """

    __slots__ = (
        "_by_key",
        "_queue",
        "_settled",
        "_shed_recent",
        "_shedding",
        "fallbacks",
        "freshness",
        "ingest",
        "linger",
        "max_inflight",
        "max_queued",
        "max_waiters",
        "ring",
        "running",
        "stats",
    )

    def __init__(
        self,
        stats: FlightStats,
        *,
        max_waiters: int | None = None,
        max_inflight: int | None = None,
        max_queued: int = 0,
    ) -> None:
        self.stats = stats
        self.max_waiters = max_waiters
        self.max_inflight = max_inflight
        self.max_queued = max_queued
        self.linger = 0.0  # FlightTable: answers are never kept after their flight
        self.running = 0
        self._by_key: dict[Hashable, Flight] = {}
        self._queue: deque[Flight] = deque()
        self._shedding: asyncio.TimerHandle | None = None
        self._shed_recent = 0
        # Answered flights whose answer requests read before it arrived may still get.
        self._settled: dict[Hashable, Flight] = {}
        self.ingest: Ingest | None = None
        self.ring: SidecarRing | None = None  # with bounded loads: counts flights per member
        self.fallbacks = 0  # flights sent to their ring owner, served here after all
        self.freshness = FreshnessIndex(self)

    def __len__(self) -> int:
        return len(self._by_key)

    def __contains__(self, key: object) -> bool:
        return key in self._by_key

    def get(self, key: Hashable) -> Flight | None:
        return self._by_key.get(key)

    def join(self, key: Hashable, waiter: Waiter, stream: int, seq: int) -> Flight | None:
        """Add `stream` of `waiter` to the flight of `key` and return that flight.

        None if `key` has no flight (start one); `FULL` (nothing changed) if it has
        ``max_waiters`` already. A request read (at ingest sequence number `seq`)
        before the key's last flight was answered gets that flight back, not joinable,
        its `answer` set: the caller answers at once.
        """
        flight = self._by_key.get(key)
        if flight is None:
            settled = self._settled.get(key)
            if settled is not None and settled.settled_seq >= seq:
                self.stats.joined += 1
                return settled
            return None
        return flight if self.join_flight(flight, waiter, stream) else FULL

    def join_flight(self, flight: Flight, waiter: Waiter, stream: int) -> bool:
        """Add `stream` of `waiter` to `flight` (which must be `joinable`); False (nothing
        changed) if it has ``max_waiters`` already."""
        if self.max_waiters is not None and flight.count >= self.max_waiters:
            self._shed()
            return False
        streams = flight.waiters.get(waiter)
        if streams is None:
            flight.waiters[waiter] = [stream]
            flight.arrived[waiter] = waiter.read_at
        else:
            streams.append(stream)
        flight.count += 1
        self.stats.joined += 1
        return True

    def start(self, flight: Flight, waiter: Waiter, stream: int) -> bool:
        """Make `flight` the key's flight with its first waiter, and send it (or queue it).

        False (nothing changed) when every slot and queue place is taken.
        """
        running = self.max_inflight is not None and self.running >= self.max_inflight
        if running and len(self._queue) >= self.max_queued:
            self._shed()
            return False
        if running:
            self._queue.append(flight)
        else:  # first: no answer can come before the bookkeeping below is done
            self._send(flight)
        flight.waiters[waiter] = [stream]
        flight.arrived[waiter] = waiter.read_at
        flight.count = 1
        self.stats.started += 1
        old = self._by_key.get(flight.key)
        if old is not None:
            old.joinable = False
        self._by_key[flight.key] = flight
        flight.joinable = True
        return True

    def forget(self, key: Hashable) -> bool:
        """Later requests for `key` start a new flight; the current one keeps its waiters."""
        settled = self._settled.pop(key, None)
        if settled is not None:
            self._unsettle(settled)
        flight = self._by_key.pop(key, None)
        if flight is None:
            return settled is not None
        flight.joinable = False
        return True

    def forget_all(self) -> None:
        for flight in self._by_key.values():
            flight.joinable = False
        self._by_key.clear()
        self.drop_settled(None)

    @property
    def settled(self) -> int:
        """Answered flights still kept for requests read before their answer."""
        return len(self._settled)

    def drop_settled(self, oldest: int | None) -> None:
        """Forget answers no request read at or after ingest sequence `oldest` may get
        (None: every one)."""
        if not self._settled:
            return
        for key, flight in list(self._settled.items()):
            if oldest is None or flight.settled_seq < oldest:
                del self._settled[key]
                self._unsettle(flight)

    # -- internals ----------------------------------------------------------------------

    def _shed(self) -> None:
        """Count a refused request; say once when shedding starts, once when it stops."""
        self.stats.shed += 1
        self._shed_recent += 1
        if self._shedding is None:
            _log.warning("shedding load: requests over max_waiters/max_inflight/max_queued "
                         "are refused with OVERLOADED")
            self._shedding = asyncio.get_running_loop().call_later(
                _SHED_QUIET, self._shedding_check, self._shed_recent)

    def _shedding_check(self, seen: int) -> None:
        if self._shed_recent != seen:  # still shedding: look again later
            self._shedding = asyncio.get_running_loop().call_later(
                _SHED_QUIET, self._shedding_check, self._shed_recent)
            return
        _log.warning("shedding stopped after %d refused requests", self._shed_recent)
        self._shedding = None
        self._shed_recent = 0

    def _settle(self, flight: Flight) -> None:
        """`flight` was answered: requests already read but not dispatched may share it."""
        ingest = self.ingest
        if ingest is None or not ingest.backlogged:
            return
        old = self._settled.pop(flight.key, None)
        if old is not None:
            self._unsettle(old)
        flight.settled_seq = ingest.ingest_seq
        self._settled[flight.key] = flight
        self.freshness.track(flight.key, flight.table, flight.partition)

    def _unsettle(self, flight: Flight) -> None:
        flight.settled_seq = -1
        flight.answer = None
        self.freshness.untrack(flight.key, flight.table, flight.partition)

    def _send(self, flight: Flight) -> None:
        flight.state = _SENT
        flight.started = time.perf_counter()
        flight.start()  # (its answer comes in a later callback, never from inside)
        self.running += 1
        self.freshness.track(flight.key, flight.table, flight.partition)

    def _release(self, flight: Flight) -> None:
        """`flight` leaves the table and gives its slot to the next queued flight."""
        if flight.joinable:
            flight.joinable = False
            del self._by_key[flight.key]
        if flight.state == _SENT:
            self.running -= 1
            self.freshness.untrack(flight.key, flight.table, flight.partition)
        elif flight in self._queue:
            self._queue.remove(flight)
        flight.state = _DONE
        if flight.load_on is not None:
            self.ring_moved(flight, None)
        queue = self._queue
        while queue and (self.max_inflight is None or self.running < self.max_inflight):
            self._send(queue.popleft())

    def ring_moved(self, flight: Flight, member: str | None) -> None:
        """With bounded loads, `flight` now counts on ring member `member` (None: none)."""
        ring = self.ring
        if ring is None:
            return
        if flight.load_on is not None:
            ring.release(flight.load_on)
        flight.load_on = member
        if member is not None:
            ring.acquire(member)

    def _ended(self, flight: Flight, outcome: Outcome) -> None:
        sent = flight.state == _SENT
        self._release(flight)
        if sent:
            self.stats.ended(outcome if isinstance(outcome, UpstreamError) else None,
                             flight.count, time.perf_counter() - flight.started)

    def _abandon(self, flight: Flight) -> None:
        if flight.state == _SENT:
            self.stats.upstream_cancelled += 1
        self._release(flight)
