"""SELECT: choosing partitions and clustering slices, filtering, paging.

`run_select` evaluates one `Select` against a table's data and returns a
`ReadResult`: the page of raw rows plus which partitions were touched (for
the latency model). Partitions are visited in token order, rows in
clustering order (or its reverse for `ORDER BY ... DESC`), which is what
makes the key-based `PagingState` resumable.

Restrictions follow Cassandra's rules closely enough for drivers and tests:
`=`/`IN` on the whole partition key selects partitions, `=`/`IN` on a
clustering prefix plus one range on the next clustering column selects a
slice, and anything else (partial partition key, gaps in the clustering
key, regular columns) is a filter that requires `ALLOW FILTERING`.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from coalesce.cql.results import ColumnSpec
from coalesce.cql.types import parse_type
from coalesce.emulator.errors import InvalidRequest
from coalesce.emulator.ordering import MAX, column_sort_key, range_bounds
from coalesce.emulator.paging import PagingState
from coalesce.emulator.schema import Column, TableDef
from coalesce.emulator.statements import InList, Select
from coalesce.emulator.storage import Partition, Row, TableData, routing_key, token_of
from coalesce.emulator.values import UNSET, decode_bound, resolve, serialize_checked

__all__ = ["ReadResult", "result_columns", "run_select"]

_BIGINT = parse_type("bigint")
_INT = parse_type("int")
_FILTERING_MESSAGE = (
    "Cannot execute this query as it might involve data filtering and thus may have "
    "unpredictable performance. If you want to execute this query despite the performance "
    "unpredictability, use ALLOW FILTERING"
)

_Getter = Callable[[Partition, Row | None], bytes | None]


@dataclass(slots=True)
class ReadResult:
    """One page of a SELECT.

    `touched` lists (token, rows read) for every partition the read looked
    at, `scan` is True for reads not restricted to known partitions.
    """

    columns: list[ColumnSpec]
    rows: list[list[bytes | None]]
    paging_state: bytes | None = None
    touched: list[tuple[int, int]] = field(default_factory=list)
    scan: bool = False


@dataclass(slots=True)
class _Restriction:
    eq: list[Any] | None = None
    ranges: list[tuple[str, Any]] = field(default_factory=list)


def result_columns(select: Select, table: TableDef) -> list[ColumnSpec]:
    """The result metadata of `select` (what PREPARE announces)."""
    return [spec for spec, _ in _selection(select, table)]


def _selection(select: Select, table: TableDef) -> list[tuple[ColumnSpec, _Getter]]:
    ks, name = table.keyspace, table.name
    if not select.selectors:
        columns = list(table.columns.values())
        if select.distinct:
            raise InvalidRequest(
                "SELECT DISTINCT queries must request all the partition key columns"
            )
        return [(ColumnSpec(ks, name, c.name, c.type), _getter(table, c)) for c in columns]
    out: list[tuple[ColumnSpec, _Getter]] = []
    for selector in select.selectors:
        if selector.kind == "count":
            spec = ColumnSpec(ks, name, selector.alias or "count", _BIGINT)
            out.append((spec, _null_getter))
            continue
        assert selector.column is not None
        column = table.columns.get(selector.column)
        if column is None:
            raise InvalidRequest(f"Undefined column name {selector.column}")
        if selector.kind == "writetime":
            spec = ColumnSpec(ks, name, selector.alias or f"writetime({column.name})", _BIGINT)
            out.append((spec, _writetime_getter(column)))
        elif selector.kind == "ttl":
            spec = ColumnSpec(ks, name, selector.alias or f"ttl({column.name})", _INT)
            out.append((spec, _null_getter))
        else:
            spec = ColumnSpec(ks, name, selector.alias or column.name, column.type)
            out.append((spec, _getter(table, column)))
    if select.distinct:
        selected = {s.column for s in select.selectors}
        if any(c.name not in selected for c in table.partition_key):
            raise InvalidRequest(
                "SELECT DISTINCT queries must request all the partition key columns"
            )
        allowed = {c.name for c in table.partition_key} | {
            c.name for c in table.columns.values() if c.kind == "static"
        }
        if not selected <= allowed:
            raise InvalidRequest(
                "SELECT DISTINCT queries must only request partition key columns and/or static "
                "columns"
            )
    return out


def _null_getter(partition: Partition, row: Row | None) -> bytes | None:
    return None


def _getter(table: TableDef, column: Column) -> _Getter:
    position = column.position
    if column.kind == "partition_key":
        return lambda p, r: p.raw_values[position]
    if column.kind == "clustering":
        return lambda p, r: None if r is None else r.clustering_raw[position]
    name = column.name
    if column.kind == "static":
        return lambda p, r: p.static.raw.get(name)
    return lambda p, r: None if r is None else r.cells.raw.get(name)


def _writetime_getter(column: Column) -> _Getter:
    name = column.name

    def writetime(p: Partition, r: Row | None) -> bytes | None:
        if r is None or column.kind in ("partition_key", "clustering"):
            raise InvalidRequest(
                f"Cannot use selection function writeTime on PRIMARY KEY part {name}"
            )
        if name not in r.cells:
            return None
        return _BIGINT.serialize(r.timestamp)

    return writetime


def _restrictions(select: Select, table: TableDef, bound: Sequence[Any]) -> dict[str, _Restriction]:
    out: dict[str, _Restriction] = {}
    for relation in select.where:
        column = table.columns.get(relation.column)
        if column is None:
            raise InvalidRequest(f"Undefined column name {relation.column}")
        restriction = out.setdefault(column.name, _Restriction())
        if relation.op in ("=", "IN"):
            if restriction.eq is not None:
                raise InvalidRequest(
                    f"{column.name} cannot be restricted by more than one relation if it includes "
                    "an Equal"
                )
            if relation.op == "=":
                assert not isinstance(relation.value, InList)
                values = [resolve(relation.value, column.type, bound)]
            elif isinstance(relation.value, InList):
                values = [resolve(item, column.type, bound) for item in relation.value.items]
            else:
                listed = resolve(relation.value, _list_of(column), bound)
                values = [] if listed is None or listed is UNSET else list(listed)
            for value in values:
                if value is None:
                    raise InvalidRequest(
                        f"Invalid null value in condition for column {column.name}"
                    )
                if value is UNSET:
                    raise InvalidRequest(f"Invalid unset value for column {column.name}")
            restriction.eq = _dedupe(column, values)
        else:
            assert not isinstance(relation.value, InList)
            value = resolve(relation.value, column.type, bound)
            if value is None or value is UNSET:
                raise InvalidRequest(f"Invalid null value in condition for column {column.name}")
            restriction.ranges.append((relation.op, value))
        if restriction.eq is not None and restriction.ranges:
            raise InvalidRequest(
                f"{column.name} cannot be restricted by both an equality and an inequality relation"
            )
    return out


def _list_of(column: Column) -> Any:
    return parse_type(f"list<{column.type.cql_name}>")


def _dedupe(column: Column, values: list[Any]) -> list[Any]:
    seen: set[bytes] = set()
    out: list[Any] = []
    for value in values:
        raw = serialize_checked(column.type, value)
        if raw not in seen:
            seen.add(raw)
            out.append(value)
    return out


def _matches(op: str, actual: Any, expected: Any, column: Column) -> bool:
    if actual is None:
        return False
    a = column_sort_key(_ascending(column), actual)
    b = column_sort_key(_ascending(column), expected)
    if op == "<":
        return bool(a < b)
    if op == "<=":
        return bool(a <= b)
    if op == ">":
        return bool(a > b)
    if op == ">=":
        return bool(a >= b)
    return bool(a == b)


def _ascending(column: Column) -> Column:
    if not column.descending:
        return column
    return Column(column.name, column.type, column.kind, column.position, False)


@dataclass(slots=True)
class _Plan:
    partitions: list[Partition] | None  # None: scan everything
    requested_tokens: list[int]
    prefixes: list[tuple[Any, ...]]  # sort-key prefixes, in iteration order
    range_low: tuple[Any, ...] = ()
    range_high: tuple[Any, ...] | None = None
    row_filters: list[Callable[[Partition, Row | None], bool]] = field(default_factory=list)
    reverse: bool = False
    clustering_restricted: bool = False


def _plan(select: Select, table: TableDef, data: TableData, bound: Sequence[Any]) -> _Plan:
    restrictions = _restrictions(select, table, bound)
    filters: list[Callable[[Partition, Row | None], bool]] = []
    needs_filtering = False

    pk = table.partition_key
    pk_restricted = [restrictions.get(c.name) for c in pk]
    partitions: list[Partition] | None = None
    tokens: list[int] = []
    if all(r is not None and r.eq is not None for r in pk_restricted):
        eq_lists = [r.eq for r in pk_restricted if r is not None and r.eq is not None]
        found: dict[bytes, Partition] = {}
        for combo in itertools.product(*eq_lists):
            key = routing_key(pk, combo)
            tokens.append(token_of(key))
            partition = data.get(key)
            if partition is not None:
                found[key] = partition
        partitions = sorted(found.values(), key=lambda p: (p.token, p.key))
    else:
        for column, restriction in zip(pk, pk_restricted, strict=True):
            if restriction is not None:
                needs_filtering = True
                filters.append(_partition_filter(column, restriction))

    reverse = _ordering(select, table, partitions is not None)

    prefixes: list[tuple[Any, ...]] = [()]
    range_low: tuple[Any, ...] = ()
    range_high: tuple[Any, ...] | None = None
    # Clustering restrictions narrow a slice only while they form an
    # equality prefix plus at most one range; the rest must be filtered.
    slicing = partitions is not None
    clustering_restricted = False
    for column in table.clustering_key:
        restriction = restrictions.get(column.name)
        if restriction is None:
            slicing = False
            continue
        clustering_restricted = True
        if not slicing:
            needs_filtering = True
            filters.append(_row_filter(column, restriction))
        elif restriction.eq is not None:
            keyed = sorted(column_sort_key(column, v) for v in restriction.eq)
            prefixes = [(*p, k) for p in prefixes for k in keyed]
        else:
            range_low, range_high = range_bounds(column, restriction.ranges)
            slicing = False

    for name, restriction in restrictions.items():
        column = table.columns[name]
        if column.kind in ("regular", "static"):
            needs_filtering = True
            filters.append(_row_filter(column, restriction))

    if needs_filtering and not select.allow_filtering:
        raise InvalidRequest(_FILTERING_MESSAGE)
    if reverse:
        prefixes.reverse()
    return _Plan(
        partitions,
        tokens,
        prefixes,
        range_low,
        range_high,
        filters,
        reverse,
        clustering_restricted,
    )


def _partition_filter(
    column: Column, restriction: _Restriction
) -> Callable[[Partition, Row | None], bool]:
    position = column.position

    def check(partition: Partition, row: Row | None) -> bool:
        return _satisfies(column, partition.values[position], restriction)

    return check


def _row_filter(
    column: Column, restriction: _Restriction
) -> Callable[[Partition, Row | None], bool]:
    name, kind, position = column.name, column.kind, column.position

    def check(partition: Partition, row: Row | None) -> bool:
        if kind == "clustering":
            value = None if row is None else row.clustering[position]
        elif kind == "static":
            value = partition.static.get(name)
        else:
            value = None if row is None else row.cells.get(name)
        return _satisfies(column, value, restriction)

    return check


def _satisfies(column: Column, value: Any, restriction: _Restriction) -> bool:
    if restriction.eq is not None:
        return any(_matches("=", value, v, column) for v in restriction.eq)
    return all(_matches(op, value, v, column) for op, v in restriction.ranges)


def _ordering(select: Select, table: TableDef, restricted: bool) -> bool:
    """Whether ORDER BY asks for the reverse of the table's clustering order."""
    if not select.order_by:
        return False
    if not restricted:
        raise InvalidRequest(
            "ORDER BY is only supported when the partition key is restricted by an EQ or an IN."
        )
    reversals: set[bool] = set()
    clustering = table.clustering_key
    for i, (name, direction) in enumerate(select.order_by):
        column = table.columns.get(name)
        if column is None:
            raise InvalidRequest(f"Undefined column name {name}")
        if column.kind != "clustering":
            raise InvalidRequest(
                f"Order by is currently only supported on the clustered columns "
                f"of the PRIMARY KEY, got {name}"
            )
        if i >= len(clustering) or clustering[i].name != name:
            raise InvalidRequest(
                "Order by currently only supports the ordering of columns "
                "following their declared order in the PRIMARY KEY"
            )
        wants_desc = direction == "DESC"
        reversals.add(wants_desc != column.descending)
    if len(reversals) > 1:
        raise InvalidRequest("Unsupported order by relation")
    return reversals.pop()


def _rows_of(partition: Partition, plan: _Plan, after: tuple[Any, ...] | None) -> Iterator[Row]:
    """Rows of one partition matching the clustering slice, in iteration order.

    `after` is the sort key of the last row already returned (paging).
    """
    for prefix in plan.prefixes:
        low = prefix + plan.range_low
        high = prefix + plan.range_high if plan.range_high is not None else (*prefix, MAX)
        start, stop = partition.bounds(low, high)
        if after is not None:
            if plan.reverse:
                stop = min(stop, partition.position_of(after))
            else:
                start = max(start, partition.position_after(after))
        if start >= stop:
            continue
        rows = partition.rows[start:stop]
        if plan.reverse:
            rows.reverse()
        yield from rows


def _int_option(term: Any, bound: Sequence[Any], what: str) -> int | None:
    if term is None:
        return None
    value = resolve(term, _INT, bound)
    if value is None or value is UNSET:
        return None
    if not isinstance(value, int) or value <= 0:
        raise InvalidRequest(f"{what} must be strictly positive")
    return value


def run_select(
    select: Select,
    data: TableData,
    bound: Sequence[Any],
    *,
    page_size: int | None,
    paging_state: bytes | None,
) -> ReadResult:
    """Evaluate `select` and return one page; raises `InvalidRequest` for invalid queries."""
    table = data.definition
    selection = _selection(select, table)
    columns = [spec for spec, _ in selection]
    getters = [getter for _, getter in selection]
    plan = _plan(select, table, data, bound)
    limit = _int_option(select.limit, bound, "LIMIT")
    per_partition = _int_option(select.per_partition_limit, bound, "PER PARTITION LIMIT")
    is_count = any(s.kind == "count" for s in select.selectors)
    if is_count:
        # An aggregate is computed over every matching row into one row, which
        # LIMIT and paging then apply to.
        page_size = None
        paging_state = None
        limit = None
    if page_size is not None and page_size <= 0:
        page_size = None

    state = PagingState.decode(paging_state) if paging_state is not None else None
    resume_token_key: tuple[int, bytes] | None = None
    resume_after: tuple[Any, ...] | None = None
    returned = 0
    partition_returned = 0
    if state is not None:
        resume_token_key = (token_of(state.partition_key), state.partition_key)
        returned = state.returned
        partition_returned = state.partition_returned
        if state.clustering is not None:
            resume_after = _decode_clustering(table, state.clustering)
        if limit is not None and returned >= limit:
            return ReadResult(columns, [], None, [], plan.partitions is None)

    partitions = plan.partitions if plan.partitions is not None else data.in_token_order()
    touched: dict[int, int] = {}
    for token in plan.requested_tokens:
        touched.setdefault(token, 0)
    out: list[list[bytes | None]] = []
    count = 0
    first: list[bytes | None] | None = None
    last: tuple[Partition, Row | None, int] | None = None
    more = False
    filters = plan.row_filters

    done = False
    for partition in partitions:
        if done:
            break
        after: tuple[Any, ...] | None = None
        in_partition = 0
        if resume_token_key is not None:
            position = (partition.token, partition.key)
            if position < resume_token_key:
                continue
            if position == resume_token_key:
                resume_token_key = None
                if state is not None and state.clustering is None:
                    continue
                after = resume_after
                in_partition = partition_returned
            resume_token_key = None
        touched.setdefault(partition.token, 0)
        candidates: Iterator[Row | None]
        if select.distinct or (
            not partition.rows and partition.static and not plan.clustering_restricted
        ):
            candidates = iter([None])
        else:
            candidates = (r for r in _rows_of(partition, plan, after) if r.live)
        for row in candidates:
            if filters and not all(f(partition, row) for f in filters):
                continue
            if per_partition is not None and in_partition >= per_partition:
                break
            if limit is not None and returned + count >= limit:
                done = True
                break
            if page_size is not None and count >= page_size:
                more = True
                done = True
                break
            count += 1
            in_partition += 1
            touched[partition.token] += 1
            if is_count:
                if first is None:
                    first = [g(partition, row) for g in getters]
                continue
            out.append([g(partition, row) for g in getters])
            last = (partition, row, in_partition)
    if is_count:
        row_out: list[bytes | None] = first if first is not None else [None] * len(getters)
        for i, selector in enumerate(select.selectors):
            if selector.kind == "count":
                row_out[i] = _BIGINT.serialize(count)
        out = [row_out]
    next_state: bytes | None = None
    if more and last is not None:
        last_partition, last_row, last_in_partition = last
        clustering = None
        if last_row is not None and not select.distinct:
            clustering = last_row.clustering_raw
        next_state = PagingState(
            last_partition.key, clustering, returned + count, last_in_partition
        ).encode()
    return ReadResult(columns, out, next_state, list(touched.items()), plan.partitions is None)


def _decode_clustering(table: TableDef, cells: tuple[bytes, ...]) -> tuple[Any, ...]:
    if len(cells) != len(table.clustering_key):
        raise InvalidRequest("Invalid value for the paging state")
    return tuple(
        column_sort_key(column, decode_bound(cell, column.type))
        for column, cell in zip(table.clustering_key, cells, strict=True)
    )
