"""`Rows`: one page of a result, immutable so that many callers can hold it at once."""

from __future__ import annotations

from collections import namedtuple
from collections.abc import Iterable, Iterator, Mapping, Sequence
from functools import lru_cache
from typing import Any, overload

__all__ = ["Rows"]


@lru_cache(maxsize=1024)
def _row_type(columns: tuple[str, ...]) -> type[tuple[Any, ...]]:
    return namedtuple("Row", columns, rename=True)


class Rows(Sequence[tuple[Any, ...]]):
    """One page of rows, shared read-only by every caller of a coalesced read.

    Rows are named tuples (whatever row factory the driver used), the page is a tuple,
    and ``paging_state`` is the opaque cursor of the next page (None on the last page):
    pass it back as ``paging_state=`` to read the next page, itself a coalesced read.
    """

    __slots__ = ("_rows", "column_names", "paging_state")

    def __init__(
        self,
        rows: Iterable[Any],
        column_names: Sequence[str] = (),
        paging_state: bytes | None = None,
    ) -> None:
        self.column_names = tuple(column_names)
        self.paging_state = paging_state
        self._rows = tuple(self._freeze(row) for row in rows)

    def _freeze(self, row: Any) -> tuple[Any, ...]:
        if isinstance(row, tuple) and hasattr(row, "_fields"):
            return row
        if isinstance(row, Mapping):
            return _row_type(tuple(row))(*row.values())
        return _row_type(self.column_names)(*row)

    @property
    def has_more_pages(self) -> bool:
        return self.paging_state is not None

    def one(self) -> tuple[Any, ...] | None:
        """The first row, or None for an empty page."""
        return self._rows[0] if self._rows else None

    def __len__(self) -> int:
        return len(self._rows)

    @overload
    def __getitem__(self, index: int) -> tuple[Any, ...]: ...

    @overload
    def __getitem__(self, index: slice) -> Sequence[tuple[Any, ...]]: ...

    def __getitem__(self, index: int | slice) -> tuple[Any, ...] | Sequence[tuple[Any, ...]]:
        return self._rows[index]

    def __iter__(self) -> Iterator[tuple[Any, ...]]:
        return iter(self._rows)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Rows):
            return self._rows == other._rows and self.paging_state == other.paging_state
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        more = ", more pages" if self.paging_state is not None else ""
        return f"<Rows {len(self._rows)} rows{more}>"
