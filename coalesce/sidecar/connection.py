"""One connection to one Scylla node: handshake, stream multiplexing, responses.

Requests are raw frames; each gets a free stream id (up to 32,768 per connection,
handed out as needed, so an idle connection costs a few hundred bytes) and a callback
that receives exactly one outcome: the response `Frame`, or an `UpstreamError` if the
connection dies first or the request times out. `request` wraps that in an awaitable
for code that can wait; the sidecar's request paths use `send` with a callback and
never create a task. A callback that raises is logged and contained: the other
requests on the connection never notice.

The connection speaks protocol v4 without compression (bodies are forwarded as they
arrive from clients, decompressed), so nothing is ever decoded here except setup
replies.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import ssl
import struct
from collections import deque
from collections.abc import Callable
from functools import partial
from typing import Final, cast

from coalesce.cql import (
    AuthResponse,
    CQLProtocolError,
    Error,
    Frame,
    FrameDecoder,
    Opcode,
    Query,
    QueryParameters,
    Startup,
)
from coalesce.sidecar.errors import (
    UpstreamError,
    UpstreamLost,
    UpstreamRefused,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from coalesce.sidecar.outbox import Outbox

__all__ = ["Outcome", "ResponseCallback", "UpstreamConnection", "quote_identifier"]

_log = logging.getLogger(__name__)

Outcome = Frame | UpstreamError
ResponseCallback = Callable[[Outcome], None]

_HEADER: Final = struct.Struct(">BBhBi")
_MAX_STREAMS: Final = 32768
_STARTUP_BODY: Final = Startup({"CQL_VERSION": "3.0.0"}).encode()
_ONE: Final = 0x0001


def quote_identifier(name: str) -> str:
    """`name` as a CQL quoted identifier (case kept, quotes doubled)."""
    return '"' + name.replace('"', '""') + '"'


class _Deadlines:
    """Request timeouts of one connection: one timer, not one per request.

    Requests are kept in send order, which with one timeout per connection is deadline
    order too (a shorter timeout queued behind a longer one fires late, never early).
    A request is recognised by its stream and its callback object (callbacks are one
    object per request), so an answered request whose stream was reused is not timed
    out by mistake. Answered requests leave from the front as new ones are sent, so
    the queue holds about what is in flight. A request that times out gets
    `UpstreamTimeout` through its callback; its stream stays reserved for the late
    answer, which is dropped.
    """

    __slots__ = ("_conn", "_queue", "_timer")

    def __init__(self, conn: UpstreamConnection) -> None:
        self._conn = conn
        self._queue: deque[tuple[float, float, int, ResponseCallback]] = deque()
        self._timer: asyncio.TimerHandle | None = None

    def watch(self, stream: int, callback: ResponseCallback, timeout: float) -> None:
        conn = self._conn
        queue = self._queue
        pending = conn._pending
        while queue and pending.get(queue[0][2]) is not queue[0][3]:
            queue.popleft()  # answered (its stream is free or was reused)
        queue.append((conn._loop.time() + timeout, timeout, stream, callback))
        if self._timer is None:
            self._timer = conn._loop.call_at(queue[0][0], self._expire)

    def _expire(self) -> None:
        self._timer = None
        conn = self._conn
        queue = self._queue
        pending = conn._pending
        now = conn._loop.time()
        while queue:
            deadline, timeout, stream, callback = queue[0]
            alive = pending.get(stream) is callback
            if alive and deadline > now:
                break
            queue.popleft()
            if alive:
                conn._time_out(stream, timeout)
        if queue:
            self._timer = conn._loop.call_at(queue[0][0], self._expire)

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._queue.clear()


def _deliver(callback: ResponseCallback, outcome: Outcome) -> None:
    """Call one request's callback; what it raises stays with that request."""
    try:
        callback(outcome)
    except Exception:
        _log.exception("a response callback failed")


def _orphan(outcome: Outcome) -> None:
    """What a timed-out request's stream waits for: its late answer, to drop it."""


def _settle(future: asyncio.Future[Frame], outcome: Outcome) -> None:
    if future.done():
        return  # the waiter was cancelled: the answer has nowhere to go
    if isinstance(outcome, UpstreamError):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)


class UpstreamConnection(asyncio.Protocol):
    """A multiplexed CQL connection to one node, for one role and keyspace.

    Concurrency: any number of requests may be outstanding; responses are matched by
    stream id and delivered in arrival order. A stream whose waiter gave up stays
    reserved until its response arrives, so a late answer can never reach the wrong
    request. When the connection closes, for whatever reason, every outstanding
    callback gets an `UpstreamLost` at once, and `on_close` is called once.
    Not thread-safe: one event loop.
    """

    def __init__(
        self,
        node: str,
        *,
        max_frame_size: int = 256 * 1024 * 1024,
        request_timeout: float | None = None,
        on_event: Callable[[Frame], None] | None = None,
        on_close: Callable[[UpstreamConnection], None] | None = None,
    ) -> None:
        self.node = node
        self.request_timeout = request_timeout
        self.role: str | None = None
        self.keyspace: str | None = None
        self.on_event = on_event
        self.on_close = on_close
        self.on_timeout: Callable[[UpstreamConnection], None] | None = None
        self.heartbeating = False
        self.shard: int | None = None  # the Scylla shard it was opened to, when known
        self.asked_for_credentials = False
        self.last_read = 0.0  # loop time of the last bytes from the node
        self._decoder = FrameDecoder(max_body=max_frame_size)
        self._free: list[int] = []  # streams answered, ready for reuse
        self._next_stream = 0  # streams from here up were never used
        self._pending: dict[int, ResponseCallback] = {}
        self._transport: asyncio.Transport | None = None
        self._out: Outbox | None = None
        self._closed = False
        self._close_reason = "closed"
        self._loop = asyncio.get_running_loop()
        self._deadlines = _Deadlines(self)

    # -- opening -------------------------------------------------------------------

    @classmethod
    async def connect(
        cls,
        host: str,
        port: int,
        *,
        node: str,
        timeout: float,
        ssl_context: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
        max_frame_size: int = 256 * 1024 * 1024,
        request_timeout: float | None = None,
        local_port: int | None = None,
    ) -> UpstreamConnection:
        """Open the TCP (and TLS) connection; no CQL handshake yet.

        `local_port` binds the connection's own port (Scylla's shard-aware port picks
        the shard from it). Raises `UpstreamUnavailable` if the node cannot be reached
        within `timeout`, and `OSError` (EADDRINUSE) if `local_port` is taken.
        """
        loop = asyncio.get_running_loop()
        local_addr = None
        if local_port is not None:
            local_addr = ("::" if ":" in host else "0.0.0.0", local_port)
        try:
            async with asyncio.timeout(timeout):
                _, protocol = await loop.create_connection(
                    lambda: cls(node, max_frame_size=max_frame_size,
                                request_timeout=request_timeout),
                    host,
                    port,
                    ssl=ssl_context,
                    server_hostname=server_hostname if ssl_context is not None else None,
                    local_addr=local_addr,
                )
        except TimeoutError:
            raise UpstreamUnavailable(f"{node}: connect timed out after {timeout:g}s") from None
        except OSError as exc:
            if local_port is not None and exc.errno == errno.EADDRINUSE:
                raise
            raise UpstreamUnavailable(f"{node}: {exc.strerror or exc}") from None
        except ssl.SSLError as exc:
            raise UpstreamUnavailable(f"{node}: {exc}") from None
        return protocol

    async def startup(self, timeout: float) -> Frame:
        """Send STARTUP; return the reply (READY, AUTHENTICATE or ERROR) as is."""
        return await self.request(Opcode.STARTUP, _STARTUP_BODY, timeout=timeout)

    async def login(self, token: bytes | None, timeout: float) -> None:
        """The whole handshake: STARTUP, then the SASL PLAIN `token` if asked for one.

        Raises `UpstreamRefused` (carrying Scylla's ERROR body) if Scylla rejects the
        login, or asks for credentials when `token` is None.
        """
        reply = await self.startup(timeout)
        if reply.opcode == Opcode.AUTHENTICATE:
            self.asked_for_credentials = True
            if token is None:
                raise UpstreamRefused(
                    f"{self.node} requires authentication",
                    Error(0x0100, "Authentication required").encode(),
                )
            reply = await self.request(
                Opcode.AUTH_RESPONSE, AuthResponse(token).encode(), timeout=timeout
            )
            if reply.opcode == Opcode.AUTH_SUCCESS:
                return
        elif reply.opcode == Opcode.READY:
            return
        if reply.opcode == Opcode.ERROR:
            raise UpstreamRefused(f"{self.node} refused the login", reply.body)
        raise UpstreamRefused(
            f"{self.node} answered the login with opcode 0x{reply.opcode:02x}",
            Error(0x000A, "unexpected handshake reply from upstream").encode(),
        )

    async def use(self, keyspace: str, timeout: float) -> None:
        """Switch this connection to `keyspace`; `UpstreamRefused` if Scylla says no."""
        body = Query(f"USE {quote_identifier(keyspace)}", QueryParameters(_ONE)).encode()
        reply = await self.request(Opcode.QUERY, body, timeout=timeout)
        if reply.opcode == Opcode.ERROR:
            raise UpstreamRefused(f"{self.node}: USE {keyspace} failed", reply.body)
        self.keyspace = keyspace

    # -- requests ------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def has_free_stream(self) -> bool:
        return bool(self._free) or self._next_stream < _MAX_STREAMS

    @property
    def in_flight(self) -> int:
        """Requests sent and not yet answered (abandoned ones included)."""
        return len(self._pending)

    def send(
        self,
        opcode: int,
        body: bytes,
        flags: int,
        callback: ResponseCallback,
        *,
        timeout: float | None = None,
    ) -> None:
        """Send one request; `callback` gets its response frame or an `UpstreamError`.

        Exactly one outcome per request: the answer, `UpstreamLost` if the connection
        dies first, or `UpstreamTimeout` after `timeout` seconds (default: the
        connection's `request_timeout`; None waits as long as the connection lives).
        The callback is never called from inside `send`: a closed connection or one
        out of stream ids schedules it with the error on the loop.
        """
        out = self._out
        if self._closed or out is None:
            self._loop.call_soon(callback, UpstreamLost(f"{self.node}: {self._close_reason}"))
            return
        if self._free:
            stream = self._free.pop()
        elif self._next_stream < _MAX_STREAMS:
            stream = self._next_stream
            self._next_stream += 1
        else:
            self._loop.call_soon(callback, UpstreamUnavailable(f"{self.node}: no free stream"))
            return
        self._pending[stream] = callback
        out.put(_HEADER.pack(4, flags, stream, opcode, len(body)) + body)
        if timeout is None:
            timeout = self.request_timeout
        if timeout is not None:
            self._deadlines.watch(stream, callback, timeout)

    async def request(
        self, opcode: int, body: bytes, flags: int = 0, *, timeout: float | None = None
    ) -> Frame:
        """Send one request and wait for its response frame.

        Raises `UpstreamLost` if the connection dies first and `UpstreamTimeout` after
        `timeout` seconds (default: the connection's `request_timeout`). Cancelling the
        caller abandons the request (its stream stays reserved until the late answer
        arrives).
        """
        future: asyncio.Future[Frame] = self._loop.create_future()
        self.send(opcode, body, flags, partial(_settle, future), timeout=timeout)
        return await future

    def _time_out(self, stream: int, timeout: float) -> None:
        callback = self._pending.get(stream)
        if callback is None or callback is _orphan:
            return
        self._pending[stream] = _orphan
        _deliver(callback, UpstreamTimeout(f"{self.node}: no answer within {timeout:g}s"))
        if self.on_timeout is not None and not self._closed:
            self.on_timeout(self)

    def close(self, reason: str = "closed by the sidecar") -> None:
        """Close now; outstanding requests fail with `UpstreamLost`."""
        if self._transport is not None and not self._closed:
            self._close_reason = reason
            self._transport.close()
            self._fail_all()

    def abort(self, reason: str) -> None:
        """Drop the connection without flushing (a broken stream)."""
        if self._transport is not None and not self._closed:
            self._close_reason = reason
            self._transport.abort()
            self._fail_all()

    # -- asyncio.Protocol ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses; they quack alike.
        self._transport = cast(asyncio.Transport, transport)
        self._out = Outbox(self._loop, self._transport)

    def data_received(self, data: bytes) -> None:
        self.last_read = self._loop.time()
        try:
            frames = self._decoder.feed(data)
        except CQLProtocolError as exc:
            self.abort(f"malformed frame from upstream: {exc.message}")
            return
        pending = self._pending
        free = self._free
        for frame in frames:
            stream = frame.stream
            if stream < 0:
                if self.on_event is not None and frame.opcode == Opcode.EVENT:
                    try:
                        self.on_event(frame)
                    except Exception:
                        _log.exception("relaying an upstream event failed")
                continue
            callback = pending.pop(stream, None)
            if callback is None:
                continue  # an answer to nothing: ignore, as drivers do
            free.append(stream)
            _deliver(callback, frame)

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None:
            self._close_reason = f"connection lost: {exc}"
        elif self._close_reason == "closed":
            self._close_reason = "upstream connection lost"
        self._fail_all()

    def _fail_all(self) -> None:
        if self._closed:
            return
        self._closed = True
        # The pool forgets this connection first, so nothing a failed request's callback
        # does (a retry, a new request) can land on it again.
        if self.on_close is not None:
            self.on_close(self)
        self._deadlines.cancel()
        pending, self._pending = self._pending, {}
        error_text = f"{self.node}: {self._close_reason}"
        for callback in pending.values():
            _deliver(callback, UpstreamLost(error_text))
