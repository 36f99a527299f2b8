"""Reproductions of two ways one client grows the sidecar's memory past its client bounds.

    python benchmarks/adversary_memory.py big-answers [--count 200]
    python benchmarks/adversary_memory.py partial-frames [--count 10]

The emulator and the sidecar (default settings: ``--max-client-buffer 4MiB``,
``--max-client-requests 2048``, ``--max-frame-size 16MiB``) run as their own
processes (``benchmarks/_procs.py``); the sidecar's VmRSS is read from /proc.

- ``big-answers``: one client sends ``--count`` distinct reads of a whole 1,000-row
  table (about 1 MB per answer) in one write and never reads. Every request is read
  before the unsent-bytes bound trips, so the sidecar holds ``count`` answers; a
  well-behaved client reading one row every 500 ms meanwhile reports its worst latency.
  ``--count 0`` is the control.
- ``partial-frames``: ``--count`` connections each finish STARTUP, then send all but
  the last byte of a frame declaring a body just under ``--max-frame-size``, and stop.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import struct
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _procs
from _cqlconn import CqlConn, CqlReplyError, int32, setup_keyspace
from _procs import rss_kib

from coalesce.cql import Opcode, Query, QueryParameters, Startup, encode_frame

_ROWS = 1000
_ROW_BYTES = 1024
_FRAME = 16 * 1024 * 1024 - 64


def _started_socket(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.sendall(encode_frame(Opcode.STARTUP, Startup({"CQL_VERSION": "3.0.0"}).encode(),
                              stream=0))
    sock.recv(9)  # READY
    return sock


async def _big_answers(count: int) -> None:
    with _procs.emulator("0") as emu, _procs.sidecar(emu.port, False) as side:
        conn = await CqlConn.connect(emu.port)
        await setup_keyspace(conn, "adv")
        insert = await conn.prepare("INSERT INTO adv.kv (k, v) VALUES (?, ?)")
        await asyncio.gather(*(conn.execute(insert, [int32(k), b"x" * _ROW_BYTES])
                               for k in range(_ROWS)))
        conn.close()
        good = await CqlConn.connect(side.port)
        _, body = await good.request(Opcode.QUERY, Query(
            "SELECT * FROM adv.kv", QueryParameters(1, page_size=5000)).encode())
        print(f"one answer: {len(body)} bytes; sidecar RSS before {rss_kib(side.pid)} KiB")
        hostile = _started_socket(side.port)
        hostile.sendall(b"".join(
            encode_frame(Opcode.QUERY, Query(f"SELECT * FROM adv.kv LIMIT {_ROWS + i}",
                                             QueryParameters(1, page_size=5000)).encode(),
                         stream=i + 1)
            for i in range(count)))
        started, peak, worst = time.monotonic(), 0, 0.0
        errors: list[str] = []
        while time.monotonic() - started < 20:
            peak = max(peak, rss_kib(side.pid) or 0)
            sent = time.perf_counter()
            try:
                await good.query("SELECT * FROM adv.kv WHERE k = 1", timeout=30)
            except (CqlReplyError, TimeoutError) as exc:
                errors.append(str(exc) or type(exc).__name__)
            worst = max(worst, time.perf_counter() - sent)
            peak = max(peak, rss_kib(side.pid) or 0)
            await asyncio.sleep(0.5)
        print(f"{count} unread answers: sidecar RSS peak {peak} KiB; "
              f"well-behaved client's worst latency {worst * 1e3:.1f} ms, "
              f"errors {len(errors)} {errors[:3]}")
        hostile.close()
        good.close()
        await asyncio.sleep(2)
        print(f"2 s after the client closed: RSS {rss_kib(side.pid)} KiB")


async def _partial_frames(count: int) -> None:
    with _procs.emulator("0") as emu, _procs.sidecar(emu.port, False) as side:
        await asyncio.sleep(1)
        print(f"sidecar RSS before {rss_kib(side.pid)} KiB")
        socks = []
        for _ in range(count):
            sock = _started_socket(side.port)
            sock.sendall(struct.pack(">BBhBi", 4, 0, 1, Opcode.QUERY, _FRAME)
                         + b"\x00" * (_FRAME - 1))
            socks.append(sock)
        await asyncio.sleep(2)
        print(f"{count} connections each holding {_FRAME - 1} bytes of one frame: "
              f"sidecar RSS {rss_kib(side.pid)} KiB")
        for sock in socks:
            sock.close()
        await asyncio.sleep(1)
        print(f"after they closed: RSS {rss_kib(side.pid)} KiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("attack", choices=("big-answers", "partial-frames"))
    parser.add_argument("--count", type=int)
    args = parser.parse_args()
    if args.attack == "big-answers":
        asyncio.run(_big_answers(200 if args.count is None else args.count))
    else:
        asyncio.run(_partial_frames(10 if args.count is None else args.count))


if __name__ == "__main__":
    main()
