"""`Sidecar`: the proxy as one object -- listener, upstream pools, metrics endpoint.

Use it as an async context manager (``async with Sidecar(config) as sidecar``) in
tests and when embedding; `coalesce sidecar` (see `coalesce.sidecar.command`) runs one
until SIGTERM. Everything runs on the event loop that called `start`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import ipaddress
import logging
import resource
import socket
import ssl
from types import TracebackType
from typing import Any

from prometheus_client import CollectorRegistry

from coalesce.sidecar.advertised import Identity
from coalesce.sidecar.client import ClientConnection
from coalesce.sidecar.config import SidecarConfig
from coalesce.sidecar.errors import ConfigError
from coalesce.sidecar.flights import Flights
from coalesce.sidecar.members import SidecarRing, member_name
from coalesce.sidecar.membership import Membership, membership_for
from coalesce.sidecar.metrics_http import serve_metrics
from coalesce.sidecar.proxy import Proxy
from coalesce.sidecar.stats import SidecarStats, register_stats
from coalesce.sidecar.upstream import Upstream

__all__ = ["Sidecar", "connection_limit", "tune_gc"]

_log = logging.getLogger(__name__)
_DESCRIPTOR_RESERVE = 256  # for upstream connections, the listener, metrics, logs


def tune_gc(config: SidecarConfig) -> None:
    """Tune the process's cyclic garbage collector for a long-running proxy.

    Everything allocated at start-up (modules, config, the loop) is moved out of the
    collector's reach with `gc.freeze` (``gc_freeze``), and generation 0 is collected
    every ``gc_threshold`` allocations instead of 700, so a herd's short-lived
    objects do not set off full collections. Process-wide: the command calls it, an
    embedding application decides for itself.
    """
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(config.gc_threshold, gen1, gen2)
    if config.gc_freeze:
        gc.collect()
        gc.freeze()


def connection_limit(config: SidecarConfig) -> int:
    """``max_connections``, or what the process's descriptor limit leaves for clients.

    The soft limit is raised to the hard one first, as servers do.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    fits = max(16, soft - _DESCRIPTOR_RESERVE) if soft != resource.RLIM_INFINITY else 1 << 20
    if config.max_connections is None:
        return fits
    if config.max_connections > fits:
        _log.warning("max_connections %d exceeds what %d file descriptors allow; using %d",
                     config.max_connections, soft, fits)
        return fits
    return config.max_connections


class Sidecar:
    """A running CQL sidecar in front of the configured Scylla nodes.

    `start` probes the upstream nodes (it does not fail if none answers: the sidecar
    reconnects with back-off and serves once they do), then listens. `drain` stops
    accepting connections, lets every request already received get its answer (up to
    ``drain_timeout``), then stops. `stop` closes everything at once: requests in
    flight get no answer. Each sidecar has its own Prometheus `registry`.
    """

    def __init__(self, config: SidecarConfig) -> None:
        self.config = config
        self.registry = CollectorRegistry()
        self._upstream: Upstream | None = None
        self._proxy: Proxy | None = None
        self._server: asyncio.Server | None = None
        self._metrics: asyncio.Server | None = None
        self._clients: set[ClientConnection] = set()
        self.host = config.listen[0]
        self.port = config.listen[1]
        self.metrics_port: int | None = None
        self.max_connections = 0
        self._draining = False
        self._membership: Membership | None = None

    async def __aenter__(self) -> Sidecar:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    # -- what tests and operators look at --------------------------------------------------

    @property
    def flights(self) -> Flights:
        """The in-flight table of merged reads (empty when nothing is in flight)."""
        return self._require_proxy().flights

    @property
    def stats(self) -> SidecarStats:
        return self._require_proxy().stats

    @property
    def upstream(self) -> Upstream:
        assert self._upstream is not None, "the sidecar is not started"
        return self._upstream

    @property
    def in_flight(self) -> int:
        """Client requests received and not yet answered."""
        return self._require_proxy().in_flight

    @property
    def client_count(self) -> int:
        return len(self._clients)

    def health(self) -> dict[str, Any]:
        """What ``/healthz`` and ``/readyz`` report: upstream reachability per node, and
        whether the sidecar is draining."""
        return {**self.upstream.health(), "draining": self._draining}

    async def wait_upstream_reachable(self) -> None:
        """Return once some upstream node answers (at once if one already does)."""
        await self.upstream.wait_reachable()

    # -- life cycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Probe upstream, then listen (and serve metrics). Raises `ConfigError`/`OSError`."""
        config = self.config
        loop = asyncio.get_running_loop()
        client_tls = _client_ssl(config)
        if config.peers is not None or config.membership is not None:
            if client_tls is not None:
                raise ConfigError("a ring of sidecars with client TLS is not supported yet: "
                                  "members would need to verify each other's certificates")
            membership_for(config, "127.0.0.1:0", _nothing)  # a bad URL fails before binding
        self.max_connections = connection_limit(config)
        upstream = Upstream(config)
        proxy = Proxy(config, upstream, Identity("127.0.0.1", 0), registry=self.registry)
        upstream.on_event = proxy.on_upstream_event
        self._upstream, self._proxy = upstream, proxy
        register_stats(
            proxy.stats, self.registry,
            upstream_connections=upstream.connections_by_node,
            upstream_errors=lambda: upstream.errors,
            ring_fallbacks=lambda: proxy.flights.fallbacks,
        )
        await upstream.start()
        self._server = await loop.create_server(
            lambda: self._accept(proxy), config.listen[0], config.listen[1], ssl=client_tls
        )
        self.port = self._server.sockets[0].getsockname()[1]
        proxy.identity = identity = Identity(
            await _ip_literal(config.advertised_address), config.advertised_port or self.port,
            config.data_center, config.rack,
        )
        if config.peers is not None or config.membership is not None:
            await self._join_ring(proxy, member_name(identity.address, identity.port))
        if config.metrics is not None:
            self._metrics = await serve_metrics(
                config.metrics[0], config.metrics[1], self.registry, self.health
            )
            self.metrics_port = self._metrics.sockets[0].getsockname()[1]

    async def _join_ring(self, proxy: Proxy, me: str) -> None:
        """Start in a ring of one (this sidecar) and let membership say the rest: until a
        DNS or etcd source answers, this sidecar serves every read itself."""
        config = self.config
        proxy.join_ring(SidecarRing(me, (me,), vnodes=config.vnodes,
                                    load_factor=config.load_factor))
        if config.peers is not None:
            # Names are IP literals, as each member's own is (and inet columns need).
            config = dataclasses.replace(config, peers=tuple(
                [(await _ip_literal(host, "peers"), port) for host, port in config.peers]))
        self._membership = membership_for(config, me, proxy.ring_changed)
        assert self._membership is not None
        await self._membership.start()

    @property
    def ring(self) -> SidecarRing | None:
        """The ring of sidecars this one belongs to (None: it works alone)."""
        peers = self._require_proxy().peers
        return peers.ring if peers is not None else None

    def ring_changed(self, names: tuple[str, ...]) -> None:
        """Set the ring's members by hand (membership sources call this)."""
        self._require_proxy().ring_changed(names)

    async def drain(self, timeout: float | None = None) -> bool:
        """Stop accepting, wait for answers to requests already received, then stop.

        Returns False if `timeout` (default ``drain_timeout``) ran out first; the
        sidecar is stopped either way.
        """
        self._draining = True
        if self._server is not None:
            self._server.close()
        finished = True
        if self._proxy is not None:
            try:
                async with asyncio.timeout(timeout or self.config.drain_timeout):
                    await self._proxy.wait_idle()
            except TimeoutError:
                finished = False
        await self.stop()
        return finished

    async def stop(self) -> None:
        """Leave the ring; close the listener, every client and upstream connection, and
        the endpoint."""
        if self._membership is not None:
            await self._membership.close()  # etcd: the others see this member leave now
            self._membership = None
        if self._server is not None:
            self._server.close()
        for client in list(self._clients):
            client.close()  # flushed; a client that reads nothing is cut off after a grace
        if self._proxy is not None and self._proxy.peers is not None:
            await self._proxy.peers.close()
        if self._upstream is not None:
            await self._upstream.close()
        if self._metrics is not None:
            self._metrics.close()
            await self._metrics.wait_closed()
            self._metrics = None
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    def _accept(self, proxy: Proxy) -> ClientConnection:
        # Over the limit, a connection is told why on its first frame, then closed.
        refused = len(self._clients) >= self.max_connections
        client = ClientConnection(proxy, self._clients.discard, refused=refused)
        self._clients.add(client)
        return client

    def _require_proxy(self) -> Proxy:
        assert self._proxy is not None, "the sidecar is not started"
        return self._proxy


def _nothing(names: tuple[str, ...]) -> None:
    return None


def _client_ssl(config: SidecarConfig) -> ssl.SSLContext | None:
    if config.tls_cert is None or config.tls_key is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(str(config.tls_cert), str(config.tls_key))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"tls_cert/tls_key: cannot load: {exc}") from None
    return context


async def _ip_literal(address: str, setting: str = "advertise") -> str:
    """`address` as an IP literal (``system.local`` columns are of type inet)."""
    try:
        return str(ipaddress.ip_address(address))
    except ValueError:
        pass
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(address, None, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise ConfigError(f"{setting}: cannot resolve {address!r}: {exc}") from None
    return str(infos[0][4][0])
