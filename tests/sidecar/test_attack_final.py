"""Attack round 5: the runs fast path and the ring member's exemption from the ingest
budget, from a hostile client.

An answered run (requests read before their flight's answer came, answered together in
one buffer) must not let a client that never reads make the sidecar hold more than its
answer bounds; a connection that marks one read as a ring member's must not get the
loop to itself.
"""

from __future__ import annotations

import asyncio
import base64
import os
import socket
from typing import Any

import pytest

from coalesce.cql import (
    CUSTOM_PAYLOAD,
    Consistency,
    Opcode,
    Query,
    QueryParameters,
    Startup,
    encode_frame,
)
from coalesce.sidecar.peers import HOP

from .conftest import BOUND, KS_KV, LoopStack, MakeStack, eventually
from .cqlclient import RawClient, rows_of

pytestmark = pytest.mark.timeout(60)

SETUP = KS_KV
STARTUP = Startup({"CQL_VERSION": "3.0.0"}).encode()
KIB = 1024


def _query(text: str, stream: int, flags: int = 0, prefix: bytes = b"") -> bytes:
    body = Query(text, QueryParameters(Consistency.ONE)).encode()
    return encode_frame(Opcode.QUERY, prefix + body, stream=stream, flags=flags)


async def _ready(loop_stack: MakeStack, **config: Any) -> tuple[LoopStack, RawClient]:
    stack = await loop_stack(**config)
    admin = await RawClient.connect("127.0.0.1", stack.sidecar.port)
    for statement in SETUP:
        await admin.query(statement)
    return stack, admin


async def _deaf(port: int) -> socket.socket:
    """A ready client socket that will read nothing more (a small receive buffer)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, ("127.0.0.1", port))
    await loop.sock_sendall(sock, encode_frame(Opcode.STARTUP, STARTUP, stream=0))
    got = b""
    async with asyncio.timeout(BOUND):
        while len(got) < 9:
            got += await loop.sock_recv(sock, 9 - len(got))
    assert got[4] == Opcode.READY
    return sock


def _connection(stack: LoopStack, sock: socket.socket) -> Any:
    port = sock.getsockname()[1]
    return next(c for c in stack.sidecar._clients
                if c._transport.get_extra_info("peername")[1] == port)


# -- an answered run to a client that never reads -------------------------------------


async def test_an_answered_run_to_a_deaf_client_stays_within_the_hard_buffer_limit(
    loop_stack: MakeStack,
) -> None:
    # The deaf client's 300 identical reads of a ~60 KiB row wait in its backlog (it is
    # at max_client_requests), read before their flight's answer came; once it comes they
    # are answered as one run, in one buffer. Unsent answers past 4x max_client_buffer
    # must become OVERLOADED errors however they are written.
    buffer = 64 * KIB
    stack, admin = await _ready(loop_stack, max_client_requests=2, max_client_buffer=buffer)
    noise = base64.b64encode(os.urandom(45 * KIB)).decode()  # ~60 KiB
    await admin.query(f"INSERT INTO ks.kv (k, v) VALUES (2, '{noise}')")
    big = "SELECT v FROM ks.kv WHERE k = 2"
    proxy = stack.sidecar._require_proxy()
    deaf = await _deaf(stack.sidecar.port)
    conn = _connection(stack, deaf)
    flooder = await RawClient.connect("127.0.0.1", stack.sidecar.port)
    loop = asyncio.get_running_loop()
    hold = stack.emulator.hold_reads()
    await loop.sock_sendall(deaf, _query(big, 1))
    await eventually(lambda: len(hold) == 1)
    flooder.writer.write(encode_frame(Opcode.OPTIONS, b"", stream=0) * 20_000)
    await eventually(lambda: proxy.backlogged)
    frames = [_query("SELECT v FROM ks.kv WHERE k = 3", 2)]
    frames += [_query(big, s) for s in range(3, 303)]
    await loop.sock_sendall(deaf, b"".join(frames))
    await eventually(lambda: len(hold) == 2)
    await eventually(lambda: sum(len(f) for _, _, f, _ in conn._backlog) == 300)
    peak = 0
    watching = True

    def watch() -> None:
        nonlocal peak
        transport = conn._transport
        if transport is not None and not transport.is_closing():
            peak = max(peak, transport.get_write_buffer_size())
        if watching:
            loop.call_soon(watch)

    watch()
    hold._pending.pop(0)()  # the big read's answer: the run of 300 is answered from it
    await eventually(lambda: not conn._backlog or conn._write_paused)
    await eventually(lambda: not proxy.backlogged)
    watching = False
    hold.close()
    hold.release()
    try:
        assert peak <= 4 * buffer + 2 * 64 * KIB, (
            f"{peak / 2**20:.1f} MiB unsent to a client that reads nothing "
            f"(hard limit {4 * buffer / 2**20:.2f} MiB)")
    finally:
        deaf.close()
        await flooder.close()
        await eventually(lambda: not stack.sidecar.in_flight)
        await admin.close()


# -- the ring member's exemption from the ingest budget ------------------------------


def _execute_unknown(stream: int, prefix: bytes = b"", flags: int = 0) -> bytes:
    # An EXECUTE of an id nobody prepared: answered at once (UNPREPARED), never pending.
    body = (b"\x00\x10" + b"\xee" * 16 + b"\x00\x01" + b"\x00")  # ONE, no values
    return encode_frame(Opcode.EXECUTE, prefix + body, stream=stream, flags=flags)


@pytest.mark.parametrize("flood", ["options", "hop-unprepared", "options-unmarked"])
async def test_a_client_marking_one_read_as_a_members_does_not_get_the_loop_to_itself(
    loop_stack: MakeStack, flood: str,
) -> None:
    # Any client can send one hop-marked read. Whatever it sends after it must still be
    # dispatched within the shared ingest budget, a budget's worth per refill, or one
    # read of ~30,000 tiny frames keeps the loop from every other client's answer.
    stack, admin = await _ready(loop_stack)
    proxy = stack.sidecar._require_proxy()
    attacker = await RawClient.connect("127.0.0.1", stack.sidecar.port)
    marked = attacker.expect(1)
    hop = (CUSTOM_PAYLOAD, HOP) if flood != "options-unmarked" else (0, b"")
    attacker.writer.write(_query("SELECT v FROM ks.kv WHERE k = 1", 1, *hop))
    assert rows_of(await asyncio.wait_for(marked, BOUND)) == [[b"one"]]
    if flood.startswith("options"):
        total, frames = 28_000, encode_frame(Opcode.OPTIONS, b"", stream=7)
    else:
        total, frames = 6_000, _execute_unknown(7, HOP, CUSTOM_PAYLOAD)
    loop = asyncio.get_running_loop()
    worst = 0
    last = sum(proxy.stats.frames)
    watching = True

    def watch() -> None:  # frames dispatched in each loop turn
        nonlocal worst, last
        now = sum(proxy.stats.frames)
        worst = max(worst, now - last)
        last = now
        if watching:
            loop.call_soon(watch)

    start = sum(proxy.stats.frames)
    watch()
    attacker.writer.write(frames * total)
    await eventually(lambda: sum(proxy.stats.frames) - start >= total)
    watching = False
    last_answer = attacker.expect(8)
    attacker.writer.write(encode_frame(Opcode.OPTIONS, b"", stream=8))
    await asyncio.wait_for(last_answer, BOUND)
    assert worst <= 2 * 256, f"{worst} frames of one client dispatched in one loop turn"
    await attacker.close()
    await admin.close()
