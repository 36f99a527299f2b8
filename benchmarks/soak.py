"""A soak of the sidecar: everything at once for a bounded time, memory watched throughout.

    python benchmarks/soak.py [--duration 60] [--quick] [--json PATH]

The emulator and the sidecar run as their own processes (``benchmarks/_procs.py``),
the sidecar with a small ``--max-client-buffer`` and ``--prepared-cache-bytes`` (set
through their ``COALESCE_SIDECAR_*`` variables) so the memory bound below means
something. For ``--duration`` seconds (``--quick``: 15 s), at once:

- ``--idle`` (300) connections that finish STARTUP and then send nothing;
- ``--active`` (50) connections reading distinct partitions, one read in flight each,
  every answer checked against the value written (an UNPREPARED answer is counted,
  then the statement prepared again and the read retried once, as drivers do);
- a herd: ``--herd`` (500) identical reads of one partition over the active
  connections, again as soon as the last one is answered;
- one client that sends reads of a large row as fast as the socket takes them and
  never reads an answer;
- a PREPARE flood: one connection preparing distinct statements, one after another;
- an upstream freeze: the emulator is SIGSTOPped for ``--freeze`` seconds (4; quick: 3)
  at 40 % of the run, then SIGCONTed.

Every 250 ms the sidecar's (and the emulator's) VmRSS is read from /proc/<pid>/status.
Reported: RSS over time, answers checked correct and wrong, errors by kind (timeout,
overloaded, server error, connection lost, other), reads per phase, and the memory
check. The bound is

    idle RSS + max_client_buffer x connections
             + max_client_requests x answer size x non-reading clients
             + prepared_cache_bytes

where idle RSS is the sidecar's RSS measured after start-up with the data loaded and
before any load (the constant). PASS needs: peak RSS under the bound, no wrong answer,
the sidecar alive at the end, and reads answered again in the last fifth of the run
(the freeze is over by then). Errors are reported, not judged: the freeze is meant to
produce some. Results go to ``--json`` (default benchmarks/out/soak.json).

The bound holds for this workload, not for every client: the answer size is the
client's choice (a read of a whole table), and a connection part-way through a frame
holds up to ``max_frame_size`` besides its unsent answers.
``benchmarks/adversary_memory.py`` reproduces both.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _procs
from _cqlconn import CqlConn, CqlReplyError, int32, rows, setup_keyspace
from _procs import rss_kib

from coalesce.cql import Execute, Opcode, QueryParameters, Startup, encode_frame

_KEYS = 5000
_HOT = 0
_BIG = -1
_BIG_VALUE = b"B" * 4096
_MAX_CLIENT_BUFFER = 256 * 1024
_MAX_CLIENT_REQUESTS = 2048
_PREPARED_CACHE_BYTES = 1024 * 1024
_CLIENT_TIMEOUT = 15.0
_SELECT = "SELECT v FROM soak.kv WHERE k = ?"  # above the sidecar's 12 s request timeout


def _value(key: int) -> bytes:
    return _BIG_VALUE if key == _BIG else f"value-{key}".encode()


class Tally:
    """Answers checked and errors by kind, with the time of each success."""

    def __init__(self, started: float) -> None:
        self.started = started
        self.correct = 0
        self.wrong = 0
        self.errors: dict[str, int] = {}
        self.error_samples: dict[str, str] = {}
        self.success_times: list[float] = []
        self.prepared = 0

    def ok(self, got: list[list[bytes | None]], key: int) -> None:
        if got == [[_value(key)]]:
            self.correct += 1
            self.success_times.append(time.monotonic() - self.started)
        else:
            self.wrong += 1
            self.error_samples.setdefault("wrong", repr(got)[:200])

    def error(self, exc: BaseException) -> None:
        if isinstance(exc, TimeoutError):
            kind = "timeout"
        elif isinstance(exc, CqlReplyError):
            kind = {0x1001: "overloaded", 0x0000: "server_error",
                    0x1100: "write_timeout", 0x1200: "read_timeout",
                    0x1000: "unavailable", 0x2500: "unprepared",
                    }.get(exc.code, f"error_0x{exc.code:04x}")
        elif isinstance(exc, ConnectionError | OSError):
            kind = "connection_lost"
        else:
            kind = type(exc).__name__
        self.errors[kind] = self.errors.get(kind, 0) + 1
        self.error_samples.setdefault(kind, str(exc)[:200])


async def _read(conn: CqlConn, select: bytes, key: int, tally: Tally) -> None:
    """One checked read; on UNPREPARED, prepares again and retries once, as drivers do."""
    for attempt in range(2):
        try:
            tally.ok(rows(await conn.execute(select, [int32(key)], timeout=_CLIENT_TIMEOUT)),
                     key)
            return
        except CqlReplyError as exc:
            tally.error(exc)
            if exc.code != 0x2500 or attempt:
                return
            try:
                # The same text has the same id, so `select` stays valid.
                await conn.prepare(_SELECT, timeout=_CLIENT_TIMEOUT)
            except (TimeoutError, CqlReplyError, ConnectionError, OSError) as again:
                tally.error(again)
                return
        except (TimeoutError, ConnectionError, OSError) as exc:
            tally.error(exc)
            return


async def _load(port: int) -> None:
    conn = await CqlConn.connect(port)
    await setup_keyspace(conn, "soak")
    insert = await conn.prepare("INSERT INTO soak.kv (k, v) VALUES (?, ?)")
    for start in range(0, _KEYS, 100):
        await asyncio.gather(*(conn.execute(insert, [int32(k), _value(k)])
                               for k in range(start, min(start + 100, _KEYS))))
    await conn.execute(insert, [int32(_BIG), _BIG_VALUE])
    conn.close()


async def _reconnecting(port: int, tally: Tally) -> tuple[CqlConn, bytes]:
    while True:
        try:
            conn = await CqlConn.connect(port, timeout=_CLIENT_TIMEOUT)
            return conn, await conn.prepare(_SELECT, timeout=_CLIENT_TIMEOUT)
        except (TimeoutError, CqlReplyError, ConnectionError, OSError) as exc:
            tally.error(exc)
            await asyncio.sleep(0.2)


async def _active(port: int, index: int, count: int, stop: float, tally: Tally) -> None:
    conn, select = await _reconnecting(port, tally)
    key = index
    while time.monotonic() < stop:
        if conn.closed.is_set():
            conn, select = await _reconnecting(port, tally)
        await _read(conn, select, key % _KEYS, tally)
        key += count
    conn.close()


async def _herd(port: int, size: int, stop: float, tally: Tally, rounds: list[int]) -> None:
    conns = [await _reconnecting(port, tally) for _ in range(10)]
    while time.monotonic() < stop:
        for i, (conn, _) in enumerate(conns):
            if conn.closed.is_set():
                conns[i] = await _reconnecting(port, tally)
        await asyncio.gather(*(_read(conns[i % 10][0], conns[i % 10][1], _HOT, tally)
                               for i in range(size)))
        rounds[0] += 1
    for conn, _ in conns:
        conn.close()


async def _prepare_flood(port: int, stop: float, tally: Tally) -> None:
    conn, _ = await _reconnecting(port, tally)
    n = 0
    while time.monotonic() < stop:
        if conn.closed.is_set():
            conn, _ = await _reconnecting(port, tally)
        n += 1
        try:
            await conn.prepare(f"SELECT v FROM soak.kv WHERE k = {n} -- {'p' * 200}",
                               timeout=_CLIENT_TIMEOUT)
            tally.prepared += 1
        except (TimeoutError, CqlReplyError, ConnectionError, OSError) as exc:
            tally.error(exc)
    conn.close()


async def _non_reader(port: int, select: bytes, stop: float, result: dict[str, Any]) -> None:
    """Sends reads of the big row as long as the socket takes them; never reads."""
    loop = asyncio.get_running_loop()
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.sendall(encode_frame(Opcode.STARTUP, Startup({"CQL_VERSION": "3.0.0"}).encode(),
                              stream=0))
    # The READY is the one answer this client reads.
    await loop.run_in_executor(None, sock.recv, 9)
    sock.setblocking(False)
    body = Execute(select, QueryParameters(1, [int32(_BIG)])).encode()
    stream, sent, pending = 1, 0, b""
    while time.monotonic() < stop:
        try:
            while True:
                if not pending:
                    pending = encode_frame(Opcode.EXECUTE, body, stream=stream)
                    stream = stream % 32767 + 1
                done = sock.send(pending)
                pending = pending[done:]
                if not pending:
                    sent += 1
        except BlockingIOError:
            pass
        except OSError as exc:
            result["closed"] = str(exc)
            break
        await asyncio.sleep(0.05)
    result["requests_sent"] = sent
    sock.close()


async def _freeze(pid: int, at: float, seconds: float, log: dict[str, Any]) -> None:
    await asyncio.sleep(max(0.0, at - time.monotonic()))
    log["stopped_at_s"] = round(time.monotonic() - log["t0"], 2)
    os.kill(pid, signal.SIGSTOP)
    try:
        await asyncio.sleep(seconds)
    finally:
        os.kill(pid, signal.SIGCONT)
        log["continued_at_s"] = round(time.monotonic() - log["t0"], 2)


def _metric_lines(port: int | None) -> dict[str, float]:
    """The sidecar's connection-close and upstream-error counters, by label."""
    out: dict[str, float] = {}
    with contextlib.suppress(OSError):
        assert port is not None
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
            for line in reply.read().decode().splitlines():
                if line.startswith(("coalesce_sidecar_connections_closed",
                                    "coalesce_sidecar_upstream_errors")):
                    name, _, value = line.rpartition(" ")
                    if not name.endswith("_created"):
                        out[name] = float(value)
    return out


async def _run(args: argparse.Namespace) -> dict[str, Any]:
    os.environ["COALESCE_SIDECAR_MAX_CLIENT_BUFFER"] = str(_MAX_CLIENT_BUFFER)
    os.environ["COALESCE_SIDECAR_MAX_CLIENT_REQUESTS"] = str(_MAX_CLIENT_REQUESTS)
    os.environ["COALESCE_SIDECAR_PREPARED_CACHE_BYTES"] = str(_PREPARED_CACHE_BYTES)
    with _procs.emulator("0") as emu, _procs.sidecar(emu.port, False) as side:
        await _load(emu.port)
        probe = await CqlConn.connect(side.port)
        select = await probe.prepare(_SELECT)
        # One answer of the big row, header included, is the answer size of the bound.
        _, body = await probe.request(
            Opcode.EXECUTE, Execute(select, QueryParameters(1, [int32(_BIG)])).encode())
        answer_size = 9 + len(body)
        probe.close()
        await asyncio.sleep(1)
        idle_rss = rss_kib(side.pid) or 0

        idle = []
        for _ in range(args.idle):
            idle.append(await CqlConn.connect(side.port))
        rss_with_idle = rss_kib(side.pid) or 0

        t0 = time.monotonic()
        stop = t0 + args.duration
        tally = Tally(t0)
        herd_rounds = [0]
        non_reader: dict[str, Any] = {}
        freeze_log: dict[str, Any] = {"t0": t0}
        samples: list[dict[str, Any]] = []

        async def sample() -> None:
            while time.monotonic() < stop + 1:
                samples.append({"t": round(time.monotonic() - t0, 2),
                                "sidecar_kib": rss_kib(side.pid),
                                "emulator_kib": rss_kib(emu.pid)})
                await asyncio.sleep(0.25)

        tasks = [
            asyncio.create_task(sample()),
            *(asyncio.create_task(_active(side.port, i, args.active, stop, tally))
              for i in range(args.active)),
            asyncio.create_task(_herd(side.port, args.herd, stop, tally, herd_rounds)),
            asyncio.create_task(_prepare_flood(side.port, stop, tally)),
            asyncio.create_task(_non_reader(side.port, select, stop, non_reader)),
            asyncio.create_task(_freeze(emu.pid, t0 + 0.4 * args.duration, args.freeze,
                                        freeze_log)),
        ]
        await asyncio.gather(*tasks)
        idle_alive = sum(not conn.closed.is_set() for conn in idle)
        for conn in idle:
            conn.close()
        alive = rss_kib(side.pid) is not None
        await asyncio.sleep(1)
        rss_after = rss_kib(side.pid)
        sidecar_metrics = _metric_lines(side.metrics_port)

    connections = args.idle + args.active + 10 + 1 + 1 + 1
    bound_kib = (idle_rss * 1024 + _MAX_CLIENT_BUFFER * connections
                 + _MAX_CLIENT_REQUESTS * answer_size * 1 + _PREPARED_CACHE_BYTES) // 1024
    peak = max((s["sidecar_kib"] or 0) for s in samples)
    tail_start = 0.8 * args.duration
    tail_reads = sum(1 for t in tally.success_times if t >= tail_start)
    freeze_end = freeze_log.get("continued_at_s", 0.0)
    phases = {
        "before_freeze": sum(1 for t in tally.success_times
                             if t < freeze_log.get("stopped_at_s", 0.0)),
        "during_freeze": sum(1 for t in tally.success_times
                             if freeze_log.get("stopped_at_s", 0.0) <= t < freeze_end),
        "after_freeze": sum(1 for t in tally.success_times if t >= freeze_end),
        "last_fifth": tail_reads,
    }
    checks = {
        "rss_under_bound": peak <= bound_kib,
        "no_wrong_answer": tally.wrong == 0,
        "sidecar_alive": alive,
        "reads_after_freeze": tail_reads > 0,
    }
    freeze_log.pop("t0")
    return {
        "duration_s": args.duration,
        "clients": {"idle": args.idle, "active": args.active, "herd": args.herd,
                    "herd_connections": 10, "non_reading": 1, "prepare_flood": 1},
        "settings": {"max_client_buffer": _MAX_CLIENT_BUFFER,
                     "max_client_requests": _MAX_CLIENT_REQUESTS,
                     "prepared_cache_bytes": _PREPARED_CACHE_BYTES},
        "answer_size_bytes": answer_size,
        "rss_kib": {"idle_constant": idle_rss, "with_idle_connections": rss_with_idle,
                    "peak": peak, "after": rss_after, "bound": bound_kib},
        "answers": {"correct": tally.correct, "wrong": tally.wrong,
                    "herd_rounds": herd_rounds[0], "by_phase": phases},
        "prepared": tally.prepared, "sidecar_metrics": sidecar_metrics,
        "errors": tally.errors, "error_samples": tally.error_samples,
        "non_reader": non_reader, "idle_connections_alive": idle_alive,
        "freeze": freeze_log, "checks": checks, "pass": all(checks.values()),
        "rss_samples": samples,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--quick", action="store_true", help="15 s, a 3 s freeze")
    parser.add_argument("--idle", type=int, default=300)
    parser.add_argument("--active", type=int, default=50)
    parser.add_argument("--herd", type=int, default=500)
    parser.add_argument("--freeze", type=float, default=4.0)
    parser.add_argument("--json", type=Path,
                        default=Path(__file__).with_name("out") / "soak.json")
    args = parser.parse_args()
    if args.quick:
        args.duration, args.freeze = 15.0, 3.0
    report = asyncio.run(_run(args))
    shown = {k: v for k, v in report.items() if k != "rss_samples"}
    print(json.dumps(shown, indent=2))
    samples = report["rss_samples"]
    step = max(1, len(samples) // 20)
    print("sidecar RSS over time (KiB):")
    for s in samples[::step]:
        print(f"  t={s['t']:6.1f}s  sidecar={s['sidecar_kib']}  emulator={s['emulator_kib']}")
    for name, ok in report["checks"].items():
        print(f"{name}: {'PASS' if ok else 'FAIL'}")
    print("PASS" if report["pass"] else "FAIL")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    sys.exit(0 if report["pass"] else 1)


if __name__ == "__main__":
    main()
