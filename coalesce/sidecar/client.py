"""One client connection: its state machine, its bounds, and the execution of plans.

Setup frames (OPTIONS, STARTUP, AUTH_RESPONSE, REGISTER) are answered here (the login
is verified by Scylla, see `LoginRelay`). Each QUERY, EXECUTE, PREPARE and BATCH is
read once into a `Request`, decided by `plan`, and the plan executed: a `Merge` joins
or starts a `Flight`, a `Forward` is an `Exchange` of its own, a `Use` switches this
connection's upstream pool, an `Unprepared` is answered at once. A request whose body
equals (but for its timestamp) one this connection already planned into a flight still
joinable joins it without being read again: the herd's path. Every answer goes back
under the client's own stream id, LZ4-compressed when the client negotiated it.

What one client can make the sidecar hold is bounded, and its misbehaviour costs only
itself:

- a malformed frame or body is answered with PROTOCOL_ERROR and closes this
  connection; a body is checked before it is sent upstream, so it never reaches a
  connection other clients share;
- at most ``max_client_requests`` unanswered requests, ``max_client_buffer`` unsent
  answer bytes (beyond which only answers to requests already taken are written) and
  as many decompressed request bytes held upstream-bound: past any, the sidecar takes
  no further frame from the client and stops reading until it catches up (TCP does the
  rest); frames before the handshake are at most 64 KiB;
- frames are dispatched within the sidecar's shared ingest budget (`Proxy.take_budget`),
  the rest wait in this connection's backlog (and reading pauses), so answers
  arriving from Scylla never wait behind a burst of ingest; a request read before its
  flight's answer arrived still gets that answer when it is dispatched later;
- STARTUP to ready within ``handshake_timeout``; a connection quiet for
  ``idle_timeout`` is closed;
- when the client disconnects, it leaves every flight it waits on (a flight nobody
  waits for is abandoned), and its forwarded requests' answers are dropped.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from collections import deque
from collections.abc import Callable, Coroutine
from typing import Any, Final, cast

from coalesce.cql import (
    COMPRESSION,
    CUSTOM_PAYLOAD,
    DEFAULT_SUPPORTED,
    TRACING,
    WARNING,
    AuthResponse,
    CQLProtocolError,
    Error,
    ErrorCode,
    Frame,
    FrameDecoder,
    Opcode,
    ProtocolVersionError,
    Register,
    ResultKind,
    ResultSetKeyspace,
    Startup,
    Supported,
    UnsupportedCompressionError,
    compress_body,
    decompress_body,
    first_bad_stream,
    join_extras,
    negotiate_compression,
    peek_result_kind,
    split_extras,
    unsupported_version_reply,
)
from coalesce.cql import Unprepared as UnpreparedDetails
from coalesce.cql.request import Request
from coalesce.cql.token import murmur3_token
from coalesce.sidecar.advertised import peer_rows, renames_columns, rewrite_local
from coalesce.sidecar.connection import Outcome
from coalesce.sidecar.errors import UpstreamError, UpstreamRefused
from coalesce.sidecar.exchange import Exchange
from coalesce.sidecar.flights import FULL as _FULL
from coalesce.sidecar.flights import Answer, Flight
from coalesce.sidecar.login import LoginRelay
from coalesce.sidecar.outbox import FLUSH_AT, Outbox
from coalesce.sidecar.peers import FORGET_PREFIX, HOP, forget_frame, read_forget
from coalesce.sidecar.plan import Forward, Merge, Plan, Unprepared, Use, partition_of, plan
from coalesce.sidecar.proxy import INGEST_BUDGET, Proxy
from coalesce.sidecar.upstream import Pool

__all__ = ["ClientConnection"]

_log = logging.getLogger(__name__)

_HEADER: Final = struct.Struct(">BBhBi")
_STREAM: Final = struct.Struct(">h")
_RESPONSE_V4: Final = 0x84
_COMPRESSION: Final = COMPRESSION
_UNMERGEABLE: Final = TRACING | CUSTOM_PAYLOAD
_CUSTOM_PAYLOAD: Final = CUSTOM_PAYLOAD
_HOP: Final = HOP
_HOP_SIZE: Final = len(HOP)
_TIMESTAMP: Final = 0x20  # <query_parameters> flag: the client's default timestamp
_EXECUTE: Final = int(Opcode.EXECUTE)
_QUERY: Final = int(Opcode.QUERY)
_RESULT: Final = int(Opcode.RESULT)
_ERROR: Final = int(Opcode.ERROR)
_FAST: Final = frozenset({_EXECUTE, _QUERY})
_FAST_ENTRIES: Final = 64
_FAST_BODY: Final = 4096  # herds repeat small requests; a large body is not remembered
_NOT_READING: Final = ("this connection does not read its answers: the sidecar holds no more "
                       "of them")
_CLOSE_GRACE: Final = 5.0  # seconds a closed client has to take what is left for it
_MAX_SETUP_FRAME: Final = 64 * 1024  # before the client is ready (SASL tokens included)
_MAX_PARTIAL_TOTAL: Final = 256 * 1024 * 1024  # unfinished frames, all clients together
_EXTRAS: Final = WARNING | TRACING | CUSTOM_PAYLOAD
_SUPPORTED_BODY: Final = Supported(
    {**DEFAULT_SUPPORTED, "PROTOCOL_VERSIONS": ["4/v4"]}
).encode()

# A run of identical requests: flight, opcode, body size, key (the body, or all of it
# but the timestamp), the streams (this connection's in the flight, or those to answer
# at once), and whether the flight was answered already (its answer is kept for
# requests read before it came). Frames compressed or with a custom payload (`_RAW`
# flags) are not compared as they come, so they start no run.
_Run = tuple[Flight, int, int, bytes, list[int], bool]
_RAW: Final = COMPRESSION | CUSTOM_PAYLOAD

# Connection states.
_NEW, _STARTING, _AUTHENTICATING, _AUTH_SENT, _READY, _REFUSED = range(6)


class _Forward(Exchange):
    """One request passed through alone: its client, and what its answer does."""

    __slots__ = ("client", "partition", "plan", "read_at", "stream", "text")

    def __init__(
        self, client: ClientConnection, stream: int, request: Request, plan: Forward,
        pool: Pool, partition: bytes | None,
    ) -> None:
        node, shard = pool.upstream.route(partition)
        super().__init__(pool, node, request.opcode, request.flags, request.body, plan.statement,
                         shard)
        self.client = client
        self.stream = stream
        self.plan = plan
        self.partition = partition
        self.read_at = client.read_at
        self.text = request.text  # a PREPARE's statement, learned from its answer

    @property
    def abandoned(self) -> bool:
        return self.client.closed

    def finish(self, outcome: Outcome) -> None:
        client = self.client
        proxy = client._proxy
        p = self.plan
        if type(outcome) is Frame and outcome.opcode == _RESULT:
            if p.learn:
                _learn(proxy, outcome, self.text, self.pool.keyspace)
            elif p.rewrite is not None:
                outcome = _rewrite(proxy, outcome, p, self.text)
        if p.writes is not None:  # done or failed: it may have been applied either way
            proxy.flights.freshness.written_by(p.writes, p.keyspace, self.partition)
            peers = proxy.peers
            if peers is not None and peers.ring.others:
                # Every member forgets what the write made stale before its client hears.
                body = forget_frame(p.writes, p.keyspace, self.partition)
                client._spawn(self._deliver_after(peers.forget_everywhere(client.role, body),
                                                  outcome))
                return
        self._deliver(outcome)

    async def _deliver_after(self, forgets: Coroutine[Any, Any, int], outcome: Outcome) -> None:
        try:
            missed = await forgets
            if missed:
                self.client._proxy.stats.forgets_missed += missed
        finally:
            self._deliver(outcome)

    def _deliver(self, outcome: Outcome) -> None:
        client = self.client
        if isinstance(outcome, UpstreamError):
            client._write_failure(self.stream, outcome)
        else:
            client._write_frame(self.stream, outcome.opcode, outcome.flags, outcome.body)
        # The bookkeeping once the answer has left: nothing runs in between.
        proxy = client._proxy
        client._held -= len(self.body)
        client._answered(1)
        proxy.stats.latency["forwarded"].observe(proxy.loop_time() - self.read_at)

    def fail(self, error: UpstreamError) -> None:
        self.client._held -= len(self.body)
        self.client._answered(1)
        self.client._write_failure(self.stream, error)


def _learn(proxy: Proxy, frame: Frame, text: str | None, keyspace: str | None) -> None:
    body = frame.body
    if frame.flags & _EXTRAS:
        body = split_extras(frame.flags, body, response=True)[1]
    if text is not None and peek_result_kind(body) == ResultKind.PREPARED:
        proxy.statements.learn(text, keyspace, body)


def _rewrite(proxy: Proxy, frame: Frame, p: Forward, text: str | None) -> Outcome:
    """Rows of ``system.local`` describing this sidecar, the peers tables the others.

    Scylla's ``system.local`` cells are recorded for the peers rows every client sees,
    but not from a query that may rename columns (`renames_columns`)."""
    try:
        extras, result = split_extras(frame.flags, frame.body, response=True)
        columns = p.statement.result_columns if p.statement is not None else ()
        if p.rewrite == "local":
            if text is None and p.statement is not None:
                text = p.statement.query
            cluster = proxy.cluster if text is not None and not renames_columns(text) else None
            result = rewrite_local(result, proxy.identity, proxy.advertised_tokens, columns,
                                   cluster)
        else:
            result = peer_rows(result, proxy.peer_members(), proxy.identity, columns,
                               proxy.cluster)
        extra_flags, body = join_extras(extras, result, response=True)
    except CQLProtocolError as exc:
        return UpstreamError(f"cannot rewrite the upstream answer: {exc.message}")
    flags = (frame.flags & ~(_EXTRAS | COMPRESSION)) | extra_flags
    return frame._replace(flags=flags, body=body)


class ClientConnection(asyncio.Protocol):
    """A driver's connection to the sidecar. See the module docstring for the contract."""

    def __init__(
        self, proxy: Proxy, on_close: Callable[[ClientConnection], None], *,
        refused: bool = False,
    ) -> None:
        self._proxy = proxy
        self._on_close = on_close
        config = proxy.config
        self._max_frame = config.max_frame_size
        self._max_requests = config.max_client_requests
        # Setup frames are small: a stranger cannot make the sidecar buffer more.
        self._decoder = FrameDecoder(max_body=min(_MAX_SETUP_FRAME, self._max_frame))
        self._transport: asyncio.Transport | None = None
        self._out: Outbox | None = None
        self._state = _REFUSED if refused else _NEW
        self._lz4 = False
        self._closed = False
        self._lost = False  # connection_lost ran
        self._last_use: asyncio.Task[None] | None = None  # USEs run in the order read
        self._login: LoginRelay | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._flights: set[Flight] = set()
        # Per opcode: key body (minus timestamp) -> the flight this connection planned it
        # into; valid while that flight is joinable. Cleared on USE (keys hold keyspaces).
        self._fast: dict[int, dict[bytes, Flight]] = {_EXECUTE: {}, _QUERY: {}}
        # Frames read but not dispatched yet: (the ingest sequence number of the read
        # that brought them (see `Proxy.ingest`), its loop time, the frames, the bytes
        # they came from), as `FrameDecoder.feed_folded` gave them. `_seq` is that of
        # the frame being dispatched now.
        self._backlog: deque[tuple[int, float, list[Frame | int], bytes]] = deque()
        self._seq = 0
        self.read_at = 0.0  # loop time of the read that brought the frame being dispatched
        self.queued = False  # waiting in the proxy's queue for ingest budget
        self._partial = 0  # bytes of an unfinished frame (counted in Proxy.partial_bytes)
        self._partial_epoch = 0
        self._pending = 0  # requests received and not answered yet
        # Request bytes (decompressed) this client has the sidecar hold upstream-bound:
        # a bound of their own, since LZ4 lets a few bytes on the wire become many.
        self._held = 0
        self._max_held = config.max_client_buffer
        self._write_paused = False
        self._reading = True
        self._activity = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self.role = ""
        self.keyspace: str | None = None
        self.events: frozenset[str] = frozenset()  # REGISTERed event types
        # It sent a hop-marked read (a ring member does): the leading hop-marked frames
        # of its reads skip the ingest budget (see `data_received`).
        self._member = False
        self._flags = 0  # of the frame being dispatched, as it came
        # What the frame just dispatched joined, for the next one (`_dispatch_all`).
        self._run: _Run | None = None
        self._pool: Pool | None = None

    # -- asyncio.Protocol --------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses; they quack alike.
        self._transport = cast(asyncio.Transport, transport)
        config = self._proxy.config
        # The transport holds at most this, the outbox up to FLUSH_AT more.
        self._transport.set_write_buffer_limits(
            high=max(config.max_client_buffer - FLUSH_AT, FLUSH_AT))
        loop = asyncio.get_running_loop()
        self._out = Outbox(loop, self._transport)
        self._proxy.stats.client_connections += 1
        self._activity = loop.time()
        self._timer = loop.call_later(config.handshake_timeout, self._check_timers)

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._lost = True
        proxy = self._proxy
        proxy.stats.client_connections -= 1
        proxy.listeners.discard(self)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._backlog.clear()
        proxy.partial_bytes -= self._partial
        self._partial = 0
        for task in list(self._tasks):
            task.cancel()
        flights, self._flights = self._flights, set()
        for flight in flights:
            streams = flight.waiters.get(self)
            if streams is not None:
                proxy.requests_finished(len(streams))
            flight.leave(self)
        if self._login is not None:
            self._login.close()
            self._login = None
        if self._pool is not None:
            proxy.upstream.release(self._pool)
            self._pool = None
        self._on_close(self)

    def pause_writing(self) -> None:
        # Unsent answers passed max_client_buffer: stop taking requests from the client.
        self._write_paused = True
        self._update_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        self._update_reading()

    def data_received(self, data: bytes) -> None:
        proxy = self._proxy
        self._activity = proxy.loop_time()
        decoder = self._decoder
        try:
            frames, src = decoder.feed_folded(data)
        except ProtocolVersionError as exc:
            self._reject_version(exc.version, exc.stream)
            return
        except CQLProtocolError as exc:
            # `_partial` is what the decoder held before this feed (`_track_partial`).
            stream = first_bad_stream(data, decoder.max_body) if not self._partial else 0
            self._fatal(stream, exc.message)
            return
        # (A partial frame after whole ones is a new frame: its own deadline.)
        if (decoder.buffered != self._partial or (frames and self._partial)) and (
                self._track_partial(bool(frames))):
            return
        seq = proxy.ingest_seq = proxy.ingest_seq + 1
        now = self._activity
        if self._backlog:
            if frames:
                self._backlog.append((seq, now, frames, src))
            return
        # A ring member's reads are one per flight of its own herd: they must meet the
        # flight here while it is in flight, not wait behind client backlogs. Only its
        # leading hop-marked frames, a budget's worth at most, skip the budget: any
        # client can mark one read, and must not get the loop to itself by it.
        if self._member:
            budget = _hop_marked(frames, src)
            if budget < len(frames):
                budget += proxy.take_budget(len(frames) - budget)
        else:
            budget = proxy.take_budget(len(frames))
        if budget < len(frames):
            self._backlog.append((seq, now, frames[budget:], src))
            frames = frames[:budget]
            self._update_reading()
        self._seq = seq
        self.read_at = now
        first = frames[0] if len(frames) == 1 else None  # (a read's first is never folded)
        if isinstance(first, Frame) and not (self._closed or self.blocked):
            self._dispatch(first)  # one request alone: nothing to run with
            self._run = None
        else:
            self._dispatch_all(seq, now, frames, src)

    def _track_partial(self, completed: bool) -> bool:
        """Account for the bytes of an unfinished frame (a new one if the read
        `completed` frames); True if that closed us.

        A frame must arrive whole within ``handshake_timeout`` of its first bytes, and
        past `_MAX_PARTIAL_TOTAL` bytes of unfinished frames in all, a connection holding
        64 KiB or more of one is closed (so the total stays under the cap plus 64 KiB a
        connection): a client that stops in the middle of a large frame cannot pin
        memory for long, nor many such clients much of it.
        """
        proxy = self._proxy
        buffered = self._decoder.buffered
        proxy.partial_bytes += buffered - self._partial
        started = buffered and (completed or not self._partial)
        self._partial = buffered
        if started:
            self._partial_epoch += 1
            asyncio.get_running_loop().call_later(
                proxy.config.handshake_timeout, self._partial_expired, self._partial_epoch)
        if proxy.partial_bytes > _MAX_PARTIAL_TOTAL and buffered >= _MAX_SETUP_FRAME:
            proxy.partial_bytes -= buffered  # let go of it now, not when the close ends
            self._partial = 0
            self._decoder = FrameDecoder(max_body=self._decoder.max_body)
            self._write_error(0, ErrorCode.OVERLOADED,
                              "the sidecar holds too many unfinished frames; send it again")
            self.close()
            return True
        return False

    def _partial_expired(self, epoch: int) -> None:
        if self._partial and epoch == self._partial_epoch and not self._closed:
            self._proxy.stats.timed_out += 1
            self._close_quietly()

    # -- public ------------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def pending(self) -> int:
        """Requests received from this client and not answered yet."""
        return self._pending

    def close(self) -> None:
        """Close the connection (answers already written are flushed first).

        A client that does not read what is left to flush is cut off after a grace
        period (``min(handshake_timeout, 5 s)``): a closed connection must not keep its
        descriptor and its `max_connections` slot for as long as the client likes.
        """
        if self._transport is not None and not self._closed:
            self._closed = True
            assert self._out is not None
            self._out.flush()
            self._transport.close()
            grace = min(self._proxy.config.handshake_timeout, _CLOSE_GRACE)
            asyncio.get_running_loop().call_later(grace, self.abort)

    def abort(self) -> None:
        """Drop the connection now, unsent answers with it."""
        if self._transport is not None and not self._lost:
            self._closed = True
            self._transport.abort()

    def send_event(self, body: bytes) -> None:
        """Push an EVENT frame (stream -1) to this client."""
        self._write_frame(-1, Opcode.EVENT, 0, body)

    # -- flights call these (flights.Waiter) ------------------------------------------------

    def _release_flight(self, flight: Flight, answered: int) -> None:
        """`flight` is done with this client, which had `answered` requests in it."""
        self._flights.discard(flight)
        if flight.starter is self:
            flight.starter = None
            self._held -= len(flight.body)
        self._answered(answered)

    def answer(self, flight: Flight, streams: list[int], answer: Answer) -> None:
        try:
            self._write_answer(streams, answer, flight.arrived.pop(self, self.read_at))
        except Exception:
            self._write_failed()  # this client's alone: the flight's other waiters go on
        self._release_flight(flight, len(streams))  # once the answer has left

    def _write_answer(self, streams: list[int], answer: Answer, read_at: float) -> None:
        out = self._out
        if out is not None and not self._closed:
            if self._write_paused and self._over_hard_limit():
                for stream in streams:
                    self._write_error(stream, ErrorCode.OVERLOADED, _NOT_READING)
            elif len(streams) == 1:  # one copy of the body, as for a forwarded answer
                body = answer.lz4_body() if self._lz4 and answer.body else answer.body
                flags = answer.flags | _COMPRESSION if body is not answer.body else answer.flags
                out.put(_HEADER.pack(_RESPONSE_V4, flags, streams[0], answer.opcode, len(body))
                        + body)
            else:
                self._write_copies(out, streams, answer)
        proxy = self._proxy  # counted once the answer has left
        proxy.stats.latency["merged"].observe(proxy.loop_time() - read_at, len(streams))

    def _write_copies(self, out: Outbox, streams: list[int], answer: Answer) -> None:
        """`answer` to every one of `streams`, in one buffer: only the stream ids differ."""
        frame = answer.frame(self._lz4)
        size = len(frame)
        data = bytearray(frame * len(streams))
        pack = _STREAM.pack_into
        offset = 2
        for stream in streams:
            pack(data, offset, stream)
            offset += size
        out.put(data)

    def _joined(self, flight: Flight) -> None:
        """A request of this client joined `flight` and waits for its answer."""
        self._flights.add(flight)
        self._pending += 1
        self._proxy.in_flight += 1
        if self._pending >= self._max_requests:
            self._update_reading()

    def _answer_now(self, stream: int, flight: Flight) -> None:
        """Answer `stream` from a flight that finished after the request was read."""
        assert flight.answer is not None
        self._write_answer([stream], flight.answer, self.read_at)

    def refuse(self, flight: Flight, streams: list[int], error: UpstreamError) -> None:
        self._release_flight(flight, len(streams))
        try:
            for stream in streams:
                self._write_failure(stream, error)
        except Exception:
            self._write_failed()

    def _write_failed(self) -> None:
        """Writing a flight's outcome to this client raised (a bug of ours): the client
        is cut off, so it does not wait for answers that will not come, and the error
        goes no further (the flight's other waiters are still to be answered)."""
        _log.exception("writing to a client failed")
        self.abort()

    # -- reading, bounded ----------------------------------------------------------------------

    @property
    def backlog_seq(self) -> int | None:
        """The ingest sequence number of the oldest frame read but not dispatched."""
        return self._backlog[0][0] if self._backlog else None

    @property
    def blocked(self) -> bool:
        """Over one of its bounds: nothing more is taken from this client for now."""
        return (self._write_paused or self._pending >= self._max_requests
                or self._held >= self._max_held)

    def take_backlog(self, budget: int) -> int:
        """Dispatch up to `budget` frames of the backlog; return how many were taken."""
        self.queued = False
        backlog = self._backlog
        taken = 0
        while backlog and taken < budget and not self._closed and not self.blocked:
            seq, read_at, frames, src = backlog[0]
            room = budget - taken
            if len(frames) > room:
                backlog[0] = (seq, read_at, frames[room:], src)
                frames = frames[:room]
            else:
                backlog.popleft()
            self._seq = seq
            self.read_at = read_at
            taken += self._dispatch_all(seq, read_at, frames, src)
        self._update_reading()
        return taken

    def _dispatch_all(self, seq: int, read_at: float, frames: list[Frame | int],
                      src: bytes) -> int:
        """Dispatch `frames` (read by read `seq` from `src`) until the client is over a
        bound; the rest goes to the front of the backlog. Returns how many were
        dispatched.

        A herd arrives as runs of identical requests: a frame equal (but for its
        timestamp) to the one dispatched just before it, which joined or started a
        flight still joinable, joins that flight here, at the cost of a comparison and
        an append; the counters of a run are settled when it ends. The decoder hands
        such a frame over folded (`FrameDecoder.feed_folded`: an offset into `src`, the
        frame equal to the one before it but for its stream id and the body's last 8
        bytes), so only folded frames can join a run, undecoded: only those 8 bytes
        are compared, and only when the run's key holds them (no timestamp).
        """
        dispatch = self._dispatch
        max_requests = self._max_requests
        max_waiters = self._proxy.flights.max_waiters
        frame_at = FrameDecoder.frame_at
        run: _Run | None = None
        # The current run, unpacked at its first folded frame (`at` 0 until then): how
        # many more may join it, and what of its key a folded frame must still be
        # compared with, from where in the frame (`at` -1: nothing).
        joined = room = at = 0
        tail = b""
        streams: list[int] = []
        for i, item in enumerate(frames):
            if isinstance(item, int):
                if run is not None:
                    if not at:
                        # Nothing but this loop runs until the run ends: its flight stays
                        # joinable, and the bounds move only by what the run adds.
                        flight, _, size, prefix, streams, answered = run
                        if answered:  # read before its answer came: answered with it at
                            # once, as many as requests taken may be (their answers are
                            # written whole, paused or not); then the bounds are looked
                            # at again.
                            room = max_requests - self._pending - len(streams)
                        else:
                            room = max_requests - self._pending
                            if max_waiters is not None and max_waiters - flight.count < room:
                                room = max_waiters - flight.count
                        folded = size - 8 if size > 8 else 0
                        at = 9 + folded if len(prefix) > folded else -1
                        tail = prefix[folded:]
                    if joined < room and (at < 0 or src.startswith(tail, item + at)):
                        b = src[item + 2]  # the stream id, a signed short
                        streams.append((b << 8 | src[item + 3]) - ((b & 0x80) << 9))
                        joined += 1
                        continue
                frame = frame_at(src, item)
            else:
                frame = item
            if run is not None:  # the first frame that does not join a run ends it
                if joined or run[5]:
                    self._end_run(run, joined)
                joined = at = 0
                run = None
            if self._closed or self._write_paused or self._pending >= max_requests or (
                    self._held >= self._max_held):
                if not self._closed:
                    self._backlog.appendleft((seq, read_at, frames[i:], src))
                    self._update_reading()
                return i
            self._run = None
            dispatch(frame)
            run = self._run
        if run is not None and (joined or run[5]):  # (a run of one settles nothing)
            self._end_run(run, joined)
        return len(frames)

    def _end_run(self, run: _Run, joined: int) -> None:
        """Count the `joined` requests a run added to its flight; answer an answered
        run's requests, all in one buffer (see `_dispatch_all`)."""
        proxy = self._proxy
        flight, opcode, *_, streams, answered = run
        proxy.stats.frames[opcode] += joined
        proxy.stats.merged += joined
        proxy.flights.stats.joined += joined
        if answered:
            assert flight.answer is not None
            self._write_answer(streams, flight.answer, self.read_at)
        else:
            flight.count += joined
            self._pending += joined
            proxy.in_flight += joined

    def _begin_run(self, flight: Flight, opcode: int, size: int, prefix: bytes,
                   streams: list[int], answered: bool) -> None:
        """The frame being dispatched may start a run (see `_dispatch_all`), unless it
        came compressed or with a payload: runs compare frames as they come."""
        if not self._flags & _RAW:
            self._run = (flight, opcode, size, prefix, streams, answered)

    def _update_reading(self) -> None:
        """Read while within bounds and nothing waits in the backlog; keep the backlog
        queued for the ingest budget while within bounds."""
        transport = self._transport
        if transport is None or self._closed:
            return
        blocked = self.blocked
        if self._backlog and not blocked and not self.queued:
            self.queued = True
            self._proxy.defer(self)
        read = not blocked and not self._backlog
        if read != self._reading:
            self._reading = read
            if read:
                transport.resume_reading()
            else:
                transport.pause_reading()

    def _accepted(self) -> None:
        """One more request waits for an answer from upstream."""
        self._pending += 1
        self._proxy.in_flight += 1
        if self._pending >= self._max_requests:
            self._update_reading()

    def _answered(self, count: int) -> None:
        self._pending -= count
        self._proxy.requests_finished(count)
        if not self._reading:
            self._update_reading()

    def _check_timers(self) -> None:
        """The handshake deadline, then the idle timeout, on one timer."""
        self._timer = None
        if self._closed:
            return
        config = self._proxy.config
        loop = asyncio.get_running_loop()
        if self._state != _READY:
            self._proxy.stats.timed_out += 1
            self._close_quietly()
            return
        idle = config.idle_timeout
        if idle is None:
            return
        quiet = loop.time() - self._activity
        if quiet >= idle and not self._pending:
            self._proxy.stats.timed_out += 1
            self._close_quietly()
            return
        self._timer = loop.call_later(max(idle - quiet, 0.05), self._check_timers)

    def _close_quietly(self) -> None:
        if self._transport is not None and not self._closed:
            self._closed = True
            self._transport.abort()

    # -- dispatch ------------------------------------------------------------------------------

    def _dispatch(self, frame: Frame) -> None:
        version, is_response, flags, stream, opcode, body = frame
        self._flags = flags  # as it came: a run (`_dispatch_all`) compares frames as they come
        proxy = self._proxy
        proxy.stats.frames[opcode] += 1
        if version != 4:
            self._reject_version(version, stream)
            return
        if is_response:
            self._fatal(stream, "a client sent a frame with the response bit set")
            return
        try:
            if flags & _COMPRESSION:
                if not self._lz4:
                    raise CQLProtocolError("compressed frame but no compression negotiated")
                body = decompress_body(body, max_size=self._max_frame)
                flags &= ~_COMPRESSION
            if self._state == _READY and opcode in _PLANNED:
                hop = False
                if flags & _CUSTOM_PAYLOAD and opcode in _FAST:
                    if body.startswith(_HOP):  # sent by a ring member: serve it here
                        body = body[_HOP_SIZE:]
                        flags &= ~_CUSTOM_PAYLOAD
                        hop = True
                        # Only a sidecar in a ring has members to exempt from the budget.
                        self._member = proxy.peers is not None
                        proxy.stats.ring_served += 1
                    elif opcode == _QUERY and body.startswith(FORGET_PREFIX):
                        self._on_forget(stream, body)
                        return
                key = None  # the body as `_fast` remembers it (the herd's path)
                if opcode in _FAST and not flags & _UNMERGEABLE and 13 < len(body) <= _FAST_BODY:
                    at = 2 + (body[0] << 8 | body[1]) if opcode == _EXECUTE else (
                        4 + int.from_bytes(body[:4], "big", signed=True))
                    if 0 <= at < len(body) - 2:  # (a negative string length is malformed)
                        key = body[:-8] if body[at + 2] & _TIMESTAMP else body
                        known = self._fast[opcode].get(key)
                        if known is not None and self._join_planned(stream, opcode, body, key,
                                                                    known):
                            return
                request = Request(stream, opcode, flags, body)
                p = plan(request, self.role, self.keyspace, proxy.statements)
                if type(p) is Merge:
                    proxy.stats.merged += 1
                    flight = proxy.flights.join(p.key, self, stream, self._seq)
                    if flight is None:
                        flight = self._start_flight(request, p, hop)
                    elif flight is not _FULL and not flight.joinable:
                        self._answer_now(stream, flight)
                    elif flight is not _FULL:
                        self._joined(flight)
                    else:
                        self._write_error(stream, ErrorCode.OVERLOADED,
                                          "too many requests wait for this read")
                    if key is not None and flight is not None and flight is not _FULL:
                        # Remembered for `_join_planned`.
                        fast = self._fast[opcode]
                        if len(fast) >= _FAST_ENTRIES:
                            fast.clear()
                        fast[key] = flight
                        if flight.joinable:
                            self._begin_run(flight, opcode, len(body), key,
                                            flight.waiters[self], False)
                else:
                    self._execute(request, p)
                return
            handler = (_READY_HANDLERS if self._state == _READY else _SETUP_HANDLERS).get(opcode)
            if handler is None:
                self._unexpected(stream, opcode)
                return
            handler(self, stream, flags, body)
        except CQLProtocolError as exc:
            if exc.code == ErrorCode.PROTOCOL_ERROR:
                self._fatal(stream, exc.message)
            else:
                self._write_error(stream, exc.code, exc.message)
        except Exception as exc:  # a bug of ours: this client gets an error, nobody else
            _log.exception("handling a request failed")
            self._write_error(stream, ErrorCode.SERVER_ERROR, f"sidecar error: {exc!r}")
            self.close()

    def _join_planned(self, stream: int, opcode: int, body: bytes, key: bytes,
                      flight: Flight) -> bool:
        """The herd's path: a body identical (but for its timestamp: `key`) to one this
        connection planned and checked joins that `flight` without being read again.
        False when the flight cannot be joined (the request is then planned)."""
        proxy = self._proxy
        if not flight.joinable:
            if flight.settled_seq < self._seq:
                return False  # answered before this request was read: a new flight
            proxy.stats.merged += 1
            proxy.flights.stats.joined += 1
            if self._flags & _RAW:
                self._answer_now(stream, flight)
            else:  # the identical requests after it are answered with it (`_end_run`)
                self._begin_run(flight, opcode, len(body), key, [stream], True)
            return True
        proxy.stats.merged += 1
        if proxy.flights.join_flight(flight, self, stream):
            self._joined(flight)
            self._begin_run(flight, opcode, len(body), key, flight.waiters[self], False)
        else:
            self._write_error(stream, ErrorCode.OVERLOADED, "too many requests wait for this read")
        return True

    def _unexpected(self, stream: int, opcode: int) -> None:
        if self._state == _REFUSED:
            self._proxy.stats.refused += 1
            self._write_error(stream, ErrorCode.OVERLOADED,
                              "the sidecar is at its client connection limit; try another node "
                              "or later")
            self.close()
            return
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

    # -- requests --------------------------------------------------------------------------

    def _execute(self, request: Request, p: Plan) -> None:
        """Carry out every plan but `Merge` (which `_dispatch` runs itself)."""
        proxy = self._proxy
        if type(p) is Forward:
            self._forward(request, p)
        elif type(p) is Use:
            proxy.stats.local += 1
            self._accepted()
            self._last_use = self._spawn(self._use(request.stream, p.keyspace, self._last_use))
        else:
            assert type(p) is Unprepared
            proxy.stats.local += 1
            self._write_frame(request.stream, Opcode.ERROR, 0, _unprepared_body(p.query_id))
            proxy.stats.latency["local"].observe(proxy.loop_time() - self.read_at)

    def _start_flight(self, request: Request, p: Merge, hop: bool) -> Flight | None:
        request.check()
        proxy = self._proxy
        flights = proxy.flights
        pool = self._pool
        assert pool is not None
        statement = p.statement
        partition = partition_of(request, statement)
        peers = proxy.peers
        owner = None
        if peers is not None and partition is not None and not hop:
            owner = peers.ring.choose(murmur3_token(partition))
            if owner is not None and not peers.reachable(owner):
                owner = None
        if owner is not None:
            assert peers is not None and statement is not None  # partitions need statements
            flight = Flight(flights, p.key, peers.pool(self.role, statement.keyspace), owner,
                            request.opcode, request.flags, request.body, statement, p.table,
                            partition)
            flight.hop = True
            flight.fallback = pool
        else:
            node, shard = proxy.upstream.route(partition)
            flight = Flight(flights, p.key, pool, node, request.opcode, request.flags,
                            request.body, statement, p.table, partition, shard)
        if flights.start(flight, self, request.stream):
            self._flights.add(flight)
            flight.starter = self
            self._held += len(flight.body)
            self._accepted()
            if peers is not None:
                if owner is not None:
                    proxy.stats.ring_forwarded += 1
                flights.ring_moved(flight, owner.name if owner is not None else peers.ring.me)
            return flight
        self._write_error(request.stream, ErrorCode.OVERLOADED,
                          "the sidecar has too many reads in flight")
        return None

    def _on_forget(self, stream: int, body: bytes) -> None:
        """A ring member's write completed: forget here what it made stale."""
        forget = read_forget(body)
        proxy = self._proxy
        proxy.stats.local += 1
        if forget is None:
            self._write_error(stream, ErrorCode.INVALID, "malformed coalesce-forget payload")
            return
        info, keyspace, partition, avoid = forget
        proxy.flights.freshness.written_by(info, keyspace, partition)
        if avoid and proxy.peers is not None:
            proxy.peers.avoid(avoid)
        self._write_frame(stream, Opcode.RESULT, 0, _VOID)

    def _forward(self, request: Request, p: Forward) -> None:
        request.check()
        proxy = self._proxy
        proxy.stats.forwarded += 1
        pool = self._pool
        assert pool is not None
        forward = _Forward(self, request.stream, request, p, pool,
                           partition_of(request, p.statement))
        self._held += len(request.body)
        self._accepted()
        forward.start()

    async def _use(
        self, stream: int, keyspace: str, previous: asyncio.Task[None] | None
    ) -> None:
        """Switch to the pool of (role, `keyspace`) once Scylla has accepted the keyspace.

        USEs take effect, and are answered, in the order they were read: a pipelined
        second USE whose pool is already open waits for the first.
        """
        upstream = self._proxy.upstream
        read_at = self.read_at
        pool: Pool | None = None
        failure: UpstreamError | None = None
        try:
            try:
                pool = upstream.pool(self.role, keyspace)
                await pool.acquire()
            except UpstreamError as exc:
                failure = exc
            if previous is not None:
                await asyncio.wait([previous])
        except BaseException:
            if pool is not None:
                upstream.release(pool)
            raise
        finally:
            self._answered(1)
            stats = self._proxy.stats
            stats.latency["local"].observe(self._proxy.loop_time() - read_at)
        if failure is not None:
            if pool is not None:
                upstream.release(pool)
            self._write_failure(stream, failure)
            return
        assert pool is not None
        if self._closed:
            upstream.release(pool)
            return
        old, self._pool = self._pool, pool
        self.keyspace = keyspace
        for fast in self._fast.values():
            fast.clear()
        if old is not None:
            upstream.release(old)
        self._write_frame(stream, Opcode.RESULT, 0, ResultSetKeyspace(keyspace).encode())

    # -- connection setup ------------------------------------------------------------------

    def _on_options(self, stream: int, flags: int, body: bytes) -> None:
        if self._state == _REFUSED:
            self._unexpected(stream, Opcode.OPTIONS)
            return
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
        self._decoder.max_body = self._max_frame
        self.role = role
        self._pool = self._proxy.upstream.pool(role, None)
        self._state = _READY
        config = self._proxy.config
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if config.idle_timeout is not None:
            self._timer = asyncio.get_running_loop().call_later(
                config.idle_timeout, self._check_timers
            )

    def _on_register(self, stream: int, flags: int, body: bytes) -> None:
        self.events = frozenset(Register.decode(body).event_types)
        if self.events:
            self._proxy.listeners.add(self)
        self._proxy.stats.local += 1
        self._write_frame(stream, Opcode.READY, 0, b"")

    # -- writing ------------------------------------------------------------------------------

    def _write_frame(self, stream: int, opcode: int, flags: int, body: bytes) -> None:
        out = self._out
        if out is None or self._closed:
            return
        if self._write_paused and opcode != _ERROR and self._over_hard_limit():
            opcode, flags, body = Opcode.ERROR, 0, Error(ErrorCode.OVERLOADED,
                                                        _NOT_READING).encode()
        if self._lz4 and body:
            body = compress_body(body)
            flags |= COMPRESSION
        else:
            flags &= ~COMPRESSION
        out.put(_HEADER.pack(_RESPONSE_V4, flags, stream, opcode, len(body)) + body)

    def _over_hard_limit(self) -> bool:
        """Unsent bytes past 4x ``max_client_buffer``: the client reads nothing, and the
        answers to what it sent before it stopped would otherwise pile up."""
        transport = self._transport
        return (transport is not None
                and transport.get_write_buffer_size() > 4 * self._proxy.config.max_client_buffer)

    def _write_failure(self, stream: int, error: UpstreamError) -> None:
        if isinstance(error, UpstreamRefused):
            self._write_frame(stream, Opcode.ERROR, 0, error.body)  # Scylla's own words
        else:
            self._write_error(stream, error.code, str(error))

    def _write_error(self, stream: int, code: int, message: str) -> None:
        self._write_frame(stream, Opcode.ERROR, 0, Error(code, message).encode())

    def _fatal(self, stream: int, message: str) -> None:
        """PROTOCOL_ERROR, then close: the byte stream can no longer be trusted."""
        self._proxy.stats.protocol_errors += 1
        self._write_error(stream, ErrorCode.PROTOCOL_ERROR, message)
        self.close()

    def _reject_version(self, version: int, stream: int) -> None:
        if self._out is not None and not self._closed:
            self._out.put(unsupported_version_reply(version, stream))
        self.close()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task


def _hop_marked(frames: list[Frame | int], src: bytes) -> int:
    """How many of the first `INGEST_BUDGET` frames (folded in `src`) carry a ring
    member's marker (a hop read or a forget) before the first that does not."""
    count = 0
    for item in frames:
        frame = FrameDecoder.frame_at(src, item) if isinstance(item, int) else item
        if (count == INGEST_BUDGET or not frame[2] & _CUSTOM_PAYLOAD or frame[4] not in _FAST
                or not (frame[5].startswith(_HOP) or frame[5].startswith(FORGET_PREFIX))):
            break
        count += 1
    return count


def _unprepared_body(query_id: bytes) -> bytes:
    """ERROR UNPREPARED for `query_id`: the driver prepares it again and retries."""
    return Error(ErrorCode.UNPREPARED, "Prepared statement unknown to the sidecar",
                 UnpreparedDetails(query_id)).encode()


_VOID: Final = (1).to_bytes(4, "big")  # RESULT Void

_PLANNED: Final = frozenset(int(op) for op in (Opcode.QUERY, Opcode.EXECUTE, Opcode.PREPARE,
                                                Opcode.BATCH))

_Handler = Callable[[ClientConnection, int, int, bytes], None]

_SETUP_HANDLERS: Final[dict[int, _Handler]] = {
    Opcode.OPTIONS: ClientConnection._on_options,
    Opcode.STARTUP: ClientConnection._on_startup,
    Opcode.AUTH_RESPONSE: ClientConnection._on_auth_response,
}

_READY_HANDLERS: Final[dict[int, _Handler]] = {
    Opcode.OPTIONS: ClientConnection._on_options,
    Opcode.REGISTER: ClientConnection._on_register,
}
