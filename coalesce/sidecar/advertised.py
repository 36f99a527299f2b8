"""What the sidecar tells drivers about the cluster.

Drivers discover nodes from ``system.local`` and ``system.peers``. To keep them talking
to the sidecar only, its answers describe the sidecar: ``system.local`` is Scylla's row
with the addresses, host id, tokens (and, when configured, data center and rack)
replaced by the sidecar's, and the peers tables come back empty. The schema version
stays Scylla's, so schema agreement checks still work.

Which tokens the sidecar advertises is decided in one place, `advertised_tokens`: one
sidecar owns the whole ring for now; a ring of sidecars would each return their share
there. A column is only replaced when it has the type the system table gives it, so a
projection that renames columns (``SELECT host_id AS tokens ...``) comes back as
Scylla sent it instead of failing.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final

from coalesce.cql import (
    ColumnSpec,
    CQLProtocolError,
    ResultRows,
    RowsMetadata,
    decode_result,
)
from coalesce.sidecar.ring import Ring

__all__ = [
    "CLUSTER_TABLES",
    "Identity",
    "advertised_tokens",
    "empty_rows",
    "host_id_for",
    "rewrite_local",
]

CLUSTER_TABLES: Final = frozenset({"local", "peers", "peers_v2"})
"""Tables of the ``system`` keyspace the sidecar answers about itself."""

_NAMESPACE: Final = uuid.UUID("6f1c3f3e-9a55-4c6e-9f1e-2b1d6c0a5e11")
_ADDRESS_COLUMNS: Final = ("rpc_address", "broadcast_address", "listen_address",
                           "native_address", "preferred_ip")
_PORT_COLUMNS: Final = ("rpc_port", "native_port")
_COLUMN_TYPES: Final = {
    **dict.fromkeys(_ADDRESS_COLUMNS, "inet"), **dict.fromkeys(_PORT_COLUMNS, "int"),
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


def rewrite_local(
    body: bytes,
    identity: Identity,
    ring: Ring,
    columns: Sequence[ColumnSpec] = (),
) -> bytes:
    """A ``system.local`` ROWS body describing the sidecar instead of the Scylla node.

    Only columns present in the result are touched, so any projection works. When the
    rows came without metadata (the client asked to skip it), `columns` must give the
    result's columns (from the prepared statement); without them the body is
    returned unchanged. Bodies that are not ROWS results are returned unchanged.
    Raises `CQLProtocolError` if the body is malformed.
    """
    result = decode_result(body)
    if not isinstance(result, ResultRows):
        return body
    specs = list(result.metadata.columns) or list(columns)
    if len(specs) != result.metadata.column_count:
        return body
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
            row[tokens_at] = _serialize(specs[tokens_at], advertised_tokens(ring, seen))
    return result.encode()


def empty_rows(body: bytes) -> bytes:
    """The same ROWS result with no rows (and no further pages): the peers tables.

    Bodies that are not ROWS results are returned unchanged.
    """
    result = decode_result(body)
    if not isinstance(result, ResultRows):
        return body
    meta = result.metadata
    return ResultRows(
        RowsMetadata(meta.columns, None, meta.no_metadata, meta.column_count), []
    ).encode()


def _serialize(spec: ColumnSpec, value: Any) -> bytes:
    try:
        return spec.type.serialize(value)
    except (TypeError, ValueError, OverflowError) as exc:
        raise CQLProtocolError(f"cannot rewrite column {spec.name}: {exc}") from None
