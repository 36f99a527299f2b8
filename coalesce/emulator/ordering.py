"""How clustering values sort: per-type keys, descending columns, slice bounds.

`column_sort_key(column, value)` maps a clustering value to a key that
orders as Cassandra orders that type (timeuuids by time, sets and maps by
their sorted contents, ...), inverted for a `DESC` clustering column. A row's
sort key is the tuple of its columns' keys, so ascending order of sort keys
is the table's clustering order, and a clustering slice is two binary
searches. `MIN` and `MAX` sort below and above every key part, and
`range_bounds` turns range restrictions on one column into [low, high)
suffixes for those searches.
"""

from __future__ import annotations

import uuid
from typing import Any

from coalesce.cql.types import CqlType, ListType, MapType, SetType, TupleType
from coalesce.emulator.schema import Column

__all__ = ["MAX", "MIN", "column_sort_key", "range_bounds"]


class _Extreme:
    """A sentinel ordered below (MIN) or above (MAX) every other sort-key part."""

    __slots__ = ("_high",)

    def __init__(self, high: bool) -> None:
        self._high = high

    def __lt__(self, other: object) -> bool:
        return not self._high and other is not self

    def __gt__(self, other: object) -> bool:
        return self._high and other is not self

    def __le__(self, other: object) -> bool:
        return not self._high or other is self

    def __ge__(self, other: object) -> bool:
        return self._high or other is self

    def __eq__(self, other: object) -> bool:
        return other is self

    def __hash__(self) -> int:
        return hash(self._high)

    def __repr__(self) -> str:
        return "MAX" if self._high else "MIN"


MIN = _Extreme(False)
MAX = _Extreme(True)


class _Descending:
    """Wraps a sort-key part so that it orders in reverse."""

    __slots__ = ("key",)

    def __init__(self, key: Any) -> None:
        self.key = key

    def __lt__(self, other: object) -> bool:
        if isinstance(other, _Descending):
            return bool(other.key < self.key)
        return NotImplemented

    def __gt__(self, other: object) -> bool:
        if isinstance(other, _Descending):
            return bool(other.key > self.key)
        return NotImplemented

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Descending) and bool(other.key == self.key)

    def __hash__(self) -> int:
        return hash(self.key)


def _value_key(ctype: CqlType, value: Any) -> Any:
    """A totally ordered key for one value, following Cassandra's ordering of the type."""
    if value is None:
        return (0,)
    name = ctype.cql_name
    if name == "timeuuid":
        return (1, value.time, value.bytes)
    if name == "uuid":
        assert isinstance(value, uuid.UUID)
        if value.version == 1:
            return (1, value.version, value.time, value.bytes)
        return (1, value.version, 0, value.bytes)
    if name == "inet":
        return (1, ctype.serialize(value))
    if isinstance(ctype, SetType):
        return (1, tuple(sorted(_value_key(ctype.element, v) for v in value)))
    if isinstance(ctype, ListType):
        return (1, tuple(_value_key(ctype.element, v) for v in value))
    if isinstance(ctype, MapType):
        pairs = value.items() if isinstance(value, dict) else value
        return (
            1,
            tuple(sorted((_value_key(ctype.key, k), _value_key(ctype.value, v)) for k, v in pairs)),
        )
    if isinstance(ctype, TupleType):
        return (1, tuple(_value_key(t, v) for t, v in zip(ctype.elements, value, strict=False)))
    # Numbers, text, blobs, booleans, dates, times, decimals, durations: the
    # Python values order as Cassandra orders the types.
    return (1, value)


def column_sort_key(column: Column, value: Any) -> Any:
    """The sort-key part for one clustering value of `column` (inverted if DESC)."""
    key = _value_key(column.type, value)
    return _Descending(key) if column.descending else key


def range_bounds(
    column: Column, ranges: list[tuple[str, Any]]
) -> tuple[tuple[Any, ...], tuple[Any, ...] | None]:
    """Sort-key bounds [low, high) of a range restriction on one clustering column."""
    low: tuple[Any, ...] = ()
    high: tuple[Any, ...] | None = None
    for op, value in ranges:
        key = column_sort_key(column, value)
        # A DESC column's sort key is inverted: "greater" means "earlier".
        effective = op
        if column.descending:
            effective = {"<": ">", "<=": ">=", ">": "<", ">=": "<="}[op]
        if effective == ">":
            candidate_low: tuple[Any, ...] = (key, MAX)
            low = max(low, candidate_low) if low else candidate_low
        elif effective == ">=":
            candidate_low = (key,)
            low = max(low, candidate_low) if low else candidate_low
        elif effective == "<":
            candidate_high: tuple[Any, ...] = (key,)
            high = candidate_high if high is None else min(high, candidate_high)
        else:
            candidate_high = (key, MAX)
            high = candidate_high if high is None else min(high, candidate_high)
    return low, high
