"""What each bind marker of a statement binds to: its name and CQL type.

`bind_markers(statement, resolve_table)` returns one `ColumnSpec` per
marker, in marker order, named and typed as Cassandra names them (`col`,
`in(col)`, `key(col)`, `value(col)`, `[limit]`, `[ttl]`, `[timestamp]`, or
the `:name` given in the text), plus the `pk_indexes` a token-aware driver
uses to compute the routing key of a bound statement. Unknown tables or
columns raise `InvalidRequest`, so a bad PREPARE fails like it would on
Scylla.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from coalesce.cql.results import ColumnSpec
from coalesce.cql.types import CqlType, ListType, MapType, SetType, TupleType, parse_type
from coalesce.emulator.errors import InvalidRequest
from coalesce.emulator.schema import TableDef
from coalesce.emulator.statements import (
    Batch,
    BindMarker,
    Delete,
    InList,
    Insert,
    ListLiteral,
    MapLiteral,
    Relation,
    Select,
    SetLiteral,
    Statement,
    TableRef,
    Term,
    TupleLiteral,
    Update,
)

__all__ = ["BoundShape", "bind_markers"]

_INT = parse_type("int")
_BIGINT = parse_type("bigint")

TableResolver = Callable[[TableRef], TableDef]


@dataclass(slots=True)
class BoundShape:
    """The markers of one statement: `specs[i]` describes marker i."""

    specs: list[ColumnSpec] = field(default_factory=list)
    pk_indexes: list[int] = field(default_factory=list)


class _Collector:
    def __init__(self, table: TableDef | None) -> None:
        self.table = table
        self.found: dict[int, ColumnSpec] = {}

    def add(self, marker: BindMarker, name: str, ctype: CqlType) -> None:
        table = self.table
        self.found[marker.index] = ColumnSpec(
            table.keyspace if table else "", table.name if table else "", marker.name or name, ctype
        )

    def term(self, term: Term | None, name: str, ctype: CqlType) -> None:
        if term is None:
            return
        if isinstance(term, BindMarker):
            self.add(term, name, ctype)
        elif isinstance(term, ListLiteral | SetLiteral) and isinstance(ctype, ListType):
            for item in term.items:
                self.term(item, name, ctype.element)
        elif isinstance(term, MapLiteral) and isinstance(ctype, MapType):
            for key, value in term.items:
                self.term(key, name, ctype.key)
                self.term(value, name, ctype.value)
        elif isinstance(term, TupleLiteral) and isinstance(ctype, TupleType):
            for item, element in zip(term.items, ctype.elements, strict=False):
                self.term(item, name, element)

    def column_type(self, name: str) -> CqlType:
        assert self.table is not None
        column = self.table.columns.get(name)
        if column is None:
            raise InvalidRequest(f"Undefined column name {name}")
        return column.type

    def relation(self, column: str, op: str, value: Term | InList) -> None:
        ctype = self.column_type(column)
        if isinstance(value, InList):
            for item in value.items:
                self.term(item, column, ctype)
        elif op == "IN":
            self.term(value, f"in({column})", ListType(ctype, frozen=False))
        else:
            self.term(value, column, ctype)


def bind_markers(statement: Statement, resolve_table: TableResolver) -> BoundShape:
    """Describe every bind marker of `statement`; see the module docstring."""
    if isinstance(statement, Batch):
        shape = BoundShape()
        found: dict[int, ColumnSpec] = {}
        for child in statement.statements:
            found.update(_collect(child, resolve_table).found)
        if statement.timestamp is not None:
            collector = _Collector(None)
            collector.term(statement.timestamp, "[timestamp]", _BIGINT)
            found.update(collector.found)
        shape.specs = [found[i] for i in sorted(found)]
        return shape
    if not isinstance(statement, Insert | Update | Delete | Select):
        return BoundShape()
    collector = _collect(statement, resolve_table)
    specs = [collector.found[i] for i in sorted(collector.found)]
    assert collector.table is not None
    return BoundShape(specs, _pk_indexes(statement, collector.table))


def _collect(statement: Insert | Update | Delete | Select, resolve: TableResolver) -> _Collector:
    table = resolve(statement.table)
    c = _Collector(table)
    if isinstance(statement, Insert):
        for column, value in zip(statement.columns, statement.values, strict=True):
            c.term(value, column, c.column_type(column))
        c.term(statement.ttl, "[ttl]", _INT)
        c.term(statement.timestamp, "[timestamp]", _BIGINT)
        return c
    if isinstance(statement, Update):
        c.term(statement.ttl, "[ttl]", _INT)
        c.term(statement.timestamp, "[timestamp]", _BIGINT)
        for assignment in statement.assignments:
            ctype = c.column_type(assignment.column)
            if assignment.kind == "set_element":
                if isinstance(ctype, MapType):
                    c.term(assignment.key, f"key({assignment.column})", ctype.key)
                    c.term(assignment.value, f"value({assignment.column})", ctype.value)
                elif isinstance(ctype, ListType) and not isinstance(ctype, SetType):
                    c.term(assignment.key, f"idx({assignment.column})", _INT)
                    c.term(assignment.value, f"value({assignment.column})", ctype.element)
                else:
                    raise InvalidRequest(
                        f"Invalid operation ({assignment.column}[?] = ?) for non list/map column "
                        f"{assignment.column}"
                    )
            elif assignment.kind == "remove" and isinstance(ctype, MapType):
                c.term(assignment.value, assignment.column, SetType(ctype.key))
            else:
                c.term(assignment.value, assignment.column, ctype)
        _where(c, statement.where)
        for condition in statement.conditions:
            c.relation(condition.column, condition.op, condition.value)
        return c
    if isinstance(statement, Delete):
        for column, key in statement.columns:
            ctype = c.column_type(column)
            if key is not None:
                key_type = ctype.key if isinstance(ctype, MapType) else _INT
                c.term(key, f"key({column})", key_type)
        c.term(statement.timestamp, "[timestamp]", _BIGINT)
        _where(c, statement.where)
        for condition in statement.conditions:
            c.relation(condition.column, condition.op, condition.value)
        return c
    _where(c, statement.where)
    c.term(statement.per_partition_limit, "[per_partition_limit]", _INT)
    c.term(statement.limit, "[limit]", _INT)
    return c


def _where(c: _Collector, where: tuple[Relation, ...]) -> None:
    for relation in where:
        c.relation(relation.column, relation.op, relation.value)


def _pk_indexes(statement: Insert | Update | Delete | Select, table: TableDef) -> list[int]:
    bound: dict[str, int] = {}
    if isinstance(statement, Insert):
        for column, value in zip(statement.columns, statement.values, strict=True):
            if isinstance(value, BindMarker):
                bound[column] = value.index
    else:
        for relation in statement.where:
            if relation.op == "=" and isinstance(relation.value, BindMarker):
                bound[relation.column] = relation.value.index
    indexes = [bound.get(column.name) for column in table.partition_key]
    if any(i is None for i in indexes):
        return []
    return [i for i in indexes if i is not None]
