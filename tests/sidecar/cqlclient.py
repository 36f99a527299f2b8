"""A bare CQL v4 client on asyncio streams, built from the codec, for in-loop tests.

Real drivers cover the "works unchanged" tests; this one gives the tests exact control:
which stream ids, which bytes (including malformed ones), when to disconnect.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import Sequence
from typing import Any

from coalesce.cql import (
    COMPRESSION,
    AuthResponse,
    Consistency,
    Error,
    Execute,
    Frame,
    FrameDecoder,
    Opcode,
    Prepare,
    Query,
    QueryParameters,
    ResultPrepared,
    ResultRows,
    Startup,
    decode_result,
    decompress_body,
    encode_frame,
)


class CqlError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(f"0x{code:04x}: {message}")
        self.code = code
        self.message = message


class RawClient:
    """One connection; `request` matches answers to streams; `frames` sees everything."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.lz4 = False
        self._streams = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[Frame]] = {}
        self.events: asyncio.Queue[Frame] = asyncio.Queue()
        self.closed = asyncio.Event()
        self._reader_task = asyncio.get_running_loop().create_task(self._read())

    @classmethod
    async def connect(
        cls,
        host: str,
        port: int,
        *,
        lz4: bool = False,
        credentials: tuple[str, str] | None = None,
        startup: bool = True,
        ssl: Any = None,
    ) -> RawClient:
        reader, writer = await asyncio.open_connection(host, port, ssl=ssl)
        client = cls(reader, writer)
        if startup:
            options = {"CQL_VERSION": "3.0.0"}
            if lz4:
                options["COMPRESSION"] = "lz4"
            reply = await client.request(Opcode.STARTUP, Startup(options).encode())
            client.lz4 = lz4
            if reply.opcode == Opcode.AUTHENTICATE:
                if credentials is None:
                    raise CqlError(0x0100, "authentication required")
                user, password = credentials
                token = b"\x00" + user.encode() + b"\x00" + password.encode()
                reply = await client.request(Opcode.AUTH_RESPONSE, AuthResponse(token).encode())
                if reply.opcode == Opcode.ERROR:
                    err = Error.decode(reply.body)
                    raise CqlError(err.code, err.message)
                assert reply.opcode == Opcode.AUTH_SUCCESS, reply
            elif reply.opcode == Opcode.ERROR:
                err = Error.decode(reply.body)
                raise CqlError(err.code, err.message)
            else:
                assert reply.opcode == Opcode.READY, reply
        return client

    async def _read(self) -> None:
        decoder = FrameDecoder()
        try:
            while True:
                data = await self.reader.read(65536)
                if not data:
                    break
                for frame in decoder.feed(data):
                    if frame.flags & COMPRESSION:
                        frame = frame._replace(
                            body=decompress_body(frame.body), flags=frame.flags & ~COMPRESSION
                        )
                    self._received(frame)
        except (ConnectionError, OSError):
            pass
        finally:
            self.closed.set()
            for waiter in self._waiting.values():
                if not waiter.done():
                    waiter.set_exception(ConnectionError("connection closed"))
            self._waiting.clear()

    def _received(self, frame: Frame) -> None:
        """One frame from the server, decompressed: an event, or a stream's answer."""
        if frame.stream < 0:
            self.events.put_nowait(frame)
            return
        waiter = self._waiting.pop(frame.stream, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(frame)

    def send(self, opcode: int, body: bytes, *, stream: int | None = None, flags: int = 0) -> int:
        stream = next(self._streams) if stream is None else stream
        self.writer.write(
            encode_frame(opcode, body, stream=stream, flags=flags, compress=self.lz4)
        )
        return stream

    def expect(self, stream: int) -> asyncio.Future[Frame]:
        waiter: asyncio.Future[Frame] = asyncio.get_running_loop().create_future()
        if self.closed.is_set():
            waiter.set_exception(ConnectionError("connection closed"))
        else:
            self._waiting[stream] = waiter
        return waiter

    async def request(self, opcode: int, body: bytes, *, flags: int = 0) -> Frame:
        stream = next(self._streams)
        waiter = self.expect(stream)
        self.send(opcode, body, stream=stream, flags=flags)
        return await waiter

    def send_query(
        self, text: str, values: Sequence[bytes | None] | None = None, *, timestamp: int | None = 1
    ) -> asyncio.Future[Frame]:
        stream = next(self._streams)
        waiter = self.expect(stream)
        params = QueryParameters(Consistency.ONE, None if values is None else list(values),
                                 timestamp=timestamp)
        body = Query(text, params).encode()
        self.send(Opcode.QUERY, body, stream=stream)
        return waiter

    def send_execute(
        self, query_id: bytes, values: list[bytes | None], *, timestamp: int | None = 1
    ) -> asyncio.Future[Frame]:
        stream = next(self._streams)
        waiter = self.expect(stream)
        params = QueryParameters(Consistency.ONE, list(values), timestamp=timestamp)
        self.send(Opcode.EXECUTE, Execute(query_id, params).encode(), stream=stream)
        return waiter

    async def query(self, text: str, values: list[bytes | None] | None = None) -> Any:
        return result_of(await self.send_query(text, values))

    async def prepare(self, text: str) -> ResultPrepared:
        result = result_of(await self.request(Opcode.PREPARE, Prepare(text).encode()))
        assert isinstance(result, ResultPrepared), result
        return result

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await self.writer.wait_closed()
        await self.closed.wait()
        self._reader_task.cancel()


def result_of(frame: Frame) -> Any:
    """The decoded RESULT of a frame; raises `CqlError` for an ERROR frame."""
    if frame.opcode == Opcode.ERROR:
        err = Error.decode(frame.body)
        raise CqlError(err.code, err.message)
    assert frame.opcode == Opcode.RESULT, frame
    return decode_result(frame.body)


def rows_of(frame: Frame) -> list[list[bytes | None]]:
    result = result_of(frame)
    assert isinstance(result, ResultRows), result
    return result.rows
