"""The upstream side as a whole: nodes, their health, and pools of connections.

`Upstream` knows every configured Scylla node, whether it answers, which tokens it
owns, and the credentials of each role that logged in through the sidecar. A `Pool`
holds up to ``connections_per_node`` connections to every node for one
``(role, keyspace)``: answers are only ever shared inside one role, and a client's
``USE`` keyspace is a property of the connection its requests travel on.

Pools live only while clients use them: `pool` takes a reference and `release` gives
it back; a pool nobody uses is closed after ``pool_idle_timeout`` (at once if it never
opened a connection, as after a ``USE`` of a keyspace that does not exist), and at most
``max_pools`` exist. Only pools in use are refilled after a node comes back, and at
most a few connections are opened at once, so a restart never sets off a storm.

Health: a node that refuses a connection is marked unreachable and probed again with
exponential back-off (OPTIONS, then STARTUP, which needs no login and tells whether
the node asks for one: the sidecar re-learns that on every probe); while it backs off
no request waits for it. An established connection that dies fails its requests at
once (see `UpstreamConnection`) and triggers an immediate probe of its node. Every
connection that has been quiet for ``heartbeat_interval`` is sent an OPTIONS, and so
is one whose request timed out; one that leaves it unanswered for
``heartbeat_timeout`` is dropped like a dead one, so a frozen node is reported
unreachable and its requests fail fast instead of each waiting out its timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import logging
import random
import ssl
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from typing import Any, Final

from coalesce.cql import (
    Authenticate,
    Error,
    Frame,
    Opcode,
    Query,
    QueryParameters,
    Register,
    ResultRows,
    Supported,
    decode_result,
)
from coalesce.cql.token import shard_of
from coalesce.sidecar.config import SidecarConfig
from coalesce.sidecar.connection import UpstreamConnection
from coalesce.sidecar.errors import (
    UpstreamError,
    UpstreamRefused,
    UpstreamUnavailable,
)
from coalesce.sidecar.ring import Ring, token_of

__all__ = ["Node", "Pool", "Sharding", "Upstream", "plain_username"]

_log = logging.getLogger(__name__)
_CONNECTING_AT_ONCE: Final = 8
# Local ports for shard-aware connections: above Linux's ephemeral range (32768-60999),
# where the kernel's own choices and their TIME_WAIT leftovers rarely are.
_EPHEMERAL_LOW: Final = 61000
_EPHEMERAL_HIGH: Final = 65535
_STARTUP_BODY: Final = b"\x00\x01\x00\x0bCQL_VERSION\x00\x053.0.0"
_DEFAULT_AUTHENTICATOR: Final = "org.apache.cassandra.auth.PasswordAuthenticator"

_LOCAL_TOKENS: Final = Query(
    "SELECT tokens, data_center, rack, schema_version, release_version FROM system.local "
    "WHERE key='local'",
    QueryParameters(0x0001),
).encode()
_REGISTER_SCHEMA: Final = Register(["SCHEMA_CHANGE"]).encode()
_OPTIONS_BODY: Final = b""


def plain_username(token: bytes | None) -> str | None:
    """The user name of a SASL PLAIN token (``authzid\\0user\\0password``), or None."""
    if token is None:
        return None
    parts = token.split(b"\x00")
    if len(parts) != 3 or not parts[1]:
        return None
    try:
        return parts[1].decode("utf-8")
    except UnicodeDecodeError:
        return None


@dataclass(frozen=True, slots=True)
class Sharding:
    """What a Scylla node says of its shards in SUPPORTED.

    `port` is its shard-aware port (None: not advertised, or it failed us): a
    connection to it from local port p is served by shard ``p % shards``.
    """

    shards: int
    ignore_msb: int
    port: int | None

    @classmethod
    def from_supported(cls, options: dict[str, list[str]]) -> Sharding | None:
        try:
            shards = int(options["SCYLLA_NR_SHARDS"][0])
            ignore_msb = int(options.get("SCYLLA_SHARDING_IGNORE_MSB", ["12"])[0])
            algorithm = options.get("SCYLLA_SHARDING_ALGORITHM", ["biased-token-round-robin"])
            port_text = options.get("SCYLLA_SHARD_AWARE_PORT", [""])[0]
        except (KeyError, IndexError, ValueError):
            return None
        if shards < 1 or algorithm[0] != "biased-token-round-robin":
            return None
        port = int(port_text) if port_text.isdigit() and 0 < int(port_text) < 65536 else None
        return cls(shards, ignore_msb, port)


class Node:
    """One upstream node: its address, reachability and back-off state.

    `reachable` is None until the first attempt. After a failure, no new connection is
    attempted before `retry_at` (loop time); the delay doubles per consecutive
    failure, from ``reconnect_delay`` up to ``reconnect_max_delay``.
    """

    __slots__ = (
        "connections", "data_center", "failures", "failures_logged", "host", "last_error",
        "name", "port", "rack", "reachable", "retry_at", "sharding", "tokens_known",
    )

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self.name = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self.reachable: bool | None = None
        self.failures = 0
        self.failures_logged = False
        self.sharding: Sharding | None = None
        self.retry_at = 0.0
        self.last_error: str | None = None
        self.tokens_known = False
        self.data_center: str | None = None
        self.rack: str | None = None
        self.connections = 0

    def __repr__(self) -> str:
        return f"<Node {self.name} reachable={self.reachable}>"

    def may_connect(self, now: float) -> bool:
        return self.reachable is not False or now >= self.retry_at


class Upstream:
    """Every upstream node, the token ring, role credentials, and the pools.

    Credentials: a role's SASL PLAIN token is kept in memory only (never logged), from
    the client login that Scylla accepted last, to open more connections for that
    role. Single event loop; `close` fails everything outstanding.
    """

    def __init__(
        self,
        config: SidecarConfig,
        *,
        on_event: Callable[[Frame], None] | None = None,
    ) -> None:
        self.config = config
        self.nodes = [Node(host, port) for host, port in config.upstream]
        self.ring = Ring()
        self.auth_required: bool | None = None
        self.authenticator = _DEFAULT_AUTHENTICATOR  # the class name Scylla announces
        self.on_event = on_event  # receives SCHEMA_CHANGE events from one connection
        self._tokens: dict[str, bytes | None] = {}
        # Cells of a node's system.local (name -> (CQL type, bytes)), kept up to date
        # by every system.local read a client makes: what ring members' rows say.
        self.local_row: dict[str, tuple[str, bytes]] = {}
        self._pools: OrderedDict[tuple[str, str | None], Pool] = OrderedDict()
        self._connecting = asyncio.Semaphore(_CONNECTING_AT_ONCE)
        self.logins = asyncio.Semaphore(config.max_logins)
        self._heartbeat: asyncio.TimerHandle | None = None
        self._ssl = _upstream_ssl(config)
        self._round_robin = itertools.count()
        self._reconnecting: dict[Node, asyncio.Task[None]] = {}
        self._fetching_tokens: set[Node] = set()
        self._event_connection: UpstreamConnection | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._reachable = asyncio.Event()
        self._closed = False
        self.errors = 0  # upstream failures seen, for the metrics
        self.timeouts = 0  # heartbeats left unanswered

    # -- life cycle ------------------------------------------------------------------

    async def start(self) -> None:
        """Probe every node once, concurrently. Never fails: nodes may come up later."""
        await asyncio.gather(*(self._probe(node) for node in self.nodes))
        for node in self.nodes:
            if not node.reachable:
                self._schedule_reconnect(node)
        self._heartbeat = asyncio.get_running_loop().call_later(
            self.config.heartbeat_interval, self._beat
        )

    async def close(self) -> None:
        """Close every connection and stop probing; outstanding requests fail."""
        self._closed = True
        if self._heartbeat is not None:
            self._heartbeat.cancel()
        for task in list(self._tasks):
            task.cancel()
        for pool in list(self._pools.values()):
            pool.close()
        self._pools.clear()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    # -- what the rest of the sidecar asks ---------------------------------------------

    def pool(self, role: str, keyspace: str | None) -> Pool:
        """A reference to the pool of `role` connections using `keyspace`.

        Pair every call with one `release`. Raises `UpstreamRefused` (OVERLOADED) when
        ``max_pools`` pools are in use and none is idle.
        """
        key = (role, keyspace)
        pools = self._pools
        pool = pools.get(key)
        if pool is None:
            if len(pools) >= self.config.max_pools and not self._close_idle_pool():
                raise UpstreamRefused(
                    f"{len(pools)} (role, keyspace) pools in use",
                    _error_body(0x1001, "the sidecar has too many keyspaces in use; "
                                        "retry later"),
                )
            pool = pools[key] = Pool(self, role, keyspace)
        else:
            pools.move_to_end(key)
        pool.refs += 1
        if pool.idle_timer is not None:
            pool.idle_timer.cancel()
            pool.idle_timer = None
        return pool

    def release(self, pool: Pool) -> None:
        """Give back a reference `pool` returned; idle pools close after a while."""
        pool.refs -= 1
        if pool.refs or self._closed:
            return
        if not pool.live:  # it never worked (no such keyspace?) or its node is down
            self._drop_pool(pool)
        else:
            pool.idle_timer = asyncio.get_running_loop().call_later(
                self.config.pool_idle_timeout, self._drop_pool, pool
            )

    @contextlib.contextmanager
    def borrow(self, role: str, keyspace: str | None) -> Iterator[Pool]:
        """`pool` for the length of a block."""
        pool = self.pool(role, keyspace)
        try:
            yield pool
        finally:
            self.release(pool)

    @property
    def connected(self) -> bool:
        """Some pooled connection is open (so what Scylla said of logins still holds:
        it changes only with a restart, which drops every connection)."""
        return any(pool.live for pool in self._pools.values())

    @property
    def pool_count(self) -> int:
        return len(self._pools)

    def _close_idle_pool(self) -> bool:
        for pool in self._pools.values():  # least recently used first
            if not pool.refs:
                self._drop_pool(pool)
                return True
        return False

    def _drop_pool(self, pool: Pool) -> None:
        if pool.refs:
            return
        if self._pools.get((pool.role, pool.keyspace)) is pool:
            del self._pools[(pool.role, pool.keyspace)]
        pool.close()

    def route(self, partition: bytes | None) -> tuple[Node | None, int | None]:
        """The node, and its shard, owning a serialized partition key (None: unknown;
        no token is computed when there is nothing to choose)."""
        if partition is None:
            return None, None
        if len(self.nodes) == 1:
            node: Node | None = self.nodes[0]
            if node is not None and node.sharding is None:
                return node, None  # nothing to choose: no token computed
            token = token_of(partition)
        else:
            token = token_of(partition)
            node = self.node_for_token(token)
        sharding = node.sharding if node is not None else None
        if sharding is None:
            return node, None
        return node, shard_of(token, sharding.shards, sharding.ignore_msb)

    def _learn_sharding(self, node: Node, options: dict[str, list[str]]) -> None:
        sharding = Sharding.from_supported(options)
        if sharding != node.sharding:
            if sharding is not None and sharding.port is not None and node.sharding is not None \
                    and node.sharding.port is None and node.sharding.shards == sharding.shards:
                return  # its shard-aware port failed us once: keep to the plain port
            node.sharding = sharding

    def node_for_token(self, token: int) -> Node | None:
        owner = self.ring.owner(token)
        return owner if isinstance(owner, Node) else None

    @property
    def any_reachable(self) -> bool:
        return any(node.reachable for node in self.nodes)

    async def wait_reachable(self) -> None:
        """Return once some node has answered a probe or a connection."""
        await self._reachable.wait()

    def health(self) -> dict[str, Any]:
        """Reachability per node, for ``/healthz``."""
        return {
            "reachable": self.any_reachable,
            "heartbeat_timeouts": self.timeouts,
            "nodes": {
                node.name: {
                    "reachable": bool(node.reachable),
                    "connections": node.connections,
                    **({"error": node.last_error} if node.last_error and not node.reachable
                       else {}),
                }
                for node in self.nodes
            },
        }

    def connections_by_node(self) -> dict[str, int]:
        return {node.name: node.connections for node in self.nodes}

    def credentials(self, role: str) -> bytes | None:
        """The SASL token `role` logged in with (None: none kept, or none needed)."""
        return self._tokens.get(role)

    def forget_credentials(self, role: str) -> None:
        self._tokens.pop(role, None)

    async def open_login(self) -> tuple[UpstreamConnection, Frame]:
        """A fresh connection to some reachable node, after STARTUP, and its reply.

        For relaying a client's login: the caller owns the connection and either
        gives it back with `adopt` or closes it. Raises `UpstreamUnavailable`.
        """
        errors: list[str] = []
        for node in self._candidates():
            try:
                conn = await self._connect_transport(node)
            except UpstreamUnavailable as exc:
                errors.append(str(exc))
                continue
            try:
                reply = await conn.startup(self.config.request_timeout)
            except UpstreamError as exc:
                conn.close()
                self._node_failed(node, str(exc))
                errors.append(str(exc))
                continue
            except BaseException:
                conn.close()
                raise
            self._node_ok(node)
            return conn, reply
        raise UpstreamUnavailable(_no_node_message(errors))

    async def learn_node(self, conn: UpstreamConnection) -> None:
        """Before `conn` serves anyone: learn its node's tokens and ``system.local`` cells
        if not known yet, so the first ``system.peers`` a driver reads is complete."""
        node = next((n for n in self.nodes if n.name == conn.node), None)
        if node is not None and (not node.tokens_known or not self.local_row):
            await self._fetch_tokens(node, conn)

    def adopt(self, conn: UpstreamConnection, role: str, token: bytes | None) -> None:
        """Take a logged-in connection into `role`'s pool; remember the role's token."""
        self._tokens[role] = token
        with self.borrow(role, None) as pool:
            pool.add(conn)

    # -- opening connections -----------------------------------------------------------

    def _candidates(self) -> list[Node]:
        now = asyncio.get_running_loop().time()
        nodes = [node for node in self.nodes if node.may_connect(now)]
        if nodes:
            start = next(self._round_robin) % len(nodes)
            nodes = nodes[start:] + nodes[:start]
        return nodes

    async def _connect_to_shard(self, node: Node, shard: int) -> UpstreamConnection:
        """A connection served by `shard` of `node`, through its shard-aware port.

        The local port decides the shard (``port % shards``); a port taken locally is
        tried again with another. If the shard-aware port fails while the ordinary port
        answers, the node is used through its ordinary port from then on (connections of
        unknown shard); if both fail, the node is down and nothing is given up.
        """
        sharding = node.sharding
        assert sharding is not None and sharding.port is not None
        n = sharding.shards
        for _ in range(16):
            local = random.randrange(_EPHEMERAL_LOW // n + 1, _EPHEMERAL_HIGH // n) * n + shard
            try:
                conn = await self._connect_transport(node, sharding.port, local)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    continue
                raise
            except UpstreamUnavailable:
                break
            conn.shard = shard
            return conn
        conn = await self._connect_transport(node)  # raises if the node itself is down
        if node.sharding is sharding:  # the node answers, its shard-aware port does not
            node.sharding = replace(sharding, port=None)
            _log.warning("%s: shard-aware port %d unusable; using the CQL port",
                         node.name, sharding.port)
        return conn

    async def _connect_transport(
        self, node: Node, port: int | None = None, local_port: int | None = None
    ) -> UpstreamConnection:
        config = self.config
        try:
            conn = await UpstreamConnection.connect(
                node.host, port or node.port, node=node.name, timeout=config.connect_timeout,
                ssl_context=self._ssl, server_hostname=node.host,
                max_frame_size=max(config.max_frame_size, 256 * 1024 * 1024),
                request_timeout=config.request_timeout, local_port=local_port,
            )
        except UpstreamUnavailable as exc:
            self._node_failed(node, str(exc))
            raise
        return conn  # reachable once it answers in CQL, not when TCP connects

    async def connect(
        self, node: Node, role: str, keyspace: str | None, shard: int | None = None
    ) -> UpstreamConnection:
        """A new connection to `node`, logged in as `role`, using `keyspace`.

        Raises `UpstreamUnavailable` if the node cannot be reached and
        `UpstreamRefused` if Scylla rejects the login or the keyspace.
        """
        if role not in self._tokens and self.auth_required:
            raise UpstreamRefused(
                f"no credentials for role {role!r}",
                _error_body(0x0100, "the sidecar holds no credentials for this role"),
            )
        async with self._connecting:
            conn = await self._connect_to_shard(node, shard) if shard is not None else (
                await self._connect_transport(node))
            try:
                await conn.login(self._tokens.get(role), self.config.request_timeout)
                self._node_ok(node)
                if keyspace is not None:
                    await conn.use(keyspace, self.config.request_timeout)
                await self.learn_node(conn)
            except BaseException as exc:
                conn.close()
                if isinstance(exc, UpstreamRefused) and conn.asked_for_credentials:
                    self.auth_required = True  # the node turned authentication on
                elif isinstance(exc, UpstreamError) and not isinstance(exc, UpstreamRefused):
                    self._node_failed(node, str(exc))
                raise
        conn.role = role
        conn.on_timeout = self._heartbeat_now
        return conn

    def _attached(self, node: Node, conn: UpstreamConnection) -> None:
        """A connection joined a pool: count it, maybe learn tokens, maybe get events."""
        node.connections += 1
        if not node.tokens_known and node not in self._fetching_tokens:
            self._fetching_tokens.add(node)
            self.spawn(self._fetch_tokens(node, conn))
        if self._event_connection is None and self.on_event is not None:
            self._listen_for_events(conn)

    def _detached(self, node: Node, conn: UpstreamConnection, unexpected: bool) -> None:
        node.connections -= 1
        if conn is self._event_connection:
            self._event_connection = None
            for pool in self._pools.values():
                other = pool.any_connection()
                if other is not None:
                    self._listen_for_events(other)
                    break
        if unexpected and not self._closed:
            # A lost connection makes the node's state unknown until a probe says more:
            # requests may still try it, but nobody waiting for reachability is told
            # it is up on the strength of the connection that just died.
            self.errors += 1
            node.tokens_known = False
            node.reachable = None
            if not self.any_reachable:
                self._reachable.clear()
            self._schedule_reconnect(node, at_once=True)

    def _listen_for_events(self, conn: UpstreamConnection) -> None:
        self._event_connection = conn
        conn.on_event = self.on_event
        conn.send(Opcode.REGISTER, _REGISTER_SCHEMA, 0, _ignore)

    async def _fetch_tokens(self, node: Node, conn: UpstreamConnection) -> None:
        try:
            reply = await conn.request(
                Opcode.QUERY, _LOCAL_TOKENS, timeout=self.config.request_timeout
            )
            if reply.opcode != Opcode.RESULT:
                return
            result = decode_result(reply.body)
            if not isinstance(result, ResultRows) or not result.rows:
                return
            row = dict(zip((c.name for c in result.metadata.columns), result.rows[0],
                           strict=True))
            types = {c.name: c.type for c in result.metadata.columns}
            for name, cell in row.items():
                if cell is not None and name != "tokens":
                    self.local_row.setdefault(name, (types[name].cql_name, cell))
            raw_tokens = row.get("tokens")
            tokens: Iterable[str] = (
                types["tokens"].deserialize(raw_tokens) if raw_tokens is not None else ()
            )
            for name in ("data_center", "rack"):
                cell = row.get(name)
                if cell is not None:
                    setattr(node, name, types[name].deserialize(cell))
            self.ring.set_tokens(node, (int(t) for t in tokens))
            node.tokens_known = True
        except (UpstreamError, ValueError, KeyError):
            pass  # learned on the next connection to this node
        finally:
            self._fetching_tokens.discard(node)

    # -- health ----------------------------------------------------------------------

    def _node_ok(self, node: Node) -> None:
        node.reachable = True
        node.failures = 0
        node.last_error = None
        self._reachable.set()

    def _node_failed(self, node: Node, error: str) -> None:
        loop = asyncio.get_running_loop()
        self.errors += 1
        node.reachable = False
        node.last_error = error
        node.failures += 1
        delay = self.config.backoff(node.failures)
        node.retry_at = loop.time() + delay
        if node.failures in (1, 10) or node.failures % 100 == 0:
            _log.warning("upstream node %s is down (%d failed attempts): %s",
                         node.name, node.failures, error)
            node.failures_logged = True
        if not self.any_reachable:
            self._reachable.clear()
        self._schedule_reconnect(node)

    async def _probe(self, node: Node) -> bool:
        try:
            conn = await self._connect_transport(node)
        except UpstreamUnavailable:
            return False
        timeout = self.config.connect_timeout
        try:
            reply = await conn.request(Opcode.OPTIONS, _OPTIONS_BODY, timeout=timeout)
            if reply.opcode != Opcode.SUPPORTED:
                self._node_failed(node, f"OPTIONS answered with opcode 0x{reply.opcode:02x}")
                return False
            with contextlib.suppress(Exception):
                self._learn_sharding(node, Supported.decode(reply.body).options)
            reply = await conn.request(Opcode.STARTUP, _STARTUP_BODY, timeout=timeout)
            self._node_ok(node)
        except UpstreamError as exc:
            self._node_failed(node, str(exc))
            return False
        finally:
            conn.close()
        self.learn_auth(reply)
        if node.failures_logged:
            _log.warning("upstream node %s is back", node.name)
            node.failures_logged = False
        return True

    def learn_auth(self, startup_reply: Frame) -> None:
        """What a node's answer to STARTUP says about authentication."""
        if startup_reply.opcode == Opcode.READY:
            self.auth_required = False
        elif startup_reply.opcode == Opcode.AUTHENTICATE:
            self.auth_required = True
            with contextlib.suppress(Exception):
                self.authenticator = Authenticate.decode(startup_reply.body).authenticator

    # -- heartbeats --------------------------------------------------------------------

    def _beat(self) -> None:
        """Probe every connection that has been quiet for a heartbeat interval."""
        loop = asyncio.get_running_loop()
        interval = self.config.heartbeat_interval
        quiet_since = loop.time() - interval
        for pool in list(self._pools.values()):
            for conn in list(pool.live):
                if conn.last_read <= quiet_since:
                    self._heartbeat_now(conn)
        self._heartbeat = loop.call_later(interval, self._beat)

    def _heartbeat_now(self, conn: UpstreamConnection) -> None:
        """OPTIONS on `conn`; dropped if unanswered within ``heartbeat_timeout``.

        Its own timer: the connection's request deadlines are in send order, and a
        heartbeat's short one must not wait behind requests' longer ones.
        """
        if conn.heartbeating or conn.closed:
            return
        conn.heartbeating = True
        timeout = self.config.heartbeat_timeout

        loop = asyncio.get_running_loop()
        sent = loop.time()
        timer: list[asyncio.TimerHandle] = []

        def expired() -> None:
            nonlocal sent
            if not conn.heartbeating or conn.closed:
                return
            if conn.last_read > sent:
                # Answers are flowing, only slowly (a queue ahead of the OPTIONS): the
                # node is alive, and dropping the connection would fail every request on
                # it. Look again after another heartbeat timeout.
                sent = loop.time()
                timer[0] = loop.call_later(timeout, expired)
                return
            conn.heartbeating = False
            self.timeouts += 1
            conn.abort(f"no answer to a heartbeat within {timeout:g}s")

        timer.append(loop.call_later(timeout, expired))

        def answered(outcome: object) -> None:
            conn.heartbeating = False
            timer[0].cancel()

        conn.send(Opcode.OPTIONS, _OPTIONS_BODY, 0, answered, timeout=None)

    def _schedule_reconnect(self, node: Node, *, at_once: bool = False) -> None:
        if self._closed or node in self._reconnecting:
            return
        self._reconnecting[node] = self.spawn(self._reconnect(node, at_once))

    async def _reconnect(self, node: Node, at_once: bool) -> None:
        loop = asyncio.get_running_loop()
        try:
            while not self._closed:
                if not at_once:
                    # Back-off between attempts (production pacing, not synchronisation).
                    await asyncio.sleep(max(0.0, node.retry_at - loop.time()))
                at_once = False
                if await self._probe(node):
                    break
        finally:
            self._reconnecting.pop(node, None)
        for pool in list(self._pools.values()):
            if pool.refs:
                pool.refill(node)

    def spawn(self, coro: Any) -> asyncio.Task[Any]:
        """Run `coro` as a task the upstream owns (cancelled by `close`)."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task


class Pool:
    """Connections of one ``(role, keyspace)`` to every node, opened on demand.

    `pick` never waits: it returns an open connection (to `node` when it has one,
    otherwise round-robin over the others) or None, and starts opening connections up
    to the configured count in the background. `acquire` waits for the first one when
    there is none yet. Connections that close leave the pool by themselves.
    """

    def __init__(self, upstream: Upstream, role: str, keyspace: str | None) -> None:
        self.upstream = upstream
        self.role = role
        self.keyspace = keyspace
        self.target = upstream.config.connections_per_node
        self._by_node: dict[Node, list[UpstreamConnection]] = {n: [] for n in upstream.nodes}
        self._by_shard: dict[tuple[Node, int], UpstreamConnection] = {}
        self.live: list[UpstreamConnection] = []  # open connections, any node
        self.refs = 0  # clients (and borrowers) using the pool
        self.idle_timer: asyncio.TimerHandle | None = None
        self._opening: dict[Node, asyncio.Task[UpstreamConnection]] = {}
        self._short = set(upstream.nodes)  # nodes below `target` connections
        self._turn = 0
        self._closed = False

    def __repr__(self) -> str:
        return f"<Pool role={self.role!r} keyspace={self.keyspace!r} live={len(self.live)}>"

    def pick(self, node: Node | None = None, shard: int | None = None
             ) -> UpstreamConnection | None:
        """An open connection, preferring `node` (and its `shard`); None if there is none
        right now.

        A connection whose 32,768 stream ids are all taken is passed over; when every
        one is, the pool grows (up to 4x ``connections_per_node`` per node) and None
        makes the caller wait for the new connection.
        """
        if self._short:
            for short in list(self._short):
                self._open(short)
        conn: UpstreamConnection | None = None
        if shard is not None and node is not None:
            conn = self._by_shard.get((node, shard))
        if conn is None and node is not None:
            conns = self._by_node.get(node)
            if conns:
                conn = conns[0] if len(conns) == 1 else min(conns, key=_in_flight)
        if conn is None:
            live = self.live
            if not live:
                return None
            self._turn += 1
            conn = live[self._turn % len(live)]
        if conn.has_free_stream:
            return conn
        spare = next((c for c in self.live if c.has_free_stream), None)
        if spare is not None:
            return spare
        if self.target >= 4 * self.upstream.config.connections_per_node:
            return conn  # at the ceiling: this request fails "no free stream", alone
        self.target += 1
        self._short.update(self._by_node)
        for short in list(self._short):
            self._open(short)
        return None

    async def for_keyspace(self, conn: UpstreamConnection, keyspace: str | None
                           ) -> UpstreamConnection | None:
        """A connection to the node behind `conn` using `keyspace` (to prepare there);
        None if that node has none to give."""
        if conn.keyspace == keyspace and not conn.closed:
            return conn
        node = self._node_named(conn.node)
        with self.upstream.borrow(self.role, keyspace) as other:
            target = await other.acquire(node)
        return target if target.node == conn.node else None

    def any_connection(self) -> UpstreamConnection | None:
        return self.live[0] if self.live else None

    async def acquire(self, node: Node | None = None) -> UpstreamConnection:
        """An open connection, waiting for one to open if needed.

        Raises `UpstreamUnavailable` when no node can be reached (or all are backing
        off) and `UpstreamRefused` when Scylla rejects this role or keyspace.
        """
        error: UpstreamError | None = None
        while True:
            conn = self.pick(node)
            if conn is not None:
                return conn
            waiting = [self._opening[n] for n in ([node] if node in self._opening else [])]
            waiting = waiting or list(self._opening.values())
            if not waiting:
                if error is not None:
                    raise error
                raise UpstreamUnavailable(_no_node_message(
                    [n.last_error for n in self.upstream.nodes if n.last_error]
                ))
            done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if task.cancelled():
                    continue  # the pool is closing; the loop ends with no opener left
                exc = task.exception()
                if isinstance(exc, UpstreamRefused):
                    raise exc
                if isinstance(exc, UpstreamError):
                    error = exc
            node = None  # the preferred node failed: any node will do

    def add(self, conn: UpstreamConnection) -> None:
        """Take an already logged-in connection (closing it if the pool is full)."""
        node = self._node_named(conn.node)
        if node is None or self._closed or (
                len(self._by_node[node]) >= self.target and self._full(node)):
            conn.close()
            return
        self._attach(node, conn)

    def refill(self, node: Node) -> None:
        """Open connections to `node` again (it came back)."""
        if node in self._by_node and not self._full(node):
            self._short.add(node)
            self._open(node)

    def close(self) -> None:
        self._closed = True
        if self.idle_timer is not None:
            self.idle_timer.cancel()
            self.idle_timer = None
        for task in self._opening.values():
            task.cancel()
        for conn in list(self.live):
            conn.close()

    # -- internals ----------------------------------------------------------------------

    def _node_named(self, name: str) -> Node | None:
        for node in self._by_node:
            if node.name == name:
                return node
        return None

    def _full(self, node: Node) -> bool:
        """`node` has its connections: one per shard when it has a shard-aware port."""
        sharding = node.sharding
        if sharding is not None and sharding.port is not None:
            return self._missing_shard(node, sharding.shards) is None
        return len(self._by_node[node]) >= self.target

    def _missing_shard(self, node: Node, shards: int) -> int | None:
        by_shard = self._by_shard
        return next((s for s in range(shards) if (node, s) not in by_shard), None)

    def _open(self, node: Node) -> None:
        if node in self._opening or self._closed or self.upstream._closed:
            return
        if self._full(node):
            self._short.discard(node)
            return
        if not node.may_connect(asyncio.get_running_loop().time()):
            return
        sharding = node.sharding
        shard = None
        if sharding is not None and sharding.port is not None:
            shard = self._missing_shard(node, sharding.shards)
        task = self.upstream.spawn(
            self.upstream.connect(node, self.role, self.keyspace, shard))
        self._opening[node] = task
        task.add_done_callback(lambda t: self._opened(node, t))

    def _opened(self, node: Node, task: asyncio.Task[UpstreamConnection]) -> None:
        self._opening.pop(node, None)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            return  # the node is backing off; `acquire` callers saw the error
        conn = task.result()
        if self._closed:
            conn.close()
            return
        self._attach(node, conn)
        if not self._full(node):
            self._open(node)

    def _attach(self, node: Node, conn: UpstreamConnection) -> None:
        conns = self._by_node[node]
        conns.append(conn)
        self.live.append(conn)
        if conn.shard is not None:
            self._by_shard.setdefault((node, conn.shard), conn)
        if self._full(node):
            self._short.discard(node)
        conn.on_close = lambda c: self._detach(node, c)
        self.upstream._attached(node, conn)

    def _detach(self, node: Node, conn: UpstreamConnection) -> None:
        with contextlib.suppress(ValueError):
            self._by_node[node].remove(conn)
        with contextlib.suppress(ValueError):
            self.live.remove(conn)
        if conn.shard is not None and self._by_shard.get((node, conn.shard)) is conn:
            del self._by_shard[(node, conn.shard)]
        if not self._closed:
            self._short.add(node)
        self.upstream._detached(node, conn, unexpected=not self._closed)


def _in_flight(conn: UpstreamConnection) -> int:
    return conn.in_flight


def _ignore(outcome: object) -> None:
    return None


def _error_body(code: int, message: str) -> bytes:
    return Error(code, message).encode()


def _no_node_message(errors: list[str]) -> str:
    detail = f" (last error: {errors[-1]})" if errors else ""
    return f"no upstream node reachable{detail}"


def _upstream_ssl(config: SidecarConfig) -> ssl.SSLContext | None:
    if not config.upstream_tls:
        return None
    context = ssl.create_default_context(
        cafile=str(config.upstream_ca) if config.upstream_ca is not None else None
    )
    if not config.upstream_verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context
