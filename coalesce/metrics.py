"""Prometheus instruments for single-flight groups, all in one place.

The hot path never touches `prometheus_client`: each group counts into plain integer
fields of a `FlightStats` (a few nanoseconds per event, no locks, since a group lives on
one event loop), and one collector per registry turns every live group's counts into
metric families when Prometheus scrapes. Groups that share a name are summed.

Exported families (all labelled by ``group``):

- ``coalesce_callers_total{outcome}``: callers by outcome: ``started`` a flight,
  ``joined`` one, ``shed`` by a bound, ``timeout``, ``cancelled``.
- ``coalesce_upstream_calls_total{outcome}``: upstream calls ending ``ok``, ``error``
  or ``cancelled``.
- ``coalesce_inflight_keys``: keys in flight now.
- ``coalesce_flight_waiters``: histogram of callers served per flight.
- ``coalesce_upstream_duration_seconds``: histogram of upstream call latency.
"""

from __future__ import annotations

import weakref
from asyncio import CancelledError
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Sequence

from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

__all__ = ["FlightStats", "register"]

WAITER_BUCKETS: tuple[float, ...] = (1, 2, 5, 10, 50, 100, 500, 1000, 5000, 10000)
LATENCY_BUCKETS: tuple[float, ...] = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5,
)


class _Histogram:
    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value

    def merge_into(self, counts: list[int]) -> float:
        for i, count in enumerate(self.counts):
            counts[i] += count
        return self.total


class FlightStats:
    """Plain counters of one group; cheap to bump, read only at scrape time."""

    __slots__ = (
        "__weakref__",
        "cancelled",
        "joined",
        "latency",
        "name",
        "shed",
        "size",
        "started",
        "timed_out",
        "upstream_cancelled",
        "upstream_error",
        "upstream_ok",
        "waiters",
    )

    def __init__(self, name: str, size: Callable[[], int]) -> None:
        self.name = name
        self.size = size
        self.started = self.joined = self.shed = self.timed_out = self.cancelled = 0
        self.upstream_ok = self.upstream_error = self.upstream_cancelled = 0
        self.waiters = _Histogram(WAITER_BUCKETS)
        self.latency = _Histogram(LATENCY_BUCKETS)

    def ended(self, exception: BaseException | None, waiters: int, seconds: float) -> None:
        """Count one upstream call that ended, its callers and its latency."""
        if exception is None:
            self.upstream_ok += 1
        elif isinstance(exception, CancelledError):
            self.upstream_cancelled += 1
        else:
            self.upstream_error += 1
        self.waiters.observe(waiters)
        self.latency.observe(seconds)


class _GroupCollector:
    """Collects every live `FlightStats` registered with one registry."""

    def __init__(self) -> None:
        self.stats: weakref.WeakSet[FlightStats] = weakref.WeakSet()

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        by_name: dict[str, list[FlightStats]] = {}
        for stats in list(self.stats):
            by_name.setdefault(stats.name, []).append(stats)

        callers = CounterMetricFamily(
            "coalesce_callers", "Callers of a single-flight group by outcome.",
            labels=["group", "outcome"],
        )
        upstream = CounterMetricFamily(
            "coalesce_upstream_calls", "Upstream calls started by a group, by outcome.",
            labels=["group", "outcome"],
        )
        inflight = GaugeMetricFamily(
            "coalesce_inflight_keys", "Keys with a flight in progress.", labels=["group"],
        )
        waiters = HistogramMetricFamily(
            "coalesce_flight_waiters", "Callers served by one flight.", labels=["group"],
        )
        latency = HistogramMetricFamily(
            "coalesce_upstream_duration_seconds", "Latency of upstream calls.",
            labels=["group"],
        )
        for name, members in sorted(by_name.items()):
            for outcome, attr in (
                ("started", "started"), ("joined", "joined"), ("shed", "shed"),
                ("timeout", "timed_out"), ("cancelled", "cancelled"),
            ):
                callers.add_metric([name, outcome], sum(getattr(s, attr) for s in members))
            for outcome, attr in (
                ("ok", "upstream_ok"), ("error", "upstream_error"),
                ("cancelled", "upstream_cancelled"),
            ):
                upstream.add_metric([name, outcome], sum(getattr(s, attr) for s in members))
            inflight.add_metric([name], sum(s.size() for s in members))
            for family, histograms, bounds in (
                (waiters, [s.waiters for s in members], WAITER_BUCKETS),
                (latency, [s.latency for s in members], LATENCY_BUCKETS),
            ):
                counts = [0] * (len(bounds) + 1)
                total = sum(h.merge_into(counts) for h in histograms)
                cumulative: list[tuple[str, float]] = []
                running = 0
                for bound, count in zip((*map(_le, bounds), "+Inf"), counts, strict=True):
                    running += count
                    cumulative.append((bound, running))
                family.add_metric([name], cumulative, total)
        yield from (callers, upstream, inflight, waiters, latency)


def _le(bound: float) -> str:
    return repr(float(bound))


_collectors: dict[int, tuple[CollectorRegistry, _GroupCollector]] = {}


def register(stats: FlightStats, registry: CollectorRegistry | None = None) -> None:
    """Export `stats` through `registry` (the default prometheus registry if None)."""
    registry = REGISTRY if registry is None else registry
    entry = _collectors.get(id(registry))
    if entry is None or entry[0] is not registry:
        collector = _GroupCollector()
        registry.register(collector)
        entry = _collectors[id(registry)] = (registry, collector)
    entry[1].stats.add(stats)
