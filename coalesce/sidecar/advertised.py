"""What the sidecar tells drivers about the cluster.

Drivers discover nodes from ``system.local`` and ``system.peers``. To keep them talking
to sidecars only, the answers describe sidecars: ``system.local`` is Scylla's row with
the addresses, host id, tokens (and, when configured, data center and rack) replaced by
this sidecar's, and the peers tables list the other members of the sidecar ring (none
without a ring), one row each with its address, host id and tokens, and every other
column (data center, rack, schema and release version...) as Scylla's own
``system.local`` last said. The schema version stays Scylla's, so schema agreement
checks still work.

A lone sidecar advertises every token of the upstream ring (`advertised_tokens`), so it
owns everything; a member of a ring advertises its own ring positions. A column is only
replaced when it has the type the system table gives it, so a projection that renames
columns (``SELECT host_id AS tokens ...``) comes back as Scylla sent it instead of
failing. Nor are the cells of such a query recorded for the peers rows that every
client sees (``cluster_name AS data_center`` would move the other members into another
data center for every driver). The peers tables' rows are every other member whatever
the query's WHERE clause says (drivers read the whole table).
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Iterable, MutableMapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from coalesce.cql import (
    ColumnSpec,
    CQLProtocolError,
    ResultRows,
    RowsMetadata,
    decode_result,
)
from coalesce.sidecar.ring import Ring

if TYPE_CHECKING:
    from coalesce.sidecar.members import Member

__all__ = [
    "CLUSTER_TABLES",
    "Identity",
    "advertised_tokens",
    "host_id_for",
    "peer_rows",
    "renames_columns",
    "rewrite_local",
]

Cells = MutableMapping[str, tuple[str, bytes]]
"""Column name to (CQL type, serialized cell) of Scylla's latest ``system.local`` row."""
Tokens = Callable[[frozenset[str]], frozenset[str]]
"""The tokens to advertise, given those of the row being rewritten."""

CLUSTER_TABLES: Final = frozenset({"local", "peers", "peers_v2"})
"""Tables of the ``system`` keyspace the sidecar answers about itself."""

_ALIAS: Final = re.compile(r"\bas\b", re.IGNORECASE)
_NAMESPACE: Final = uuid.UUID("6f1c3f3e-9a55-4c6e-9f1e-2b1d6c0a5e11")
_ADDRESS_COLUMNS: Final = ("rpc_address", "broadcast_address", "listen_address",
                           "native_address", "preferred_ip")
_PORT_COLUMNS: Final = ("rpc_port", "native_port")
_PEER_ADDRESS_COLUMNS: Final = ("peer", "rpc_address", "native_address", "preferred_ip")
_PEER_PORT_COLUMNS: Final = ("peer_port", "native_port", "preferred_port")
_COLUMN_TYPES: Final = {
    **dict.fromkeys(_ADDRESS_COLUMNS + _PEER_ADDRESS_COLUMNS, "inet"),
    **dict.fromkeys(_PORT_COLUMNS + _PEER_PORT_COLUMNS, "int"),
    "host_id": "uuid", "data_center": "text", "rack": "text", "tokens": "set<text>",
}


def host_id_for(address: str, port: int) -> uuid.UUID:
    """The sidecar's host id: stable for one advertised address and port."""
    return uuid.uuid5(_NAMESPACE, f"coalesce-sidecar/{address}:{port}")


@dataclass(frozen=True, slots=True)
class Identity:
    """The node the sidecar presents itself as.

    None for `data_center` or `rack` keeps the upstream node's value.
    """

    address: str
    port: int
    data_center: str | None = None
    rack: str | None = None

    @property
    def host_id(self) -> uuid.UUID:
        return host_id_for(self.address, self.port)


def advertised_tokens(ring: Ring, seen: Iterable[str] = ()) -> frozenset[str]:
    """The tokens the sidecar claims in its ``system.local`` row.

    One sidecar owns the whole ring: every token of the upstream ring, plus `seen`
    (the tokens of the node whose row is being rewritten, in case the ring has not
    been learned yet). A ring of sidecars would return only this sidecar's share.
    """
    return frozenset(str(t) for t in ring.tokens()) | frozenset(seen)


def renames_columns(query: str) -> bool:
    """Whether a query may put a column under another one's name (``x AS y``): its cells
    are then not what their names say. Any word ``as`` counts, even in a string or a
    cast: a query wrongly suspected only goes unrecorded."""
    return _ALIAS.search(query) is not None


def rewrite_local(
    body: bytes,
    identity: Identity,
    tokens: Tokens,
    columns: Sequence[ColumnSpec] = (),
    cluster: Cells | None = None,
) -> bytes:
    """A ``system.local`` ROWS body describing the sidecar instead of the Scylla node.

    Only columns present in the result are touched, so any projection works. When the
    rows came without metadata (the client asked to skip it), `columns` must give the
    result's columns (from the prepared statement); without them the body is
    returned unchanged. `tokens` says which tokens to advertise; Scylla's cells are
    recorded in `cluster` first (for `peer_rows`). Bodies that are not ROWS results are
    returned unchanged. Raises `CQLProtocolError` if the body is malformed.
    """
    result = decode_result(body)
    if not isinstance(result, ResultRows):
        return body
    specs = list(result.metadata.columns) or list(columns)
    if len(specs) != result.metadata.column_count:
        return body
    if cluster is not None and result.rows:
        for spec, cell in zip(specs, result.rows[0], strict=True):
            if cell is not None:
                cluster[spec.name] = (spec.type.cql_name, cell)
    replacements: dict[str, Any] = {"host_id": identity.host_id}
    for name in _ADDRESS_COLUMNS:
        replacements[name] = identity.address
    for name in _PORT_COLUMNS:
        replacements[name] = identity.port
    if identity.data_center is not None:
        replacements["data_center"] = identity.data_center
    if identity.rack is not None:
        replacements["rack"] = identity.rack
    # Only columns of the system table's own type: an alias may put any column
    # under any of these names, and such a cell is passed through as Scylla sent it.
    plan = [
        (i, replacements[spec.name]) for i, spec in enumerate(specs)
        if spec.name in replacements and spec.type.cql_name == _COLUMN_TYPES[spec.name]
    ]
    tokens_at = next(
        (i for i, spec in enumerate(specs)
         if spec.name == "tokens" and spec.type.cql_name == _COLUMN_TYPES["tokens"]),
        None,
    )
    for row in result.rows:
        for i, value in plan:
            if row[i] is not None:
                row[i] = _serialize(specs[i], value)
        if tokens_at is not None:
            seen: frozenset[str] = frozenset()
            cell = row[tokens_at]
            if cell is not None:
                seen = frozenset(str(t) for t in specs[tokens_at].type.deserialize(cell))
            row[tokens_at] = _serialize(specs[tokens_at], tokens(seen))
    return result.encode()


def peer_rows(
    body: bytes,
    members: Iterable[Member],
    identity: Identity,
    columns: Sequence[ColumnSpec] = (),
    cluster: Cells | None = None,
) -> bytes:
    """A ``system.peers`` or ``system.peers_v2`` ROWS body: one row per member.

    Each row has the member's address, port, host id and tokens; data center and rack
    are `identity`'s when configured; every other column is what `cluster` holds for
    it (Scylla's own ``system.local``), else null. Bodies that are not ROWS results
    are returned unchanged. `columns` as for `rewrite_local`.
    """
    result = decode_result(body)
    if not isinstance(result, ResultRows):
        return body
    meta = result.metadata
    specs = list(meta.columns) or list(columns)
    if len(specs) != meta.column_count:
        return body
    known = cluster or {}
    rows: list[list[bytes | None]] = []
    for member in members:
        values: dict[str, Any] = {"host_id": member.host_id,
                                  "tokens": frozenset(str(t) for t in member.tokens)}
        for name in _PEER_ADDRESS_COLUMNS:
            values[name] = member.host
        for name in _PEER_PORT_COLUMNS:
            values[name] = member.port
        if identity.data_center is not None:
            values["data_center"] = identity.data_center
        if identity.rack is not None:
            values["rack"] = identity.rack
        row: list[bytes | None] = []
        for spec in specs:
            name, cql_type = spec.name, spec.type.cql_name
            if name in values and cql_type == _COLUMN_TYPES.get(name):
                row.append(_serialize(spec, values[name]))
            elif name in known and known[name][0] == cql_type:
                row.append(known[name][1])
            else:
                row.append(None)
        rows.append(row)
    return ResultRows(RowsMetadata(meta.columns, None, meta.no_metadata, meta.column_count),
                      rows).encode()


def _serialize(spec: ColumnSpec, value: Any) -> bytes:
    try:
        return spec.type.serialize(value)
    except (TypeError, ValueError, OverflowError) as exc:
        raise CQLProtocolError(f"cannot rewrite column {spec.name}: {exc}") from None
