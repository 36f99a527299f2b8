"""`Emulator`: one emulated ScyllaDB node on a TCP port, in the running event loop.

It composes the pieces -- schema, storage, system tables, executor, shard
latency model, metrics, CQL server -- and owns their lifecycle::

    async with Emulator(shards=4, read_latency=0.001) as emu:
        cluster = acsylla.create_cluster([emu.host], port=emu.port)
        ...
        emu.statements["select"], emu.shard_queue_depths()

Every client connection belongs to one shard. A request's work on any
other shard starts `cross_shard_latency` late (the hop Scylla makes
between cores), and a request whose partitions all live on one other
shard is counted in `emu.wrong_shard_requests`. With `shard_aware=True` the node also looks
like Scylla to Scylla's drivers: SUPPORTED carries Scylla's sharding keys
(SCYLLA_SHARD, SCYLLA_NR_SHARDS, ...) and a second, shard-aware port
(`emu.shard_aware_port`) puts each connection on shard `client port %
shards`, so scylla-driver and acsylla keep one connection per shard and
send each token's requests to its shard. `shard_aware_port=None` keeps the
keys but opens no shard-aware port, like Scylla before 4.3 (drivers then
fill their pools on the ordinary port, which hands shards out in turn).
See `coalesce.emulator.shard_awareness`.

It is off by default because acsylla (the C++ driver) binds each
shard-aware connection to a local port from 49152-65535, which overlaps
Linux's ephemeral range: a port still in TIME_WAIT fails that connection
with "address already in use" and can fail the session. acsylla clients
of a shard-aware emulator should pass a `local_port_range_min` above
`/proc/sys/net/ipv4/ip_local_port_range`, as for a real Scylla.

`stop()` closes the listening sockets and every client connection at once,
as a crashed node would; `await start()` listens again on the *same* ports
with all keyspaces, tables and rows kept (prepared statements are
forgotten, as on a real restart). `forget_prepared()` clears the prepared
cache only, so the next EXECUTE of any id gets UNPREPARED.

All methods must be called from the loop the emulator was started in; for
blocking drivers use `EmulatorThread`, which runs one in a thread of its own.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType

from coalesce.emulator.auth import Roles
from coalesce.emulator.executor import Executor
from coalesce.emulator.metrics import EmulatorMetrics
from coalesce.emulator.schema import Schema
from coalesce.emulator.server import ConnectionInfo, CqlServer, LatencyModel, ReadHold
from coalesce.emulator.shards import ShardModel
from coalesce.emulator.storage import Storage
from coalesce.emulator.system_tables import NodeInfo, SystemTables

__all__ = ["DEFAULT_MAX_FRAME", "Emulator", "EmulatorConfig"]

DEFAULT_MAX_FRAME = 256 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class EmulatorConfig:
    """Everything an emulator is configured with; the CLI fills the same fields.

    Latencies are in seconds; `write_latency=None` means "same as
    `read_latency`". `metrics` is an optional (host, port) to serve the
    Prometheus registry on. `shard_aware` advertises Scylla's sharding in
    SUPPORTED; `shard_aware_port` is the shard-aware port to listen on with
    it (0: any free port; None: none). `cross_shard_latency` is how late a
    request's work starts on a shard other than its connection's.
    """

    host: str = "127.0.0.1"
    port: int = 0
    shards: int = 4
    read_latency: float = 0.001
    write_latency: float | None = None
    per_row: float = 2e-6
    auth: bool = False
    max_frame: int = DEFAULT_MAX_FRAME
    metrics: tuple[str, int] | None = None
    shard_aware: bool = False
    shard_aware_port: int | None = 0
    cross_shard_latency: float = 0.0

    def __post_init__(self) -> None:
        if self.shards < 1:
            raise ValueError(f"shards must be >= 1, got {self.shards}")
        if self.shard_aware_port is not None:
            if not 0 <= self.shard_aware_port <= 65535:
                raise ValueError(f"shard_aware_port out of range: {self.shard_aware_port}")
            if self.shard_aware_port and self.shard_aware_port == self.port:
                raise ValueError("shard_aware_port must differ from port")
        for name in ("read_latency", "per_row", "cross_shard_latency"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        if self.write_latency is not None and self.write_latency < 0:
            raise ValueError("write_latency must be >= 0")
        if self.max_frame < 1024:
            raise ValueError("max_frame must be at least 1024 bytes")


class Emulator:
    """A single emulated node; see the module docstring for the lifecycle contract."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        shards: int = 4,
        read_latency: float = 0.001,
        write_latency: float | None = None,
        per_row: float = 2e-6,
        auth: bool = False,
        max_frame: int = DEFAULT_MAX_FRAME,
        metrics: tuple[str, int] | None = None,
        shard_aware: bool = False,
        shard_aware_port: int | None = 0,
        cross_shard_latency: float = 0.0,
    ) -> None:
        self.config = EmulatorConfig(
            host=host,
            port=port,
            shards=shards,
            read_latency=read_latency,
            write_latency=write_latency,
            per_row=per_row,
            auth=auth,
            max_frame=max_frame,
            metrics=metrics,
            shard_aware=shard_aware,
            shard_aware_port=shard_aware_port,
            cross_shard_latency=cross_shard_latency,
        )
        self.host = host
        self.port = port
        # The shard-aware port: 0 until the first start binds it, None when not listened on.
        self.shard_aware_port: int | None = shard_aware_port if shard_aware else None
        self.shard_model = ShardModel(shards)
        self.metrics = EmulatorMetrics(self.shard_model.queue_depths, shards)
        self._schema = Schema()
        self._storage = Storage()
        advertised = "127.0.0.1" if host in ("0.0.0.0", "", "localhost") else host
        self._system = SystemTables(self._schema, self._storage, NodeInfo(address=advertised))
        self.roles = Roles() if auth else None
        self.executor = Executor(self._schema, self._storage, self._system, self.roles)
        latency = LatencyModel(
            read_latency,
            read_latency if write_latency is None else write_latency,
            per_row,
            cross_shard_latency,
        )
        self._server = CqlServer(
            self.executor,
            self.shard_model,
            self.metrics,
            latency,
            auth=auth,
            max_frame=max_frame,
            shard_aware=shard_aware,
        )
        self._listener: asyncio.Server | None = None
        self._shard_aware_listener: asyncio.Server | None = None
        self.metrics_port: int | None = None

    @classmethod
    def from_config(cls, config: EmulatorConfig) -> Emulator:
        return cls(
            config.host,
            config.port,
            shards=config.shards,
            read_latency=config.read_latency,
            write_latency=config.write_latency,
            per_row=config.per_row,
            auth=config.auth,
            max_frame=config.max_frame,
            metrics=config.metrics,
            shard_aware=config.shard_aware,
            shard_aware_port=config.shard_aware_port,
            cross_shard_latency=config.cross_shard_latency,
        )

    # -------------------------------------------------------------- status

    @property
    def statements(self) -> dict[str, int]:
        """Statements executed so far, by kind (select, insert, ..., system, other)."""
        return self.metrics.statements

    @property
    def registry(self) -> object:
        """This emulator's own prometheus_client `CollectorRegistry`."""
        return self.metrics.registry

    @property
    def running(self) -> bool:
        return self._listener is not None

    @property
    def connection_count(self) -> int:
        """Client connections currently open."""
        return self._server.connection_count

    @property
    def wrong_shard_requests(self) -> int:
        """Requests whose partitions all live on one shard other than their connection's.

        Zero while every request is sent to its token's shard, as a
        shard-aware driver sends token-aware requests; scans and other
        multi-shard requests never count (no connection would be right).
        """
        return self.metrics.wrong_shard_requests

    def connections(self) -> list[ConnectionInfo]:
        """The client connections open right now, ordered by (shard, client port)."""
        return self._server.connections()

    def connections_by_shard(self) -> list[int]:
        """How many client connections are open on each shard right now, indexed by shard."""
        counts = [0] * self.shard_model.shards
        for connection in self._server.connections():
            counts[connection.shard] += 1
        return counts

    async def wait_for_statements(self, kind: str, count: int) -> None:
        """Return once at least `count` statements of `kind` have been executed here.

        The requests counted are already queued on their shards when this
        returns. For tests; call it on the emulator's own loop.
        """
        await self.metrics.wait_for(kind, count)

    def shard_queue_depths(self) -> list[int]:
        """Requests queued or in service on each shard right now."""
        return self.shard_model.queue_depths()

    def hold_reads(self) -> ReadHold:
        """Hold back the responses of user-table reads from now on (see `ReadHold`)."""
        hold = self._server.hold = ReadHold()
        return hold

    def forget_prepared(self) -> None:
        """Drop every prepared statement; the next EXECUTE of any id gets UNPREPARED."""
        self.executor.forget_prepared()

    # ----------------------------------------------------------- lifecycle

    async def start(self) -> None:
        """Listen (again). The first start may pick free ports; restarts reuse them.

        Raises `OSError` if a port cannot be bound (then nothing listens).
        No-op if already running.
        """
        if self._listener is not None:
            return
        listener, self.port = await self._listen(self._server.protocol, self.port)
        if self.shard_aware_port is not None:
            try:
                self._shard_aware_listener, self.shard_aware_port = await self._listen(
                    self._server.shard_aware_protocol, self.shard_aware_port
                )
            except BaseException:
                listener.close()
                raise
            self._server.shard_aware_port = self.shard_aware_port
        self._listener = listener
        if self.config.metrics is not None and self.metrics_port is None:
            metrics_host, metrics_port = self.config.metrics
            self.metrics_port = self.metrics.serve_http(metrics_host, metrics_port)

    async def _listen(
        self, protocol: Callable[[], asyncio.Protocol], port: int
    ) -> tuple[asyncio.Server, int]:
        listener = await asyncio.get_running_loop().create_server(
            protocol,
            self.host,
            port,
            reuse_address=True,
            family=socket.AF_INET6 if ":" in self.host else socket.AF_INET,
        )
        return listener, int(listener.sockets[0].getsockname()[1])

    def stop(self) -> None:
        """Stop listening and drop every connection now; data is kept for `start()`."""
        for listener in self._take_listeners():
            listener.close()
        self._server.close_connections()
        self.executor.forget_prepared()

    def _take_listeners(self) -> list[asyncio.Server]:
        listeners = [self._listener, self._shard_aware_listener]
        self._listener = self._shard_aware_listener = None
        return [listener for listener in listeners if listener is not None]

    async def aclose(self) -> None:
        """`stop()`, wait for the listeners to be fully closed, and stop the metrics endpoint."""
        listeners = [self._listener, self._shard_aware_listener]
        self.stop()
        for listener in listeners:
            if listener is not None:
                await listener.wait_closed()
        # Let transports finish closing so no socket outlives the emulator.
        await asyncio.sleep(0)
        self.metrics.close()
        self.metrics_port = None

    async def __aenter__(self) -> Emulator:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()
