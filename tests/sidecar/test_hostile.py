"""A hostile client, frame by frame: whatever it sends costs only itself.

Forged and reused stream ids, lying compressed sizes, handshakes out of order, login
floods, a client hanging up mid-answer, and more requests in flight than one upstream
connection has stream ids.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Callable
from typing import Any

import lz4.block
import pytest

from coalesce.cql import (
    COMPRESSION,
    AuthResponse,
    Error,
    ErrorCode,
    Frame,
    FrameDecoder,
    Opcode,
    Query,
    QueryParameters,
    Startup,
    compress_body,
    decompress_body,
    encode_frame,
)
from coalesce.sidecar import connection

from .conftest import BOUND, LoopStack, eventually
from .cqlclient import RawClient, result_of, rows_of

pytestmark = pytest.mark.timeout(90)

KEYSPACE = (
    "CREATE KEYSPACE ks WITH replication = {'class': 'SimpleStrategy', 'replication_factor': 1}"
)
READ = "SELECT k, v FROM ks.kv WHERE k = 1"
ONE_ROW = [[b"\x00\x00\x00\x01", b"one"]]
STARTUP = Startup({"CQL_VERSION": "3.0.0"}).encode()
STARTUP_LZ4 = Startup({"CQL_VERSION": "3.0.0", "COMPRESSION": "lz4"}).encode()
HEADER = struct.Struct(">BBhBi")


async def _setup(loop_stack: Callable[..., Any], **config: Any) -> tuple[LoopStack, RawClient]:
    emulator = config.pop("emulator", {})
    stack: LoopStack = await loop_stack(emulator=emulator, **config)
    admin = await RawClient.connect("127.0.0.1", stack.sidecar.port)
    await admin.query(KEYSPACE)
    await admin.query("CREATE TABLE ks.kv (k int PRIMARY KEY, v text)")
    await admin.query("INSERT INTO ks.kv (k, v) VALUES (1, 'one')")
    return stack, admin


class Wire:
    """A connection that sends raw bytes and collects every frame it receives, in order."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.frames: list[Frame] = []
        self.closed = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._read())

    @classmethod
    async def open(cls, port: int, *, startup: bytes | None = STARTUP) -> Wire:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        wire = cls(reader, writer)
        if startup is not None:
            wire.writer.write(encode_frame(Opcode.STARTUP, startup, stream=0))
            await wire.wait_for(1)
            assert wire.frames[0].opcode == Opcode.READY
        return wire

    async def _read(self) -> None:
        decoder = FrameDecoder(max_body=1 << 28)
        try:
            while data := await self.reader.read(1 << 20):
                for frame in decoder.feed(data):
                    if frame.flags & COMPRESSION:
                        frame = frame._replace(body=decompress_body(frame.body, max_size=1 << 28),
                                               flags=frame.flags & ~COMPRESSION)
                    self.frames.append(frame)
        except (ConnectionError, OSError):
            pass
        finally:
            self.closed.set()

    async def wait_for(self, count: int) -> None:
        await eventually(lambda: len(self.frames) >= count or self.closed.is_set())
        assert len(self.frames) >= count, f"closed after {len(self.frames)} frames"

    def query(self, text: str, *, stream: int) -> None:
        body = Query(text, QueryParameters(1)).encode()
        self.writer.write(encode_frame(Opcode.QUERY, body, stream=stream))

    def close(self) -> None:
        self.writer.close()
        self._task.cancel()


def _error(frame: Frame) -> Error:
    assert frame.opcode == Opcode.ERROR, frame
    return Error.decode(frame.body)


# -- stream ids -------------------------------------------------------------------------


async def test_a_stream_id_reused_while_in_flight_gets_both_answers_and_costs_no_one_else(
    loop_stack: Callable[..., Any],
) -> None:
    stack, admin = await _setup(loop_stack)
    hold = stack.emulator.hold_reads()
    others = admin.send_query(READ)
    await eventually(lambda: len(hold) == 1)
    wire = await Wire.open(stack.sidecar.port)
    wire.query(READ, stream=7)  # joins the admin's flight
    wire.query("SELECT k, v FROM ks.kv WHERE k = 2", stream=7)  # same stream, other read
    wire.query(READ, stream=7)
    await eventually(lambda: stack.sidecar.in_flight == 4)
    hold.release()
    await wire.wait_for(4)
    assert [f.stream for f in wire.frames[1:]] == [7, 7, 7]
    assert rows_of(await asyncio.wait_for(others, BOUND)) == ONE_ROW
    wire.close()
    await admin.close()


@pytest.mark.parametrize("stream", [-1, -2, -32768])
async def test_a_negative_stream_id_costs_only_its_sender(
    loop_stack: Callable[..., Any], stream: int,
) -> None:
    stack, admin = await _setup(loop_stack)
    hold = stack.emulator.hold_reads()
    others = [admin.send_query(READ) for _ in range(5)]
    await eventually(lambda: len(hold) == 1)
    wire = await Wire.open(stack.sidecar.port)
    wire.query(READ, stream=stream)
    wire.query("INSERT INTO ks.kv (k, v) VALUES (3, 'three')", stream=stream)
    await eventually(lambda: len(wire.frames) == 2 or wire.closed.is_set())
    hold.release()
    for frame in await asyncio.wait_for(asyncio.gather(*others), BOUND):
        assert rows_of(frame) == ONE_ROW
    await eventually(lambda: len(wire.frames) >= 3 or wire.closed.is_set())
    for frame in wire.frames[1:]:
        assert frame.stream == stream
    wire.close()
    await admin.close()


@pytest.mark.parametrize("opcode", [Opcode.ERROR, Opcode.READY, Opcode.AUTHENTICATE,
                                    Opcode.SUPPORTED, Opcode.RESULT, Opcode.EVENT,
                                    Opcode.AUTH_CHALLENGE, Opcode.AUTH_SUCCESS])
async def test_a_response_opcode_sent_as_a_request_is_refused_and_costs_no_one_else(
    loop_stack: Callable[..., Any], opcode: int,
) -> None:
    stack, admin = await _setup(loop_stack)
    hold = stack.emulator.hold_reads()
    others = [admin.send_query(READ) for _ in range(5)]
    await eventually(lambda: len(hold) == 1)
    wire = await Wire.open(stack.sidecar.port)
    wire.writer.write(encode_frame(opcode, b"\x00\x00\x00\x01", stream=9))
    await wire.wait_for(2)
    assert _error(wire.frames[1]).code == ErrorCode.PROTOCOL_ERROR
    hold.release()
    for frame in await asyncio.wait_for(asyncio.gather(*others), BOUND):
        assert rows_of(frame) == ONE_ROW
    wire.close()
    await admin.close()


# -- frames that lie -------------------------------------------------------------------


def _lying_lz4() -> dict[str, bytes]:
    body = Query(READ, QueryParameters(1)).encode()
    raw = lz4.block.compress(body, store_size=False)
    return {
        "declares more": struct.pack(">i", len(body) + 100) + raw,
        "declares less": struct.pack(">i", len(body) - 10) + raw,
        "declares negative": struct.pack(">i", -1) + raw,
        "declares 2 GiB": struct.pack(">i", 0x7FFFFFFF) + raw,
        "bomb past max_frame_size": compress_body(b"\x00" * (2 * 1024 * 1024)),
        "length only": struct.pack(">i", 10),
    }


@pytest.mark.parametrize("lie", sorted(_lying_lz4()))
async def test_a_compressed_frame_with_a_lying_size_closes_only_its_connection(
    loop_stack: Callable[..., Any], lie: str,
) -> None:
    stack, admin = await _setup(loop_stack, max_frame_size=1024 * 1024)
    hold = stack.emulator.hold_reads()
    others = [admin.send_query(READ) for _ in range(5)]
    await eventually(lambda: len(hold) == 1)
    wire = await Wire.open(stack.sidecar.port, startup=STARTUP_LZ4)
    wire.writer.write(encode_frame(Opcode.QUERY, _lying_lz4()[lie], stream=5,
                                   flags=COMPRESSION))
    await asyncio.wait_for(wire.closed.wait(), BOUND)
    assert _error(wire.frames[1]).code == ErrorCode.PROTOCOL_ERROR
    hold.release()
    for frame in await asyncio.wait_for(asyncio.gather(*others), BOUND):
        assert rows_of(frame) == ONE_ROW
    await admin.close()


async def test_a_huge_frame_before_the_handshake_is_refused_without_reading_its_body(
    loop_stack: Callable[..., Any],
) -> None:
    stack: LoopStack = await loop_stack(handshake_timeout=5.0)
    wire = await Wire.open(stack.sidecar.port, startup=None)
    wire.writer.write(HEADER.pack(4, 0, 1, Opcode.STARTUP, 8 * 1024 * 1024) + b"\x00" * 4096)
    try:
        await asyncio.wait_for(wire.closed.wait(), 1.0)
    finally:
        wire.close()


async def test_compressed_requests_cannot_make_the_sidecar_hold_many_times_what_was_sent(
    loop_stack: Callable[..., Any],
) -> None:
    stack, admin = await _setup(loop_stack, max_client_buffer=1024 * 1024,
                                max_frame_size=2 * 1024 * 1024)
    wire = await Wire.open(stack.sidecar.port, startup=STARTUP_LZ4)
    hold = stack.emulator.hold_reads()
    filler = "a" * (1024 * 1024)
    sent = 0
    for i in range(16):
        text = f"SELECT v FROM ks.kv WHERE k = 1 AND v = '{filler}' LIMIT {i + 1} ALLOW FILTERING"
        frame = encode_frame(Opcode.QUERY, Query(text, QueryParameters(1)).encode(),
                             stream=i + 1, compress=True)
        sent += len(frame)
        wire.writer.write(frame)
    flights = stack.sidecar.flights
    admin_port = admin.writer.get_extra_info("sockname")[1]
    client = next(c for c in stack.sidecar._clients
                  if c._transport.get_extra_info("peername")[1] != admin_port)
    # Either every read is in flight, or the sidecar stopped taking them from the client.
    await eventually(lambda: len(hold) + len(wire.frames) >= 17 or client.blocked, timeout=30)
    held = sum(len(f.body) for f in flights._by_key.values())
    hold.release()
    await wire.wait_for(17)
    wire.close()
    await admin.close()
    assert held <= 1024 * 1024 + stack.sidecar.config.max_frame_size, (
        f"{sent} bytes sent made the sidecar hold {held} bytes of requests")


# -- the handshake out of order ------------------------------------------------------------


async def test_startup_twice_is_refused_and_the_connection_keeps_working(
    loop_stack: Callable[..., Any],
) -> None:
    stack, admin = await _setup(loop_stack)
    wire = await Wire.open(stack.sidecar.port, startup=None)
    wire.writer.write(encode_frame(Opcode.STARTUP, STARTUP, stream=1)
                      + encode_frame(Opcode.STARTUP, STARTUP_LZ4, stream=2))
    await wire.wait_for(2)
    by_stream = {f.stream: f for f in wire.frames}
    assert by_stream[1].opcode == Opcode.READY
    assert _error(by_stream[2]).code == ErrorCode.PROTOCOL_ERROR
    wire.writer.write(encode_frame(Opcode.STARTUP, STARTUP_LZ4, stream=3))  # after READY
    await wire.wait_for(3)
    assert _error(wire.frames[2]).code == ErrorCode.PROTOCOL_ERROR
    wire.query(READ, stream=4)  # still uncompressed, still served
    await wire.wait_for(4)
    assert wire.frames[3].opcode == Opcode.RESULT and not wire.frames[3].flags & COMPRESSION
    wire.close()
    await admin.close()


async def test_an_auth_response_flood_opens_at_most_max_logins_upstream_connections(
    loop_stack: Callable[..., Any],
) -> None:
    stack: LoopStack = await loop_stack(emulator={"auth": True}, max_logins=4)
    admin = await RawClient.connect("127.0.0.1", stack.sidecar.port,
                                    credentials=("cassandra", "cassandra"))
    base = stack.emulator.connection_count
    wrong = AuthResponse(b"\x00cassandra\x00wrong").encode()
    wires = [await Wire.open(stack.sidecar.port, startup=None) for _ in range(30)]
    peak = base
    loop = asyncio.get_running_loop()
    watching = True

    def watch() -> None:
        nonlocal peak
        peak = max(peak, stack.emulator.connection_count)
        if watching:
            loop.call_soon(watch)

    watch()
    for wire in wires:
        wire.writer.write(encode_frame(Opcode.STARTUP, STARTUP, stream=0))
    for wire in wires:
        await wire.wait_for(1)
        assert wire.frames[0].opcode == Opcode.AUTHENTICATE
    for wire in wires:  # then 50 AUTH_RESPONSEs pipelined on each connection
        wire.writer.write(b"".join(
            encode_frame(Opcode.AUTH_RESPONSE, wrong, stream=i) for i in range(1, 51)))
    for wire in wires:
        await wire.wait_for(51)
    watching = False
    for wire in wires:
        codes = [_error(f).code for f in wire.frames[1:]]
        assert codes.count(ErrorCode.BAD_CREDENTIALS) == 1  # the one login Scylla judged
        assert codes.count(ErrorCode.PROTOCOL_ERROR) == 49
        wire.close()
    assert peak <= base + 4 + 2, f"{peak - base} upstream connections for logins at once"
    assert result_of(await admin.send_query("SELECT key FROM system.local"))
    await admin.close()


# -- hanging up mid-answer, and stream exhaustion ------------------------------------------


async def test_a_client_hanging_up_mid_answer_leaves_the_others_their_whole_answer(
    loop_stack: Callable[..., Any],
) -> None:
    stack, admin = await _setup(loop_stack)
    big = "b" * (2 * 1024 * 1024)
    await admin.query(f"INSERT INTO ks.kv (k, v) VALUES (5, '{big}')")
    read = "SELECT v FROM ks.kv WHERE k = 5"
    hold = stack.emulator.hold_reads()
    leaver_reader, leaver = await asyncio.open_connection("127.0.0.1", stack.sidecar.port)
    leaver.write(encode_frame(Opcode.STARTUP, STARTUP, stream=0))
    await leaver_reader.readexactly(9)
    stayers = [await RawClient.connect("127.0.0.1", stack.sidecar.port) for _ in range(5)]
    leaver.write(encode_frame(Opcode.QUERY, Query(read, QueryParameters(1)).encode(), stream=1))
    waiters = [s.send_query(read) for s in stayers]
    await eventually(lambda: len(hold) == 1 and stack.sidecar.in_flight == 6)
    hold.release()
    await leaver_reader.readexactly(1000)  # the answer has started
    leaver.transport.abort()
    for frame in await asyncio.wait_for(asyncio.gather(*waiters), BOUND):
        assert rows_of(frame) == [[big.encode()]]
    for client in [*stayers, admin]:
        await client.close()


async def test_more_reads_in_flight_than_one_upstream_connection_has_streams_fail_no_one(
    loop_stack: Callable[..., Any], monkeypatch: pytest.MonkeyPatch,
) -> None:
    # An upstream connection with 512 stream ids instead of 32,768: the same exhaustion,
    # reached with 64 times fewer requests.
    streams = 512
    monkeypatch.setattr(connection, "_MAX_STREAMS", streams)
    stack, admin = await _setup(loop_stack, connections_per_node=1,
                                max_client_requests=streams)
    hold = stack.emulator.hold_reads()
    hogs = [await Wire.open(stack.sidecar.port) for _ in range(2)]
    half = streams // 2
    for n, hog in enumerate(hogs):
        hog.writer.write(b"".join(
            encode_frame(Opcode.QUERY, Query(
                f"SELECT k, v FROM ks.kv WHERE k = 1 LIMIT {n * half + i + 1}",
                QueryParameters(1)).encode(), stream=i)
            for i in range(half)))
    await eventually(lambda: len(hold) >= streams - 1)
    victim = await RawClient.connect("127.0.0.1", stack.sidecar.port)
    waiter = victim.send_query("SELECT k, v FROM ks.kv WHERE k = 1 LIMIT 999999")
    await eventually(lambda: waiter.done() or len(hold) == streams + 1)
    hold.release()
    for hog in hogs:
        hog.close()
    try:
        assert rows_of(await asyncio.wait_for(waiter, BOUND)) == ONE_ROW
    finally:
        await victim.close()
        await admin.close()

