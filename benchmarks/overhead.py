"""What does coalescing cost? `coalesce` next to a hand-written baseline and async-lru.

    python benchmarks/overhead.py [--calls 200000] [--herd 10000] [--uvloop] [--json out.json]

Two scenarios, all implementations measured in the same run (compare ratios, not
absolute numbers: these machines are noisy):

- uncontended: every call has a new key and the backend returns at once, so this is
  the pure bookkeeping cost per call (us/call);
- herd: N callers of one key arrive together and the backend answers after they all
  joined; CPU per caller, including each caller's own task.

Implementations: ``floor`` (no coalescing at all: a plain await, or for the herd,
every caller awaiting one shared task), ``dict+shield`` (the usual hand-written
correct pattern: a dict of tasks, callers await ``asyncio.shield``), ``async-lru``
(installed on demand; its cache is kept small so it coalesces without caching hits),
and ``coalesce`` through `SingleFlight.do` and `@coalesced`, with metrics off and on.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib
import json
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from coalesce import SingleFlight, coalesced


def _async_lru() -> Any:
    try:
        return importlib.import_module("async_lru")
    except ImportError:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "async-lru"], check=True)
        return importlib.import_module("async_lru")


class DictOfTasks:
    """The hand-written baseline: correct under cancellation thanks to shield."""

    def __init__(self) -> None:
        self.tasks: dict[Any, asyncio.Task[Any]] = {}

    async def do(self, key: Any, fn: Callable[..., Awaitable[Any]], *args: Any) -> Any:
        task = self.tasks.get(key)
        if task is None:
            task = self.tasks[key] = asyncio.ensure_future(fn(*args))
            task.add_done_callback(lambda _t: self.tasks.pop(key, None))
        return await asyncio.shield(task)


Read = Callable[[int], Awaitable[Any]]


def implementations(backend: Callable[[int], Awaitable[int]]) -> dict[str, Read]:
    alru = _async_lru()
    off: SingleFlight[int] = SingleFlight("bench-off", metrics=False)
    on: SingleFlight[int] = SingleFlight("bench-on", registry=CollectorRegistry())
    baseline = DictOfTasks()

    async def floor(key: int) -> Any:
        return await backend(key)

    async def dict_shield(key: int) -> Any:
        return await baseline.do(key, backend, key)

    cached = alru.alru_cache(maxsize=64)(backend)

    async def singleflight_off(key: int) -> Any:
        return await off.do(key, backend, key)

    async def singleflight_on(key: int) -> Any:
        return await on.do(key, backend, key)

    return {
        "floor": floor,
        "dict+shield": dict_shield,
        "async-lru": cached,
        "coalesce do, metrics off": singleflight_off,
        "coalesce do, metrics on": singleflight_on,
        "@coalesced, metrics off": coalesced(metrics=False)(backend),
        "@coalesced, metrics on": coalesced(registry=CollectorRegistry())(backend),
    }


async def uncontended(calls: int) -> dict[str, float]:
    async def backend(key: int) -> int:
        return key

    results = {}
    for name, read in implementations(backend).items():
        for key in range(2000):  # warm up
            await read(-key - 1)
        gc.collect()
        start = time.perf_counter()
        for key in range(calls):
            await read(key)
        results[name] = (time.perf_counter() - start) / calls * 1e6
    return results


async def herd(callers: int, shift: int = 0) -> dict[str, float]:
    """CPU per caller of each implementation, run in an order rotated by `shift`.

    Rotating the order matters: the heap each one meets, hence when the garbage
    collector's full collections fall, depends on what ran before it.
    """
    loop = asyncio.get_running_loop()
    gate: asyncio.Future[None] = loop.create_future()
    backend_calls = 0

    async def backend(key: int) -> int:
        nonlocal backend_calls
        backend_calls += 1
        await gate
        return key

    results = {}
    ways = list(implementations(backend).items())
    shift %= len(ways)
    for name, read in ways[shift:] + ways[:shift]:
        gate = loop.create_future()
        backend_calls = 0
        gc.collect()
        cpu = time.process_time()
        if name == "floor":
            shared = loop.create_task(backend(1))

            async def await_shared(_key: int, shared: asyncio.Task[int] = shared) -> int:
                return await shared

            read = await_shared
        tasks = [loop.create_task(read(1)) for _ in range(callers)]
        await asyncio.sleep(0)
        gate.set_result(None)
        values = await asyncio.gather(*tasks)
        results[name] = (time.process_time() - cpu) / callers * 1e6
        assert backend_calls == 1 and values == [1] * callers, (name, backend_calls)
    return results


def report(title: str, unit: str, numbers: dict[str, float], reference: str) -> None:
    print(f"\n{title}")
    print(f"{'implementation':<28}{unit:>14}{'vs ' + reference:>20}")
    for name, value in numbers.items():
        print(f"{name:<28}{value:>14.2f}{value / numbers[reference]:>19.2f}x")


async def main(args: argparse.Namespace) -> dict[str, Any]:
    best_flat: dict[str, float] = {}
    best_herd: dict[str, float] = {}
    for repeat in range(args.repeat):  # best of N damps the noise of a shared machine
        for name, value in (await uncontended(args.calls)).items():
            best_flat[name] = min(value, best_flat.get(name, float("inf")))
        for shift in range(3):  # a herd is short and noisier: three of them per repeat
            for name, value in (await herd(args.herd, 3 * repeat + shift)).items():
                best_herd[name] = min(value, best_herd.get(name, float("inf")))
    report(f"uncontended, distinct keys, backend returns at once ({args.calls:,} calls)",
           "us/call", best_flat, "floor")
    report(f"herd of {args.herd:,} callers on one key (CPU per caller, best of {3 * args.repeat})",
           "us/caller", best_herd, "floor")
    metrics_cost = best_flat["coalesce do, metrics on"] / best_flat["coalesce do, metrics off"]
    print(f"\nmetrics on / off, uncontended: {metrics_cost:.2f}x")
    return {"loop": "uvloop" if args.uvloop else "asyncio", "uncontended_us_per_call": best_flat,
            "herd_cpu_us_per_caller": best_herd, "metrics_on_over_off": metrics_cost}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=200_000)
    parser.add_argument("--herd", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--uvloop", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.uvloop:
        import uvloop

        data = uvloop.run(main(args))
    else:
        data = asyncio.run(main(args))
    if args.json:
        args.json.write_text(json.dumps(data, indent=2))
