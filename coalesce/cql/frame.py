"""CQL native protocol frames: header codec, incremental decoder, LZ4 bodies.

A frame is a 9-byte header (version|direction, flags, stream, opcode, body
length) followed by the body. This module never looks inside a body, so a
proxy can classify and forward frames without decoding messages.
"""

from __future__ import annotations

import enum
import struct
from typing import Final, NamedTuple, cast

import lz4.block

from .errors import CQLProtocolError, ProtocolVersionError

__all__ = [
    "BETA",
    "COMPRESSION",
    "CUSTOM_PAYLOAD",
    "HEADER_SIZE",
    "REQUEST_VERSION",
    "RESPONSE_VERSION",
    "SUPPORTED_VERSIONS",
    "TRACING",
    "WARNING",
    "Frame",
    "FrameDecoder",
    "Opcode",
    "compress_body",
    "decompress_body",
    "encode_frame",
    "first_bad_stream",
]


class Opcode(enum.IntEnum):
    """Message opcodes of native protocol v4."""

    ERROR = 0x00
    STARTUP = 0x01
    READY = 0x02
    AUTHENTICATE = 0x03
    OPTIONS = 0x05
    SUPPORTED = 0x06
    QUERY = 0x07
    RESULT = 0x08
    PREPARE = 0x09
    EXECUTE = 0x0A
    REGISTER = 0x0B
    EVENT = 0x0C
    BATCH = 0x0D
    AUTH_CHALLENGE = 0x0E
    AUTH_RESPONSE = 0x0F
    AUTH_SUCCESS = 0x10


# Header flags.
COMPRESSION: Final = 0x01
TRACING: Final = 0x02
CUSTOM_PAYLOAD: Final = 0x04
WARNING: Final = 0x08
BETA: Final = 0x10

REQUEST_VERSION: Final = 0x04
RESPONSE_VERSION: Final = 0x84
SUPPORTED_VERSIONS: Final = frozenset({3, 4})
HEADER_SIZE: Final = 9

_DIRECTION_BIT: Final = 0x80
_HEADER: Final = struct.Struct(">BBhBi")
_LENGTH: Final = struct.Struct(">i")
_VALID_OPCODES: Final = frozenset(int(op) for op in Opcode)
# The 256 MiB default is Cassandra's native_transport_max_frame_size ceiling.
_DEFAULT_MAX_BODY: Final = 256 * 1024 * 1024


class Frame(NamedTuple):
    """One frame, body untouched (still compressed if `flags & COMPRESSION`).

    `version` excludes the direction bit; `is_response` carries it. `stream`
    is signed: negative streams are server-pushed events.
    """

    version: int
    is_response: bool
    flags: int
    stream: int
    opcode: int
    body: bytes


_new_frame: Final = tuple.__new__
_unpack_header: Final = _HEADER.unpack_from


class FrameDecoder:
    """Splits a byte stream into `Frame`s; one instance per connection direction.

    `feed` takes chunks of any size and returns the frames completed by it,
    in order. A header is validated as soon as it has arrived, before any of
    its body is buffered: a declared length above `max_body` (or negative),
    an unknown opcode, or a version other than 3 or 4 raises
    `CQLProtocolError` (`ProtocolVersionError` for the version, carrying the
    client's stream). Frames completed earlier in the same chunk are then
    lost with it; after any error the decoder is dead and every later `feed`
    raises again, because the stream can no longer be re-synchronised.

    Not thread-safe; meant to be driven by one reader task.
    """

    __slots__ = ("_buf", "_error", "_max_body", "_need")

    def __init__(self, max_body: int = _DEFAULT_MAX_BODY) -> None:
        self._max_body = max_body
        self._buf = bytearray()
        # Bytes the buffer must hold before parsing is worth attempting;
        # keeps a large frame arriving in small chunks from being rescanned.
        self._need = 0
        self._error: CQLProtocolError | None = None

    @property
    def max_body(self) -> int:
        """The largest body a header may declare (it may change between feeds)."""
        return self._max_body

    @max_body.setter
    def max_body(self, value: int) -> None:
        self._max_body = value

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as part of a frame."""
        return len(self._buf)

    def feed(self, data: bytes | bytearray | memoryview) -> list[Frame]:
        """Consume `data`; return the frames it completed (possibly none).

        Frame bodies are slices of `data` (or of the internal buffer), never
        views into caller-owned memory.
        """
        return cast(list[Frame], self._feed(data, False)[0])  # no int: nothing folded

    def feed_folded(self, data: bytes | bytearray | memoryview
                    ) -> tuple[list[Frame | int], bytes]:
        """`feed`, folding repeats: return the completed frames and the bytes they came from.

        A frame equal to the last whole `Frame` before it in the list, but for its stream
        id (header bytes 2-3) and the last 8 bytes of its body (where a request's
        default timestamp goes), is returned as an int instead: its offset in the bytes
        returned, where `frame_at` reads it whole. Folded frames cost a comparison, not
        a decoded tuple: a herd of identical requests arrives as such repeats.
        """
        return self._feed(data, True)

    @staticmethod
    def frame_at(src: bytes, off: int) -> Frame:
        """The frame `feed_folded` folded at offset `off` of `src`, decoded whole."""
        ver, flags, stream, op, length = _unpack_header(src, off)
        return _new_frame(Frame, (ver & 0x7F, ver >= 0x80, flags, stream, op,
                                  src[off + 9 : off + 9 + length]))

    def _feed(self, data: bytes | bytearray | memoryview, fold: bool
              ) -> tuple[list[Frame | int], bytes]:
        if self._error is not None:
            raise CQLProtocolError(f"decoder already failed: {self._error.message}")
        if not self._buf and type(data) is bytes and len(data) >= 9:
            # Fast path: one whole v4 frame per chunk, the common case for
            # request/response traffic.
            ver, flags, stream, op, length = _unpack_header(data)
            if (
                len(data) - 9 == length
                and (ver == 0x04 or ver == 0x84)
                and op in _VALID_OPCODES
                and length <= self._max_body
            ):
                return [_new_frame(Frame, (4, ver == 0x84, flags, stream, op, data[9:]))], data
        # Frame bodies must be immutable bytes, never views of caller memory.
        chunk = data if type(data) is bytes else bytes(data)
        buf = self._buf
        if buf:
            buf += chunk
            if len(buf) < self._need:
                return [], b""
            src: bytes = bytes(buf)
        else:
            src = chunk
        frames: list[Frame | int] = []
        append = frames.append
        unpack = _HEADER.unpack_from
        opcodes = _VALID_OPCODES
        max_body = self._max_body
        n = len(src)
        off = 0
        # The last whole frame, when folding: its first two header bytes, its header
        # from the opcode on with its body but the last 8 bytes, and its size.
        head = rest = b""
        size = 0
        while n - off >= 9:
            if (size and off + size <= n and src.startswith(head, off)
                    and src.startswith(rest, off + 4)):
                append(off)
                off += size
                continue
            ver, flags, stream, op, length = unpack(src, off)
            version = ver & 0x7F
            if (version != 4 and version != 3) or op not in opcodes or not 0 <= length <= max_body:
                self._fail(self._header_error(src, off))
            end = off + 9 + length
            if end > n:
                self._need = end - off
                break
            append(_new_frame(Frame, (version, ver >= 0x80, flags, stream, op, src[off + 9 : end])))
            if fold:
                head = src[off : off + 2]
                rest = src[off + 4 : max(end - 8, off + 9)]
                size = end - off
            off = end
        else:
            self._need = 0
            if off < n:
                self._check_partial_header(src, off)
        if src is chunk:
            if off < n:
                buf += memoryview(chunk)[off:]
        elif off:
            del buf[:off]
        return frames, src

    def _check_partial_header(self, src: bytes, off: int) -> None:
        # A v1/v2 header is only 8 bytes: an old client would wait forever for
        # a reply if we insisted on 9 before looking at the version.
        version = src[off] & 0x7F
        if version in SUPPORTED_VERSIONS:
            return
        if version < 3 and len(src) - off >= 3:
            self._fail(ProtocolVersionError(version, struct.unpack_from(">b", src, off + 2)[0]))
        if len(src) - off >= 4:
            self._fail(ProtocolVersionError(version, struct.unpack_from(">h", src, off + 2)[0]))

    def _header_error(self, src: bytes, off: int) -> CQLProtocolError:
        ver, _, stream, op, length = _HEADER.unpack_from(src, off)
        version = ver & 0x7F
        if version not in SUPPORTED_VERSIONS:
            if version < 3:  # v1/v2 streams are a single signed byte
                stream = struct.unpack_from(">b", src, off + 2)[0]
            return ProtocolVersionError(version, stream)
        if op not in _VALID_OPCODES:
            return CQLProtocolError(f"unknown opcode 0x{op:02x} (stream {stream})")
        if length < 0:
            return CQLProtocolError(f"negative frame body length {length}")
        return CQLProtocolError(
            f"frame body of {length} bytes exceeds the {self._max_body}-byte limit"
        )

    def _fail(self, error: CQLProtocolError) -> None:
        self._error = error
        self._buf = bytearray()
        raise error


def encode_frame(
    opcode: int,
    body: bytes,
    *,
    stream: int,
    version: int = REQUEST_VERSION,
    response: bool = False,
    flags: int = 0,
    compress: bool = False,
) -> bytes:
    """One frame's bytes. `version` is given without the direction bit.

    With `compress=True` a non-empty body is LZ4-compressed and the
    COMPRESSION flag set (an empty body is sent as is, as drivers do).
    Raises `ValueError` if `stream` or a header field is out of range.
    """
    if compress and body:
        body = compress_body(body)
        flags |= COMPRESSION
    try:
        header = _HEADER.pack(
            (version & 0x7F) | (_DIRECTION_BIT if response else 0), flags, stream, opcode, len(body)
        )
    except struct.error as exc:
        raise ValueError(f"cannot encode frame header: {exc}") from None
    return header + body


def first_bad_stream(data: bytes, max_body: int) -> int:
    """The stream of the first invalid header in `data` (which starts at a frame), or 0.

    For addressing the PROTOCOL_ERROR sent before closing a connection whose bytes
    `FrameDecoder` refused.
    """
    offset = 0
    while offset + 9 <= len(data):
        version, _, stream, opcode, length = _HEADER.unpack_from(data, offset)
        if (version & 0x7F) != 4 or opcode not in _VALID_OPCODES or not 0 <= length <= max_body:
            return int(stream)
        offset += 9 + length
    return 0


def compress_body(body: bytes) -> bytes:
    """LZ4 as Cassandra frames it: [int] uncompressed length + raw LZ4 block."""
    raw: bytes = lz4.block.compress(body, store_size=False)
    return _LENGTH.pack(len(body)) + raw


def decompress_body(body: bytes, *, max_size: int = _DEFAULT_MAX_BODY) -> bytes:
    """Inverse of `compress_body`.

    Raises `CQLProtocolError` on corrupt input, or if the declared
    uncompressed size is negative or above `max_size` (checked before any
    memory is allocated for it). An empty body stays empty.
    """
    if len(body) < 4:
        if not body:
            return b""
        raise CQLProtocolError("compressed body shorter than its length prefix")
    (size,) = _LENGTH.unpack_from(body)
    if not 0 <= size <= max_size:
        raise CQLProtocolError(f"invalid uncompressed body length {size}")
    if size == 0:
        return b""
    try:
        out: bytes = lz4.block.decompress(memoryview(body)[4:], uncompressed_size=size)
    except lz4.block.LZ4BlockError as exc:
        raise CQLProtocolError(f"corrupt LZ4 body: {exc}") from None
    if len(out) != size:
        raise CQLProtocolError(f"LZ4 body decompressed to {len(out)} bytes, header said {size}")
    return out
