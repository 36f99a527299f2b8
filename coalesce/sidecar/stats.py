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
- ``coalesce_sidecar_connections_closed_total{reason}``: client connections refused
  (``limit``) or closed (``timeout``, ``protocol_error``) by the sidecar.
- ``coalesce_sidecar_request_duration_seconds{path}``: histogram of request latency as
  clients see it, from the read that brought a request to its answer being written.
  For merged requests it is measured from the arrival of the connection's first
  request in the flight (one observation per request); ``local`` counts USE and
  UNPREPARED answers.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Mapping

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from coalesce.cql import Opcode

__all__ = ["LATENCY_BUCKETS", "PATHS", "Histogram", "SidecarStats", "register_stats"]

PATHS = ("merged", "forwarded", "local")
LATENCY_BUCKETS: tuple[float, ...] = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1,
    2.5, 5, 10,
)


class Histogram:
    """Counts per bucket, bumped on the event loop; `observe(value, n)` counts n at once."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0

    def observe(self, value: float, n: int = 1) -> None:
        self.counts[bisect_left(self.bounds, value)] += n
        self.total += value * n

    def cumulative(self) -> list[tuple[str, float]]:
        out: list[tuple[str, float]] = []
        running = 0
        for bound, count in zip((*(repr(float(b)) for b in self.bounds), "+Inf"),
                                self.counts, strict=True):
            running += count
            out.append((bound, running))
        return out


class SidecarStats:
    """Plain counters, bumped on the event loop, read at scrape time."""

    __slots__ = ("client_connections", "forgets_missed", "forwarded", "frames", "latency",
                 "local", "merged", "protocol_errors", "refused", "ring_forwarded",
                 "ring_members", "ring_served", "timed_out")

    def __init__(self) -> None:
        self.client_connections = 0
        self.frames = [0] * 256
        self.merged = 0
        self.forwarded = 0
        self.local = 0
        self.refused = 0  # connections over max_connections
        self.timed_out = 0  # connections closed by the handshake or idle timeout
        self.protocol_errors = 0  # connections closed for a malformed frame or body
        # The ring: members in this sidecar's view; merged reads sent to their owner
        # (one per flight; `Flights.fallbacks` counts those served here after all);
        # requests other members sent here (hop-marked); members that did not confirm
        # a write's forget in time.
        self.ring_members = 0
        self.ring_forwarded = 0
        self.ring_served = 0
        self.forgets_missed = 0
        # Request latency as clients see it, by path: from the read that brought the
        # request to its answer being written.
        self.latency = {path: Histogram(LATENCY_BUCKETS) for path in PATHS}


class _Collector:
    def __init__(
        self,
        stats: SidecarStats,
        upstream_connections: Callable[[], Mapping[str, int]],
        upstream_errors: Callable[[], int],
        ring_fallbacks: Callable[[], int],
    ) -> None:
        self._stats = stats
        self._upstream_connections = upstream_connections
        self._upstream_errors = upstream_errors
        self._ring_fallbacks = ring_fallbacks

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
        latency = HistogramMetricFamily(
            "coalesce_sidecar_request_duration_seconds",
            "Client requests from the read that brought them to their answer, by path.",
            labels=["path"],
        )
        for path in PATHS:
            histogram = stats.latency[path]
            latency.add_metric([path], histogram.cumulative(), histogram.total)
        members = GaugeMetricFamily(
            "coalesce_sidecar_ring_members", "Members of the ring in this sidecar's view.")
        members.add_metric([], stats.ring_members)
        ring = CounterMetricFamily(
            "coalesce_sidecar_ring_reads",
            "Merged reads by their way around the ring: sent to the owner, served here "
            "after the owner failed, served here for another member.", labels=["way"])
        ring.add_metric(["to_owner"], stats.ring_forwarded)
        ring.add_metric(["fallback"], self._ring_fallbacks())
        ring.add_metric(["for_member"], stats.ring_served)
        missed = CounterMetricFamily(
            "coalesce_sidecar_ring_forgets_missed",
            "Ring members that did not confirm a write's forget within peer_timeout.")
        missed.add_metric([], stats.forgets_missed)
        yield from (clients, upstream, frames, requests, errors, closed, latency, members,
                    ring, missed)


def register_stats(
    stats: SidecarStats,
    registry: CollectorRegistry,
    *,
    upstream_connections: Callable[[], Mapping[str, int]],
    upstream_errors: Callable[[], int],
    ring_fallbacks: Callable[[], int] = lambda: 0,
) -> None:
    """Export `stats` (and the readings of the callables) through `registry`."""
    registry.register(_Collector(stats, upstream_connections, upstream_errors, ring_fallbacks))
