"""A memo of SELECT outcomes, valid for as long as the table's data is unchanged.

A herd of identical reads is the emulator's main workload, and re-running
the same read against unchanged data gives the same rows; so the encoded
result of a SELECT is kept under the request's full identity (statement,
keyspace, bound bytes, page size, paging state, skip_metadata) and reused
while the table's `TableData` is the same object at the same `version`.
Writers bump the version, so a cached entry can never serve stale rows.
Statements calling functions (`now()`, ...) are never cached.

Only the *work* is skipped: callers still count the statement and charge
the latency model for every request, cached or not. Bounded: the memo is
simply emptied when it reaches `max_entries`.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Generic, TypeVar

from coalesce.emulator.statements import FunctionCall, InList, Select, Term, TupleLiteral
from coalesce.emulator.storage import TableData

__all__ = ["ReadCache", "is_deterministic"]

_V = TypeVar("_V")


def _term_is_deterministic(term: Term | InList | None) -> bool:
    if term is None:
        return True
    if isinstance(term, FunctionCall):
        return False
    if isinstance(term, InList | TupleLiteral):
        return all(_term_is_deterministic(item) for item in term.items)
    return True


def is_deterministic(select: Select) -> bool:
    """True unless the statement calls a function whose value changes per call."""
    return (
        all(_term_is_deterministic(r.value) for r in select.where)
        and _term_is_deterministic(select.limit)
        and _term_is_deterministic(select.per_partition_limit)
    )


class ReadCache(Generic[_V]):
    """Key -> value memo tied to one table's data version; see the module docstring."""

    def __init__(self, max_entries: int = 4096) -> None:
        self._max = max_entries
        self._entries: dict[Hashable, tuple[TableData, int, _V]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: Hashable, data: TableData) -> _V | None:
        """The value stored for `key` if `data` has not changed since; else None."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        stored_data, version, value = entry
        if stored_data is not data or version != data.version:
            del self._entries[key]
            return None
        return value

    def put(self, key: Hashable, data: TableData, version: int, value: _V) -> None:
        """Remember `value` as the result for `key` against `data` at `version`."""
        if len(self._entries) >= self._max:
            self._entries.clear()
        self._entries[key] = (data, version, value)

    def clear(self) -> None:
        self._entries.clear()
