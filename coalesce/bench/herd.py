"""`coalesce bench herd`: N concurrent reads of one hot key, with and without coalescing.

A run starts every caller at once against a target, in two modes: ``direct`` (every
caller reads upstream) and ``coalesced`` (callers go through a `SingleFlight`), and
reports upstream reads, caller latency percentiles, throughput and CPU per caller.
The built-in target is an in-process stand-in for one hot partition: a single server
that serves reads one at a time, each taking ``latency`` seconds, as a Scylla shard
serves one partition. That queue is what a herd melts.
"""

from __future__ import annotations

import asyncio
import json
import random
import textwrap
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from coalesce.flight import SingleFlight

__all__ = [
    "HerdConfig",
    "HerdResult",
    "HotPartition",
    "Target",
    "format_table",
    "plot",
    "run_herd",
    "single_flight_read",
    "write_json",
]


class Target(Protocol):
    """Something a herd reads from: one hot key, and a count of upstream reads."""

    name: str

    async def read(self, key: int) -> object: ...

    def upstream_reads(self) -> int: ...


class HotPartition:
    """An in-process upstream with one FIFO server: each read holds it `latency` s."""

    name = "in-process hot partition"

    def __init__(self, latency: float) -> None:
        self.latency = latency
        self._busy_until = 0.0
        self._reads = 0

    async def read(self, key: int) -> object:
        loop = asyncio.get_running_loop()
        self._reads += 1
        start = max(loop.time(), self._busy_until)
        self._busy_until = start + self.latency
        await asyncio.sleep(self._busy_until - loop.time())
        return ("row", key)

    def upstream_reads(self) -> int:
        return self._reads


@dataclass
class HerdConfig:
    """One herd: `callers` reads of `channels` hot keys (caller i reads key i % channels).

    With ``spread`` 0 every caller arrives at once; otherwise arrivals are uniform over
    ``spread`` seconds (seeded, the same in every mode).
    """

    callers: int = 10_000
    latency: float = 0.001
    channels: int = 1
    spread: float = 0.0
    seed: int = 1


@dataclass
class HerdResult:
    mode: str
    target: str
    callers: int
    upstream_reads: int
    errors: int
    wall_seconds: float
    cpu_us_per_caller: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    latencies_ms: list[float] = field(repr=False, default_factory=list)

    @property
    def throughput(self) -> float:
        return self.callers / self.wall_seconds if self.wall_seconds else 0.0

    def summary(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("latencies_ms")
        data["throughput_per_s"] = round(self.throughput, 1)
        return data


def _percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    index = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[index]


async def _herd(
    mode: str,
    read: Callable[[int], Awaitable[object]],
    config: HerdConfig,
    target: Target,
    progress: Callable[[str, int, int], None] | None,
) -> HerdResult:
    loop = asyncio.get_running_loop()
    clock = time.perf_counter  # uvloop's loop.time() only has millisecond resolution
    before = target.upstream_reads()
    latencies: list[float] = []
    errors = 0
    gate = asyncio.Event()
    arrivals = random.Random(config.seed)

    async def caller(key: int, delay: float) -> None:
        nonlocal errors
        await gate.wait()
        if delay:
            await asyncio.sleep(delay)
        start = clock()
        try:
            await read(key)
        except Exception:
            errors += 1
        latencies.append(clock() - start)

    tasks = [
        loop.create_task(caller(i % config.channels, arrivals.uniform(0, config.spread)))
        for i in range(config.callers)
    ]
    done: asyncio.Future[list[None]] | None = None
    try:
        await asyncio.sleep(0)  # every caller is parked on the gate
        cpu, wall = time.process_time(), time.perf_counter()
        gate.set()
        done = asyncio.gather(*tasks)
        while progress is not None and not done.done():
            progress(mode, len(latencies), config.callers)
            await asyncio.wait([done], timeout=0.2)
        await done
    except asyncio.CancelledError:
        # Interrupted (Ctrl-C): the callers end with the run. Open the gate first: a
        # caller cancelled while parked removes itself from the gate's waiter deque, and
        # in the arbitrary order asyncio.run cancels leftover tasks that is O(callers^2);
        # woken in order, each removal is O(1).
        gate.set()
        for task in tasks:
            task.cancel()
        if done is not None:  # it now holds a CancelledError; asyncio would log it at exit
            done.add_done_callback(lambda f: f.cancelled() or f.exception())
        raise
    if progress is not None:
        progress(mode, len(latencies), config.callers)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    ordered = sorted(latencies)
    return HerdResult(
        mode=mode,
        target=target.name,
        callers=config.callers,
        upstream_reads=target.upstream_reads() - before,
        errors=errors,
        wall_seconds=wall,
        cpu_us_per_caller=cpu / config.callers * 1e6,
        p50_ms=_percentile(ordered, 0.50) * 1e3,
        p99_ms=_percentile(ordered, 0.99) * 1e3,
        max_ms=(ordered[-1] if ordered else 0.0) * 1e3,
        latencies_ms=[v * 1e3 for v in latencies],
    )


def single_flight_read(target: Target) -> Callable[[int], Awaitable[object]]:
    """The plain coalesced path: a `SingleFlight` around ``target.read``."""
    group: SingleFlight[object] = SingleFlight("bench-herd", metrics=False)

    async def read(key: int) -> object:
        return await group.do(key, target.read, key)

    return read


async def run_herd(
    config: HerdConfig,
    target: Target,
    reads: dict[str, Callable[[int], Awaitable[object]]],
    *,
    progress: Callable[[str, int, int], None] | None = None,
) -> list[HerdResult]:
    """Run the herd once per mode (name -> read function) and return the results.

    ``progress(mode, done, total)`` is called a few times a second while a mode runs
    (never per caller, so it costs the measurement nothing).
    """
    return [await _herd(mode, read, config, target, progress) for mode, read in reads.items()]


def format_table(results: list[HerdResult]) -> str:
    header = ("mode", "callers", "upstream reads", "p50 ms", "p99 ms", "max ms",
              "reads/s", "CPU us/caller")
    rows = [header] + [
        (r.mode, f"{r.callers:,}", f"{r.upstream_reads:,}", f"{r.p50_ms:.2f}", f"{r.p99_ms:.2f}",
         f"{r.max_ms:.2f}", f"{r.throughput:,.0f}", f"{r.cpu_us_per_caller:.1f}")
        for r in results
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_json(results: Sequence[HerdResult], path: Path, **extra: Any) -> None:
    path.write_text(json.dumps({**extra, "results": [r.summary() for r in results]}, indent=2))


def plot(results: Sequence[HerdResult], path: Path, title: str) -> None:
    """Two panels: upstream reads per mode, and each mode's caller latency CDF."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise SystemExit("--plot needs matplotlib: pip install 'coalesce[plot]'") from exc

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    labels = [textwrap.fill(r.mode, 16) for r in results]
    bars = left.bar(labels, [max(r.upstream_reads, 1) for r in results], color=_colors(results))
    left.set_yscale("log")
    left.set_ylabel("upstream reads (log)")
    left.set_title("reads that reached the database")
    for bar, r in zip(bars, results, strict=True):
        left.annotate(f"{r.upstream_reads:,}", (bar.get_x() + bar.get_width() / 2,
                      bar.get_height()), ha="center", va="bottom")
    for r, color in zip(results, _colors(results), strict=True):
        ordered = sorted(r.latencies_ms)
        n = len(ordered)
        right.plot(ordered, [(i + 1) / n for i in range(n)], label=r.mode, color=color)
    right.set_xscale("log")
    right.set_xlabel("caller latency, ms (log)")
    right.set_ylabel("fraction of callers")
    right.set_title("latency CDF")
    right.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _colors(results: Sequence[HerdResult]) -> list[str]:
    palette = {"direct": "#d62728", "coalesced": "#2ca02c", "one sidecar": "#2ca02c",
               "ring, token-aware": "#1f77b4", "ring, round-robin": "#9467bd",
               "independent": "#d62728"}
    return [next((color for name, color in palette.items() if r.mode.startswith(name)),
                 "#1f77b4") for r in results]


