"""What the emulator's shard model does to a herd, and how fast the emulator itself is.

    python benchmarks/emulator_shards.py [--json out.json] [--reads 2000] [--concurrency 100]

Runs `coalesce emulator` in a subprocess (so client and server do not share
a GIL) and drives it with acsylla over TCP:

  hot        N prepared reads of ONE partition at 1 ms read latency: one shard
             serves them one at a time, so this takes ~N x 1 ms;
  spread     N reads of partitions spread over all shards at 1 ms: the shards
             work in parallel, ~N x 1 ms / shards;
  capacity   N reads at zero latency, identical (memoised) and distinct keys:
             the emulator's own CPU ceiling on this machine;
  hops       N/4 reads, one at a time, spread over all shards at zero service
             time and a 200 us cross-shard hop, by acsylla with and without
             --shard-aware: the shard-aware driver sends each read to its
             shard (no wrong-shard request), the unaware one pays the hop on
             about 3 reads in 4 (its one connection is on one shard). One
             request at a time leaves the loop idle, and epoll's 1 ms timer
             granularity rounds each lone hop up to about 1 ms.

Numbers are wall-clock and machine-dependent; they are for the README's
"what coalescing buys" table, never for test assertions.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import re
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import acsylla

from coalesce.emulator.shards import shard_of
from coalesce.emulator.storage import token_of

SHARDS = 4


@contextmanager
def emulator_process(*flags: str) -> Iterator[tuple[str, int, int | None]]:
    """Run `coalesce emulator` with `flags`; yields (host, CQL port, metrics port or None)."""
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "coalesce.emulator.command",
            "--listen",
            "127.0.0.1:0",
            "--shards",
            str(SHARDS),
            *flags,
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        for line in process.stdout:
            match = re.search(r"listening on ([\d.]+):(\d+)", line)
            if match:
                metrics = re.search(r"metrics on [\d.]+:(\d+)", line)
                yield (
                    match.group(1),
                    int(match.group(2)),
                    int(metrics.group(1)) if metrics else None,
                )
                break
        else:
            raise RuntimeError("emulator did not start")
    finally:
        process.terminate()
        process.wait(timeout=10)
        if process.stdout is not None:
            process.stdout.close()


def _keys_per_shard() -> list[int]:
    chosen: dict[int, int] = {}
    key = 0
    while len(chosen) < SHARDS:
        chosen.setdefault(shard_of(token_of(key.to_bytes(4, "big", signed=True)), SHARDS), key)
        key += 1
    return [chosen[s] for s in range(SHARDS)]


def _local_ports_above_the_ephemeral_range() -> dict[str, int]:
    """acsylla's shard-aware local ports, clear of TIME_WAIT sockets in the ephemeral range."""
    try:
        high = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        high = 60999
    return {"local_port_range_min": min(high + 1, 64000), "local_port_range_max": 65535}


def _wrong_shard_requests(metrics_port: int | None) -> int:
    assert metrics_port is not None
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    match = re.search(r"^coalesce_emulator_wrong_shard_requests_total (\S+)$", text, re.M)
    return int(float(match.group(1))) if match else 0


async def _drive(
    host: str,
    port: int,
    keys: list[int],
    reads: int,
    concurrency: int,
    **cluster_options: Any,
) -> float:
    cluster = acsylla.create_cluster([host], port=port, log_level="critical", **cluster_options)
    session = await cluster.create_session()
    try:
        for text in (
            "CREATE KEYSPACE IF NOT EXISTS bench WITH replication = "
            "{'class': 'SimpleStrategy', 'replication_factor': 1}",
            "CREATE TABLE IF NOT EXISTS bench.kv (k int PRIMARY KEY, v text)",
        ):
            await session.execute(acsylla.create_statement(text))
        select = await session.create_prepared("SELECT v FROM bench.kv WHERE k = ?")
        next_read = 0

        async def worker() -> None:
            nonlocal next_read
            while next_read < reads:
                key = keys[next_read % len(keys)]
                next_read += 1
                statement = select.bind()
                statement.bind_list([key])
                await session.execute(statement)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return time.perf_counter() - started
    finally:
        await session.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="write results here as JSON")
    parser.add_argument("--reads", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=100)
    args = parser.parse_args()
    results: dict[str, Any] = {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "shards": SHARDS,
        "reads": args.reads,
        "concurrency": args.concurrency,
    }
    spread = _keys_per_shard()
    with emulator_process("--read-latency", "1ms") as (host, port, _):
        hot = asyncio.run(_drive(host, port, [spread[0]], args.reads, args.concurrency))
        wide = asyncio.run(_drive(host, port, spread, args.reads, args.concurrency))
    results["hot_partition_seconds"] = round(hot, 3)
    results["spread_over_shards_seconds"] = round(wide, 3)
    with emulator_process("--read-latency", "0", "--per-row", "0") as (host, port, _):
        same = asyncio.run(_drive(host, port, [1], args.reads * 5, args.concurrency))
        distinct = asyncio.run(
            _drive(host, port, list(range(args.reads * 5)), args.reads * 5, args.concurrency)
        )
    results["capacity_identical_reads_per_second"] = round(args.reads * 5 / same)
    results["capacity_distinct_reads_per_second"] = round(args.reads * 5 / distinct)
    hop_flags = ("--read-latency", "0", "--per-row", "0", "--cross-shard-latency", "200us")
    sequential = max(args.reads // 4, 1)
    many = list(range(sequential))
    for name, flags, options in (
        ("unaware", (), {}),
        ("shard_aware", ("--shard-aware",), _local_ports_above_the_ephemeral_range()),
    ):
        with emulator_process(*hop_flags, *flags, "--metrics", "127.0.0.1:0") as (
            host,
            port,
            metrics_port,
        ):
            seconds = asyncio.run(_drive(host, port, many, sequential, 1, **options))
            results[f"hops_{name}_mean_read_us"] = round(seconds / sequential * 1e6)
            results[f"hops_{name}_wrong_shard_requests"] = _wrong_shard_requests(metrics_port)
    text = json.dumps(results, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as handle:
            handle.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
