"""Murmur3Partitioner tokens and routing keys, checked against the driver's own hash."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from coalesce.cql import token
from coalesce.cql.token import MAX_TOKEN, MIN_TOKEN, murmur3_token, routing_key

# Keys whose bytes are mostly >= 0x80, where the partitioner's signed tail bytes
# make it differ from the reference MurmurHash3.
_high_bytes = st.lists(st.integers(0x80, 0xFF), max_size=64).map(bytes)
_keys = st.one_of(st.binary(max_size=64), _high_bytes)


def _driver_murmur3() -> object:
    return pytest.importorskip("cassandra.murmur3").murmur3


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        # `SELECT token(k)` on Cassandra and Scylla for int keys 1, 2, 3.
        (struct.pack(">i", 1), -4069959284402364209),
        (struct.pack(">i", 2), -3248873570005575792),
        (struct.pack(">i", 3), 9010454139840013625),
        # Tail bytes >= 0x80, after and without a 16-byte block.
        (b"\xff" * 4, 7297452126230313552),
        (b"\x80" * 15, -5979218241483680930),
        (bytes(range(0xF0, 0x100)) + b"\x80", 3562199647630896339),
        (b"", 0),
    ],
)
def test_pure_hash_gives_the_partitioners_tokens(key: bytes, expected: int) -> None:
    assert token._murmur3_pure(key) == expected
    assert murmur3_token(key) == expected


@given(_keys)
def test_pure_hash_equals_the_drivers_murmur3(key: bytes) -> None:
    driver = _driver_murmur3()
    assert token._murmur3_pure(key) == driver(key)  # type: ignore[operator]


@given(_keys)
def test_token_equals_the_drivers_murmur3(key: bytes) -> None:
    driver = _driver_murmur3()
    assert murmur3_token(key) == driver(key)  # type: ignore[operator]


@pytest.mark.parametrize("length", range(65))
def test_pure_hash_equals_the_drivers_at_every_length(length: int) -> None:
    driver = _driver_murmur3()
    for key in (bytes(range(length)), bytes(0xFF - i % 0x80 for i in range(length))):
        assert token._murmur3_pure(key) == driver(key)  # type: ignore[operator]


def test_key_hashing_to_the_minimum_token_gets_the_maximum(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(token, "_murmur3", lambda key: MIN_TOKEN)
    assert murmur3_token(b"any") == MAX_TOKEN


def test_single_component_routing_key_is_the_value_itself() -> None:
    assert routing_key([b"\x00\x00\x00\x01"]) == b"\x00\x00\x00\x01"
    assert routing_key([b""]) == b""


def test_composite_routing_key_prefixes_lengths_and_ends_each_component_with_zero() -> None:
    key = routing_key([b"abc", b"\x00\x00\x01\x80"])
    assert key == b"\x00\x03abc\x00" + b"\x00\x04\x00\x00\x01\x80\x00"
    assert murmur3_token(key) == -1320618841307156119


def test_routing_key_refuses_no_components_and_oversized_composite_parts() -> None:
    with pytest.raises(ValueError, match="at least one component"):
        routing_key([])
    with pytest.raises(ValueError, match="at most 65535 bytes"):
        routing_key([b"a", b"x" * 65536])
    assert routing_key([b"x" * 65536]) == b"x" * 65536
