"""Frame header codec, the incremental decoder, and LZ4 bodies."""

from __future__ import annotations

import contextlib

import pytest
from cassandra.connection import locally_supported_compressions
from cassandra.protocol import QueryMessage
from hypothesis import given, settings
from hypothesis import strategies as st

from coalesce.cql import (
    COMPRESSION,
    CQLProtocolError,
    Frame,
    FrameDecoder,
    Opcode,
    ProtocolVersionError,
    compress_body,
    decompress_body,
    encode_frame,
)
from tests.conftest import examples
from tests.cql.driver_codec import driver_encode

_FRAMES = [
    Frame(4, False, 0, 0, Opcode.OPTIONS, b""),
    Frame(4, False, 0, 1, Opcode.QUERY, b"\x00\x00\x00\x08SELECT 1" + b"\x00\x01\x00"),
    Frame(4, True, 0x08, -1, Opcode.EVENT, b"e" * 300),
    Frame(3, True, 0, 32767, Opcode.RESULT, b"\x00\x00\x00\x01"),
    Frame(4, False, COMPRESSION, -32768, Opcode.EXECUTE, b"x" * 70_000),
]


def _wire(frames: list[Frame]) -> bytes:
    return b"".join(
        encode_frame(
            f.opcode,
            f.body,
            stream=f.stream,
            version=f.version,
            response=f.is_response,
            flags=f.flags,
        )
        for f in frames
    )


def test_encode_frame_writes_the_v4_header() -> None:
    raw = encode_frame(Opcode.QUERY, b"abc", stream=258)
    assert raw == b"\x04\x00\x01\x02\x07\x00\x00\x00\x03abc"
    assert encode_frame(Opcode.RESULT, b"", stream=-1, response=True)[:1] == b"\x84"


def test_encode_frame_rejects_out_of_range_stream() -> None:
    with pytest.raises(ValueError):
        encode_frame(Opcode.QUERY, b"", stream=40_000)


def test_whole_stream_in_one_chunk_gives_every_frame_in_order() -> None:
    assert FrameDecoder().feed(_wire(_FRAMES)) == _FRAMES


def test_byte_by_byte_feeding_gives_the_same_frames() -> None:
    decoder = FrameDecoder()
    out: list[Frame] = []
    data = _wire(_FRAMES[:4])
    for i in range(len(data)):
        out += decoder.feed(data[i : i + 1])
    assert out == _FRAMES[:4]
    assert decoder.buffered == 0


@settings(max_examples=examples(100), deadline=None)
@given(st.lists(st.integers(1, 5000), max_size=30))
def test_random_chunk_splits_give_the_same_frames(cuts: list[int]) -> None:
    data = _wire(_FRAMES)
    decoder = FrameDecoder()
    out: list[Frame] = []
    pos = 0
    for size in cuts:
        out += decoder.feed(data[pos : pos + size])
        pos += size
    out += decoder.feed(data[pos:])
    assert out == _FRAMES


def test_bodies_are_bytes_even_when_fed_bytearray() -> None:
    (frame,) = FrameDecoder().feed(bytearray(_wire(_FRAMES[1:2])))
    assert type(frame.body) is bytes


def test_decodes_cassandra_driver_query_frame() -> None:
    msg = QueryMessage("SELECT * FROM t", consistency_level=1)
    (frame,) = FrameDecoder().feed(driver_encode(msg, 42))
    assert (frame.version, frame.is_response, frame.stream, frame.opcode) == (
        4,
        False,
        42,
        Opcode.QUERY,
    )


def test_oversized_body_is_rejected_from_the_header_alone() -> None:
    decoder = FrameDecoder(max_body=1024)
    header = encode_frame(Opcode.QUERY, b"x" * 2048, stream=3)[:9]
    with pytest.raises(CQLProtocolError, match="exceeds"):
        decoder.feed(header)
    assert decoder.buffered == 0


def test_negative_body_length_is_rejected() -> None:
    with pytest.raises(CQLProtocolError, match="negative"):
        FrameDecoder().feed(b"\x04\x00\x00\x01\x07\xff\xff\xff\xff")


def test_unknown_opcode_is_rejected() -> None:
    with pytest.raises(CQLProtocolError, match="opcode 0x04"):
        FrameDecoder().feed(b"\x04\x00\x00\x01\x04\x00\x00\x00\x00")


@pytest.mark.parametrize(("version", "stream"), [(5, 0), (6, 300), (0x42, -1), (65, 7)])
def test_unsupported_version_reports_version_and_client_stream(version: int, stream: int) -> None:
    raw = encode_frame(Opcode.OPTIONS, b"", stream=stream, version=version)
    with pytest.raises(ProtocolVersionError) as info:
        FrameDecoder().feed(raw)
    assert (info.value.version, info.value.stream) == (version, stream)
    assert "Invalid or unsupported protocol version" in str(info.value)


def test_v2_header_is_rejected_without_waiting_for_a_ninth_byte() -> None:
    # v1/v2 headers are 8 bytes with a one-byte stream.
    with pytest.raises(ProtocolVersionError) as info:
        FrameDecoder().feed(b"\x02\x00\x05\x05\x00\x00\x00\x00")
    assert (info.value.version, info.value.stream) == (2, 5)


def test_v2_frame_with_a_full_header_reports_its_one_byte_stream() -> None:
    with pytest.raises(ProtocolVersionError) as info:
        FrameDecoder().feed(b"\x02\x00\x05\x05\x00\x00\x00\x00\x00")
    assert (info.value.version, info.value.stream) == (2, 5)


def test_bad_version_in_partial_header_is_reported_once_stream_is_known() -> None:
    decoder = FrameDecoder()
    assert decoder.feed(b"\x05\x00") == []
    with pytest.raises(ProtocolVersionError):
        decoder.feed(b"\x00\x09")


def test_decoder_stays_dead_after_an_error() -> None:
    decoder = FrameDecoder()
    with pytest.raises(CQLProtocolError):
        decoder.feed(b"\x04\x00\x00\x01\x04\x00\x00\x00\x00")
    with pytest.raises(CQLProtocolError, match="already failed"):
        decoder.feed(_wire(_FRAMES[:1]))


def test_truncated_frame_yields_nothing_until_completed() -> None:
    data = _wire(_FRAMES[1:2])
    decoder = FrameDecoder()
    assert decoder.feed(data[:-1]) == []
    assert decoder.buffered == len(data) - 1
    assert decoder.feed(data[-1:]) == _FRAMES[1:2]


@settings(max_examples=examples(300), deadline=None)
@given(st.lists(st.binary(max_size=40), max_size=6))
def test_random_bytes_only_ever_raise_protocol_errors(chunks: list[bytes]) -> None:
    decoder = FrameDecoder(max_body=4096)
    with contextlib.suppress(CQLProtocolError):
        for chunk in chunks:
            for frame in decoder.feed(chunk):
                assert frame.version in (3, 4)


# -- compression ---------------------------------------------------------------


@settings(max_examples=examples(100), deadline=None)
@given(st.binary(max_size=5000))
def test_lz4_round_trips(body: bytes) -> None:
    assert decompress_body(compress_body(body)) == body


@settings(max_examples=examples(50), deadline=None)
@given(st.binary(min_size=1, max_size=3000))
def test_lz4_is_interchangeable_with_cassandra_drivers_codec(body: bytes) -> None:
    driver_compress, driver_decompress = locally_supported_compressions["lz4"]
    assert driver_decompress(compress_body(body)) == body
    assert decompress_body(driver_compress(body)) == body


@pytest.mark.parametrize(
    "raw",
    [
        b"\x00\x00",
        b"\x00\x00\x00\x10garbage-garbage!",
        b"\xff\xff\xff\xff\x00",
        compress_body(b"a" * 1000)[:-3],
        b"\x00\x00\x00\x05" + b"\xf0" * 3,
    ],
)
def test_corrupt_lz4_raises_protocol_error(raw: bytes) -> None:
    with pytest.raises(CQLProtocolError):
        decompress_body(raw)


def test_lz4_declared_size_above_limit_is_rejected_before_decompressing() -> None:
    with pytest.raises(CQLProtocolError, match="length"):
        decompress_body(compress_body(b"a" * 100), max_size=99)


def test_encode_frame_compresses_only_non_empty_bodies() -> None:
    (frame,) = FrameDecoder().feed(encode_frame(Opcode.QUERY, b"q" * 100, stream=1, compress=True))
    assert frame.flags & COMPRESSION
    assert decompress_body(frame.body) == b"q" * 100
    (empty,) = FrameDecoder().feed(encode_frame(Opcode.OPTIONS, b"", stream=1, compress=True))
    assert empty.flags == 0


def _unfold(items: list[Frame | int], src: bytes) -> list[Frame]:
    return [FrameDecoder.frame_at(src, i) if isinstance(i, int) else i for i in items]


_REPEATABLE = Frame(4, False, 0, 1, Opcode.EXECUTE, b"\x00\x02id" + b"\x00\x01\x05" + b"t" * 8)


@settings(max_examples=examples(200), deadline=None)
@given(
    st.lists(st.tuples(st.integers(-32768, 32767), st.binary(min_size=0, max_size=9),
                       st.sampled_from([0, 1, 2])), max_size=40),
    st.lists(st.integers(1, 400), max_size=12),
)
def test_folded_feeding_gives_back_the_same_frames(
    variants: list[tuple[int, bytes, int]], cuts: list[int]
) -> None:
    # Repeats of one frame that differ in their stream id, their body's tail (the last
    # 8 bytes, or their length), now and then a different frame, cut anywhere.
    frames = []
    for stream, tail, kind in variants:
        base = _REPEATABLE if kind else _FRAMES[1]
        body = base.body[:-8] + tail if kind == 1 else base.body
        frames.append(base._replace(stream=stream, body=body))
    data = _wire(frames)
    decoder = FrameDecoder()
    out: list[Frame] = []
    pos = 0
    for size in [*cuts, len(data)]:
        items, src = decoder.feed_folded(data[pos : pos + size])
        assert not items or not isinstance(items[0], int)  # a read's first frame is whole
        out += _unfold(items, src)
        pos += size
    assert out == frames


def test_a_repeat_but_for_its_stream_and_last_eight_bytes_is_folded() -> None:
    frames = [_REPEATABLE._replace(stream=s, body=_REPEATABLE.body[:-8] + bytes([s]) * 8)
              for s in range(1, 5)]
    other = _FRAMES[1]._replace(stream=9)
    items, src = FrameDecoder().feed_folded(_wire([*frames, other, frames[0]]))
    assert [type(i) for i in items] == [Frame, int, int, int, Frame, Frame]
    assert _unfold(items, src) == [*frames, other, frames[0]]
