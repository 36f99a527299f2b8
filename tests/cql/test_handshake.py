"""Protocol version downgrade and compression negotiation, against the real driver."""

from __future__ import annotations

import socketserver
import threading
from collections.abc import Iterator

import pytest
from cassandra.cluster import Cluster, NoHostAvailable
from cassandra.protocol import ProtocolException

from coalesce.cql import (
    COMPRESSION,
    DEFAULT_SUPPORTED,
    CQLProtocolError,
    Error,
    ErrorCode,
    FrameDecoder,
    Opcode,
    ProtocolVersionError,
    Register,
    Startup,
    Supported,
    UnsupportedCompressionError,
    decode_message,
    decompress_body,
    encode_frame,
    negotiate_compression,
    unsupported_version_reply,
)
from tests.cql.driver_codec import driver_decode


def test_unsupported_version_reply_is_a_v4_protocol_error_in_the_client_stream() -> None:
    (frame,) = FrameDecoder().feed(unsupported_version_reply(5, 17))
    assert (frame.version, frame.is_response, frame.stream, frame.opcode) == (4, True, 17, 0)
    assert decode_message(frame.opcode, frame.body) == Error(
        ErrorCode.PROTOCOL_ERROR, "Invalid or unsupported protocol version: 5"
    )


def test_cassandra_driver_reads_the_reply_as_an_unsupported_version() -> None:
    (frame,) = FrameDecoder().feed(unsupported_version_reply(0x42, 0))
    decoded = driver_decode(frame.opcode, frame.body, stream=0)
    assert isinstance(decoded, ProtocolException)
    # The exact test cassandra/connection.py applies before downgrading.
    assert "unsupported protocol version" in decoded.message


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({}, None),
        ({"COMPRESSION": "lz4"}, "lz4"),
        ({"COMPRESSION": "LZ4"}, "lz4"),
        ({"COMPRESSION": ""}, None),
    ],
)
def test_negotiate_compression_accepts_lz4_or_nothing(
    options: dict[str, str], expected: str | None
) -> None:
    assert negotiate_compression(options) == expected


def test_negotiate_compression_rejects_snappy_with_a_protocol_error() -> None:
    with pytest.raises(UnsupportedCompressionError) as info:
        negotiate_compression({"COMPRESSION": "snappy"})
    assert isinstance(info.value, CQLProtocolError)
    assert info.value.code == ErrorCode.PROTOCOL_ERROR
    assert "snappy" in info.value.message


class _HandshakeRecorder(socketserver.BaseRequestHandler):
    """Speaks just enough of the handshake, using only the codec, to watch a driver.

    Records every frame header version and the decoded requests; answers the
    first request after STARTUP with a SERVER_ERROR so the driver gives up.
    """

    server: _RecordingServer

    def handle(self) -> None:
        decoder = FrameDecoder()
        compression: str | None = None
        while data := self.request.recv(65536):
            try:
                frames = decoder.feed(data)
            except ProtocolVersionError as exc:
                self.server.seen.append(("rejected", exc.version))
                self.request.sendall(unsupported_version_reply(exc.version, exc.stream))
                return
            for frame in frames:
                body = decompress_body(frame.body) if frame.flags & COMPRESSION else frame.body
                msg = decode_message(frame.opcode, body)
                self.server.seen.append((frame.version, msg))
                if frame.opcode == Opcode.OPTIONS:
                    supported = Supported(dict(DEFAULT_SUPPORTED))
                    self._reply(Opcode.SUPPORTED, supported.encode(), frame.stream, compression)
                elif isinstance(msg, Startup):
                    self._reply(Opcode.READY, b"", frame.stream, compression)
                    compression = negotiate_compression(msg.options)
                else:
                    err = Error(ErrorCode.SERVER_ERROR, "handshake recorder stops here")
                    self._reply(Opcode.ERROR, err.encode(), frame.stream, compression)
                    return

    def _reply(self, opcode: int, body: bytes, stream: int, compression: str | None) -> None:
        self.request.sendall(
            encode_frame(
                opcode, body, stream=stream, response=True, compress=compression is not None
            )
        )


class _RecordingServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _HandshakeRecorder)
        self.seen: list[tuple[object, object]] = []


@pytest.fixture
def recorder() -> Iterator[_RecordingServer]:
    server = _RecordingServer()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_cassandra_driver_downgrades_to_v4_and_negotiates_lz4(recorder: _RecordingServer) -> None:
    cluster = Cluster(
        ["127.0.0.1"],
        port=recorder.server_address[1],
        connect_timeout=5,
        control_connection_timeout=5,
    )
    try:
        with pytest.raises(NoHostAvailable):
            cluster.connect()
        assert cluster.protocol_version == 4
    finally:
        cluster.shutdown()
    seen = recorder.seen
    rejected = [version for tag, version in seen if tag == "rejected"]
    # cassandra-driver first tries DSE's versions 0x42 and 0x41; scylla-driver starts at 5.
    assert rejected in ([0x42, 0x41, 5], [5])
    assert seen[: len(rejected)] == [("rejected", version) for version in rejected]
    startup = next(m for v, m in seen if isinstance(m, Startup))
    assert startup.options["COMPRESSION"] == "lz4"
    # The request after STARTUP arrived LZ4-compressed and decoded cleanly.
    assert any(isinstance(m, Register) for v, m in seen)
    assert all(v == 4 for v, m in seen[len(rejected) :])
