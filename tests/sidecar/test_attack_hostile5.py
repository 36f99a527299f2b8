"""Attack round 8 (hostile5): a hostile client against the folded decoder, the backlog
that keeps each read's bytes, the one-frame dispatch and the member exemption.

Every test ends by checking that nothing is left behind (`_clean`, from
test_attack_hotpath).
"""

from __future__ import annotations

import asyncio
import collections
import socket
import struct

import pytest

from coalesce.cql import (
    Consistency,
    Error,
    ErrorCode,
    Frame,
    Opcode,
    Prepare,
    Query,
    QueryParameters,
    Startup,
    encode_frame,
)
from coalesce.sidecar.client import ClientConnection

from .conftest import BOUND, LoopStack, MakeStack, eventually
from .cqlclient import rows_of
from .test_attack_hotpath import (
    CountingClient,
    _clean,
    _connect,
    _execute,
    _ready,
    _server_side,
    _settle,
)

ONE = [[b"one"]]
KIB = 1024


def _code(result: Frame | BaseException) -> int | None:
    """None for a RESULT, the code of an ERROR, -1 for a lost connection."""
    if isinstance(result, BaseException):
        return -1
    if result.opcode == Opcode.ERROR:
        return int(Error.decode(result.body).code)
    return None


def _once(client: CountingClient, streams: list[int]) -> None:
    twice = [s for s in streams if client.answers[s] > 1]
    assert not twice, f"answered more than once: {twice[:10]}"

pytestmark = pytest.mark.timeout(60)


async def test_a_client_whose_every_read_ends_inside_a_frame_is_not_cut_off(
    loop_stack: MakeStack,
) -> None:
    # A busy pipelining client's TCP segments rarely end on frame boundaries. Here every
    # write ends in the middle of the next frame, for longer than handshake_timeout:
    # each frame still arrives whole well within it, so nothing may close the client.
    timeout = 0.4
    stack, admin, read = await _ready(loop_stack, handshake_timeout=timeout)
    client = await _connect(stack)
    conn = _server_side(stack, client)
    loop = asyncio.get_running_loop()
    began = loop.time()
    stream = 1
    carry = b""
    answered = 0
    while loop.time() - began < 3 * timeout:
        frame = _execute(read, stream)
        nxt = _execute(read, stream + 1)
        waiter = client.expect(stream)
        # the rest of this frame, and the first 5 bytes of the next in the same write:
        # the sidecar's read ends inside a frame every time
        rest = frame[len(carry):]
        carry = nxt[:5]
        client.writer.write(rest + carry)
        got = await asyncio.wait_for(waiter, 5)
        assert got.opcode == Opcode.RESULT, got
        answered += 1
        stream += 1
    assert not conn.closed, f"closed after {answered} reads, every one whole in time"
    assert stack.sidecar._require_proxy().partial_bytes == 5
    await _clean(stack)
    await client.close()
    await admin.close()


# -- bad frames after and inside folded runs ------------------------------------------


def _folded_herd(read: bytes, first: int, count: int) -> list[tuple[int, bytes]]:
    return [(s, _execute(read, s)) for s in range(first, first + count)]


@pytest.mark.parametrize("bad", ["garbage", "huge-length", "v5", "unknown-opcode"])
@pytest.mark.parametrize("where", ["same-write", "next-read"])
async def test_a_bad_header_after_a_folded_run_closes_only_its_sender(
    loop_stack: MakeStack, bad: str, where: str,
) -> None:
    # A herd of 300 folded repeats, then one bad header. The sender is closed with an
    # error; an honest client waiting on the same held read gets its rows; each of the
    # sender's streams is answered at most once; nothing is left counted.
    stack, admin, read = await _ready(loop_stack)
    honest = await _connect(stack)
    attacker = await _connect(stack)
    conn = _server_side(stack, attacker)
    hold = stack.emulator.hold_reads()
    mine = honest.send_execute(read, [struct.pack(">i", 1)])
    await eventually(lambda: len(hold) == 1)
    herd = _folded_herd(read, 1, 300)
    header = {
        "garbage": b"\xde\xad\xbe\xef" * 4,
        "huge-length": struct.pack(">BBhBi", 4, 0, 999, Opcode.QUERY, 0x7FFFFFFF),
        "v5": struct.pack(">BBhBi", 5, 0, 999, Opcode.QUERY, 10) + b"x" * 10,
        "unknown-opcode": struct.pack(">BBhBi", 4, 0, 999, 0x42, 0),
    }[bad]
    closed = attacker.closed
    if where == "same-write":
        waiters = attacker.burst(herd)
        attacker.writer.write(header)
        # nothing of that read was dispatched: the decoder refused it whole
    else:
        waiters = attacker.burst(herd)
        await eventually(lambda: conn._pending == 300)
        attacker.writer.write(header)
    errors = attacker.expect(999)
    await asyncio.wait_for(closed.wait(), BOUND)
    hold.close()
    hold.release()
    assert rows_of(await asyncio.wait_for(mine, BOUND)) == ONE
    results = await _settle(waiters)
    codes = collections.Counter(_code(r) for r in results)
    if where == "next-read":
        # the herd joined the flight before the bad header came; it is answered or lost
        # with the connection, never twice
        assert set(codes) <= {None, -1}, codes
    else:
        assert set(codes) == {-1}, codes
    _once(attacker, [s for s, _ in herd])
    # the error went to the bad header's stream, before the close
    if bad == "garbage":  # its "stream" is negative: the client sees an event
        errors.cancel()
        got: Frame | BaseException = attacker.events.get_nowait()
        assert got.stream == struct.unpack(">h", header[2:4])[0]
    else:
        got = (await asyncio.gather(errors, return_exceptions=True))[0]
    assert _code(got) == ErrorCode.PROTOCOL_ERROR, got
    await _clean(stack)
    assert stack.sidecar._require_proxy().partial_bytes == 0
    await honest.close()
    await admin.close()


@pytest.mark.parametrize("then", ["vanish", "stall"])
async def test_a_huge_frame_begun_after_a_folded_run_holds_only_what_was_sent(
    loop_stack: MakeStack, then: str,
) -> None:
    # 200 folded repeats join a held read, then a QUERY header declaring 8 MiB (under
    # max_frame_size) and 1000 bytes of it. The run is dispatched; the partial frame is
    # held as sent (counted in partial_bytes), and let go when the client vanishes or
    # stalls past handshake_timeout.
    stack, admin, read = await _ready(loop_stack, handshake_timeout=0.5)
    proxy = stack.sidecar._require_proxy()
    honest = await _connect(stack)
    attacker = await _connect(stack)
    conn = _server_side(stack, attacker)
    hold = stack.emulator.hold_reads()
    mine = honest.send_execute(read, [struct.pack(">i", 1)])
    await eventually(lambda: len(hold) == 1)
    herd = _folded_herd(read, 1, 200)
    waiters = attacker.burst(herd)
    attacker.writer.write(struct.pack(">BBhBi", 4, 0, 999, Opcode.QUERY, 8 * 1024 * KIB)
                          + b"\x00" * 1000)
    await eventually(lambda: conn._pending == 200 and proxy.partial_bytes == 1009)
    assert sum(len(src) for *_, src in conn._backlog) == 0
    if then == "vanish":
        attacker.writer.transport.abort()
    await asyncio.wait_for(attacker.closed.wait(), BOUND)
    await eventually(lambda: proxy.partial_bytes == 0)
    hold.close()
    hold.release()
    assert rows_of(await asyncio.wait_for(mine, BOUND)) == ONE
    await _settle(waiters)
    _once(attacker, [s for s, _ in herd])
    await _clean(stack)
    await honest.close()
    await admin.close()


async def test_a_herd_sent_one_byte_per_read_joins_the_held_read_and_is_answered_once(
    loop_stack: MakeStack,
) -> None:
    stack, admin, read = await _ready(loop_stack)
    before = stack.emulator.statements.get("select", 0)
    honest = await _connect(stack)
    attacker = await _connect(stack)
    conn = _server_side(stack, attacker)
    hold = stack.emulator.hold_reads()
    mine = honest.send_execute(read, [struct.pack(">i", 1)])
    await eventually(lambda: len(hold) == 1)
    herd = _folded_herd(read, 1, 12)
    waiters = [attacker.expect(s) for s, _ in herd]
    for f, (_, frame) in enumerate(herd):
        for j in range(len(frame)):
            attacker.writer.write(frame[j:j + 1])
            if j + 1 < len(frame):
                await eventually(lambda j=j: conn._decoder.buffered == j + 1)
            else:
                await eventually(lambda f=f: conn._pending == f + 1
                                 and not conn._decoder.buffered)
    assert len(hold) == 1  # every one joined the held read
    hold.close()
    hold.release()
    assert rows_of(await asyncio.wait_for(mine, BOUND)) == ONE
    assert [rows_of(r) for r in await _settle(waiters)] == [ONE] * len(herd)
    _once(attacker, [s for s, _ in herd])
    assert stack.emulator.statements.get("select", 0) - before == 1
    await _clean(stack)
    for c in (attacker, honest, admin):
        await c.close()


# -- a client that never reads ---------------------------------------------------------


async def _deaf(stack: LoopStack) -> tuple[socket.socket, ClientConnection]:
    """A ready client socket that reads nothing more (a small receive buffer)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, ("127.0.0.1", stack.sidecar.port))
    startup = Startup({"CQL_VERSION": "3.0.0"}).encode()
    await loop.sock_sendall(sock, encode_frame(Opcode.STARTUP, startup, stream=0))
    got = b""
    async with asyncio.timeout(BOUND):
        while len(got) < 9:
            got += await loop.sock_recv(sock, 9 - len(got))
    assert got[4] == Opcode.READY
    port = sock.getsockname()[1]
    conn = next(c for c in stack.sidecar._clients
                if c._transport is not None
                and c._transport.get_extra_info("peername")[1] == port)
    return sock, conn


def _backlog_bytes(conn: ClientConnection) -> tuple[int, int, int]:
    """(entries, frames, bytes kept alive) of a connection's backlog; a buffer shared by
    entries counts once."""
    seen: dict[int, int] = {}
    frames = 0
    for _, _, items, src in conn._backlog:
        frames += len(items)
        seen[id(src)] = len(src)
    return len(conn._backlog), frames, sum(seen.values())


@pytest.mark.parametrize("shape", ["one-key", "many-keys"])
async def test_a_deaf_clients_backlog_of_folded_reads_keeps_one_reads_bytes(
    loop_stack: MakeStack, shape: str,
) -> None:
    # The deaf client sends 40 writes of 500 reads each (20k requests, ~1.3 MB) while
    # the reads are held, then the answers come. What the sidecar keeps for it must stay
    # bounded: its backlog's bytes (each entry keeps the bytes of its read alive), and
    # its unsent answers (4x max_client_buffer).
    buffer = 64 * KIB
    stack, admin, read = await _ready(loop_stack, max_client_requests=16,
                                      max_client_buffer=buffer)
    for k in range(2, 9):  # ~8 KiB rows: the answers are what fills the client's buffers
        await admin.query(f"INSERT INTO ks.kv (k, v) VALUES ({k}, '{chr(96 + k) * 8000}')")
    proxy = stack.sidecar._require_proxy()
    sock, conn = await _deaf(stack)
    honest = await _connect(stack)
    loop = asyncio.get_running_loop()
    hold = stack.emulator.hold_reads()
    keys = 1 if shape == "one-key" else 7
    data = b"".join(_execute(read, s % 30000 + 1, key=s % keys + 2)
                    for s in range(20_000))
    sending = loop.create_task(loop.sock_sendall(sock, data))
    peak_backlog = [0, 0, 0]
    peak_out = 0
    watching = True

    def watch() -> None:
        nonlocal peak_out
        transport = conn._transport
        if transport is not None and not transport.is_closing():
            peak_out = max(peak_out, transport.get_write_buffer_size())
        entries, frames, kept = _backlog_bytes(conn)
        peak_backlog[0] = max(peak_backlog[0], entries)
        peak_backlog[1] = max(peak_backlog[1], frames)
        peak_backlog[2] = max(peak_backlog[2], kept)
        if watching:
            loop.call_soon(watch)

    watch()
    await eventually(lambda: conn._pending >= 16 and conn._backlog)
    hold.close()
    hold.release()
    # the answers fill the deaf client's buffers; the sidecar stops taking its requests
    await eventually(lambda: conn._write_paused)
    await eventually(lambda: not proxy.backlogged and not conn._pending)
    # an honest client is served meanwhile
    assert rows_of(await asyncio.wait_for(honest.send_execute(read, [struct.pack(">i", 1)]),
                                          BOUND)) == ONE
    watching = False
    entries, frames, kept = peak_backlog
    assert kept <= 2 * 256 * KIB, (entries, frames, kept)
    assert peak_out <= 4 * buffer + 2 * 64 * KIB, peak_out
    assert proxy.partial_bytes <= 64 * KIB
    print(f"\n{shape}: backlog peak {entries} entries, {frames} frames, {kept} bytes kept; "
          f"unsent peak {peak_out} bytes")
    sending.cancel()
    sock.close()
    await _clean(stack)
    await honest.close()
    await admin.close()


# -- floods of PREPARE and USE mixed with herds ---------------------------------------


def _use(keyspace: str, stream: int) -> bytes:
    body = Query(f"USE {keyspace}", QueryParameters(Consistency.ONE)).encode()
    return encode_frame(Opcode.QUERY, body, stream=stream)


async def test_pipelined_floods_of_prepare_and_use_mixed_with_herds_answer_each_once(
    loop_stack: MakeStack,
) -> None:
    # 3000 frames in one write: distinct PREPAREs (more than the prepared cache holds),
    # USEs switching between two keyspaces, and runs of identical reads. Every stream is
    # answered exactly once and as asked; the cache stays within its bound; the client
    # ends in the keyspace its last USE named; an honest client is served meanwhile.
    stack, admin, read = await _ready(loop_stack, prepared_cache=50)
    await admin.query("CREATE KEYSPACE ks2 WITH replication = "
                      "{'class': 'SimpleStrategy', 'replication_factor': 1}")
    proxy = stack.sidecar._require_proxy()
    flooder = await _connect(stack)
    honest = await _connect(stack)
    frames: list[tuple[int, bytes]] = []
    kinds: dict[int, str] = {}
    last_use = ""
    for s in range(1, 3001):
        kind = ("prepare", "use", "read", "read", "read")[s % 5]
        if kind == "prepare":
            body = Prepare(f"SELECT v FROM ks.kv WHERE k = {s}").encode()
            frames.append((s, encode_frame(Opcode.PREPARE, body, stream=s)))
        elif kind == "use":
            last_use = ("ks", "ks2")[(s // 5) % 2]
            frames.append((s, _use(last_use, s)))
        else:
            frames.append((s, _execute(read, s)))
        kinds[s] = kind
    waiters = flooder.burst(frames)
    honest_reads = []
    for _ in range(20):
        honest_reads.append(await asyncio.wait_for(
            honest.send_execute(read, [struct.pack(">i", 1)]), BOUND))
    results = await _settle(waiters)
    # A read whose statement the flood pushed out of the cache is UNPREPARED (its
    # driver prepares it again); nothing else may go wrong.
    bad = [(s, kinds[s], _code(r)) for (s, _), r in zip(frames, results, strict=True)
           if _code(r) is not None
           and not (kinds[s] == "read" and _code(r) == ErrorCode.UNPREPARED)]
    assert not bad, bad[:10]
    unprepared = 0
    for (s, _), r in zip(frames, results, strict=True):
        assert not isinstance(r, BaseException)
        if kinds[s] == "read" and _code(r) is None:
            assert rows_of(r) == ONE
        unprepared += _code(r) == ErrorCode.UNPREPARED
    _once(flooder, list(kinds))
    assert all(_code(r) in (None, ErrorCode.UNPREPARED) for r in honest_reads)
    assert all(rows_of(r) == ONE for r in honest_reads if _code(r) is None)
    assert len(proxy.statements) <= 50
    again = (await flooder.prepare("SELECT v FROM ks.kv WHERE k = ?")).query_id
    assert rows_of(await asyncio.wait_for(
        honest.send_execute(again, [struct.pack(">i", 1)]), BOUND)) == ONE
    print(f"\nflood: {unprepared} of 1800 reads UNPREPARED once the cache (50) turned over")
    conn = _server_side(stack, flooder)
    assert conn.keyspace == last_use
    await _clean(stack)
    for c in (flooder, honest, admin):
        await c.close()


# -- abandoned handshakes -----------------------------------------------------------------


async def test_abandoned_handshakes_by_the_hundred_are_closed_and_cost_the_others_nothing(
    loop_stack: MakeStack,
) -> None:
    # 150 strangers: 50 connect and send nothing, 50 send half a STARTUP, 50 a STARTUP
    # header promising a body that never comes. Meanwhile honest clients connect and
    # read. Every stranger is closed by handshake_timeout; nothing is left counted.
    timeout = 0.5
    stack, admin, read = await _ready(loop_stack, handshake_timeout=timeout)
    proxy = stack.sidecar._require_proxy()
    loop = asyncio.get_running_loop()
    startup = encode_frame(Opcode.STARTUP, Startup({"CQL_VERSION": "3.0.0"}).encode(),
                           stream=0)
    strangers: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    began = loop.time()
    for i in range(150):
        reader, writer = await asyncio.open_connection("127.0.0.1", stack.sidecar.port)
        if i % 3 == 1:
            writer.write(startup[: len(startup) // 2])
        elif i % 3 == 2:
            writer.write(startup[:9])
        strangers.append((reader, writer))
    honest = []
    for _ in range(10):
        client = await _connect(stack)
        frame = await asyncio.wait_for(client.send_execute(read, [struct.pack(">i", 1)]),
                                       BOUND)
        assert rows_of(frame) == ONE
        honest.append(client)

    async def closed(reader: asyncio.StreamReader) -> float:
        try:
            while await reader.read(65536):
                pass
        except (ConnectionError, OSError):
            pass
        return loop.time() - began

    took = await asyncio.wait_for(asyncio.gather(*(closed(r) for r, _ in strangers)), BOUND)
    assert max(took) < timeout + 2.0, max(took)
    await eventually(lambda: proxy.stats.client_connections == 1 + len(honest))
    assert proxy.partial_bytes == 0
    for client in honest:  # still served after the strangers are gone
        assert rows_of(await asyncio.wait_for(
            client.send_execute(read, [struct.pack(">i", 1)]), BOUND)) == ONE
    for _, writer in strangers:
        writer.close()
    await _clean(stack)
    for client in (*honest, admin):
        await client.close()


# -- a frozen upstream ----------------------------------------------------------------------


async def test_reads_held_forever_fail_by_request_timeout_and_others_keep_working(
    loop_stack: MakeStack,
) -> None:
    # The emulator holds every read forever. A herd of 40 (max_waiters 5) and 60
    # distinct reads, in one write each: the herd's excess is refused at once, every
    # other read fails by request_timeout, each exactly once. Meanwhile another client's
    # OPTIONS, PREPARE, write and USE are answered well within it. Afterwards nothing is
    # in flight, though the upstream still holds every read; late answers go nowhere.
    timeout = 0.5
    stack, admin, read = await _ready(loop_stack, request_timeout=timeout, max_waiters=5)
    loop = asyncio.get_running_loop()
    herd_client = await _connect(stack)
    distinct = await _connect(stack)
    other = await _connect(stack)
    hold = stack.emulator.hold_reads()
    began = loop.time()
    herd = [(s, _execute(read, s)) for s in range(1, 41)]
    wh = herd_client.burst(herd)
    spread = [(s, _execute(read, s, key=100 + s)) for s in range(1, 61)]
    wd = distinct.burst(spread)
    quick = []
    for _ in range(5):
        t = loop.time()
        assert (await other.request(Opcode.OPTIONS, b"")).opcode == Opcode.SUPPORTED
        await other.prepare("SELECT v FROM ks.kv WHERE k = ?")
        await other.query("INSERT INTO ks.kv (k, v) VALUES (9, 'nine')")
        await other.query("USE ks")
        quick.append(loop.time() - t)
    assert max(quick) < timeout, quick
    rh = await _settle(wh)
    rd = await _settle(wd)
    took = loop.time() - began
    assert took < timeout + 1.5, took
    codes_h = collections.Counter(_code(r) for r in rh)
    codes_d = collections.Counter(_code(r) for r in rd)
    assert codes_h[ErrorCode.OVERLOADED] == 35 and sum(codes_h.values()) == 40, codes_h
    assert None not in codes_d and -1 not in codes_d, codes_d
    _once(herd_client, [s for s, _ in herd])
    _once(distinct, [s for s, _ in spread])
    print(f"\nfrozen: all 100 reads answered in {took:.2f}s (request_timeout {timeout}s), "
          f"{dict(codes_h)} {dict(codes_d)}; other client's slowest round {max(quick):.3f}s")
    await _clean(stack)  # with the reads still held upstream
    assert len(hold) >= 61
    hold.close()
    hold.release()  # the late answers: nobody waits for them
    for client in (herd_client, distinct):
        assert rows_of(await asyncio.wait_for(
            client.send_execute(read, [struct.pack(">i", 1)]), BOUND)) == ONE
    await _clean(stack)
    for client in (herd_client, distinct, other, admin):
        await client.close()
