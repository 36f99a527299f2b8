"""The floor: the least a Python CQL proxy must do to answer a herd.

    python benchmarks/floor_server.py --listen 127.0.0.1:9043 [--delay 1ms] [--uvloop]

An asyncio `Protocol` server that speaks just enough CQL v4 for the benchmark client
in ``benchmarks/sidecar.py``: OPTIONS -> SUPPORTED, STARTUP -> READY, REGISTER ->
READY, PREPARE -> one fixed PREPARED result, QUERY and EXECUTE -> one precomputed ROWS
result. It has no upstream. Every QUERY/EXECUTE joins the current batch as (connection,
stream id); ``--delay`` after the batch's first request (the time one upstream read
takes) the whole batch is answered with the precomputed frame, only the stream id
patched, in one write per connection. So a herd costs what a proxy cannot avoid --
reading and parsing each request, remembering who asked, writing each answer -- and
nothing else: the lowest latency and CPU a Python proxy can reach on this loop.

OPTIONS is also how the benchmark reads the floor's counters: the SUPPORTED answer
carries ``FLOOR_BATCHES`` (batches answered so far, the floor's "upstream reads") and
``FLOOR_REQUESTS`` (reads answered so far) next to the usual options.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import struct
import sys
from typing import Final, cast

from coalesce.cql import (
    TYPE_BY_NAME,
    ColumnSpec,
    Opcode,
    PreparedMetadata,
    ResultPrepared,
    ResultRows,
    RowsMetadata,
    Supported,
)

__all__ = ["FloorServer", "main"]

_HEADER: Final = struct.Struct(">BBhBi")
_RESPONSE_VERSION: Final = 0x84
_QUERY_ID: Final = b"floor-select-v-by-k"
_KEYSPACE, _TABLE = "bench", "kv"
_STREAMS: Final = [struct.pack(">h", s) for s in range(-32768, 32768)]


def _frame(opcode: int, body: bytes, stream: int = 0) -> bytes:
    return _HEADER.pack(_RESPONSE_VERSION, 0, stream, opcode, len(body)) + body


def _split(frame: bytes) -> tuple[bytes, bytes]:
    """A whole frame as (bytes before the stream id, bytes after it)."""
    return frame[:2], frame[4:]


_READY: Final = _split(_frame(Opcode.READY, b""))
_PREPARED: Final = _split(_frame(Opcode.RESULT, ResultPrepared(
    _QUERY_ID,
    PreparedMetadata([ColumnSpec(_KEYSPACE, _TABLE, "k", TYPE_BY_NAME["int"])], [0]),
    RowsMetadata([ColumnSpec(_KEYSPACE, _TABLE, "v", TYPE_BY_NAME["text"])]),
).encode()))
_ROWS: Final = _split(_frame(Opcode.RESULT, ResultRows(
    RowsMetadata([ColumnSpec(_KEYSPACE, _TABLE, "v", TYPE_BY_NAME["text"])]),
    [[b"value-7"]],
).encode()))


class FloorServer:
    """The batch of pending reads and the timer that answers it.

    Shared by every connection of one server: a read on any connection joins the one
    batch; the batch is answered `delay` seconds after its first read, every read in
    it at once, then the next read starts a new batch.
    """

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.batches = 0
        self.answered = 0
        self._pending: dict[_FloorProtocol, list[int]] = {}
        self._timer: asyncio.TimerHandle | None = None

    def protocol(self) -> _FloorProtocol:
        return _FloorProtocol(self)

    def join(self, conn: _FloorProtocol, streams: list[int]) -> None:
        """Add `streams` of `conn` to the current batch, starting its timer if new."""
        pending = self._pending.get(conn)
        if pending is None:
            self._pending[conn] = streams
        else:
            pending.extend(streams)
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.delay, self._answer)

    def _answer(self) -> None:
        self._timer = None
        pending, self._pending = self._pending, {}
        self.batches += 1
        head, tail = _ROWS
        table = _STREAMS
        for conn, streams in pending.items():
            self.answered += len(streams)
            if conn.transport is not None and not conn.transport.is_closing():
                conn.transport.write(b"".join([head + table[s + 32768] + tail
                                               for s in streams]))

    def supported(self) -> bytes:
        return Supported({
            "CQL_VERSION": ["3.0.0"],
            "COMPRESSION": [],
            "FLOOR_BATCHES": [str(self.batches)],
            "FLOOR_REQUESTS": [str(self.answered)],
        }).encode()

    def forget(self, conn: _FloorProtocol) -> None:
        self._pending.pop(conn, None)


class _FloorProtocol(asyncio.Protocol):
    """One client connection: split frames, answer the handshake, batch the reads."""

    def __init__(self, server: FloorServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self._buffer = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.forget(self)
        self.transport = None

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer + data if self._buffer else data
        size = len(buffer)
        pos = 0
        reads: list[int] = []
        replies: list[bytes] = []
        unpack = _HEADER.unpack_from
        while size - pos >= 9:
            _, _, stream, opcode, length = unpack(buffer, pos)
            end = pos + 9 + length
            if end > size:
                break
            pos = end
            if opcode == Opcode.EXECUTE or opcode == Opcode.QUERY:
                reads.append(stream)
                continue
            if opcode == Opcode.PREPARE:
                head, tail = _PREPARED
            elif opcode == Opcode.OPTIONS:
                replies.append(_frame(Opcode.SUPPORTED, self.server.supported(), stream))
                continue
            else:  # STARTUP, REGISTER: READY; nothing else is spoken here
                head, tail = _READY
            replies.append(head + _STREAMS[stream + 32768] + tail)
        self._buffer = buffer[pos:]
        assert self.transport is not None
        if replies:
            self.transport.write(b"".join(replies))
        if reads:
            self.server.join(self, reads)


def _duration(text: str) -> float:
    for suffix, scale in (("us", 1e-6), ("ms", 1e-3), ("s", 1.0)):
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * scale
    return float(text)


async def _serve(host: str, port: int, delay: float) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    floor = FloorServer(delay)
    server = await loop.create_server(floor.protocol, host, port)
    bound = server.sockets[0].getsockname()
    print(f"floor: listening on {bound[0]}:{bound[1]}, delay {delay * 1e3:g}ms", flush=True)
    async with server:
        await stop.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", default="127.0.0.1:9043", help="HOST:PORT to serve on")
    parser.add_argument("--delay", default="1ms", type=_duration,
                        help="time one upstream read stands for, from a batch's first "
                             "request to its answer (default 1ms)")
    parser.add_argument("--uvloop", action="store_true", help="run on uvloop")
    args = parser.parse_args(argv)
    host, _, port = args.listen.rpartition(":")
    main = _serve(host, int(port), args.delay)
    if args.uvloop:
        import uvloop

        uvloop.run(main)
    else:
        asyncio.run(main)
    return 0


if __name__ == "__main__":
    sys.exit(main())
