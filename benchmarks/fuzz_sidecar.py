"""A long fuzzing run of the sidecar and of the emulator, with a well-behaved reader.

    python benchmarks/fuzz_sidecar.py [--frames 1000000] [--workers 2] [--seed 1]
                                      [--max-seconds 900] [--json PATH]

Opt-in, not part of CI. The emulator and the sidecar in front of it run as their own
processes (``benchmarks/_procs.py``). ``--workers`` fuzzing processes each keep
``--connections`` connections open, half to the sidecar and half to the emulator
directly, and reconnect whenever one is closed. On each connection a fuzzer sends
batches of frames drawn from a seeded generator (``--seed``; worker *w* uses
``seed * 1000 + w``, so a run is reproducible frame for frame):

- random bytes of random length;
- a valid request of every opcode (STARTUP, OPTIONS, QUERY, PREPARE, EXECUTE with a
  real and a made-up id, BATCH, REGISTER, AUTH_RESPONSE, and the response-only opcodes
  sent as requests), then mutated: truncated, bit-flipped, with a lying length (too
  short, too long, negative, huge), LZ4-flagged with a compressed body or garbage,
  random flags, random stream ids (negative included), random versions;
- valid-but-odd requests: page size 1 and paging states from nowhere, every
  consistency, NULL and UNSET values, values of the wrong size, 0 and 65535
  statements in a BATCH, USE, ``LIMIT 0``, long statements.

Half the connections do a valid STARTUP first, so the frames reach the states after
the handshake. Between batches a fuzzer drains what came back and counts the
``PROTOCOL_ERROR`` answers; a connection is closed (by either side) after at most
``--frames-per-connection`` frames.

All through the run a well-behaved client reads a known row through the sidecar every
``--interval`` (10 ms) and checks its value (the row is in ``fz.known``, a table no
fuzzed statement names, so the fuzzers' own writes cannot change it); any error,
wrong value or dropped connection counts against the run. Reported: frames sent,
bytes, connections and how many were closed with a PROTOCOL_ERROR, crashes (a server
process gone, or the well-behaved connection dropped), the reader's reads and errors,
and RSS at start and end of both servers. PASS needs no crash, no reader error and at
least ``--frames`` frames sent. "Sent" means written to a socket: a frame written
after the server closed the connection (most fuzzed connections end in a
PROTOCOL_ERROR within a batch) was never parsed, so ``bytes`` and ``connections``
are reported next to it. Results go to ``--json`` (default
benchmarks/out/fuzz_sidecar.json).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import random
import struct
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _procs
from _cqlconn import CqlConn, CqlReplyError, int32, rows, setup_keyspace
from _procs import rss_kib

from coalesce.cql import (
    AuthResponse,
    Batch,
    BatchStatement,
    Execute,
    Opcode,
    Prepare,
    Query,
    QueryParameters,
    Register,
    Startup,
    compress_body,
)

_HEADER = struct.Struct(">BBhBi")
_KNOWN_VALUE = b"the-known-value"
_UNSET = object()


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


# -- the generator -----------------------------------------------------------------


class FrameGenerator:
    """Frames for fuzzing, reproducible from a seed; `prepared_id` is a real one."""

    def __init__(self, seed: int, prepared_id: bytes) -> None:
        self.rng = random.Random(seed)
        self.prepared_id = prepared_id
        self.kinds: dict[str, int] = {}

    def _params(self) -> QueryParameters:
        r = self.rng
        values: list[Any] | None = r.choice([
            None, [], [int32(r.randrange(-5, 5))], [None], [b""], [b"\x00" * r.randrange(9)],
            [int32(1), b"x"], [int32(1)] * r.randrange(0, 40)])
        return QueryParameters(
            consistency=r.choice([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 0xFFFF]),
            values=values,
            skip_metadata=r.random() < 0.3,
            page_size=r.choice([None, None, 1, 0, -1, 5000, 2**31 - 1]),
            paging_state=r.choice([None, None, b"", r.randbytes(r.randrange(1, 40))]),
            serial_consistency=r.choice([None, None, 8, 9, 1, 0xFFFF]),
            timestamp=r.choice([None, 1, -1, 2**63 - 1]),
        )

    def _statement(self) -> str:
        r = self.rng
        return r.choice([
            "SELECT v FROM fz.kv WHERE k = ?",
            "SELECT v FROM fz.kv WHERE k = 1",
            f"SELECT v FROM fz.kv WHERE k = {r.randrange(2, 10**6)}",
            "SELECT * FROM fz.kv LIMIT 0",
            "SELECT * FROM fz.kv",
            "SELECT * FROM system.local",
            "SELECT * FROM system.peers",
            f"INSERT INTO fz.kv (k, v) VALUES ({r.randrange(2, 10**6)}, 'f')",
            "INSERT INTO fz.kv (k, v) VALUES (?, ?)",
            f"USE {r.choice(['fz', 'system', 'nosuch', chr(34) + 'fz' + chr(34)])}",
            "use fz", "  USE   fz  ;", "/* c */ USE fz",
            f"SELECT v FROM fz.kv WHERE k IN ({', '.join(['?'] * r.randrange(1, 50))})",
            "SELECT " + "v, " * r.randrange(1, 200) + "v FROM fz.kv",
            "CREATE TABLE IF NOT EXISTS fz.kv (k int PRIMARY KEY, v text)",
            "DELETE FROM fz.kv WHERE k = 999999999",
            "UPDATE fz.kv SET v = 'x' WHERE k = 999999999 IF EXISTS",
            "SELECT v FROM fz.kv WHERE k = ? ALLOW FILTERING",
            "", ";", "SELECT", "\x00\xff", "SELECT v FROM fz.kv WHERE k = ? " * 50,
            r.randbytes(r.randrange(1, 64)).decode("latin-1"),
        ])

    def _valid(self) -> tuple[int, bytes]:
        r = self.rng
        opcode = r.choice([
            Opcode.STARTUP, Opcode.OPTIONS, Opcode.QUERY, Opcode.QUERY, Opcode.PREPARE,
            Opcode.EXECUTE, Opcode.EXECUTE, Opcode.BATCH, Opcode.REGISTER,
            Opcode.AUTH_RESPONSE, Opcode.READY, Opcode.ERROR, Opcode.RESULT, Opcode.EVENT,
            Opcode.SUPPORTED, Opcode.AUTHENTICATE, Opcode.AUTH_CHALLENGE, Opcode.AUTH_SUCCESS,
            r.randrange(0x11, 256)])
        if opcode == Opcode.STARTUP:
            options = r.choice([
                {"CQL_VERSION": "3.0.0"}, {"CQL_VERSION": "3.0.0", "COMPRESSION": "lz4"},
                {"CQL_VERSION": "3.0.0", "COMPRESSION": "snappy"}, {}, {"CQL_VERSION": "9"},
                {"CQL_VERSION": "3.0.0", "DRIVER_NAME": "x" * r.randrange(0, 3000)}])
            return opcode, Startup(options).encode()
        if opcode == Opcode.QUERY:
            return opcode, Query(self._statement(), self._params()).encode()
        if opcode == Opcode.PREPARE:
            return opcode, Prepare(self._statement()).encode()
        if opcode == Opcode.EXECUTE:
            qid = self.prepared_id if r.random() < 0.6 else r.randbytes(r.choice([0, 1, 16, 300]))
            return opcode, Execute(qid, self._params()).encode()
        if opcode == Opcode.BATCH:
            count = r.choice([0, 1, 2, 10, 300])
            statements = [
                BatchStatement(True, self.prepared_id, [int32(1)]) if r.random() < 0.3
                else BatchStatement(False, self._statement(), [])
                for _ in range(count)]
            return opcode, Batch(r.choice([0, 1, 2, 3, 255]), statements,
                                 r.choice([1, 4, 0xFFFF]), r.choice([None, 8]),
                                 r.choice([None, 5])).encode()
        if opcode == Opcode.REGISTER:
            return opcode, Register(r.choice([
                ["TOPOLOGY_CHANGE"], ["STATUS_CHANGE", "SCHEMA_CHANGE"], ["NOPE"], [],
                ["SCHEMA_CHANGE"] * 100])).encode()
        if opcode == Opcode.AUTH_RESPONSE:
            return opcode, AuthResponse(r.choice([
                b"\x00cassandra\x00cassandra", b"", b"\x00", r.randbytes(100)])).encode()
        return opcode, r.randbytes(r.randrange(0, 64))

    def frame(self) -> bytes:
        """One fuzzed frame's bytes (or a slice of garbage)."""
        r = self.rng
        roll = r.random()
        if roll < 0.08:
            self._count("random_bytes")
            return r.randbytes(r.randrange(1, 200))
        opcode, body = self._valid()
        version, flags = 4, 0
        stream = r.randrange(0, 200)
        kind = "valid"
        if roll < 0.35:
            mutation = r.randrange(9)
            kind = ("truncate", "bitflip", "length_short", "length_long", "length_odd",
                    "compressed", "flags", "stream", "version")[mutation]
            if mutation == 0 and body:
                body = body[:r.randrange(len(body))]
            elif mutation == 1 and body:
                data = bytearray(body)
                for _ in range(r.randrange(1, 6)):
                    pos = r.randrange(len(data))
                    data[pos] ^= 1 << r.randrange(8)
                body = bytes(data)
            elif mutation in (2, 3, 4):
                length = {2: max(0, len(body) - r.randrange(1, 20)),
                          3: len(body) + r.randrange(1, 20),
                          4: r.choice([-1, -(2**31), 2**31 - 1, 16 * 2**20, 16 * 2**20 + 1,
                                       1 << 24, 65536])}[mutation]
                self._count(kind)
                return _HEADER.pack(version, r.randrange(256) if r.random() < 0.2 else 0,
                                    stream, opcode, length) + body
            elif mutation == 5:
                flags |= 1
                choice = r.randrange(4)
                if choice == 0 and body:
                    body = compress_body(body)
                elif choice == 1:
                    # A tiny body claiming a huge decompressed size.
                    body = struct.pack(">i", r.choice([2**31 - 1, 64 * 2**20, 0, -5])) + \
                        r.randbytes(r.randrange(0, 30))
                elif choice == 2 and body:
                    body = compress_body(body)
                    body = body[:4] + r.randbytes(len(body) - 4)
                else:
                    body = compress_body(b"\x00" * r.randrange(1, 2**20))
            elif mutation == 6:
                flags = r.randrange(256)
            elif mutation == 7:
                stream = r.choice([-1, -2, -32768, 32767, 0, r.randrange(-32768, 32768)])
            else:
                version = r.choice([0, 1, 2, 3, 5, 6, 0x84, 0x7F, 0xFF, 0x44])
        elif roll < 0.45:
            kind = "odd_valid"
            stream = r.randrange(0, 32768)
        self._count(kind)
        return _HEADER.pack(version, flags, stream, opcode, len(body)) + body

    def _count(self, kind: str) -> None:
        self.kinds[kind] = self.kinds.get(kind, 0) + 1


# -- the fuzzing worker ------------------------------------------------------------


def _protocol_errors(data: bytes) -> int:
    """How many ERROR frames with code PROTOCOL_ERROR `data` holds (best effort)."""
    count, pos = 0, 0
    while len(data) - pos >= 9:
        _, _, _, opcode, length = _HEADER.unpack_from(data, pos)
        if length < 0:
            break
        if opcode == Opcode.ERROR and len(data) >= pos + 13:
            (code,) = struct.unpack_from(">i", data, pos + 9)
            count += code == 0x000A
        pos += 9 + length
    return count


async def _fuzz_connection(port: int, gen: FrameGenerator, stats: dict[str, int],
                           frames_per_conn: int, budget: list[int],
                           deadline: float) -> None:
    r = gen.rng
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port), 5)
    except (OSError, TimeoutError):
        stats["connect_failures"] += 1
        await asyncio.sleep(0.05)
        return
    stats["connections"] += 1
    closed_by_server = False
    protocol_error = False
    try:
        if r.random() < 0.5:
            writer.write(_HEADER.pack(4, 0, 0, Opcode.STARTUP, 22)
                         + Startup({"CQL_VERSION": "3.0.0"}).encode())
        sent = 0
        limit = r.randrange(1, frames_per_conn + 1)
        while sent < limit and budget[0] > 0 and time.monotonic() < deadline:
            batch = [gen.frame() for _ in range(min(r.randrange(1, 64), limit - sent))]
            budget[0] -= len(batch)
            data = b"".join(batch)
            writer.write(data)
            sent += len(batch)
            stats["frames"] += len(batch)
            stats["bytes"] += len(data)
            try:
                await asyncio.wait_for(writer.drain(), 2)
            except TimeoutError:
                stats["write_stalls"] += 1
                break
            # Drain whatever came back without waiting long for it.
            try:
                while True:
                    got = await asyncio.wait_for(reader.read(1 << 20), 0.005)
                    if not got:
                        closed_by_server = True
                        break
                    stats["answer_bytes"] += len(got)
                    if _protocol_errors(got):
                        protocol_error = True
            except TimeoutError:
                pass
            if closed_by_server:
                break
    except (ConnectionError, OSError):
        closed_by_server = True
    finally:
        stats["closed_by_server"] += closed_by_server
        stats["closed_with_protocol_error"] += protocol_error and closed_by_server
        stats["protocol_error_answers"] += protocol_error
        writer.close()
        with contextlib.suppress(ConnectionError, OSError, TimeoutError):
            await asyncio.wait_for(writer.wait_closed(), 1)


def _worker(index: int, seed: int, ports: dict[str, int], prepared_id: bytes,
            target_frames: int, connections: int, frames_per_conn: int,
            max_seconds: float, out: Any) -> None:
    async def main() -> dict[str, Any]:
        gen = FrameGenerator(seed * 1000 + index, prepared_id)
        per_target: dict[str, dict[str, int]] = {
            name: dict.fromkeys(
                ("frames", "bytes", "connections", "connect_failures", "closed_by_server",
                 "closed_with_protocol_error", "protocol_error_answers", "answer_bytes",
                 "write_stalls"), 0)
            for name in ports}
        deadline = time.monotonic() + max_seconds
        budget = [target_frames]

        async def lane(name: str) -> None:
            while budget[0] > 0 and time.monotonic() < deadline:
                await _fuzz_connection(ports[name], gen, per_target[name], frames_per_conn,
                                       budget, deadline)

        names = list(ports)
        await asyncio.gather(*(lane(names[i % len(names)]) for i in range(connections)))
        return {"targets": per_target, "kinds": gen.kinds}

    out.put((index, asyncio.run(main())))


# -- the well-behaved reader -------------------------------------------------------


async def _reader(port: int, interval: float, stop: asyncio.Event,
                  result: dict[str, Any]) -> None:
    conn = await CqlConn.connect(port)
    select = await conn.prepare("SELECT v FROM fz.known WHERE k = ?")
    latencies: list[float] = []
    try:
        while not stop.is_set():
            started = time.perf_counter()
            try:
                got = rows(await conn.execute(select, [int32(1)], timeout=5))
                if got != [[_KNOWN_VALUE]]:
                    result["wrong"] += 1
                    result["errors"].append(f"wrong value {got!r}")
                else:
                    result["reads"] += 1
            except TimeoutError:
                result["timeouts"] += 1
                result["errors"].append("timeout")
            except CqlReplyError as exc:
                result["error_answers"] += 1
                result["errors"].append(str(exc))
            except ConnectionError:
                result["dropped"] = True
                result["errors"].append("connection lost")
                break
            latencies.append(time.perf_counter() - started)
            await asyncio.sleep(interval)
    finally:
        conn.close()
        latencies.sort()
        if latencies:
            result["p50_ms"] = round(latencies[len(latencies) // 2] * 1e3, 3)
            result["p99_ms"] = round(latencies[int(len(latencies) * 0.99)] * 1e3, 3)
            result["max_ms"] = round(latencies[-1] * 1e3, 3)


async def _prepare_data(emulator_port: int) -> bytes:
    conn = await CqlConn.connect(emulator_port)
    await setup_keyspace(conn, "fz")
    # The known row lives in a table no fuzzed statement names, so the fuzzers' own
    # writes (an INSERT bound to (1, 'x') is a valid-but-odd request) cannot change it.
    await conn.query("CREATE TABLE IF NOT EXISTS fz.known (k int PRIMARY KEY, v text)")
    await conn.query(f"INSERT INTO fz.known (k, v) VALUES (1, '{_KNOWN_VALUE.decode()}')")
    prepared = await conn.prepare("SELECT v FROM fz.kv WHERE k = ?")
    conn.close()
    return prepared


async def _run(args: argparse.Namespace) -> dict[str, Any]:
    with _procs.emulator("0") as emu, _procs.sidecar(emu.port, False) as side:
        prepared_id = await _prepare_data(emu.port)
        pids = {"sidecar": side.pid, "emulator": emu.pid}
        rss_start = {name: rss_kib(pid) for name, pid in pids.items()}
        reader_result: dict[str, Any] = {"reads": 0, "wrong": 0, "timeouts": 0,
                                         "error_answers": 0, "dropped": False, "errors": []}
        stop = asyncio.Event()
        reader = asyncio.create_task(_reader(side.port, args.interval, stop, reader_result))
        ports = {"sidecar": side.port, "emulator": emu.port}
        ctx = multiprocessing.get_context("spawn")
        out = ctx.Queue()
        per_worker = -(-args.frames // args.workers)
        workers = [ctx.Process(target=_worker, args=(
            i, args.seed, ports, prepared_id, per_worker, args.connections,
            args.frames_per_connection, args.max_seconds, out)) for i in range(args.workers)]
        started = time.monotonic()
        for proc in workers:
            proc.start()
        results: dict[int, Any] = {}
        rss_peak = dict(rss_start)
        crashes: list[str] = []
        last_print = started
        while len(results) < len(workers):
            await asyncio.sleep(0.5)
            while not out.empty():
                index, value = out.get()
                results[index] = value
            for name, pid in pids.items():
                if not alive(pid):
                    if f"{name} died" not in crashes:
                        crashes.append(f"{name} died")
                else:
                    rss = rss_kib(pid) or 0
                    rss_peak[name] = max(rss_peak[name] or 0, rss)
            if time.monotonic() - last_print > 15:
                last_print = time.monotonic()
                print(f"  {last_print - started:6.0f}s reads={reader_result['reads']} "
                      f"errors={len(reader_result['errors'])} "
                      f"rss={ {n: rss_kib(p) for n, p in pids.items()} }", flush=True)
            if all(not p.is_alive() for p in workers) and out.empty():
                break
        for proc in workers:
            proc.join(10)
        elapsed = time.monotonic() - started
        # Let the servers settle: fuzz connections close, their buffers go.
        await asyncio.sleep(2)
        stop.set()
        await reader
        rss_end = {name: rss_kib(pid) for name, pid in pids.items()}
        for name, pid in pids.items():
            if not alive(pid) and f"{name} died" not in crashes:
                crashes.append(f"{name} died")
        if reader_result["dropped"]:
            crashes.append("well-behaved connection dropped")
        totals: dict[str, dict[str, int]] = {}
        kinds: dict[str, int] = {}
        for value in results.values():
            for target, stats in value["targets"].items():
                into = totals.setdefault(target, dict.fromkeys(stats, 0))
                for key, count in stats.items():
                    into[key] += count
            for kind, count in value["kinds"].items():
                kinds[kind] = kinds.get(kind, 0) + count
        frames = sum(t["frames"] for t in totals.values())
        reader_errors = len(reader_result["errors"])
        reader_result["errors"] = reader_result["errors"][:20]
        passed = not crashes and reader_errors == 0 and frames >= args.frames
        return {
            "seed": args.seed, "workers": args.workers, "connections": args.connections,
            "elapsed_s": round(elapsed, 1), "frames": frames,
            "frames_per_s": round(frames / elapsed), "by_target": totals, "kinds": kinds,
            "crashes": crashes, "reader": reader_result, "reader_errors": reader_errors,
            "rss_kib": {"start": rss_start, "peak": rss_peak, "end": rss_end},
            "sidecar_output_tail": list(side.output)[-10:],
            "pass": passed,
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=1_000_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--connections", type=int, default=16,
                        help="connections per worker, split between the two targets")
    parser.add_argument("--frames-per-connection", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--interval", type=float, default=0.01)
    parser.add_argument("--max-seconds", type=float, default=900)
    parser.add_argument("--json", type=Path,
                        default=Path(__file__).with_name("out") / "fuzz_sidecar.json")
    args = parser.parse_args()
    report = asyncio.run(_run(args))
    print(json.dumps({k: v for k, v in report.items() if k != "sidecar_output_tail"},
                     indent=2))
    print("PASS" if report["pass"] else "FAIL")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    sys.exit(0 if report["pass"] else 1)


if __name__ == "__main__":
    main()
