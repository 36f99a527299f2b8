"""How close is the sidecar to the floor a Python proxy can reach, and to a TCP relay?

    python benchmarks/sidecar.py [--uvloop] [--rounds 3] [--quick] [--json PATH]

Every server runs in its own process, started through its command line and observed
from outside only (its /metrics, /proc/<pid>/), so the benchmark keeps working
whatever the sidecar's internals become; the load comes from a small raw-protocol
client in this process, the same for every target. ``--uvloop`` runs the sidecar and
the floor server on uvloop; the client's loop is ``--client-loop`` (uvloop when it is
installed) in both runs, so the two runs differ in the proxy's loop only.

Two workloads, measured in ``--rounds`` rounds; within a round the targets take turns
(distinct reads: read by read when unloaded, ``--slices`` slices when loaded; herd:
one herd each, order alternating), and each goal is judged on the median over the
rounds of a ratio computed within one round, since a noisy machine then slows every
target of a round alike. Absolute numbers from a shared 2-core machine are not worth
comparing between runs; the ratios are the result.

- herd: ``--herd`` (10,000) identical prepared reads (EXECUTE) of one partition over
  50 connections, each connection's share in one write, against the sidecar in front
  of an emulator with 1 ms read latency and against the floor
  (``benchmarks/floor_server.py``: answers a whole batch of reads in one write per
  connection ``--floor-delay`` after the batch's first read, and does nothing else).
  Reported: reads that reached upstream, client p50/p99 (send to answer), the first
  answer relative to the last request sent, and the server's CPU (user + sys of all
  its threads, from /proc/<pid>/task/*/schedstat; /proc/<pid>/stat's ticks are kept
  in the JSON as a check) per waiter.
- distinct reads: ``--requests`` (20,000) prepared reads of as many different
  partitions (emulator at zero latency), ``--concurrency`` (64) in flight over 4
  connections, for requests/s, and one at a time for unloaded latency, against the
  emulator directly, socat, a single-threaded HAProxy in TCP mode, the sidecar's merge
  path (a plain prepared SELECT) and its forward path (the same read with the TRACING
  flag, which the sidecar never merges).

socat and HAProxy come from Debian (``apt-get install -y socat haproxy``); without them
their rows and ratios are skipped. Results go to stdout and, keyed by the sidecar's
loop, to ``--json`` (default benchmarks/out/sidecar.json). ``--quick`` is a smoke run:
fewer requests, one round, well under 30 s. ``--check`` exits 1 if a goal fails.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import gc
import importlib.util
import json
import os
import statistics
import struct
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import _procs  # benchmarks/_procs.py: this script runs as `python benchmarks/sidecar.py`

from coalesce.cql import (
    TRACING,
    Error,
    Execute,
    Opcode,
    Options,
    Prepare,
    Query,
    QueryParameters,
    ResultPrepared,
    Startup,
    Supported,
    decode_result,
    encode_frame,
)

_HEADER = struct.Struct(">BBhBi")
_STREAMS = [struct.pack(">h", s) for s in range(32768)]
_READ = "SELECT v FROM bench.kv WHERE k = ?"
_INSERT = "INSERT INTO bench.kv (k, v) VALUES (?, ?)"
_HERD_CONNECTIONS = 50
_DISTINCT_CONNECTIONS = 4
_HERD_KEY = 7
_OUT = Path(__file__).with_name("out") / "sidecar.json"


# -- the load client ---------------------------------------------------------------------


class _Client(asyncio.Protocol):
    """A pipelining CQL v4 client that only splits frames: send times, answer times.

    Handshake-style requests (`request`) wait for their answer on a future; every other
    answer is a read: its latency is recorded and `on_answers` gets the stream ids of
    each received chunk at once, so a closed loop can send the next reads in one write.
    """

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.waiters: dict[int, asyncio.Future[tuple[int, bytes]]] = {}
        self.sent_at = [0] * 32768
        self.latencies: list[int] = []
        self.first_answer_ns = 0
        self.on_answers: Callable[[_Client, list[int]], None] | None = None
        self.on_error: Callable[[str], None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's quacks alike

    def connection_lost(self, exc: Exception | None) -> None:
        for waiter in self.waiters.values():
            if not waiter.done():
                waiter.set_exception(ConnectionError("connection lost"))
        if self.on_error is not None:
            self.on_error("connection lost")

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter_ns()
        buffer = self.buffer + data if self.buffer else data
        size, pos = len(buffer), 0
        answered: list[int] = []
        while size - pos >= 9:
            _, _, stream, opcode, length = _HEADER.unpack_from(buffer, pos)
            end = pos + 9 + length
            if end > size:
                break
            waiter = self.waiters.pop(stream, None)
            if waiter is not None:
                waiter.set_result((opcode, buffer[pos + 9:end]))
            elif opcode == Opcode.ERROR:
                if self.on_error is not None:
                    self.on_error(Error.decode(buffer[pos + 9:end]).message)
            else:
                self.latencies.append(now - self.sent_at[stream])
                answered.append(stream)
            pos = end
        self.buffer = buffer[pos:]
        if answered:
            if not self.first_answer_ns:
                self.first_answer_ns = now
            if self.on_answers is not None:
                self.on_answers(self, answered)

    async def request(self, opcode: int, body: bytes, stream: int = 0) -> tuple[int, bytes]:
        waiter: asyncio.Future[tuple[int, bytes]] = asyncio.get_running_loop().create_future()
        self.waiters[stream] = waiter
        assert self.transport is not None
        self.transport.write(encode_frame(opcode, body, stream=stream))
        return await asyncio.wait_for(waiter, 30)

    def reset(self) -> None:
        self.latencies = []
        self.first_answer_ns = 0

    def close(self) -> None:
        self.on_error = None
        if self.transport is not None:
            self.transport.close()


async def _connect(port: int) -> _Client:
    loop = asyncio.get_running_loop()
    _, conn = await loop.create_connection(_Client, "127.0.0.1", port)
    opcode, _ = await conn.request(Opcode.STARTUP, Startup({"CQL_VERSION": "3.0.0"}).encode())
    assert opcode == Opcode.READY, opcode
    return conn


async def _prepare(conn: _Client, text: str) -> bytes:
    opcode, body = await conn.request(Opcode.PREPARE, Prepare(text).encode())
    result = decode_result(body) if opcode == Opcode.RESULT else None
    assert isinstance(result, ResultPrepared), (opcode, body)
    return result.query_id


def _tails(opcode: int, bodies: list[bytes]) -> list[bytes]:
    """Each frame from its opcode on; a frame is `prefix + stream + tail`."""
    return [bytes([opcode]) + struct.pack(">i", len(b)) + b for b in bodies]


def _read_bodies(query_id: bytes, keys: range) -> list[bytes]:
    return [Execute(query_id, QueryParameters(1, [struct.pack(">i", k)])).encode()
            for k in keys]


async def _closed_loop(conns: list[_Client], tails: list[bytes], concurrency: int,
                       flags: int = 0) -> tuple[float, list[int]]:
    """Send every frame of `tails`, `concurrency` in flight spread over `conns`.

    A stream sends its next frame as soon as its answer arrives. Returns (requests/s,
    latencies in ns).
    """
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()
    prefix = bytes([0x04, flags])
    total = len(tails)
    state = [0, 0]  # sent, answered

    def on_answers(conn: _Client, streams: list[int]) -> None:
        sent = state[0]
        chunks: list[bytes] = []
        now = time.perf_counter_ns()
        for stream in streams:
            if sent < total:
                chunks.append(prefix + _STREAMS[stream] + tails[sent])
                conn.sent_at[stream] = now
                sent += 1
        state[0] = sent
        state[1] += len(streams)
        if chunks:
            assert conn.transport is not None
            conn.transport.write(b"".join(chunks))
        if state[1] >= total and not done.done():
            done.set_result(None)

    def on_error(message: str) -> None:
        if not done.done():
            done.set_exception(RuntimeError(message))

    per_conn = max(1, concurrency // len(conns))
    for conn in conns:
        conn.reset()
        conn.on_answers, conn.on_error = on_answers, on_error
    started = time.perf_counter()
    for conn in conns:
        chunks = []
        now = time.perf_counter_ns()
        for stream in range(1, per_conn + 1):
            if state[0] < total:
                chunks.append(prefix + _STREAMS[stream] + tails[state[0]])
                conn.sent_at[stream] = now
                state[0] += 1
        assert conn.transport is not None
        conn.transport.write(b"".join(chunks))
    await asyncio.wait_for(done, 120)
    elapsed = time.perf_counter() - started
    for conn in conns:
        conn.on_answers = conn.on_error = None
    return total / elapsed, [lat for conn in conns for lat in conn.latencies]


def _pct_us(values: list[int], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] / 1000.0


async def _load_rows(port: int, keys: int) -> None:
    """Create bench.kv and write `keys` rows, 64 writes in flight."""
    conn = await _connect(port)
    for text in (
        "CREATE KEYSPACE IF NOT EXISTS bench WITH replication = "
        "{'class': 'SimpleStrategy', 'replication_factor': 1}",
        "CREATE TABLE IF NOT EXISTS bench.kv (k int PRIMARY KEY, v text)",
    ):
        opcode, body = await conn.request(Opcode.QUERY, Query(text, QueryParameters(1)).encode())
        assert opcode == Opcode.RESULT, Error.decode(body).message
    insert = await _prepare(conn, _INSERT)
    bodies = [Execute(insert, QueryParameters(
        1, [struct.pack(">i", k), f"value-{k}".encode()])).encode() for k in range(keys)]
    await _closed_loop([conn], _tails(Opcode.EXECUTE, bodies), 64)
    conn.close()


# -- the plan ----------------------------------------------------------------------------


@dataclass
class Plan:
    """How much of everything one run does."""

    keys: int
    unloaded: int
    concurrency: int
    slices: int
    herd: int
    rounds: int
    floor_delay: str
    uvloop: bool


# -- distinct reads ------------------------------------------------------------------------


@dataclass
class DistinctResult:
    """One target, one round."""

    target: str
    throughput_rps: float
    p50_us_loaded: float
    p99_us_loaded: float
    p50_us_unloaded: float
    p99_us_unloaded: float
    cpu_us_per_read: float | None = None
    emulator_cpu_us_per_read: float = 0.0


@dataclass
class Target:
    """Where distinct reads go: a port, the frame flags, whose CPU is charged."""

    name: str
    port: int
    flags: int = 0
    pid: int | None = None


async def _distinct_round(targets: list[Target], plan: Plan, emulator_pid: int,
                          round_no: int) -> dict[str, DistinctResult]:
    """One round of distinct reads, the targets taking turns at a fine grain.

    Unloaded reads alternate target by target, one read each; the loaded run is cut
    into `plan.slices` slices, each target running one slice in turn. So every target
    samples the same moments of the machine's other load, and the ratios of one round
    compare like with like.
    """
    conns: dict[str, list[_Client]] = {}
    tails: dict[str, list[bytes]] = {}
    for t in targets:
        conns[t.name] = [await _connect(t.port) for _ in range(_DISTINCT_CONNECTIONS)]
        query_id = await _prepare(conns[t.name][0], _READ)
        tails[t.name] = _tails(Opcode.EXECUTE, _read_bodies(query_id, range(plan.keys)))
        # Warm both ends. The unloaded keys are read twice, so that every target meets
        # the emulator's memo of SELECT results in the same (warm) state for them.
        await _closed_loop(conns[t.name][:2], tails[t.name][:plan.unloaded] * 2, 8, t.flags)
    n = len(targets)

    alone: dict[str, list[int]] = {t.name: [] for t in targets}
    for i in range(plan.unloaded):
        for j in range(n):
            t = targets[(i + j + round_no) % n]
            _, latencies = await _closed_loop(conns[t.name][:1], tails[t.name][i:i + 1], 1,
                                              t.flags)
            alone[t.name] += latencies

    elapsed = dict.fromkeys(alone, 0.0)
    cpu = dict.fromkeys(alone, 0.0)
    emulator = dict.fromkeys(alone, 0.0)
    loaded: dict[str, list[int]] = {t.name: [] for t in targets}
    bounds = [plan.keys * k // plan.slices for k in range(plan.slices + 1)]
    for k in range(plan.slices):
        for j in range(n):
            t = targets[(k + j + round_no) % n]
            part = tails[t.name][bounds[k]:bounds[k + 1]]
            cpu_before = _procs.tree_cpu_seconds(t.pid) if t.pid is not None else 0.0
            emulator_before = _procs.cpu_seconds(emulator_pid)
            rps, latencies = await _closed_loop(conns[t.name], part, plan.concurrency, t.flags)
            emulator[t.name] += _procs.cpu_seconds(emulator_pid) - emulator_before
            if t.pid is not None:
                cpu[t.name] += _procs.tree_cpu_seconds(t.pid) - cpu_before
            elapsed[t.name] += len(part) / rps
            loaded[t.name] += latencies
    for t in targets:
        for conn in conns[t.name]:
            conn.close()
    return {
        t.name: DistinctResult(
            t.name, plan.keys / elapsed[t.name],
            _pct_us(loaded[t.name], 0.5), _pct_us(loaded[t.name], 0.99),
            _pct_us(alone[t.name], 0.5), _pct_us(alone[t.name], 0.99),
            cpu[t.name] / plan.keys * 1e6 if t.pid is not None else None,
            emulator[t.name] / plan.keys * 1e6,
        )
        for t in targets
    }


# -- the herd ------------------------------------------------------------------------------


@dataclass
class HerdResult:
    """One target, one round."""

    target: str
    readers: int
    upstream_reads: float | None
    upstream_calls_metric: float | None
    p50_ms: float
    p99_ms: float
    first_answer_after_ingest_ms: float
    wall_ms: float
    cpu_us_per_waiter: float
    cpu_us_per_waiter_ticks: float


async def _herd(target: str, server: _procs.Server, readers: int, key: int,
                upstream_reads: Callable[[], Awaitable[float | None]],
                upstream_calls: Callable[[], Awaitable[float | None]]) -> HerdResult:
    conns = [await _connect(server.port) for _ in range(_HERD_CONNECTIONS)]
    query_id = await _prepare(conns[0], _READ)
    # One read per connection first, so pools and caches are warm before the count.
    for conn in conns:
        await _closed_loop([conn], _tails(Opcode.EXECUTE, _read_bodies(query_id, range(1))), 1)
    frame = _tails(Opcode.EXECUTE, _read_bodies(query_id, range(key, key + 1)))[0]
    shares = [(readers - i + len(conns) - 1) // len(conns) for i in range(len(conns))]
    writes = [b"".join(b"\x04\x00" + _STREAMS[s] + frame for s in range(1, n + 1))
              for n in shares]
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()
    remaining = [readers]

    def on_answers(conn: _Client, streams: list[int]) -> None:
        remaining[0] -= len(streams)
        if remaining[0] <= 0 and not done.done():
            done.set_result(None)

    def on_error(message: str) -> None:
        if not done.done():
            done.set_exception(RuntimeError(message))

    for conn in conns:
        conn.reset()
        conn.on_answers, conn.on_error = on_answers, on_error
    reads_before, calls_before = await upstream_reads(), await upstream_calls()
    cpu_before = _procs.cpu_seconds(server.pid)
    ticks_before = _procs.cpu_ticks_seconds(server.pid)
    started = time.perf_counter_ns()
    # Each connection's share in one write: the herd arrives as a herd, and the
    # client's own system calls stay out of the latencies.
    for conn, n, data in zip(conns, shares, writes, strict=True):
        now = time.perf_counter_ns()
        conn.sent_at[1:n + 1] = [now] * n
        assert conn.transport is not None
        conn.transport.write(data)
    ingested = time.perf_counter_ns()
    await asyncio.wait_for(done, 120)
    finished = time.perf_counter_ns()
    cpu = _procs.cpu_seconds(server.pid) - cpu_before
    ticks = _procs.cpu_ticks_seconds(server.pid) - ticks_before
    reads_after, calls_after = await upstream_reads(), await upstream_calls()
    latencies = [lat for conn in conns for lat in conn.latencies]
    first = min(conn.first_answer_ns for conn in conns if conn.first_answer_ns)
    for conn in conns:
        conn.close()
    return HerdResult(
        target, readers,
        None if reads_before is None or reads_after is None else reads_after - reads_before,
        None if calls_before is None or calls_after is None else calls_after - calls_before,
        _pct_us(latencies, 0.5) / 1e3, _pct_us(latencies, 0.99) / 1e3,
        (first - ingested) / 1e6, (finished - started) / 1e6,
        cpu / readers * 1e6, ticks / readers * 1e6,
    )


async def _floor_batches(port: int) -> float:
    """Batches the floor server answered so far, from its SUPPORTED options."""
    conn = await _connect(port)
    opcode, body = await conn.request(Opcode.OPTIONS, Options().encode())
    conn.close()
    assert opcode == Opcode.SUPPORTED, opcode
    return float(Supported.decode(body).options["FLOOR_BATCHES"][0])


# -- goals ---------------------------------------------------------------------------------


@dataclass
class Ratio:
    """A quantity computed within each round, its median, and the goal it is held to."""

    name: str
    per_round: list[float]
    unit: str = ""
    goal: str = ""
    ok: Callable[[float], bool] | None = field(default=None, repr=False)

    @property
    def median(self) -> float | None:
        return float(statistics.median(self.per_round)) if self.per_round else None

    @property
    def verdict(self) -> str:
        if self.ok is None:
            return ""
        if self.median is None:
            return "SKIP"  # a target it needs (socat) is not installed
        return "PASS" if self.ok(self.median) else "FAIL"


def _ratios(distinct: list[dict[str, DistinctResult]], herds: list[dict[str, HerdResult]],
            uvloop: bool) -> list[Ratio]:
    def per_round(fn: Callable[[dict[str, Any]], float | None],
                  rounds: list[dict[str, Any]]) -> list[float]:
        values = []
        for r in rounds:
            with contextlib.suppress(KeyError, TypeError, ZeroDivisionError):
                value = fn(r)
                if value is not None:
                    values.append(value)
        return values

    def on_uvloop(threshold: float) -> tuple[str, Callable[[float], bool] | None]:
        # The throughput goals are set for uvloop; on asyncio they are shown, not judged.
        if uvloop:
            return f">= {threshold:.2f}", lambda v: v >= threshold
        return f">= {threshold:.2f} on uvloop", None

    rps = "throughput_rps"
    p50 = "p50_us_unloaded"
    out = [
        Ratio("herd: upstream reads (sidecar)",
              per_round(lambda r: r["sidecar"].upstream_reads, herds),
              goal="<= 3", ok=lambda v: v <= 3),
        Ratio("herd: p99 sidecar / floor",
              per_round(lambda r: r["sidecar"].p99_ms / r["floor"].p99_ms, herds),
              "x", "<= 2", lambda v: v <= 2),
        Ratio("herd: sidecar CPU per waiter",
              per_round(lambda r: r["sidecar"].cpu_us_per_waiter, herds),
              "us", "<= 3", lambda v: v <= 3),
        Ratio("herd: floor CPU per waiter",
              per_round(lambda r: r["floor"].cpu_us_per_waiter, herds), "us"),
        Ratio("distinct: merge / forward req/s",
              per_round(lambda r: getattr(r["sidecar-merge"], rps)
                        / getattr(r["sidecar-fwd"], rps), distinct),
              "x", *on_uvloop(0.90)),
        Ratio("distinct: merge / socat req/s",
              per_round(lambda r: getattr(r["sidecar-merge"], rps)
                        / getattr(r["socat"], rps), distinct),
              "x", *on_uvloop(0.70)),
        Ratio("distinct: forward / socat req/s",
              per_round(lambda r: getattr(r["sidecar-fwd"], rps)
                        / getattr(r["socat"], rps), distinct),
              "x", *on_uvloop(0.85)),
        Ratio("distinct: merge / haproxy req/s",
              per_round(lambda r: getattr(r["sidecar-merge"], rps)
                        / getattr(r["haproxy"], rps), distinct), "x"),
        Ratio("distinct: forward / haproxy req/s",
              per_round(lambda r: getattr(r["sidecar-fwd"], rps)
                        / getattr(r["haproxy"], rps), distinct), "x"),
    ]
    cpu = "cpu_us_per_read"
    out += [
        Ratio("distinct: CPU/read merge / forward",
              per_round(lambda r: getattr(r["sidecar-merge"], cpu)
                        / getattr(r["sidecar-fwd"], cpu), distinct), "x"),
        Ratio("distinct: CPU/read forward / socat",
              per_round(lambda r: getattr(r["sidecar-fwd"], cpu)
                        / getattr(r["socat"], cpu), distinct), "x"),
        Ratio("distinct: CPU/read forward / haproxy",
              per_round(lambda r: getattr(r["sidecar-fwd"], cpu)
                        / getattr(r["haproxy"], cpu), distinct), "x"),
    ]
    limit = 60.0 if uvloop else 100.0
    out.append(Ratio("distinct: merge p50 added over direct",
                     per_round(lambda r: getattr(r["sidecar-merge"], p50)
                               - getattr(r["direct"], p50), distinct),
                     "us", f"<= {limit:.0f}", lambda v: v <= limit))
    out.append(Ratio("distinct: forward p50 added over direct",
                     per_round(lambda r: getattr(r["sidecar-fwd"], p50)
                               - getattr(r["direct"], p50), distinct), "us"))
    return [r for r in out if r.per_round or r.goal]


# -- the run -------------------------------------------------------------------------------


async def _run(plan: Plan) -> dict[str, Any]:
    distinct_rounds: list[dict[str, DistinctResult]] = []
    herd_rounds: list[dict[str, HerdResult]] = []
    load_start = list(os.getloadavg())
    with contextlib.ExitStack() as stack:
        fast = stack.enter_context(_procs.emulator("0"))
        slow = stack.enter_context(_procs.emulator("1ms"))
        await _load_rows(fast.port, plan.keys)
        await _load_rows(slow.port, _HERD_KEY + plan.rounds + 1)
        relays = [stack.enter_context(_procs.socat(fast.port)),
                  stack.enter_context(_procs.haproxy(fast.port))]
        for name, relay in zip(("socat", "haproxy"), relays, strict=True):
            if relay is None:
                print(f"{name} not found (apt-get install -y {name}): skipping its row",
                      file=sys.stderr)
        side_fast = stack.enter_context(_procs.sidecar(fast.port, plan.uvloop))
        side_slow = stack.enter_context(_procs.sidecar(slow.port, plan.uvloop))
        floor = stack.enter_context(_procs.floor(plan.floor_delay, plan.uvloop))

        targets = [Target("direct", fast.port)]
        targets += [Target(r.name, r.port, 0, r.pid) for r in relays if r is not None]
        targets.append(Target("sidecar-merge", side_fast.port, 0, side_fast.pid))
        # TRACING: the emulator ignores it; the sidecar never merges a traced request.
        targets.append(Target("sidecar-fwd", side_fast.port, TRACING, side_fast.pid))

        async def emulator_selects() -> float | None:
            assert slow.metrics_port is not None
            return await asyncio.to_thread(
                _procs.metric_sum, slow.metrics_port, "coalesce_emulator_statements_total",
                'kind="select"')

        async def sidecar_calls() -> float | None:
            assert side_slow.metrics_port is not None
            return await asyncio.to_thread(
                _procs.metric_sum, side_slow.metrics_port, "coalesce_upstream_calls_total")

        async def floor_batches() -> float | None:
            return await _floor_batches(floor.port)

        async def nothing() -> float | None:
            return None

        # Every partition once straight at the emulator first, so the first target of
        # round 1 meets the emulator in the state the later ones do.
        warm = await _connect(fast.port)
        query_id = await _prepare(warm, _READ)
        await _closed_loop([warm], _tails(Opcode.EXECUTE, _read_bodies(query_id,
                                                                       range(plan.keys))), 64)
        warm.close()

        for round_no in range(plan.rounds):
            # The client's garbage collector stays out of the timed phases: a full
            # collection over the precomputed frames is a pause of milliseconds.
            gc.collect()
            gc.disable()
            try:
                results = await _distinct_round(targets, plan, fast.pid, round_no)
            finally:
                gc.enable()
            distinct_rounds.append(results)
            herds: dict[str, HerdResult] = {}
            order = ["sidecar", "floor"] if round_no % 2 == 0 else ["floor", "sidecar"]
            for name in order:
                key = _HERD_KEY + round_no
                if name == "sidecar":
                    herds[name] = await _herd(name, side_slow, plan.herd, key,
                                              emulator_selects, sidecar_calls)
                else:
                    herds[name] = await _herd(name, floor, plan.herd, key, floor_batches,
                                              nothing)
            herd_rounds.append(herds)
            print(f"round {round_no + 1}/{plan.rounds} done", file=sys.stderr, flush=True)
            # What the sidecar says it did with the distinct reads: a check that the
            # two paths are the ones named (None if a rewrite renamed the metric).
            assert side_fast.metrics_port is not None
            paths = {path: _procs.metric_sum(side_fast.metrics_port,
                                             "coalesce_sidecar_requests_total",
                                             f'path="{path}"')
                     for path in ("merged", "forwarded")}
    ratios = _ratios(distinct_rounds, herd_rounds, plan.uvloop)
    return {
        "sidecar_paths": paths,
        "load_average": {"start": load_start, "end": list(os.getloadavg())},
        "distinct": [{k: asdict(v) for k, v in r.items()} for r in distinct_rounds],
        "herd": [{k: asdict(v) for k, v in r.items()} for r in herd_rounds],
        "ratios": [{"name": r.name, "per_round": r.per_round, "median": r.median,
                    "unit": r.unit, "goal": r.goal, "verdict": r.verdict} for r in ratios],
    }


def _median(rounds: list[dict[str, dict[str, Any]]], target: str, name: str) -> float | None:
    values = [r[target][name] for r in rounds if target in r and r[target][name] is not None]
    return float(statistics.median(values)) if values else None


def _report(results: dict[str, Any], plan: Plan, client_loop: str) -> str:
    loop = "uvloop" if plan.uvloop else "asyncio"
    lines = [f"sidecar and floor on {loop}, load client on {client_loop}; medians of "
             f"{plan.rounds} interleaved round(s); load average (1 min) "
             f"{results['load_average']['start'][0]:.1f} at start, "
             f"{results['load_average']['end'][0]:.1f} at end on {os.cpu_count()} cores", ""]
    distinct = results["distinct"]
    lines.append(f"distinct reads: {plan.keys:,} partitions, {plan.concurrency} in flight "
                 f"over {_DISTINCT_CONNECTIONS} connections; unloaded = one at a time")
    lines.append(f"{'target':<14} {'req/s':>8} {'p50':>8} {'p99':>8} {'p50 1-by-1':>11} "
                 f"{'p99 1-by-1':>11} {'CPU/read':>9} {'emu CPU':>8}")
    for target in distinct[0]:
        def m(name: str, target: str = target) -> float | None:
            return _median(distinct, target, name)
        cpu = m("cpu_us_per_read")
        lines.append(
            f"{target:<14} {m('throughput_rps') or 0:>8.0f} {m('p50_us_loaded') or 0:>6.0f}us "
            f"{m('p99_us_loaded') or 0:>6.0f}us {m('p50_us_unloaded') or 0:>9.0f}us "
            f"{m('p99_us_unloaded') or 0:>9.0f}us "
            + (f"{cpu:>7.1f}us" if cpu is not None else f"{'':>9}")
            + f" {m('emulator_cpu_us_per_read') or 0:>6.1f}us"
        )
    lines.append("sidecar-merge: plain prepared reads (the merge path, one flight each); "
                 "sidecar-fwd: the same reads traced (forwarded unmerged)")
    paths = results["sidecar_paths"]
    if None not in paths.values():
        lines.append(f"the distinct-read sidecar counted {paths['merged']:,.0f} requests "
                     f"merged, {paths['forwarded']:,.0f} forwarded")
    lines.append("CPU/read: the proxy's user+sys CPU (all its threads and processes) over "
                 "the loaded run, per read; emu CPU: the emulator's")
    lines.append("")
    herd = results["herd"]
    lines.append(f"herd: {plan.herd:,} identical reads of one partition over "
                 f"{_HERD_CONNECTIONS} connections; upstream read 1 ms (floor: "
                 f"{plan.floor_delay} per batch)")
    lines.append(f"{'target':<8} {'upstream':>9} {'p50':>9} {'p99':>9} "
                 f"{'1st answer':>11} {'wall':>9} {'CPU/waiter':>11}")
    for target in herd[0]:
        def h(name: str, target: str = target) -> float:
            return _median(herd, target, name) or 0.0
        lines.append(
            f"{target:<8} {h('upstream_reads'):>9.0f} {h('p50_ms'):>7.2f}ms "
            f"{h('p99_ms'):>7.2f}ms {h('first_answer_after_ingest_ms'):>9.2f}ms "
            f"{h('wall_ms'):>7.1f}ms {h('cpu_us_per_waiter'):>9.2f}us"
        )
    lines.append("upstream: reads the emulator counted (floor: batches answered); "
                 "1st answer: after the last request was sent")
    lines.append("")
    lines.append(f"{'ratio':<40} {'per round':<26} {'median':>9}  {'goal':<16} verdict")
    for r in results["ratios"]:
        rounds = " ".join(f"{v:.2f}" for v in r["per_round"])
        median = "-" if r["median"] is None else f"{r['median']:.2f}"
        unit = "" if r["median"] is None else r["unit"]
        lines.append(f"{r['name']:<40} {rounds:<26} {median:>7}{unit:<2}  "
                     f"{r['goal']:<16} {r['verdict']}")
    return "\n".join(lines)


def _commit() -> str | None:
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], check=True,
                              capture_output=True, text=True,
                              cwd=Path(__file__).parent).stdout.strip()
    return None


def _write_json(path: Path, loop: str, entry: dict[str, Any]) -> None:
    """Store `entry` under runs[loop] of `path`, keeping the other loop's run."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload: dict[str, Any] = {"runs": {}}
    with contextlib.suppress(OSError, ValueError):
        existing = json.loads(path.read_text())
        if isinstance(existing, dict) and isinstance(existing.get("runs"), dict):
            payload = existing
    payload["runs"][loop] = entry
    path.write_text(json.dumps(payload, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=None,
                        help="distinct reads (and partitions) per throughput run "
                             "(default 20,000; --quick 2,000)")
    parser.add_argument("--unloaded", type=int, default=None,
                        help="reads one at a time per target and round (default 1,000; "
                             "--quick 300)")
    parser.add_argument("--concurrency", type=int, default=64,
                        help="distinct reads in flight (default 64)")
    parser.add_argument("--slices", type=int, default=None,
                        help="slices of the loaded run the targets take turns at "
                             "(default 4; --quick 2)")
    parser.add_argument("--herd", type=int, default=None,
                        help="identical concurrent reads in the herd (default 10,000)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="interleaved rounds (default 3; --quick 1)")
    parser.add_argument("--floor-delay", default="1ms",
                        help="the floor's stand-in for one upstream read (default 1ms)")
    parser.add_argument("--uvloop", action="store_true",
                        help="run the sidecar and the floor server on uvloop")
    parser.add_argument("--client-loop", choices=["uvloop", "asyncio"], default=None,
                        help="the load client's loop (default uvloop if installed)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: fewer requests, one round")
    parser.add_argument("--json", type=Path, default=_OUT,
                        help="write results here, under the sidecar's loop, keeping the "
                             "other loop's run (default benchmarks/out/sidecar.json)")
    parser.add_argument("--check", action="store_true", help="exit 1 if a goal fails")
    args = parser.parse_args(argv)

    def pick(value: int | None, full: int, quick: int) -> int:
        return value if value is not None else (quick if args.quick else full)

    plan = Plan(keys=pick(args.requests, 20_000, 2_000),
                unloaded=pick(args.unloaded, 1_000, 300),
                concurrency=args.concurrency, slices=pick(args.slices, 4, 2),
                herd=pick(args.herd, 10_000, 2_000),
                rounds=pick(args.rounds, 3, 1), floor_delay=args.floor_delay,
                uvloop=args.uvloop)
    client_loop = args.client_loop
    if client_loop is None:
        client_loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
    started = time.monotonic()
    if client_loop == "uvloop":
        import uvloop

        results = uvloop.run(_run(plan))
    else:
        results = asyncio.run(_run(plan))
    report = _report(results, plan, client_loop)
    print(report)
    loop = "uvloop" if plan.uvloop else "asyncio"
    _write_json(args.json, loop, {
        "when": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "commit": _commit(), "quick": args.quick, "client_loop": client_loop,
        "seconds": round(time.monotonic() - started, 1), "plan": asdict(plan), **results,
    })
    failed = any(r["verdict"] == "FAIL" for r in results["ratios"])
    return 1 if args.check and failed else 0


if __name__ == "__main__":
    sys.exit(main())
