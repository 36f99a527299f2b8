"""`Outbox`: a connection's writes, gathered into one system call per loop turn under load.

On loopback, a `send` costs more than everything else the sidecar does for a frame, so
under load the frames written to one connection during a loop turn are handed to the
transport in one piece at the end of the turn (a `call_soon`), or as soon as
`FLUSH_AT` bytes have gathered, so the transport's flow control sees them. An isolated frame is
not held back: while the connection is quiet (its last turn saw at most one write),
the first write of a turn goes out at once, so a lone request pays no extra latency.
"""

from __future__ import annotations

import asyncio

__all__ = ["FLUSH_AT", "Outbox"]

FLUSH_AT = 16 * 1024
"""Bytes gathered in a turn that are handed to the transport at once, not at turn end."""


class Outbox:
    """Writes to one transport, in order, batched per loop turn when busy.

    `flush` writes anything gathered at once (call it before closing the transport
    so nothing is lost). Writes to a closing transport are dropped. Single event loop.
    """

    __slots__ = ("_batching", "_gathered", "_loop", "_parts", "_transport", "_writes")

    def __init__(self, loop: asyncio.AbstractEventLoop, transport: asyncio.Transport) -> None:
        self._loop = loop
        self._transport = transport
        self._parts: list[bytes | bytearray] = []
        self._gathered = 0  # bytes in `_parts`
        self._writes = 0  # writes this turn; 0 means no end-of-turn flush is scheduled
        self._batching = False  # the last turn was busy: hold back even the first write

    def put(self, data: bytes | bytearray) -> None:
        self._writes += 1
        if self._writes == 1:
            self._loop.call_soon(self._end_turn)
            if not self._batching:
                if not self._transport.is_closing():
                    self._transport.write(data)
                return
        self._parts.append(data)
        self._gathered += len(data)
        if self._gathered >= FLUSH_AT:  # the transport's back-pressure must see it now
            self.flush()

    def flush(self) -> None:
        parts = self._parts
        if not parts:
            return
        self._parts = []
        self._gathered = 0
        transport = self._transport
        if transport.is_closing():
            return
        transport.write(parts[0] if len(parts) == 1 else b"".join(parts))

    def _end_turn(self) -> None:
        self._batching = self._writes > 1
        self._writes = 0
        self.flush()
