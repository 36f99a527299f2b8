"""What does `CoalescingSession` add over `SingleFlight.do` around the same driver read?

    python benchmarks/session_split.py [--herd 10000] [--repeat 7] [--driver both] [--json out.json]

A herd of N callers reads one partition of the built-in emulator at once, three ways,
interleaved in one run (compare within the run; these machines are noisy):

- ``floor``: every caller awaits one shared task of the driver read;
- ``SingleFlight.do``: every caller calls ``group.do(channel, read, channel)``, the key
  made by hand (the driver read is what `CoalescingSession` itself runs);
- ``CoalescingSession``: every caller calls ``session.execute(prepared, (channel, 0))``:
  key building, classification and the freshness index on top of the same flight.

CPU per caller is the event loop thread's (the drivers' own I/O threads, which
acsylla keeps busy, would only add noise; they serve one request per herd either
way), best-of-N, and the session layer is the difference between the last two, with
the garbage collector on (what an application sees) and off (the Python work alone).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from coalesce import SingleFlight
from coalesce.emulator import Emulator
from coalesce.scylla import CoalescingSession

KEYSPACE = "split"
SCHEMA = (
    f"CREATE KEYSPACE IF NOT EXISTS {KEYSPACE} WITH replication = "
    "{'class': 'SimpleStrategy', 'replication_factor': 1}",
    f"CREATE TABLE IF NOT EXISTS {KEYSPACE}.messages (channel_id bigint, bucket int,"
    " message_id bigint, content text, PRIMARY KEY ((channel_id, bucket), message_id))",
)
INSERT = (
    f"INSERT INTO {KEYSPACE}.messages (channel_id, bucket, message_id, content)"
    " VALUES (?, ?, ?, ?)"
)
SELECT = f"SELECT * FROM {KEYSPACE}.messages WHERE channel_id = ? AND bucket = ? LIMIT 20"

Read = Callable[[int], Awaitable[Any]]


class Driver:
    """One driver's session on the emulator: its plain read and a coalescing session."""

    name: str
    read: Read  # one driver read of a channel, as CoalescingSession runs it
    session: CoalescingSession
    prepared: Any
    params: Callable[[int], Any]

    async def close(self) -> None: ...


class CassandraDriver(Driver):
    name = "cassandra-driver"

    async def open(self, host: str, port: int) -> None:
        from cassandra.cluster import Cluster

        from coalesce.scylla.cassandra_driver import as_asyncio

        def connect() -> tuple[Any, Any, Any]:
            cluster = Cluster([host], port=port, protocol_version=4,
                              schema_metadata_enabled=False)
            session = cluster.connect()
            for ddl in SCHEMA:
                session.execute(ddl)
            insert = session.prepare(INSERT)
            for message in range(20):
                session.execute(insert, (1, 0, message, f"message {message}"))
            return cluster, session, session.prepare(SELECT)

        self._cluster, raw, select = await asyncio.to_thread(connect)

        async def read(channel: int) -> Any:
            loop = asyncio.get_running_loop()
            return await as_asyncio(raw.execute_async(select, (channel, 0)), loop)

        self.read = read
        self.session = CoalescingSession(raw, registry=CollectorRegistry())
        self.prepared, self.params = select, lambda channel: (channel, 0)

    async def close(self) -> None:
        await asyncio.to_thread(self._cluster.shutdown)


class AcsyllaDriver(Driver):
    name = "acsylla"

    async def open(self, host: str, port: int) -> None:
        import acsylla

        cluster = acsylla.create_cluster([host], port=port, protocol_version=4)
        setup = await cluster.create_session()
        for ddl in SCHEMA:
            await setup.execute(acsylla.create_statement(ddl))
        await setup.close()
        self._raw = raw = await cluster.create_session(keyspace=KEYSPACE)
        insert = await raw.create_prepared(INSERT)
        for message in range(20):
            await raw.execute(insert.bind([1, 0, message, f"message {message}"]))
        self.session = CoalescingSession(raw, registry=CollectorRegistry())
        self.prepared = await self.session.prepare(SELECT)
        select = self.prepared.statement

        async def read(channel: int) -> Any:
            return await raw.execute(select.bind([channel, 0]))

        self.read = read
        self.params = lambda channel: [channel, 0]

    async def close(self) -> None:
        await self._raw.close()


async def herd(callers: int, make: Callable[[], Read], collect: bool) -> float:
    """CPU per caller of `callers` concurrent reads of channel 1 through `make()`."""
    loop = asyncio.get_running_loop()
    read = make()
    gc.collect()
    if not collect:
        gc.disable()
    try:
        cpu = time.thread_time()
        tasks = [loop.create_task(read(1)) for _ in range(callers)]
        results = await asyncio.gather(*tasks)
        spent = time.thread_time() - cpu
    finally:
        gc.enable()
    assert all(r is results[0] for r in results), "every caller shares one answer"
    return spent / callers * 1e6


def ways(driver: Driver) -> dict[str, Callable[[], Read]]:
    def floor() -> Read:
        shared: asyncio.Task[Any] | None = None

        async def await_shared(channel: int) -> Any:
            nonlocal shared
            if shared is None:
                shared = asyncio.ensure_future(driver.read(channel))
            return await shared

        return await_shared

    def single_flight() -> Read:
        group: SingleFlight[Any] = SingleFlight("split-do", registry=CollectorRegistry())

        async def do(channel: int) -> Any:
            return await group.do(channel, driver.read, channel)

        return do

    def session() -> Read:
        execute, prepared, params = driver.session.execute, driver.prepared, driver.params

        async def read(channel: int) -> Any:
            return await execute(prepared, params(channel))

        return read

    return {"floor": floor, "SingleFlight.do": single_flight, "CoalescingSession": session}


async def run(driver: Driver, callers: int, repeat: int) -> dict[str, Any]:
    best: dict[str, dict[str, float]] = {"gc on": {}, "gc off": {}}
    for _ in range(repeat):
        for mode, numbers in best.items():
            for name, make in ways(driver).items():
                value = await herd(callers, make, collect=mode == "gc on")
                numbers[name] = min(value, numbers.get(name, float("inf")))
    print(f"\n{driver.name}: herd of {callers:,} callers on one partition, "
          f"CPU us per caller (best of {repeat})")
    print(f"{'':<22}{'gc on':>10}{'gc off':>10}")
    for name in best["gc on"]:
        print(f"{name:<22}{best['gc on'][name]:>10.2f}{best['gc off'][name]:>10.2f}")
    layer = {mode: n["CoalescingSession"] - n["SingleFlight.do"] for mode, n in best.items()}
    print(f"{'session layer':<22}{layer['gc on']:>+10.2f}{layer['gc off']:>+10.2f}")
    return {"us_per_caller": best, "session_layer_us": layer}


async def main(args: argparse.Namespace) -> dict[str, Any]:
    emulator = Emulator(shards=1, read_latency=0.002, per_row=0.0)
    await emulator.start()
    out: dict[str, Any] = {}
    try:
        names = ["cassandra-driver", "acsylla"] if args.driver == "both" else [args.driver]
        for name in names:
            driver: Driver = CassandraDriver() if name == "cassandra-driver" else AcsyllaDriver()
            try:
                await driver.open(emulator.host, emulator.port)  # type: ignore[attr-defined]
            except ImportError as exc:
                print(f"\n{name}: not installed ({exc})")
                continue
            try:
                out[name] = await run(driver, args.herd, args.repeat)
            finally:
                await driver.close()
    finally:
        await emulator.aclose()
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--herd", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--driver", choices=["cassandra-driver", "acsylla", "both"],
                        default="both")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    data = asyncio.run(main(args))
    if args.json:
        args.json.write_text(json.dumps(data, indent=2))
