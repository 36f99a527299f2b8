"""The `system` and `system_schema` tables drivers read when they connect.

They are ordinary tables of the emulator's `Schema` and `Storage` whose
rows are rewritten by `SystemTables.refresh` after every schema change, so
any query a driver or cqlsh sends (`SELECT * FROM system.local WHERE
key='local'`, `SELECT * FROM system_schema.columns WHERE keyspace_name =
'ks' AND table_name = 't'`, ...) is answered by the normal read path.

What they say: one node (`system.peers` and `system.peers_v2` are empty)
in `datacenter1`/`rack1`, Murmur3 partitioner, CQL 3.3.1, native protocol
4, and release version 3.0.8 -- what Scylla reports, so cassandra-driver
picks its Cassandra-3 schema parser (`system_schema`). The node owns a few
evenly spaced tokens, which is all a token map needs.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

from coalesce.emulator.ordering import column_sort_key
from coalesce.emulator.schema import KeyspaceDef, Schema, TableDef
from coalesce.emulator.storage import Storage, routing_key

__all__ = ["SYSTEM_KEYSPACES", "NodeInfo", "SystemTables"]

SYSTEM_KEYSPACES = frozenset(
    ["system", "system_schema", "system_auth", "system_distributed", "system_traces"]
)

_LOCAL_STRATEGY = {"class": "org.apache.cassandra.locator.LocalStrategy"}
_SIMPLE_1 = {"class": "org.apache.cassandra.locator.SimpleStrategy", "replication_factor": "1"}

# (keyspace, table, [(column, type)], partition key, clustering key)
_TABLES: list[tuple[str, str, list[tuple[str, str]], list[str], list[str]]] = [
    (
        "system",
        "local",
        [
            ("key", "text"),
            ("bootstrapped", "text"),
            ("broadcast_address", "inet"),
            ("cluster_name", "text"),
            ("cql_version", "text"),
            ("data_center", "text"),
            ("gossip_generation", "int"),
            ("host_id", "uuid"),
            ("listen_address", "inet"),
            ("native_protocol_version", "text"),
            ("partitioner", "text"),
            ("rack", "text"),
            ("release_version", "text"),
            ("rpc_address", "inet"),
            ("schema_version", "uuid"),
            ("supported_features", "text"),
            ("thrift_version", "text"),
            ("tokens", "set<text>"),
            ("truncated_at", "map<uuid, blob>"),
        ],
        ["key"],
        [],
    ),
    (
        "system",
        "peers",
        [
            ("peer", "inet"),
            ("data_center", "text"),
            ("host_id", "uuid"),
            ("preferred_ip", "inet"),
            ("rack", "text"),
            ("release_version", "text"),
            ("rpc_address", "inet"),
            ("schema_version", "uuid"),
            ("supported_features", "text"),
            ("tokens", "set<text>"),
        ],
        ["peer"],
        [],
    ),
    (
        "system",
        "peers_v2",
        [
            ("peer", "inet"),
            ("peer_port", "int"),
            ("data_center", "text"),
            ("host_id", "uuid"),
            ("native_address", "inet"),
            ("native_port", "int"),
            ("preferred_ip", "inet"),
            ("preferred_port", "int"),
            ("rack", "text"),
            ("release_version", "text"),
            ("schema_version", "uuid"),
            ("supported_features", "text"),
            ("tokens", "set<text>"),
        ],
        ["peer"],
        ["peer_port"],
    ),
    (
        "system_schema",
        "keyspaces",
        [
            ("keyspace_name", "text"),
            ("durable_writes", "boolean"),
            ("replication", "frozen<map<text, text>>"),
        ],
        ["keyspace_name"],
        [],
    ),
    (
        "system_schema",
        "tables",
        [
            ("keyspace_name", "text"),
            ("table_name", "text"),
            ("bloom_filter_fp_chance", "double"),
            ("caching", "frozen<map<text, text>>"),
            ("comment", "text"),
            ("compaction", "frozen<map<text, text>>"),
            ("compression", "frozen<map<text, text>>"),
            ("crc_check_chance", "double"),
            ("dclocal_read_repair_chance", "double"),
            ("default_time_to_live", "int"),
            ("extensions", "frozen<map<text, blob>>"),
            ("flags", "frozen<set<text>>"),
            ("gc_grace_seconds", "int"),
            ("id", "uuid"),
            ("max_index_interval", "int"),
            ("memtable_flush_period_in_ms", "int"),
            ("min_index_interval", "int"),
            ("read_repair_chance", "double"),
            ("speculative_retry", "text"),
        ],
        ["keyspace_name"],
        ["table_name"],
    ),
    (
        "system_schema",
        "columns",
        [
            ("keyspace_name", "text"),
            ("table_name", "text"),
            ("column_name", "text"),
            ("clustering_order", "text"),
            ("column_name_bytes", "blob"),
            ("kind", "text"),
            ("position", "int"),
            ("type", "text"),
        ],
        ["keyspace_name"],
        ["table_name", "column_name"],
    ),
    (
        "system_schema",
        "dropped_columns",
        [
            ("keyspace_name", "text"),
            ("table_name", "text"),
            ("column_name", "text"),
            ("dropped_time", "timestamp"),
            ("type", "text"),
        ],
        ["keyspace_name"],
        ["table_name", "column_name"],
    ),
    (
        "system_schema",
        "views",
        [
            ("keyspace_name", "text"),
            ("view_name", "text"),
            ("base_table_id", "uuid"),
            ("base_table_name", "text"),
            ("bloom_filter_fp_chance", "double"),
            ("caching", "frozen<map<text, text>>"),
            ("comment", "text"),
            ("compaction", "frozen<map<text, text>>"),
            ("compression", "frozen<map<text, text>>"),
            ("crc_check_chance", "double"),
            ("dclocal_read_repair_chance", "double"),
            ("default_time_to_live", "int"),
            ("extensions", "frozen<map<text, blob>>"),
            ("gc_grace_seconds", "int"),
            ("id", "uuid"),
            ("include_all_columns", "boolean"),
            ("max_index_interval", "int"),
            ("memtable_flush_period_in_ms", "int"),
            ("min_index_interval", "int"),
            ("read_repair_chance", "double"),
            ("speculative_retry", "text"),
            ("where_clause", "text"),
        ],
        ["keyspace_name"],
        ["view_name"],
    ),
    (
        "system_schema",
        "types",
        [
            ("keyspace_name", "text"),
            ("type_name", "text"),
            ("field_names", "frozen<list<text>>"),
            ("field_types", "frozen<list<text>>"),
        ],
        ["keyspace_name"],
        ["type_name"],
    ),
    (
        "system_schema",
        "functions",
        [
            ("keyspace_name", "text"),
            ("function_name", "text"),
            ("argument_types", "frozen<list<text>>"),
            ("argument_names", "frozen<list<text>>"),
            ("body", "text"),
            ("called_on_null_input", "boolean"),
            ("language", "text"),
            ("return_type", "text"),
        ],
        ["keyspace_name"],
        ["function_name", "argument_types"],
    ),
    (
        "system_schema",
        "aggregates",
        [
            ("keyspace_name", "text"),
            ("aggregate_name", "text"),
            ("argument_types", "frozen<list<text>>"),
            ("final_func", "text"),
            ("initcond", "text"),
            ("return_type", "text"),
            ("state_func", "text"),
            ("state_type", "text"),
        ],
        ["keyspace_name"],
        ["aggregate_name", "argument_types"],
    ),
    (
        "system_schema",
        "indexes",
        [
            ("keyspace_name", "text"),
            ("table_name", "text"),
            ("index_name", "text"),
            ("kind", "text"),
            ("options", "frozen<map<text, text>>"),
        ],
        ["keyspace_name"],
        ["table_name", "index_name"],
    ),
    (
        "system_schema",
        "triggers",
        [
            ("keyspace_name", "text"),
            ("table_name", "text"),
            ("trigger_name", "text"),
            ("options", "frozen<map<text, text>>"),
        ],
        ["keyspace_name"],
        ["table_name", "trigger_name"],
    ),
]

_TABLE_OPTIONS: dict[str, Any] = {
    "bloom_filter_fp_chance": 0.01,
    "caching": {"keys": "ALL", "rows_per_partition": "ALL"},
    "comment": "",
    "compaction": {
        "class": "SizeTieredCompactionStrategy",
        "max_threshold": "32",
        "min_threshold": "4",
    },
    "compression": {"sstable_compression": "org.apache.cassandra.io.compress.LZ4Compressor"},
    "crc_check_chance": 1.0,
    "dclocal_read_repair_chance": 0.0,
    "default_time_to_live": 0,
    "extensions": {},
    "flags": frozenset(["compound"]),
    "gc_grace_seconds": 864000,
    "max_index_interval": 2048,
    "memtable_flush_period_in_ms": 0,
    "min_index_interval": 128,
    "read_repair_chance": 0.0,
    "speculative_retry": "99.0PERCENTILE",
}


@dataclass(slots=True)
class NodeInfo:
    """Facts about the emulated node reported in `system.local`."""

    address: str = "127.0.0.1"
    cluster_name: str = "coalesce-emulator"
    data_center: str = "datacenter1"
    rack: str = "rack1"
    host_id: uuid.UUID = field(default_factory=uuid.uuid4)
    tokens: frozenset[str] = field(
        default_factory=lambda: frozenset(str(-(2**63) + i * (2**64 // 8)) for i in range(8))
    )


class SystemTables:
    """Owns the system keyspaces' definitions and keeps their rows current."""

    def __init__(self, schema: Schema, storage: Storage, node: NodeInfo) -> None:
        self._schema = schema
        self._storage = storage
        self.node = node
        for name in ("system", "system_schema"):
            schema.keyspaces[name] = KeyspaceDef(name, dict(_LOCAL_STRATEGY), True)
        for name in ("system_auth", "system_distributed", "system_traces"):
            schema.keyspaces[name] = KeyspaceDef(name, dict(_SIMPLE_1), True)
        for keyspace, table, columns, pk, ck in _TABLES:
            definition = TableDef.build(
                keyspace, table, [(n, t, False) for n, t in columns], pk, ck, {}
            )
            schema.keyspaces[keyspace].tables[table] = definition

    def refresh(self) -> None:
        """Rewrite every system table's rows from the current schema and node info."""
        self._fill_local()
        keyspaces: list[dict[str, Any]] = []
        tables: list[dict[str, Any]] = []
        columns: list[dict[str, Any]] = []
        for keyspace in self._schema.keyspaces.values():
            keyspaces.append(
                {
                    "keyspace_name": keyspace.name,
                    "durable_writes": keyspace.durable_writes,
                    "replication": dict(keyspace.replication),
                }
            )
            for table in keyspace.tables.values():
                tables.append(_table_row(table))
                columns.extend(_column_rows(table))
        self._replace("system_schema", "keyspaces", keyspaces)
        self._replace("system_schema", "tables", tables)
        self._replace("system_schema", "columns", columns)

    def _fill_local(self) -> None:
        node = self.node
        self._replace(
            "system",
            "local",
            [
                {
                    "key": "local",
                    "bootstrapped": "COMPLETED",
                    "broadcast_address": node.address,
                    "cluster_name": node.cluster_name,
                    "cql_version": "3.3.1",
                    "data_center": node.data_center,
                    "gossip_generation": 1,
                    "host_id": node.host_id,
                    "listen_address": node.address,
                    "native_protocol_version": "4",
                    "partitioner": "org.apache.cassandra.dht.Murmur3Partitioner",
                    "rack": node.rack,
                    "release_version": "3.0.8",
                    "rpc_address": node.address,
                    "schema_version": self._schema.version,
                    "supported_features": "",
                    "thrift_version": "20.1.0",
                    "tokens": node.tokens,
                }
            ],
        )

    def _replace(self, keyspace: str, name: str, rows: list[dict[str, Any]]) -> None:
        definition = self._schema.keyspaces[keyspace].tables[name]
        data = self._storage.table(definition)
        data.clear()
        for values in rows:
            pk = tuple(values[c.name] for c in definition.partition_key)
            ck = tuple(values[c.name] for c in definition.clustering_key)
            partition = data.partition_for_write(routing_key(definition.partition_key, pk), pk)
            sort_key = tuple(
                column_sort_key(c, v) for c, v in zip(definition.clustering_key, ck, strict=True)
            )
            raw = tuple(
                c.type.serialize(v) for c, v in zip(definition.clustering_key, ck, strict=True)
            )
            row = partition.upsert(ck, sort_key, raw)
            row.marker = True
            for column in definition.columns.values():
                if column.kind in ("regular", "static"):
                    value = values.get(column.name)
                    if value is not None:
                        row.cells.put(column, value)


def _table_row(table: TableDef) -> dict[str, Any]:
    row: dict[str, Any] = {
        "keyspace_name": table.keyspace,
        "table_name": table.name,
        "id": table.id,
    }
    row.update(_TABLE_OPTIONS)
    comment = table.options.get("comment")
    if comment is not None:
        row["comment"] = comment
    return row


def _column_rows(table: TableDef) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for column in table.columns.values():
        order = ("desc" if column.descending else "asc") if column.kind == "clustering" else "none"
        rows.append(
            {
                "keyspace_name": table.keyspace,
                "table_name": table.name,
                "column_name": column.name,
                "clustering_order": order,
                "column_name_bytes": column.name.encode(),
                "kind": column.kind,
                "position": column.position,
                "type": column.type.cql_name,
            }
        )
    return rows
