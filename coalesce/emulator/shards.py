"""Shard-per-core latency model: why a hot partition is slow and a spread load is not.

ScyllaDB pins every partition to one CPU shard, and each shard serves one
request at a time. `ShardModel` reproduces that cost structure without
worker tasks: each shard keeps the loop time at which it becomes idle
(`busy_until`). A request *reserves* its service time at the end of each
shard queue it needs and learns its completion time; the caller then
answers at that time (`loop.call_at`) or awaits `serve`. Reserving is
O(1) per shard, requests on one shard complete strictly in reservation
(FIFO) order, and requests on different shards overlap freely.

Shard choice follows Scylla's "biased-token-round-robin" sharding
algorithm (with its default `murmur3_partitioner_ignore_msb_bits = 12`):
the token is biased into the unsigned range, its top `ignore_msb` bits
dropped, and the remaining 64-bit fraction scaled to `shards`. Neighbouring
tokens therefore land on the same shard, as on a real node, and a
shard-aware driver that reads these parameters from SUPPORTED (see
`coalesce.emulator.shard_awareness`) computes the same shard for a token.

A request served on a shard other than the one its connection belongs to
is forwarded there first, as Scylla forwards it between cores: `reserve`
starts such parts `hop` seconds late (the cross-shard hop), without the
hop occupying either shard's queue.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass

from coalesce.cql.token import IGNORE_MSB_BITS, shard_of

__all__ = [
    "IGNORE_MSB_BITS",
    "PARTITIONER",
    "SHARDING_ALGORITHM",
    "Reservation",
    "ShardModel",
    "shard_of",
]

PARTITIONER = "org.apache.cassandra.dht.Murmur3Partitioner"
"""The only partitioner the emulator has (and the one `shard_of` is defined for)."""

SHARDING_ALGORITHM = "biased-token-round-robin"
"""Scylla's name for the token -> shard mapping that `shard_of` implements."""



@dataclass(frozen=True, slots=True)
class Reservation:
    """Work reserved on `shards`, complete at loop time `done`."""

    done: float
    shards: tuple[int, ...]


class ShardModel:
    """Per-shard FIFO service-time queues on an event loop's clock.

    Concurrency: meant for one event loop; there is no await between
    reading and updating a shard's `busy_until`, so any number of
    concurrent requests on that loop are ordered correctly. Every
    `reserve` must be matched by exactly one `release` (queue depth counts
    reserved-but-unreleased requests).
    """

    def __init__(self, shards: int) -> None:
        if shards < 1:
            raise ValueError(f"shards must be >= 1, got {shards}")
        self.shards = shards
        self._busy_until = [0.0] * shards
        self._depth = [0] * shards

    def queue_depth(self, shard: int) -> int:
        """Requests reserved on `shard` and not yet released."""
        return self._depth[shard]

    def queue_depths(self) -> list[int]:
        """`queue_depth` of every shard, indexed by shard."""
        return list(self._depth)

    def reserve(
        self,
        now: float,
        costs: Iterable[tuple[int, float]],
        *,
        home: int | None = None,
        hop: float = 0.0,
    ) -> Reservation:
        """Queue `cost` seconds of work on each `(shard, cost)` behind what is already there.

        Returns when the last part finishes (`now` if nothing costs
        anything). Multi-partition requests (IN queries, batches, scans)
        pass one pair per shard: each shard does its part in its own queue
        and the request completes with the slowest part.

        `home` is the shard of the connection the request arrived on: a
        part on any other shard arrives there `hop` seconds after `now`
        and queues from then on (a zero-cost remote part still delays the
        completion by `hop`). With `home=None` no part is remote.
        """
        done = now
        shards: list[int] = []
        busy = self._busy_until
        for shard, cost in costs:
            start = now if home is None or shard == home else now + hop
            if cost <= 0:
                done = max(done, start)
                continue
            finish = max(start, busy[shard]) + cost
            busy[shard] = finish
            done = max(done, finish)
            self._depth[shard] += 1
            shards.append(shard)
        return Reservation(done, tuple(shards))

    def release(self, reservation: Reservation) -> None:
        """Mark a reservation's work as completed (queue depth goes down)."""
        for shard in reservation.shards:
            self._depth[shard] -= 1

    async def serve(self, costs: Iterable[tuple[int, float]]) -> None:
        """Reserve `costs` and wait until they are done.

        Cancellation stops the wait but keeps the reserved slot, as work a
        real shard already dequeued would; the queue depth is released
        either way.
        """
        loop = asyncio.get_running_loop()
        reservation = self.reserve(loop.time(), costs)
        if not reservation.shards:
            return
        # call_at on the exact reserved time (not sleep(delay)) keeps completions
        # on one shard in reservation order even when the loop runs late.
        waiter: asyncio.Future[None] = loop.create_future()
        handle = loop.call_at(reservation.done, _wake, waiter)
        try:
            await waiter
        finally:
            handle.cancel()
            self.release(reservation)


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)
