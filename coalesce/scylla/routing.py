"""Route each statement to one of several independent instances by its partition key.

An *instance* is one CQL endpoint that is its own cluster as far as a driver
can tell: one emulator, one sidecar, one ScyllaDB cluster. Sending every
request for a channel to the same instance is what lets that instance's
coalescing see all of them. The owner of a key is :class:`coalesce.router.Router`'s
choice over the instance endpoints (``"host:port"`` strings), so adding an
instance moves only the keys it takes over and a down instance's keys fail
over to the next instance of the ring walk.

Why one driver session per instance rather than one ``Cluster`` with a
routing policy: cassandra-driver's control connection keeps only the hosts
that the node it is connected to lists in ``system.local``/``system.peers``
and removes every other host, contact points included
(``ControlConnection._refresh_node_list_and_token_map``). Independent
instances do not list each other, so a single ``Cluster`` over them shrinks to
one host. :class:`RoutedSession` therefore holds one ``Cluster``/``Session``
per instance and picks by key, the same shape as :class:`RoutedAcsyllaSession`.

Routing keys: an explicit ``key=`` wins; otherwise the statement's own
routing key (a bound prepared statement's serialised partition key, or a
``SimpleStatement``'s ``routing_key``). Because the router hashes ``int`` as
CQL ``bigint`` and ``str`` as CQL ``text``, ``key=channel_id`` and the bound
statement's routing key pick the same instance for such a partition key.
Statements with no key go round robin over the instances.

Failover happens only where the request was certainly not executed: the
driver reports that no connection to the instance could be used
(cassandra-driver ``NoHostAvailable``; acsylla ``NoHostsAvailable`` or
``UnableToConnect``). The instance is then skipped for ``down_for`` seconds
and the request goes to the next instance of the walk; instances believed down
are still tried, last, before :class:`NoInstanceAvailable` is raised.
Timeouts and server errors are raised to the caller unchanged.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from coalesce.errors import CoalesceError
from coalesce.router import Key, NoNodesError, Router

if TYPE_CHECKING:
    import acsylla

__all__ = [
    "NoInstanceAvailable",
    "RoutedAcsyllaPrepared",
    "RoutedAcsyllaSession",
    "RoutedPreparedStatement",
    "RoutedSession",
    "split_endpoint",
]

S = TypeVar("S")


class NoInstanceAvailable(CoalesceError):
    """Every instance of the walk was tried and none could take the request.

    ``errors`` maps each endpoint tried to the driver error it raised, in the
    order tried; the last one is also the ``__cause__``.
    """

    def __init__(self, errors: Mapping[str, BaseException]) -> None:
        self.errors = dict(errors)
        super().__init__(f"no instance could take the request; tried {list(self.errors)}")


def split_endpoint(endpoint: str) -> tuple[str, int]:
    """``"10.0.0.1:9042"`` -> ``("10.0.0.1", 9042)``; ``"[::1]:9042"`` -> ``("::1", 9042)``.

    Raises ``ValueError`` for an endpoint without a numeric port.
    """
    host, sep, port = endpoint.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"endpoint {endpoint!r} is not 'host:port'")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


class _Instances(Generic[S]):
    """Endpoints, their sessions, the ring over them, and which recently failed.

    Membership changes and candidate lists are taken under one lock, so the
    cassandra-driver session can be used from several threads.
    """

    def __init__(
        self,
        sessions: Mapping[str, S],
        *,
        vnodes: int,
        weights: Mapping[str, int] | None,
        down_for: float,
    ) -> None:
        if down_for < 0:
            raise ValueError(f"down_for must be >= 0, got {down_for!r}")
        self.sessions = dict(sessions)
        for endpoint in self.sessions:
            split_endpoint(endpoint)
        self.router: Router[str] = Router(self.sessions, vnodes=vnodes, weights=weights)
        self._down_for = down_for
        self._down_until: dict[str, float] = {}
        self._round_robin = itertools.count()
        self._lock = threading.Lock()

    def add(self, endpoint: str, session: S, weight: int | None) -> None:
        split_endpoint(endpoint)
        with self._lock:
            self.router.add(endpoint, weight)
            self.sessions[endpoint] = session
            self._down_until.pop(endpoint, None)

    def remove(self, endpoint: str) -> S:
        with self._lock:
            self.router.remove(endpoint)
            self._down_until.pop(endpoint, None)
            return self.sessions.pop(endpoint)

    def candidates(self, key: Key | None, driver_says_down: Callable[[S], bool]) -> list[str]:
        """Endpoints to try in order: the walk from ``key``'s owner, believed-down ones last."""
        with self._lock:
            if key is None:
                nodes = self.router.nodes
                if not nodes:
                    raise NoNodesError("cannot route a request: no instances")
                start = next(self._round_robin) % len(nodes)
                order = [*nodes[start:], *nodes[:start]]
            else:
                order = list(self.router.nodes_for(key))
            now = time.monotonic()
            down = {
                e
                for e in order
                if self._down_until.get(e, 0.0) > now or driver_says_down(self.sessions[e])
            }
        return [e for e in order if e not in down] + [e for e in order if e in down]

    def mark_down(self, endpoint: str) -> None:
        self._down_until[endpoint] = time.monotonic() + self._down_for

    def mark_up(self, endpoint: str) -> None:
        self._down_until.pop(endpoint, None)

    def down(self) -> frozenset[str]:
        now = time.monotonic()
        return frozenset(e for e, until in self._down_until.items() if until > now)


# -- cassandra-driver ---------------------------------------------------------------


def _cassandra_driver_says_down(session: Any) -> bool:
    hosts = session.cluster.metadata.all_hosts()
    # is_up is None until the driver has an opinion; only a definite False counts.
    return bool(hosts) and all(host.is_up is False for host in hosts)


class RoutedPreparedStatement:
    """One query prepared on every instance of a :class:`RoutedSession`.

    Made by :meth:`RoutedSession.prepare`; pass it with its parameters to
    :meth:`RoutedSession.execute`. Instances added later get it prepared when
    they are added.
    """

    __slots__ = ("__weakref__", "_prepared", "query_string")

    def __init__(self, query_string: str, prepared: Mapping[str, Any]) -> None:
        self.query_string = query_string
        self._prepared: dict[str, Any] = dict(prepared)

    def routing_key(self, parameters: Sequence[Any] | Mapping[str, Any] | None) -> bytes | None:
        """The serialised partition key for ``parameters``.

        ``None`` if the server sent no partition key indexes when preparing.
        Raises ``NoNodesError`` if no instance is left to bind on.
        """
        if not self._prepared:
            raise NoNodesError(f"{self!r} is prepared on no instance")
        any_prepared = next(iter(self._prepared.values()))
        key: bytes | None = any_prepared.bind(parameters).routing_key
        return key

    def __repr__(self) -> str:
        return f"RoutedPreparedStatement({self.query_string!r})"


class RoutedSession:
    """cassandra-driver sessions, one per instance, picked by routing key.

    The routed session owns the sessions it holds: :meth:`shutdown` shuts down
    their clusters. Safe to use from several threads, like a driver
    ``Session``; :meth:`add` and :meth:`remove` may run concurrently with
    requests (a request already sent keeps its instance).

    Driver ``PreparedStatement`` and ``BoundStatement`` objects belong to one
    instance's cluster and are refused with ``TypeError``; use :meth:`prepare`.
    """

    def __init__(
        self,
        sessions: Mapping[str, Any],
        *,
        vnodes: int = 160,
        weights: Mapping[str, int] | None = None,
        down_for: float = 5.0,
    ) -> None:
        """Route over ``sessions`` (endpoint ``"host:port"`` -> driver ``Session``).

        ``down_for`` is how long an instance that failed with ``NoHostAvailable``
        is tried only after all others. Raises ``ValueError`` for a malformed
        endpoint or as :class:`coalesce.router.Router` does.
        """
        self._instances: _Instances[Any] = _Instances(
            sessions, vnodes=vnodes, weights=weights, down_for=down_for
        )
        self._statements: weakref.WeakSet[RoutedPreparedStatement] = weakref.WeakSet()

    @classmethod
    def connect(
        cls,
        endpoints: Iterable[str],
        *,
        keyspace: str | None = None,
        vnodes: int = 160,
        weights: Mapping[str, int] | None = None,
        down_for: float = 5.0,
        **cluster_options: Any,
    ) -> RoutedSession:
        """Open one ``cassandra.cluster.Cluster`` per endpoint and route over their sessions.

        ``cluster_options`` go to every ``Cluster`` (so do not pass one policy
        object: policies keep per-cluster state; build the sessions yourself
        and use the constructor instead). Unless they set a policy or
        ``execution_profiles``, each cluster's default execution profile gets
        its own ``RoundRobinPolicy``. Blocks until all are connected; if
        any fails, those already open are shut down and the error is raised.
        """
        from cassandra.cluster import EXEC_PROFILE_DEFAULT, Cluster, ExecutionProfile
        from cassandra.policies import RoundRobinPolicy

        clusters: list[Any] = []
        sessions: dict[str, Any] = {}
        try:
            for endpoint in endpoints:
                host, port = split_endpoint(endpoint)
                options = dict(cluster_options)
                if not {
                    "execution_profiles",
                    "load_balancing_policy",
                    "default_retry_policy",
                } & set(options):
                    # One host per cluster: plain round robin is all it needs, and
                    # a fresh policy per cluster since policies hold cluster state.
                    profile = ExecutionProfile(load_balancing_policy=RoundRobinPolicy())
                    options["execution_profiles"] = {EXEC_PROFILE_DEFAULT: profile}
                cluster = Cluster(contact_points=[host], port=port, **options)
                clusters.append(cluster)
                sessions[endpoint] = cluster.connect(keyspace)
            return cls(sessions, vnodes=vnodes, weights=weights, down_for=down_for)
        except BaseException:
            for cluster in clusters:
                cluster.shutdown()
            raise

    # -- membership -------------------------------------------------------------------

    @property
    def endpoints(self) -> tuple[str, ...]:
        """The instances, in the order they were added."""
        return self._instances.router.nodes

    @property
    def down(self) -> frozenset[str]:
        """Instances currently skipped after a ``NoHostAvailable``."""
        return self._instances.down()

    @property
    def sessions(self) -> Mapping[str, Any]:
        """A snapshot of endpoint -> driver ``Session`` (for schema changes on every instance)."""
        return MappingProxyType(dict(self._instances.sessions))

    def add(self, endpoint: str, session: Any, weight: int | None = None) -> None:
        """Add an instance; prepares every live :class:`RoutedPreparedStatement` on it first.

        Blocks while preparing. Raises ``ValueError`` if the endpoint is present
        or malformed; then nothing changes.
        """
        split_endpoint(endpoint)
        if endpoint in self._instances.router:
            raise ValueError(f"instance {endpoint!r} is already routed to")
        prepared = {s: session.prepare(s.query_string) for s in list(self._statements)}
        self._instances.add(endpoint, session, weight)
        for statement, driver_prepared in prepared.items():
            statement._prepared[endpoint] = driver_prepared

    def remove(self, endpoint: str) -> Any:
        """Stop routing to ``endpoint`` and hand back its session (not shut down).

        Raises ``KeyError`` naming the endpoint if it is not routed to.
        """
        session = self._instances.remove(endpoint)
        for statement in list(self._statements):
            statement._prepared.pop(endpoint, None)
        return session

    def endpoint_for(self, key: Key) -> str:
        """The instance owning ``key`` on the ring, whether it is up or not."""
        return self._instances.router.node_for(key)

    def session_for(self, key: Key | None) -> Any:
        """The session a request with this routing key goes to first."""
        return self._instances.sessions[self._candidates(key)[0]]

    # -- requests ---------------------------------------------------------------------

    def prepare(self, query: str) -> RoutedPreparedStatement:
        """Prepare ``query`` on every instance (blocking); raises the first driver error."""
        sessions = dict(self._instances.sessions)
        statement = RoutedPreparedStatement(
            query, {endpoint: s.prepare(query) for endpoint, s in sessions.items()}
        )
        self._statements.add(statement)
        return statement

    def execute(
        self,
        query: str | RoutedPreparedStatement | Any,
        parameters: Sequence[Any] | Mapping[str, Any] | None = None,
        *,
        key: Key | None = None,
        **options: Any,
    ) -> Any:
        """Run ``query`` on the instance owning its routing key and return the ``ResultSet``.

        ``options`` go to ``Session.execute`` (``timeout``, ``execution_profile``,
        ...). On ``NoHostAvailable`` the next instance of the walk is tried;
        when all fail, :class:`NoInstanceAvailable` is raised. Any other error
        (timeouts, server errors) is raised as is, without trying another
        instance, since the request may have run.
        """
        from cassandra.cluster import NoHostAvailable

        errors: dict[str, BaseException] = {}
        for endpoint in self._candidates(self._routing_key(query, parameters, key)):
            session = self._instances.sessions.get(endpoint)
            if session is None:  # removed since the candidates were taken
                continue
            statement, values = self._for_instance(endpoint, session, query, parameters)
            try:
                result = session.execute(statement, values, **options)
            except NoHostAvailable as exc:
                self._instances.mark_down(endpoint)
                errors[endpoint] = exc
                continue
            self._instances.mark_up(endpoint)
            return result
        raise NoInstanceAvailable(errors) from (list(errors.values())[-1] if errors else None)

    def execute_async(
        self,
        query: str | RoutedPreparedStatement | Any,
        parameters: Sequence[Any] | Mapping[str, Any] | None = None,
        *,
        key: Key | None = None,
        **options: Any,
    ) -> Any:
        """Start ``query`` on the first instance believed up and return its ``ResponseFuture``.

        Unlike :meth:`execute`, there is no failover once the request is
        handed to the driver: the future fails with the driver's error.
        """
        endpoint = self._candidates(self._routing_key(query, parameters, key))[0]
        session = self._instances.sessions[endpoint]
        statement, values = self._for_instance(endpoint, session, query, parameters)
        return session.execute_async(statement, values, **options)

    def shutdown(self) -> None:
        """Shut down every instance's cluster. Requests in flight fail with driver errors."""
        for session in list(self._instances.sessions.values()):
            session.cluster.shutdown()

    def __enter__(self) -> RoutedSession:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown()

    def _candidates(self, key: Key | None) -> list[str]:
        return self._instances.candidates(key, _cassandra_driver_says_down)

    @staticmethod
    def _routing_key(
        query: Any, parameters: Sequence[Any] | Mapping[str, Any] | None, key: Key | None
    ) -> Key | None:
        if key is not None:
            return key
        if isinstance(query, RoutedPreparedStatement):
            return query.routing_key(parameters)
        if isinstance(query, str):
            return None
        _refuse_single_cluster_statement(query)
        routing_key: bytes | None = getattr(query, "routing_key", None)
        return routing_key

    @staticmethod
    def _for_instance(
        endpoint: str,
        session: Any,
        query: Any,
        parameters: Sequence[Any] | Mapping[str, Any] | None,
    ) -> tuple[Any, Any]:
        if isinstance(query, RoutedPreparedStatement):
            prepared = query._prepared.get(endpoint)
            if prepared is None:
                # Only when prepare() and add() raced: prepare here, blocking once.
                prepared = query._prepared[endpoint] = session.prepare(query.query_string)
            return prepared.bind(parameters), None
        return query, parameters


def _refuse_single_cluster_statement(query: Any) -> None:
    from cassandra.query import BoundStatement, PreparedStatement

    if isinstance(query, BoundStatement | PreparedStatement):
        raise TypeError(
            "a driver prepared/bound statement belongs to one instance; "
            "use RoutedSession.prepare() instead"
        )


# -- acsylla ----------------------------------------------------------------------


def _never_down(session: object) -> bool:
    return False


class RoutedAcsyllaPrepared:
    """One query prepared on every instance of a :class:`RoutedAcsyllaSession`."""

    __slots__ = ("__weakref__", "_prepared", "query_string")

    def __init__(self, query_string: str, prepared: Mapping[str, Any]) -> None:
        self.query_string = query_string
        self._prepared: dict[str, Any] = dict(prepared)

    def __repr__(self) -> str:
        return f"RoutedAcsyllaPrepared({self.query_string!r})"


async def _acsylla_statement(
    endpoint: str,
    session: acsylla.Session,
    statement: str | RoutedAcsyllaPrepared | acsylla.Statement,
    parameters: Sequence[Any] | Mapping[str, Any] | None,
) -> acsylla.Statement:
    import acsylla

    if isinstance(statement, RoutedAcsyllaPrepared):
        prepared = statement._prepared.get(endpoint)
        if prepared is None:  # only when prepare() and add() raced
            prepared = await session.create_prepared(statement.query_string)
            statement._prepared[endpoint] = prepared
        return prepared.bind(parameters)
    if isinstance(statement, str):
        return acsylla.create_statement(statement)
    return statement


class RoutedAcsyllaSession:
    """acsylla sessions, one per instance, picked by an explicit routing key.

    acsylla does not expose a prepared statement's partition key, so the key
    is given to :meth:`execute` (``key=channel_id``). Use from one event loop;
    the routed session owns its sessions and closes them in :meth:`close`.
    """

    def __init__(
        self,
        sessions: Mapping[str, acsylla.Session],
        *,
        vnodes: int = 160,
        weights: Mapping[str, int] | None = None,
        down_for: float = 5.0,
    ) -> None:
        """Route over ``sessions`` (endpoint ``"host:port"`` -> acsylla ``Session``).

        ``down_for`` is how long an instance whose request failed for want of
        a connection is tried only after all others.
        """
        self._instances: _Instances[acsylla.Session] = _Instances(
            sessions, vnodes=vnodes, weights=weights, down_for=down_for
        )
        self._statements: weakref.WeakSet[RoutedAcsyllaPrepared] = weakref.WeakSet()

    @classmethod
    async def connect(
        cls,
        endpoints: Iterable[str],
        *,
        keyspace: str | None = None,
        vnodes: int = 160,
        weights: Mapping[str, int] | None = None,
        down_for: float = 5.0,
        **cluster_options: Any,
    ) -> RoutedAcsyllaSession:
        """Create one acsylla cluster and session per endpoint, concurrently.

        ``cluster_options`` go to ``acsylla.create_cluster``. If any session
        fails to connect (or this is cancelled), the ones that did are closed
        and the error is raised.
        """
        import acsylla

        async def open_one(endpoint: str) -> acsylla.Session:
            host, port = split_endpoint(endpoint)
            cluster = acsylla.create_cluster([host], port=port, **cluster_options)
            return await cluster.create_session(keyspace=keyspace)

        names = list(endpoints)
        tasks = [asyncio.ensure_future(open_one(e)) for e in names]
        try:
            sessions = await asyncio.gather(*tasks)
        except BaseException:
            for task in tasks:
                task.cancel()
            results = await asyncio.gather(*tasks, return_exceptions=True)
            for result in results:
                if not isinstance(result, BaseException):
                    await result.close()
            raise
        return cls(
            dict(zip(names, sessions, strict=True)),
            vnodes=vnodes,
            weights=weights,
            down_for=down_for,
        )

    @property
    def endpoints(self) -> tuple[str, ...]:
        """The instances, in the order they were added."""
        return self._instances.router.nodes

    @property
    def down(self) -> frozenset[str]:
        """Instances currently tried last after failing for want of a connection."""
        return self._instances.down()

    @property
    def sessions(self) -> Mapping[str, acsylla.Session]:
        """A snapshot of endpoint -> acsylla ``Session`` (for schema changes on every instance)."""
        return MappingProxyType(dict(self._instances.sessions))

    async def add(self, endpoint: str, session: acsylla.Session, weight: int | None = None) -> None:
        """Add an instance; prepares every live :class:`RoutedAcsyllaPrepared` on it first.

        Raises ``ValueError`` if the endpoint is present or malformed; then
        nothing changes (also if preparing fails or is cancelled).
        """
        split_endpoint(endpoint)
        if endpoint in self._instances.router:
            raise ValueError(f"instance {endpoint!r} is already routed to")
        statements = list(self._statements)
        prepared = await asyncio.gather(
            *(session.create_prepared(s.query_string) for s in statements)
        )
        self._instances.add(endpoint, session, weight)
        for statement, acsylla_prepared in zip(statements, prepared, strict=True):
            statement._prepared[endpoint] = acsylla_prepared

    def remove(self, endpoint: str) -> acsylla.Session:
        """Stop routing to ``endpoint`` and hand back its session (not closed).

        Raises ``KeyError`` naming the endpoint if it is not routed to.
        """
        session = self._instances.remove(endpoint)
        for statement in list(self._statements):
            statement._prepared.pop(endpoint, None)
        return session

    def endpoint_for(self, key: Key) -> str:
        """The instance owning ``key`` on the ring, whether it is up or not."""
        return self._instances.router.node_for(key)

    def session_for(self, key: Key | None) -> acsylla.Session:
        """The session a request with this routing key goes to first."""
        return self._instances.sessions[self._instances.candidates(key, _never_down)[0]]

    async def prepare(self, query: str) -> RoutedAcsyllaPrepared:
        """Prepare ``query`` on every instance concurrently; raises the first error."""
        sessions = dict(self._instances.sessions)
        prepared = await asyncio.gather(*(s.create_prepared(query) for s in sessions.values()))
        statement = RoutedAcsyllaPrepared(query, dict(zip(sessions, prepared, strict=True)))
        self._statements.add(statement)
        return statement

    async def execute(
        self,
        statement: str | RoutedAcsyllaPrepared | acsylla.Statement,
        parameters: Sequence[Any] | Mapping[str, Any] | None = None,
        *,
        key: Key | None = None,
    ) -> acsylla.Result:
        """Run ``statement`` on the instance owning ``key`` and return the acsylla ``Result``.

        ``statement`` is a :class:`RoutedAcsyllaPrepared` (bound to
        ``parameters`` on the chosen instance), a query string without bind
        markers, or an acsylla ``Statement`` with its values already bound;
        ``parameters`` with the latter two raise ``TypeError``. Without ``key`` the request
        goes round robin. Failover and errors as in the module docstring.
        Cancelling the caller stops the wait (the request may still run on
        the instance it was sent to) and tries no other instance.
        """
        import acsylla

        if not isinstance(statement, RoutedAcsyllaPrepared) and parameters is not None:
            # acsylla binds unprepared values by Python type (int as a 4-byte
            # int), so a bigint column would be rejected; the caller must say.
            raise TypeError(
                "parameters go with a RoutedAcsyllaPrepared; bind an acsylla Statement "
                "with value_types for an unprepared one"
            )
        unreachable = (
            acsylla.errors.CassErrorLibNoHostsAvailable,
            acsylla.errors.CassErrorLibUnableToConnect,
        )
        errors: dict[str, BaseException] = {}
        for endpoint in self._instances.candidates(key, _never_down):
            session = self._instances.sessions.get(endpoint)
            if session is None:  # removed since the candidates were taken
                continue
            try:
                to_run = await _acsylla_statement(endpoint, session, statement, parameters)
                result = await session.execute(to_run)
            except unreachable as exc:
                self._instances.mark_down(endpoint)
                errors[endpoint] = exc
                continue
            self._instances.mark_up(endpoint)
            return result
        raise NoInstanceAvailable(errors) from (list(errors.values())[-1] if errors else None)

    async def close(self) -> None:
        """Close every instance's session; errors closing one do not stop the others."""
        sessions = list(self._instances.sessions.values())
        await asyncio.gather(*(s.close() for s in sessions), return_exceptions=True)

    async def __aenter__(self) -> RoutedAcsyllaSession:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()
