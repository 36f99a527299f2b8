"""What the sidecar says about the cluster, and the ring it routes with."""

from __future__ import annotations

import uuid

from cassandra.metadata import Murmur3Token

from coalesce.cql import (
    TYPE_BY_NAME,
    ColumnSpec,
    ResultRows,
    RowsMetadata,
    decode_result,
    parse_type,
)
from coalesce.sidecar.advertised import (
    Identity,
    advertised_tokens,
    host_id_for,
    peer_rows,
    rewrite_local,
)
from coalesce.sidecar.members import SidecarRing
from coalesce.sidecar.ring import Ring, token_of


def _spec(name: str, cql_type: str) -> ColumnSpec:
    return ColumnSpec("system", "local", name, parse_type(cql_type))


def _local_body(columns: list[tuple[str, str]], values: list[object]) -> bytes:
    specs = [_spec(n, t) for n, t in columns]
    cells = [s.type.serialize(v) if v is not None else None for s, v in zip(specs, values,
                                                                          strict=True)]
    return ResultRows(RowsMetadata(specs), [cells]).encode()


def _decoded(body: bytes) -> dict[str, object]:
    result = decode_result(body)
    assert isinstance(result, ResultRows)
    cols = result.metadata.columns
    return {c.name: (c.type.deserialize(v) if v is not None else None)
            for c, v in zip(cols, result.rows[0], strict=True)}


def test_rewrite_replaces_only_what_identifies_the_node() -> None:
    upstream_id = uuid.uuid4()
    schema = uuid.uuid4()
    body = _local_body(
        [("rpc_address", "inet"), ("host_id", "uuid"), ("data_center", "text"),
         ("tokens", "set<text>"), ("schema_version", "uuid"), ("preferred_ip", "inet")],
        ["10.0.0.5", upstream_id, "dc1", frozenset({"-5", "7"}), schema, None],
    )
    ring = Ring()
    ring.set_tokens("other-node", [100, 200])
    cluster: dict[str, tuple[str, bytes]] = {}
    row = _decoded(rewrite_local(body, Identity("127.0.0.2", 9999),
                                 lambda seen: advertised_tokens(ring, seen), (), cluster))
    assert row["rpc_address"] == "127.0.0.2"
    assert row["host_id"] == host_id_for("127.0.0.2", 9999)
    assert row["data_center"] == "dc1"  # not configured: Scylla's
    assert row["tokens"] == frozenset({"-5", "7", "100", "200"})
    assert row["schema_version"] == schema
    assert row["preferred_ip"] is None
    assert set(cluster) == {"rpc_address", "host_id", "data_center", "tokens", "schema_version"}
    assert cluster["schema_version"] == ("uuid", schema.bytes)  # Scylla's cells, kept


def test_rewrite_works_on_any_projection_and_on_configured_location() -> None:
    body = _local_body([("data_center", "text"), ("rack", "text")], ["dc1", "r1"])
    row = _decoded(rewrite_local(body, Identity("127.0.0.1", 1, "dc9", "r9"),
                                 lambda seen: seen))
    assert row == {"data_center": "dc9", "rack": "r9"}


def test_peers_alone_are_empty_with_the_metadata() -> None:
    body = _local_body([("peer", "inet")], ["10.0.0.9"])
    result = decode_result(peer_rows(body, (), Identity("127.0.0.1", 1)))
    assert isinstance(result, ResultRows)
    assert result.rows == []
    assert [c.name for c in result.metadata.columns] == ["peer"]


def test_peers_are_the_other_members_with_scylla_s_other_columns() -> None:
    ring = SidecarRing("127.0.0.1:9001", ["127.0.0.1:9001", "127.0.0.2:9002", "[::1]:9003"],
                       vnodes=8)
    schema = uuid.uuid4()
    cluster = {"schema_version": ("uuid", schema.bytes), "data_center": ("text", b"dc1"),
               "rack": ("text", b"r1"), "release_version": ("int", b"\x00\x00\x00\x01")}
    body = _local_body([("peer", "inet"), ("peer_port", "int"), ("host_id", "uuid"),
                        ("tokens", "set<text>"), ("schema_version", "uuid"),
                        ("data_center", "text"), ("rack", "text"), ("release_version", "text"),
                        ("supported_features", "text")],
                       ["10.9.9.9", 1, uuid.uuid4(), frozenset(), schema, "x", "y", "v", "f"])
    result = decode_result(peer_rows(body, ring.others, Identity("127.0.0.1", 9001, rack="r7"),
                                     (), cluster))
    assert isinstance(result, ResultRows)
    cols = result.metadata.columns
    rows = [{c.name: (c.type.deserialize(v) if v is not None else None)
             for c, v in zip(cols, row, strict=True)} for row in result.rows]
    assert [(r["peer"], r["peer_port"]) for r in rows] == [("127.0.0.2", 9002), ("::1", 9003)]
    for row, member in zip(rows, ring.others, strict=True):
        assert row["host_id"] == member.host_id
        assert row["tokens"] == frozenset(str(t) for t in member.tokens)
        assert len(row["tokens"]) == 8
        assert row["schema_version"] == schema
        assert row["data_center"] == "dc1"  # Scylla's
        assert row["rack"] == "r7"  # configured
        assert row["release_version"] is None  # a cell of another type is not copied
        assert row["supported_features"] is None


def test_host_ids_are_stable_per_address() -> None:
    assert host_id_for("127.0.0.1", 9042) == host_id_for("127.0.0.1", 9042)
    assert host_id_for("127.0.0.1", 9042) != host_id_for("127.0.0.1", 9043)


def test_ring_owner_is_the_next_token_clockwise() -> None:
    ring = Ring()
    assert ring.owner(5) is None
    ring.set_tokens("a", [-100, 100])
    ring.set_tokens("b", [0])
    assert ring.owner(-500) == "a"
    assert ring.owner(-100) == "a"
    assert ring.owner(-99) == "b"
    assert ring.owner(50) == "a"
    assert ring.owner(101) == "a"  # wraps around
    ring.set_tokens("a", [])
    assert ring.owner(50) == "b"
    assert advertised_tokens(ring) == frozenset({"0"})


def test_tokens_are_murmur3_as_the_driver_computes_them() -> None:
    key = b"\x00\x00\x00\x2a"
    assert token_of(key) == Murmur3Token.from_key(key).value
    assert "int" in TYPE_BY_NAME
