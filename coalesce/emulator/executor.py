"""Executing parsed statements against the in-memory schema and data.

`Executor` is the emulator's database engine without I/O or timing: it
parses (with a small cache), prepares, binds values, checks permissions,
and runs statements, returning an `Outcome` that carries the codec
`Result` to send plus what the latency model needs (which partitions were
read or written). Every method either returns or raises a
`CqlRequestError`; nothing is half-applied when it raises.

Concurrency: not thread-safe and never awaits. The emulator calls it from
its event loop, so each statement (and each BATCH) runs atomically with
respect to every other request.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from coalesce.cql.messages import UNSET
from coalesce.cql.results import (
    ColumnSpec,
    PreparedMetadata,
    Result,
    ResultPrepared,
    ResultRows,
    ResultSchemaChange,
    ResultSetKeyspace,
    ResultVoid,
    RowsMetadata,
)
from coalesce.cql.types import parse_type
from coalesce.emulator.auth import Roles, resource_name
from coalesce.emulator.errors import InvalidRequest, Unauthorized, Unprepared
from coalesce.emulator.markers import BoundShape, bind_markers
from coalesce.emulator.parser import parse
from coalesce.emulator.read_cache import ReadCache, is_deterministic
from coalesce.emulator.reads import result_columns, run_select
from coalesce.emulator.schema import Schema, TableDef
from coalesce.emulator.statements import (
    AlterRole,
    Batch,
    CreateKeyspace,
    CreateRole,
    CreateTable,
    Delete,
    DropKeyspace,
    DropRole,
    DropTable,
    Grant,
    Insert,
    Select,
    Statement,
    TableRef,
    Truncate,
    Update,
    Use,
)
from coalesce.emulator.storage import Storage, TableData
from coalesce.emulator.system_tables import SYSTEM_KEYSPACES, SystemTables
from coalesce.emulator.values import decode_bound, resolve
from coalesce.emulator.writes import ConditionResult, PlannedWrite, plan_write

__all__ = [
    "BatchChild",
    "ExecutionOptions",
    "Executor",
    "Outcome",
    "PreparedStatement",
    "Session",
    "StatementKind",
]

StatementKind = Literal["select", "insert", "update", "delete", "batch", "ddl", "system", "other"]
_PARSE_CACHE_SIZE = 4096
_BIGINT = parse_type("bigint")
_Values = Sequence[object]


@dataclass(slots=True)
class Session:
    """Per-connection state: current keyspace and (with auth on) the logged-in role."""

    keyspace: str | None = None
    role: str | None = None


@dataclass(slots=True)
class ExecutionOptions:
    """The query parameters that affect execution rather than binding."""

    page_size: int | None = None
    paging_state: bytes | None = None
    skip_metadata: bool = False
    timestamp: int | None = None


@dataclass(slots=True)
class PreparedStatement:
    """A prepared statement: its id, parsed form and bind-marker shape.

    `keyspace` is the session keyspace at PREPARE time; unqualified table
    names resolve against it whatever the executing connection's keyspace.
    """

    id: bytes
    query: str
    statement: Statement
    keyspace: str | None
    shape: BoundShape
    result_columns: list[ColumnSpec]


@dataclass(slots=True)
class BatchChild:
    """One statement of a protocol BATCH, ready to bind (`shape` known if prepared)."""

    statement: Statement
    keyspace: str | None
    values: _Values
    shape: BoundShape | None = None


@dataclass(slots=True)
class Outcome:
    """What executing one request produced.

    `reads` pairs each partition token read with the rows read there;
    `writes` lists the tokens of partitions written; `scan` marks reads not
    confined to known partitions. `schema_change` is set after DDL so the
    server can push an EVENT to registered connections.
    """

    result: Result
    kind: StatementKind
    reads: list[tuple[int, int]] = field(default_factory=list)
    writes: list[int] = field(default_factory=list)
    scan: bool = False
    schema_change: ResultSchemaChange | None = None
    body: bytes | None = None

    def encoded(self) -> bytes:
        """The RESULT body (encoded once, then reused: outcomes may be cached)."""
        if self.body is None:
            self.body = self.result.encode()
        return self.body


def prepared_id(query: str, keyspace: str | None) -> bytes:
    """MD5 of keyspace + query text, as Cassandra computes prepared ids."""
    return hashlib.md5((keyspace or "").encode() + query.encode(), usedforsecurity=False).digest()


class Executor:
    """The in-memory engine; see the module docstring."""

    def __init__(
        self, schema: Schema, storage: Storage, system: SystemTables, roles: Roles | None
    ) -> None:
        self.schema = schema
        self.storage = storage
        self.system = system
        self.roles = roles
        self._parsed: dict[str, Statement] = {}
        self._prepared: dict[bytes, PreparedStatement] = {}
        self._reads: ReadCache[Outcome] = ReadCache()
        system.refresh()

    # ------------------------------------------------------------ parsing

    def parse(self, query: str) -> Statement:
        """Parse with a bounded cache (drivers send the same texts over and over)."""
        statement = self._parsed.get(query)
        if statement is None:
            statement = parse(query)
            if len(self._parsed) >= _PARSE_CACHE_SIZE:
                self._parsed.clear()
            self._parsed[query] = statement
        return statement

    def _table(self, ref: TableRef, keyspace: str | None) -> TableDef:
        return self.schema.table(_keyspace_of(ref.keyspace, keyspace), ref.name)

    def _resolver(self, keyspace: str | None) -> Callable[[TableRef], TableDef]:
        return lambda ref: self._table(ref, keyspace)

    # ---------------------------------------------------------- preparing

    def prepare(self, query: str, session: Session) -> PreparedStatement:
        """Prepare `query` and remember it under its id (re-preparing is idempotent)."""
        statement = self.parse(query)
        keyspace = session.keyspace
        shape = bind_markers(statement, self._resolver(keyspace))
        columns: list[ColumnSpec] = []
        if isinstance(statement, Select):
            columns = result_columns(statement, self._table(statement.table, keyspace))
        prepared = PreparedStatement(
            prepared_id(query, keyspace), query, statement, keyspace, shape, columns
        )
        self._prepared[prepared.id] = prepared
        return prepared

    def prepared_result(self, prepared: PreparedStatement) -> ResultPrepared:
        return ResultPrepared(
            prepared.id,
            PreparedMetadata(list(prepared.shape.specs), list(prepared.shape.pk_indexes)),
            RowsMetadata(list(prepared.result_columns)),
        )

    def lookup(self, query_id: bytes) -> PreparedStatement:
        """The prepared statement with this id; raises `Unprepared` if unknown."""
        prepared = self._prepared.get(query_id)
        if prepared is None:
            raise Unprepared(query_id)
        return prepared

    def forget_prepared(self) -> None:
        """Forget every prepared statement (the next EXECUTE of any gets UNPREPARED)."""
        self._prepared.clear()

    # ---------------------------------------------------------- executing

    def execute_query(
        self,
        query: str,
        values: _Values | None,
        names: list[str] | None,
        session: Session,
        options: ExecutionOptions,
    ) -> Outcome:
        """Run a QUERY message's statement with its (raw) bound values."""
        statement = self.parse(query)
        keyspace = session.keyspace
        memo = self._memo(statement, keyspace, session, ("q", query), values, names, options)
        if memo is not None and memo[2] is not None:
            return memo[2]
        bound: list[Any] = []
        if values:
            shape = bind_markers(statement, self._resolver(keyspace))
            bound = _decode_values(shape, values, names)
        outcome = self._run(statement, bound, keyspace, session, options)
        if memo is not None:
            self._reads.put(memo[0], memo[1], memo[3], outcome)
        return outcome

    def execute_prepared(
        self,
        prepared: PreparedStatement,
        values: _Values | None,
        names: list[str] | None,
        session: Session,
        options: ExecutionOptions,
    ) -> Outcome:
        """Run a prepared statement with its (raw) bound values."""
        keyspace = prepared.keyspace or session.keyspace
        memo = self._memo(
            prepared.statement, keyspace, session, ("p", prepared.id), values, names, options
        )
        if memo is not None and memo[2] is not None:
            return memo[2]
        bound = _decode_values(prepared.shape, values or [], names)
        if len(bound) != len(prepared.shape.specs):
            raise InvalidRequest(
                f"There were {len(prepared.shape.specs)} markers(?) in CQL but {len(bound)} bound "
                "variables"
            )
        outcome = self._run(prepared.statement, bound, keyspace, session, options)
        if (
            isinstance(outcome.result, ResultRows)
            and options.skip_metadata
            and prepared.result_columns
        ):
            metadata = outcome.result.metadata
            outcome.result.metadata = RowsMetadata(
                [], metadata.paging_state, True, metadata.column_count
            )
        if memo is not None:
            self._reads.put(memo[0], memo[1], memo[3], outcome)
        return outcome

    def _memo(
        self,
        statement: Statement,
        keyspace: str | None,
        session: Session,
        identity: tuple[str, str | bytes],
        values: _Values | None,
        names: list[str] | None,
        options: ExecutionOptions,
    ) -> tuple[Hashable, TableData, Outcome | None, int] | None:
        """For a cacheable SELECT: (key, table data, cached outcome or None, data version).

        Permissions are checked here, so a cached answer is never handed to a
        role that may not read it. None for anything that is not cacheable.
        """
        if not isinstance(statement, Select) or not is_deterministic(statement):
            return None
        table = self._table(statement.table, keyspace)
        if table.keyspace not in SYSTEM_KEYSPACES:
            self._authorize(session, "select", table.keyspace, table.name)
        data = self.storage.table(table)
        key = (
            identity,
            keyspace,
            tuple(values) if values else (),
            tuple(names) if names else None,
            options.page_size,
            options.paging_state,
            options.skip_metadata,
        )
        return key, data, self._reads.get(key, data), data.version

    def batch_child(
        self, query_or_id: str | bytes, values: _Values, session: Session
    ) -> BatchChild:
        """One statement of a protocol BATCH: a query text, or a prepared id.

        Raises `Unprepared` for an unknown id and `CqlSyntaxError` for bad text.
        """
        if isinstance(query_or_id, bytes):
            prepared = self.lookup(query_or_id)
            return BatchChild(
                prepared.statement, prepared.keyspace or session.keyspace, values, prepared.shape
            )
        return BatchChild(self.parse(query_or_id), session.keyspace, values, None)

    def execute_batch(
        self,
        children: list[BatchChild],
        batch_type: int,
        session: Session,
        options: ExecutionOptions,
    ) -> Outcome:
        """Run a protocol BATCH; every child is validated before any is applied."""
        planned: list[PlannedWrite] = []
        timestamp = options.timestamp or _now_micros()
        for child in children:
            statement, keyspace = child.statement, child.keyspace
            if not isinstance(statement, Insert | Update | Delete):
                raise InvalidRequest(
                    "Invalid statement in batch: only UPDATE, INSERT and DELETE statements are "
                    "allowed."
                )
            shape = child.shape or bind_markers(statement, self._resolver(keyspace))
            bound = _decode_values(shape, child.values, None)
            planned.append(self._plan(statement, bound, keyspace, session, timestamp))
        kind = {0: "logged", 1: "unlogged", 2: "counter"}.get(batch_type, "logged")
        return self._apply_batch(planned, kind)

    # ------------------------------------------------------------ dispatch

    def _run(
        self,
        statement: Statement,
        bound: Sequence[Any],
        keyspace: str | None,
        session: Session,
        options: ExecutionOptions,
    ) -> Outcome:
        if isinstance(statement, Select):
            return self._select(statement, bound, keyspace, session, options)
        if isinstance(statement, Insert | Update | Delete):
            timestamp = options.timestamp or _now_micros()
            write = self._plan(statement, bound, keyspace, session, timestamp)
            kind: StatementKind = (
                "insert"
                if isinstance(statement, Insert)
                else "update"
                if isinstance(statement, Update)
                else "delete"
            )
            return self._apply_single(write, kind)
        if isinstance(statement, Batch):
            timestamp = options.timestamp or _now_micros()
            if statement.timestamp is not None:
                value = resolve(statement.timestamp, _BIGINT, bound)
                if isinstance(value, int):
                    timestamp = value
            planned = [
                self._plan(child, bound, keyspace, session, timestamp)
                for child in statement.statements
            ]
            return self._apply_batch(planned, statement.kind)
        if bound:
            raise InvalidRequest("Bind variables are not allowed in this statement")
        if isinstance(statement, Use):
            self.schema.keyspace(statement.keyspace)
            session.keyspace = statement.keyspace
            return Outcome(ResultSetKeyspace(statement.keyspace), "other")
        if isinstance(statement, CreateRole | AlterRole | DropRole | Grant):
            return self._role_statement(statement, session)
        return self._ddl(statement, keyspace, session)

    def _authorize(
        self, session: Session, permission: str, keyspace: str | None, table: str | None = None
    ) -> None:
        if self.roles is not None and session.role is not None:
            self.roles.authorize(session.role, permission, keyspace, table)

    def _select(
        self,
        statement: Select,
        bound: Sequence[Any],
        keyspace: str | None,
        session: Session,
        options: ExecutionOptions,
    ) -> Outcome:
        table = self._table(statement.table, keyspace)
        system = table.keyspace in SYSTEM_KEYSPACES
        if not system:
            self._authorize(session, "select", table.keyspace, table.name)
        if statement.json:
            raise InvalidRequest("SELECT JSON is not supported by the coalesce emulator")
        data = self.storage.table(table)
        read = run_select(
            statement, data, bound, page_size=options.page_size, paging_state=options.paging_state
        )
        metadata = RowsMetadata(read.columns, read.paging_state)
        return Outcome(
            ResultRows(metadata, read.rows),
            "system" if system else "select",
            reads=[] if system else read.touched,
            scan=read.scan and not system,
        )

    def _plan(
        self,
        statement: Insert | Update | Delete,
        bound: Sequence[Any],
        keyspace: str | None,
        session: Session,
        timestamp: int,
    ) -> PlannedWrite:
        table = self._table(statement.table, keyspace)
        if table.keyspace in SYSTEM_KEYSPACES:
            raise Unauthorized(f"{table.keyspace} keyspace is not user-modifiable.")
        self._authorize(session, "modify", table.keyspace, table.name)
        return plan_write(statement, self.storage.table(table), bound, timestamp)

    def _apply_single(self, planned: PlannedWrite, kind: StatementKind) -> Outcome:
        tokens = list(planned.tokens)
        if planned.check is None:
            planned.apply()
            planned.data.changed()
            return Outcome(ResultVoid(), kind, writes=tokens)
        condition = planned.check()
        if condition.applied:
            planned.apply()
            planned.data.changed()
        return Outcome(self._condition_rows(condition, planned), kind, writes=tokens)

    def _apply_batch(self, planned: list[PlannedWrite], kind: str) -> Outcome:
        for write in planned:
            is_counter = write.data.definition.is_counter
            if kind == "counter" and not is_counter:
                raise InvalidRequest("Cannot include non-counter statement in a counter batch")
            if kind != "counter" and is_counter:
                raise InvalidRequest(
                    "Cannot include a counter statement in a logged batch"
                    if kind == "logged"
                    else "Counter and non-counter mutations cannot exist in the same batch"
                )
        checks = [(w, w.check) for w in planned if w.check is not None]
        tokens = [t for w in planned for t in w.tokens]
        if checks:
            keys = {
                (w.data.definition.keyspace, w.data.definition.name, t)
                for w in planned
                for t in w.tokens
            }
            if len({k[2] for k in keys}) > 1:
                raise InvalidRequest("Batch with conditions cannot span multiple partitions")
            for write, check in checks:
                condition = check()
                if not condition.applied:
                    return Outcome(self._condition_rows(condition, write), "batch", writes=tokens)
        for write in planned:
            write.apply()
            write.data.changed()
        if checks:
            first = checks[0][0]
            return Outcome(
                self._condition_rows(ConditionResult(True), first), "batch", writes=tokens
            )
        return Outcome(ResultVoid(), "batch", writes=tokens)

    @staticmethod
    def _condition_rows(condition: ConditionResult, planned: PlannedWrite) -> ResultRows:
        columns, row = condition.as_row(planned.data.definition)
        return ResultRows(RowsMetadata(columns), [row])

    # ----------------------------------------------------------------- DDL

    def _ddl(self, statement: Statement, keyspace: str | None, session: Session) -> Outcome:
        change: ResultSchemaChange | None = None
        if isinstance(statement, CreateKeyspace):
            self._authorize(session, "create", None)
            if self.schema.create_keyspace(
                statement.name,
                statement.replication,
                statement.durable_writes,
                statement.if_not_exists,
            ):
                change = ResultSchemaChange("CREATED", "KEYSPACE", statement.name)
        elif isinstance(statement, DropKeyspace):
            if statement.name in SYSTEM_KEYSPACES:
                raise Unauthorized(f"{statement.name} keyspace is not user-modifiable.")
            self._authorize(session, "drop", statement.name)
            if self.schema.drop_keyspace(statement.name, statement.if_exists):
                self.storage.drop_keyspace(statement.name)
                change = ResultSchemaChange("DROPPED", "KEYSPACE", statement.name)
        elif isinstance(statement, CreateTable):
            ks = _keyspace_of(statement.table.keyspace, keyspace)
            if ks in SYSTEM_KEYSPACES:
                raise Unauthorized(f"{ks} keyspace is not user-modifiable.")
            self.schema.keyspace(ks)
            self._authorize(session, "create", ks)
            definition = TableDef.build(
                ks,
                statement.table.name,
                list(statement.columns),
                list(statement.partition_key),
                list(statement.clustering_key),
                dict(statement.clustering_order),
                dict(statement.options),
            )
            if self.schema.add_table(definition, statement.if_not_exists):
                self.storage.table(definition)
                change = ResultSchemaChange("CREATED", "TABLE", ks, statement.table.name)
        elif isinstance(statement, DropTable):
            ks = _keyspace_of(statement.table.keyspace, keyspace)
            if ks in SYSTEM_KEYSPACES:
                raise Unauthorized(f"{ks} keyspace is not user-modifiable.")
            self._authorize(session, "drop", ks, statement.table.name)
            if self.schema.drop_table(ks, statement.table.name, statement.if_exists):
                self.storage.drop_table(ks, statement.table.name)
                change = ResultSchemaChange("DROPPED", "TABLE", ks, statement.table.name)
        elif isinstance(statement, Truncate):
            table = self._table(statement.table, keyspace)
            if table.keyspace in SYSTEM_KEYSPACES:
                raise Unauthorized(f"{table.keyspace} keyspace is not user-modifiable.")
            self._authorize(session, "modify", table.keyspace, table.name)
            self.storage.table(table).clear()
            return Outcome(ResultVoid(), "ddl")
        else:  # pragma: no cover - the parser produces nothing else
            raise InvalidRequest(f"unsupported statement {type(statement).__name__}")
        if change is None:
            return Outcome(ResultVoid(), "ddl")
        self.system.refresh()
        return Outcome(change, "ddl", schema_change=change)

    def _role_statement(
        self, statement: CreateRole | AlterRole | DropRole | Grant, session: Session
    ) -> Outcome:
        roles = self.roles
        if roles is None:
            raise InvalidRequest(
                "Role management is only available when the emulator runs with auth enabled"
            )
        role = session.role
        if role is not None and not roles.is_superuser(role):
            if isinstance(statement, Grant):
                resource = statement.resource
                ks = resource[1] if len(resource) > 1 else None
                table = resource[2] if len(resource) > 2 else None
                roles.authorize(role, "authorize", ks, table)
            else:
                raise Unauthorized("Only superusers are allowed to perform CREATE/ALTER/DROP ROLE")
        if isinstance(statement, CreateRole):
            roles.create(
                statement.name,
                password=statement.password,
                login=statement.login,
                superuser=statement.superuser,
                if_not_exists=statement.if_not_exists,
            )
        elif isinstance(statement, AlterRole):
            roles.alter(
                statement.name,
                password=statement.password,
                login=statement.login,
                superuser=statement.superuser,
            )
        elif isinstance(statement, DropRole):
            roles.drop(statement.name, statement.if_exists)
        else:
            resource = statement.resource
            if resource[0] == "table" and resource[1] is None:
                resource = ("table", _keyspace_of(None, session.keyspace), resource[2])
            if resource[0] == "keyspace":
                assert resource[1] is not None
                self.schema.keyspace(resource[1])
            elif resource[0] == "table":
                assert resource[1] is not None and resource[2] is not None
                self.schema.table(resource[1], resource[2])
            name = resource_name(resource)
            if statement.revoke:
                roles.revoke(statement.role, statement.permission, name)
            else:
                roles.grant(statement.role, statement.permission, name)
        return Outcome(ResultVoid(), "other")


def _decode_values(shape: BoundShape, values: _Values, names: list[str] | None) -> list[Any]:
    specs = shape.specs
    if len(values) != len(specs):
        raise InvalidRequest(
            f"There were {len(specs)} markers(?) in CQL but {len(values)} bound variables"
        )
    ordered: list[Any] = list(values)
    if names is not None:
        ordered = [UNSET] * len(specs)
        taken: set[int] = set()
        for name, value in zip(names, values, strict=True):
            for i, spec in enumerate(specs):
                if i not in taken and spec.name == name:
                    ordered[i] = value
                    taken.add(i)
                    break
            else:
                raise InvalidRequest(f"Invalid named bind variable: {name}")
    out: list[Any] = []
    for spec, raw in zip(specs, ordered, strict=True):
        if raw is None or raw is UNSET:
            out.append(raw)
        else:
            assert isinstance(raw, bytes)
            out.append(decode_bound(raw, spec.type))
    return out


def _now_micros() -> int:
    return time.time_ns() // 1000


def _keyspace_of(explicit: str | None, current: str | None) -> str:
    """The keyspace a name lives in: its own, else the session's, else an error."""
    name = explicit or current
    if name is None:
        raise InvalidRequest(
            "No keyspace has been specified. USE a keyspace, or explicitly specify "
            "keyspace.tablename"
        )
    return name
