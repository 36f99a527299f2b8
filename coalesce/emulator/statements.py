"""The syntax tree of the CQL subset: what `parser.parse` returns.

Nodes are immutable and know nothing of schemas or types: a `Constant` keeps
its literal text and is only given a type when a statement is executed
against a table. Bind markers are numbered in order of appearance across the
whole statement text (a text BATCH included), which is the order of the
values a client binds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

__all__ = [
    "AlterRole",
    "Assignment",
    "Batch",
    "BindMarker",
    "Condition",
    "Constant",
    "CreateKeyspace",
    "CreateRole",
    "CreateTable",
    "Delete",
    "DropKeyspace",
    "DropRole",
    "DropTable",
    "FunctionCall",
    "Grant",
    "InList",
    "Insert",
    "ListLiteral",
    "MapLiteral",
    "Relation",
    "Select",
    "Selector",
    "SetLiteral",
    "Statement",
    "TableRef",
    "Term",
    "Truncate",
    "TupleLiteral",
    "Update",
    "Use",
]


ConstantKind = Literal["string", "integer", "float", "uuid", "blob", "boolean", "null"]


@dataclass(frozen=True, slots=True)
class Constant:
    """A literal; `text` is its unescaped source text (`'-12'`, `'true'`, `'0xcafe'`)."""

    kind: ConstantKind
    text: str


@dataclass(frozen=True, slots=True)
class BindMarker:
    """`?` (name None) or `:name`; `index` is its position among the statement's markers."""

    index: int
    name: str | None = None


@dataclass(frozen=True, slots=True)
class ListLiteral:
    items: tuple[Term, ...]


@dataclass(frozen=True, slots=True)
class SetLiteral:
    items: tuple[Term, ...]


@dataclass(frozen=True, slots=True)
class MapLiteral:
    """`{k: v, ...}`; an empty `{}` parses as an empty map and also fits a set column."""

    items: tuple[tuple[Term, Term], ...]


@dataclass(frozen=True, slots=True)
class TupleLiteral:
    items: tuple[Term, ...]


@dataclass(frozen=True, slots=True)
class FunctionCall:
    """A call such as `now()` or `uuid()`; `name` is lowercased."""

    name: str
    args: tuple[Term, ...]


Term = Constant | BindMarker | ListLiteral | SetLiteral | MapLiteral | TupleLiteral | FunctionCall


@dataclass(frozen=True, slots=True)
class TableRef:
    """`[keyspace.]table`; `keyspace` None means the connection's current keyspace."""

    keyspace: str | None
    name: str


@dataclass(frozen=True, slots=True)
class InList:
    """The right side of `col IN (a, b, ...)`."""

    items: tuple[Term, ...]


@dataclass(frozen=True, slots=True)
class Relation:
    """One `WHERE` restriction: `column op value`; op is one of = < <= > >= IN.

    For `IN`, `value` is an `InList` or a single `BindMarker` bound to a list.
    """

    column: str
    op: str
    value: Term | InList


@dataclass(frozen=True, slots=True)
class Condition:
    """One `IF` condition of a lightweight transaction: `column op value`."""

    column: str
    op: str
    value: Term | InList


@dataclass(frozen=True, slots=True)
class Assignment:
    """One `SET` item.

    kind `set`: `column = value`; `add`: `column = column + value`;
    `prepend`: `column = value + column`; `remove`: `column = column - value`;
    `set_element`: `column[key] = value`.
    """

    column: str
    kind: Literal["set", "add", "prepend", "remove", "set_element"]
    value: Term
    key: Term | None = None


@dataclass(frozen=True, slots=True)
class Selector:
    """One item of a SELECT list.

    kind `column` names a column; `count` is COUNT(*) / COUNT(1);
    `writetime` and `ttl` are those functions over `column`.
    """

    kind: Literal["column", "count", "writetime", "ttl"]
    column: str | None
    alias: str | None = None


@dataclass(frozen=True, slots=True)
class Use:
    keyspace: str


@dataclass(frozen=True, slots=True)
class CreateKeyspace:
    name: str
    if_not_exists: bool
    replication: dict[str, str]
    durable_writes: bool = True


@dataclass(frozen=True, slots=True)
class DropKeyspace:
    name: str
    if_exists: bool


@dataclass(frozen=True, slots=True)
class CreateTable:
    """CREATE TABLE; `columns` keeps declaration order as (name, type text, static)."""

    table: TableRef
    if_not_exists: bool
    columns: tuple[tuple[str, str, bool], ...]
    partition_key: tuple[str, ...]
    clustering_key: tuple[str, ...]
    clustering_order: dict[str, str] = field(default_factory=dict)
    options: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class DropTable:
    table: TableRef
    if_exists: bool


@dataclass(frozen=True, slots=True)
class Truncate:
    table: TableRef


@dataclass(frozen=True, slots=True)
class Insert:
    table: TableRef
    columns: tuple[str, ...]
    values: tuple[Term, ...]
    if_not_exists: bool = False
    ttl: Term | None = None
    timestamp: Term | None = None


@dataclass(frozen=True, slots=True)
class Update:
    table: TableRef
    assignments: tuple[Assignment, ...]
    where: tuple[Relation, ...]
    if_exists: bool = False
    conditions: tuple[Condition, ...] = ()
    ttl: Term | None = None
    timestamp: Term | None = None


@dataclass(frozen=True, slots=True)
class Delete:
    """DELETE; `columns` empty means the whole row (or partition); items may carry a key."""

    table: TableRef
    columns: tuple[tuple[str, Term | None], ...]
    where: tuple[Relation, ...]
    if_exists: bool = False
    conditions: tuple[Condition, ...] = ()
    timestamp: Term | None = None


@dataclass(frozen=True, slots=True)
class Select:
    """SELECT; `selectors` empty means `*`."""

    table: TableRef
    selectors: tuple[Selector, ...]
    where: tuple[Relation, ...]
    order_by: tuple[tuple[str, str], ...] = ()
    limit: Term | None = None
    per_partition_limit: Term | None = None
    distinct: bool = False
    allow_filtering: bool = False
    json: bool = False


@dataclass(frozen=True, slots=True)
class Batch:
    """BEGIN [UNLOGGED|COUNTER] BATCH ... APPLY BATCH."""

    kind: Literal["logged", "unlogged", "counter"]
    statements: tuple[Insert | Update | Delete, ...]
    timestamp: Term | None = None


@dataclass(frozen=True, slots=True)
class CreateRole:
    """CREATE ROLE / CREATE USER; unset options are None."""

    name: str
    if_not_exists: bool
    password: str | None
    login: bool | None
    superuser: bool | None


@dataclass(frozen=True, slots=True)
class AlterRole:
    name: str
    password: str | None
    login: bool | None
    superuser: bool | None


@dataclass(frozen=True, slots=True)
class DropRole:
    name: str
    if_exists: bool


@dataclass(frozen=True, slots=True)
class Grant:
    """GRANT (revoke=False) or REVOKE (revoke=True).

    `permission` is lowercased (`select`, `modify`, `all`, ...); `resource`
    is ("all keyspaces",), ("keyspace", ks) or ("table", ks or None, table).
    """

    permission: str
    resource: tuple[str | None, ...]
    role: str
    revoke: bool


Statement = (
    Use
    | CreateKeyspace
    | DropKeyspace
    | CreateTable
    | DropTable
    | Truncate
    | Insert
    | Update
    | Delete
    | Select
    | Batch
    | CreateRole
    | AlterRole
    | DropRole
    | Grant
)
