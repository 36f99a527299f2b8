"""Wire-level behaviour: handshake, streams, compression, and what malformed input does.

Malformed input must close only the offending connection, after a
PROTOCOL_ERROR on its stream where one can be read, while real driver
sessions on the same emulator keep being served.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import AsyncIterator, Iterator
from typing import Any

import acsylla
import pytest
from cassandra.cluster import Cluster, Session
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from coalesce.cql.codes import ErrorCode
from coalesce.cql.frame import COMPRESSION, FrameDecoder, Opcode, decompress_body, encode_frame
from coalesce.cql.messages import Error, Options, Query, QueryParameters, Startup, Supported
from coalesce.emulator import Emulator, EmulatorThread
from tests.conftest import examples
from tests.emulator.rawcql import RawConnection, rows_of

pytestmark = pytest.mark.timeout(60)

HEADER = struct.Struct(">BBhBi")


def error_of(frame: Any) -> Error:
    assert frame is not None and frame.opcode == Opcode.ERROR, frame
    return Error.decode(frame.body)


@pytest.fixture
async def bystander(emulator: Emulator) -> AsyncIterator[Any]:
    """A real acsylla session on the same emulator, to prove it keeps being served."""
    cluster = acsylla.create_cluster([emulator.host], port=emulator.port, log_level="error")
    session = await cluster.create_session()
    try:
        yield session
    finally:
        await session.close()


async def assert_served(session: Any) -> None:
    result = await session.execute(acsylla.create_statement("SELECT key FROM system.local"))
    assert result.first().as_dict()["key"] == "local"


async def test_options_lists_versions_and_lz4(emulator: Emulator) -> None:
    async with await RawConnection.open(emulator.host, emulator.port) as conn:
        await conn.send(Opcode.OPTIONS, Options().encode(), stream=3)
        frame = await conn.read_frame()
        assert frame is not None and frame.opcode == Opcode.SUPPORTED and frame.stream == 3
        options = Supported.decode(frame.body).options
        assert options["PROTOCOL_VERSIONS"] == ["3/v3", "4/v4"]
        assert options["COMPRESSION"] == ["lz4"]
        assert options["CQL_VERSION"] == ["3.3.1"]


async def test_version_probe_is_refused_on_its_stream_and_the_connection_stays_usable(
    emulator: Emulator,
) -> None:
    async with await RawConnection.open(emulator.host, emulator.port) as conn:
        await conn.send(Opcode.OPTIONS, b"", stream=7, version=5)
        reply = await conn.read_frame()
        assert reply is not None and reply.stream == 7 and reply.version == 4
        assert "unsupported protocol version" in error_of(reply).message.lower()
        await conn.startup()
        rows = rows_of(await conn.query("SELECT key FROM system.local"))
        assert rows == [["local"]]


async def test_queries_before_startup_are_a_protocol_error(emulator: Emulator) -> None:
    async with await RawConnection.open(emulator.host, emulator.port) as conn:
        await conn.send(Opcode.QUERY, Query("SELECT 1", QueryParameters(1)).encode(), stream=9)
        error = error_of(await conn.read_frame())
        assert error.code == ErrorCode.PROTOCOL_ERROR
        assert await conn.closed_by_server()


async def test_many_streams_on_one_connection_each_get_their_own_answer(
    emulator: Emulator,
) -> None:
    async with await RawConnection.open(emulator.host, emulator.port) as conn:
        await conn.startup()
        body = Query("SELECT key FROM system.local", QueryParameters(1)).encode()
        await conn.send_raw(
            b"".join(encode_frame(Opcode.QUERY, body, stream=s) for s in range(1, 101))
        )
        streams = set()
        for _ in range(100):
            frame = await conn.read_frame()
            assert frame is not None and frame.opcode == Opcode.RESULT
            streams.add(frame.stream)
        assert streams == set(range(1, 101))


async def test_lz4_compression_is_negotiated_and_used(emulator: Emulator) -> None:
    async with await RawConnection.open(emulator.host, emulator.port) as conn:
        startup = Startup({"CQL_VERSION": "3.0.0", "COMPRESSION": "lz4"}).encode()
        await conn.send(Opcode.STARTUP, startup, stream=1)
        ready = await conn.read_frame()
        assert ready is not None and ready.opcode == Opcode.READY
        body = Query("SELECT key FROM system.local", QueryParameters(1)).encode()
        from coalesce.cql.frame import compress_body

        await conn.send_raw(
            encode_frame(Opcode.QUERY, compress_body(body), stream=2, flags=COMPRESSION)
        )
        frame = await conn.read_frame()
        assert frame is not None and frame.flags & COMPRESSION
        plain = frame._replace(body=decompress_body(frame.body), flags=0)
        assert rows_of(plain) == [["local"]]


async def test_unknown_compression_is_refused(emulator: Emulator) -> None:
    async with await RawConnection.open(emulator.host, emulator.port) as conn:
        await conn.send(
            Opcode.STARTUP,
            Startup({"CQL_VERSION": "3.0.0", "COMPRESSION": "snappy"}).encode(),
            stream=4,
        )
        error = error_of(await conn.read_frame())
        assert error.code == ErrorCode.PROTOCOL_ERROR
        assert "snappy" in error.message


def _query_frame(stream: int) -> bytes:
    return encode_frame(
        Opcode.QUERY,
        Query("SELECT key FROM system.local", QueryParameters(1)).encode(),
        stream=stream,
    )


MALFORMED: dict[str, tuple[bytes, int | None]] = {
    "unknown opcode": (HEADER.pack(4, 0, 11, 0x55, 0), 11),
    "response opcode from a client": (HEADER.pack(4, 0, 12, Opcode.RESULT, 0), 12),
    "oversized length": (HEADER.pack(4, 0, 13, Opcode.QUERY, 0x7FFFFFFF), 13),
    "negative length": (HEADER.pack(4, 0, 14, Opcode.QUERY, -5), 14),
    "truncated body": (HEADER.pack(4, 0, 15, Opcode.QUERY, 6) + b"\x00\x00\x03\xe8ab", 15),
    "wrong length swallowing the next header": (
        HEADER.pack(4, 0, 16, Opcode.QUERY, 3) + b"abc" + b"\x42" * 20,
        None,
    ),
    "garbage": (b"\xde\xad\xbe\xef" * 8, None),
    "undecodable startup": (HEADER.pack(4, 0, 17, Opcode.STARTUP, 4) + b"\xff\xff\x00\x01", 17),
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
async def test_malformed_input_closes_only_that_connection(
    emulator: Emulator, bystander: Any, name: str
) -> None:
    data, stream = MALFORMED[name]
    healthy = await RawConnection.open(emulator.host, emulator.port)
    await healthy.startup()
    async with await RawConnection.open(emulator.host, emulator.port) as bad:
        if name not in ("undecodable startup",):
            await bad.startup()
        await bad.send_raw(data)
        frame = await bad.read_frame()
        if frame is not None:
            error = error_of(frame)
            assert error.code == ErrorCode.PROTOCOL_ERROR
            if stream is not None:
                assert frame.stream == stream
        assert await bad.closed_by_server()
    assert rows_of(await healthy.query("SELECT key FROM system.local")) == [["local"]]
    await healthy.aclose()
    await assert_served(bystander)


async def test_a_half_sent_frame_then_eof_just_closes(emulator: Emulator) -> None:
    conn = await RawConnection.open(emulator.host, emulator.port)
    await conn.startup()
    await conn.send_raw(_query_frame(5)[:12])
    conn.writer.write_eof()
    assert await conn.closed_by_server()
    await conn.aclose()
    assert emulator.running


# ----------------------------------------------------------------- fuzzing


@pytest.fixture(scope="module")
def driver_session(emulator_thread: EmulatorThread) -> Iterator[Session]:
    cluster = Cluster([emulator_thread.host], port=emulator_thread.port, protocol_version=4)
    try:
        yield cluster.connect()
    finally:
        cluster.shutdown()


def _exchange(host: str, port: int, payload: bytes) -> bytes:
    """Send `payload`, half-close, and return everything the server says before closing."""
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        while True:
            try:
                data = sock.recv(65536)
            except ConnectionResetError:
                break
            if not data:
                break
            chunks.append(data)
        return b"".join(chunks)


_STARTUP = encode_frame(Opcode.STARTUP, Startup({"CQL_VERSION": "3.0.0"}).encode(), stream=0)


@settings(
    max_examples=examples(60),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    prefix=st.sampled_from([b"", _STARTUP]),
    payload=st.one_of(
        st.binary(max_size=200),
        st.builds(
            lambda version, flags, stream, opcode, body: (
                HEADER.pack(version, flags, stream, opcode, len(body)) + body
            ),
            st.sampled_from([3, 4, 5, 0x84, 0x42, 1]),
            st.integers(0, 255),
            st.integers(-32768, 32767),
            st.integers(0, 255),
            st.binary(max_size=64),
        ),
    ),
)
def test_fuzzed_input_never_hangs_or_hurts_other_clients(
    emulator_thread: EmulatorThread,
    driver_session: Session,
    caplog: pytest.LogCaptureFixture,
    prefix: bytes,
    payload: bytes,
) -> None:
    reply = _exchange(emulator_thread.host, emulator_thread.port, prefix + payload)
    # Whatever came back must be well-formed response frames.
    for frame in FrameDecoder().feed(reply):
        assert frame.is_response
    assert driver_session.execute("SELECT key FROM system.local").one().key == "local"
    # No request made the emulator hit a bug (those are logged, then answered SERVER_ERROR).
    assert not [r for r in caplog.records if r.name.startswith("coalesce.emulator")]


async def test_closing_a_connection_with_requests_in_flight_is_harmless(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with Emulator(read_latency=0.02, shards=1) as emu:
        setup = await RawConnection.open(emu.host, emu.port)
        await setup.startup()
        for text in (
            "CREATE KEYSPACE k WITH replication = "
            "{'class': 'SimpleStrategy', 'replication_factor': 1}",
            "CREATE TABLE k.t (p int PRIMARY KEY, v int)",
        ):
            assert (await setup.query(text)).opcode == Opcode.RESULT
        select = Query("SELECT * FROM k.t WHERE p = 1", QueryParameters(1)).encode()
        doomed = await RawConnection.open(emu.host, emu.port)
        await doomed.startup()
        await doomed.send_raw(
            b"".join(encode_frame(Opcode.QUERY, select, stream=s) for s in range(1, 6))
        )
        # The doomed requests are queued once the shard is busy with them.
        await emu.wait_for_statements("select", 5)
        assert emu.shard_queue_depths() == [5]
        await doomed.aclose()
        # One shard serves FIFO: this answer comes after all the doomed ones were due.
        frame = await setup.query("SELECT * FROM k.t WHERE p = 1", stream=2)
        assert frame.opcode == Opcode.RESULT
        assert emu.shard_queue_depths() == [0]
        await setup.aclose()
    assert not [r for r in caplog.records if r.name.startswith("coalesce.emulator")]


async def test_registered_connections_receive_schema_change_events(emulator: Emulator) -> None:
    from coalesce.cql.messages import Event, Register, SchemaChangeEvent

    async with (
        await RawConnection.open(emulator.host, emulator.port) as listener,
        await RawConnection.open(emulator.host, emulator.port) as actor,
    ):
        await listener.startup()
        await listener.send(Opcode.REGISTER, Register(["SCHEMA_CHANGE"]).encode(), stream=2)
        ready = await listener.read_frame()
        assert ready is not None and ready.opcode == Opcode.READY
        await actor.startup()
        await actor.query(
            "CREATE KEYSPACE evks WITH replication = "
            "{'class': 'SimpleStrategy', 'replication_factor': 1}"
        )
        event = await listener.read_frame()
        assert event is not None and event.opcode == Opcode.EVENT and event.stream == -1
        assert Event.decode(event.body) == SchemaChangeEvent("CREATED", "KEYSPACE", "evks")
