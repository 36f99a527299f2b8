"""The acsylla side of `CoalescingSession`."""

from __future__ import annotations

import datetime
import decimal
import uuid
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import acsylla

from coalesce.cql.classify import StatementInfo, classify
from coalesce.keys import types_of
from coalesce.scylla.rows import Rows
from coalesce.scylla.session import Call

__all__ = ["AcsyllaDriver", "Prepared"]

# Options that change the answer, in key order; `timeout` does not, `native_types` does.
_KEYED = ("page_size", "paging_state", "consistency", "serial_consistency",
          "execution_profile", "native_types")
# Values of these types are their own frozen form: a flat sequence of them needs no
# recursive freezing (its types are keyed beside it, so 1, 1.0 and True stay distinct).
_FLAT = frozenset({int, float, bool, str, bytes, type(None), uuid.UUID, decimal.Decimal,
                   datetime.date, datetime.datetime, datetime.time})
_KNOWN_LIMIT = 1024  # prepared statements remembered for the quick key


@dataclass(frozen=True, slots=True)
class Prepared:
    """An acsylla prepared statement with the text it was prepared from.

    `CoalescingSession.prepare` returns these: acsylla's own prepared statements do
    not expose their text, and without it a statement cannot be classified, so a bare
    acsylla prepared statement is always executed without coalescing.
    """

    statement: Any
    query: str
    keyspace: str | None


_flat_kinds: set[tuple[type, ...]] = set()  # the type tuples found flat: one lookup


def _is_flat(kinds: tuple[type, ...]) -> bool:
    if not _FLAT.issuperset(kinds):
        return False
    if len(_flat_kinds) < 4096:
        _flat_kinds.add(kinds)
    return True


def _values_key(parameters: Any) -> tuple[Hashable, Hashable]:
    """Bound values as two hashable parts: flat values and their types, or a frozen form."""
    if parameters is None:
        return None, None
    if type(parameters) is list or type(parameters) is tuple:
        values = tuple(parameters)
        kinds = types_of(values)
        if kinds in _flat_kinds or _is_flat(kinds):
            return values, kinds
    return _freeze(parameters), None


def _freeze(value: Any) -> Hashable:
    """A hashable, type-exact form of a bound value (1, 1.0 and True stay distinct)."""
    if isinstance(value, Mapping):
        return (dict, tuple(sorted((_freeze(k), _freeze(v)) for k, v in value.items())))
    if isinstance(value, (list, tuple)):
        return (type(value), tuple(_freeze(v) for v in value))
    if isinstance(value, (set, frozenset)):
        return (frozenset, frozenset(_freeze(v) for v in value))
    return (type(value), value)


class AcsyllaDriver:
    """Makes `Call`s of statements for an acsylla session."""

    def __init__(self, session: Any, scope: Hashable | None, keyspace: str | None = None) -> None:
        self.session = session
        self.scope = scope if scope is not None else ("acsylla", id(session))
        self.keyspace = keyspace
        # id(Prepared) -> (Prepared, whether its reads are shared, keyspace, identity)
        self._known: dict[int, tuple[Prepared, bool, str | None, Hashable]] = {}

    def quick_key(self, statement: Any, parameters: Any, options: dict[str, Any]) -> Hashable:
        """The key `call` gives a prepared SELECT with flat values and no options, or None."""
        if options or type(statement) is not Prepared:
            return None
        known = self._known.get(id(statement))
        if known is None or known[0] is not statement:
            info = classify(statement.query)
            if len(self._known) >= _KNOWN_LIMIT:
                self._known.clear()
            known = self._known[id(statement)] = (
                statement, info.coalescable,
                info.keyspace or statement.keyspace, ("prepared", statement.query),
            )
        if not known[1]:
            return None
        kind = type(parameters)
        values: tuple[Any, ...] | None
        kinds: tuple[type, ...] | None
        if kind is list:
            values = tuple(parameters)
        elif kind is tuple:
            values = parameters
        elif parameters is None:
            values = kinds = None
        else:
            return None
        if values is not None:
            kinds = types_of(values)
            if kinds not in _flat_kinds and not _is_flat(kinds):
                return None
        # The options of _KEYED, all None: spelled out, a star would build a list first.
        return (self.scope, known[2], known[3], values, kinds, None, None, None, None, None, None)

    async def prepare(self, query: str) -> Prepared:
        return Prepared(await self.session.create_prepared(query), query, self.keyspace)

    def call(self, statement: Any, parameters: Any, options: dict[str, Any]) -> Call:
        unknown = set(options) - {*_KEYED, "timeout"}
        if unknown:
            raise TypeError(f"unknown acsylla option(s): {', '.join(sorted(unknown))}")
        if isinstance(statement, Prepared):
            info = classify(statement.query)
            keyspace = info.keyspace or statement.keyspace
            identity: Hashable = ("prepared", statement.query)
        elif isinstance(statement, str):
            info = classify(statement)
            keyspace = info.keyspace or self.keyspace
            identity = ("text", statement)
        else:  # a raw acsylla statement, batch or prepared statement: opaque, never shared
            return Call(None, StatementInfo("other"), None, statement, None, {})

        if info.kind == "use" and info.keyspace is not None:
            self.keyspace = info.keyspace
        table = (keyspace, info.table) if info.table is not None else None
        if not info.coalescable:
            return Call(None, info, table, statement, parameters, options)
        # One flat tuple (hashed at every lookup); `quick_key` builds the same one.
        key = (self.scope, keyspace, identity, *_values_key(parameters),
               *(options.get(k) for k in _KEYED))
        return Call(key, info, table, statement, parameters, options)

    def partition(self, call: Call) -> bytes | None:
        return None  # acsylla does not expose a prepared statement's partition key

    async def run(self, call: Call, timeout: float | None) -> Rows:
        statement, parameters = call.statement, call.parameters
        kwargs = {
            ("page_state" if k == "paging_state" else k): v
            for k, v in call.options.items()
            if v is not None and k != "timeout"
        }
        if timeout is not None:
            kwargs["timeout"] = timeout
        if isinstance(statement, Prepared):
            kwargs.pop("native_types", None)
            stmt = statement.statement.bind(_values(parameters), **kwargs)
        elif isinstance(statement, str):
            stmt = acsylla.create_statement(statement, _values(parameters), **kwargs)
        else:
            stmt = statement
        return _rows(await self.session.execute(stmt))


def _values(parameters: Any) -> Any:
    if parameters is None or isinstance(parameters, Mapping):
        return parameters
    if isinstance(parameters, Sequence) and not isinstance(parameters, str):
        return list(parameters)
    raise TypeError(f"parameters must be a sequence or a mapping, not {type(parameters).__name__}")


def _rows(result: Any) -> Rows:
    columns = tuple(result.columns_names()) if result.column_count() else ()
    state = result.page_state() if result.has_more_pages() else None
    return Rows((row.as_tuple() for row in result.all()), columns, state or None)
