"""Reproduction: the herd memo keeps finished reads' bodies past the client's bounds.

    python benchmarks/adversary_memo.py [--count 128] [--size-mib 8]

The emulator and a sidecar at its default settings (``--max-client-buffer 4MiB``,
``--max-frame-size 16MiB``) run as their own processes. One client negotiates LZ4 and
sends ``--count`` distinct reads, one at a time, each binding a key of ``--size-mib``
MiB of a repeated pattern (LZ4 squeezes each to a few KiB on the wire). Every read is
answered before the next is sent, so the sidecar never holds more than one request for
the client -- yet its VmRSS grows by about 2 x size per read, up to the 64 entries per
opcode of ``ClientConnection._fast``, and stays there while the client stays connected.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import struct
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _procs
from _cqlconn import CqlConn, setup_keyspace
from soak import rss_kib

from coalesce.cql import Opcode, Query, QueryParameters, Startup, encode_frame

_HEADER = struct.Struct(">BBhBi")


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    return bytes(data)


def _recv_frame(sock: socket.socket) -> tuple[int, int]:
    _, _, stream, opcode, length = _HEADER.unpack(_recv_exactly(sock, 9))
    _recv_exactly(sock, length)
    return stream, opcode


async def _run(count: int, size: int) -> None:
    with _procs.emulator("0") as emu, _procs.sidecar(emu.port, False) as side:
        conn = await CqlConn.connect(emu.port)
        await setup_keyspace(conn, "adv")
        await conn.query("CREATE TABLE adv.t (k text PRIMARY KEY, v text)")
        conn.close()
        sock = socket.create_connection(("127.0.0.1", side.port))
        startup = Startup({"CQL_VERSION": "3.0.0", "COMPRESSION": "lz4"}).encode()
        sock.sendall(encode_frame(Opcode.STARTUP, startup, stream=0))
        assert _recv_frame(sock)[1] == Opcode.READY
        before = rss_kib(side.pid) or 0
        wire = 0
        for i in range(count):
            key = (b"%04d" % i) * (size // 4)
            body = Query("SELECT v FROM adv.t WHERE k = ?",
                         QueryParameters(1, [key], timestamp=1)).encode()
            frame = encode_frame(Opcode.QUERY, body, stream=1, compress=True)
            wire += len(frame)
            sock.sendall(frame)
            assert _recv_frame(sock) == (1, Opcode.RESULT)
        after = rss_kib(side.pid) or 0
        print(f"{count} reads of {size / 2**20:.0f} MiB keys, {wire / 1024:.0f} KiB on the "
              f"wire, one at a time: sidecar VmRSS {before / 1024:.0f} -> {after / 1024:.0f} "
              f"MiB (+{(after - before) / 1024:.0f} MiB; max_client_buffer is 4 MiB)")
        sock.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=128)
    parser.add_argument("--size-mib", type=int, default=8)
    args = parser.parse_args()
    asyncio.run(_run(args.count, args.size_mib * 1024 * 1024))


if __name__ == "__main__":
    main()
