"""The cassandra-driver side of `CoalescingSession`: keys, and futures without threads."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Hashable
from typing import Any

from cassandra.cluster import ResponseFuture, Session
from cassandra.query import (
    BatchStatement,
    BoundStatement,
    PreparedStatement,
    Statement,
    bind_params,
)

from coalesce.cql.classify import StatementInfo, classify
from coalesce.scylla.rows import Rows
from coalesce.scylla.session import Call

__all__ = ["CassandraDriver", "as_asyncio"]

_NOT_SHARED = ("trace", "custom_payload", "host")
_BATCH = StatementInfo("batch")


def as_asyncio(response: ResponseFuture, loop: asyncio.AbstractEventLoop) -> asyncio.Future[Rows]:
    """An asyncio future of a driver `ResponseFuture`'s first page, without a thread.

    The driver calls back from its reactor thread (libev, asyncore, asyncio or
    another); the callbacks only hop onto `loop` with `call_soon_threadsafe`.
    """
    future: asyncio.Future[Rows] = loop.create_future()

    def settle(setter: Any, value: Any) -> None:
        if not future.done():
            setter(value)

    def on_rows(rows: Any) -> None:
        # Read the paging state here: it belongs to this response, in this thread.
        page = Rows(rows or (), response._col_names or (), response._paging_state)
        _hop(loop, settle, future.set_result, page)

    def on_error(exc: BaseException) -> None:
        _hop(loop, settle, future.set_exception, exc)

    response.add_callbacks(on_rows, on_error)
    return future


def _hop(loop: asyncio.AbstractEventLoop, fn: Any, *args: Any) -> None:
    with contextlib.suppress(RuntimeError):  # a closed loop: nobody is waiting any more
        loop.call_soon_threadsafe(fn, *args)


class CassandraDriver:
    """Makes `Call`s of statements for a `cassandra.cluster.Session`, and runs them."""

    def __init__(self, session: Session, scope: Hashable | None) -> None:
        self.session = session
        self.scope = scope if scope is not None else ("cassandra-driver", id(session))

    async def prepare(self, query: str) -> PreparedStatement:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, self.session.prepare, query)

    def call(self, statement: Any, parameters: Any, options: dict[str, Any]) -> Call:
        session = self.session
        if isinstance(statement, BatchStatement):
            return Call(None, _BATCH, None, statement, parameters, options)
        stmt: Statement | None
        if isinstance(statement, PreparedStatement):
            # Keyed on the values as given (typed, so that 1 and 1.0 differ): binding
            # serializes them, which only the caller that starts the flight pays for.
            prepared, stmt = statement, None
            values = _typed(parameters)
            if values is None:  # unhashable values: key on their serialized form
                statement, parameters = statement.bind(parameters or ()), None
                stmt = statement
                values = tuple(statement.values)
            identity: Hashable = ("id", prepared.query_id, values)
        elif isinstance(statement, BoundStatement):
            prepared, stmt = statement.prepared_statement, statement
            identity = ("id", prepared.query_id, tuple(statement.values))
        else:
            prepared = None
            stmt = statement if isinstance(statement, Statement) else None
            text = stmt.query_string if stmt is not None else statement
            if not isinstance(text, str):
                raise TypeError(f"cannot execute a {type(statement).__qualname__}")
            if parameters:
                text = bind_params(text, parameters, session.encoder)
            identity = ("text", text)

        if prepared is not None:
            info = classify(prepared.query_string)
            keyspace = info.keyspace or prepared.keyspace or session.keyspace
        else:
            info = classify(stmt.query_string if stmt is not None else statement)
            keyspace = info.keyspace or getattr(stmt, "keyspace", None) or session.keyspace
        table = (keyspace, info.table) if info.table is not None else None
        if not info.coalescable or any(options.get(name) for name in _NOT_SHARED):
            return Call(None, info, table, statement, parameters, options)
        source = stmt if stmt is not None else prepared
        key = (
            self.scope,
            keyspace,
            identity,
            getattr(source, "consistency_level", None),
            getattr(source, "serial_consistency_level", None),
            getattr(source, "fetch_size", None),
            options.get("paging_state"),
            _profile_key(options.get("execution_profile")),
            options.get("execute_as"),
        )
        return Call(key, info, table, statement, parameters, options)

    def _bound(self, call: Call) -> Any:
        if call.bound is None:
            statement = call.statement
            if isinstance(statement, PreparedStatement):
                statement = statement.bind(call.parameters or ())
            call.bound = statement
        return call.bound

    def partition(self, call: Call) -> bytes | None:
        statement = self._bound(call)
        if not isinstance(statement, BoundStatement):
            return None
        if not statement.prepared_statement.routing_key_indexes:
            return None
        return statement.routing_key  # type: ignore[no-any-return]

    async def run(self, call: Call, timeout: float | None) -> Rows:
        statement = self._bound(call)
        parameters = None if isinstance(statement, BoundStatement) else call.parameters
        kwargs = dict(call.options)
        if timeout is not None:
            kwargs["timeout"] = timeout
        response = self.session.execute_async(statement, parameters, **kwargs)
        return await as_asyncio(response, asyncio.get_running_loop())


def _typed(parameters: Any) -> Hashable | None:
    """A hashable, type-exact form of bound values; None if one is unhashable."""
    if parameters is None:
        return ()
    if isinstance(parameters, dict):
        items: Any = tuple(sorted(parameters.items()))
        kinds: Any = tuple(type(v) for _, v in items)
    else:
        items = tuple(parameters)
        kinds = tuple(map(type, items))
    try:
        hash(items)
    except TypeError:
        return None
    return (items, kinds)


def _profile_key(profile: Any) -> Hashable:
    """Profiles are named (hashable) or objects (keyed by identity)."""
    if profile is None or isinstance(profile, str):
        return profile
    return ("profile", id(profile))
