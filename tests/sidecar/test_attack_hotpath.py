"""Attack round 6: the sidecar's hot path as reordered (answers written before the
table's bookkeeping, flights sent before they are entered, run bounds computed once per
run, the one-frame dispatch, the decoder's `buffered` attribute, the request extras'
fast path), from a hostile client and a hostile upstream.

Every test ends by checking that nothing is left behind: no key in flight, no upstream
call running, no answer kept, an empty read-after-write index, and no request counted
as waiting, on the proxy or on any client connection (`_clean`).
"""

from __future__ import annotations

import asyncio
import collections
import random
from typing import Any

import pytest

from coalesce.cql import (
    COMPRESSION,
    CUSTOM_PAYLOAD,
    TRACING,
    WARNING,
    Consistency,
    CQLProtocolError,
    Error,
    ErrorCode,
    Execute,
    Frame,
    FrameDecoder,
    Opcode,
    Query,
    QueryParameters,
    encode_frame,
    split_extras,
)
from coalesce.cql._wire import w_bytes_map
from coalesce.sidecar.client import ClientConnection

from .conftest import BOUND, KS_KV, LoopStack, MakeStack, eventually
from .cqlclient import RawClient, rows_of

pytestmark = pytest.mark.timeout(60)

SETUP = KS_KV
ONE = [[b"one"]]


def _int(value: int) -> bytes:
    return value.to_bytes(4, "big", signed=True)


def _execute(read: bytes, stream: int, key: int = 1, *, timestamp: int | None = None,
             **frame: Any) -> bytes:
    params = QueryParameters(Consistency.ONE, [_int(key)],
                             timestamp=1000 + stream if timestamp is None else timestamp)
    return encode_frame(Opcode.EXECUTE, Execute(read, params).encode(), stream=stream, **frame)


def _query(text: str, stream: int, **frame: Any) -> bytes:
    body = Query(text, QueryParameters(Consistency.ONE, timestamp=1000 + stream)).encode()
    return encode_frame(Opcode.QUERY, body, stream=stream, **frame)


class CountingClient(RawClient):
    """A `RawClient` that also counts every answer per stream (answered exactly once?)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.answers: collections.Counter[int] = collections.Counter()
        super().__init__(reader, writer)

    def _received(self, frame: Frame) -> None:
        if frame.stream >= 0:
            self.answers[frame.stream] += 1
        super()._received(frame)

    def burst(self, frames: list[tuple[int, bytes]]) -> list[asyncio.Future[Frame]]:
        """Expect every stream of `frames`, then write them in one TCP write."""
        waiters = [self.expect(stream) for stream, _ in frames]
        self.writer.write(b"".join(frame for _, frame in frames))
        return waiters


async def _connect(stack: LoopStack, **kwargs: Any) -> CountingClient:
    client = await CountingClient.connect("127.0.0.1", stack.sidecar.port, **kwargs)
    assert isinstance(client, CountingClient)
    client.answers.clear()  # the handshake's
    return client


async def _ready(loop_stack: MakeStack, **config: Any) -> tuple[LoopStack, CountingClient,
                                                                   bytes]:
    stack = await loop_stack(**config)
    admin = await _connect(stack)
    for statement in SETUP:
        await admin.query(statement)
    read = (await admin.prepare("SELECT v FROM ks.kv WHERE k = ?")).query_id
    return stack, admin, read


def _server_side(stack: LoopStack, client: RawClient) -> ClientConnection:
    port = client.writer.get_extra_info("sockname")[1]
    return next(c for c in stack.sidecar._clients
                if c._transport is not None
                and c._transport.get_extra_info("peername")[1] == port)


def _leftovers(stack: LoopStack) -> list[str]:
    proxy = stack.sidecar._require_proxy()
    flights = proxy.flights
    found = []
    if len(flights):
        found.append(f"{len(flights)} keys in flight")
    if flights.running:
        found.append(f"{flights.running} upstream calls running")
    if flights.settled:
        found.append(f"{flights.settled} answers kept")
    if len(flights.freshness):
        found.append(f"{len(flights.freshness)} reads in the freshness index")
    if proxy.in_flight:
        found.append(f"proxy.in_flight {proxy.in_flight}")
    for conn in stack.sidecar._clients:
        if conn._pending or conn._held or conn._flights:
            found.append(f"a client with _pending {conn._pending}, _held {conn._held}, "
                         f"{len(conn._flights)} flights")
    return found


async def _clean(stack: LoopStack) -> None:
    """Nothing in flight, nothing counted as waiting, anywhere (see the module doc)."""
    try:
        await eventually(lambda: not _leftovers(stack))
    except TimeoutError:
        pytest.fail(f"left behind: {_leftovers(stack)}")


def _code(result: Frame | BaseException) -> int | None:
    """None for rows, the error code of an ERROR frame, -1 for a lost connection."""
    if isinstance(result, BaseException):
        return -1
    if result.opcode == Opcode.ERROR:
        return Error.decode(result.body).code
    return None


async def _settle(waiters: list[asyncio.Future[Frame]]) -> list[Frame | BaseException]:
    async with asyncio.timeout(BOUND):
        return list(await asyncio.gather(*waiters, return_exceptions=True))


# -- an exception or a close while a flight's answers are written -------------------------


class _FailingOutbox:
    """Stands in for a connection's `Outbox`: every write raises (a bug of ours, or a
    transport in a state it should never be in)."""

    def put(self, data: bytes | bytearray) -> None:
        raise RuntimeError("write failed")

    def flush(self) -> None:
        pass


@pytest.mark.parametrize("outcome", ["answer", "upstream lost"])
async def test_a_waiter_whose_write_raises_costs_the_other_waiters_nothing(
    loop_stack: MakeStack, outcome: str,
) -> None:
    # A starts the flight (so it is answered first), B and C join it. Writing A's answer
    # (or its error) raises: B and C must still get theirs, and no request may stay
    # counted.
    stack, admin, read = await _ready(loop_stack)
    a, b, c = await _connect(stack), await _connect(stack), await _connect(stack)
    hold = stack.emulator.hold_reads()
    first = a.burst([(1, _execute(read, 1))])
    await eventually(lambda: len(hold) == 1)
    others = b.burst([(s, _execute(read, s)) for s in (1, 2, 3)])
    others += c.burst([(1, _execute(read, 1))])
    await eventually(lambda: stack.sidecar.in_flight == 5)
    _server_side(stack, a)._out = _FailingOutbox()  # type: ignore[assignment]
    if outcome == "answer":
        hold.release()
        assert [rows_of(r) for r in await _settle(others)] == [ONE] * 4  # type: ignore[arg-type]
    else:
        stack.emulator.stop()
        codes = [_code(r) for r in await _settle(others)]
        assert all(code not in (None, -1) for code in codes), codes  # errors, on each
    # A's answer could not be written: A must hear something (an error, or its
    # connection closed), not wait forever with its request counted.
    a_result = await _settle(first)
    assert _code(a_result[0]) in (-1, ErrorCode.SERVER_ERROR), a_result
    await _clean(stack)
    for client in (admin, b, c):
        await client.close()
    a.writer.transport.abort()


async def test_a_waiter_closed_while_the_answers_are_written_leaves_nothing(
    loop_stack: MakeStack,
) -> None:
    # B is answered before A; writing B's answer drops A's connection (as a transport
    # error would): A is answered while closed, then leaves, and nothing stays counted.
    stack, admin, read = await _ready(loop_stack)
    starter, b, a = await _connect(stack), await _connect(stack), await _connect(stack)
    hold = stack.emulator.hold_reads()
    first = starter.burst([(1, _execute(read, 1))])
    await eventually(lambda: len(hold) == 1)
    b_waiters = b.burst([(s, _execute(read, s)) for s in range(1, 11)])
    await eventually(lambda: stack.sidecar.in_flight == 11)
    a_waiters = a.burst([(s, _execute(read, s)) for s in range(1, 11)])
    await eventually(lambda: stack.sidecar.in_flight == 21)
    a_conn, b_conn = _server_side(stack, a), _server_side(stack, b)
    out = b_conn._out
    assert out is not None

    class _Dropping:
        def put(self, data: bytes | bytearray) -> None:
            a_conn.abort()
            assert out is not None
            out.put(data)

        def flush(self) -> None:
            assert out is not None
            out.flush()

    b_conn._out = _Dropping()  # type: ignore[assignment]
    hold.release()
    assert rows_of((await _settle(first))[0]) == ONE
    assert [rows_of(r) for r in await _settle(b_waiters)] == [ONE] * 10  # type: ignore[arg-type]
    await asyncio.wait_for(a.closed.wait(), BOUND)
    assert all(_code(r) in (None, -1) for r in await _settle(a_waiters))
    await _clean(stack)
    for client in (admin, starter, b):
        await client.close()


# -- runs across the bounds, counted exactly ------------------------------------------------


@pytest.mark.parametrize(("max_waiters", "before", "burst"), [
    (5, 0, 8), (5, 0, 5), (5, 0, 6), (5, 4, 3), (5, 5, 2), (5, 1, 4), (1, 0, 3), (2, 1, 3),
])
async def test_a_run_crossing_max_waiters_refuses_exactly_the_excess(
    loop_stack: MakeStack, max_waiters: int, before: int, burst: int,
) -> None:
    stack, admin, read = await _ready(loop_stack, max_waiters=max_waiters)
    other, client = await _connect(stack), await _connect(stack)
    hold = stack.emulator.hold_reads()
    early = other.burst([(s, _execute(read, s)) for s in range(1, before + 1)])
    if before:
        await eventually(lambda: stack.sidecar.in_flight == before)
    waiters = client.burst([(s, _execute(read, s)) for s in range(1, burst + 1)])
    admitted = min(burst, max_waiters - before)
    await eventually(lambda: stack.sidecar.in_flight == before + admitted)
    await eventually(lambda: sum(client.answers.values()) == burst - admitted)
    hold.release()
    codes = [_code(r) for r in await _settle(early + waiters)]
    assert codes == [None] * (before + admitted) + [ErrorCode.OVERLOADED] * (burst - admitted)
    assert set(client.answers.values()) == {1} and len(client.answers) == burst
    assert stack.emulator.statements["select"] >= 1
    await _clean(stack)
    for c in (admin, other, client):
        await c.close()


@pytest.mark.parametrize(("max_requests", "max_waiters", "burst"), [
    (8, None, 8), (8, None, 9), (8, None, 17), (8, 8, 9), (8, 7, 9), (8, 9, 9), (1, None, 4),
])
async def test_a_run_crossing_max_client_requests_waits_and_is_answered_once(
    loop_stack: MakeStack, max_requests: int, max_waiters: int | None, burst: int,
) -> None:
    # Past max_client_requests nothing is refused: the rest waits (the client is not
    # read) and is dispatched when answers make room. Past max_waiters it is refused.
    stack, admin, read = await _ready(loop_stack, max_client_requests=max_requests,
                                      max_waiters=max_waiters)
    client = await _connect(stack)
    hold = stack.emulator.hold_reads()
    waiters = client.burst([(s, _execute(read, s)) for s in range(1, burst + 1)])
    # Below max_client_requests, past max_waiters: every later one is refused at once.
    # At max_client_requests first: the rest waits, and is answered after.
    waiters_bound = max_waiters is not None and max_waiters < max_requests
    cap = min(max_requests, burst) if not waiters_bound else max_waiters
    refused = burst - cap if waiters_bound else 0
    await eventually(lambda: stack.sidecar.in_flight == cap)
    await eventually(lambda: sum(client.answers.values()) == refused)
    hold.close()
    hold.release()
    codes = [_code(r) for r in await _settle(waiters)]
    assert codes == [None] * (burst - refused) + [ErrorCode.OVERLOADED] * refused
    assert set(client.answers.values()) == {1} and len(client.answers) == burst
    await _clean(stack)
    await admin.close()
    await client.close()


# -- answered runs: read before the answer came, dispatched after -----------------------


@pytest.mark.parametrize("max_requests", [2, 3, 4, 12, 64])
async def test_an_answered_run_split_by_max_client_requests_is_answered_once_from_one_read(
    loop_stack: MakeStack, max_requests: int,
) -> None:
    # 10 identical reads wait in the backlog (a flooder holds the ingest budget) while
    # their flight is answered; they are answered from its kept answer, in runs as long
    # as max_client_requests allows beside the one other read this client has waiting.
    stack, admin, read = await _ready(loop_stack, max_client_requests=max_requests)
    client = await _connect(stack, lz4=max_requests % 2 == 1)
    flooder = await _connect(stack)
    proxy = stack.sidecar._require_proxy()
    conn = _server_side(stack, client)
    hold = stack.emulator.hold_reads()
    first = client.burst([(1, _execute(read, 1))])[0]
    await eventually(lambda: len(hold) == 1)
    selects = stack.emulator.statements["select"]
    flooder.writer.write(encode_frame(Opcode.OPTIONS, b"", stream=0) * 20_000)
    await eventually(lambda: proxy.backlogged)
    frames = [(2, _execute(read, 2, key=3))]
    frames += [(s, _execute(read, s, compress=client.lz4 and s % 3 == 0))
               for s in range(3, 13)]
    other, *waiters = client.burst(frames)
    await eventually(lambda: sum(len(f) for _, _, f, _ in conn._backlog) == 11
                     or (len(hold) == 2 and sum(len(f) for _, _, f, _ in conn._backlog) == 10))
    out = conn._out
    assert out is not None
    sizes: list[int] = []

    class _Recording:  # how many answers each write of the connection carries
        def put(self, data: bytes | bytearray) -> None:
            sizes.append(len(FrameDecoder().feed(bytes(data))))
            assert out is not None
            out.put(data)

        def flush(self) -> None:
            assert out is not None
            out.flush()

    conn._out = _Recording()  # type: ignore[assignment]
    hold._pending.pop(0)()  # the flight's answer, not the other read's
    assert rows_of((await _settle([first]))[0]) == ONE
    results = await _settle(waiters)
    # An answered run is as long as max_client_requests allows beside the read of k = 3.
    assert sum(sizes) == 11 and max(sizes) == min(10, max_requests - 1), sizes
    assert [rows_of(r) for r in results] == [ONE] * 10  # type: ignore[arg-type]
    # Every one of the ten from the one read: only the other key's read went upstream.
    await eventually(lambda: len(hold) == 1)
    assert stack.emulator.statements["select"] - selects == 1
    hold.release()
    assert rows_of((await _settle([other]))[0]) == []
    assert set(client.answers.values()) == {1} and len(client.answers) == 12
    await eventually(lambda: not proxy.backlogged)
    await _clean(stack)
    for c in (admin, client, flooder):
        await c.close()


async def test_a_client_gone_with_an_answered_run_in_its_backlog_leaves_nothing(
    loop_stack: MakeStack,
) -> None:
    stack, admin, read = await _ready(loop_stack)
    client, flooder = await _connect(stack), await _connect(stack)
    proxy = stack.sidecar._require_proxy()
    conn = _server_side(stack, client)
    hold = stack.emulator.hold_reads()
    client.burst([(1, _execute(read, 1))])
    await eventually(lambda: len(hold) == 1)
    flooder.writer.write(encode_frame(Opcode.OPTIONS, b"", stream=0) * 20_000)
    await eventually(lambda: proxy.backlogged)
    client.burst([(s, _execute(read, s)) for s in range(2, 200)])
    await eventually(lambda: sum(len(f) for _, _, f, _ in conn._backlog) >= 150)
    hold.close()
    hold.release()  # the flight's answer: kept for the backlog
    conn.abort()  # and the client is gone before its backlog is dispatched
    await asyncio.wait_for(client.closed.wait(), BOUND)
    await eventually(lambda: not proxy.backlogged)
    await _clean(stack)
    await admin.close()
    await flooder.close()


# -- read-after-write while answers are being delivered ---------------------------------


async def test_no_read_sent_after_a_write_completed_sees_an_older_value(
    loop_stack: MakeStack,
) -> None:
    # Herds of readers (several connections, bursts of identical reads) keep reading k =
    # 1 while a writer bumps its value; a flooder keeps backlogs (and kept answers)
    # coming. A read sent after the write of value n was acknowledged must see >= n.
    stack, admin, read = await _ready(loop_stack, emulator={"read_latency": 0.002})
    write = (await admin.prepare("UPDATE ks.kv SET v = ? WHERE k = ?")).query_id
    await admin.query("UPDATE ks.kv SET v = '0' WHERE k = 1")
    readers = [await _connect(stack) for _ in range(4)]
    flooder = await _connect(stack)
    acknowledged = 0
    stop = asyncio.Event()
    violations: list[tuple[int, int]] = []
    streams = collections.Counter[int]()

    async def writer() -> None:
        nonlocal acknowledged
        for n in range(1, 151):
            params = QueryParameters(Consistency.ONE, [str(n).encode(), _int(1)])
            result = await admin.request(Opcode.EXECUTE, Execute(write, params).encode())
            assert result.opcode == Opcode.RESULT, result
            acknowledged = n
        stop.set()

    async def reader(client: CountingClient) -> None:
        while not stop.is_set():
            floor = acknowledged
            base = streams[id(client)] % 20000 + 1
            streams[id(client)] += 8
            waiters = client.burst([(s, _execute(read, s)) for s in range(base, base + 8)])
            for result in await _settle(waiters):
                assert isinstance(result, Frame), result
                value = int(rows_of(result)[0][0] or b"-1")
                if value < floor:
                    violations.append((value, floor))

    async def flood() -> None:
        while not stop.is_set():
            await flooder.request(Opcode.OPTIONS, b"")
            flooder.writer.write(encode_frame(Opcode.OPTIONS, b"", stream=0) * 600)

    async with asyncio.timeout(15):
        await asyncio.gather(writer(), flood(), *(reader(c) for c in readers))
    assert not violations, violations[:5]
    await eventually(lambda: not stack.sidecar._require_proxy().backlogged)
    await _clean(stack)
    for c in (admin, flooder, *readers):
        await c.close()


async def test_a_write_between_a_flight_and_its_answer_starts_the_next_read_fresh(
    loop_stack: MakeStack,
) -> None:
    stack, admin, read = await _ready(loop_stack)
    reader, late = await _connect(stack), await _connect(stack)
    hold = stack.emulator.hold_reads()
    old = reader.burst([(s, _execute(read, s)) for s in range(1, 6)])
    await eventually(lambda: len(hold) == 1)
    await admin.query("UPDATE ks.kv SET v = 'two' WHERE k = 1")
    new = late.burst([(s, _execute(read, s)) for s in range(1, 6)])
    await eventually(lambda: len(hold) == 2)  # its own flight: the first was forgotten
    hold.release()
    assert [rows_of(r) for r in await _settle(old)] == [ONE] * 5  # type: ignore[arg-type]
    assert [rows_of(r) for r in await _settle(new)] == [[[b"two"]]] * 5  # type: ignore[arg-type]
    await _clean(stack)
    for c in (admin, reader, late):
        await c.close()


# -- partial frames: `buffered` and the PROTOCOL_ERROR's stream -------------------------


def test_decoder_buffered_is_what_it_holds_after_every_feed() -> None:
    rng = random.Random(7)
    body = Query("SELECT v FROM ks.kv WHERE k = 1", QueryParameters(Consistency.ONE)).encode()
    stream = b"".join(encode_frame(Opcode.QUERY, body * rng.randint(1, 40), stream=s)
                      for s in range(50))
    for _ in range(200):
        decoder = FrameDecoder()
        offset = got = 0
        while offset < len(stream):
            size = rng.choice([1, 2, 8, 9, 10, 64, 500, 4000])
            chunk = stream[offset:offset + size]
            got += len(decoder.feed(chunk if rng.random() < 0.5 else bytearray(chunk)))
            offset += size
            assert decoder.buffered == len(decoder._buf)
            seen = min(offset, len(stream))
            assert decoder.buffered == seen - _consumed(stream, seen)
        assert got == 50 and decoder.buffered == 0
    decoder = FrameDecoder()
    options = encode_frame(Opcode.OPTIONS, b"", stream=1)
    assert decoder.feed(options[:4]) == [] and decoder.buffered == 4
    with pytest.raises(CQLProtocolError):
        decoder.feed(options[4:] + b"\x04\x00\x00\x01\x7f\x00\x00\x00\x00")
    assert decoder.buffered == 0


def _consumed(stream: bytes, offset: int) -> int:
    """How many bytes of `stream[:offset]` are whole frames."""
    at = 0
    while at + 9 <= offset:
        end = at + 9 + int.from_bytes(stream[at + 5:at + 9], "big")
        if end > offset:
            break
        at = end
    return at


async def test_a_bad_header_is_answered_on_its_stream_only_at_a_frame_boundary(
    loop_stack: MakeStack,
) -> None:
    # A good request (stream 1) then a frame with an unknown opcode (stream 7), split
    # in two reads at every byte: the PROTOCOL_ERROR names stream 7 exactly when the
    # bad header began a read (at the frame boundary, or with the good frame in one
    # read), else stream 0 (its header is not known to start where the read did).
    stack = await loop_stack()
    good = _query("SELECT key FROM system.local", 1)
    bad = encode_frame(Opcode.OPTIONS, b"", stream=7)
    bad = bad[:4] + b"\x7f" + bad[5:]
    named = []
    for split in range(len(good + bad) + 1):
        stream = await _split_read(stack, good, bad, split)
        assert stream == (7 if split in (0, len(good), len(good + bad)) else 0), split
        named.append(stream)
    assert set(named) == {0, 7}
    await eventually(lambda: stack.sidecar._require_proxy().partial_bytes == 0)
    await _clean(stack)


async def _split_read(stack: LoopStack, good: bytes, bad: bytes, split: int) -> int:
    """Send `good + bad` in two reads, split at `split`; the stream of the
    PROTOCOL_ERROR that closes the connection."""
    data = good + bad
    client = await _connect(stack)
    conn = _server_side(stack, client)
    answers = [client.expect(1), client.expect(7), client.expect(0)]
    if 0 < split < len(data):
        client.writer.write(data[:split])
        if split == len(good):
            assert rows_of(await answers[0]) is not None
        else:  # the sidecar holds the unfinished frame before the rest comes
            fed = split if split < len(good) else split - len(good)
            await eventually(lambda: conn._decoder.buffered == fed and conn._partial == fed)
        data = data[split:]
    client.writer.write(data)
    await asyncio.wait_for(client.closed.wait(), BOUND)
    errors = [a.result() for a in answers[1:] if a.done() and not a.exception()]
    assert len(errors) == 1, (split, errors)
    error = errors[0]
    assert error.opcode == Opcode.ERROR
    assert Error.decode(error.body).code == ErrorCode.PROTOCOL_ERROR
    for answer in answers:
        if not answer.done():
            answer.cancel()
        elif not answer.cancelled():
            answer.exception()
    await client.close()
    await eventually(lambda: conn._lost)
    return error.stream


# -- traced and warning-flagged requests, to the emulator ---------------------------------


def test_a_requests_tracing_and_warning_flags_add_no_bytes_but_a_payload_does() -> None:
    body = Query("SELECT 1", QueryParameters(Consistency.ONE)).encode()
    payload = w_bytes_map({"k": b"v"})
    for flags in (TRACING, WARNING, TRACING | WARNING, TRACING | WARNING | COMPRESSION):
        extras, rest = split_extras(flags, body, response=False)
        assert rest is body and extras.custom_payload is None
    for flags in (CUSTOM_PAYLOAD, CUSTOM_PAYLOAD | TRACING, CUSTOM_PAYLOAD | WARNING | TRACING):
        extras, rest = split_extras(flags, payload + body, response=False)
        assert rest == body and extras.custom_payload == {"k": b"v"}
    with pytest.raises(CQLProtocolError):
        split_extras(CUSTOM_PAYLOAD | TRACING, b"\x00\x05", response=False)


async def test_traced_and_warning_flagged_requests_reach_the_emulator_intact(
    loop_stack: MakeStack,
) -> None:
    stack, admin, read = await _ready(loop_stack)
    client = await _connect(stack)
    payload = w_bytes_map({"x": b"y"})
    hold = stack.emulator.hold_reads()
    frames: list[tuple[int, bytes]] = []
    frames += [(s, _execute(read, s, flags=WARNING)) for s in range(1, 6)]  # a run
    frames += [(s, _execute(read, s, flags=TRACING)) for s in range(6, 9)]  # forwarded
    frames += [(s, _execute(read, s, flags=TRACING | WARNING)) for s in range(9, 11)]
    frames += [(11, encode_frame(Opcode.QUERY, payload + Query(
        "SELECT v FROM ks.kv WHERE k = 1", QueryParameters(Consistency.ONE)).encode(),
        stream=11, flags=CUSTOM_PAYLOAD | TRACING))]
    frames += [(12, _query("SELECT v FROM ks.kv WHERE k = 1", 12, flags=TRACING | WARNING))]
    selects = stack.emulator.statements["select"]
    waiters = client.burst(frames)
    await eventually(lambda: len(hold) == 1 + 3 + 2 + 1 + 1)
    hold.release()
    assert [rows_of(r) for r in await _settle(waiters)] == [ONE] * 12  # type: ignore[arg-type]
    assert stack.emulator.statements["select"] - selects == 8
    await _clean(stack)
    await admin.close()
    await client.close()


# -- compressed frames in runs -------------------------------------------------------------


async def test_compressed_and_plain_identical_reads_from_an_lz4_client_share_one_read(
    loop_stack: MakeStack,
) -> None:
    stack, admin, read = await _ready(loop_stack)
    client = await _connect(stack, lz4=True)
    plain = await _connect(stack)
    hold = stack.emulator.hold_reads()
    rng = random.Random(3)
    frames = [(s, _execute(read, s, compress=rng.random() < 0.5)) for s in range(1, 201)]
    waiters = client.burst(frames) + plain.burst([(s, _execute(read, s)) for s in range(1, 51)])
    await eventually(lambda: stack.sidecar.in_flight == 250)
    assert len(hold) == 1
    hold.release()
    assert [rows_of(r) for r in await _settle(waiters)] == [ONE] * 250  # type: ignore[arg-type]
    assert set(client.answers.values()) == {1} and len(client.answers) == 200
    await _clean(stack)
    for c in (admin, client, plain):
        await c.close()


# -- the upstream dying mid-herd --------------------------------------------------------------


@pytest.mark.parametrize("max_inflight", [None, 1])
async def test_the_upstream_dying_mid_herd_fails_every_request_exactly_once(
    loop_stack: MakeStack, max_inflight: int | None,
) -> None:
    stack, admin, read = await _ready(loop_stack, max_inflight=max_inflight,
                                      max_queued=16)
    clients = [await _connect(stack) for _ in range(4)]
    stack.emulator.hold_reads()
    waiters: list[asyncio.Future[Frame]] = []
    for i, client in enumerate(clients):
        # Two keys per client: with max_inflight 1 the second flight waits in the queue.
        frames = [(s, _execute(read, s, key=1 + (s % 2) * (i + 1))) for s in range(1, 301)]
        waiters += client.burst(frames)
    await eventually(lambda: stack.sidecar.in_flight == 1200)
    stack.emulator.stop()
    results = await _settle(waiters)
    assert all(_code(r) not in (None, -1) for r in results), [
        r for r in results if _code(r) in (None, -1)][:3]
    for client in clients:
        assert set(client.answers.values()) == {1} and len(client.answers) == 300
    await _clean(stack)
    for c in clients:
        await c.close()
    admin.writer.transport.abort()


# -- hostile bodies on the fast-join key's path -------------------------------------------


@pytest.mark.parametrize("length", [-1, -5, -1000, -(2**31)])
async def test_a_query_with_a_negative_string_length_is_a_protocol_error(
    loop_stack: MakeStack, length: int,
) -> None:
    stack = await loop_stack()
    client = await _connect(stack)
    body = _int(length) + b"\x00\x01\x20" + b"\x00" * 13
    errors = stack.sidecar.stats.protocol_errors
    result = await client.request(Opcode.QUERY, body)
    assert _code(result) == ErrorCode.PROTOCOL_ERROR, Error.decode(result.body)
    assert stack.sidecar.stats.protocol_errors == errors + 1
    await asyncio.wait_for(client.closed.wait(), BOUND)
    await _clean(stack)
