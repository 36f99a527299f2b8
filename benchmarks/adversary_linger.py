"""Reproduction: a connection the sidecar closed lingers while its client does not read.

    python benchmarks/adversary_linger.py [--wait 3]

Emulator and sidecar run in this process (``max_connections=2``, ``handshake_timeout``
0.5 s, the smallest ``max_client_buffer``). A client fills its socket with big answers,
reads just enough for the sidecar to resume reading, and sends a frame with the
response bit set: the sidecar answers PROTOCOL_ERROR and calls ``transport.close()``,
which waits for the unsent answers to drain. The client never reads again, so the
connection is never lost: ``--wait`` seconds later it still counts against
``max_connections`` (an honest client is refused) and ``Sidecar.stop()`` is timed -- on
Python 3.12.1+, where ``Server.wait_closed`` waits for every connection, it hangs.
The sidecar's kernel send buffer is made small, as a remote client's closed TCP window
leaves it once the real one is full.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import sys
import time

from coalesce.cql import Opcode, Query, QueryParameters, Startup, encode_frame
from coalesce.emulator import Emulator
from coalesce.sidecar import Sidecar, SidecarConfig

_BAD = bytes([0x84, 0, 0, 99, Opcode.OPTIONS, 0, 0, 0, 0])


async def _run(wait: float) -> None:
    loop = asyncio.get_running_loop()
    emu = Emulator(read_latency=0.0, per_row=0.0)
    await emu.start()
    side = Sidecar(SidecarConfig(upstream=((emu.host, emu.port),), listen=("127.0.0.1", 0),
                                 metrics=None, max_connections=2, handshake_timeout=0.5,
                                 idle_timeout=None, max_client_buffer=64 * 1024))
    await side.start()
    admin = socket.create_connection(("127.0.0.1", side.port))
    admin.setblocking(False)
    startup = encode_frame(Opcode.STARTUP, Startup({"CQL_VERSION": "3.0.0"}).encode(),
                           stream=0)

    async def request(sock: socket.socket, frame: bytes) -> None:
        await loop.sock_sendall(sock, frame)
        head = b""
        while len(head) < 9:
            head += await loop.sock_recv(sock, 9 - len(head))
        left = int.from_bytes(head[5:9], "big")
        while left:
            left -= len(await loop.sock_recv(sock, min(left, 65536)))

    def query(text: str, stream: int = 1) -> bytes:
        return encode_frame(Opcode.QUERY, Query(text, QueryParameters(1)).encode(),
                            stream=stream)

    await request(admin, startup)
    await request(admin, query("CREATE KEYSPACE adv WITH replication = {'class': "
                               "'SimpleStrategy', 'replication_factor': 1}"))
    await request(admin, query("CREATE TABLE adv.kv (k int PRIMARY KEY, v text)"))
    await request(admin, query(f"INSERT INTO adv.kv (k, v) VALUES (7, '{'b' * 100_000}')"))

    hostile = socket.socket()
    hostile.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    hostile.setblocking(False)
    await loop.sock_connect(hostile, ("127.0.0.1", side.port))
    await request(hostile, startup)
    port = hostile.getsockname()[1]
    conn = next(c for c in side._clients if c._transport.get_extra_info("peername")[1] == port)
    conn._transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF,
                                                        4096)
    await loop.sock_sendall(hostile, b"".join(
        query("SELECT v FROM adv.kv WHERE k = 7", i) for i in range(1, 41)))
    while not (conn._write_paused and not conn._reading):  # noqa: ASYNC110 -- no event to wait on
        await asyncio.sleep(0.01)
    await loop.sock_sendall(hostile, b"".join(
        encode_frame(Opcode.OPTIONS, b"", stream=100 + i) for i in range(200)) + _BAD)
    while not conn.closed:
        await loop.sock_recv(hostile, 4096)
    unsent = conn._transport.get_write_buffer_size()
    await asyncio.sleep(wait)
    print(f"{wait:g}s after the sidecar closed it: connection still held "
          f"{conn in side._clients}, {conn._transport.get_write_buffer_size()} bytes unsent "
          f"(were {unsent}), client connections {side.stats.client_connections}")
    honest = socket.socket()
    honest.setblocking(False)
    await loop.sock_connect(honest, ("127.0.0.1", side.port))
    await loop.sock_sendall(honest, startup)
    head = await asyncio.wait_for(loop.sock_recv(honest, 9), 5)
    print(f"an honest client's STARTUP gets opcode 0x{head[4]:02x} "
          f"({'READY' if head[4] == Opcode.READY else 'ERROR: refused'})")
    started = time.monotonic()
    try:
        await asyncio.wait_for(side.stop(), 5)
        print(f"Sidecar.stop() took {time.monotonic() - started:.2f}s "
              f"(Python {sys.version.split()[0]})")
    except TimeoutError:
        print(f"Sidecar.stop() still waiting after 5s (Python {sys.version.split()[0]})")
    for sock in (admin, hostile, honest):
        sock.close()
    await emu.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--wait", type=float, default=3.0)
    asyncio.run(_run(parser.parse_args().wait))


if __name__ == "__main__":
    main()
