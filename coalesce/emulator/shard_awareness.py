"""How the emulator shows its shards to Scylla's drivers, and which shard a connection is.

On Scylla every client connection belongs to one shard (CPU core), and a
request whose partition lives on another shard is forwarded there: a
cross-shard hop. Shard-aware drivers (scylla-driver, acsylla, the other
ScyllaDB forks) avoid the hop by keeping one connection per shard and
sending each request on the connection of its token's shard. They learn
the sharding from Scylla's extension of the SUPPORTED message
(`sharding_options`) and pick a connection's shard by connecting to the
*shard-aware port* from a local port equal to the shard modulo the shard
count. On the ordinary CQL port the server hands shards out itself, in
turn, so a driver without the shard-aware port fills its pool by opening
connections until it has one on every shard.

`ShardAssigner` makes that choice for each accepted connection;
`placement` says whether a request reached its partitions' shard.
Drivers that do not know the extension (cassandra-driver, the Node.js
driver) ignore the extra SUPPORTED keys and simply pay the hops.
"""

from __future__ import annotations

import itertools
from collections.abc import Collection
from typing import Literal

from coalesce.emulator.shards import IGNORE_MSB_BITS, PARTITIONER, SHARDING_ALGORITHM

__all__ = ["Placement", "ShardAssigner", "placement", "sharding_options"]

Placement = Literal["local", "wrong", "multi"]
"""Where a request's partitions are relative to its connection's shard.

`local`: all on the connection's shard. `wrong`: all on one *other* shard,
so a shard-aware client would have sent it elsewhere. `multi`: spread over
several shards (scans, IN over partitions of several shards, batches), so
no connection would have avoided every hop.
"""


def sharding_options(
    shard: int, shards: int, shard_aware_port: int | None
) -> dict[str, list[str]]:
    """The SUPPORTED entries Scylla sends on a connection that belongs to `shard`.

    `shard_aware_port=None` leaves out SCYLLA_SHARD_AWARE_PORT, as Scylla
    does when that port is disabled.
    """
    options = {
        "SCYLLA_SHARD": [str(shard)],
        "SCYLLA_NR_SHARDS": [str(shards)],
        "SCYLLA_PARTITIONER": [PARTITIONER],
        "SCYLLA_SHARDING_ALGORITHM": [SHARDING_ALGORITHM],
        "SCYLLA_SHARDING_IGNORE_MSB": [str(IGNORE_MSB_BITS)],
    }
    if shard_aware_port is not None:
        options["SCYLLA_SHARD_AWARE_PORT"] = [str(shard_aware_port)]
    return options


class ShardAssigner:
    """Picks the shard of each new connection.

    A connection to the shard-aware port belongs to shard `client port %
    shards`; one to the ordinary port gets the next shard in round-robin
    order (0, 1, ..., shards - 1, 0, ...), counted over that port's
    connections only. Not thread-safe: one event loop calls it.
    """

    def __init__(self, shards: int) -> None:
        if shards < 1:
            raise ValueError(f"shards must be >= 1, got {shards}")
        self.shards = shards
        self._next = itertools.cycle(range(shards))

    def assign(self, client_port: int, *, shard_aware_port: bool) -> int:
        """The shard of a connection from `client_port`, accepted on either listener."""
        if shard_aware_port:
            return client_port % self.shards
        return next(self._next)


def placement(touched: Collection[int], home: int) -> Placement | None:
    """Classify a request that touched the shards `touched` on a connection of shard `home`.

    None for a request that touched no partition (system tables, DDL).
    """
    if not touched:
        return None
    if len(touched) > 1:
        return "multi"
    return "local" if home in touched else "wrong"
