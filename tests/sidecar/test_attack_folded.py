"""Attack round 7: folded frames (`FrameDecoder.feed_folded`, `ClientConnection`'s runs
joining an offset by comparing only the last 8 body bytes, or nothing).

A folded frame is one equal to the last whole frame before it in its read but for its
stream id and the last 8 bytes of its body. Each test tries to make one be taken for
something it is not: requests whose last 8 bytes matter (no timestamp: a bound value, a
paging state, a page size, the statement's own text, the consistency and flags), folded
headers that are not requests, compressed or payload-carrying folds, folds cut by the
ingest budget or the client's bounds, folds answered from an answer kept for them.

Every answer is compared with what the emulator gives for the same request sent to it
directly, every stream must be answered exactly once, and nothing may be left counted
afterwards (`_clean`, from test_attack_hotpath).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import struct
from collections.abc import Callable
from typing import Any

import pytest

from coalesce.cql import (
    CUSTOM_PAYLOAD,
    TRACING,
    Consistency,
    Error,
    ErrorCode,
    Execute,
    Frame,
    FrameDecoder,
    Opcode,
    Query,
    QueryParameters,
    ResultRows,
    compress_body,
    decode_result,
    encode_frame,
    split_extras,
)
from coalesce.cql.classify import StatementInfo
from coalesce.sidecar.client import ClientConnection
from coalesce.sidecar.peers import HOP, forget_frame
from coalesce.sidecar.proxy import INGEST_BUDGET

from .conftest import BOUND, KS_KV, LoopStack, MakeStack, eventually
from .cqlclient import RawClient
from .test_attack_hotpath import CountingClient, _clean, _connect, _server_side, _settle

pytestmark = pytest.mark.timeout(60)

SETUP = [
    *KS_KV,
    "INSERT INTO ks.kv (k, v) VALUES (2, 'two')",
    "CREATE TABLE ks.big (k bigint PRIMARY KEY, v text)",
    "INSERT INTO ks.big (k, v) VALUES (1, 'b1')",
    "INSERT INTO ks.big (k, v) VALUES (2, 'b2')",
    "INSERT INTO ks.big (k, v) VALUES (258, 'b258')",
    "CREATE TABLE ks.dbl (k double PRIMARY KEY, v text)",
    "INSERT INTO ks.dbl (k, v) VALUES (1.5, 'd1')",
    "INSERT INTO ks.dbl (k, v) VALUES (2.5, 'd2')",
    "CREATE TABLE ks.tsk (k timestamp PRIMARY KEY, v text)",
    "INSERT INTO ks.tsk (k, v) VALUES (1000, 't1')",
    "INSERT INTO ks.tsk (k, v) VALUES (2000, 't2')",
    "CREATE TABLE ks.t (p int, c int, v text, PRIMARY KEY (p, c))",
    "INSERT INTO ks.t (p, c, v) VALUES (1, 1, 'c1')",
    "INSERT INTO ks.t (p, c, v) VALUES (1, 2, 'c2')",
    "INSERT INTO ks.t (p, c, v) VALUES (1, 3, 'c3')",
    "INSERT INTO ks.t (p, c, v) VALUES (1, 4, 'c4')",
]
_BIG = "SELECT v FROM ks.big WHERE k = ?"
_DBL = "SELECT v FROM ks.dbl WHERE k = ?"
_TSK = "SELECT v FROM ks.tsk WHERE k = ?"
_PAGED = "SELECT v FROM ks.t WHERE p = ?"
_KV = "SELECT v FROM ks.kv WHERE k = ?"


class _Spy:
    """What the runs did: folded joins (answered or not), passes beginning with a fold."""

    def __init__(self) -> None:
        self.joined = 0
        self.answered_joined = 0
        self.fold_first = 0


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch) -> _Spy:
    found = _Spy()
    end_run = ClientConnection._end_run
    dispatch_all = ClientConnection._dispatch_all

    def _end_run(self: ClientConnection, run: Any, joined: int) -> None:
        found.joined += joined
        if run[-1]:
            found.answered_joined += joined
        end_run(self, run, joined)

    def _dispatch_all(self: ClientConnection, seq: int, read_at: float,
                      frames: list[Frame | int], src: bytes) -> int:
        if frames and isinstance(frames[0], int):
            found.fold_first += 1
        return dispatch_all(self, seq, read_at, frames, src)

    monkeypatch.setattr(ClientConnection, "_end_run", _end_run)
    monkeypatch.setattr(ClientConnection, "_dispatch_all", _dispatch_all)
    return found


def _int(value: int) -> bytes:
    return value.to_bytes(4, "big", signed=True)


def _long(value: int) -> bytes:
    return value.to_bytes(8, "big", signed=True)


def _double(value: float) -> bytes:
    return struct.pack(">d", value)


class _Env:
    """A ready stack: prepared ids by statement, and an oracle (the emulator, direct)."""

    def __init__(self, stack: LoopStack, admin: CountingClient, direct: RawClient,
                 ids: dict[str, bytes]) -> None:
        self.stack = stack
        self.admin = admin
        self.direct = direct
        self.ids = ids
        self._known: dict[tuple[int, int, bytes], object] = {}

    def execute(self, statement: str, stream: int, params: QueryParameters,
                flags: int = 0) -> bytes:
        body = Execute(self.ids[statement], params).encode()
        return encode_frame(Opcode.EXECUTE, body, stream=stream, flags=flags)

    async def expected(self, frames: list[bytes]) -> list[object]:
        """What the emulator answers to each frame sent to it alone (as a summary)."""
        out = []
        for raw in frames:
            frame = next(iter(FrameDecoder().feed(raw)))
            key = (frame.opcode, frame.flags, frame.body)
            if key not in self._known:
                answer = await self.direct.request(frame.opcode, frame.body, flags=frame.flags)
                self._known[key] = _summary(answer)
            out.append(self._known[key])
        return out

    async def close(self) -> None:
        await self.admin.close()
        await self.direct.close()


def _summary(frame: Frame | BaseException) -> object:
    """Rows and paging state of a RESULT, the code of an ERROR, -1 for no answer."""
    if isinstance(frame, BaseException):
        return -1
    _, body = split_extras(frame.flags, frame.body, response=True)
    if frame.opcode == Opcode.ERROR:
        return ("error", Error.decode(body).code)
    result = decode_result(body)
    if isinstance(result, ResultRows):
        return ("rows", result.rows, result.metadata.paging_state)
    return (frame.opcode, type(result).__name__)


async def _env(loop_stack: MakeStack, **config: Any) -> _Env:
    stack = await loop_stack(**config)
    admin = await _connect(stack)
    for statement in SETUP:
        await admin.query(statement)
    ids = {s: (await admin.prepare(s)).query_id for s in (_BIG, _DBL, _TSK, _PAGED, _KV)}
    direct = await RawClient.connect(stack.emulator.host, stack.emulator.port)
    for s in ids:  # the emulator's own ids are the sidecar's (it passes PREPARE through)
        assert (await direct.prepare(s)).query_id == ids[s]
    return _Env(stack, admin, direct, ids)


def _assert_once(client: CountingClient, streams: list[int]) -> None:
    assert sorted(client.answers) == sorted(streams), "a stream unanswered or a stray answer"
    assert set(client.answers.values()) == {1}, "a stream answered more than once"


async def _burst_and_compare(env: _Env, client: CountingClient, frames: list[bytes], *,
                             hold: bool) -> list[object]:
    """Write `frames` (streams 1..n) in one TCP write; compare every answer with the
    oracle's; check each stream is answered once and nothing is left counted."""
    streams = [FrameDecoder().feed(f)[0].stream for f in frames]
    assert len(set(streams)) == len(streams)
    expected = await env.expected(frames)
    client.answers.clear()
    held = env.stack.emulator.hold_reads() if hold else None
    waiters = client.burst(list(zip(streams, frames, strict=True)))
    if held is not None:
        proxy = env.stack.sidecar._require_proxy()
        await eventually(lambda: proxy.in_flight >= len(frames) - client.answers.total())
        held.release()
    got = [_summary(r) for r in await _settle(waiters)]
    mismatched = [(i, e, g) for i, (e, g) in enumerate(zip(expected, got, strict=True))
                  if e != g]
    assert not mismatched, mismatched[:5]
    _assert_once(client, streams)
    await _clean(env.stack)
    return got


# -- requests whose last 8 bytes matter --------------------------------------------------


def _variants(env: _Env) -> dict[str, Callable[[int, int | None], bytes]]:
    """Families of requests equal but for their last 8 bytes when `ts` is None."""

    def p(values: list[Any] | None, ts: int | None, **kw: Any) -> QueryParameters:
        return QueryParameters(Consistency.ONE, values, timestamp=ts, **kw)

    def query(text: str, stream: int, params: QueryParameters) -> bytes:
        return encode_frame(Opcode.QUERY, Query(text, params).encode(), stream=stream)

    def big(k: int) -> Callable[[int, int | None], bytes]:
        return lambda s, ts: env.execute(_BIG, s, p([_long(k)], ts))

    def dbl(k: float) -> Callable[[int, int | None], bytes]:
        return lambda s, ts: env.execute(_DBL, s, p([_double(k)], ts))

    def tsk(k: int) -> Callable[[int, int | None], bytes]:
        return lambda s, ts: env.execute(_TSK, s, p([_long(k)], ts))

    def page(n: int) -> Callable[[int, int | None], bytes]:
        return lambda s, ts: env.execute(_PAGED, s, p([_int(1)], ts, page_size=n))

    def text(k: int) -> Callable[[int, int | None], bytes]:
        # No values, no parameters: the statement's last 5 characters, the consistency
        # and the flags are the body's last 8 bytes.
        return lambda s, ts: query(f"SELECT v FROM ks.kv WHERE k = {k}", s, p(None, ts))

    def named(k: int) -> Callable[[int, int | None], bytes]:
        return lambda s, ts: query("SELECT v FROM ks.big WHERE k = :k", s,
                                   p([_long(k)], ts, names=["k"]))

    def paged_query(s: int, ts: int | None) -> bytes:
        # Flags in the tail: page size (flags 0x04 + 4 bytes) ...
        return query("SELECT v FROM ks.t WHERE p = 1", s, p(None, ts, page_size=1))

    def serial_query(s: int, ts: int | None) -> bytes:
        # ... against no values and a serial consistency (0x11 + 2 + 2 bytes): same size.
        return query("SELECT v FROM ks.t WHERE p = 1", s,
                     p([], ts, serial_consistency=Consistency.LOCAL_SERIAL))

    return {
        "big1": big(1), "big2": big(2), "big258": big(258), "big3": big(3),
        "dbl1": dbl(1.5), "dbl2": dbl(2.5), "tsk1": tsk(1000), "tsk2": tsk(2000),
        "page1": page(1), "page2": page(2), "page3": page(3), "page100": page(100),
        "text1": text(1), "text2": text(2), "text3": text(3),
        "named1": named(1), "named2": named(2),
        "paged_query": paged_query, "serial_query": serial_query,
    }


def _families() -> list[list[str]]:
    return [["big1", "big2", "big258", "big3"], ["dbl1", "dbl2"], ["tsk1", "tsk2"],
            ["page1", "page2", "page3", "page100"], ["text1", "text2", "text3"],
            ["named1", "named2"], ["paged_query", "serial_query"]]


@pytest.mark.parametrize("family", _families(), ids=lambda f: f[0])
@pytest.mark.parametrize("hold", [True, False], ids=["held", "free"])
async def test_folds_differing_in_significant_last_eight_bytes_are_never_joined(
    loop_stack: MakeStack, family: list[str], hold: bool, spy: _Spy,
) -> None:
    env = await _env(loop_stack)
    make = _variants(env)
    # The bodies of a family really are equal but for their last 8 bytes (so they fold).
    bodies = [FrameDecoder().feed(make[name](1, None))[0].body for name in family]
    assert len({len(b) for b in bodies}) == 1 and len({b[:-8] for b in bodies}) == 1, family
    rng = random.Random(family[0])
    names = [n for n in family for _ in range(6)] + [family[0]] * 5 + family
    rng.shuffle(names)
    names = [family[0]] * 4 + names + [family[-1]] * 3 + [family[0]]
    client = await _connect(env.stack)
    frames = [make[n](s, None) for s, n in enumerate(names, start=1)]
    items, _ = FrameDecoder().feed_folded(b"".join(frames))
    assert sum(isinstance(i, int) for i in items) == len(frames) - 1  # all folded
    await _burst_and_compare(env, client, frames, hold=hold)
    if family[-1] != "serial_query":  # (a serial read shares nothing)
        assert spy.joined >= 5  # folds did join runs: the path was taken
    await client.close()
    await env.close()


async def test_paging_states_differing_in_their_last_bytes_are_different_pages(
    loop_stack: MakeStack, spy: _Spy,
) -> None:
    # An emulator paging state ends with the rows returned so far, in all and in the
    # partition: with a LIMIT, those 8 bytes decide what the next page holds.
    from coalesce.emulator.paging import PagingState

    env = await _env(loop_stack)
    limited = (await env.admin.prepare(_PAGED + " LIMIT 3")).query_id
    assert (await env.direct.prepare(_PAGED + " LIMIT 3")).query_id == limited
    states = [PagingState(_int(1), (_int(1),), returned, 1).encode() for returned in (1, 2, 3)]
    assert len({s[:-8] for s in states}) == 1

    def paged(stream: int, state: bytes) -> bytes:
        body = Execute(limited, QueryParameters(Consistency.ONE, [_int(1)], page_size=1,
                                                paging_state=state)).encode()
        return encode_frame(Opcode.EXECUTE, body, stream=stream)

    order = [0] * 5 + [1] * 5 + [0, 2, 2, 1, 0, 2] * 3
    frames = [paged(s, states[i]) for s, i in enumerate(order, start=1)]
    client = await _connect(env.stack)
    items, _ = FrameDecoder().feed_folded(b"".join(frames))
    assert sum(isinstance(i, int) for i in items) == len(frames) - 1
    for hold in (True, False):
        got = await _burst_and_compare(env, client, frames, hold=hold)
        assert len({str(g) for g in got}) == 3  # three different pages
    assert spy.joined >= 10
    await client.close()
    await env.close()


@pytest.mark.parametrize("bounded", [False, True], ids=["unbounded", "max_requests_5"])
async def test_a_random_herd_of_near_repeats_stamped_and_not_gets_the_oracles_answers(
    loop_stack: MakeStack, bounded: bool, spy: _Spy,
) -> None:
    # Families interleaved at random, some requests stamped (their tail is a timestamp
    # and may differ freely), most not: every answer must be the emulator's own. With
    # max_client_requests 5 most of each burst waits in the backlog (starting with
    # folds), and is answered from kept answers or new flights.
    env = await _env(loop_stack, **({"max_client_requests": 5} if bounded else {}))
    make = _variants(env)
    rng = random.Random(7)
    client = await _connect(env.stack)
    conn = _server_side(env.stack, client)
    for round_ in range(8):
        family = rng.choice(_families()) + rng.choice(_families())
        names: list[str] = []
        while len(names) < 120:
            names += [rng.choice(family)] * rng.randint(1, 12)
        frames = [make[n](s, rng.choice([None, None, rng.randrange(1 << 40)]))
                  for s, n in enumerate(names, start=1)]
        if not bounded:
            await _burst_and_compare(env, client, frames, hold=round_ % 2 == 0)
            continue
        expected = await env.expected(frames)
        client.answers.clear()
        hold = env.stack.emulator.hold_reads() if round_ % 2 == 0 else None
        waiters = client.burst([(s, f) for s, f in enumerate(frames, start=1)])
        if hold is not None:
            await eventually(lambda: conn._pending == 5 and conn._backlog)
            hold.release()
        got = [_summary(r) for r in await _settle(waiters)]
        assert got == expected
        _assert_once(client, list(range(1, len(frames) + 1)))
        await _clean(env.stack)
    assert spy.joined >= 20
    if bounded:
        assert spy.fold_first >= 1
    await client.close()
    await env.close()


async def test_negative_stream_ids_in_a_folded_run_are_answered_on_their_own_streams(
    loop_stack: MakeStack,
) -> None:
    # The stream id of a fold is read from its header bytes as a signed short.
    env = await _env(loop_stack)
    make = _variants(env)
    streams = [7, -1, -32768, 32767, -256, 255, 256, -2]
    frames = [make["big1"](s, None) for s in streams]
    client = await _connect(env.stack)
    got: dict[int, list[Frame]] = {}
    decoder = FrameDecoder()
    client._reader_task.cancel()  # read the answers here: negative streams are not events
    with contextlib.suppress(asyncio.CancelledError):
        await client._reader_task
    client.writer.write(b"".join(frames))
    async with asyncio.timeout(BOUND):
        while sum(len(v) for v in got.values()) < len(frames):
            data = await client.reader.read(65536)
            assert data
            for frame in decoder.feed(data):
                got.setdefault(frame.stream, []).append(frame)
    assert sorted(got) == sorted(streams)
    assert all(len(v) == 1 and _summary(v[0]) == ("rows", [[b"b1"]], None)
               for v in got.values())
    await _clean(env.stack)
    client.writer.close()
    await env.close()


async def test_a_stamped_read_then_unstamped_near_repeats_split_correctly(
    loop_stack: MakeStack,
) -> None:
    # The run's key holds the last 8 bytes only when the frame that began it has no
    # timestamp: a stamped run must not swallow unstamped requests whose tail is a key.
    env = await _env(loop_stack)
    make = _variants(env)
    frames = []
    for s in range(1, 61):
        name = ("big1", "big2")[(s // 7) % 2]
        frames.append(make[name](s, 5000 + s if s % 3 else None))
    client = await _connect(env.stack)
    await _burst_and_compare(env, client, frames, hold=True)
    await client.close()
    await env.close()


async def test_short_bodies_folded_whole_are_each_answered_for_themselves(
    loop_stack: MakeStack,
) -> None:
    # Bodies of at most 8 bytes fold whatever they hold: OPTIONS (empty), PREPAREs and
    # QUERYs of one or four characters (5, 8 bytes), REGISTER: each answered as itself.
    env = await _env(loop_stack)
    frames: list[bytes] = []
    s = 0

    def add(opcode: int, body: bytes, count: int = 3) -> None:
        nonlocal s
        for _ in range(count):
            s += 1
            frames.append(encode_frame(opcode, body, stream=s))

    add(Opcode.OPTIONS, b"")
    for text in ("x", "y", "USE ", "ab c"):
        add(Opcode.PREPARE, _int(len(text)) + text.encode())
    for text in ("a", "b"):
        add(Opcode.QUERY, _int(len(text)) + text.encode() + b"\x00\x01\x00")
    client = await _connect(env.stack)
    items, _ = FrameDecoder().feed_folded(b"".join(frames))
    assert any(isinstance(i, int) for i in items)
    client.answers.clear()
    waiters = client.burst([(i + 1, f) for i, f in enumerate(frames)])
    answers = await _settle(waiters)
    got = [(a.opcode if isinstance(a, Frame) else -1) for a in answers]
    assert got[:3] == [Opcode.SUPPORTED] * 3
    assert all(g == Opcode.ERROR for g in got[3:]), got
    # Errors name what they refuse: each error is the emulator's for that very body.
    for frame, answer in zip(frames[3:], answers[3:], strict=True):
        decoded = FrameDecoder().feed(frame)[0]
        direct = await env.direct.request(decoded.opcode, decoded.body)
        assert isinstance(answer, Frame)
        assert Error.decode(answer.body).code == Error.decode(direct.body).code
    _assert_once(client, list(range(1, len(frames) + 1)))
    await _clean(env.stack)
    await client.close()
    await env.close()


# -- folded headers that are not v4 requests ---------------------------------------------


@pytest.mark.parametrize("version_byte", [0x84, 0x03], ids=["response", "v3"])
async def test_folded_frames_with_a_bad_header_still_close_the_connection(
    loop_stack: MakeStack, version_byte: int,
) -> None:
    env = await _env(loop_stack)
    make = _variants(env)
    good = [make["big1"](s, None) for s in range(1, 6)]
    bad = [bytes([version_byte]) + make["big1"](s, None)[1:] for s in range(6, 16)]
    client = await _connect(env.stack)
    conn = _server_side(env.stack, client)
    for s in range(1, 16):
        client.expect(s)
    client.writer.write(b"".join(good + bad + good))
    await asyncio.wait_for(client.closed.wait(), BOUND)
    assert conn._closed
    # Nothing from the bad frames on was taken as a request.
    assert all(client.answers[s] <= 1 for s in range(1, 16))
    assert sum(client.answers[s] for s in range(7, 16)) == 0
    await _clean(env.stack)
    await env.close()


async def test_a_run_followed_by_a_response_bit_repeat_closes_on_it(
    loop_stack: MakeStack,
) -> None:
    # The repeat with the response bit is not folded (header byte 0 differs) but the
    # folds after it are folds of it: none may join the run before it.
    env = await _env(loop_stack)
    make = _variants(env)
    frames = [make["big1"](s, None) for s in range(1, 21)]
    frames[10] = b"\x84" + frames[10][1:]
    client = await _connect(env.stack)
    hold = env.stack.emulator.hold_reads()
    waiters = client.burst([(s, f) for s, f in enumerate(frames, start=1)])
    await asyncio.wait_for(client.closed.wait(), BOUND)
    hold.release()
    results = await _settle(waiters)
    assert all(_summary(r) in (-1, ("error", ErrorCode.PROTOCOL_ERROR),
                               ("rows", [[b"b1"]], None)) for r in results)
    assert all(_summary(r) == -1 for r in results[11:])  # after the bad frame: nothing
    await _clean(env.stack)
    await env.close()


# -- compressed, payload-carrying and traced folds ---------------------------------------


async def test_compressed_folds_that_decompress_to_different_requests(
    loop_stack: MakeStack,
) -> None:
    # LZ4 ends a block with literals: bigint keys 1 and 2 compress to bodies equal but
    # in their last bytes, so they fold; decompressed, they are different reads.
    env = await _env(loop_stack)
    client = await CountingClient.connect("127.0.0.1", env.stack.sidecar.port, lz4=True)
    assert isinstance(client, CountingClient)
    keys = [1] * 5 + [2] * 5 + [258, 1, 2] * 4
    plain = [Execute(env.ids[_BIG], QueryParameters(Consistency.ONE, [_long(k)])).encode()
             for k in keys]
    packed = [compress_body(b) for b in plain]
    assert len({len(b) for b in packed}) == 1 and len({b[:-8] for b in packed}) == 1
    frames = [encode_frame(Opcode.EXECUTE, b, stream=s, flags=0x01)
              for s, b in enumerate(packed, start=1)]
    items, _ = FrameDecoder().feed_folded(b"".join(frames))
    assert sum(isinstance(i, int) for i in items) == len(frames) - 1
    client.answers.clear()
    hold = env.stack.emulator.hold_reads()
    waiters = client.burst([(s, f) for s, f in enumerate(frames, start=1)])
    await eventually(lambda: len(hold) == 3)
    hold.release()
    got = [_summary(r) for r in await _settle(waiters)]
    assert got == [("rows", [[f"b{k}".encode()]], None) for k in keys]
    _assert_once(client, list(range(1, len(frames) + 1)))
    await _clean(env.stack)
    await client.close()
    await env.close()


async def test_payload_frames_folded_after_a_read_are_each_served_for_themselves(
    loop_stack: MakeStack,
) -> None:
    # A read, then hop-marked reads of other keys (custom payload: no run; folded among
    # themselves), then forgets folded among themselves, then reads again.
    env = await _env(loop_stack)
    make = _variants(env)

    def hop(stream: int, k: int) -> bytes:
        body = HOP + Execute(env.ids[_BIG], QueryParameters(Consistency.ONE,
                                                            [_long(k)])).encode()
        return encode_frame(Opcode.EXECUTE, body, stream=stream, flags=CUSTOM_PAYLOAD)

    def forget(stream: int, k: int) -> bytes:
        body = forget_frame(StatementInfo("update", "ks", "big"), None, _long(k))
        return encode_frame(Opcode.QUERY, body, stream=stream, flags=CUSTOM_PAYLOAD)

    frames = [make["big1"](1, None), make["big1"](2, None)]
    frames += [hop(s, (1, 2, 258)[s % 3]) for s in range(3, 15)]
    frames += [forget(s, (1, 2)[s % 2]) for s in range(15, 21)]
    frames += [make[("big1", "big2")[s % 2]](s, None) for s in range(21, 31)]
    client = await _connect(env.stack)
    items, _ = FrameDecoder().feed_folded(b"".join(frames))
    assert sum(isinstance(i, int) for i in items) >= 20
    client.answers.clear()
    waiters = client.burst([(s, f) for s, f in enumerate(frames, start=1)])
    got = [_summary(r) for r in await _settle(waiters)]
    want: list[object] = [("rows", [[b"b1"]], None)] * 2
    want += [("rows", [[f"b{(1, 2, 258)[s % 3]}".encode()]], None) for s in range(3, 15)]
    want += [(Opcode.RESULT, "ResultVoid")] * 6
    want += [("rows", [[f"b{(1, 2)[s % 2]}".encode()]], None) for s in range(21, 31)]
    assert got == want
    _assert_once(client, list(range(1, 31)))
    await _clean(env.stack)
    await client.close()
    await env.close()


async def test_traced_folds_are_each_forwarded_and_answered_with_their_own_rows(
    loop_stack: MakeStack,
) -> None:
    env = await _env(loop_stack)
    frames = [env.execute(_BIG, s, QueryParameters(Consistency.ONE, [_long((1, 2)[s % 2])]),
                          flags=TRACING) for s in range(1, 21)]
    frames += [env.execute(_BIG, s, QueryParameters(Consistency.ONE, [_long(1)]))
               for s in range(21, 31)]
    client = await _connect(env.stack)
    await _burst_and_compare(env, client, frames, hold=True)
    await client.close()
    await env.close()


# -- bounds, the ingest budget and answered runs across folds ----------------------------


async def test_the_ingest_budget_cuts_a_read_in_the_middle_of_its_folds(
    loop_stack: MakeStack, spy: _Spy,
) -> None:
    # More frames in one read than the ingest budget: the backlog starts with folded
    # items (ints); their keys alternate in blocks so the cut lands inside a run.
    env = await _env(loop_stack)
    make = _variants(env)
    n = INGEST_BUDGET * 3 + 17
    names = [("big1", "big2", "big258")[(s // 37) % 3] for s in range(1, n + 1)]
    frames = [make[name](s, None) for s, name in enumerate(names, start=1)]
    client = await _connect(env.stack)
    for hold in (True, False):
        await _burst_and_compare(env, client, frames, hold=hold)
    assert spy.fold_first >= 2  # the backlog did begin with a fold
    assert spy.joined >= len(frames)
    await client.close()
    await env.close()


async def test_the_budget_cut_backlog_meets_an_answer_kept_for_it(
    loop_stack: MakeStack, spy: _Spy,
) -> None:
    # Two clients share the budget; the first's read is cut, its flight answered before
    # the backlog (all folds) is dispatched: those folds are answered from the kept
    # answer, in answered runs, and never with another key's rows.
    env = await _env(loop_stack)
    make = _variants(env)
    a, b = await _connect(env.stack), await _connect(env.stack)
    n = INGEST_BUDGET * 2 + 5
    names = [("big1", "big2")[(s * 7 // 50) % 2] for s in range(1, n + 1)]
    frames = [make[name](s, None) for s, name in enumerate(names, start=1)]
    expected = await env.expected(frames)
    a.answers.clear()
    b.answers.clear()
    wa = a.burst([(s, f) for s, f in enumerate(frames, start=1)])
    wb = b.burst([(s, f) for s, f in enumerate(frames, start=1)])
    ga = [_summary(r) for r in await _settle(wa)]
    gb = [_summary(r) for r in await _settle(wb)]
    assert ga == expected and gb == expected
    assert spy.fold_first >= 1
    _assert_once(a, list(range(1, n + 1)))
    _assert_once(b, list(range(1, n + 1)))
    await _clean(env.stack)
    for c in (a, b):
        await c.close()
    await env.close()


@pytest.mark.parametrize("stamped", [False, True])
async def test_answered_runs_of_folds_from_the_backlog_keep_their_keys(
    loop_stack: MakeStack, stamped: bool, spy: _Spy,
) -> None:
    # max_client_requests 4: the first reads join held flights, the rest wait unread in
    # the backlog (folded). Released, the flights are answered; the backlog's folds were
    # read before the answers came, so they are answered from the kept answers, in
    # answered runs that must still tell big1 from big2 by the tail.
    env = await _env(loop_stack, max_client_requests=4)
    make = _variants(env)
    names = ["big1"] * 2 + ["big2"] * 2 + (["big1"] * 9 + ["big2"] * 9) * 3 + ["big1"]
    frames = [make[name](s, 900 + s if stamped else None)
              for s, name in enumerate(names, start=1)]
    client = await _connect(env.stack)
    expected = await env.expected(frames)
    client.answers.clear()
    hold = env.stack.emulator.hold_reads()
    waiters = client.burst([(s, f) for s, f in enumerate(frames, start=1)])
    conn = _server_side(env.stack, client)
    await eventually(lambda: len(hold) == 2 and conn._pending == 4 and conn._backlog)
    if not stamped:
        assert isinstance(conn._backlog[0][2][0], int)  # the backlog starts with a fold
    hold.release()
    got = [_summary(r) for r in await _settle(waiters)]
    assert got == expected
    assert spy.answered_joined >= 8  # answered runs took folds
    _assert_once(client, list(range(1, len(frames) + 1)))
    await _clean(env.stack)
    await client.close()
    await env.close()


async def test_max_waiters_crossed_inside_a_folded_run_refuses_exactly_the_excess(
    loop_stack: MakeStack, spy: _Spy,
) -> None:
    env = await _env(loop_stack, max_waiters=7)
    make = _variants(env)
    names = ["big1"] * 20 + ["big2"] * 20 + ["big1"] * 5
    frames = [make[name](s, None) for s, name in enumerate(names, start=1)]
    client = await _connect(env.stack)
    client.answers.clear()
    hold = env.stack.emulator.hold_reads()
    waiters = client.burst([(s, f) for s, f in enumerate(frames, start=1)])
    await eventually(lambda: len(hold) == 2 and client.answers.total() == len(frames) - 14)
    hold.release()
    got = [_summary(r) for r in await _settle(waiters)]
    overloaded = ("error", ErrorCode.OVERLOADED)
    assert got[:7] == [("rows", [[b"b1"]], None)] * 7
    assert got[7:20] == [overloaded] * 13
    assert got[20:27] == [("rows", [[b"b2"]], None)] * 7
    assert got[27:] == [overloaded] * 18
    assert spy.joined == 12  # 6 + 6 folds joined runs; the excess was refused
    _assert_once(client, list(range(1, len(frames) + 1)))
    await _clean(env.stack)
    await client.close()
    await env.close()


@pytest.mark.parametrize("side", ["client", "sidecar"])
async def test_a_client_gone_with_folds_in_its_backlog_leaves_nothing(
    loop_stack: MakeStack, side: str,
) -> None:
    env = await _env(loop_stack, max_client_requests=3)
    make = _variants(env)
    frames = [make[("big1", "big2")[(s // 5) % 2]](s, None) for s in range(1, 200)]
    client = await _connect(env.stack)
    hold = env.stack.emulator.hold_reads()
    client.burst([(s, f) for s, f in enumerate(frames, start=1)])
    conn = _server_side(env.stack, client)
    await eventually(lambda: conn._pending == 3 and conn._backlog)
    assert any(isinstance(i, int) for _, _, items, _ in conn._backlog for i in items)
    if side == "client":
        # Its reading paused, the sidecar learns of it when it writes the answers.
        client.writer.transport.abort()
        hold.release()
    else:
        conn.abort()
        hold.release()
    await eventually(lambda: conn._closed)
    await _clean(env.stack)
    assert not conn._backlog
    await env.close()


async def test_a_write_between_folded_reads_in_one_tcp_write(loop_stack: MakeStack) -> None:
    # Reads, a write of their key, the same reads again, folded on both sides of it.
    env = await _env(loop_stack)
    make = _variants(env)
    write_id = (await env.admin.prepare("UPDATE ks.big SET v = ? WHERE k = ?")).query_id
    frames = [make["big1"](s, None) for s in range(1, 21)]
    frames.append(encode_frame(Opcode.EXECUTE, Execute(write_id, QueryParameters(
        Consistency.ONE, [b"new", _long(1)])).encode(), stream=21))
    frames += [make[("big1", "big2")[s % 2]](s, None) for s in range(22, 42)]
    client = await _connect(env.stack)
    client.answers.clear()
    waiters = client.burst([(s, f) for s, f in enumerate(frames, start=1)])
    got = [_summary(r) for r in await _settle(waiters)]
    old, new = ("rows", [[b"b1"]], None), ("rows", [[b"new"]], None)
    assert all(g in (old, new) for g in got[:20]), got[:20]
    assert got[20] == (Opcode.RESULT, "ResultVoid")
    for s in range(22, 42):
        g = got[s - 1]
        assert g == ((old, new) if s % 2 == 0 else ("rows", [[b"b2"]], None)) or (
            s % 2 == 0 and g in (old, new)), (s, g)
    _assert_once(client, list(range(1, 42)))
    await _clean(env.stack)
    # Afterwards, a fresh read sees the write.
    assert _summary(await client.send_execute(env.ids[_BIG], [_long(1)])) == new
    await client.close()
    await env.close()
