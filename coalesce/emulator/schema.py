"""Keyspace and table definitions, and the schema version that changes with them.

`Schema` is the catalogue: which keyspaces and tables exist, their columns
and keys. It holds no data (see `storage`). Every successful DDL change
gives the schema a new random `version`, which is what `system.local`
reports as `schema_version`, so drivers notice schema changes.

Not thread-safe: the emulator only touches it from its event loop.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Literal

from coalesce.cql.types import CqlType, parse_type
from coalesce.emulator.errors import AlreadyExists, ConfigurationError, InvalidRequest

__all__ = ["Column", "ColumnKind", "KeyspaceDef", "Schema", "TableDef"]

ColumnKind = Literal["partition_key", "clustering", "static", "regular"]

_SHORT_STRATEGIES = {
    "SimpleStrategy": "org.apache.cassandra.locator.SimpleStrategy",
    "NetworkTopologyStrategy": "org.apache.cassandra.locator.NetworkTopologyStrategy",
    "LocalStrategy": "org.apache.cassandra.locator.LocalStrategy",
    "EverywhereStrategy": "org.apache.cassandra.locator.EverywhereStrategy",
}


@dataclass(frozen=True, slots=True)
class Column:
    """One column: `position` is its index within the partition or clustering key (else -1)."""

    name: str
    type: CqlType
    kind: ColumnKind
    position: int = -1
    descending: bool = False


@dataclass(slots=True)
class TableDef:
    """A table's shape.

    `columns` is in `SELECT *` order: partition key, clustering key, then
    static and regular columns by name, as Cassandra orders them.
    """

    keyspace: str
    name: str
    columns: dict[str, Column]
    partition_key: tuple[Column, ...]
    clustering_key: tuple[Column, ...]
    id: uuid.UUID = field(default_factory=uuid.uuid4)
    options: dict[str, str] = field(default_factory=dict)

    @property
    def primary_key(self) -> tuple[Column, ...]:
        return self.partition_key + self.clustering_key

    @property
    def is_counter(self) -> bool:
        return any(c.type.cql_name == "counter" for c in self.columns.values())

    def column(self, name: str) -> Column:
        """The named column; raises `InvalidRequest` naming it if unknown."""
        column = self.columns.get(name)
        if column is None:
            raise InvalidRequest(f"Undefined name {name} in selection clause")
        return column

    @classmethod
    def build(
        cls,
        keyspace: str,
        name: str,
        columns: list[tuple[str, str, bool]],
        partition_key: list[str],
        clustering_key: list[str],
        clustering_order: dict[str, str],
        options: dict[str, str] | None = None,
    ) -> TableDef:
        """Validate a CREATE TABLE and build the definition; raises `InvalidRequest`."""
        types: dict[str, CqlType] = {}
        statics: set[str] = set()
        for column_name, type_text, static in columns:
            if column_name in types:
                raise InvalidRequest(f"Multiple definition of identifier {column_name}")
            try:
                types[column_name] = parse_type(type_text)
            except ValueError as exc:
                raise InvalidRequest(f"Unknown type {type_text}: {exc}") from None
            if static:
                statics.add(column_name)
        key_names = list(partition_key) + list(clustering_key)
        if len(set(key_names)) != len(key_names):
            raise InvalidRequest("duplicate column in PRIMARY KEY")
        for key_name in key_names:
            if key_name not in types:
                raise InvalidRequest(f"Unknown definition {key_name} referenced in PRIMARY KEY")
            key_type = types[key_name]
            if key_type.is_collection and not getattr(key_type, "frozen", False):
                raise InvalidRequest(
                    f"Invalid non-frozen collection type for PRIMARY KEY component {key_name}"
                )
            if key_type.cql_name == "counter":
                raise InvalidRequest(
                    f"counter type is not supported for PRIMARY KEY part {key_name}"
                )
        for order_name in clustering_order:
            if order_name not in clustering_key:
                raise InvalidRequest(
                    f"Missing CLUSTERING ORDER for column {order_name}"
                    if order_name in types
                    else f"Unknown definition {order_name} referenced in CLUSTERING ORDER"
                )
        ordered_keys = [c for c in clustering_key if c in clustering_order]
        if ordered_keys != list(clustering_key)[: len(ordered_keys)]:
            raise InvalidRequest(
                "The order of columns in the CLUSTERING ORDER directive must be the one of "
                "the clustering key"
            )
        if statics and not clustering_key:
            raise InvalidRequest(
                "Static columns are only useful (and thus allowed) if the table has at least "
                "one clustering column"
            )
        for static_name in statics:
            if static_name in key_names:
                raise InvalidRequest(
                    f"Static column {static_name} cannot be part of the PRIMARY KEY"
                )
        regular_names = [n for n in types if n not in key_names]
        counters = [n for n in regular_names if types[n].cql_name == "counter"]
        if counters and len(counters) != len(regular_names):
            raise ConfigurationError("Cannot mix counter and non counter columns in the same table")
        pk = tuple(Column(n, types[n], "partition_key", i) for i, n in enumerate(partition_key))
        ck = tuple(
            Column(n, types[n], "clustering", i, clustering_order.get(n, "ASC") == "DESC")
            for i, n in enumerate(clustering_key)
        )
        rest = [
            Column(n, types[n], "static" if n in statics else "regular")
            for n in sorted(regular_names, key=lambda n: (n not in statics, n))
        ]
        ordered = {c.name: c for c in (*pk, *ck, *rest)}
        return cls(keyspace, name, ordered, pk, ck, options=dict(options or {}))


@dataclass(slots=True)
class KeyspaceDef:
    """A keyspace; `replication` holds the full strategy class under `class`."""

    name: str
    replication: dict[str, str]
    durable_writes: bool = True
    tables: dict[str, TableDef] = field(default_factory=dict)


class Schema:
    """The catalogue of keyspaces and tables, with a version bumped by every change."""

    def __init__(self) -> None:
        self.keyspaces: dict[str, KeyspaceDef] = {}
        self.version = uuid.uuid4()

    def _bump(self) -> None:
        self.version = uuid.uuid4()

    def keyspace(self, name: str) -> KeyspaceDef:
        """The keyspace; raises `InvalidRequest` if it does not exist."""
        keyspace = self.keyspaces.get(name)
        if keyspace is None:
            raise InvalidRequest(f"Keyspace '{name}' does not exist")
        return keyspace

    def table(self, keyspace: str, name: str) -> TableDef:
        """The table; raises `InvalidRequest` ("unconfigured table ...") if unknown."""
        ks = self.keyspaces.get(keyspace)
        table = ks.tables.get(name) if ks is not None else None
        if table is None:
            if ks is None:
                raise InvalidRequest(f"Keyspace {keyspace} does not exist")
            raise InvalidRequest(f"unconfigured table {name}")
        return table

    def create_keyspace(
        self, name: str, replication: dict[str, str], durable_writes: bool, if_not_exists: bool
    ) -> bool:
        """Add a keyspace; False if it existed and `if_not_exists`; else `AlreadyExists`."""
        if name in self.keyspaces:
            if if_not_exists:
                return False
            raise AlreadyExists(name)
        replication = dict(replication)
        strategy = replication.get("class", "")
        replication["class"] = _SHORT_STRATEGIES.get(strategy, strategy)
        if (
            replication["class"].endswith("SimpleStrategy")
            and "replication_factor" not in replication
        ):
            raise ConfigurationError(
                "SimpleStrategy requires a replication_factor strategy option."
            )
        self.keyspaces[name] = KeyspaceDef(name, replication, durable_writes)
        self._bump()
        return True

    def drop_keyspace(self, name: str, if_exists: bool) -> bool:
        """Remove a keyspace and its tables; False if absent and `if_exists`."""
        if name not in self.keyspaces:
            if if_exists:
                return False
            raise ConfigurationError(f"Cannot drop non existing keyspace '{name}'.")
        del self.keyspaces[name]
        self._bump()
        return True

    def add_table(self, table: TableDef, if_not_exists: bool) -> bool:
        """Add a table; False if it existed and `if_not_exists`; else `AlreadyExists`."""
        ks = self.keyspace(table.keyspace)
        if table.name in ks.tables:
            if if_not_exists:
                return False
            raise AlreadyExists(table.keyspace, table.name)
        ks.tables[table.name] = table
        self._bump()
        return True

    def drop_table(self, keyspace: str, name: str, if_exists: bool) -> bool:
        """Remove a table; False if absent and `if_exists`."""
        ks = self.keyspace(keyspace)
        if name not in ks.tables:
            if if_exists:
                return False
            raise InvalidRequest(
                f"Cannot drop non existing table '{name}' in keyspace '{keyspace}'."
            )
        del ks.tables[name]
        self._bump()
        return True
