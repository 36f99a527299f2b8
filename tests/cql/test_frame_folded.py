"""Attack: `FrameDecoder.feed_folded` must give back, once its folded offsets are read
with `frame_at`, exactly what `feed` gives, whatever the frames and however the bytes
are cut; and an int must only ever stand for a frame equal to the last whole frame
before it but for its stream id and the last 8 bytes of its body.
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from coalesce.cql import CQLProtocolError, Frame, FrameDecoder, Opcode, encode_frame

_HEADER = struct.Struct(">BBhBi")


def _header(ver: int, flags: int, stream: int, op: int, body: bytes) -> bytes:
    return _HEADER.pack(ver, flags, stream, op, len(body)) + body


# A small alphabet, so that repeats (and near-repeats) are common: bodies that share
# all but their last 8 bytes, all but their first byte, shorter than 8, exactly 8.
_BASE = bytes(range(40))
_BODIES = [
    b"", b"\x01", b"abcdefg", b"abcdefgh", b"abcdefgi", b"Xbcdefgh", b"abcdefghi",
    _BASE, _BASE[:-8] + b"\xff" * 8, _BASE[:-8] + b"\x00" * 7 + b"\x01",
    _BASE[:-9] + b"\xee" + _BASE[-8:],  # differs just before the tail: never folded
    b"\x00" + _BASE[1:],
]
_frames = st.builds(
    _header,
    st.sampled_from([0x04, 0x04, 0x04, 0x84, 0x03, 0x83]),
    st.sampled_from([0x00, 0x00, 0x01, 0x02, 0x04]),
    st.integers(-32768, 32767),
    st.sampled_from([int(Opcode.QUERY), int(Opcode.EXECUTE), int(Opcode.OPTIONS)]),
    st.sampled_from(_BODIES),
)


def _cuts(data: bytes, points: list[int]) -> list[bytes]:
    points = sorted({p % (len(data) + 1) for p in points})
    out, last = [], 0
    for p in points:
        out.append(data[last:p])
        last = p
    out.append(data[last:])
    return out


def _check_fold_invariant(items: list[Frame | int], src: bytes) -> None:
    last: Frame | None = None
    for item in items:
        if isinstance(item, int):
            assert last is not None, "a fold with no whole frame before it"
            frame = FrameDecoder.frame_at(src, item)
            assert frame.version == last.version and frame.is_response == last.is_response
            assert frame.flags == last.flags and frame.opcode == last.opcode
            assert len(frame.body) == len(last.body)
            keep = max(len(last.body) - 8, 0)
            assert frame.body[:keep] == last.body[:keep]
        else:
            last = item


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_frames, min_size=1, max_size=30), st.lists(st.integers(0, 10**6), max_size=8),
       st.sampled_from([bytes, bytearray, memoryview]))
def test_folded_frames_read_back_to_what_feed_gives(
    frames: list[bytes], points: list[int], kind: type,
) -> None:
    data = b"".join(frames)
    plain, folding = FrameDecoder(), FrameDecoder()
    expected: list[Frame] = []
    got: list[Frame] = []
    for chunk in _cuts(data, points):
        expected += plain.feed(kind(chunk))
        items, src = folding.feed_folded(kind(chunk))
        assert type(src) is bytes
        _check_fold_invariant(items, src)
        got += [FrameDecoder.frame_at(src, i) if isinstance(i, int) else i for i in items]
        assert folding.buffered == plain.buffered
    assert got == expected
    assert [(f.version, f.is_response, f.flags, f.stream, f.opcode, f.body) for f in got] == [
        ((f[0] & 0x7F), f[0] >= 0x80, f[1], _HEADER.unpack_from(f)[2], f[4], f[9:])
        for f in frames]


def test_a_repeat_differing_only_in_its_last_eight_bytes_folds_and_one_byte_earlier_not() -> None:
    body = bytes(range(30))
    a = encode_frame(Opcode.QUERY, body, stream=1)
    b = encode_frame(Opcode.QUERY, body[:-8] + b"\xff" * 8, stream=2)
    c = encode_frame(Opcode.QUERY, body[:-9] + b"\xff" + body[-8:], stream=3)
    d = encode_frame(Opcode.QUERY, body, stream=4, flags=0x02)  # tracing: header byte 1
    items, src = FrameDecoder().feed_folded(a + b + a + c + d + a)
    kinds = [isinstance(i, int) for i in items]
    assert kinds == [False, True, True, False, False, False]
    assert FrameDecoder.frame_at(src, items[1]).body == body[:-8] + b"\xff" * 8  # type: ignore[arg-type]


def test_the_timestamp_flag_is_never_in_the_folded_tail_of_a_well_formed_request() -> None:
    # A QUERY with and without its timestamp differ in length; with the same length
    # (the stamped one a shorter text), they differ before the tail: never folded.
    from coalesce.cql import Consistency, Query, QueryParameters

    stamped = Query("SELECT v FROM ks.kv WHERE k = 1",
                    QueryParameters(Consistency.ONE, timestamp=5)).encode()
    plain = Query("SELECT v FROM ks.kv WHERE k = 1" + " " * 8,
                  QueryParameters(Consistency.ONE)).encode()
    assert len(stamped) == len(plain)
    items, _ = FrameDecoder().feed_folded(encode_frame(Opcode.QUERY, stamped, stream=1)
                                          + encode_frame(Opcode.QUERY, plain, stream=2))
    assert not any(isinstance(i, int) for i in items)


@pytest.mark.parametrize("bad", [
    _header(0x04, 0, 9, 0x7E, b""),  # unknown opcode
    _header(0x05, 0, 9, int(Opcode.QUERY), b""),  # unsupported version
    _HEADER.pack(0x04, 0, 9, int(Opcode.QUERY), -1),  # negative length
])
def test_a_bad_header_right_after_folded_frames_fails_as_feed_does(bad: bytes) -> None:
    good = [_header(0x04, 0, s, int(Opcode.QUERY), _BASE[:-1] + bytes([s])) for s in range(5)]
    data = b"".join(good) + bad
    with pytest.raises(CQLProtocolError) as plain:
        FrameDecoder().feed(data)
    decoder = FrameDecoder()
    with pytest.raises(CQLProtocolError) as folded:
        decoder.feed_folded(data)
    assert type(folded.value) is type(plain.value)
    assert folded.value.message == plain.value.message
    with pytest.raises(CQLProtocolError):
        decoder.feed_folded(good[0])  # dead after it


def test_a_folded_frame_split_across_reads_is_whole_when_it_completes() -> None:
    base = _header(0x04, 0, 1, int(Opcode.QUERY), _BASE)
    repeat = _header(0x04, 0, 2, int(Opcode.QUERY), _BASE[:-8] + b"\x07" * 8)
    decoder = FrameDecoder()
    items, _ = decoder.feed_folded(base + repeat[:-3])
    assert len(items) == 1 and isinstance(items[0], Frame)
    items, src = decoder.feed_folded(repeat[-3:] + repeat)
    # The split repeat is the first of its read: whole. The next is folded against it.
    assert isinstance(items[0], Frame) and items[0].stream == 2
    assert isinstance(items[1], int)
    assert FrameDecoder.frame_at(src, items[1]) == items[0]
