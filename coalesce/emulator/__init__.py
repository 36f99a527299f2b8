"""A test and benchmark stand-in for ScyllaDB -- not a database.

The emulator speaks the CQL native protocol v4 on a TCP port, keeps tables
in memory, and models Scylla's shard-per-core cost structure (each
partition's requests queue FIFO on one shard), so herds of identical reads
on a hot partition are as slow here as they are on a real node. Real
drivers (cassandra-driver, acsylla, cqlsh) connect to it unmodified; with
`shard_aware=True` it also advertises Scylla's sharding and a shard-aware
port, so scylla-driver and acsylla route each token to its shard (see
`coalesce.emulator.shard_awareness`).

It is for tests and benchmarks only: nothing is persisted, there is one
node, no replication, no consistency levels, TTLs are ignored, and only a
subset of CQL is understood (see `coalesce.emulator.parser`).
"""

from coalesce.emulator.emulator import DEFAULT_MAX_FRAME, Emulator, EmulatorConfig
from coalesce.emulator.errors import (
    AlreadyExists,
    BadCredentials,
    ConfigurationError,
    CqlRequestError,
    CqlSyntaxError,
    EmulatorError,
    InvalidRequest,
    ProtocolViolation,
    Unauthorized,
    Unprepared,
)
from coalesce.emulator.metrics import STATEMENT_KINDS
from coalesce.emulator.server import ConnectionInfo, ReadHold
from coalesce.emulator.shards import ShardModel, shard_of
from coalesce.emulator.thread import EmulatorThread

__all__ = [
    "DEFAULT_MAX_FRAME",
    "STATEMENT_KINDS",
    "AlreadyExists",
    "BadCredentials",
    "ConfigurationError",
    "ConnectionInfo",
    "CqlRequestError",
    "CqlSyntaxError",
    "Emulator",
    "EmulatorConfig",
    "EmulatorError",
    "EmulatorThread",
    "InvalidRequest",
    "ProtocolViolation",
    "ReadHold",
    "ShardModel",
    "Unauthorized",
    "Unprepared",
    "shard_of",
]
