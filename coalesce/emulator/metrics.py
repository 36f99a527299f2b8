"""Per-emulator statement counters and their Prometheus export.

Each `Emulator` owns one `EmulatorMetrics` with its own
`CollectorRegistry`, so several emulators in one process (as in tests)
never mix their numbers. `statements` is a plain dict readable at any time
(`metrics.statements["select"]`); the registry exports the same counts as
`coalesce_emulator_statements_total{kind=...}` and the live shard queue
depths as `coalesce_emulator_shard_queue_depth{shard=...}`.

Requests that touch partitions are also counted by where they landed
(see `coalesce.emulator.shard_awareness.placement`): `shard_requests[s]`
counts those that arrived on a connection of shard `s`
(`coalesce_emulator_shard_requests_total{shard=...}`), and
`wrong_shard_requests` those whose partitions all live on one shard other
than their connection's (`coalesce_emulator_wrong_shard_requests_total`):
zero for a shard-aware driver sending token-aware requests.

`serve_http(host, port)` exposes the registry on a loopback HTTP endpoint
from a daemon thread; `close()` shuts it down.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterable
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from coalesce.emulator.shard_awareness import Placement

__all__ = ["STATEMENT_KINDS", "EmulatorMetrics"]

STATEMENT_KINDS = ("select", "insert", "update", "delete", "batch", "ddl", "system", "other")


class _QueueDepthCollector(Collector):
    def __init__(self, depths: Callable[[], list[int]]) -> None:
        self._depths = depths

    def collect(self) -> Iterable[Metric]:
        family = GaugeMetricFamily(
            "coalesce_emulator_shard_queue_depth",
            "Requests queued or in service on each emulated shard.",
            labels=["shard"],
        )
        for shard, depth in enumerate(self._depths()):
            family.add_metric([str(shard)], depth)
        yield family


class EmulatorMetrics:
    """Counters of one emulator; see the module docstring.

    `count` is called from the emulator's loop thread; reading
    `statements` from another thread is safe (single dict item reads).
    """

    def __init__(self, queue_depths: Callable[[], list[int]], shards: int) -> None:
        self.registry = CollectorRegistry()
        self.statements: dict[str, int] = dict.fromkeys(STATEMENT_KINDS, 0)
        self._counter = Counter(
            "coalesce_emulator_statements",
            "CQL statements executed by the emulator, by kind.",
            ["kind"],
            registry=self.registry,
        )
        self._children = {kind: self._counter.labels(kind=kind) for kind in STATEMENT_KINDS}
        self.registry.register(_QueueDepthCollector(queue_depths))
        self.shard_requests = [0] * shards
        self.wrong_shard_requests = 0
        shard_counter = Counter(
            "coalesce_emulator_shard_requests",
            "Requests touching partitions, by the shard of the connection they arrived on.",
            ["shard"],
            registry=self.registry,
        )
        self._shard_children = [shard_counter.labels(shard=str(s)) for s in range(shards)]
        self._wrong_shard = Counter(
            "coalesce_emulator_wrong_shard_requests",
            "Requests whose partitions all live on one shard other than their connection's.",
            registry=self.registry,
        )
        self._http: tuple[WSGIServer, threading.Thread] | None = None
        self._waiters: list[tuple[str, int, asyncio.Future[None]]] = []

    def count(self, kind: str, n: int = 1) -> None:
        """Record `n` executed statements of `kind` (one of `STATEMENT_KINDS`)."""
        self.statements[kind] = self.statements.get(kind, 0) + n
        child = self._children.get(kind)
        if child is not None:
            child.inc(n)
        if self._waiters:
            self._wake()

    def count_placement(self, shard: int, where: Placement) -> None:
        """Record a request that touched partitions, on a connection of `shard`."""
        self.shard_requests[shard] += 1
        self._shard_children[shard].inc()
        if where == "wrong":
            self.wrong_shard_requests += 1
            self._wrong_shard.inc()

    async def wait_for(self, kind: str, count: int) -> None:
        """Return once at least `count` statements of `kind` have been executed.

        Must be awaited on the loop that calls `count`. Cancelling the wait
        has no other effect.
        """
        if self.statements.get(kind, 0) >= count:
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (kind, count, waiter)
        self._waiters.append(entry)
        try:
            await waiter
        finally:
            if entry in self._waiters:
                self._waiters.remove(entry)

    def _wake(self) -> None:
        for kind, count, waiter in list(self._waiters):
            if self.statements.get(kind, 0) >= count and not waiter.done():
                waiter.set_result(None)

    def serve_http(self, host: str, port: int) -> int:
        """Serve the registry over HTTP on (host, port); returns the bound port."""
        if self._http is not None:
            raise RuntimeError("metrics endpoint already running")
        server, thread = start_http_server(port, addr=host, registry=self.registry)
        self._http = (server, thread)
        return int(server.server_port)

    def close(self) -> None:
        """Stop the HTTP endpoint, if running (idempotent)."""
        if self._http is None:
            return
        server, thread = self._http
        self._http = None
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
