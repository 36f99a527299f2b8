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
    """Makes `Call`s of statements for a `cassandra.cluster.Session`."""

    def __init__(self, session: Session, scope: Hashable | None) -> None:
        self.session = session
        self.scope = scope if scope is not None else ("cassandra-driver", id(session))

    async def prepare(self, query: str) -> PreparedStatement:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, self.session.prepare, query)

    def call(self, statement: Any, parameters: Any, options: dict[str, Any]) -> Call:
        session = self.session
        if isinstance(statement, PreparedStatement):
            statement = statement.bind(parameters if parameters is not None else ())
            parameters = None
        if isinstance(statement, BatchStatement):
            return Call(None, _BATCH, None, None, self._runner(statement, parameters, options))

        if isinstance(statement, BoundStatement):
            prepared = statement.prepared_statement
            info = classify(prepared.query_string)
            keyspace = info.keyspace or prepared.keyspace or session.keyspace
            partition = statement.routing_key if prepared.routing_key_indexes else None
            identity: Hashable = ("id", prepared.query_id, tuple(statement.values))
        else:
            text = statement.query_string if isinstance(statement, Statement) else statement
            if not isinstance(text, str):
                raise TypeError(f"cannot execute a {type(statement).__qualname__}")
            info = classify(text)
            keyspace = info.keyspace or getattr(statement, "keyspace", None) or session.keyspace
            partition = None
            if parameters:
                text = bind_params(text, parameters, session.encoder)
            identity = ("text", text)

        table = (keyspace, info.table) if info.table is not None else None
        run = self._runner(statement, parameters, options)
        if not info.coalescable or any(options.get(name) for name in _NOT_SHARED):
            return Call(None, info, table, partition, run)
        stmt = statement if isinstance(statement, Statement) else None
        key = (
            self.scope,
            keyspace,
            identity,
            getattr(stmt, "consistency_level", None),
            getattr(stmt, "serial_consistency_level", None),
            getattr(stmt, "fetch_size", None),
            options.get("paging_state"),
            _profile_key(options.get("execution_profile")),
            options.get("execute_as"),
        )
        return Call(key, info, table, partition, run)

    def _runner(self, statement: Any, parameters: Any, options: dict[str, Any]) -> Any:
        session = self.session

        async def run(timeout: float | None) -> Rows:
            kwargs = dict(options)
            if timeout is not None:
                kwargs["timeout"] = timeout
            response = session.execute_async(statement, parameters, **kwargs)
            return await as_asyncio(response, asyncio.get_running_loop())

        return run


def _profile_key(profile: Any) -> Hashable:
    """Profiles are named (hashable) or objects (keyed by identity)."""
    if profile is None or isinstance(profile, str):
        return profile
    return ("profile", id(profile))
