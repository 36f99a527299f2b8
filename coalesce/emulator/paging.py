"""The emulator's paging state: where the next page of a SELECT resumes.

It is opaque to clients, as the protocol requires, and only means something
to the statement that produced it. It names the *last row returned* by its
keys (routing key and serialized clustering values), not by offset, so a
page resumes correctly even if rows were inserted or deleted in between,
and it carries the counts LIMIT and PER PARTITION LIMIT need. Bytes that do
not decode raise `InvalidRequest` (the connection stays usable).

Layout: magic `b"\\xceP1"`, [short bytes] routing key, [short] n, n x
[int bytes] clustering cells (n = 0xFFFF means "after the whole
partition"), [int] rows returned so far, [int] rows returned from this
partition so far.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from coalesce.emulator.errors import InvalidRequest

__all__ = ["PagingState"]

_MAGIC = b"\xceP1"
_SHORT = struct.Struct(">H")
_INT = struct.Struct(">i")
_WHOLE_PARTITION = 0xFFFF


@dataclass(frozen=True, slots=True)
class PagingState:
    """Resume after `clustering` in partition `partition_key` (or after the whole
    partition when `clustering` is None)."""

    partition_key: bytes
    clustering: tuple[bytes, ...] | None
    returned: int
    partition_returned: int

    def encode(self) -> bytes:
        parts = [_MAGIC, _SHORT.pack(len(self.partition_key)), self.partition_key]
        if self.clustering is None:
            parts.append(_SHORT.pack(_WHOLE_PARTITION))
        else:
            parts.append(_SHORT.pack(len(self.clustering)))
            for cell in self.clustering:
                parts.append(_INT.pack(len(cell)))
                parts.append(cell)
        parts.append(_INT.pack(self.returned))
        parts.append(_INT.pack(self.partition_returned))
        return b"".join(parts)

    @classmethod
    def decode(cls, data: bytes) -> PagingState:
        """Parse bytes made by `encode`; anything else raises `InvalidRequest`."""
        try:
            if not data.startswith(_MAGIC):
                raise ValueError("bad magic")
            pos = len(_MAGIC)
            (length,) = _SHORT.unpack_from(data, pos)
            pos += 2
            key = data[pos : pos + length]
            if len(key) != length:
                raise ValueError("truncated key")
            pos += length
            (count,) = _SHORT.unpack_from(data, pos)
            pos += 2
            clustering: tuple[bytes, ...] | None = None
            if count != _WHOLE_PARTITION:
                cells: list[bytes] = []
                for _ in range(count):
                    (size,) = _INT.unpack_from(data, pos)
                    pos += 4
                    cell = data[pos : pos + size]
                    if size < 0 or len(cell) != size:
                        raise ValueError("truncated clustering cell")
                    cells.append(cell)
                    pos += size
                clustering = tuple(cells)
            returned, partition_returned = struct.unpack_from(">ii", data, pos)
            if pos + 8 != len(data) or returned < 0 or partition_returned < 0:
                raise ValueError("trailing or negative counts")
        except (ValueError, struct.error):
            raise InvalidRequest("Invalid value for the paging state") from None
        return cls(key, clustering, returned, partition_returned)
