"""A small CQL v4 client over asyncio streams for the soak and fuzz benchmarks.

Built on the project's codec only (`coalesce.cql`); it never imports the sidecar. One
`CqlConn` is one connection: `request` allocates a free stream, waits for its answer
with a timeout and frees the stream again, so a long run never runs out of streams.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct

from coalesce.cql import (
    Error,
    Execute,
    FrameDecoder,
    Opcode,
    Prepare,
    Query,
    QueryParameters,
    ResultPrepared,
    ResultRows,
    Startup,
    decode_result,
    encode_frame,
)

__all__ = ["CqlConn", "CqlReplyError", "setup_keyspace"]


class CqlReplyError(Exception):
    """An ERROR frame, with its CQL error code."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(f"0x{code:04x}: {message}")
        self.code = code


class CqlConn:
    """One connection; answers are matched to streams; ConnectionError once closed."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self._free = list(range(32767, 0, -1))
        self._waiting: dict[int, asyncio.Future[tuple[int, bytes]]] = {}
        self.closed = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._read())

    @classmethod
    async def connect(cls, port: int, *, timeout: float = 10.0) -> CqlConn:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port), timeout)
        conn = cls(reader, writer)
        opcode, _ = await conn.request(
            Opcode.STARTUP, Startup({"CQL_VERSION": "3.0.0"}).encode(), timeout=timeout)
        if opcode != Opcode.READY:
            conn.close()
            raise ConnectionError(f"STARTUP answered with opcode {opcode}")
        return conn

    async def _read(self) -> None:
        decoder = FrameDecoder(max_body=256 * 1024 * 1024)
        try:
            while True:
                data = await self.reader.read(262144)
                if not data:
                    break
                for frame in decoder.feed(data):
                    waiter = self._waiting.get(frame.stream)
                    if waiter is not None and not waiter.done():
                        waiter.set_result((frame.opcode, frame.body))
        except (ConnectionError, OSError):
            pass
        finally:
            self.closed.set()
            for waiter in self._waiting.values():
                if not waiter.done():
                    waiter.set_exception(ConnectionError("connection lost"))

    async def request(self, opcode: int, body: bytes, *, timeout: float = 10.0,
                      flags: int = 0) -> tuple[int, bytes]:
        """(opcode, body) of the answer; TimeoutError after `timeout`, ConnectionError."""
        if self.closed.is_set():
            raise ConnectionError("connection lost")
        if not self._free:
            raise RuntimeError("no free stream")
        stream = self._free.pop()
        waiter: asyncio.Future[tuple[int, bytes]] = asyncio.get_running_loop().create_future()
        self._waiting[stream] = waiter
        try:
            self.writer.write(encode_frame(opcode, body, stream=stream, flags=flags))
            return await asyncio.wait_for(waiter, timeout)
        finally:
            del self._waiting[stream]
            # A timed-out stream may still be answered later: retire it rather than reuse.
            if waiter.done() and not waiter.cancelled():
                self._free.append(stream)

    async def query(self, text: str, *, timeout: float = 10.0) -> object:
        opcode, body = await self.request(
            Opcode.QUERY, Query(text, QueryParameters(1)).encode(), timeout=timeout)
        return _result(opcode, body)

    async def prepare(self, text: str, *, timeout: float = 10.0) -> bytes:
        opcode, body = await self.request(Opcode.PREPARE, Prepare(text).encode(),
                                          timeout=timeout)
        result = _result(opcode, body)
        assert isinstance(result, ResultPrepared), result
        return result.query_id

    async def execute(self, query_id: bytes, values: list[bytes | None], *,
                      timeout: float = 10.0) -> object:
        params = QueryParameters(1, list(values))
        opcode, body = await self.request(
            Opcode.EXECUTE, Execute(query_id, params).encode(), timeout=timeout)
        return _result(opcode, body)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()
        self._task.cancel()


def _result(opcode: int, body: bytes) -> object:
    if opcode == Opcode.ERROR:
        err = Error.decode(body)
        raise CqlReplyError(err.code, err.message)
    if opcode != Opcode.RESULT:
        raise CqlReplyError(-1, f"unexpected opcode {opcode}")
    return decode_result(body)


def rows(result: object) -> list[list[bytes | None]]:
    assert isinstance(result, ResultRows), result
    return result.rows


def int32(value: int) -> bytes:
    return struct.pack(">i", value)


async def setup_keyspace(conn: CqlConn, keyspace: str) -> None:
    """`keyspace`.kv (k int PRIMARY KEY, v text), created if missing."""
    await conn.query(f"CREATE KEYSPACE IF NOT EXISTS {keyspace} WITH replication = "
                     "{'class': 'SimpleStrategy', 'replication_factor': 1}")
    await conn.query(f"CREATE TABLE IF NOT EXISTS {keyspace}.kv (k int PRIMARY KEY, v text)")
