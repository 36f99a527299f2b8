"""`CoalescingSession`: one upstream read for identical concurrent reads through a driver."""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any, Protocol

from prometheus_client import CollectorRegistry

from coalesce.cql.classify import StatementInfo
from coalesce.flight import SingleFlight
from coalesce.freshness import FreshnessIndex
from coalesce.scylla.rows import Rows

__all__ = ["Call", "CoalescingSession", "Driver"]


@dataclass(slots=True)
class Call:
    """One statement made ready by a driver adaptor: its key, and what running it needs.

    ``key`` is None for anything that must not be shared (writes, batches, LWT,
    volatile SELECTs, traced or host-pinned requests). ``table`` is (keyspace, table).
    Building a call must stay cheap: every caller of a herd builds one, and only the
    one that starts the flight binds, sends and reads (`Driver.run`).
    """

    key: Hashable | None
    info: StatementInfo
    table: tuple[str | None, str] | None
    statement: Any
    parameters: Any
    options: dict[str, Any]
    bound: Any = None  # the driver's own statement, once `Driver.run` made it


class Driver(Protocol):
    """What `CoalescingSession` needs from a driver adaptor."""

    def call(self, statement: Any, parameters: Any, options: dict[str, Any]) -> Call: ...

    def quick_key(self, statement: Any, parameters: Any, options: dict[str, Any]) -> Hashable:
        """The key `call` would give, if this is a common shared read; else None.

        Cheap, since every caller of a herd pays for it: no `Call`, no classification
        beyond a cache. None means "ask `call`", never "not shared".
        """
        ...

    async def run(self, call: Call, timeout: float | None) -> Rows: ...

    def partition(self, call: Call) -> bytes | None:
        """The serialized partition key of the call's statement, when known."""
        ...

    async def prepare(self, query: str) -> Any: ...


def _adapt(session: Any, scope: Hashable | None) -> Driver:
    module = type(session).__module__
    if module.startswith("cassandra"):
        from coalesce.scylla.cassandra_driver import CassandraDriver

        return CassandraDriver(session, scope)
    if module.startswith("acsylla"):
        from coalesce.scylla.acsylla_driver import AcsyllaDriver

        return AcsyllaDriver(session, scope)
    raise TypeError(
        f"CoalescingSession wraps a cassandra-driver or acsylla Session, "
        f"not {type(session).__qualname__}"
    )


class CoalescingSession:
    """A driver session whose identical concurrent reads share one request.

    Wraps a `cassandra.cluster.Session` or an `acsylla` session (detected). The
    contract of ``await execute(statement, parameters, **options)``:

    - **What is shared.** A SELECT of one table whose result depends only on the
      statement (no ``now()``, ``uuid()`` and the like). Callers share a request when
      everything that can change its answer is equal: the session's scope (by default
      the wrapped session itself, hence its authenticated role), the keyspace that
      unqualified names resolve in, the statement text or prepared id, the serialized
      bound values, consistency and serial consistency, page size, paging state,
      execution profile and ``execute_as``. Never shared: writes, batches, conditional
      statements (LWT), traced or host-pinned requests, schema statements.
    - **Results.** A `Rows` page: rows as named tuples in a tuple, with its paging
      state; callers share the object, which cannot be changed. The next page is
      another ``execute`` with ``paging_state=rows.paging_state``, itself coalesced.
    - **Read-after-write.** When a write through this session has completed (or
      failed), no read arriving afterwards joins a read that started before it:
      a prepared write forgets the reads of its partition (from the statement's
      partition-key indexes) and the table's text reads; a text write forgets every
      read of its table; a batch or schema change forgets every read. Reads already
      waiting keep their flight: they were concurrent with the write. Writes made
      elsewhere (another process) are not seen: coalescing never serves an answer
      older than the moment a caller arrived, nothing more.
    - **Errors and timeouts.** A driver error reaches every caller of that request
      unchanged in type. ``timeout=`` bounds this caller's wait for a shared read (it
      gets `TimeoutError`; the request and the other callers go on); for requests that
      are not shared it is the driver's request timeout. Cancelling a caller never
      cancels the others; when all are gone the shared read is abandoned.
    """

    def __init__(
        self,
        session: Any,
        *,
        group: SingleFlight[Rows] | None = None,
        scope: Hashable | None = None,
        name: str = "scylla",
        max_waiters: int | None = None,
        max_inflight: int | None = None,
        max_queued: int = 0,
        metrics: bool = True,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.session = session
        self._driver = _adapt(session, scope)
        self.group: SingleFlight[Rows] = group or SingleFlight(
            name,
            max_waiters=max_waiters,
            max_inflight=max_inflight,
            max_queued=max_queued,
            metrics=metrics,
            registry=registry,
        )
        self.freshness = FreshnessIndex(self.group)
        self._quick_key = self._driver.quick_key
        self._read_quick = self._read_as_first_caller  # one bound method, not one per call

    async def prepare(self, query: str) -> Any:
        """Prepare `query` with the wrapped driver (pass-through, never coalesced)."""
        return await self._driver.prepare(query)

    async def execute(
        self,
        statement: Any,
        parameters: Any = None,
        *,
        timeout: float | None = None,
        **options: Any,
    ) -> Rows:
        """Run `statement`; identical concurrent reads share one request (see class)."""
        key = self._quick_key(statement, parameters, options)
        if key is not None:  # a herd's callers come this way: only the first builds a Call
            read = self._read_quick
            waiting = self.group.do(key, read, statement, parameters, timeout=timeout)
            del key  # held by the flight's table if needed, not by each waiter
            return await waiting
        call = self._driver.call(statement, parameters, options)
        if call.key is None:
            try:
                return await self._driver.run(call, timeout)
            finally:
                if call.info.kind not in ("select", "use"):
                    self._written(call)
        return await self.group.do(call.key, self._read, call, timeout=timeout)

    async def _read_as_first_caller(self, statement: Any, parameters: Any) -> Rows:
        return await self._read(self._driver.call(statement, parameters, {}))

    async def _read(self, call: Call) -> Rows:
        assert call.key is not None and call.table is not None
        driver = self._driver
        with self.freshness.reading(call.key, call.table, driver.partition(call)):
            return await driver.run(call, None)  # one caller's timeout must not end it

    def _written(self, call: Call) -> None:
        # The one read-after-write rule, shared with the sidecar.
        keyspace = call.table[0] if call.table is not None else None
        self.freshness.written_by(call.info, keyspace, self._driver.partition(call))
