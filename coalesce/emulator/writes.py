"""INSERT, UPDATE and DELETE: planning a mutation, checking its conditions, applying it.

`plan_write` turns one modification statement plus its bound values into a
`PlannedWrite`: the rows it targets, an optional lightweight-transaction
check and an `apply` step. Planning validates everything (missing key
parts, nulls in keys, counter misuse, unknown columns) and raises
`InvalidRequest` before anything is changed, so a failing statement -- or a
failing statement anywhere in a BATCH -- leaves the data untouched.

Conditions are evaluated against the data as it is when `check` runs; the
emulator runs each request to completion without awaiting in between, so a
check followed by its apply is atomic, as Paxos makes it on Scylla.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from coalesce.cql.results import ColumnSpec
from coalesce.cql.types import ListType, MapType, SetType, parse_type
from coalesce.emulator.errors import InvalidRequest
from coalesce.emulator.ordering import MAX, column_sort_key, range_bounds
from coalesce.emulator.schema import Column, TableDef
from coalesce.emulator.statements import (
    Assignment,
    Condition,
    Delete,
    InList,
    Insert,
    Relation,
    Term,
    Update,
)
from coalesce.emulator.storage import Cells, Partition, Row, TableData, routing_key, token_of
from coalesce.emulator.values import UNSET, resolve, serialize_checked

__all__ = ["ConditionResult", "PlannedWrite", "plan_write"]

_BOOLEAN = parse_type("boolean")
_INT = parse_type("int")
_BIGINT = parse_type("bigint")


@dataclass(slots=True)
class ConditionResult:
    """The outcome of an IF clause: `[applied]` plus the current values shown on failure."""

    applied: bool
    columns: list[ColumnSpec] = field(default_factory=list)
    values: list[bytes | None] = field(default_factory=list)

    def as_row(self, table: TableDef) -> tuple[list[ColumnSpec], list[bytes | None]]:
        spec = ColumnSpec(table.keyspace, table.name, "[applied]", _BOOLEAN)
        return [spec, *self.columns], [_BOOLEAN.serialize(self.applied), *self.values]


@dataclass(slots=True)
class PlannedWrite:
    """A validated mutation. `tokens` are the partitions it writes (for the latency model)."""

    data: TableData
    tokens: list[int]
    apply: Callable[[], None]
    check: Callable[[], ConditionResult] | None = None


@dataclass(slots=True)
class _Key:
    routing: bytes
    partition_values: tuple[Any, ...]
    clustering: tuple[Any, ...] | None
    sort_key: tuple[Any, ...] | None
    clustering_raw: tuple[bytes, ...] = ()


def plan_write(
    statement: Insert | Update | Delete,
    data: TableData,
    bound: Sequence[Any],
    timestamp: int,
) -> PlannedWrite:
    """Validate `statement` against `data`'s table and plan it; see the module docstring.

    `timestamp` (microseconds) is the write time unless the statement says
    USING TIMESTAMP; it is recorded for WRITETIME() only -- the emulator
    applies writes in arrival order, it does not resolve conflicts by time.
    """
    if isinstance(statement, Insert):
        return _plan_insert(statement, data, bound, timestamp)
    if isinstance(statement, Update):
        return _plan_update(statement, data, bound, timestamp)
    return _plan_delete(statement, data, bound)


def _timestamp(term: Term | None, bound: Sequence[Any], default: int) -> int:
    if term is None:
        return default
    value = resolve(term, _BIGINT, bound)
    if value is None or value is UNSET:
        return default
    assert isinstance(value, int)
    return value


def _check_ttl(term: Term | None, bound: Sequence[Any]) -> None:
    # TTLs are accepted and ignored (data never expires in the emulator), but
    # validated so a bad one fails as it would on Scylla.
    if term is None:
        return
    value = resolve(term, _INT, bound)
    if isinstance(value, int) and value < 0:
        raise InvalidRequest("A TTL must be greater or equal to 0, but was " + str(value))


def _key_value(column: Column, value: Any) -> Any:
    if value is UNSET:
        raise InvalidRequest(f"Invalid unset value for column {column.name}")
    if value is None:
        kind = "partition key part" if column.kind == "partition_key" else "clustering key part"
        raise InvalidRequest(f"Invalid null value for {kind} {column.name}")
    serialize_checked(column.type, value)
    return value


def _make_key(table: TableDef, pk: Sequence[Any], ck: Sequence[Any] | None) -> _Key:
    routing = routing_key(table.partition_key, pk)
    if ck is None:
        return _Key(routing, tuple(pk), None, None)
    columns = table.clustering_key
    sort_key = tuple(column_sort_key(c, v) for c, v in zip(columns, ck, strict=False))
    raw = tuple(c.type.serialize(v) for c, v in zip(columns, ck, strict=False))
    return _Key(routing, tuple(pk), tuple(ck), sort_key, raw)


# ------------------------------------------------------------------ INSERT


def _plan_insert(
    statement: Insert, data: TableData, bound: Sequence[Any], default_ts: int
) -> PlannedWrite:
    table = data.definition
    if table.is_counter:
        raise InvalidRequest(
            "INSERT statements are not allowed on counter tables, use UPDATE instead"
        )
    values: dict[str, Any] = {}
    for name, term in zip(statement.columns, statement.values, strict=True):
        column = table.columns.get(name)
        if column is None:
            raise InvalidRequest(f"Undefined column name {name}")
        if name in values:
            raise InvalidRequest(f"Multiple definitions found for column {name}")
        values[name] = resolve(term, column.type, bound)
    missing = [c.name for c in table.partition_key if c.name not in values]
    if missing:
        raise InvalidRequest(f"Some partition key parts are missing: {', '.join(missing)}")
    missing = [c.name for c in table.clustering_key if c.name not in values]
    if missing:
        raise InvalidRequest(f"Some clustering keys are missing: {', '.join(missing)}")
    pk = [_key_value(c, values[c.name]) for c in table.partition_key]
    ck = [_key_value(c, values[c.name]) for c in table.clustering_key]
    key = _make_key(table, pk, ck if table.clustering_key else ())
    _check_ttl(statement.ttl, bound)
    ts = _timestamp(statement.timestamp, bound, default_ts)
    cells = {
        name: value
        for name, value in values.items()
        if table.columns[name].kind in ("regular", "static") and value is not UNSET
    }

    def apply() -> None:
        partition = data.partition_for_write(key.routing, key.partition_values)
        assert key.clustering is not None and key.sort_key is not None
        row = partition.upsert(key.clustering, key.sort_key, key.clustering_raw)
        row.marker = True
        row.timestamp = ts
        for name, value in cells.items():
            column = table.columns[name]
            target = partition.static if column.kind == "static" else row.cells
            target.put(column, value)

    check: Callable[[], ConditionResult] | None = None
    if statement.if_not_exists:

        def check_not_exists() -> ConditionResult:
            row = _find_row(data, key)
            if row is None:
                return ConditionResult(True)
            partition = data.get(key.routing)
            assert partition is not None
            columns = list(table.columns.values())
            return ConditionResult(
                False,
                [ColumnSpec(table.keyspace, table.name, c.name, c.type) for c in columns],
                [_serialized(c, partition, row) for c in columns],
            )

        check = check_not_exists
    return PlannedWrite(data, [_token(key)], apply, check)


def _token(key: _Key) -> int:
    return token_of(key.routing)


def _find_row(data: TableData, key: _Key) -> Row | None:
    partition = data.get(key.routing)
    if partition is None or key.sort_key is None:
        return None
    row = partition.find(key.sort_key)
    return row if row is not None and row.live else None


def _serialized(column: Column, partition: Partition, row: Row | None) -> bytes | None:
    if column.kind == "partition_key":
        value = partition.values[column.position]
    elif column.kind == "clustering":
        value = None if row is None else row.clustering[column.position]
    elif column.kind == "static":
        value = partition.static.get(column.name)
    else:
        value = None if row is None else row.cells.get(column.name)
    return None if value is None else column.type.serialize(value)


# ------------------------------------------------------- WHERE for writes


def _key_lists(
    table: TableDef, where: tuple[Relation, ...], bound: Sequence[Any]
) -> tuple[list[list[Any]], list[list[Any]], list[tuple[str, Any]], Column | None]:
    """Partition and clustering value lists from `=`/`IN`, plus a trailing clustering range."""
    eq: dict[str, list[Any]] = {}
    ranges: list[tuple[str, Any]] = []
    range_column: Column | None = None
    for relation in where:
        column = table.columns.get(relation.column)
        if column is None:
            raise InvalidRequest(f"Undefined column name {relation.column}")
        if column.kind not in ("partition_key", "clustering"):
            raise InvalidRequest(f"Non PRIMARY KEY columns found in where clause: {column.name} ")
        if relation.op == "=":
            assert not isinstance(relation.value, InList)
            values = [resolve(relation.value, column.type, bound)]
        elif relation.op == "IN":
            if isinstance(relation.value, InList):
                values = [resolve(t, column.type, bound) for t in relation.value.items]
            else:
                listed = resolve(relation.value, parse_type(f"list<{column.type.cql_name}>"), bound)
                values = [] if listed is None or listed is UNSET else list(listed)
        else:
            if column.kind != "clustering":
                raise InvalidRequest(
                    f"Only EQ and IN relation are supported on the partition key (unless you use "
                    f"the token() function) for {column.name}"
                )
            assert not isinstance(relation.value, InList)
            ranges.append(
                (relation.op, _key_value(column, resolve(relation.value, column.type, bound)))
            )
            range_column = column
            continue
        if column.name in eq:
            raise InvalidRequest(
                f"{column.name} cannot be restricted by more than one relation if it includes an "
                "Equal"
            )
        eq[column.name] = [_key_value(column, v) for v in values]
    missing = [c.name for c in table.partition_key if c.name not in eq]
    if missing:
        raise InvalidRequest(f"Some partition key parts are missing: {', '.join(missing)}")
    pk_lists = [eq[c.name] for c in table.partition_key]
    ck_lists: list[list[Any]] = []
    for column in table.clustering_key:
        if column.name not in eq:
            break
        ck_lists.append(eq[column.name])
    restricted_after = [c.name for c in table.clustering_key[len(ck_lists) :] if c.name in eq]
    if restricted_after or (range_column is not None and range_column.position != len(ck_lists)):
        raise InvalidRequest(
            "PRIMARY KEY column cannot be restricted as preceding column is not restricted"
        )
    return pk_lists, ck_lists, ranges, range_column


def _full_keys(table: TableDef, pk_lists: list[list[Any]], ck_lists: list[list[Any]]) -> list[_Key]:
    keys: list[_Key] = []
    for pk in itertools.product(*pk_lists):
        for ck in itertools.product(*ck_lists):
            keys.append(_make_key(table, pk, ck))
    return keys


# ------------------------------------------------------------------ UPDATE


def _plan_update(
    statement: Update, data: TableData, bound: Sequence[Any], default_ts: int
) -> PlannedWrite:
    table = data.definition
    _check_ttl(statement.ttl, bound)
    ts = _timestamp(statement.timestamp, bound, default_ts)
    pk_lists, ck_lists, ranges, _ = _key_lists(table, statement.where, bound)
    if ranges:
        raise InvalidRequest(
            "Slice restrictions are not supported on the clustering columns in UPDATE statements"
        )
    operations = [_operation(table, a, bound) for a in statement.assignments]
    only_static = all(table.columns[a.column].kind == "static" for a in statement.assignments)
    if len(ck_lists) != len(table.clustering_key) and not (only_static and not ck_lists):
        missing = [c.name for c in table.clustering_key[len(ck_lists) :]]
        raise InvalidRequest(f"Some clustering keys are missing: {', '.join(missing)}")
    keys = _full_keys(table, pk_lists, ck_lists)
    static_only_keys = only_static and not ck_lists and bool(table.clustering_key)
    conditions = [_condition(table, c, bound) for c in statement.conditions]
    if (statement.if_exists or conditions) and len(keys) > 1:
        raise InvalidRequest(
            "IN on the clustering key columns is not supported with conditional updates"
        )

    def apply() -> None:
        for key in keys:
            partition = data.partition_for_write(key.routing, key.partition_values)
            row: Row | None = None
            if not static_only_keys:
                assert key.clustering is not None and key.sort_key is not None
                row = partition.upsert(key.clustering, key.sort_key, key.clustering_raw)
                row.timestamp = ts
            for column, operate in operations:
                if column.kind == "static":
                    operate(partition.static)
                elif row is not None:
                    operate(row.cells)
            if row is not None and not row.live:
                partition.remove(row)
            data.discard_if_empty(partition)

    check = _conditional(table, data, keys, statement.if_exists, conditions, static_only_keys)
    return PlannedWrite(data, [_token(k) for k in keys], apply, check)


_Operation = tuple[Column, Callable[[Cells], None]]


def _operation(table: TableDef, assignment: Assignment, bound: Sequence[Any]) -> _Operation:
    column = table.columns.get(assignment.column)
    if column is None:
        raise InvalidRequest(f"Undefined column name {assignment.column}")
    if column.kind in ("partition_key", "clustering"):
        raise InvalidRequest(f"PRIMARY KEY part {column.name} found in SET part")
    ctype = column.type
    name = column.name
    kind = assignment.kind
    is_counter = ctype.cql_name == "counter"
    if is_counter and kind not in ("add", "remove"):
        raise InvalidRequest(
            f"Cannot set the value of counter column {name} (counters can only be "
            "incremented/decremented, not set)"
        )
    if kind == "set":
        value = resolve(assignment.value, ctype, bound)

        def set_value(cells: Cells) -> None:
            if value is not UNSET:
                cells.put(column, value)

        return column, set_value
    if kind == "set_element":
        assert assignment.key is not None
        if isinstance(ctype, MapType):
            key = resolve(assignment.key, ctype.key, bound)
            element = resolve(assignment.value, ctype.value, bound)
            if key is None:
                raise InvalidRequest(f"Invalid null map key for column {name}")

            def set_entry(cells: Cells) -> None:
                current = dict(cells.get(name) or {})
                if element is None:
                    current.pop(key, None)
                elif element is not UNSET:
                    current[key] = element
                cells.put(column, current)

            return column, set_entry
        if isinstance(ctype, ListType) and not isinstance(ctype, SetType):
            index = resolve(assignment.key, _INT, bound)
            element = resolve(assignment.value, ctype.element, bound)

            def set_index(cells: Cells) -> None:
                current = list(cells.get(name) or [])
                if not isinstance(index, int) or not 0 <= index < len(current):
                    raise InvalidRequest(
                        f"List index {index} out of bound, list has size {len(current)}"
                    )
                if element is None:
                    del current[index]
                elif element is not UNSET:
                    current[index] = element
                cells.put(column, current)

            return column, set_index
        raise InvalidRequest(f"Invalid operation ({name}[?] = ?) for non list/map column {name}")
    if is_counter:
        delta = resolve(assignment.value, _BIGINT, bound)
        if delta is None or delta is UNSET:
            raise InvalidRequest(f"Invalid null value for counter increment on {name}")
        sign = 1 if kind == "add" else -1

        def count(cells: Cells) -> None:
            cells.put(column, int(cells.get(name) or 0) + sign * delta)

        return column, count
    if not ctype.is_collection:
        op = "+" if kind in ("add", "prepend") else "-"
        raise InvalidRequest(
            f"Invalid operation ({name} = {name} {op} ?) for non counter column {name}"
        )
    if isinstance(ctype, MapType):
        if kind == "remove":
            keys = resolve(assignment.value, SetType(ctype.key), bound)

            def remove_keys(cells: Cells) -> None:
                current = dict(cells.get(name) or {})
                for k in keys or ():
                    current.pop(k, None)
                cells.put(column, current)

            return column, remove_keys
        if kind == "prepend":
            raise InvalidRequest(f"Invalid operation for map column {name}")
        addition = resolve(assignment.value, ctype, bound)

        def merge(cells: Cells) -> None:
            current = dict(cells.get(name) or {})
            current.update(addition or {})
            cells.put(column, current)

        return column, merge
    if isinstance(ctype, SetType):
        if kind == "prepend":
            raise InvalidRequest(f"Invalid operation for set column {name}")
        change = resolve(assignment.value, ctype, bound)

        def set_op(cells: Cells) -> None:
            current = set(cells.get(name) or ())
            if kind == "add":
                current |= set(change or ())
            else:
                current -= set(change or ())
            cells.put(column, frozenset(current))

        return column, set_op
    assert isinstance(ctype, ListType)
    change_list = resolve(assignment.value, ctype, bound)

    def list_op(cells: Cells) -> None:
        current = list(cells.get(name) or [])
        extra = list(change_list or [])
        if kind == "add":
            current = current + extra
        elif kind == "prepend":
            current = extra + current
        else:
            current = [item for item in current if item not in extra]
        cells.put(column, current)

    return column, list_op


# ------------------------------------------------------------- conditions

_Check = tuple[Column, str, list[Any]]


def _condition(table: TableDef, condition: Condition, bound: Sequence[Any]) -> _Check:
    column = table.columns.get(condition.column)
    if column is None:
        raise InvalidRequest(f"Undefined column name {condition.column}")
    if column.kind in ("partition_key", "clustering"):
        raise InvalidRequest(f"PRIMARY KEY column '{column.name}' cannot have IF conditions")
    if isinstance(condition.value, InList):
        values = [resolve(t, column.type, bound) for t in condition.value.items]
        return column, "IN", values
    if condition.op == "IN":
        listed = resolve(condition.value, parse_type(f"list<{column.type.cql_name}>"), bound)
        return column, "IN", list(listed or [])
    return column, condition.op, [resolve(condition.value, column.type, bound)]


def _compare(column: Column, op: str, actual: Any, expected: list[Any]) -> bool:
    if op == "IN":
        return any(_compare(column, "=", actual, [v]) for v in expected)
    value = expected[0]
    if op in ("=", "!="):
        equal = (actual is None and value is None) or (
            actual is not None
            and value is not None
            and serialize_checked(column.type, actual) == serialize_checked(column.type, value)
        )
        return equal if op == "=" else not equal
    if actual is None or value is None:
        return False
    plain = Column(column.name, column.type, column.kind, column.position, False)
    a, b = column_sort_key(plain, actual), column_sort_key(plain, value)
    return bool({"<": a < b, "<=": a <= b, ">": a > b, ">=": a >= b}[op])


def _conditional(
    table: TableDef,
    data: TableData,
    keys: list[_Key],
    if_exists: bool,
    conditions: list[_Check],
    static_only: bool,
) -> Callable[[], ConditionResult] | None:
    if not if_exists and not conditions:
        return None
    key = keys[0]

    def check() -> ConditionResult:
        partition = data.get(key.routing)
        row: Row | None = None
        if partition is not None and key.sort_key is not None and not static_only:
            row = partition.find(key.sort_key if table.clustering_key else ())
            if row is not None and not row.live:
                row = None
        exists = row is not None or (static_only and partition is not None)
        if if_exists:
            return ConditionResult(exists)
        shown: list[Column] = []
        ok = True
        for column, op, expected in conditions:
            if partition is None:
                actual = None
            elif column.kind == "static":
                actual = partition.static.get(column.name)
            else:
                actual = None if row is None else row.cells.get(column.name)
            if not _compare(column, op, actual, expected):
                ok = False
            if column not in shown:
                shown.append(column)
        if ok:
            return ConditionResult(True)
        if partition is None or (row is None and not any(c.kind == "static" for c in shown)):
            return ConditionResult(False)
        return ConditionResult(
            False,
            [ColumnSpec(table.keyspace, table.name, c.name, c.type) for c in shown],
            [_serialized(c, partition, row) for c in shown],
        )

    return check


# ------------------------------------------------------------------ DELETE


def _plan_delete(statement: Delete, data: TableData, bound: Sequence[Any]) -> PlannedWrite:
    table = data.definition
    # Validated so a bad USING TIMESTAMP fails as on Scylla; deletes need no time here.
    _timestamp(statement.timestamp, bound, 0)
    pk_lists, ck_lists, ranges, range_column = _key_lists(table, statement.where, bound)
    targets: list[tuple[Column, Any]] = []
    for name, key_term in statement.columns:
        column = table.columns.get(name)
        if column is None:
            raise InvalidRequest(f"Undefined column name {name}")
        if column.kind in ("partition_key", "clustering"):
            raise InvalidRequest(
                f"Invalid identifier {name} for deletion (should not be a PRIMARY KEY part)"
            )
        element_key: Any = None
        if key_term is not None:
            ctype = column.type
            if isinstance(ctype, MapType):
                element_key = resolve(key_term, ctype.key, bound)
            elif isinstance(ctype, ListType) and not isinstance(ctype, SetType):
                element_key = resolve(key_term, _INT, bound)
            else:
                raise InvalidRequest(f"Invalid operation on column {name}: not a map or list")
        targets.append((column, element_key))
    full_row = len(ck_lists) == len(table.clustering_key) and not ranges
    regular_targets = [c for c, _ in targets if c.kind == "regular"]
    if regular_targets and not full_row:
        raise InvalidRequest(
            f"Primary key column '{table.clustering_key[len(ck_lists)].name}' must be specified "
            f"in order to delete column '{regular_targets[0].name}'"
        )
    conditions = [_condition(table, c, bound) for c in statement.conditions]
    if (statement.if_exists or conditions) and not full_row:
        raise InvalidRequest(
            "DELETE statements must restrict all PRIMARY KEY columns with "
            "equality relations in order to use IF conditions"
        )
    partition_keys = _full_keys(table, pk_lists, [])
    prefixes = [
        tuple(column_sort_key(c, v) for c, v in zip(table.clustering_key, combo, strict=False))
        for combo in itertools.product(*ck_lists)
    ]
    range_bounds_: tuple[tuple[Any, ...], tuple[Any, ...] | None] = ((), None)
    if ranges and range_column is not None:
        range_bounds_ = range_bounds(range_column, ranges)

    def rows_in(partition: Partition) -> list[Row]:
        chosen: list[Row] = []
        low_suffix, high_suffix = range_bounds_
        for prefix in prefixes:
            high = prefix + high_suffix if high_suffix is not None else (*prefix, MAX)
            start, stop = partition.bounds(prefix + low_suffix, high)
            chosen.extend(partition.rows[start:stop])
        return chosen

    whole_partition = not ck_lists and not ranges and not targets

    def apply() -> None:
        for key in partition_keys:
            partition = data.get(key.routing)
            if partition is None:
                continue
            if whole_partition:
                data.drop_partition(key.routing)
                continue
            rows = rows_in(partition)
            for column, element_key in targets:
                if column.kind == "static":
                    _delete_cell(partition.static, column, element_key)
            for row in rows:
                if not targets:
                    partition.remove(row)
                    continue
                for column, element_key in targets:
                    if column.kind == "regular":
                        _delete_cell(row.cells, column, element_key)
                if not row.live:
                    partition.remove(row)
            data.discard_if_empty(partition)

    full_keys = _full_keys(table, pk_lists, ck_lists) if full_row else partition_keys
    check = _conditional(table, data, full_keys, statement.if_exists, conditions, False)
    return PlannedWrite(data, [_token(k) for k in partition_keys], apply, check)


def _delete_cell(cells: Cells, column: Column, element_key: Any) -> None:
    if element_key is None:
        cells.pop(column.name)
        return
    current = cells.get(column.name)
    if current is None:
        return
    if isinstance(column.type, MapType):
        remaining = dict(current)
        remaining.pop(element_key, None)
        cells.put(column, remaining)
        return
    items = list(current)
    if isinstance(element_key, int) and 0 <= element_key < len(items):
        del items[element_key]
    cells.put(column, items)
