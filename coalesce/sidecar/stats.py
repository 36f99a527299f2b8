"""The sidecar's own Prometheus instruments.

As in `coalesce.metrics`, the hot path only bumps plain integers on a `SidecarStats`;
a collector registered on the sidecar's `CollectorRegistry` turns them into metric
families when Prometheus scrapes. Exported:

- ``coalesce_sidecar_client_connections``: client connections open now.
- ``coalesce_sidecar_upstream_connections{node}``: pooled connections per Scylla node.
- ``coalesce_sidecar_frames_total{opcode}``: request frames received from clients.
- ``coalesce_sidecar_requests_total{path}``: client requests by how they were served:
  ``merged`` (took the coalescing path: shared a flight or started one), ``forwarded``
  (passed through to Scylla alone) or ``local`` (answered by the sidecar itself).
- ``coalesce_sidecar_upstream_errors_total``: upstream failures (connections refused or
  lost, requests timed out).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from coalesce.cql import Opcode

__all__ = ["SidecarStats", "register_stats"]


class SidecarStats:
    """Plain counters, bumped on the event loop, read at scrape time."""

    __slots__ = ("client_connections", "forwarded", "frames", "local", "merged",
                 "protocol_errors", "refused", "timed_out")

    def __init__(self) -> None:
        self.client_connections = 0
        self.frames = [0] * 256
        self.merged = 0
        self.forwarded = 0
        self.local = 0
        self.refused = 0  # connections over max_connections
        self.timed_out = 0  # connections closed by the handshake or idle timeout
        self.protocol_errors = 0  # connections closed for a malformed frame or body


class _Collector:
    def __init__(
        self,
        stats: SidecarStats,
        upstream_connections: Callable[[], Mapping[str, int]],
        upstream_errors: Callable[[], int],
    ) -> None:
        self._stats = stats
        self._upstream_connections = upstream_connections
        self._upstream_errors = upstream_errors

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        stats = self._stats
        clients = GaugeMetricFamily(
            "coalesce_sidecar_client_connections", "Client connections open now."
        )
        clients.add_metric([], stats.client_connections)
        upstream = GaugeMetricFamily(
            "coalesce_sidecar_upstream_connections",
            "Pooled connections to each upstream node.", labels=["node"],
        )
        for node, count in sorted(self._upstream_connections().items()):
            upstream.add_metric([node], count)
        frames = CounterMetricFamily(
            "coalesce_sidecar_frames", "Request frames received from clients, by opcode.",
            labels=["opcode"],
        )
        for opcode in Opcode:
            count = stats.frames[opcode]
            if count:
                frames.add_metric([opcode.name], count)
        requests = CounterMetricFamily(
            "coalesce_sidecar_requests", "Client requests by how they were served.",
            labels=["path"],
        )
        for path in ("merged", "forwarded", "local"):
            requests.add_metric([path], getattr(stats, path))
        errors = CounterMetricFamily(
            "coalesce_sidecar_upstream_errors", "Upstream connection and request failures."
        )
        errors.add_metric([], self._upstream_errors())
        closed = CounterMetricFamily(
            "coalesce_sidecar_connections_closed",
            "Client connections the sidecar refused or closed, by reason.", labels=["reason"],
        )
        for reason, attr in (("limit", "refused"), ("timeout", "timed_out"),
                             ("protocol_error", "protocol_errors")):
            closed.add_metric([reason], getattr(stats, attr))
        yield from (clients, upstream, frames, requests, errors, closed)


def register_stats(
    stats: SidecarStats,
    registry: CollectorRegistry,
    *,
    upstream_connections: Callable[[], Mapping[str, int]],
    upstream_errors: Callable[[], int],
) -> None:
    """Export `stats` (and the two upstream readings) through `registry`."""
    registry.register(_Collector(stats, upstream_connections, upstream_errors))
