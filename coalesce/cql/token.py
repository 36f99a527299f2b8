"""Partition tokens as Scylla's (and Cassandra's) Murmur3Partitioner computes them.

`routing_key` serializes a partition key's components the way the partitioner
reads them; `murmur3_token` hashes that key into the ring's signed 64-bit token
space. Both are pure and depend on nothing outside the standard library.

The partitioner's hash is the first half of MurmurHash3_x64_128 (seed 0), with
two differences from the reference C implementation, both inherited from Java:
the up to 15 tail bytes are *signed* (a byte >= 0x80 is sign-extended before it
is shifted into place), and the token ``Long.MIN_VALUE`` is reserved as the
ring's minimum, so a key hashing to it gets ``Long.MAX_VALUE`` instead.

When cassandra-driver's (or scylla-driver's) compiled ``cmurmur3`` extension is
importable, `murmur3_token` uses it for speed; it computes the same variant.
Nothing else of a driver is imported, and without one this module works alone.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from typing import Final

__all__ = ["IGNORE_MSB_BITS", "MAX_TOKEN", "MIN_TOKEN", "murmur3_token", "routing_key",
           "shard_of"]

IGNORE_MSB_BITS: Final = 12
"""Scylla's default ``murmur3_partitioner_ignore_msb_bits``."""

MIN_TOKEN: Final = -(2**63)
"""The ring's minimum token (``Long.MIN_VALUE``); no key is given it."""
MAX_TOKEN: Final = 2**63 - 1
"""The ring's maximum token (``Long.MAX_VALUE``)."""

_MASK: Final = 0xFFFF_FFFF_FFFF_FFFF
_C1: Final = 0x87C3_7B91_1142_53D5
_C2: Final = 0x4CF5_AD43_2745_937F
_MAX_COMPONENT: Final = 0xFFFF


def routing_key(parts: Sequence[bytes]) -> bytes:
    """The bytes the partitioner hashes for a partition key of `parts`.

    `parts` are the serialized values of the partition key columns, in
    declaration order. One component is hashed as it is; several are each
    written as a 2-byte big-endian length, the bytes, and a 0x00 byte.
    Raises `ValueError` for no components or one longer than 65535 bytes in a
    composite key.
    """
    if not parts:
        raise ValueError("a partition key has at least one component")
    if len(parts) == 1:
        return bytes(parts[0])
    out = bytearray()
    for part in parts:
        if len(part) > _MAX_COMPONENT:
            raise ValueError(
                f"a composite partition key component is at most {_MAX_COMPONENT} bytes, "
                f"got {len(part)}"
            )
        out += struct.pack(">H", len(part))
        out += part
        out += b"\x00"
    return bytes(out)


def murmur3_token(key: bytes) -> int:
    """The Murmur3Partitioner token of routing key `key`, in ``MIN_TOKEN+1..MAX_TOKEN``."""
    token = _murmur3(key)
    return MAX_TOKEN if token == MIN_TOKEN else token


def _rotl(x: int, r: int) -> int:
    return ((x << r) | (x >> (64 - r))) & _MASK


def _fmix(k: int) -> int:
    k ^= k >> 33
    k = (k * 0xFF51_AFD7_ED55_8CCD) & _MASK
    k ^= k >> 33
    k = (k * 0xC4CE_B9FE_1A85_EC53) & _MASK
    k ^= k >> 33
    return k


def _murmur3_pure(key: bytes) -> int:
    """The partitioner's raw hash of `key` as a signed 64-bit int (MIN_TOKEN not remapped)."""
    length = len(key)
    body = length - length % 16
    h1 = h2 = 0
    for k1, k2 in struct.iter_unpack("<QQ", memoryview(key)[:body]):
        k1 = _rotl((k1 * _C1) & _MASK, 31)
        h1 ^= (k1 * _C2) & _MASK
        h1 = (_rotl(h1, 27) + h2) & _MASK
        h1 = (h1 * 5 + 0x52DC_E729) & _MASK
        k2 = _rotl((k2 * _C2) & _MASK, 33)
        h2 ^= (k2 * _C1) & _MASK
        h2 = (_rotl(h2, 31) + h1) & _MASK
        h2 = (h2 * 5 + 0x3849_5AB5) & _MASK

    # Java bytes are signed: each tail byte is sign-extended to 64 bits, then shifted.
    k1 = k2 = 0
    for i, byte in enumerate(key[body:]):
        signed = byte - 256 if byte >= 0x80 else byte
        if i < 8:
            k1 ^= (signed << (8 * i)) & _MASK
        else:
            k2 ^= (signed << (8 * (i - 8))) & _MASK
    k2 = _rotl((k2 * _C2) & _MASK, 33)
    h2 ^= (k2 * _C1) & _MASK
    k1 = _rotl((k1 * _C1) & _MASK, 31)
    h1 ^= (k1 * _C2) & _MASK

    h1 ^= length
    h2 ^= length
    h1 = (h1 + h2) & _MASK
    h2 = (h2 + h1) & _MASK
    h1 = _fmix(h1)
    h2 = _fmix(h2)
    h1 = (h1 + h2) & _MASK
    return h1 - (1 << 64) if h1 >= 1 << 63 else h1


def _compiled() -> Callable[[bytes], int] | None:
    """The driver's compiled hash, if importable and computing the same variant."""
    try:
        from cassandra.cmurmur3 import murmur3
    except ImportError:
        return None
    probe = bytes(range(0x70, 0x70 + 37))  # two blocks and a tail with high bytes
    try:
        if murmur3(probe) != _murmur3_pure(probe):
            return None
    except Exception:
        return None
    fast: Callable[[bytes], int] = murmur3
    return fast


_murmur3: Callable[[bytes], int] = _compiled() or _murmur3_pure


def shard_of(token: int, shards: int, ignore_msb: int = IGNORE_MSB_BITS) -> int:
    """The shard (0 <= shard < shards) of a Scylla node that owns `token`.

    Scylla's biased-token-round-robin: shift the signed token into [0, 2**64), drop its
    top `ignore_msb` bits, and scale what is left, read as a fraction of 2**64, to
    `shards`.
    """
    biased = ((token + (1 << 63)) << ignore_msb) & _MASK
    return (biased * shards) >> 64
