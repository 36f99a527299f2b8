"""A deliberately tiny CQL client over a raw asyncio socket, for protocol-level tests.

It speaks through the codec only and hides nothing: tests send exact bytes
(good or broken) and read back exact frames.
"""

from __future__ import annotations

import asyncio
import contextlib
from types import TracebackType

from coalesce.cql.frame import Frame, FrameDecoder, Opcode, encode_frame
from coalesce.cql.messages import Query, QueryParameters, Startup
from coalesce.cql.results import ResultRows, decode_result

__all__ = ["RawConnection", "rows_of"]


class RawConnection:
    """One TCP connection; `read_frame` returns None once the server closed it."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self._decoder = FrameDecoder()
        self._frames: list[Frame] = []

    @classmethod
    async def open(
        cls, host: str, port: int, *, local_addr: tuple[str, int] | None = None
    ) -> RawConnection:
        reader, writer = await asyncio.open_connection(host, port, local_addr=local_addr)
        return cls(reader, writer)

    @property
    def local_port(self) -> int:
        return int(self.writer.get_extra_info("sockname")[1])

    async def send_raw(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def send(self, opcode: int, body: bytes, *, stream: int = 0, version: int = 4) -> None:
        await self.send_raw(encode_frame(opcode, body, stream=stream, version=version))

    async def read_frame(self) -> Frame | None:
        while not self._frames:
            data = await self.reader.read(65536)
            if not data:
                return None
            self._frames.extend(self._decoder.feed(data))
        return self._frames.pop(0)

    async def closed_by_server(self) -> bool:
        """Drain until EOF; True if the server closed the connection."""
        while True:
            try:
                data = await self.reader.read(65536)
            except ConnectionError:
                return True
            if not data:
                return True

    async def startup(self) -> None:
        await self.send(Opcode.STARTUP, Startup({"CQL_VERSION": "3.0.0"}).encode(), stream=1)
        frame = await self.read_frame()
        assert frame is not None and frame.opcode == Opcode.READY, frame

    async def query(self, text: str, *, stream: int = 1) -> Frame:
        body = Query(text, QueryParameters(consistency=1)).encode()
        await self.send(Opcode.QUERY, body, stream=stream)
        frame = await self.read_frame()
        assert frame is not None
        return frame

    def close(self) -> None:
        self.writer.close()

    async def aclose(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()

    async def __aenter__(self) -> RawConnection:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


def rows_of(frame: Frame) -> list[list[object]]:
    """Decode a RESULT ROWS frame into Python values."""
    assert frame.opcode == Opcode.RESULT, frame
    result = decode_result(frame.body)
    assert isinstance(result, ResultRows)
    columns = result.metadata.columns
    return [
        [
            None if cell is None else spec.type.deserialize(cell)
            for spec, cell in zip(columns, row, strict=True)
        ]
        for row in result.rows
    ]
