"""The CQL native-protocol front end: connections, messages, timed responses.

`CqlServer` owns the executor, the shard model and the metrics, and
creates one `asyncio.Protocol` per client connection. Bytes go through the
codec's `FrameDecoder`; each complete frame is handled at once and in
full (the engine is synchronous), and its response frame is written when
the latency model says the request completes -- immediately for system
tables and DDL, otherwise at the reserved completion time via
`loop.call_at`. So many requests on one connection are served
concurrently, under their own stream ids, in completion order, without a
task per request.

Each connection belongs to one shard, chosen when it is accepted (see
`coalesce.emulator.shard_awareness`): by the client's port on the
shard-aware listener (`shard_aware_protocol`), in turn on the ordinary one
(`protocol`). With `shard_aware=True` its SUPPORTED reply carries Scylla's
sharding keys for that shard. Parts of a request on other shards than the
connection's start `LatencyModel.cross_shard` late, and every request
touching partitions is counted by placement in the metrics.

Failure contract, per connection:
- a request that fails (syntax, unknown table, bad value, UNPREPARED ...)
  gets an ERROR frame on its stream; the connection carries on;
- a frame whose first header announces an unsupported protocol version
  (a driver probing v5/v6/DSE) gets the codec's `unsupported_version_reply`
  on its stream, the frame is skipped and the connection stays usable for
  the retry at v4;
- malformed input (garbage, bad lengths, oversized or unknown frames,
  undecodable bodies) gets a PROTOCOL_ERROR frame on the offending stream
  when one can be read, and then that connection -- and only it -- is
  closed.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import cast

from coalesce.cql.codes import ErrorCode, ResultKind
from coalesce.cql.errors import CQLProtocolError
from coalesce.cql.frame import (
    COMPRESSION,
    Frame,
    FrameDecoder,
    Opcode,
    decompress_body,
    encode_frame,
)
from coalesce.cql.handshake import (
    DEFAULT_SUPPORTED,
    negotiate_compression,
    unsupported_version_reply,
)
from coalesce.cql.messages import (
    AlreadyExists as AlreadyExistsDetails,
)
from coalesce.cql.messages import (
    Authenticate,
    AuthResponse,
    AuthSuccess,
    Batch,
    Error,
    Execute,
    Prepare,
    Query,
    QueryParameters,
    Ready,
    Register,
    SchemaChangeEvent,
    Startup,
    Supported,
    split_extras,
)
from coalesce.cql.messages import (
    Unprepared as UnpreparedDetails,
)
from coalesce.cql.results import ResultPrepared, ResultSchemaChange
from coalesce.emulator.auth import PASSWORD_AUTHENTICATOR
from coalesce.emulator.errors import (
    AlreadyExists,
    CqlRequestError,
    ProtocolViolation,
    Unprepared,
)
from coalesce.emulator.executor import ExecutionOptions, Executor, Outcome, Session
from coalesce.emulator.metrics import EmulatorMetrics
from coalesce.emulator.shard_awareness import ShardAssigner, placement, sharding_options
from coalesce.emulator.shards import Reservation, ShardModel, shard_of

__all__ = ["ConnectionInfo", "CqlServer", "LatencyModel"]

_log = logging.getLogger(__name__)
_SUPPORTED_VERSIONS = (3, 4)
_REQUEST_OPCODES = frozenset(
    [
        Opcode.STARTUP,
        Opcode.OPTIONS,
        Opcode.QUERY,
        Opcode.PREPARE,
        Opcode.EXECUTE,
        Opcode.REGISTER,
        Opcode.BATCH,
        Opcode.AUTH_RESPONSE,
    ]
)
_VALID_OPCODES = frozenset(int(op) for op in Opcode)
_HEADER = struct.Struct(">BBhBi")


@dataclass(frozen=True, slots=True)
class LatencyModel:
    """Service times in seconds.

    `read` per read request per shard touched, `per_row` per row read,
    `write` per partition written, `cross_shard` the delay before a part
    of a request reaches a shard other than its connection's (it occupies
    no shard's queue).
    """

    read: float = 0.001
    write: float = 0.001
    per_row: float = 2e-6
    cross_shard: float = 0.0


class ReadHold:
    """Keeps back the responses of user-table reads, for tests that need a read in flight.

    Reads arriving while the hold is open are executed (against the data as it is
    then) and counted as usual, but their responses wait until `release()`; the
    latency model is charged from the release. `close()` stops holding new reads and
    keeps the held ones. Test instrumentation: Scylla has nothing like it.
    """

    def __init__(self) -> None:
        self.open = True
        self._pending: list[Callable[[], None]] = []

    def __len__(self) -> int:
        return len(self._pending)

    def keep(self, respond: Callable[[], None]) -> None:
        self._pending.append(respond)

    def close(self) -> None:
        self.open = False

    def release(self) -> None:
        self.open = False
        pending, self._pending = self._pending, []
        for respond in pending:
            respond()


class CqlServer:
    """Serves CQL connections for one emulator; see the module docstring.

    Must be used from a single event loop. `close_connections()` drops every
    client (pending responses are discarded). `shard_aware_port` is the
    port advertised in SCYLLA_SHARD_AWARE_PORT (None: not advertised); the
    emulator sets it once that listener is bound.
    """

    def __init__(
        self,
        executor: Executor,
        shards: ShardModel,
        metrics: EmulatorMetrics,
        latency: LatencyModel,
        *,
        auth: bool,
        max_frame: int,
        shard_aware: bool = False,
    ) -> None:
        self.executor = executor
        self.shards = shards
        self.metrics = metrics
        self.latency = latency
        self.auth = auth
        self.max_frame = max_frame
        self.shard_aware = shard_aware
        self.shard_aware_port: int | None = None
        self.hold: ReadHold | None = None
        self._assigner = ShardAssigner(shards.shards)
        self._connections: set[_Connection] = set()

    @property
    def connection_count(self) -> int:
        return len(self._connections)

    def connections(self) -> list[ConnectionInfo]:
        """The open client connections, ordered by (shard, client port)."""
        return sorted(connection.info for connection in self._connections)

    def protocol(self) -> asyncio.Protocol:
        """A handler for the ordinary CQL port: shards are handed out in turn."""
        return _Connection(self, shard_aware_port=False)

    def shard_aware_protocol(self) -> asyncio.Protocol:
        """A handler for the shard-aware port: the client's port picks the shard."""
        return _Connection(self, shard_aware_port=True)

    def supported(self, shard: int) -> dict[str, list[str]]:
        """The SUPPORTED options for a connection that belongs to `shard`."""
        options = dict(DEFAULT_SUPPORTED)
        if self.shard_aware:
            options.update(sharding_options(shard, self.shards.shards, self.shard_aware_port))
        return options

    def assign_shard(self, client_port: int, *, shard_aware_port: bool) -> int:
        return self._assigner.assign(client_port, shard_aware_port=shard_aware_port)

    def close_connections(self) -> None:
        """Abort every client connection at once; unsent responses are dropped."""
        for connection in list(self._connections):
            connection.abort()

    def costs(self, outcome: Outcome) -> list[tuple[int, float]]:
        """Per-shard service time of an outcome (empty for system reads and DDL)."""
        count = self.shards.shards
        latency = self.latency
        per_shard: dict[int, float] = {}
        if outcome.reads or outcome.scan:
            rows: dict[int, int] = {}
            for token, n in outcome.reads:
                shard = shard_of(token, count)
                rows[shard] = rows.get(shard, 0) + n
            touched: Iterable[int] = range(count) if outcome.scan else rows.keys()
            for shard in touched:
                per_shard[shard] = latency.read + latency.per_row * rows.get(shard, 0)
        for token in set(outcome.writes):
            shard = shard_of(token, count)
            per_shard[shard] = per_shard.get(shard, 0.0) + latency.write
        return list(per_shard.items())

    def push_schema_change(self, change: ResultSchemaChange) -> None:
        """Send a SCHEMA_CHANGE event to every connection registered for it."""
        event = SchemaChangeEvent(
            change.change_type, change.target, change.keyspace, change.name, change.arg_types
        ).encode()
        for connection in list(self._connections):
            if "SCHEMA_CHANGE" in connection.events:
                connection.send(Opcode.EVENT, event, stream=-1)

    def _opened(self, connection: _Connection) -> None:
        self._connections.add(connection)

    def _closed(self, connection: _Connection) -> None:
        self._connections.discard(connection)


@dataclass(frozen=True, slots=True, order=True)
class ConnectionInfo:
    """One open client connection: its shard, the client's port, which listener took it."""

    shard: int
    client_port: int
    shard_aware_port: bool


class _Connection(asyncio.Protocol):
    def __init__(self, server: CqlServer, *, shard_aware_port: bool) -> None:
        self._server = server
        self._shard_aware_port = shard_aware_port
        self.shard = 0
        self.info = ConnectionInfo(0, 0, shard_aware_port)
        self._transport: asyncio.Transport | None = None
        self._decoder = FrameDecoder(server.max_frame)
        self._loop = asyncio.get_running_loop()
        # Until the first frame of a supported version arrives, headers are
        # checked here so a version probe can be answered without killing
        # the decoder (the driver retries on this same connection).
        self._probing = True
        self._probe_buffer = b""
        self._skip = 0
        self._version = 4
        self._compression = False
        self._started = False
        self._authenticated = not server.auth
        self._closed = False
        self.session = Session()
        self.events: set[str] = set()

    # ------------------------------------------------------------ transport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport: no isinstance check.
        self._transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        client_port = peer[1] if isinstance(peer, tuple) and len(peer) >= 2 else 0
        self.shard = self._server.assign_shard(
            int(client_port), shard_aware_port=self._shard_aware_port
        )
        self.info = ConnectionInfo(self.shard, int(client_port), self._shard_aware_port)
        self._server._opened(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._server._closed(self)

    def pause_writing(self) -> None:
        # A client that does not read its responses stops being read from.
        if self._transport is not None:
            self._transport.pause_reading()

    def resume_writing(self) -> None:
        if self._transport is not None and not self._closed:
            self._transport.resume_reading()

    def close(self) -> None:
        """Close after flushing what was already written (an error frame, say)."""
        if not self._closed and self._transport is not None:
            self._closed = True
            self._transport.close()

    def abort(self) -> None:
        """Drop the connection now, as a crashing node would."""
        if self._transport is not None:
            self._closed = True
            self._transport.abort()

    def send(self, opcode: int, body: bytes, *, stream: int) -> None:
        """Write one response frame now (no-op once the connection is closing)."""
        transport = self._transport
        if self._closed or transport is None or transport.is_closing():
            return
        compress = self._compression and opcode != Opcode.READY
        transport.write(
            encode_frame(
                opcode, body, stream=stream, version=self._version, response=True, compress=compress
            )
        )

    def _send_later(self, reservation: Reservation, opcode: int, body: bytes, stream: int) -> None:
        self._server.shards.release(reservation)
        self.send(opcode, body, stream=stream)

    def _fail(self, message: str, stream: int) -> None:
        """PROTOCOL_ERROR on `stream`, then close this connection."""
        if not self._closed:
            self.send(
                Opcode.ERROR, Error(ErrorCode.PROTOCOL_ERROR, message).encode(), stream=stream
            )
            self.close()

    # --------------------------------------------------------------- input

    def data_received(self, data: bytes) -> None:
        if self._closed:
            return
        if self._probing:
            remaining = self._probe(data)
            if remaining is None:
                return
            data = remaining
        at_boundary = self._decoder.buffered == 0
        try:
            frames = self._decoder.feed(data)
        except CQLProtocolError as exc:
            stream = _stream_of(exc)
            if stream is None:
                stream = _failing_stream(data, self._server.max_frame) if at_boundary else 0
            self._fail(exc.message, stream)
            return
        for frame in frames:
            if self._closed:
                return
            self._handle(frame)

    def _probe(self, data: bytes) -> bytes | None:
        """Answer unsupported-version frames until a v3/v4 header shows up.

        Returns the bytes to hand to the decoder once probing is over, or
        None while still probing.
        """
        buffer = self._probe_buffer + data
        while True:
            if self._skip:
                dropped = min(self._skip, len(buffer))
                buffer = buffer[dropped:]
                self._skip -= dropped
                if self._skip:
                    self._probe_buffer = b""
                    return None
            if not buffer:
                self._probe_buffer = b""
                return None
            version = buffer[0] & 0x7F
            if version in _SUPPORTED_VERSIONS:
                self._probing = False
                self._probe_buffer = b""
                return buffer
            if version < 3:
                # v1/v2 headers are 8 bytes with a one-byte stream.
                if len(buffer) < 8:
                    self._probe_buffer = buffer
                    return None
                stream = struct.unpack_from(">b", buffer, 2)[0]
                self._transport_write(unsupported_version_reply(version, stream))
                self.close()
                return None
            if len(buffer) < _HEADER.size:
                self._probe_buffer = buffer
                return None
            _, _, stream, _, length = _HEADER.unpack_from(buffer)
            self._transport_write(unsupported_version_reply(version, stream))
            if not 0 <= length <= self._server.max_frame:
                self.close()
                return None
            buffer = buffer[_HEADER.size :]
            self._skip = length

    def _transport_write(self, data: bytes) -> None:
        if self._transport is not None and not self._closed:
            self._transport.write(data)

    # ------------------------------------------------------------ requests

    def _handle(self, frame: Frame) -> None:
        stream = frame.stream
        try:
            if frame.is_response or frame.opcode not in _REQUEST_OPCODES:
                raise ProtocolViolation(
                    f"Unexpected message {Opcode(frame.opcode).name} from a client"
                )
            self._version = frame.version
            body = frame.body
            if frame.flags & COMPRESSION:
                if not self._compression:
                    raise ProtocolViolation(
                        "Received a compressed frame, but no compression was negotiated"
                    )
                body = decompress_body(body, max_size=self._server.max_frame)
            _, body = split_extras(frame.flags, body, response=False)
            self._dispatch(frame.opcode, body, stream)
        except CQLProtocolError as exc:
            if exc.code == ErrorCode.PROTOCOL_ERROR:
                self._fail(exc.message, stream)
            else:
                self.send(Opcode.ERROR, Error(exc.code, exc.message).encode(), stream=stream)
        except ProtocolViolation as exc:
            self._fail(exc.message, stream)
        except CqlRequestError as exc:
            self.send(Opcode.ERROR, _error_body(exc), stream=stream)
        except Exception as exc:  # a bug in the emulator must not take the connection down
            _log.exception("emulator failed on stream %d", stream)
            self.send(
                Opcode.ERROR,
                Error(ErrorCode.SERVER_ERROR, f"emulator bug: {exc!r}").encode(),
                stream=stream,
            )

    def _dispatch(self, opcode: int, body: bytes, stream: int) -> None:
        server = self._server
        if opcode == Opcode.OPTIONS:
            supported = Supported(server.supported(self.shard))
            self.send(Opcode.SUPPORTED, supported.encode(), stream=stream)
            return
        if opcode == Opcode.STARTUP:
            startup = Startup.decode(body)
            compression = negotiate_compression(startup.options)
            self._started = True
            if server.auth and not self._authenticated:
                self.send(
                    Opcode.AUTHENTICATE,
                    Authenticate(PASSWORD_AUTHENTICATOR).encode(),
                    stream=stream,
                )
            else:
                self.send(Opcode.READY, Ready().encode(), stream=stream)
            # Compression applies from the frame after READY/AUTHENTICATE.
            self._compression = compression is not None
            return
        if not self._started:
            raise ProtocolViolation(
                f"Unexpected message {Opcode(opcode).name}, expecting STARTUP or OPTIONS"
            )
        if opcode == Opcode.AUTH_RESPONSE:
            if not server.auth or self._authenticated:
                raise ProtocolViolation("Unexpected AUTH_RESPONSE: no authentication in progress")
            roles = server.executor.roles
            assert roles is not None
            self.session.role = roles.authenticate(AuthResponse.decode(body).token)
            self._authenticated = True
            self.send(Opcode.AUTH_SUCCESS, AuthSuccess(None).encode(), stream=stream)
            return
        if not self._authenticated:
            raise ProtocolViolation(
                f"Unexpected message {Opcode(opcode).name}, expecting AUTH_RESPONSE"
            )
        if opcode == Opcode.REGISTER:
            self.events.update(Register.decode(body).event_types)
            self.send(Opcode.READY, Ready().encode(), stream=stream)
            return
        executor = server.executor
        if opcode == Opcode.PREPARE:
            prepared = executor.prepare(Prepare.decode(body).query, self.session)
            result = executor.prepared_result(prepared)
            self.send(Opcode.RESULT, _prepared_body(result, self._version), stream=stream)
            return
        if opcode == Opcode.QUERY:
            query = Query.decode(body)
            params = query.params
            outcome = executor.execute_query(
                query.query, params.values, params.names, self.session, _options(params)
            )
        elif opcode == Opcode.EXECUTE:
            execute = Execute.decode(body)
            params = execute.params
            prepared = executor.lookup(execute.query_id)
            outcome = executor.execute_prepared(
                prepared, params.values, params.names, self.session, _options(params)
            )
        else:
            batch = Batch.decode(body)
            children = [
                executor.batch_child(item.query_or_id, item.values, self.session)
                for item in batch.statements
            ]
            outcome = executor.execute_batch(
                children,
                batch.batch_type,
                self.session,
                ExecutionOptions(timestamp=batch.timestamp),
            )
        costs = server.costs(outcome)
        where = placement([shard for shard, _ in costs], self.shard)
        if where is not None:
            server.metrics.count_placement(self.shard, where)
        server.metrics.count(outcome.kind)
        if outcome.schema_change is not None:
            server.push_schema_change(outcome.schema_change)
        self._respond(outcome, costs, stream)

    def _respond(self, outcome: Outcome, costs: list[tuple[int, float]], stream: int) -> None:
        hold = self._server.hold
        if hold is not None and hold.open and (outcome.reads or outcome.scan):
            hold.keep(lambda: self._respond_now(outcome, costs, stream))
            return
        self._respond_now(outcome, costs, stream)

    def _respond_now(self, outcome: Outcome, costs: list[tuple[int, float]], stream: int) -> None:
        if self._closed:
            return
        body = outcome.encoded()
        if not costs:
            self.send(Opcode.RESULT, body, stream=stream)
            return
        shards = self._server.shards
        reservation = shards.reserve(
            self._loop.time(), costs, home=self.shard, hop=self._server.latency.cross_shard
        )
        self._loop.call_at(
            reservation.done, self._send_later, reservation, Opcode.RESULT, body, stream
        )


def _prepared_body(result: ResultPrepared, version: int) -> bytes:
    """A PREPARED result body; protocol v3 has no partition-key indexes in its metadata."""
    if version >= 4:
        return result.encode()
    v4 = result.metadata.encode()
    # v4 metadata: flags, column count, pk count, pk indexes, column specs.
    pk_count = int.from_bytes(v4[8:12], "big", signed=True)
    v3 = v4[:8] + v4[12 + 2 * pk_count :]
    query_id = result.query_id
    return (
        struct.pack(">iH", ResultKind.PREPARED, len(query_id))
        + query_id
        + v3
        + result.result_metadata.encode()
    )


def _options(params: QueryParameters) -> ExecutionOptions:
    return ExecutionOptions(
        params.page_size, params.paging_state, params.skip_metadata, params.timestamp
    )


def _error_body(exc: CqlRequestError) -> bytes:
    if isinstance(exc, AlreadyExists):
        return Error(exc.code, exc.message, AlreadyExistsDetails(exc.keyspace, exc.table)).encode()
    if isinstance(exc, Unprepared):
        return Error(exc.code, exc.message, UnpreparedDetails(exc.query_id)).encode()
    return Error(exc.code, exc.message).encode()


def _stream_of(exc: CQLProtocolError) -> int | None:
    stream = getattr(exc, "stream", None)
    return stream if isinstance(stream, int) else None


def _failing_stream(data: bytes, max_frame: int) -> int:
    """The stream id of the first invalid frame header in `data` (0 if none is readable)."""
    offset = 0
    while len(data) - offset >= _HEADER.size:
        version, _, stream, opcode, length = _HEADER.unpack_from(data, offset)
        if (
            (version & 0x7F) not in _SUPPORTED_VERSIONS
            or opcode not in _VALID_OPCODES
            or not 0 <= length <= max_frame
        ):
            return int(stream)
        offset += _HEADER.size + length
    return 0
