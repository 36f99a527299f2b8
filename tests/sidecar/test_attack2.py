"""Attack round 2: a hostile client combining what earlier rounds tested one at a time.

Bad frames after a herd has started on the same connection, clients going away while
their frames wait in the ingest backlog or while they are blocked, and a client that
reads just enough to be let in again and then never reads more. After each: an honest
client is served, and the sidecar holds no flight, request or connection for it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import re
import signal
import socket
import struct
import sys
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from coalesce.cql import (
    AuthResponse,
    Batch,
    BatchStatement,
    Error,
    Opcode,
    Prepare,
    Query,
    QueryParameters,
    Register,
    Startup,
    encode_frame,
)
from coalesce.sidecar import Sidecar

from .conftest import BOUND, LoopStack, eventually, sidecar_config
from .cqlclient import RawClient, rows_of

pytestmark = pytest.mark.timeout(90)

KEYSPACE = (
    "CREATE KEYSPACE ks WITH replication = {'class': 'SimpleStrategy', 'replication_factor': 1}"
)
READ = "SELECT k, v FROM ks.kv WHERE k = 1"
ONE_ROW = [[b"\x00\x00\x00\x01", b"one"]]
STARTUP = Startup({"CQL_VERSION": "3.0.0"}).encode()
CREDENTIALS = ("cassandra", "cassandra")
BIG_READ = "SELECT k, v FROM ks.kv WHERE k = 7"
# A request frame with the response bit set: decoded whole, refused at dispatch (fatal).
RESPONSE_BIT = bytes([0x84, 0, 0, 99, Opcode.OPTIONS, 0, 0, 0, 0])


async def _setup(loop_stack: Callable[..., Any], **config: Any) -> tuple[LoopStack, RawClient]:
    stack: LoopStack = await loop_stack(**config)
    admin = await RawClient.connect("127.0.0.1", stack.sidecar.port)
    await admin.query(KEYSPACE)
    await admin.query("CREATE TABLE ks.kv (k int PRIMARY KEY, v text)")
    await admin.query("INSERT INTO ks.kv (k, v) VALUES (1, 'one')")
    return stack, admin


def _query(text: str, stream: int) -> bytes:
    return encode_frame(Opcode.QUERY, Query(text, QueryParameters(1)).encode(), stream=stream)


class _Socket:
    """A raw client socket: it reads only when told to, and how much it is told."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.loop = asyncio.get_running_loop()

    @classmethod
    async def open(cls, port: int, *, rcvbuf: int = 4096) -> _Socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
        return cls(sock)

    async def send(self, data: bytes) -> None:
        await self.loop.sock_sendall(self.sock, data)

    async def handshake(self) -> None:
        await self.send(encode_frame(Opcode.STARTUP, STARTUP, stream=0))
        got = b""
        async with asyncio.timeout(BOUND):
            while len(got) < 9:
                got += await self.loop.sock_recv(self.sock, 9 - len(got))
        assert got[4] == Opcode.READY

    async def read_some(self, size: int = 4096) -> bytes:
        return await self.loop.sock_recv(self.sock, size)

    @property
    def port(self) -> int:
        return int(self.sock.getsockname()[1])

    def close(self) -> None:
        self.sock.close()


def _connection(sidecar: Sidecar, port: int) -> Any:
    return next(c for c in sidecar._clients
                if c._transport.get_extra_info("peername")[1] == port)


async def _all_clear(stack: LoopStack, admin: RawClient, clients: int) -> None:
    """An honest read is served; nothing is left in flight; `clients` connections remain."""
    assert rows_of(await asyncio.wait_for(admin.send_query(READ), BOUND)) == ONE_ROW
    sidecar = stack.sidecar
    await eventually(lambda: not len(sidecar.flights) and not sidecar.flights.running
                     and not sidecar.flights.settled and not sidecar.in_flight)
    await eventually(lambda: len(sidecar._clients) == clients)
    assert sidecar.stats.client_connections == clients


# -- bad frames after a herd has started on the same connection ------------------------


async def test_a_fatal_frame_after_a_herd_on_its_connection_leaves_the_other_waiters_served(
    loop_stack: Callable[..., Any],
) -> None:
    stack, admin = await _setup(loop_stack)
    hold = stack.emulator.hold_reads()
    other = await RawClient.connect("127.0.0.1", stack.sidecar.port)
    hostile = await _Socket.open(stack.sidecar.port)
    await hostile.handshake()
    # 20 copies of one read (one flight, joined by its own sender), then a fatal frame.
    await hostile.send(b"".join(_query(READ, i) for i in range(1, 21)) + RESPONSE_BIT)
    await eventually(lambda: len(stack.sidecar.flights) == 1)
    waiting = [other.send_query(READ) for _ in range(5)]
    await eventually(lambda: hostile.port not in {
        c._transport.get_extra_info("peername")[1] for c in stack.sidecar._clients})
    hold.release()
    for answer in waiting:
        assert rows_of(await asyncio.wait_for(answer, BOUND)) == ONE_ROW
    hostile.close()
    await other.close()
    await _all_clear(stack, admin, 1)
    await admin.close()


async def test_a_client_hanging_up_with_frames_in_the_ingest_backlog_leaves_nothing_behind(
    loop_stack: Callable[..., Any],
) -> None:
    stack, admin = await _setup(loop_stack, max_client_requests=8)
    hold = stack.emulator.hold_reads()
    hostile = await _Socket.open(stack.sidecar.port)
    await hostile.handshake()
    # Distinct reads, more than max_client_requests: the rest waits in the backlog.
    await hostile.send(b"".join(
        _query(f"SELECT k, v FROM ks.kv WHERE k = {i}", i) for i in range(1, 200)))
    conn = _connection(stack.sidecar, hostile.port)
    await eventually(lambda: conn.pending == 8 and conn.backlog_seq is not None)
    hostile.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    hostile.close()  # RST: gone while blocked (not reading), with a backlog
    # Not reading, the sidecar learns of it when it next writes: once the reads answer.
    hold.release()
    await eventually(lambda: conn.closed)
    await _all_clear(stack, admin, 1)
    await admin.close()


# -- a client that reads just enough to be let in again, then never reads -------------


_LINGERS = (
    "ClientConnection.close() (used by _fatal, _reject_version, refusals, stop) calls "
    "transport.close(), which waits for unsent answers to drain; a client that never "
    "reads them keeps the connection (its slot under max_connections, its buffers, its "
    "pool reference) forever: connection_lost never runs and _check_timers returns "
    "early once _closed is set, so neither idle_timeout nor handshake_timeout reaps it")


async def _closed_with_answers_unsent(stack: LoopStack, admin: RawClient) -> tuple[Any, _Socket]:
    """A client the sidecar closed (a fatal frame) while answers to it are still unsent,
    and which then never reads again: its connection, and its socket."""
    await admin.query(f"INSERT INTO ks.kv (k, v) VALUES (7, '{'b' * 100_000}')")
    hostile = await _Socket.open(stack.sidecar.port)
    await hostile.handshake()
    conn = _connection(stack.sidecar, hostile.port)
    # A small kernel send buffer on the sidecar's side: what a remote client with a
    # closed TCP window leaves once the (larger) real one is full, on loopback too.
    conn._transport.get_extra_info("socket").setsockopt(
        socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    # Enough big answers to fill the socket and pause writing.
    await hostile.send(b"".join(_query(BIG_READ, i) for i in range(1, 41)))
    await eventually(lambda: conn._write_paused and not conn._reading)
    # Then small answers the sidecar writes at once on resuming, and the fatal frame.
    await hostile.send(b"".join(encode_frame(Opcode.OPTIONS, b"", stream=100 + i)
                                for i in range(200)) + RESPONSE_BIT)
    # Read just enough that the sidecar resumes and reads the fatal frame; then stop.
    async with asyncio.timeout(BOUND):
        while not conn.closed:
            await hostile.read_some(4096)
    assert conn._transport.get_write_buffer_size() > 0  # answers left that nobody reads
    return conn, hostile


async def test_a_client_closed_for_a_bad_frame_while_its_answers_are_unsent_is_let_go(
    loop_stack: Callable[..., Any],
) -> None:
    stack, admin = await _setup(loop_stack, max_client_buffer=64 * 1024,
                                handshake_timeout=0.5, idle_timeout=None)
    conn, hostile = await _closed_with_answers_unsent(stack, admin)
    # Closed by the sidecar, it must be let go within a deadline (any of them), not kept
    # for as long as the client chooses not to read.
    await eventually(lambda: conn not in stack.sidecar._clients)
    await _all_clear(stack, admin, 1)
    hostile.close()
    await admin.close()


async def test_a_closed_client_that_never_reads_does_not_keep_its_max_connections_slot(
    loop_stack: Callable[..., Any],
) -> None:
    stack, admin = await _setup(loop_stack, max_client_buffer=64 * 1024, max_connections=2,
                                handshake_timeout=0.5, idle_timeout=None)
    conn, hostile = await _closed_with_answers_unsent(stack, admin)
    deadline = asyncio.get_running_loop().time() + 2.0  # 4 handshake timeouts
    await eventually(lambda: asyncio.get_running_loop().time() >= deadline
                     or conn not in stack.sidecar._clients)
    # An honest client may connect: the hostile one was closed seconds ago.
    honest = await RawClient.connect("127.0.0.1", stack.sidecar.port)
    assert rows_of(await asyncio.wait_for(honest.send_query(READ), BOUND)) == ONE_ROW
    await honest.close()
    hostile.close()
    await admin.close()


# -- the memo of joined bodies after its flights are over --------------------------------


async def test_bodies_of_finished_reads_are_not_kept_past_the_clients_buffer_bound(
    loop_stack: Callable[..., Any],
) -> None:
    stack, admin = await _setup(loop_stack, max_client_buffer=64 * 1024)
    await admin.query("CREATE TABLE ks.t (k text PRIMARY KEY, v text)")
    reader = await RawClient.connect("127.0.0.1", stack.sidecar.port, lz4=True)
    conn = _connection(stack.sidecar, reader.writer.get_extra_info("sockname")[1])
    for i in range(64):  # one at a time: never more than one body held at once
        key = (b"%02d" % i) * (128 * 1024)  # 256 KiB, squeezed by LZ4 to ~1 KiB
        frame = await asyncio.wait_for(
            reader.send_query("SELECT v FROM ks.t WHERE k = ?", [key]), BOUND)
        assert rows_of(frame) == []
    await _all_clear(stack, admin, 2)
    kept = sum(len(key) + len(flight.body)
               for memo in conn._fast.values() for key, flight in memo.items())
    assert kept <= 64 * 1024, f"{kept / 2**20:.1f} MiB of finished requests kept"
    await reader.close()
    await admin.close()


# -- half frames from many ready clients ------------------------------------------------


async def test_many_half_frames_of_just_under_a_mebibyte_stay_within_the_total_cap(
    loop_stack: Callable[..., Any],
) -> None:
    stack, admin = await _setup(loop_stack, handshake_timeout=5.0)
    proxy = stack.sidecar._require_proxy()
    count = 300
    size = 1024 * 1024 - 1  # buffered, header included: not more than 1 MiB
    half = (bytes([4, 0, 0, 1, Opcode.QUERY]) + (2 * 1024 * 1024).to_bytes(4, "big")
            + b"\x00" * (size - 9))
    clients = [await RawClient.connect("127.0.0.1", stack.sidecar.port) for _ in range(count)]
    peak = 0

    def held() -> bool:
        nonlocal peak
        peak = max(peak, proxy.partial_bytes)
        return proxy.partial_bytes >= count * size or any(c.closed.is_set() for c in clients)

    for client in clients:
        client.writer.write(half)
    await eventually(held)
    try:
        assert peak <= 256 * 1024 * 1024, f"{peak / 2**20:.0f} MiB of unfinished frames held"
    finally:
        for client in clients:
            client.writer.transport.abort()
        await eventually(lambda: proxy.partial_bytes == 0)
        await _all_clear(stack, admin, 1)
        await admin.close()


# -- a client that never reads, joining herds, with LZ4 ---------------------------------


STARTUP_LZ4 = Startup({"CQL_VERSION": "3.0.0", "COMPRESSION": "lz4"}).encode()


async def test_a_deaf_lz4_client_joining_herds_is_held_to_its_bounds_and_costs_no_one_else(
    loop_stack: Callable[..., Any],
) -> None:
    stack, admin = await _setup(loop_stack, max_client_requests=64,
                                max_client_buffer=64 * 1024)
    noise = base64.b64encode(os.urandom(1500)).decode()  # LZ4 cannot shrink it much
    await admin.query(f"INSERT INTO ks.kv (k, v) VALUES (2, '{noise}')")
    herd_read = "SELECT k, v FROM ks.kv WHERE k = 2"
    hostile = await _Socket.open(stack.sidecar.port)
    await hostile.send(encode_frame(Opcode.STARTUP, STARTUP_LZ4, stream=0))
    got = b""
    async with asyncio.timeout(BOUND):
        while len(got) < 9:
            got += await hostile.read_some(9 - len(got))
    assert got[4] == Opcode.READY
    conn = _connection(stack.sidecar, hostile.port)
    hold = stack.emulator.hold_reads()
    others = [await RawClient.connect("127.0.0.1", stack.sidecar.port, lz4=True)
              for _ in range(3)]
    body = Query(herd_read, QueryParameters(1)).encode()
    frames = b"".join(encode_frame(Opcode.QUERY, body, stream=i % 32768, compress=True)
                      for i in range(5000))
    peaks = {"pending": 0, "unsent": 0}
    loop = asyncio.get_running_loop()
    watching = True

    def watch() -> None:
        transport = conn._transport
        peaks["pending"] = max(peaks["pending"], conn.pending)
        if transport is not None:
            peaks["unsent"] = max(peaks["unsent"], transport.get_write_buffer_size())
        if watching:
            loop.call_soon(watch)

    watch()
    await hostile.send(frames)
    await eventually(lambda: conn.pending == 64)
    herd = [c.send_query(herd_read) for c in others for _ in range(20)]
    await eventually(lambda: len(hold) >= 1)
    hold.release()
    for answer in herd:
        assert rows_of(await asyncio.wait_for(answer, BOUND))[0][1] == noise.encode()
    await eventually(lambda: conn._write_paused and not conn._reading)
    assert rows_of(await asyncio.wait_for(admin.send_query(READ), BOUND)) == ONE_ROW
    watching = False
    assert peaks["pending"] <= 64, peaks
    assert peaks["unsent"] <= 4 * 64 * 1024 + 64 * 2100, peaks
    hostile.close()
    for other in others:
        await other.close()
    await _all_clear(stack, admin, 1)
    await admin.close()


# -- floods of setup-like requests, interleaved, pipelined on one connection ----------


async def test_interleaved_floods_of_use_prepare_batch_register_options_leave_baseline_state(
    loop_stack: Callable[..., Any],
) -> None:
    stack, admin = await _setup(loop_stack, max_pools=8, pool_idle_timeout=0.3)
    await admin.query(KEYSPACE.replace(" ks ", " ks2 "))
    upstream = stack.sidecar.upstream
    pools, connections = upstream.pool_count, dict(upstream.connections_by_node())
    emulator_connections = stack.emulator.connection_count
    hold = stack.emulator.hold_reads()
    victim = admin.send_query(READ)
    await eventually(lambda: len(hold) == 1)
    flooder = await RawClient.connect("127.0.0.1", stack.sidecar.port)
    register = Register(["SCHEMA_CHANGE", "TOPOLOGY_CHANGE"]).encode()
    batch = Batch(0, [BatchStatement(True, bytes([i % 256]) * 16, [])
                      for i in range(3)], 1).encode()
    waits = []
    for i in range(400):
        waits.append(flooder.send_query("USE ks" if i % 2 else "USE ks2"))
        waits.append(flooder.send_query(f"USE missing_{i}"))
        waits.append(flooder.request(Opcode.PREPARE, Prepare(
            f"SELECT v FROM ks.kv WHERE k = {i}").encode()))
        waits.append(flooder.request(Opcode.BATCH, batch))
        waits.append(flooder.request(Opcode.REGISTER, register))
        waits.append(flooder.request(Opcode.OPTIONS, b""))
    frames = await asyncio.wait_for(asyncio.gather(*waits), 60)
    assert len(frames) == 2400
    hold.release()
    assert rows_of(await asyncio.wait_for(victim, BOUND)) == ONE_ROW
    assert rows_of(await asyncio.wait_for(flooder.send_query(READ), BOUND)) == ONE_ROW
    await flooder.close()
    await eventually(lambda: upstream.pool_count == pools)  # the rest idled out
    await eventually(lambda: stack.emulator.connection_count == emulator_connections)
    assert upstream.connections_by_node() == connections
    await _all_clear(stack, admin, 1)
    await admin.close()


# -- two USEs pipelined: the last one read is the one that holds ------------------------


async def test_two_uses_pipelined_leave_the_client_in_the_keyspace_it_named_last(
    loop_stack: Callable[..., Any],
) -> None:
    stack, admin = await _setup(loop_stack)
    await admin.query(KEYSPACE.replace(" ks ", " ks2 "))
    await admin.query("CREATE TABLE ks2.kv (k int PRIMARY KEY, v text)")
    await admin.query("INSERT INTO ks2.kv (k, v) VALUES (1, 'two')")
    warm = await RawClient.connect("127.0.0.1", stack.sidecar.port)
    await warm.query("USE ks")  # ks's pool is open; ks2's is not yet
    client = await RawClient.connect("127.0.0.1", stack.sidecar.port)
    first = client.send_query("USE ks2")  # has to open a pool
    second = client.send_query("USE ks")  # answered from the open one
    await asyncio.wait_for(asyncio.gather(first, second), BOUND)
    rows = rows_of(await asyncio.wait_for(
        client.send_query("SELECT k, v FROM kv WHERE k = 1"), BOUND))
    assert rows == ONE_ROW, f"read {rows} from ks2 after USE ks2; USE ks"
    for c in (warm, client):
        await c.close()
    await _all_clear(stack, admin, 1)
    await admin.close()


# -- max_logins saturated by failing logins ---------------------------------------------


async def test_honest_logins_get_through_while_strangers_keep_every_login_slot_busy(
    loop_stack: Callable[..., Any],
) -> None:
    stack: LoopStack = await loop_stack(emulator={"auth": True}, max_logins=2,
                                        handshake_timeout=5.0)
    wrong = AuthResponse(b"\x00cassandra\x00wrong").encode()
    stop = asyncio.Event()
    attempts = 0

    async def stranger() -> None:
        nonlocal attempts
        wire = await RawClient.connect("127.0.0.1", stack.sidecar.port, startup=False)
        while not stop.is_set():
            if (await wire.request(Opcode.STARTUP, STARTUP)).opcode != Opcode.AUTHENTICATE:
                break
            await wire.request(Opcode.AUTH_RESPONSE, wrong)  # BAD_CREDENTIALS; again
            attempts += 1
        await wire.close()

    strangers = [asyncio.create_task(stranger()) for _ in range(40)]
    await eventually(lambda: attempts >= 200)
    loop = asyncio.get_running_loop()
    took = []
    for _ in range(5):
        started = loop.time()
        honest = await asyncio.wait_for(RawClient.connect(
            "127.0.0.1", stack.sidecar.port, credentials=CREDENTIALS), BOUND)
        took.append(loop.time() - started)
        assert rows_of(await asyncio.wait_for(
            honest.send_query("SELECT key FROM system.local"), BOUND))
        await honest.close()
    stop.set()
    await asyncio.wait_for(asyncio.gather(*strangers), BOUND)
    assert max(took) < 2.0, took
    await eventually(lambda: _settled(stack.sidecar))


# -- a frozen upstream (SIGSTOP) during a herd and during logins ------------------------


@contextlib.asynccontextmanager
async def _emulator_process(*args: str) -> AsyncIterator[tuple[asyncio.subprocess.Process, int]]:
    """`coalesce emulator` in a process of its own on a free port, stopped on the way out."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "coalesce", "emulator", "--listen", "127.0.0.1:0",
        "--read-latency", "0", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        assert proc.stdout is not None
        port = 0
        async with asyncio.timeout(BOUND):
            while not port:
                line = (await proc.stdout.readline()).decode()
                assert line, "the emulator exited before listening"
                found = re.search(r"listening on [\d.]+:(\d+)", line)
                port = int(found.group(1)) if found else 0
        yield proc, port
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGCONT)
            proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), BOUND)
        except TimeoutError:
            proc.kill()
            await proc.wait()


async def _http_status(port: int | None, path: str) -> int:
    assert port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    data = await reader.read()
    writer.close()
    return int(data.split(b" ")[1])


def _settled(sidecar: Sidecar) -> bool:
    flights = sidecar.flights
    return (not len(flights) and not flights.running and not flights.settled
            and not sidecar.in_flight)




async def test_a_frozen_upstream_fails_a_herd_and_logins_within_request_timeout_then_recovers(
) -> None:
    async with _emulator_process("--auth") as (proc, port):
        settings = {"request_timeout": 0.5, "heartbeat_interval": 0.2,
                    "heartbeat_timeout": 0.2, "connect_timeout": 0.3}
        async with Sidecar(sidecar_config(("127.0.0.1", port), **settings)) as sidecar:
            admin = await RawClient.connect("127.0.0.1", sidecar.port, credentials=CREDENTIALS)
            await admin.query(KEYSPACE)
            await admin.query("CREATE TABLE ks.kv (k int PRIMARY KEY, v text)")
            await admin.query("INSERT INTO ks.kv (k, v) VALUES (1, 'one')")
            clients = [await RawClient.connect("127.0.0.1", sidecar.port,
                                               credentials=CREDENTIALS) for _ in range(4)]
            # Logged in before the freeze, waiting for their AUTHENTICATE reply to answer.
            logins = [await RawClient.connect("127.0.0.1", sidecar.port, startup=False)
                      for _ in range(6)]
            for login in logins:
                assert (await login.request(Opcode.STARTUP, STARTUP)).opcode == \
                    Opcode.AUTHENTICATE
            os.kill(proc.pid, signal.SIGSTOP)
            loop = asyncio.get_running_loop()
            frozen = loop.time()
            herd = [c.send_query(READ) for c in clients for _ in range(25)]
            token = AuthResponse(b"\x00cassandra\x00cassandra").encode()
            auths = [login.request(Opcode.AUTH_RESPONSE, token) for login in logins]
            done = await asyncio.wait_for(
                asyncio.gather(*herd, *auths, return_exceptions=True), BOUND)
            took = loop.time() - frozen
            assert took < 3 * 0.5 + 1.0, f"requests hung {took:.2f}s with request_timeout 0.5s"
            assert all(f.opcode == Opcode.ERROR for f in done if not isinstance(f, Exception)), \
                [f for f in done if not isinstance(f, Exception) and f.opcode != Opcode.ERROR]
            codes = {Error.decode(f.body).code for f in done if not isinstance(f, Exception)}
            await eventually(lambda: _settled(sidecar))
            async with asyncio.timeout(BOUND):
                while await _http_status(sidecar.metrics_port, "/readyz") != 503:  # noqa: ASYNC110
                    await asyncio.sleep(0.02)

            os.kill(proc.pid, signal.SIGCONT)
            async with asyncio.timeout(BOUND):
                while await _http_status(sidecar.metrics_port, "/readyz") != 200:  # noqa: ASYNC110
                    await asyncio.sleep(0.02)
            honest = await RawClient.connect("127.0.0.1", sidecar.port, credentials=CREDENTIALS)
            assert rows_of(await asyncio.wait_for(honest.send_query(READ), BOUND)) == ONE_ROW
            for client in clients:
                assert rows_of(await asyncio.wait_for(client.send_query(READ), BOUND)) == ONE_ROW
            await eventually(lambda: _settled(sidecar))
            assert codes, codes
            for client in [admin, honest, *clients, *logins]:
                await client.close()
