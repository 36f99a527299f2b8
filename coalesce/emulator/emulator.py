"""`Emulator`: one emulated ScyllaDB node on a TCP port, in the running event loop.

It composes the pieces -- schema, storage, system tables, executor, shard
latency model, metrics, CQL server -- and owns their lifecycle::

    async with Emulator(shards=4, read_latency=0.001) as emu:
        cluster = acsylla.create_cluster([emu.host], port=emu.port)
        ...
        emu.statements["select"], emu.shard_queue_depths()

`stop()` closes the listening socket and every client connection at once,
as a crashed node would; `await start()` listens again on the *same* port
with all keyspaces, tables and rows kept (prepared statements are
forgotten, as on a real restart). `forget_prepared()` clears the prepared
cache only, so the next EXECUTE of any id gets UNPREPARED.

All methods must be called from the loop the emulator was started in; for
blocking drivers use `EmulatorThread`, which runs one in a thread of its own.
"""

from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass
from types import TracebackType

from coalesce.emulator.auth import Roles
from coalesce.emulator.executor import Executor
from coalesce.emulator.metrics import EmulatorMetrics
from coalesce.emulator.schema import Schema
from coalesce.emulator.server import CqlServer, LatencyModel, ReadHold
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
    Prometheus registry on.
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

    def __post_init__(self) -> None:
        if self.shards < 1:
            raise ValueError(f"shards must be >= 1, got {self.shards}")
        for name in ("read_latency", "per_row"):
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
    ) -> None:
        self.config = EmulatorConfig(
            host, port, shards, read_latency, write_latency, per_row, auth, max_frame, metrics
        )
        self.host = host
        self.port = port
        self.shard_model = ShardModel(shards)
        self.metrics = EmulatorMetrics(self.shard_model.queue_depths)
        self._schema = Schema()
        self._storage = Storage()
        advertised = "127.0.0.1" if host in ("0.0.0.0", "", "localhost") else host
        self._system = SystemTables(self._schema, self._storage, NodeInfo(address=advertised))
        self.roles = Roles() if auth else None
        self.executor = Executor(self._schema, self._storage, self._system, self.roles)
        latency = LatencyModel(
            read_latency, read_latency if write_latency is None else write_latency, per_row
        )
        self._server = CqlServer(
            self.executor, self.shard_model, self.metrics, latency, auth=auth, max_frame=max_frame
        )
        self._listener: asyncio.Server | None = None
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
        """Listen (again). The first start may pick a free port; restarts reuse it.

        Raises `OSError` if the port cannot be bound. No-op if already running.
        """
        if self._listener is not None:
            return
        loop = asyncio.get_running_loop()
        self._listener = await loop.create_server(
            self._server.protocol,
            self.host,
            self.port,
            reuse_address=True,
            family=socket.AF_INET6 if ":" in self.host else socket.AF_INET,
        )
        sockets = self._listener.sockets
        self.port = int(sockets[0].getsockname()[1])
        if self.config.metrics is not None and self.metrics_port is None:
            metrics_host, metrics_port = self.config.metrics
            self.metrics_port = self.metrics.serve_http(metrics_host, metrics_port)

    def stop(self) -> None:
        """Stop listening and drop every connection now; data is kept for `start()`."""
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()
        self._server.close_connections()
        self.executor.forget_prepared()

    async def aclose(self) -> None:
        """`stop()`, wait for the listener to be fully closed, and stop the metrics endpoint."""
        listener = self._listener
        self.stop()
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
