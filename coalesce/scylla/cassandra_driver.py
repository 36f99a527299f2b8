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
from coalesce.keys import types_of
from coalesce.scylla.rows import Rows
from coalesce.scylla.session import Call

__all__ = ["CassandraDriver", "as_asyncio"]

_NOT_SHARED = ("trace", "custom_payload", "host")
_BATCH = StatementInfo("batch")
_SERIALIZED = "serialized"  # in a key's place of value types: the values are bytes as bound
_KNOWN_LIMIT = 1024  # prepared statements remembered for the quick key


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
        # id(prepared) -> (prepared, whether its reads are shared, keyspace or None)
        self._known: dict[int, tuple[PreparedStatement, bool, str | None]] = {}

    def quick_key(self, statement: Any, parameters: Any, options: dict[str, Any]) -> Hashable:
        """The key of the commonest shared read, or None for `call` to decide.

        The commonest read is a prepared SELECT with its values in a tuple or list and
        no options. The key is the one `call` gives for it, built without building a
        `Call`: every caller of a herd pays for this, only the first for `call`.
        """
        if options or type(statement) is not PreparedStatement:
            return None
        known = self._known.get(id(statement))
        if known is None or known[0] is not statement:
            known = self._learn(statement)
        if not known[1]:
            return None
        kind = type(parameters)
        if kind is tuple:
            values = parameters
        elif kind is list:
            values = tuple(parameters)
        elif parameters is None:
            values = ()
        else:
            return None
        try:
            hash(values)
        except TypeError:
            return None
        return (
            self.scope,
            known[2] or self.session.keyspace,
            statement.query_id,
            values,
            types_of(values),  # typed: 1, 1.0 and True are different reads
            statement.consistency_level,
            statement.serial_consistency_level,
            statement.fetch_size,
            None,  # paging state
            None,  # execution profile
            None,  # execute_as
        )

    def _learn(self, prepared: PreparedStatement) -> tuple[PreparedStatement, bool, str | None]:
        info = classify(prepared.query_string)
        if len(self._known) >= _KNOWN_LIMIT:
            self._known.clear()
        known = self._known[id(prepared)] = (
            prepared, info.coalescable, info.keyspace or prepared.keyspace
        )
        return known

    async def prepare(self, query: str) -> PreparedStatement:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, self.session.prepare, query)

    def call(self, statement: Any, parameters: Any, options: dict[str, Any]) -> Call:
        session = self.session
        if isinstance(statement, BatchStatement):
            return Call(None, _BATCH, None, statement, parameters, options)
        stmt: Statement | None
        # What the statement is, as (what, kinds): a query id with values typed (so that
        # 1 and 1.0 differ) or serialized, or a text with its values in it.
        identity: tuple[Hashable, ...]
        if isinstance(statement, PreparedStatement):
            # Keyed on the values as given: binding serializes them, which only the
            # caller that starts the flight pays for.
            prepared, stmt = statement, None
            typed = _typed(parameters)
            if typed is None:  # unhashable values: key on their serialized form
                statement, parameters = statement.bind(parameters or ()), None
                stmt = statement
                typed = (tuple(statement.values), _SERIALIZED)
            identity = (prepared.query_id, *typed)
        elif isinstance(statement, BoundStatement):
            prepared, stmt = statement.prepared_statement, statement
            identity = (prepared.query_id, tuple(statement.values), _SERIALIZED)
        else:
            prepared = None
            stmt = statement if isinstance(statement, Statement) else None
            text = stmt.query_string if stmt is not None else statement
            if not isinstance(text, str):
                raise TypeError(f"cannot execute a {type(statement).__qualname__}")
            if parameters:
                text = bind_params(text, parameters, session.encoder)
            identity = (text, None, None)

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
        # One flat tuple (hashed at every lookup); `quick_key` builds the same one.
        key = (
            self.scope,
            keyspace,
            *identity,
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


def _typed(parameters: Any) -> tuple[Hashable, Hashable] | None:
    """Bound values and their types, hashable; None if a value is unhashable."""
    if parameters is None:
        return (), ()
    if isinstance(parameters, dict):
        items: Any = tuple(sorted(parameters.items()))
        kinds: Any = ("by name", *(type(v) for _, v in items))
    else:
        items = tuple(parameters)
        kinds = types_of(items)
    try:
        hash(items)
    except TypeError:
        return None
    return items, kinds


def _profile_key(profile: Any) -> Hashable:
    """Profiles are named (hashable) or objects (keyed by identity)."""
    if profile is None or isinstance(profile, str):
        return profile
    return ("profile", id(profile))
