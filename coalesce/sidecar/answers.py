"""What happens to a forwarded request's answer before its client sees it.

Each function returns a `Post`: a callable that receives the upstream outcome (the
response frame, or the `UpstreamError` that took its place) and returns what the
client gets. They run on the event loop, in the connection callback that delivered
the answer, so their side effects (forgetting flights, learning a prepared statement)
happen before the client can send its next request.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import Any, Final

from coalesce.cql import (
    COMPRESSION,
    CUSTOM_PAYLOAD,
    TRACING,
    WARNING,
    ColumnSpec,
    Frame,
    Opcode,
    ResultKind,
    join_extras,
    peek_result_kind,
    split_extras,
)
from coalesce.cql.classify import StatementInfo
from coalesce.flight import SingleFlight
from coalesce.freshness import FreshnessIndex
from coalesce.sidecar.prepared import PreparedStatements
from coalesce.sidecar.topology import Identity, Ring, empty_rows, rewrite_local
from coalesce.sidecar.upstream import Outcome

__all__ = ["Post", "after_write", "describe_sidecar", "forget_everything", "learn_prepared"]

Post = Callable[[Outcome], Outcome]

_EXTRAS: Final = TRACING | WARNING | CUSTOM_PAYLOAD
_WRITES: Final = frozenset({"insert", "update", "delete"})


def after_write(
    freshness: FreshnessIndex,
    group: SingleFlight[Any],
    info: StatementInfo,
    keyspace: str | None,
    partition: bytes | None,
) -> Post:
    """Read-after-write: forget the reads a statement (done or failed) may have changed.

    An INSERT/UPDATE/DELETE forgets its partition's reads (all of its table's when the
    partition is unknown); anything else -- DDL, BATCH, GRANT, unknown statements --
    forgets every flight. A failed write may still have been applied, so failures
    count too.
    """
    if info.kind in _WRITES and info.table is not None:
        table: Hashable = (info.keyspace or keyspace, info.table)

        def written(outcome: Outcome) -> Outcome:
            freshness.written(table, partition)
            return outcome

        return written
    return forget_everything(group)


def forget_everything(group: SingleFlight[Any]) -> Post:
    """Every flight is forgotten when the answer arrives (BATCH, schema changes)."""

    def forget_all(outcome: Outcome) -> Outcome:
        group.forget_all()
        return outcome

    return forget_all


def learn_prepared(prepared: PreparedStatements, query: str, keyspace: str | None) -> Post:
    """Remember the statement a PREPARED result describes (other answers pass as is)."""

    def learn(outcome: Outcome) -> Outcome:
        if type(outcome) is Frame and outcome.opcode == Opcode.RESULT:
            result = outcome.body
            if outcome.flags & _EXTRAS:
                result = split_extras(outcome.flags, result, response=True)[1]
            if peek_result_kind(result) == ResultKind.PREPARED:
                prepared.learn(query, keyspace, result)
        return outcome

    return learn


def describe_sidecar(
    table: str, identity: Identity, ring: Ring, columns: Sequence[ColumnSpec] = ()
) -> Post:
    """Rows of ``system.local`` rewritten to describe the sidecar; peers emptied.

    Warnings and custom payloads of the answer are kept. Raises `CQLProtocolError` if
    the rows cannot be decoded (the caller turns that into an error for the client).
    """

    def rewrite(outcome: Outcome) -> Outcome:
        if type(outcome) is not Frame or outcome.opcode != Opcode.RESULT:
            return outcome
        extras, result = split_extras(outcome.flags, outcome.body, response=True)
        if table == "local":
            result = rewrite_local(result, identity, ring, columns)
        else:
            result = empty_rows(result)
        extra_flags, body = join_extras(extras, result, response=True)
        flags = (outcome.flags & ~(_EXTRAS | COMPRESSION)) | extra_flags
        return outcome._replace(flags=flags, body=body)

    return rewrite
