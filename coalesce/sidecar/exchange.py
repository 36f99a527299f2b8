"""`Exchange`: one request to Scylla and its one outcome, the way every path sends.

A merged read (one per flight) and a forwarded request are both an `Exchange`; so will
be a read forwarded to a peer sidecar. Each one picks a connection of its pool (the
preferred node's when it has one, waiting for a connection only when none is open),
sends the frame, and hands exactly one outcome to `finish`: the response `Frame` or the
`UpstreamError` that took its place. An UNPREPARED answer to an EXECUTE of a known
statement is handled here: the statement is prepared again on that node and the request
sent once more; a second UNPREPARED reaches the caller. Upstream failures are counted
here, in one place.

`finish` runs in the upstream connection's data callback. An exception escaping it is
contained here: it is logged, and `fail` answers the exchange's own clients with a
server error; the connection and every other request on it carry on.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any, Final

from coalesce.cql import (
    BETA,
    CUSTOM_PAYLOAD,
    TRACING,
    WARNING,
    CQLProtocolError,
    ErrorCode,
    Frame,
    Opcode,
    Prepare,
    split_extras,
)
from coalesce.cql._wire import w_bytes_map
from coalesce.sidecar.errors import UpstreamError, UpstreamLost
from coalesce.sidecar.statements import KnownStatement

if TYPE_CHECKING:
    from coalesce.sidecar.connection import Outcome, UpstreamConnection
    from coalesce.sidecar.peers import PeerPool
    from coalesce.sidecar.upstream import Pool

    Connections = Pool | PeerPool

__all__ = ["Exchange", "error_code", "is_unprepared"]

_HOP: Final = w_bytes_map({"coalesce-hop": b""})  # peers.HOP (which imports this module)

_ERROR: Final = int(Opcode.ERROR)  # plain ints: IntEnum member lookups are slow
_log = logging.getLogger(__name__)

_EXTRAS: Final = TRACING | WARNING | CUSTOM_PAYLOAD
_FORWARDED_FLAGS: Final = TRACING | CUSTOM_PAYLOAD | BETA


def error_code(frame: Frame) -> int | None:
    """The code of an ERROR response frame (after any extras), None for other opcodes."""
    if frame.opcode != Opcode.ERROR:
        return None
    body = frame.body
    if frame.flags & _EXTRAS:
        try:
            body = split_extras(frame.flags, body, response=True)[1]
        except CQLProtocolError:
            return None
    if len(body) < 4:
        return None
    return int.from_bytes(body[:4], "big", signed=True)


def is_unprepared(frame: Frame) -> bool:
    """Whether a response frame is the ERROR "unprepared statement"."""
    return frame.opcode == Opcode.ERROR and error_code(frame) == ErrorCode.UNPREPARED


class Exchange:
    """One upstream request; subclasses say what its outcome does (`finish`, `fail`).

    Not reusable: `start` once. Single event loop.
    """

    __slots__ = ("body", "conn", "flags", "hop", "node", "opcode", "pool", "shard", "statement")

    def __init__(
        self,
        pool: Connections,
        node: Any,
        opcode: int,
        flags: int,
        body: bytes,
        statement: KnownStatement | None,
        shard: int | None = None,
    ) -> None:
        self.pool = pool
        self.node = node
        self.shard = shard
        self.opcode = opcode
        self.flags = flags & _FORWARDED_FLAGS  # never pass on a flag we do not know
        self.body = body
        self.statement = statement  # None once the one re-prepare has been spent
        self.conn: UpstreamConnection | None = None
        self.hop = False  # sent to the ring member owning it, with the hop marker

    def start(self) -> None:
        """Send now on an open connection, or as soon as one opens."""
        conn = self.pool.pick(self.node, self.shard)
        if conn is not None:
            self._send(conn)
        else:
            self.pool.upstream.spawn(self._send_after(self.pool.acquire(self.node)))

    # -- what subclasses implement -----------------------------------------------------

    def finish(self, outcome: Outcome) -> None:
        raise NotImplementedError

    def fail(self, error: UpstreamError) -> None:
        """The outcome could not be delivered: tell this exchange's clients, nobody else."""
        self.finish(error)

    @property
    def abandoned(self) -> bool:
        """Nobody waits for the outcome any more (re-prepare and retry are skipped)."""
        return False

    # -- the exchange itself -------------------------------------------------------------

    def __call__(self, outcome: Outcome) -> None:
        statement = self.statement
        if (statement is not None and type(outcome) is Frame and outcome.opcode == _ERROR
                and is_unprepared(outcome) and not self.abandoned):
            self.statement = None
            self.pool.upstream.spawn(self._send_after(self._reprepared(statement)))
            return
        if isinstance(outcome, UpstreamError):
            self.pool.upstream.errors += 1
        try:
            self.finish(outcome)
        except Exception as exc:
            _log.exception("answering a request failed")
            try:
                self.fail(UpstreamError(f"sidecar error while answering: {exc!r}"))
            except Exception:
                _log.exception("failing a request failed")

    async def _send_after(self, ready: Awaitable[UpstreamConnection]) -> None:
        """Send once `ready` gives a connection; its failure is this exchange's outcome."""
        try:
            conn = await ready
        except UpstreamError as exc:
            self(exc)
            return
        except asyncio.CancelledError:
            self(UpstreamLost("the sidecar is shutting down"))
            raise
        self._send(conn)

    def _send(self, conn: UpstreamConnection) -> None:
        self.conn = conn
        if self.hop:
            conn.send(self.opcode, _HOP + self.body, self.flags | CUSTOM_PAYLOAD, self)
        else:
            conn.send(self.opcode, self.body, self.flags, self)

    async def _reprepared(self, statement: KnownStatement) -> UpstreamConnection:
        conn = self.conn
        assert conn is not None
        await reprepare(self.pool, conn, statement)
        return await self.pool.acquire() if conn.closed else conn


async def reprepare(pool: Connections, conn: UpstreamConnection,
                    statement: KnownStatement) -> bool:
    """Prepare `statement` again on the node behind `conn`; whether it worked.

    Scylla derives a statement's id from its text and the preparing connection's
    keyspace, so the PREPARE goes over a connection of that node using the keyspace
    the statement was first prepared with. Raises `UpstreamError`.
    """
    target = await pool.for_keyspace(conn, statement.keyspace)
    if target is None:
        return False
    reply = await target.request(Opcode.PREPARE, Prepare(statement.query).encode())
    return reply.opcode == Opcode.RESULT
