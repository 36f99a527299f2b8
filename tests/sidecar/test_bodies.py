"""Reading coalescing keys, bound values and routing keys straight from raw bodies."""

from __future__ import annotations

import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from coalesce.cql import Execute, Opcode, Query, QueryParameters
from coalesce.sidecar.bodies import bound_values, error_code, key_body, routing_key
from tests.conftest import examples

values = st.lists(st.one_of(st.none(), st.binary(max_size=20)), max_size=5)
params = st.builds(
    QueryParameters,
    consistency=st.sampled_from([1, 4, 6, 10]),
    values=st.one_of(st.none(), values),
    page_size=st.one_of(st.none(), st.integers(1, 5000)),
    paging_state=st.one_of(st.none(), st.binary(max_size=12)),
    serial_consistency=st.one_of(st.none(), st.sampled_from([8, 9])),
)


@settings(max_examples=examples(80), deadline=None)
@given(params, st.integers(-(2**63), 2**63 - 1), st.integers(-(2**63), 2**63 - 1))
def test_requests_differing_only_in_client_timestamp_have_the_same_key(
    p: QueryParameters, t1: int, t2: int,
) -> None:
    def body(timestamp: int | None) -> bytes:
        p.timestamp = timestamp
        return Query("SELECT * FROM ks.t WHERE k = ?", p).encode()

    assert key_body(Opcode.QUERY, body(t1)) == key_body(Opcode.QUERY, body(t2))
    assert key_body(Opcode.QUERY, body(t1)) == body(None)


@settings(max_examples=examples(80), deadline=None)
@given(params, params)
def test_requests_with_any_other_difference_have_different_keys(
    a: QueryParameters, b: QueryParameters,
) -> None:
    a.timestamp, b.timestamp = 1, 2
    body_a = Execute(b"\x01\x02", a).encode()
    body_b = Execute(b"\x01\x02", b).encode()
    a.timestamp = b.timestamp = None
    same_without_timestamp = a.encode() == b.encode()
    keys_equal = key_body(Opcode.EXECUTE, body_a) == key_body(Opcode.EXECUTE, body_b)
    assert keys_equal == same_without_timestamp


@settings(max_examples=examples(80), deadline=None)
@given(values)
def test_bound_values_are_read_back_as_sent(vals: list[bytes | None]) -> None:
    body = Execute(b"id", QueryParameters(1, list(vals), page_size=10, timestamp=5)).encode()
    assert bound_values(Opcode.EXECUTE, body) == vals


def test_named_or_absent_values_give_no_bound_values() -> None:
    named = Query("q", QueryParameters(1, [b"x"], names=["k"])).encode()
    assert bound_values(Opcode.QUERY, named) is None
    assert bound_values(Opcode.QUERY, Query("q", QueryParameters(1)).encode()) is None


def test_routing_keys_match_the_drivers_layout() -> None:
    assert routing_key([b"\x00\x00\x00\x07", b"v"], [0]) == b"\x00\x00\x00\x07"
    composite = routing_key([b"ab", b"x", b"c"], [0, 2])
    assert composite == b"\x00\x02ab\x00" + b"\x00\x01c\x00"
    assert routing_key([None, b"x"], [0]) is None
    assert routing_key([b"x"], [3]) is None
    assert routing_key([b"x"], []) is None


def test_error_codes_are_read_from_error_bodies_only() -> None:
    body = struct.pack(">i", 0x2500) + b"\x00\x00"
    assert error_code(Opcode.ERROR, body) == 0x2500
    assert error_code(Opcode.RESULT, body) is None
