"""Clustering sort keys order values as Cassandra orders their types."""

from __future__ import annotations

import uuid

from hypothesis import given, settings
from hypothesis import strategies as st

from coalesce.cql.types import parse_type
from coalesce.emulator.ordering import MAX, MIN, column_sort_key, range_bounds
from coalesce.emulator.schema import Column
from tests.conftest import examples


def _column(type_name: str, *, descending: bool = False) -> Column:
    return Column("c", parse_type(type_name), "clustering", 0, descending)


@settings(max_examples=examples(100), deadline=None)
@given(st.lists(st.integers(-(2**63), 2**63 - 1), min_size=2, max_size=20))
def test_ascending_and_descending_keys_sort_integers_both_ways(values: list[int]) -> None:
    ascending = _column("bigint")
    descending = _column("bigint", descending=True)
    assert sorted(values, key=lambda v: column_sort_key(ascending, v)) == sorted(values)
    assert sorted(values, key=lambda v: column_sort_key(descending, v)) == sorted(
        values, reverse=True
    )


def test_timeuuids_sort_by_their_time_not_their_bytes() -> None:
    early = uuid.UUID("ffffffff-0000-1000-8000-000000000000")  # high bytes, early time
    late = uuid.UUID("00000000-0000-1fff-8000-000000000000")
    assert early.time < late.time
    column = _column("timeuuid")
    assert column_sort_key(column, early) < column_sort_key(column, late)


def test_sets_sort_by_their_sorted_contents() -> None:
    column = _column("frozen<set<int>>")
    assert column_sort_key(column, frozenset({3, 1})) < column_sort_key(column, frozenset({2}))


def test_min_and_max_bracket_every_key() -> None:
    key = column_sort_key(_column("text", descending=True), "x")
    assert (MIN,) < (key,) < (MAX,)


def test_range_bounds_on_a_descending_column_are_inverted() -> None:
    column = _column("int", descending=True)
    low, high = range_bounds(column, [(">", 5)])
    assert low == ()
    assert high is not None
    assert (column_sort_key(column, 6),) < high
    assert not (column_sort_key(column, 5),) < high
