"""What does the sidecar cost on the pass-through path, and what does it buy in a herd?

    python benchmarks/sidecar.py [--uvloop] [--requests 20000] [--concurrency 64]
                                 [--herd 10000] [--json out.json]

Everything runs on this machine, each server in its own process (the emulator, the
sidecar, and a plain TCP relay -- socat -- for comparison), the load from this one:

- pass-through: distinct prepared reads (a different partition each time, zero service
  time in the emulator), first one at a time (unloaded latency: what the proxy adds to
  one request), then ``--concurrency`` in flight over 4 connections (throughput),
  against the emulator directly, through socat, and through the sidecar;
- herd: ``--herd`` concurrent reads of one hot partition (1 ms service time, Scylla's
  shard-per-core queueing) over 50 connections, directly and through the sidecar,
  with the number of reads that reached the emulator.

socat comes from Debian: ``apt-get install -y socat``; without it that row is skipped.
Numbers on a 2-core machine running four processes are noisy: compare rows of the same
run, not runs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

from coalesce.cql import (
    TRACING,
    Error,
    Execute,
    Frame,
    FrameDecoder,
    Opcode,
    Prepare,
    Query,
    QueryParameters,
    ResultPrepared,
    Startup,
    decode_result,
    encode_frame,
)

_HEADER = struct.Struct(">BBhBi")
_KEYS = 1000
_READ = "SELECT v FROM bench.kv WHERE k = ?"


# -- processes -------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def _process(argv: list[str], ready: str) -> Iterator[subprocess.Popen[str]]:
    """Start a server process; yield once a line containing `ready` was printed."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONPATH": os.getcwd()})
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                raise RuntimeError(f"{argv[0]} exited: {proc.wait()}")
            if ready in line:
                break
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _emulator(port: int, metrics: int, read_latency: str) -> contextlib.AbstractContextManager[Any]:
    return _process(
        [sys.executable, "-m", "coalesce.emulator.command", "--listen", f"127.0.0.1:{port}",
         "--read-latency", read_latency, "--write-latency", "0", "--per-row", "0",
         "--metrics", f"127.0.0.1:{metrics}"],
        "listening on",
    )


_SIDECAR = (
    "import argparse, sys\n"
    "from coalesce.sidecar.command import configure_parser\n"
    "parser = argparse.ArgumentParser()\n"
    "configure_parser(parser)\n"
    "args = parser.parse_args(sys.argv[1:])\n"
    "sys.exit(args.run(args))\n"
)


def _sidecar(port: int, upstream: int, uvloop: bool) -> contextlib.AbstractContextManager[Any]:
    argv = [sys.executable, "-c", _SIDECAR, "--listen", f"127.0.0.1:{port}",
            "--upstream", f"127.0.0.1:{upstream}", "--metrics", "off"]
    if uvloop:
        argv.append("--uvloop")
    return _process(argv, "listening on")


@contextlib.contextmanager
def _socat(port: int, upstream: int) -> Iterator[None]:
    proc = subprocess.Popen(
        ["socat", f"TCP-LISTEN:{port},fork,reuseaddr,bind=127.0.0.1,nodelay",
         f"TCP:127.0.0.1:{upstream},nodelay"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port)):
                break
        yield
    finally:
        proc.terminate()
        proc.wait(10)


def _emulator_selects(metrics_port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as r:
        text = r.read().decode()
    match = re.search(r'coalesce_emulator_statements_total\{kind="select"\} ([0-9.e+]+)', text)
    return int(float(match.group(1))) if match else 0


# -- the load client -------------------------------------------------------------------------


class _Connection(asyncio.Protocol):
    """A pipelining CQL v4 client: stream ids, send times, one callback per answer."""

    def __init__(self) -> None:
        self.decoder = FrameDecoder()
        self.transport: asyncio.Transport | None = None
        self.waiters: dict[int, asyncio.Future[Frame]] = {}
        self.on_answer: Any = None
        self.sent_at = [0] * 32768
        self.latencies: list[int] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's quack alike

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter_ns()
        for frame in self.decoder.feed(data):
            waiter = self.waiters.pop(frame.stream, None)
            if waiter is not None:
                waiter.set_result(frame)
                continue
            if frame.opcode == Opcode.ERROR:
                raise RuntimeError(Error.decode(frame.body).message)
            self.latencies.append(now - self.sent_at[frame.stream])
            if self.on_answer is not None:
                self.on_answer(self, frame.stream)

    async def request(self, opcode: int, body: bytes, stream: int = 0) -> Frame:
        waiter: asyncio.Future[Frame] = asyncio.get_running_loop().create_future()
        self.waiters[stream] = waiter
        assert self.transport is not None
        self.transport.write(encode_frame(opcode, body, stream=stream))
        return await waiter

    def send(self, stream: int, frame: bytes) -> None:
        self.sent_at[stream] = time.perf_counter_ns()
        assert self.transport is not None
        self.transport.write(frame)


async def _connect(port: int) -> _Connection:
    loop = asyncio.get_running_loop()
    _, conn = await loop.create_connection(_Connection, "127.0.0.1", port)
    reply = await conn.request(Opcode.STARTUP, Startup({"CQL_VERSION": "3.0.0"}).encode())
    assert reply.opcode == Opcode.READY, reply
    return conn


async def _prepare(conn: _Connection) -> bytes:
    reply = await conn.request(Opcode.PREPARE, Prepare(_READ).encode())
    result = decode_result(reply.body)
    assert isinstance(result, ResultPrepared), reply
    return result.query_id


def _read_frame(query_id: bytes, stream: int, key: int, flags: int = 0) -> bytes:
    body = Execute(query_id, QueryParameters(1, [struct.pack(">i", key)])).encode()
    return encode_frame(Opcode.EXECUTE, body, stream=stream, flags=flags)


async def _setup_schema(port: int) -> None:
    conn = await _connect(port)
    for text in (
        "CREATE KEYSPACE IF NOT EXISTS bench WITH replication = "
        "{'class': 'SimpleStrategy', 'replication_factor': 1}",
        "CREATE TABLE IF NOT EXISTS bench.kv (k int PRIMARY KEY, v text)",
    ):
        await conn.request(Opcode.QUERY, Query(text, QueryParameters(1)).encode())
    insert = await conn.request(
        Opcode.PREPARE, Prepare("INSERT INTO bench.kv (k, v) VALUES (?, ?)").encode()
    )
    result = decode_result(insert.body)
    assert isinstance(result, ResultPrepared)
    for key in range(_KEYS):
        body = Execute(result.query_id, QueryParameters(
            1, [struct.pack(">i", key), f"value-{key}".encode()])).encode()
        await conn.request(Opcode.EXECUTE, body)
    assert conn.transport is not None
    conn.transport.close()


@dataclass
class LoadResult:
    target: str
    p50_us_unloaded: float
    p99_us_unloaded: float
    throughput_rps: float
    p50_us_loaded: float
    p99_us_loaded: float


async def _closed_loop(port: int, requests: int, concurrency: int, connections: int,
                       flags: int = 0) -> tuple[float, list[int]]:
    """`concurrency` requests in flight over `connections`; (requests/s, latencies ns)."""
    conns = [await _connect(port) for _ in range(connections)]
    query_id = await _prepare(conns[0])
    done = asyncio.get_running_loop().create_future()
    state = {"sent": 0, "answered": 0}

    def next_frame(stream: int) -> bytes:
        key = state["sent"] % _KEYS
        state["sent"] += 1
        return _read_frame(query_id, stream, key, flags)

    def on_answer(conn: _Connection, stream: int) -> None:
        state["answered"] += 1
        if state["sent"] < requests:
            conn.send(stream, next_frame(stream))
        elif state["answered"] >= requests and not done.done():
            done.set_result(None)

    per_conn = max(1, concurrency // connections)
    started = time.perf_counter()
    for conn in conns:
        conn.on_answer = on_answer
        for stream in range(1, per_conn + 1):
            if state["sent"] < requests:
                conn.send(stream, next_frame(stream))
    await asyncio.wait_for(done, 300)
    elapsed = time.perf_counter() - started
    latencies = [lat for conn in conns for lat in conn.latencies]
    for conn in conns:
        assert conn.transport is not None
        conn.transport.close()
    return requests / elapsed, latencies


def _pct(values: list[int], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] / 1000.0


async def _measure(target: str, port: int, requests: int, concurrency: int,
                   flags: int = 0) -> LoadResult:
    await _closed_loop(port, 2000, 8, 2, flags)  # warm up both ends
    _, unloaded = await _closed_loop(port, min(requests, 5000), 1, 1, flags)
    throughput, loaded = await _closed_loop(port, requests, concurrency, 4, flags)
    return LoadResult(
        target, _pct(unloaded, 0.5), _pct(unloaded, 0.99), throughput,
        _pct(loaded, 0.5), _pct(loaded, 0.99),
    )


@dataclass
class HerdResult:
    target: str
    readers: int
    upstream_reads: int
    wall_ms: float
    p50_ms: float
    p99_ms: float
    single_read_ms: float


async def _herd(target: str, port: int, metrics_port: int, readers: int) -> HerdResult:
    conns = [await _connect(port) for _ in range(50)]
    query_id = await _prepare(conns[0])
    # One read alone first: the baseline the herd is compared with.
    _, single = await _closed_loop(port, 200, 1, 1)
    before = _emulator_selects(metrics_port)
    remaining = {"n": readers}
    done = asyncio.get_running_loop().create_future()

    def on_answer(conn: _Connection, stream: int) -> None:
        remaining["n"] -= 1
        if remaining["n"] == 0:
            done.set_result(None)

    # Each connection's share goes out in one write: the herd arrives as a herd, and
    # the client's own system calls stay out of the latencies.
    shares = [[_read_frame(query_id, stream, 7) for stream in
               range(1, (readers - i + len(conns) - 1) // len(conns) + 1)]
              for i in range(len(conns))]
    started = time.perf_counter()
    for conn, frames in zip(conns, shares, strict=True):
        conn.on_answer = on_answer
        now = time.perf_counter_ns()
        for stream in range(1, len(frames) + 1):
            conn.sent_at[stream] = now
        assert conn.transport is not None
        conn.transport.write(b"".join(frames))
    await asyncio.wait_for(done, 300)
    wall = time.perf_counter() - started
    latencies = [lat for conn in conns for lat in conn.latencies]
    for conn in conns:
        assert conn.transport is not None
        conn.transport.close()
    return HerdResult(
        target, readers, _emulator_selects(metrics_port) - before, wall * 1e3,
        _pct(latencies, 0.5) / 1e3, _pct(latencies, 0.99) / 1e3,
        statistics.median(single) / 1e6,
    )


# -- the run ---------------------------------------------------------------------------------


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _run(args: argparse.Namespace) -> dict[str, Any]:
    herds: list[HerdResult] = []
    emu_port, emu_metrics = _free_port(), _free_port()
    rounds: dict[str, list[LoadResult]] = {}
    cpu: dict[str, float] = {}
    with contextlib.ExitStack() as stack:
        stack.enter_context(_emulator(emu_port, emu_metrics, "0"))
        await _setup_schema(emu_port)
        targets: dict[str, tuple[int, int]] = {"direct": (emu_port, 0)}
        if shutil.which("socat"):
            relay = _free_port()
            stack.enter_context(_socat(relay, emu_port))
            targets["socat"] = (relay, 0)
        else:
            print("socat not found (apt-get install -y socat): skipping the TCP relay row",
                  file=sys.stderr)
        side = _free_port()
        sidecar = stack.enter_context(_sidecar(side, emu_port, args.uvloop))
        targets["sidecar"] = (side, 0)
        # The same reads with the TRACING flag: the emulator ignores it, the sidecar
        # never merges traced requests -- its plain forwarding path.
        targets["sidecar-fwd"] = (side, TRACING)
        # Interleaved rounds, medians reported: other load on the machine hits every
        # target alike instead of whichever happened to run during it.
        for _ in range(args.rounds):
            for target, (port, flags) in targets.items():
                before = _cpu_seconds(sidecar.pid)
                rounds.setdefault(target, []).append(
                    await _measure(target, port, args.requests, args.concurrency, flags)
                )
                if target.startswith("sidecar"):
                    spent = _cpu_seconds(sidecar.pid) - before
                    cpu[target] = min(cpu.get(target, spent), spent)
    loads = [_median_result(target, results) for target, results in rounds.items()]

    emu_port, emu_metrics = _free_port(), _free_port()
    with _emulator(emu_port, emu_metrics, "1ms"):
        await _setup_schema(emu_port)
        herds.append(await _herd("direct", emu_port, emu_metrics, args.herd))
        side = _free_port()
        with _sidecar(side, emu_port, args.uvloop):
            herds.append(await _herd("sidecar", side, emu_metrics, args.herd))
    # Requests per measurement: warm-up, one-by-one, then the loaded run.
    per_measure = 2000 + min(args.requests, 5000) + args.requests
    return {
        "pass_through": [asdict(r) for r in loads],
        "sidecar_cpu_us_per_request": {
            target: spent / per_measure * 1e6 for target, spent in cpu.items()
        },
        "herd": [asdict(h) for h in herds],
    }


def _median_result(target: str, results: list[LoadResult]) -> LoadResult:
    def median(field: str) -> float:
        return float(statistics.median(getattr(r, field) for r in results))

    return LoadResult(target, median("p50_us_unloaded"), median("p99_us_unloaded"),
                      median("throughput_rps"), median("p50_us_loaded"), median("p99_us_loaded"))


def _report(results: dict[str, Any], args: argparse.Namespace) -> str:
    loop = "uvloop" if args.uvloop else "asyncio"
    lines = [
        f"pass-through, distinct prepared reads (load client and sidecar on {loop})",
        f"{'target':<11} {'p50 1-by-1':>11} {'p99 1-by-1':>11} {'req/s':>9} "
        f"{'p50 @' + str(args.concurrency):>10} {'p99 @' + str(args.concurrency):>10}",
    ]
    by_target = {r["target"]: r for r in results["pass_through"]}
    for r in results["pass_through"]:
        lines.append(
            f"{r['target']:<11} {r['p50_us_unloaded']:>9.0f}us {r['p99_us_unloaded']:>9.0f}us "
            f"{r['throughput_rps']:>9.0f} {r['p50_us_loaded']:>8.0f}us {r['p99_us_loaded']:>8.0f}us"
        )
    cpu = results["sidecar_cpu_us_per_request"]
    lines.append(f"(medians of {args.rounds} interleaved rounds; sidecar CPU per request: "
                 + ", ".join(f"{t} {us:.0f}us" for t, us in cpu.items()) + ")")
    lines.append("sidecar: reads take the merge path; sidecar-fwd: the same reads traced, "
                 "which the sidecar forwards unmerged")
    lines.append("")
    lines.append(f"herd: {args.herd:,} concurrent reads of one partition, 1 ms service time")
    lines.append(f"{'target':<9} {'upstream reads':>15} {'wall':>9} {'p50':>9} {'p99':>9} "
                 f"{'1 read':>8}")
    for h in results["herd"]:
        lines.append(
            f"{h['target']:<9} {h['upstream_reads']:>15,} {h['wall_ms']:>7.0f}ms "
            f"{h['p50_ms']:>7.1f}ms {h['p99_ms']:>7.1f}ms {h['single_read_ms']:>6.2f}ms"
        )
    lines.append("")
    side, direct = by_target["sidecar"], by_target["direct"]
    added = side["p50_us_unloaded"] - direct["p50_us_unloaded"]
    lines.append(f"goal: sidecar adds < 150us at p50: {added:.0f}us "
                 f"-> {'met' if added < 150 else 'NOT met'}")
    if "socat" in by_target:
        share = side["throughput_rps"] / by_target["socat"]["throughput_rps"]
        lines.append(f"goal: >= 50% of the TCP relay's throughput: {share:.0%} "
                     f"-> {'met' if share >= 0.5 else 'NOT met'}")
    herd = {h["target"]: h for h in results["herd"]}["sidecar"]
    lines.append(f"goal: herd costs a handful of upstream reads: {herd['upstream_reads']} "
                 f"-> {'met' if herd['upstream_reads'] <= 5 else 'NOT met'}")
    ratio = herd["p99_ms"] / herd["single_read_ms"]
    lines.append(f"goal: herd p99 within 3x of a single read: {ratio:.1f}x "
                 f"-> {'met' if ratio <= 3 else 'NOT met'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=20_000,
                        help="reads per throughput measurement (default 20,000)")
    parser.add_argument("--concurrency", type=int, default=64,
                        help="reads in flight in the throughput phase (default 64)")
    parser.add_argument("--herd", type=int, default=10_000,
                        help="concurrent readers of the hot partition (default 10,000)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="interleaved rounds of the pass-through runs (default 3)")
    parser.add_argument("--uvloop", action="store_true",
                        help="run the sidecar and this load client on uvloop")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    if args.uvloop:
        import uvloop

        results = uvloop.run(_run(args))
    else:
        results = asyncio.run(_run(args))
    print(_report(results, args))
    if args.json:
        payload = {"uvloop": args.uvloop, "requests": args.requests,
                   "concurrency": args.concurrency, **results}
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
