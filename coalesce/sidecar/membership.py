"""Who the ring's members are: a static list, DNS records, or etcd leases.

A `Membership` tells a sidecar the names of the ring's members (their advertised
addresses, ``host:port``, see `member_name`) by calling ``on_change(names)`` with the
whole current list, sorted, every time it changes and the first time it is known.
Every member computes the same ring from the same names, so the source only has to
agree on names; it never decides ownership itself. `membership_for` builds one from
the settings:

- ``peers`` (`StaticMembership`): the list as given, delivered once. A sidecar that
  is not in its own list owns nothing and forwards everything: that is logged, not an
  error.
- ``membership = "dns://NAME[:PORT][?nameserver=HOST[:PORT]]"`` (`DnsMembership`): the
  A and AAAA records of NAME, each with PORT (default: this sidecar's own advertised
  port), resolved again every ``membership_interval``; a Kubernetes headless service
  is the use case. A NAME that starts with ``_`` (``_cql._tcp.coalesce.ns.svc``) is
  looked up as SRV instead: each record's target (resolved to its addresses) and port
  is a member. ``nameserver`` asks that server (port 53 unless given) instead of the
  system's resolver configuration. A lookup that fails (timeout, SERVFAIL) keeps the
  last view; a name that does not exist (NXDOMAIN) is an empty ring.
- ``membership = "etcd://HOST:PORT[/PREFIX]"`` (`EtcdMembership`): the member puts
  ``PREFIX + me`` bound to a lease of ``lease_ttl`` seconds, keeps the lease alive and
  watches the prefix (default ``/coalesce/ring/``). A member that dies leaves every
  other view when its lease expires, one that closes revokes its lease and leaves at
  once. A member that cannot renew its lease (etcd unreachable, or the lease expired)
  takes itself out of its own view before etcd can expire the lease, so it never
  claims ranges the others have already given away, and keeps trying to register
  again.

Each needs only its own extra: dnspython for DNS, aetcd for etcd (``coalesce[ring]``);
they are imported when such a source is built. Everything runs on the event loop that
called `Membership.start`; every network step has a timeout and every retry backs off.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import importlib.metadata
import json
import logging
import math
import random
from collections.abc import Callable, Iterable
from typing import Any, Final
from urllib.parse import parse_qsl, urlsplit

from coalesce.sidecar.advertised import host_id_for
from coalesce.sidecar.config import Address, SidecarConfig, parse_address
from coalesce.sidecar.errors import ConfigError
from coalesce.sidecar.members import member_name

__all__ = [
    "DEFAULT_ETCD_PREFIX",
    "START_TIMEOUT",
    "DnsMembership",
    "EtcdMembership",
    "Membership",
    "OnChange",
    "StaticMembership",
    "membership_for",
]

_log = logging.getLogger(__name__)

OnChange = Callable[[tuple[str, ...]], None]
"""Receives the whole list of member names, sorted, on the event loop."""

DEFAULT_ETCD_PREFIX: Final = "/coalesce/ring/"
START_TIMEOUT: Final = 3.0
"""How long `Membership.start` waits for a first view from DNS or etcd."""

_DNS_LIFETIME: Final = 2.0  # one query, its retries included
_ETCD_PORT: Final = 2379
_RETRY_FIRST: Final = 0.1  # etcd: back-off between attempts to register, doubling
_RETRY_MAX: Final = 2.0
_STOP_WAIT: Final = 2.0  # close(): how long the background task gets to end, a try
_HOLD: Final = 0.75  # of a lease's TTL, counted from the renewal's send: after that
# without another renewal the lease may be about to expire in etcd, and this member
# stops counting itself in


class Membership(abc.ABC):
    """A source of the ring's member names, delivered to ``on_change``.

    ``on_change`` is called on the event loop, only between `start` and `close`, with
    the sorted tuple of every name, whenever that tuple changes (so also the first
    time). An exception it raises is logged and does not stop the source. `view` is
    what it was last given: None before the first view.
    """

    def __init__(self, me: str, on_change: OnChange) -> None:
        parse_address(me, default_port=0)  # a bad name fails here, not later
        self.me = me
        self._on_change = on_change
        self._view: tuple[str, ...] | None = None
        self._closed = False

    @property
    def view(self) -> tuple[str, ...] | None:
        return self._view

    @abc.abstractmethod
    async def start(self) -> None:
        """Begin; return once the first view was delivered, or after a bounded wait
        (`START_TIMEOUT`) if the source cannot be reached, which is then retried in
        the background. Never raises for an unreachable source."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Stop: no task is left running and ``on_change`` is not called again."""

    def _deliver(self, names: Iterable[str]) -> None:
        view = tuple(sorted(set(names)))
        if self._closed or view == self._view:
            return
        self._view = view
        try:
            self._on_change(view)
        except Exception:
            _log.exception("membership: the on_change callback failed")


class StaticMembership(Membership):
    """A fixed list of names (the ``peers`` setting), delivered once by `start`."""

    def __init__(self, names: Iterable[str], me: str, on_change: OnChange) -> None:
        super().__init__(me, on_change)
        self.names = tuple(dict.fromkeys(names))
        for name in self.names:
            parse_address(name, default_port=0)

    async def start(self) -> None:
        if self.me not in self.names:
            _log.warning("membership: this sidecar (%s) is not among the peers %s: it owns "
                         "no partition and forwards every merged read", self.me,
                         ", ".join(self.names))
        self._deliver(self.names)

    async def close(self) -> None:
        self._closed = True


class _Background(Membership):
    """A source kept up to date by one task, from `start` to `close`."""

    def __init__(self, me: str, on_change: OnChange, start_timeout: float) -> None:
        super().__init__(me, on_change)
        self._start_timeout = start_timeout
        self._task: asyncio.Task[None] | None = None
        self._known = asyncio.Event()  # set once a view was delivered

    async def start(self) -> None:
        if self._task is not None or self._closed:
            raise RuntimeError("a membership source starts once")
        self._task = asyncio.get_running_loop().create_task(
            self._run(), name=f"membership {self!r}")
        try:
            await asyncio.wait_for(self._known.wait(), self._start_timeout)
        except TimeoutError:
            _log.warning("membership: no view from %r after %gs; starting without one and "
                         "trying on in the background", self, self._start_timeout)

    async def close(self) -> None:
        self._closed = True
        self._known.set()  # a start() still waiting returns
        task, self._task = self._task, None
        if task is not None:
            await _stop(task, _STOP_WAIT)

    @abc.abstractmethod
    async def _run(self) -> None: ...


# -- DNS ----------------------------------------------------------------------------------


class _LookupFailed(Exception):
    """A DNS lookup that said nothing about the name (timeout, SERVFAIL, refused)."""


class DnsMembership(_Background):
    """Members from the A/AAAA (or, for a name starting with ``_``, SRV) records of a name.

    The name is looked up every `interval` seconds; each query is bounded by
    `lifetime` seconds, a whole lookup (SRV, then its targets) by three times that.
    Queries go to the server sequentially, except that the targets of SRV records
    are looked up concurrently. A change of the set of names is delivered; a failed lookup
    keeps the last view (logged once until one succeeds again). `nameserver` is the
    DNS server to ask; None: the system's configuration (``/etc/resolv.conf``, with
    its search domains, so a short Kubernetes service name works).
    """

    def __init__(
        self,
        name: str,
        *,
        me: str,
        on_change: OnChange,
        port: int | None = None,
        interval: float = 1.0,
        nameserver: Address | None = None,
        lifetime: float = _DNS_LIFETIME,
        start_timeout: float = START_TIMEOUT,
    ) -> None:
        super().__init__(me, on_change, start_timeout)
        try:
            import dns.asyncresolver
        except ImportError:
            raise ConfigError("dns:// membership needs dnspython: install coalesce[ring]") \
                from None
        self.name = name
        self.port = port if port is not None else parse_address(me, default_port=0)[1]
        self.srv = name.startswith("_")
        self.interval = interval
        self.lifetime = lifetime
        if nameserver is None:
            try:
                self._resolver = dns.asyncresolver.Resolver()
            except Exception as exc:  # no /etc/resolv.conf, or one with no nameserver
                raise ConfigError(f"dns:// membership: no resolver configuration ({exc}); "
                                  "give ?nameserver=HOST[:PORT]") from None
        else:
            self._resolver = dns.asyncresolver.Resolver(configure=False)
            self._resolver.nameservers = [nameserver[0]]
            self._resolver.port = nameserver[1]
        self._failing = False
        self._missing = False

    def __repr__(self) -> str:
        return f"<DnsMembership {'SRV' if self.srv else 'A/AAAA'} {self.name}>"

    async def _run(self) -> None:
        while not self._closed:
            try:
                async with asyncio.timeout(3 * self.lifetime):  # SRV, then A and AAAA
                    names = await self._lookup()
            except Exception as exc:  # _LookupFailed, TimeoutError, OSError
                if not self._failing:
                    _log.warning("membership: DNS lookup of %s failed (%s); keeping the last "
                                 "view %s", self.name, _reason(exc), self._view)
                self._failing = True
            else:
                if self._failing:
                    _log.info("membership: DNS lookup of %s works again", self.name)
                self._failing = False
                if names is None and not self._missing:
                    _log.warning("membership: %s does not exist in DNS: no members",
                                 self.name)
                self._missing = names is None
                self._deliver(names or ())
                self._known.set()
            await asyncio.sleep(self.interval)

    async def _lookup(self) -> list[str] | None:
        """Every member name the records give now; None: no such name (NXDOMAIN).
        Raises `_LookupFailed`."""
        if not self.srv:
            hosts = await self._addresses(self.name)
            return None if hosts is None else [member_name(h, self.port) for h in hosts]
        records = await self._query(self.name, "SRV")
        if records is None:
            return None
        targets = sorted({(rr.target.to_text(), rr.port) for rr in records})
        try:
            async with asyncio.TaskGroup() as group:
                lookups = [group.create_task(self._addresses(t)) for t, _ in targets]
        except ExceptionGroup as failed:
            raise _LookupFailed(_reason(failed)) from None
        return [member_name(host, port)
                for (_, port), lookup in zip(targets, lookups, strict=True)
                for host in lookup.result() or ()]  # a target gone since: skipped

    async def _addresses(self, name: str) -> list[str] | None:
        """The A and AAAA addresses of `name`; None: no such name."""
        a = await self._query(name, "A")
        aaaa = await self._query(name, "AAAA") if a is not None else None
        return None if a is None else [rr.address for rr in (*a, *(aaaa or ()))]

    async def _query(self, name: str, rdtype: str) -> list[Any] | None:
        """The records of one type (empty: none of that type); None: no such name."""
        import dns.exception
        import dns.resolver

        try:
            answer = await self._resolver.resolve(
                name, rdtype, lifetime=self.lifetime, search=True, raise_on_no_answer=False)
        except dns.resolver.NXDOMAIN:
            return None
        except dns.exception.DNSException as exc:  # timeout, SERVFAIL, refused, garbage
            raise _LookupFailed(f"{rdtype} {name}: {exc}") from None
        return list(answer.rrset) if answer.rrset is not None else []


# -- etcd ---------------------------------------------------------------------------------


class _Evicted(Exception):
    """This member's key went away while its lease was held: register again."""


class EtcdMembership(_Background):
    """Members from the keys under `prefix` in etcd, each bound to its member's lease.

    Registering: grant a lease of `lease_ttl` seconds (rounded up; etcd may raise it to
    its minimum), put ``prefix + me`` (JSON: name, host id, version) bound to it, read
    the prefix and watch it from that revision on. The lease is renewed every third of
    its TTL. Each step is bounded by `step_timeout`.

    Losing the lease: when no renewal succeeded for 3/4 of the TTL (counted from the
    send of the last one that did), or etcd says the lease is gone, the view is
    delivered again without `me` (the others as last seen); the member then registers
    anew with a fresh lease, retrying with back-off (0.1 s doubling to 2 s), and
    delivers the view with itself once that worked. Any failure of the connection,
    the renewal or the watch ends the session and starts such a registration; while
    the old lease still holds, the others see nothing of it (the key is re-bound).

    `close` revokes the lease, so the others see this member leave at once.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        me: str,
        on_change: OnChange,
        prefix: str = DEFAULT_ETCD_PREFIX,
        lease_ttl: float = 3.0,
        step_timeout: float | None = None,
        start_timeout: float = START_TIMEOUT,
    ) -> None:
        super().__init__(me, on_change, start_timeout)
        try:
            import aetcd  # noqa: F401
        except ImportError:
            raise ConfigError("etcd:// membership needs aetcd: install coalesce[ring]") \
                from None
        self.host = host
        self.port = port
        self.prefix = prefix if prefix.endswith("/") else prefix + "/"
        self.ttl = max(1, math.ceil(lease_ttl))
        self.step_timeout = step_timeout if step_timeout is not None else \
            min(max(self.ttl / 3, 0.5), 2.0)
        self._key = (self.prefix + me).encode("utf-8")
        mh, mp = parse_address(me, default_port=0)
        self._value = json.dumps({
            "name": me, "host_id": str(host_id_for(mh, mp)), "version": _version(),
        }).encode("utf-8")
        self._client: Any = None  # aetcd.Client of the current session
        self._names: set[str] = set()  # as etcd last told
        self._registered = False  # our key is bound to a lease we believe alive
        self._lease: int | None = None  # the lease our key is bound to
        self._granted: set[int] = set()  # leases that may be alive: revoked on close
        self._lost: asyncio.TimerHandle | None = None
        self._retry = _RETRY_FIRST
        self._failing = False
        self._bad_names: set[str] = set()

    def __repr__(self) -> str:
        return f"<EtcdMembership {member_name(self.host, self.port)}{self.prefix}>"

    @property
    def registered(self) -> bool:
        """This member's key is in etcd under a lease it is renewing."""
        return self._registered

    async def close(self) -> None:
        """Stop renewing and watching, and revoke the lease (bounded by `step_timeout`;
        if etcd cannot be reached, the lease expires by itself within its TTL)."""
        if self._closed:
            return
        await super().close()
        if self._lost is not None:
            self._lost.cancel()
        try:
            if self._granted:
                self._client = self._client if self._client is not None else \
                    self._new_client()
                await self._revoke_all(self._client)
        finally:
            self._granted.clear()
            self._registered = False
            await self._drop_client()

    async def _revoke_all(self, client: Any) -> None:
        import aetcd

        for lease in sorted(self._granted):
            try:
                async with asyncio.timeout(self.step_timeout):
                    await client.revoke_lease(lease)
            except aetcd.ClientError as exc:
                if "not found" not in str(exc):  # expired already: nothing to revoke
                    _log.info("membership: could not revoke etcd lease %x (%s); it expires "
                              "within %ds", lease, _reason(exc), self.ttl)
            except TimeoutError:
                _log.info("membership: etcd did not answer the revocation of the lease; it "
                          "expires within %ds", self.ttl)
                return

    # -- the session loop -----------------------------------------------------------------

    async def _run(self) -> None:
        while not self._closed:
            try:
                await self._session()
            except Exception as exc:
                if not self._failing:
                    _log.warning("membership: etcd at %s: %s; registering again",
                                 member_name(self.host, self.port), _reason(exc))
                else:
                    _log.debug("membership: etcd: %s", _reason(exc))
                self._failing = True
            await self._drop_client()
            await asyncio.sleep(self._retry * random.uniform(0.5, 1.0))
            self._retry = min(self._retry * 2, _RETRY_MAX)

    async def _session(self) -> None:
        """Register, deliver the view, then renew and watch until something fails."""
        import aetcd

        loop = asyncio.get_running_loop()
        client = self._client = self._new_client()
        step = self.step_timeout
        sent = loop.time()
        async with asyncio.timeout(step):
            lease = await client.lease(self.ttl)
        self._granted.add(lease.id)
        ttl = int(lease.ttl)
        async with asyncio.timeout(step):
            await client.put(self._key, self._value, lease=lease.id)
        previous, self._lease = self._lease, lease.id
        self._renewed(sent, ttl)
        async with asyncio.timeout(step):
            found = await client.get_prefix(self.prefix.encode("utf-8"))
        async with asyncio.timeout(step):
            watch = await client.watch_prefix(
                self.prefix.encode("utf-8"), start_revision=found.header.revision + 1)
        self._names = {name for kv in found if (name := self._name_of(kv.key)) is not None}
        if self._failing:
            _log.info("membership: registered in etcd again as %s", self.me)
        self._failing = False
        self._retry = _RETRY_FIRST
        self._registered = True
        self._deliver_current()
        self._known.set()
        if previous is not None and previous != lease.id:
            # Our key is bound to the new lease now: the old one holds nothing.
            with contextlib.suppress(aetcd.ClientError, TimeoutError):
                async with asyncio.timeout(step):
                    await client.revoke_lease(previous)
            self._granted.discard(previous)
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(self._renew(client, lease.id, ttl, sent))
                group.create_task(self._follow(watch))
        finally:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(step):
                    await watch.cancel()

    async def _renew(self, client: Any, lease: int, ttl: int, sent: float) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(max(0.0, sent + ttl / 3 - loop.time()))
            sent = loop.time()
            async with asyncio.timeout(self.step_timeout):
                reply = await client.refresh_lease(lease)
            if reply is None or reply.TTL <= 0:
                self._granted.discard(lease)
                self._lease_lost("etcd says the lease expired")
                raise _Evicted("the lease expired")
            self._renewed(sent, int(reply.TTL))
            if not self._registered:  # the loop was late, but the lease held after all
                _log.info("membership: etcd lease of %s renewed in time after all", self.me)
                self._registered = True
                self._deliver_current()

    async def _follow(self, watch: Any) -> None:
        async for event in watch:
            name = self._name_of(event.kv.key)
            if name is None:
                continue
            if event.kind == "PUT":
                self._names.add(name)
            else:
                self._names.discard(name)
                if name == self.me:
                    raise _Evicted("this member's key was deleted")
            self._deliver_current()
        raise _Evicted("the watch ended")

    # -- the lease ------------------------------------------------------------------------

    def _renewed(self, sent: float, ttl: int) -> None:
        """A grant or renewal sent at loop time `sent` was answered with `ttl`."""
        if self._lost is not None:
            self._lost.cancel()
        self._lost = asyncio.get_running_loop().call_at(
            sent + ttl * _HOLD, self._lease_lost, "no renewal succeeded in time")

    def _lease_lost(self, why: str) -> None:
        if self._lost is not None:
            self._lost.cancel()
            self._lost = None
        if self._registered:
            _log.warning("membership: etcd lease of %s lost (%s): leaving the ring until "
                         "registered again", self.me, why)
        self._registered = False
        self._deliver_current()

    def _deliver_current(self) -> None:
        names = self._names if self._registered else self._names - {self.me}
        self._deliver(names)

    # -- helpers --------------------------------------------------------------------------

    def _name_of(self, key: bytes) -> str | None:
        name = key.decode("utf-8", "replace")[len(self.prefix):]
        try:
            parse_address(name, default_port=0)
        except ValueError:
            if name not in self._bad_names:
                self._bad_names.add(name)
                _log.warning("membership: ignoring etcd key %r: not host:port", key)
            return None
        return name

    def _new_client(self) -> Any:
        import aetcd

        return aetcd.Client(self.host, self.port, timeout=self.step_timeout)

    async def _drop_client(self) -> None:
        client, self._client = self._client, None
        if client is None:
            return
        channel = client.channel  # None until the client first connected
        # In a task of its own: aetcd's close swallows a cancellation (it awaits its
        # cancelled watch stream and drops the CancelledError), which would otherwise
        # be the one meant for our caller; and it can block on its watch queue.
        closing = asyncio.get_running_loop().create_task(
            client.close(), name="membership: closing the etcd client")
        try:
            await asyncio.wait({closing}, timeout=self.step_timeout)
        finally:
            if not closing.done():
                _log.debug("membership: the etcd client did not close in %gs",
                           self.step_timeout)
                await _stop(closing, self.step_timeout)
            elif not closing.cancelled() and closing.exception() is not None:
                _log.debug("membership: closing the etcd client: %r", closing.exception())
            if channel is not None:  # whatever became of that: the gRPC channel goes
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(self.step_timeout):
                        await channel.close()


async def _stop(task: asyncio.Task[Any], wait: float) -> None:
    """Cancel `task` and wait (at most `wait` seconds a try, three tries) for it to end.

    Cancelled again if it goes on: a library that swallows one cancellation cannot
    leave it running. Its exception, if any, is retrieved and dropped.
    """
    for _ in range(3):
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=wait)
        if done:
            if not task.cancelled():
                task.exception()
            return
    _log.error("membership: task %r did not stop after three cancellations", task)


def _reason(exc: BaseException) -> str:
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    if isinstance(exc, TimeoutError):
        return "timed out"
    return str(exc) or type(exc).__name__


def _version() -> str:
    try:
        return importlib.metadata.version("coalesce")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


# -- from the settings --------------------------------------------------------------------


def membership_for(
    config: SidecarConfig, me: str, on_change: OnChange
) -> Membership | None:
    """The membership source the settings name, or None (neither ``peers`` nor
    ``membership`` given). `me` is this sidecar's member name. Raises `ConfigError`
    for a ``membership`` URL that does not parse, or whose extra is not installed."""
    if config.peers is not None:
        return StaticMembership((member_name(h, p) for h, p in config.peers), me, on_change)
    if config.membership is None:
        return None
    url = config.membership
    try:
        parts = urlsplit(url)
        params = dict(parse_qsl(parts.query, keep_blank_values=True, strict_parsing=False))
        if parts.scheme == "dns":
            unknown = set(params) - {"nameserver"}
            if unknown or parts.path not in ("", "/"):
                raise ValueError("expected dns://NAME[:PORT][?nameserver=HOST[:PORT]]")
            name, port = _name_and_port(parts.netloc)
            ns = params.get("nameserver")
            return DnsMembership(
                name, me=me, on_change=on_change, port=port,
                interval=config.membership_interval,
                nameserver=parse_address(ns, default_port=53) if ns is not None else None)
        if parts.scheme == "etcd":
            if params:
                raise ValueError("expected etcd://HOST:PORT[/PREFIX], without a query")
            host, port = parse_address(parts.netloc, default_port=_ETCD_PORT)
            return EtcdMembership(
                host, port, me=me, on_change=on_change,
                prefix=parts.path if parts.path not in ("", "/") else DEFAULT_ETCD_PREFIX,
                lease_ttl=config.lease_ttl)
    except ValueError as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"membership: {exc} (got {url!r})") from None
    raise ConfigError(f"membership: unknown scheme in {url!r}: use dns:// or etcd://")


def _name_and_port(netloc: str) -> tuple[str, int | None]:
    name, sep, port = netloc.rpartition(":")
    if not sep:
        name, port = netloc, ""
    if not name or (port and not port.isdigit()) or (port and not 0 < int(port) < 65536):
        raise ValueError("expected dns://NAME[:PORT]")
    return name, int(port) if port else None

