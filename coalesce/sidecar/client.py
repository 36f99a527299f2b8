"""One client connection: handshake, login relay, and a decision per request frame.

Frames are decoded only as far as a decision needs. Per opcode:

- OPTIONS, STARTUP, REGISTER: answered by the sidecar (STARTUP relays the login
  exchange to Scylla when Scylla asks for credentials).
- QUERY of a plain SELECT, EXECUTE of a statement prepared as one: merged -- the
  request joins the single flight of its key (protocol version, role, keyspace,
  opcode, body without the client's default timestamp).
- QUERY/EXECUTE on ``system.local`` / ``system.peers(_v2)``: forwarded, answer rewritten
  to describe the sidecar. ``USE ks``: run once per ``(role, ks)`` pool, remembered.
- Everything else (writes, BATCH, PREPARE, other statements, anything traced or with a
  custom payload): forwarded as is; writes update the read-after-write index when
  their answer arrives, before the client sees it.

Every response goes back under the client's own stream id, LZ4-compressed when the
client negotiated it. A malformed or oversized frame is answered with PROTOCOL_ERROR
and closes this connection only. When the client disconnects, its merged requests
leave their flights (others keep being served) and its forwarded ones are dropped.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from collections.abc import Callable, Coroutine, Hashable
from functools import partial
from typing import Any, Final, cast

from coalesce.cql import (
    COMPRESSION,
    CUSTOM_PAYLOAD,
    DEFAULT_SUPPORTED,
    TRACING,
    AuthResponse,
    CQLProtocolError,
    Error,
    ErrorCode,
    Frame,
    FrameDecoder,
    Opcode,
    ProtocolVersionError,
    Register,
    ResultSetKeyspace,
    Startup,
    Supported,
    UnsupportedCompressionError,
    compress_body,
    decompress_body,
    negotiate_compression,
    peek_execute_id,
    peek_query_string,
    split_extras,
    unsupported_version_reply,
)
from coalesce.cql.classify import classify
from coalesce.errors import Overloaded
from coalesce.sidecar.answers import (
    Post,
    after_write,
    describe_sidecar,
    forget_everything,
    learn_prepared,
)
from coalesce.sidecar.bodies import bound_values, is_serial, key_body, routing_key
from coalesce.sidecar.errors import UpstreamError, UpstreamLost, UpstreamRefused
from coalesce.sidecar.inline import InlineRun, run_inline
from coalesce.sidecar.login import LoginRelay
from coalesce.sidecar.outbox import Outbox
from coalesce.sidecar.pool import Node, Pool
from coalesce.sidecar.prepared import PreparedStatement
from coalesce.sidecar.proxy import Answer, Proxy, is_unprepared
from coalesce.sidecar.topology import (
    CLUSTER_TABLES,
    token_of,
)
from coalesce.sidecar.upstream import Outcome, UpstreamConnection

__all__ = ["ClientConnection"]

_log = logging.getLogger(__name__)

_HEADER: Final = struct.Struct(">BBhBi")
_RESPONSE_V4: Final = 0x84
_UNMERGEABLE: Final = TRACING | CUSTOM_PAYLOAD
_SUPPORTED_BODY: Final = Supported(
    {**DEFAULT_SUPPORTED, "PROTOCOL_VERSIONS": ["4/v4"]}
).encode()

# Connection states.
_NEW, _STARTING, _AUTHENTICATING, _AUTH_SENT, _READY = range(5)

class _Forward:
    """The callback of one forwarded request: post-process, then answer the client."""

    __slots__ = ("body", "client", "conn", "flags", "opcode", "post", "statement", "stream")

    def __init__(
        self,
        client: ClientConnection,
        stream: int,
        opcode: int,
        flags: int,
        body: bytes,
        post: Post | None,
        statement: PreparedStatement | None,
    ) -> None:
        self.client = client
        self.stream = stream
        self.opcode = opcode
        self.flags = flags
        self.body = body
        self.post = post
        self.statement = statement
        self.conn: UpstreamConnection | None = None

    def send(self, conn: UpstreamConnection) -> None:
        self.conn = conn
        conn.send(self.opcode, self.body, self.flags, self)

    def __call__(self, outcome: Outcome) -> None:
        client = self.client
        statement = self.statement
        if (statement is not None and not client._closed and type(outcome) is Frame
                and is_unprepared(outcome)):
            self.statement = None  # retry once; a second UNPREPARED reaches the client
            client._spawn(client._reprepare_and_resend(self, statement))
            return
        self.finish(outcome)

    def abandon(self) -> None:
        """The client went away before the request was sent: settle the books only."""
        self.client._proxy.request_finished()
        if self.post is not None:
            self.post(UpstreamLost("client disconnected"))

    def finish(self, outcome: Outcome) -> None:
        client = self.client
        client._proxy.request_finished()
        if self.post is not None:
            try:
                outcome = self.post(outcome)
            except CQLProtocolError as exc:
                outcome = UpstreamError(f"cannot rewrite the upstream answer: {exc.message}")
        if isinstance(outcome, UpstreamError):
            client._proxy.upstream.errors += 1
            client._write_failure(self.stream, outcome)
        else:
            client._write_frame(self.stream, outcome.opcode, outcome.flags, outcome.body)


class ClientConnection(asyncio.Protocol):
    """A driver's connection to the sidecar. See the module docstring for the contract."""

    def __init__(self, proxy: Proxy, on_close: Callable[[ClientConnection], None]) -> None:
        self._proxy = proxy
        self._on_close = on_close
        self._max_frame = proxy.config.max_frame_size
        self._decoder = FrameDecoder(max_body=self._max_frame)
        self._transport: asyncio.Transport | None = None
        self._out: Outbox | None = None
        self._state = _NEW
        self._lz4 = False
        self._closed = False
        self._login: LoginRelay | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._runs: set[InlineRun[Answer]] = set()
        self.role = ""
        self.keyspace: str | None = None
        self._pool: Pool | None = None

    # -- asyncio.Protocol --------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses; they quack alike.
        self._transport = cast(asyncio.Transport, transport)
        self._out = Outbox(asyncio.get_running_loop(), self._transport)
        self._proxy.stats.client_connections += 1

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._proxy.stats.client_connections -= 1
        self._proxy.listeners.discard(self)
        for task in list(self._tasks):
            task.cancel()
        for run in list(self._runs):
            run.cancel()
        if self._login is not None:
            self._login.close()
            self._login = None
        self._on_close(self)

    def pause_writing(self) -> None:
        # The client is not reading its answers: stop taking requests from it.
        if self._transport is not None:
            self._transport.pause_reading()

    def resume_writing(self) -> None:
        if self._transport is not None and not self._closed:
            self._transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        at_boundary = self._decoder.buffered == 0
        try:
            frames = self._decoder.feed(data)
        except ProtocolVersionError as exc:
            self._reject_version(exc.version, exc.stream)
            return
        except CQLProtocolError as exc:
            stream = _failing_stream(data, self._max_frame) if at_boundary else 0
            self._fatal(stream, exc.message)
            return
        for frame in frames:
            if self._closed:
                return
            self._dispatch(frame)

    # -- public ------------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Close the connection (answers already written are flushed first)."""
        if self._transport is not None and not self._closed:
            self._closed = True
            assert self._out is not None
            self._out.flush()
            self._transport.close()

    def send_event(self, body: bytes) -> None:
        """Push an EVENT frame (stream -1) to this client."""
        self._write_frame(-1, Opcode.EVENT, 0, body)

    # -- dispatch ------------------------------------------------------------------------------

    def _dispatch(self, frame: Frame) -> None:
        opcode = frame.opcode
        self._proxy.stats.frames[opcode] += 1
        stream = frame.stream
        if frame.version != 4:
            self._reject_version(frame.version, stream)
            return
        if frame.is_response:
            self._fatal(stream, "a client sent a frame with the response bit set")
            return
        flags = frame.flags
        body = frame.body
        try:
            if flags & COMPRESSION:
                if not self._lz4:
                    raise CQLProtocolError("compressed frame but no compression negotiated")
                body = decompress_body(body, max_size=self._max_frame)
                flags &= ~COMPRESSION
            if self._state == _READY:
                handler = _READY_HANDLERS.get(opcode)
            else:
                handler = _SETUP_HANDLERS.get(opcode)
            if handler is None:
                self._unexpected(stream, opcode)
                return
            handler(self, stream, flags, body)
        except CQLProtocolError as exc:
            if exc.code == ErrorCode.PROTOCOL_ERROR:
                self._fatal(stream, exc.message)
            else:
                self._write_error(stream, exc.code, exc.message)

    def _unexpected(self, stream: int, opcode: int) -> None:
        try:
            name = Opcode(opcode).name
        except ValueError:
            name = f"0x{opcode:02x}"
        expecting = {
            _NEW: "STARTUP", _STARTING: "STARTUP reply", _AUTHENTICATING: "AUTH_RESPONSE",
            _AUTH_SENT: "AUTH_RESPONSE reply",
        }.get(self._state, "a request")
        self._proxy.stats.local += 1
        self._write_error(
            stream, ErrorCode.PROTOCOL_ERROR, f"Unexpected message {name}, expecting {expecting}"
        )

    # -- connection setup ------------------------------------------------------------------

    def _on_options(self, stream: int, flags: int, body: bytes) -> None:
        self._proxy.stats.local += 1
        self._write_frame(stream, Opcode.SUPPORTED, 0, _SUPPORTED_BODY)

    def _on_startup(self, stream: int, flags: int, body: bytes) -> None:
        if self._state != _NEW:
            self._unexpected(stream, Opcode.STARTUP)
            return
        try:
            compression = negotiate_compression(Startup.decode(body).options)
        except UnsupportedCompressionError as exc:
            self._write_error(stream, ErrorCode.PROTOCOL_ERROR, exc.message)
            return
        self._proxy.stats.local += 1
        if self._proxy.upstream.auth_required is False:
            self._become_ready("")
            self._write_frame(stream, Opcode.READY, 0, b"")
            self._lz4 = compression is not None
            return
        self._state = _STARTING
        self._spawn(self._start_login(stream, compression is not None))

    async def _start_login(self, stream: int, lz4: bool) -> None:
        login = LoginRelay(self._proxy.upstream)
        try:
            reply = await login.start()
        except UpstreamError as exc:
            self._state = _NEW
            self._write_failure(stream, exc)
            return
        if login.role is not None:
            self._become_ready(login.role)
        elif login.waiting:
            self._login = login
            self._state = _AUTHENTICATING
        else:
            self._state = _NEW
        self._write_frame(stream, reply.opcode, reply.flags, reply.body)
        self._lz4 = lz4 and self._state != _NEW

    def _on_auth_response(self, stream: int, flags: int, body: bytes) -> None:
        login = self._login
        if self._state != _AUTHENTICATING or login is None or not login.waiting:
            self._unexpected(stream, Opcode.AUTH_RESPONSE)
            return
        AuthResponse.decode(body)  # a malformed one closes this connection, not Scylla's
        self._state = _AUTH_SENT
        self._spawn(self._relay_auth(stream, login, body))

    async def _relay_auth(self, stream: int, login: LoginRelay, body: bytes) -> None:
        try:
            reply = await login.respond(body)
        except UpstreamError as exc:
            self._login = None
            self._state = _NEW
            self._write_failure(stream, exc)
            return
        if login.role is not None:
            self._login = None
            self._become_ready(login.role)
        elif login.waiting:
            self._state = _AUTHENTICATING  # a challenge: the client answers it
        else:
            self._login = None
            self._state = _NEW
        self._write_frame(stream, reply.opcode, reply.flags, reply.body)

    def _become_ready(self, role: str) -> None:
        self.role = role
        self._pool = self._proxy.upstream.pool(role, None)
        self._state = _READY

    def _on_register(self, stream: int, flags: int, body: bytes) -> None:
        events = Register.decode(body).event_types
        if "SCHEMA_CHANGE" in events:
            self._proxy.listeners.add(self)
        self._proxy.stats.local += 1
        self._write_frame(stream, Opcode.READY, 0, b"")

    # -- requests ----------------------------------------------------------------------------

    def _on_query(self, stream: int, flags: int, body: bytes) -> None:
        proxy = self._proxy
        core = split_extras(flags, body, response=False)[1] if flags & CUSTOM_PAYLOAD else body
        info = classify(peek_query_string(core))
        kind = info.kind
        if kind == "select":
            keyspace = info.keyspace or self.keyspace
            if keyspace == "system" and info.table in CLUSTER_TABLES:
                post = describe_sidecar(info.table, proxy.identity, proxy.upstream.ring)
                self._forward(stream, Opcode.QUERY, flags, body, post)
            elif (info.coalescable and not flags & _UNMERGEABLE
                  and not is_serial(Opcode.QUERY, core)):
                key = self._key(Opcode.QUERY, body)
                self._merge(stream, key, Opcode.QUERY, flags, body, (keyspace, info.table),
                            None, None, None)
            else:
                self._forward(stream, Opcode.QUERY, flags, body)
        elif kind == "use" and info.keyspace is not None and not flags & _UNMERGEABLE:
            proxy.stats.local += 1
            self._spawn(self._use(stream, info.keyspace))
        else:
            post = after_write(proxy.freshness, proxy.group, info, self.keyspace, None)
            self._forward(stream, Opcode.QUERY, flags, body, post)

    def _on_execute(self, stream: int, flags: int, body: bytes) -> None:
        proxy = self._proxy
        core = split_extras(flags, body, response=False)[1] if flags & CUSTOM_PAYLOAD else body
        statement = proxy.prepared.get(peek_execute_id(core))
        if statement is None:
            self._forward(stream, Opcode.EXECUTE, flags, body)
            return
        if (statement.mergeable and not flags & _UNMERGEABLE
                and not is_serial(Opcode.EXECUTE, core)):
            key = self._key(Opcode.EXECUTE, body)
            if key in proxy.group:
                # Joining a flight: where its read goes was settled by whoever started it.
                self._merge(stream, key, Opcode.EXECUTE, flags, body, None, None, None, None)
                return
            partition, node = self._route(statement, core)
            self._merge(stream, key, Opcode.EXECUTE, flags, body, statement.table, partition,
                        node, statement)
            return
        partition, node = self._route(statement, core)
        if statement.cluster_table is not None:
            post = describe_sidecar(statement.cluster_table, proxy.identity,
                                    proxy.upstream.ring, statement.result_columns)
            self._forward(stream, Opcode.EXECUTE, flags, body, post, statement, node)
        elif statement.info.kind == "select":
            self._forward(stream, Opcode.EXECUTE, flags, body, None, statement, node)
        else:
            post = after_write(proxy.freshness, proxy.group, statement.info,
                               statement.keyspace, partition)
            self._forward(stream, Opcode.EXECUTE, flags, body, post, statement, node)

    def _route(
        self, statement: PreparedStatement, body: bytes
    ) -> tuple[bytes | None, Node | None]:
        """The serialized partition key of an EXECUTE and the node owning it, if known."""
        if not statement.pk_indexes:
            return None, None
        values = bound_values(Opcode.EXECUTE, body)
        partition = None if values is None else routing_key(values, statement.pk_indexes)
        if partition is None:
            return None, None
        return partition, self._proxy.upstream.node_for_token(token_of(partition))

    def _on_prepare(self, stream: int, flags: int, body: bytes) -> None:
        core = split_extras(flags, body, response=False)[1] if flags & CUSTOM_PAYLOAD else body
        post = learn_prepared(self._proxy.prepared, peek_query_string(core), self.keyspace)
        self._forward(stream, Opcode.PREPARE, flags, body, post)

    def _on_batch(self, stream: int, flags: int, body: bytes) -> None:
        self._forward(stream, Opcode.BATCH, flags, body, forget_everything(self._proxy.group))

    # -- the three ways of answering ------------------------------------------------------

    def _forward(
        self,
        stream: int,
        opcode: int,
        flags: int,
        body: bytes,
        post: Post | None = None,
        statement: PreparedStatement | None = None,
        node: Node | None = None,
    ) -> None:
        """Pass the request through alone; the answer goes back when it comes."""
        proxy = self._proxy
        proxy.stats.forwarded += 1
        proxy.request_started()
        forward = _Forward(self, stream, opcode, flags, body, post, statement)
        pool = self._pool
        assert pool is not None
        conn = pool.pick(node)
        if conn is not None:
            forward.send(conn)
        else:
            self._spawn(self._forward_later(forward, pool, node))

    async def _forward_later(self, forward: _Forward, pool: Pool, node: Node | None) -> None:
        try:
            conn = await pool.acquire(node)
        except UpstreamError as exc:
            forward.finish(exc)
        except asyncio.CancelledError:
            forward.abandon()
            raise
        else:
            forward.send(conn)

    async def _reprepare_and_resend(
        self, forward: _Forward, statement: PreparedStatement
    ) -> None:
        conn = forward.conn
        assert conn is not None
        try:
            await self._proxy.reprepare(self.role, conn, statement)
            if conn.closed:
                pool = self._pool
                assert pool is not None
                conn = await pool.acquire()
        except UpstreamError as exc:
            forward.finish(exc)
        except asyncio.CancelledError:
            forward.abandon()
            raise
        else:
            forward.send(conn)

    def _key(self, opcode: int, body: bytes) -> Hashable:
        """What makes two reads' answers the same (see the module docstring)."""
        return (4, self.role, self.keyspace, opcode, key_body(opcode, body))

    def _merge(
        self,
        stream: int,
        key: Hashable,
        opcode: int,
        flags: int,
        body: bytes,
        table: Hashable,
        partition: bytes | None,
        node: Node | None,
        statement: PreparedStatement | None,
    ) -> None:
        """Join (or start) the single flight of `key`, as one `SingleFlight.do` caller."""
        proxy = self._proxy
        pool = self._pool
        assert pool is not None
        proxy.stats.merged += 1
        proxy.request_started()
        call = proxy.group.do(
            key, proxy.fetch, key, pool, node, opcode, body, flags, table, partition, statement
        )
        run = run_inline(call, partial(self._merged, stream))
        if not run.done:
            self._runs.add(run)

    def _merged(
        self, stream: int, run: InlineRun[Answer], answer: Answer | None,
        error: BaseException | None,
    ) -> None:
        self._runs.discard(run)
        self._proxy.request_finished()
        if error is None:
            assert answer is not None
            self._write_answer(stream, answer)
        elif isinstance(error, Overloaded):
            self._write_error(stream, ErrorCode.OVERLOADED, str(error))
        elif isinstance(error, UpstreamError):
            self._write_failure(stream, error)
        elif not isinstance(error, asyncio.CancelledError):
            _log.error("merged read failed", exc_info=error)
            self._write_error(stream, ErrorCode.SERVER_ERROR, f"sidecar error: {error!r}")

    async def _use(self, stream: int, keyspace: str) -> None:
        pool = self._proxy.upstream.pool(self.role, keyspace)
        try:
            await pool.acquire()
        except UpstreamError as exc:
            self._write_failure(stream, exc)
            return
        self.keyspace = keyspace
        self._pool = pool
        self._write_frame(stream, Opcode.RESULT, 0, ResultSetKeyspace(keyspace).encode())

    # -- writing ------------------------------------------------------------------------------

    def _write_frame(self, stream: int, opcode: int, flags: int, body: bytes) -> None:
        out = self._out
        if out is None or self._closed:
            return
        if self._lz4 and body:
            body = compress_body(body)
            flags |= COMPRESSION
        else:
            flags &= ~COMPRESSION
        out.put(_HEADER.pack(_RESPONSE_V4, flags, stream, opcode, len(body)) + body)

    def _write_answer(self, stream: int, answer: Answer) -> None:
        out = self._out
        if out is None or self._closed:
            return
        flags = answer.flags
        if self._lz4 and answer.body:
            body = answer.lz4_body()
            flags |= COMPRESSION
        else:
            body = answer.body
        out.put(_HEADER.pack(_RESPONSE_V4, flags, stream, answer.opcode, len(body)) + body)

    def _write_failure(self, stream: int, error: UpstreamError) -> None:
        if isinstance(error, UpstreamRefused):
            self._write_frame(stream, Opcode.ERROR, 0, error.body)  # Scylla's own words
        else:
            self._write_error(stream, error.code, str(error))

    def _write_error(self, stream: int, code: int, message: str) -> None:
        self._write_frame(stream, Opcode.ERROR, 0, Error(code, message).encode())

    def _fatal(self, stream: int, message: str) -> None:
        """PROTOCOL_ERROR, then close: the byte stream can no longer be trusted."""
        self._write_error(stream, ErrorCode.PROTOCOL_ERROR, message)
        self.close()

    def _reject_version(self, version: int, stream: int) -> None:
        if self._out is not None and not self._closed:
            self._out.put(unsupported_version_reply(version, stream))
        self.close()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def _failing_stream(data: bytes, max_body: int) -> int:
    """The stream of the first invalid header in `data` (which starts at a frame), or 0.

    Only for addressing the PROTOCOL_ERROR reply; the connection closes regardless.
    """
    offset = 0
    while offset + 9 <= len(data):
        version, _, stream, opcode, length = _HEADER.unpack_from(data, offset)
        if (version & 0x7F) != 4 or opcode not in _OPCODES or not 0 <= length <= max_body:
            return int(stream)
        offset += 9 + length
    return 0


_OPCODES: Final = frozenset(int(op) for op in Opcode)

_Handler = Callable[[ClientConnection, int, int, bytes], None]

_SETUP_HANDLERS: Final[dict[int, _Handler]] = {
    Opcode.OPTIONS: ClientConnection._on_options,
    Opcode.STARTUP: ClientConnection._on_startup,
    Opcode.AUTH_RESPONSE: ClientConnection._on_auth_response,
}

_READY_HANDLERS: Final[dict[int, _Handler]] = {
    Opcode.OPTIONS: ClientConnection._on_options,
    Opcode.REGISTER: ClientConnection._on_register,
    Opcode.QUERY: ClientConnection._on_query,
    Opcode.EXECUTE: ClientConnection._on_execute,
    Opcode.PREPARE: ClientConnection._on_prepare,
    Opcode.BATCH: ClientConnection._on_batch,
}
