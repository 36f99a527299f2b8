"""A raw CQL v4 client that can send a whole herd in one write per connection.

A driver issues a request at a time (cassandra-driver: about 7,000 a second from one
process), so 10,000 of its callers arrive over more than a second: a trickle, not a
herd. `HerdConnection` pipelines instead: `send` writes any number of EXECUTEs in one
write, each on a stream of the caller's choice, and the answers are matched to streams
and timed as they arrive, by splitting frame headers only. Setup requests (`query`,
`prepare`) wait for their answer. Built on `coalesce.cql` alone. Single event loop.
"""

from __future__ import annotations

import asyncio
import struct
import time
from collections.abc import Callable
from typing import cast

from coalesce.cql import (
    Error,
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

__all__ = ["MAX_STREAMS", "CqlError", "HerdConnection"]

MAX_STREAMS = 32767
"""Streams 1..32767 of a connection carry herd reads; stream 0 carries setup requests."""

_HEADER = struct.Struct(">BBhBi")


class CqlError(Exception):
    """An ERROR answer to a setup request, or a connection that went away."""


class HerdConnection(asyncio.Protocol):
    """One connection; see the module docstring.

    Herd answers are counted in `answered` (an ERROR answer in `errors` too, the first
    message kept in `first_error`) and their latencies, send to answer, appended to
    `latencies_ns`; `on_answer` is called once per received chunk that had any.
    """

    def __init__(self) -> None:
        self._transport: asyncio.Transport | None = None
        self._buffer = b""
        self._setup: asyncio.Future[tuple[int, bytes]] | None = None
        self._sent_at = [0] * (MAX_STREAMS + 1)
        self.latencies_ns: list[int] = []
        self.answered = 0
        self.errors = 0
        self.first_error: str | None = None
        self.on_answer: Callable[[], None] | None = None
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    @classmethod
    async def connect(cls, host: str, port: int, *, timeout: float = 10.0) -> HerdConnection:
        """A connection past STARTUP; raises `CqlError` or `OSError`."""
        loop = asyncio.get_running_loop()
        _, conn = await asyncio.wait_for(loop.create_connection(cls, host, port), timeout)
        try:
            opcode, body = await conn._request(
                Opcode.STARTUP, Startup({"CQL_VERSION": "3.0.0"}).encode(), timeout)
            if opcode != Opcode.READY:
                raise CqlError(f"STARTUP to {host}:{port} answered {_describe(opcode, body)}")
        except BaseException:
            conn.close()
            raise
        return conn

    # -- asyncio.Protocol ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's quacks alike

    def connection_lost(self, exc: Exception | None) -> None:
        if self._setup is not None and not self._setup.done():
            self._setup.set_exception(CqlError("connection lost"))
        if not self.lost.done():
            self.lost.set_result(None)

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter_ns()
        buffer = self._buffer + data if self._buffer else data
        size, pos, before = len(buffer), 0, self.answered
        sent_at, latencies = self._sent_at, self.latencies_ns
        while size - pos >= 9:
            _, _, stream, opcode, length = _HEADER.unpack_from(buffer, pos)
            end = pos + 9 + length
            if end > size:
                break
            if stream == 0:
                if self._setup is not None and not self._setup.done():
                    self._setup.set_result((opcode, buffer[pos + 9:end]))
            elif stream > 0:  # negative streams are server events
                latencies.append(now - sent_at[stream])
                self.answered += 1
                if opcode == Opcode.ERROR:
                    self.errors += 1
                    if self.first_error is None:
                        self.first_error = Error.decode(buffer[pos + 9:end]).message
            pos = end
        self._buffer = buffer[pos:]
        if self.answered != before and self.on_answer is not None:
            self.on_answer()

    # -- setup ------------------------------------------------------------------------------

    async def _request(self, opcode: int, body: bytes, timeout: float) -> tuple[int, bytes]:
        if self._setup is not None:
            raise RuntimeError("one setup request at a time")
        if self._transport is None or self._transport.is_closing():
            raise CqlError("connection lost")
        self._setup = asyncio.get_running_loop().create_future()
        try:
            self._transport.write(encode_frame(opcode, body, stream=0))
            return await asyncio.wait_for(self._setup, timeout)
        finally:
            self._setup = None

    async def query(self, text: str, *, timeout: float = 10.0) -> object:
        """The decoded RESULT of a QUERY at consistency ONE; `CqlError` on an ERROR."""
        opcode, body = await self._request(
            Opcode.QUERY, Query(text, QueryParameters(1)).encode(), timeout)
        if opcode != Opcode.RESULT:
            raise CqlError(f"{text!r}: {_describe(opcode, body)}")
        return decode_result(body)

    async def prepare(self, text: str, *, timeout: float = 10.0) -> bytes:
        """The prepared id of `text`; `CqlError` on an ERROR."""
        opcode, body = await self._request(Opcode.PREPARE, Prepare(text).encode(), timeout)
        result = decode_result(body) if opcode == Opcode.RESULT else None
        if not isinstance(result, ResultPrepared):
            raise CqlError(f"PREPARE {text!r}: {_describe(opcode, body)}")
        return result.query_id

    async def column(self, text: str, *, timeout: float = 10.0) -> list[object]:
        """The first column of every row a QUERY returns, deserialized."""
        result = await self.query(text, timeout=timeout)
        if not isinstance(result, ResultRows):
            raise CqlError(f"{text!r}: not a ROWS result")
        spec = result.metadata.columns[0]
        return [None if row[0] is None else spec.type.deserialize(row[0])
                for row in result.rows]

    # -- the herd ----------------------------------------------------------------------------

    def send(self, streams: list[int], frames: list[bytes]) -> None:
        """Write `frames` (encoded requests on `streams`, 1..`MAX_STREAMS`) in one write
        and time each from now. A stream must not be reused before its answer came."""
        if self._transport is None or self._transport.is_closing():
            raise CqlError("connection lost")
        data = b"".join(frames)
        now = time.perf_counter_ns()
        for stream in streams:
            self._sent_at[stream] = now
        self._transport.write(data)

    def reset(self) -> None:
        """Forget the answers counted so far (before the next herd)."""
        self.latencies_ns = []
        self.answered = 0
        self.errors = 0
        self.first_error = None

    def close(self) -> None:
        self.on_answer = None
        if self._transport is not None:
            self._transport.close()


def _describe(opcode: int, body: bytes) -> str:
    if opcode == Opcode.ERROR:
        error = Error.decode(body)
        return f"error 0x{error.code:04x}: {error.message}"
    try:
        return f"opcode {Opcode(opcode).name}"
    except ValueError:
        return f"opcode {opcode}"
