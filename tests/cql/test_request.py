"""`Request`: coalescing keys, bound values and well-formedness read from raw bodies."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coalesce.cql import (
    Batch,
    BatchStatement,
    CQLProtocolError,
    Execute,
    Opcode,
    Prepare,
    Query,
    QueryParameters,
)
from coalesce.cql.request import Request
from tests.conftest import examples


def key_body(opcode: int, body: bytes) -> bytes:
    return Request(1, opcode, 0, body).key_body()


def bound_values(opcode: int, body: bytes) -> list[bytes | None] | None:
    return Request(1, opcode, 0, body).values()

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
    assert key_body(Opcode.QUERY, body(t1)) == key_body(Opcode.QUERY, body(None))


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


@settings(max_examples=examples(80), deadline=None)
@given(params, st.integers(-(2**63), 2**63 - 1))
def test_every_well_formed_request_passes_its_check(p: QueryParameters, timestamp: int) -> None:
    p.timestamp = timestamp
    Request(1, Opcode.QUERY, 0, Query("SELECT * FROM t", p).encode()).check()
    Request(1, Opcode.EXECUTE, 0, Execute(b"\x07" * 16, p).encode()).check()


@settings(max_examples=examples(200), deadline=None)
@given(params, st.data())
def test_a_truncated_or_extended_body_never_passes_its_check(
    p: QueryParameters, data: st.DataObject,
) -> None:
    body = Execute(b"\x07" * 16, p).encode()
    cut = data.draw(st.integers(0, len(body) - 1))
    with pytest.raises(CQLProtocolError):
        Request(1, Opcode.EXECUTE, 0, body[:cut]).check()
    with pytest.raises(CQLProtocolError):
        Request(1, Opcode.EXECUTE, 0, body + data.draw(st.binary(min_size=1, max_size=4))).check()


@pytest.mark.parametrize(("name", "body"), [
    ("unknown consistency", Query("q", QueryParameters(0x0100)).encode()),
    ("unknown flag", Query("q", QueryParameters(1)).encode()[:-1] + b"\x80"),
    ("value length below -2", Query("q", QueryParameters(1)).encode()[:-1]
     + b"\x01\x00\x01\xff\xff\xff\xf0"),
    ("negative text length", b"\xff\xff\xff\xff\x00\x01\x00"),
    ("text that is not UTF-8", b"\x00\x00\x00\x02\xff\xfe\x00\x01\x00"),
])
def test_malformed_queries_are_refused_by_name(name: str, body: bytes) -> None:
    with pytest.raises(CQLProtocolError):
        Request(1, Opcode.QUERY, 0, body).check()


def test_batch_members_are_read_back_in_order() -> None:
    batch = Batch(0, [BatchStatement(False, "INSERT INTO t (k) VALUES (?)", [b"\x01"]),
                      BatchStatement(True, b"\x09\x09", [])], 1)
    request = Request(1, Opcode.BATCH, 0, batch.encode())
    request.check()
    assert request.statements() == [("INSERT INTO t (k) VALUES (?)", None), (None, b"\x09\x09")]
    with pytest.raises(CQLProtocolError):
        Request(1, Opcode.BATCH, 0, batch.encode()[:-1]).check()


def test_prepare_reads_its_text_and_nothing_else() -> None:
    assert Request(1, Opcode.PREPARE, 0, Prepare("SELECT 1").encode()).text == "SELECT 1"
    with pytest.raises(CQLProtocolError):
        Request(1, Opcode.PREPARE, 0, Prepare("SELECT 1").encode() + b"x")
