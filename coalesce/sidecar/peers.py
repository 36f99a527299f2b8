"""Connections to the other sidecars of the ring, and what travels on them.

A sidecar sends a merged read it does not own to the owner as an ordinary CQL
client would, over a connection logged in **as the reading client's role** with the
credentials Scylla accepted for that role (the owner relays the login to Scylla, which
verifies it, as for any client): a member never claims a role it did not prove, and an
answer is shared only inside one role on every member.

Two kinds of request carry a custom payload of ours (the CQL way to add to a request):

- a read with the **hop marker** (`HOP`, the payload ``{"coalesce-hop": ""}``): the
  receiving member serves it itself, never forwards it again, so two members whose
  views of the ring disagree cannot send a read in circles. Any client may send the
  marker; all it does is keep its read on the member it reached;
- a **forget** (`forget_frame`): after a write completes at one member, and before its
  client hears of it, every other member forgets the flights the write makes stale,
  exactly as the writing member did (`FreshnessIndex.written_by`), so a read through
  any member afterwards starts fresh. It is answered at once; its only effect is that
  later reads start fresh, no more than the write itself causes.

A member that cannot be reached (refused, or no answer within ``peer_timeout``), or
that stops answering on an open connection (a forget unanswered within
``peer_timeout``, a read within ``request_timeout + peer_timeout``), is left alone
for a back-off that doubles per failure (``reconnect_delay`` up to
``reconnect_max_delay``); meanwhile reads it owns are served by the member that got
them. A member that refuses a role's login is not backed off (it serves other
roles), but that role's pool does not try it again before a back-off of its own.
Connections are opened on demand, one per (member, role, keyspace), at most
``max_pools`` (role, keyspace) pools, least recently used closed first. Single event
loop.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import OrderedDict
from collections.abc import Sequence
from functools import partial
from typing import TYPE_CHECKING, Any, Final

from coalesce.cql import CUSTOM_PAYLOAD, Opcode
from coalesce.cql._wire import w_bytes_map
from coalesce.cql.classify import StatementInfo
from coalesce.sidecar.config import SidecarConfig
from coalesce.sidecar.connection import UpstreamConnection
from coalesce.sidecar.errors import (
    UpstreamError,
    UpstreamRefused,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from coalesce.sidecar.members import Member, SidecarRing

if TYPE_CHECKING:
    from coalesce.sidecar.upstream import Upstream

__all__ = ["FORGET_PREFIX", "HOP", "PeerPool", "Peers", "forget_frame", "read_forget"]

_log = logging.getLogger(__name__)

HOP: Final = w_bytes_map({"coalesce-hop": b""})
"""The custom payload of a read forwarded to its owner (the whole payload, byte for byte)."""

_FORGET_KEY: Final = "coalesce-forget"
FORGET_PREFIX: Final = b"\x00\x01" + len(_FORGET_KEY).to_bytes(2, "big") + _FORGET_KEY.encode()
"""How the body of a forget starts (a one-entry payload with our key)."""
_MAX_FORGET: Final = 64 * 1024


def forget_frame(info: StatementInfo, keyspace: str | None, partition: bytes | None,
                 avoid: Sequence[str] = ()) -> bytes:
    """The body of a QUERY telling a member what a completed write made stale, and which
    members missed hearing it (`avoid`: send them no read for ``request_timeout``)."""
    message = {
        "kind": info.kind, "keyspace": info.keyspace, "table": info.table,
        "tables": [list(t) for t in info.tables], "session_keyspace": keyspace,
        "partition": partition.hex() if partition is not None else None,
        "avoid": list(avoid),
    }
    return w_bytes_map({_FORGET_KEY: json.dumps(message, separators=(",", ":")).encode()})


_NOTHING_WRITTEN: Final = StatementInfo("select")


def read_forget(body: bytes
                ) -> tuple[StatementInfo, str | None, bytes | None, tuple[str, ...]] | None:
    """What a forget says (`forget_frame`), None if `body` is not one we can read."""
    if not body.startswith(FORGET_PREFIX) or len(body) > _MAX_FORGET:
        return None
    at = len(FORGET_PREFIX)
    size = int.from_bytes(body[at:at + 4], "big", signed=True)
    raw = body[at + 4:at + 4 + size]
    if size < 0 or len(raw) != size:
        return None
    try:
        message = json.loads(raw)
        tables = tuple((_text(k), _req_text(t)) for k, t in message["tables"])
        info = StatementInfo(_req_text(message["kind"]), _text(message["keyspace"]),
                             _text(message["table"]), tables=tables)
        partition = message["partition"]
        avoid = tuple(_req_text(name) for name in message.get("avoid", ()))
        return (info, _text(message["session_keyspace"]),
                None if partition is None else bytes.fromhex(_req_text(partition)), avoid)
    except (ValueError, KeyError, TypeError, RecursionError):  # deep nesting: RecursionError
        return None


def _text(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise TypeError("expected text")


def _req_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    raise TypeError("expected text")


class Peers:
    """The ring's other members as this sidecar reaches them; `errors` counts failed
    requests to them."""

    def __init__(self, config: SidecarConfig, upstream: Upstream, ring: SidecarRing) -> None:
        self.config = config
        self.upstream_of_roles = upstream  # whose credentials open connections
        self.ring = ring
        self.errors = 0
        self._pools: OrderedDict[tuple[str, str | None], PeerPool] = OrderedDict()
        self._failures: dict[str, int] = {}
        self._retry_at: dict[str, float] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = False
        self._watch: asyncio.TimerHandle | None = None

    # -- liveness ------------------------------------------------------------------------

    def watch(self) -> None:
        """Look after open peer connections (see `_check`) while there are any."""
        if self._watch is None and not self._closed:
            self._watch = asyncio.get_running_loop().call_later(
                self.config.peer_timeout / 2, self._check)

    def _check(self) -> None:
        """A connection with requests outstanding and nothing read for ``peer_timeout``
        is sent an OPTIONS, which a live member answers at once however slow Scylla is;
        unanswered within ``peer_timeout`` it times out, and the member is left alone
        (`PeerPool._timed_out`): a frozen member costs a read at most about twice
        ``peer_timeout`` before it is served here."""
        self._watch = None
        limit = self.config.peer_timeout
        quiet_since = asyncio.get_running_loop().time() - limit
        any_open = False
        for pool in list(self._pools.values()):
            for conn in pool.connections():
                any_open = True
                if conn.in_flight and conn.last_read <= quiet_since and not conn.heartbeating:
                    self._ping(pool, conn)
        if any_open:
            self.watch()

    def _ping(self, pool: PeerPool, conn: UpstreamConnection) -> None:
        # A timer of its own: the connection's deadlines run in send order, and this
        # short one must not wait behind the reads' longer ones.
        loop = asyncio.get_running_loop()
        conn.heartbeating = True
        timer = loop.call_later(self.config.peer_timeout, self._silent, pool, conn)
        conn.send(Opcode.OPTIONS, b"", 0, partial(_answered, conn, timer), timeout=None)

    def _silent(self, pool: PeerPool, conn: UpstreamConnection) -> None:
        if not conn.heartbeating or conn.closed:
            return
        conn.heartbeating = False
        member = self.ring.member(conn.node)
        if member is None:
            conn.close("the ring member left")
        else:
            pool._timed_out(member, conn)

    # -- for `Exchange` ----------------------------------------------------------------

    def spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- pools ---------------------------------------------------------------------------

    def pool(self, role: str, keyspace: str | None) -> PeerPool:
        """The connections of `role` using `keyspace` to every member."""
        key = (role, keyspace)
        pool = self._pools.get(key)
        if pool is None:
            while len(self._pools) >= self.config.max_pools:
                _, oldest = self._pools.popitem(last=False)
                oldest.close()
            pool = self._pools[key] = PeerPool(self, role, keyspace)
        else:
            self._pools.move_to_end(key)
        return pool

    def reachable(self, member: Member) -> bool:
        """Not backing off after a failure to reach it."""
        retry_at = self._retry_at.get(member.name)
        return retry_at is None or asyncio.get_running_loop().time() >= retry_at

    def member_left(self, member: Member) -> None:
        """Close every connection to a member that left the ring."""
        self._failures.pop(member.name, None)
        self._retry_at.pop(member.name, None)
        for pool in self._pools.values():
            pool.drop(member.name)

    def _failed(self, member: Member, error: UpstreamError) -> None:
        failures = self._failures[member.name] = self._failures.get(member.name, 0) + 1
        delay = self.config.backoff(failures)
        self._retry_at[member.name] = asyncio.get_running_loop().time() + delay
        if failures in (1, 10) or failures % 100 == 0:
            _log.warning("ring member %s unreachable (%d attempts), its reads are served "
                         "here: %s", member.name, failures, error)

    def _ok(self, member: Member) -> None:
        if self._failures.pop(member.name, None):
            _log.warning("ring member %s reachable again", member.name)
        self._retry_at.pop(member.name, None)

    async def connect(self, member: Member, role: str, keyspace: str | None
                      ) -> UpstreamConnection:
        """A new connection to `member`, logged in as `role`, using `keyspace`."""
        config = self.config
        timeout = config.peer_timeout
        upstream = self.upstream_of_roles
        try:
            conn = await UpstreamConnection.connect(
                member.host, member.port, node=member.name, timeout=timeout,
                max_frame_size=max(config.max_frame_size, 256 * 1024 * 1024),
                # The owner answers its own upstream timeout by then: past this, it is
                # the member that does not answer (`PeerPool._timed_out`).
                request_timeout=config.request_timeout + timeout)
            try:
                async with asyncio.timeout(timeout):
                    await conn.login(upstream.credentials(role), timeout)
                    if keyspace is not None:
                        await conn.use(keyspace, timeout)
            except TimeoutError:
                conn.close()
                raise UpstreamUnavailable(
                    f"{member.name}: no login within {timeout:g}s") from None
            except BaseException:
                conn.close()
                raise
        except UpstreamRefused:
            raise  # the member answers; it (or Scylla) refused this role or keyspace
        except UpstreamError as exc:
            self._failed(member, exc)
            raise
        self._ok(member)
        conn.role = role
        return conn

    # -- forgets ---------------------------------------------------------------------------

    async def forget_everywhere(self, role: str, body: bytes) -> int:
        """Send a forget to every other member and wait (``peer_timeout`` at most) for
        their answers; return how many did not confirm it (backing off ones included).

        A member that missed it may still answer reads with a flight older than the
        write: this member and every member that confirmed are told to send it no read
        for ``request_timeout`` (the longest such a flight lives), so a read after the
        write, through any of them, is read fresh where it lands.
        """
        members = self.ring.others
        others = [m for m in members if self.reachable(m)]
        missed = [m.name for m in members if not self.reachable(m)]
        confirmed: list[Member] = []
        if others:
            pool = self.pool(role, None)
            results = await asyncio.gather(*(pool.tell(m, body) for m in others))
            confirmed = [m for m, ok in zip(others, results, strict=True) if ok]
            missed += [m.name for m, ok in zip(others, results, strict=True) if not ok]
        if missed:
            self.avoid(missed)
            if confirmed:
                notice = forget_frame(_NOTHING_WRITTEN, None, None, missed)
                pool = self.pool(role, None)
                await asyncio.gather(*(pool.tell(m, notice) for m in confirmed))
        return len(missed)

    def avoid(self, names: Sequence[str]) -> None:
        """Send no read to the members `names` for ``request_timeout``: they missed a
        forget (see `forget_everywhere`). Names not in the ring, or this sidecar's own,
        are ignored."""
        until = asyncio.get_running_loop().time() + self.config.request_timeout
        for name in names:
            if name != self.ring.me and name in self.ring:
                self._retry_at[name] = max(self._retry_at.get(name, 0.0), until)

    async def close(self) -> None:
        self._closed = True
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)


class PeerPool:
    """Connections of one (role, keyspace) to the members: one each, opened on demand.

    The surface `Exchange` uses (`pick`, `acquire`, `for_keyspace`, `upstream`), with
    members as its nodes: `pick` only ever returns a connection to the member asked
    for, never another, since only the owner merges.
    """

    def __init__(self, peers: Peers, role: str, keyspace: str | None) -> None:
        self.upstream = peers
        self.role = role
        self.keyspace = keyspace
        self._conns: dict[str, UpstreamConnection] = {}
        self._opening: dict[str, asyncio.Task[UpstreamConnection]] = {}
        # Member -> (logins it refused in a row, when to try again).
        self._refused: dict[str, tuple[int, float]] = {}
        self._closed = False

    def __repr__(self) -> str:
        return f"<PeerPool role={self.role!r} keyspace={self.keyspace!r}>"

    def pick(self, node: Any = None, shard: int | None = None) -> UpstreamConnection | None:
        """The open connection to member `node` if it takes one more read (`_takes`),
        else None (and one being opened if none is)."""
        conn = self._open_conn(node)
        return conn if conn is not None and self._takes(conn) else None

    async def acquire(self, node: Any = None) -> UpstreamConnection:
        """The connection to member `node` for one more read, once open; raises
        `UpstreamError` (so that the read is served here) if it does not take one."""
        conn = await self._connection(node)
        if not self._takes(conn):
            raise UpstreamUnavailable(f"{conn.node}: as many requests in flight as it takes")
        return conn

    def _takes(self, conn: UpstreamConnection) -> bool:
        """Whether `conn` takes one more read rather than it be served here: it has a
        free stream id and fewer requests in flight than the owner takes from one client
        (``max_client_requests``, the same on every member) less one. Past that the owner
        stops reading the connection, and a read or a forget sent behind would wait for
        the ones before it."""
        return (conn.has_free_stream
                and conn.in_flight < self.upstream.config.max_client_requests - 1)

    def _open_conn(self, node: Any) -> UpstreamConnection | None:
        """The open connection to member `node`, None (and one being opened) if none."""
        if not isinstance(node, Member):
            return None
        conn = self._conns.get(node.name)
        if conn is None or conn.closed:
            self._open(node)
            return None
        return conn

    async def _connection(self, node: Any) -> UpstreamConnection:
        """The connection to member `node` (however busy), once open."""
        if not isinstance(node, Member):
            raise UpstreamUnavailable("no ring member to send to")
        conn = self._open_conn(node)
        if conn is not None:
            return conn
        task = self._opening.get(node.name)
        if task is None:
            raise UpstreamUnavailable(f"{node.name}: backing off after a failure")
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise  # this caller is cancelled
            # The login was given up: the pool evicted (past max_pools), the member gone.
            raise UpstreamUnavailable(f"{node.name}: the connection was given up") from None

    async def for_keyspace(self, conn: UpstreamConnection, keyspace: str | None
                           ) -> UpstreamConnection | None:
        """A connection to the member behind `conn` using `keyspace` (to prepare there)."""
        if conn.keyspace == keyspace and not conn.closed:
            return conn
        member = self.upstream.ring.member(conn.node)
        if member is None:
            return None
        return await self.upstream.pool(self.role, keyspace).acquire(member)

    async def tell(self, member: Member, body: bytes) -> bool:
        """Send a forget to `member`; whether it answered within ``peer_timeout``."""
        pool, conn = self, None
        try:
            async with asyncio.timeout(self.upstream.config.peer_timeout):
                while True:
                    try:
                        # Answered at once, a forget may go where a read may not.
                        conn = await pool._connection(member)
                        reply = await conn.request(Opcode.QUERY, body, CUSTOM_PAYLOAD)
                        break
                    except UpstreamError:
                        if pool is not self or not self._closed or self.upstream._closed:
                            raise
                        # Evicted meanwhile (past max_pools): once more, on a pool of its own.
                        pool, conn = self.upstream.pool(self.role, self.keyspace), None
        except TimeoutError:
            if conn is not None:  # logged in, and now a forget goes unanswered
                pool._timed_out(member, conn)
            return False
        except UpstreamError:
            return False
        return reply.opcode == Opcode.RESULT

    def drop(self, name: str) -> None:
        conn = self._conns.pop(name, None)
        if conn is not None:
            conn.close("the member left the ring")
        task = self._opening.pop(name, None)
        if task is not None:
            task.cancel()

    def close(self) -> None:
        self._closed = True
        for task in self._opening.values():
            task.cancel()
        self._opening.clear()
        conns, self._conns = self._conns, {}
        for conn in conns.values():
            conn.close()

    def _open(self, member: Member) -> None:
        peers = self.upstream
        if (member.name in self._opening or self._closed or peers._closed
                or not peers.reachable(member)):
            return
        refused = self._refused.get(member.name)
        if refused is not None and asyncio.get_running_loop().time() < refused[1]:
            return  # it refused this role (or keyspace) lately: reads are served here
        task = peers.spawn(peers.connect(member, self.role, self.keyspace))
        self._opening[member.name] = task
        task.add_done_callback(lambda t: self._opened(member, t))

    def _opened(self, member: Member, task: asyncio.Task[UpstreamConnection]) -> None:
        if self._opening.get(member.name) is task:
            del self._opening[member.name]
        if task.cancelled():
            return
        if isinstance(task.exception(), UpstreamRefused):
            # The member answers, and refuses this role: not tried again for every read
            # (each try is a login at Scylla), but after a back-off of this pool's own.
            count = self._refused.get(member.name, (0, 0.0))[0] + 1
            delay = self.upstream.config.backoff(count)
            self._refused[member.name] = (count, asyncio.get_running_loop().time() + delay)
        if task.exception() is not None:
            return
        self._refused.pop(member.name, None)
        conn = task.result()
        if self._closed or self.upstream.ring.member(member.name) is None:
            conn.close()
            return
        old = self._conns.get(member.name)
        if old is not None:
            old.close()
        self._conns[member.name] = conn
        conn.on_close = self._closed_one
        conn.on_timeout = lambda c: self._timed_out(member, c)
        self.upstream.watch()

    def connections(self) -> list[UpstreamConnection]:
        return [conn for conn in self._conns.values() if not conn.closed]

    def _timed_out(self, member: Member, conn: UpstreamConnection) -> None:
        """`member` stopped answering on `conn` (frozen, SIGSTOPped): close it, and leave
        the member alone for its back-off as if it could not be reached."""
        conn.close("the ring member stopped answering")
        self.upstream._failed(member, UpstreamTimeout(f"{member.name}: stopped answering"))

    def _closed_one(self, conn: UpstreamConnection) -> None:
        if self._conns.get(conn.node) is conn:
            del self._conns[conn.node]


def _answered(conn: UpstreamConnection, timer: asyncio.TimerHandle, outcome: object) -> None:
    conn.heartbeating = False
    timer.cancel()
