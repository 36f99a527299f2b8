"""The membership sources, against real servers: a stand-in DNS server and a real etcd.

The DNS server is started by the test on a loopback UDP port and its records change
while the source runs. etcd is Debian's ``etcd-server``, started on loopback ports with
a temporary data dir (the etcd tests skip without the binary); a TCP forwarder in front
of it can be cut to partition one member away. Every wait is on a delivered view, with
a timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from dnslib import AAAA, QTYPE, RCODE, RR, SRV, A, DNSRecord

from coalesce.sidecar import ConfigError, SidecarConfig
from coalesce.sidecar.membership import (
    DnsMembership,
    EtcdMembership,
    Membership,
    StaticMembership,
    membership_for,
)
from tests.sidecar.conftest import eventually

INTERVAL = 0.1  # DNS: seconds between lookups
SOON = 3 * INTERVAL + 0.2  # DNS: a change of records is seen within about two lookups
TTL = 2  # etcd: seconds of a lease
BOUND = 10.0  # the longest any wait for a setup step may take


class Views:
    """An ``on_change`` that keeps every view it is given, and when, and wakes waiters."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, ...]] = []
        self.arrived: list[float] = []  # time.monotonic() of each view
        self._changed = asyncio.Event()

    def __call__(self, names: tuple[str, ...]) -> None:
        self.seen.append(names)
        self.arrived.append(time.monotonic())
        self._changed.set()

    @property
    def last(self) -> tuple[str, ...] | None:
        return self.seen[-1] if self.seen else None

    async def until(self, predicate: Callable[[tuple[str, ...]], bool],
                    timeout: float = BOUND) -> float:
        """Wait for the last view to satisfy `predicate`; return when it arrived."""
        async with asyncio.timeout(timeout):
            while self.last is None or not predicate(self.last):
                self._changed.clear()
                await self._changed.wait()
        return self.arrived[-1]

    async def equal(self, *names: str, timeout: float = BOUND) -> float:
        return await self.until(lambda view: view == tuple(sorted(names)), timeout)


def _config(**settings: Any) -> SidecarConfig:
    return SidecarConfig(upstream=(("127.0.0.1", 9042),), **settings)


def _free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


# -- static -------------------------------------------------------------------------------


async def test_static_peers_are_delivered_once_as_member_names() -> None:
    views = Views()
    config = _config(peers=(("127.0.0.2", 9042), ("::1", 9043), ("127.0.0.1", 9042)))
    source = membership_for(config, "127.0.0.1:9042", views)
    assert isinstance(source, StaticMembership)
    await source.start()
    await source.close()
    assert views.seen == [("127.0.0.1:9042", "127.0.0.2:9042", "[::1]:9043")]


async def test_static_list_without_me_is_a_warning_not_an_error(
        caplog: pytest.LogCaptureFixture) -> None:
    views = Views()
    source = membership_for(_config(peers=(("127.0.0.2", 9042),)), "127.0.0.1:9042", views)
    assert source is not None
    with caplog.at_level(logging.WARNING, "coalesce.sidecar.membership"):
        await source.start()
    await source.close()
    assert views.seen == [("127.0.0.2:9042",)]
    assert "127.0.0.1:9042" in caplog.text and "forwards every merged read" in caplog.text


def test_no_source_without_peers_or_membership() -> None:
    assert membership_for(_config(), "127.0.0.1:9042", Views()) is None


@pytest.mark.parametrize("url", [
    "dns://members.test?bogus=1",
    "dns://members.test:http",
    "dns://members.test/path",
    "dns://members.test?nameserver=127.0.0.1:99999",
    "etcd://127.0.0.1:2379/ring?x=1",
])
def test_a_membership_url_that_does_not_parse_is_a_config_error(url: str) -> None:
    with pytest.raises(ConfigError, match="membership"):
        membership_for(_config(membership=url), "127.0.0.1:9042", Views())


# -- DNS ----------------------------------------------------------------------------------


@dataclass
class FakeDns(asyncio.DatagramProtocol):
    """A DNS server for the test's names on a loopback UDP port; records change live.

    `records` maps (absolute name, type) to rdata; a name with no record at all is
    NXDOMAIN. `failing` answers SERVFAIL to everything. `queries` counts questions.
    """

    records: dict[tuple[str, str], list[Any]] = field(default_factory=dict)
    failing: bool = False
    queries: int = 0
    port: int = 0
    _asked: asyncio.Event = field(default_factory=asyncio.Event)
    _transport: Any = None  # a datagram transport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        request = DNSRecord.parse(data)
        reply = request.reply()
        question = request.q
        name, rdtype = str(question.qname).lower(), QTYPE[question.qtype]
        if self.failing:
            reply.header.rcode = RCODE.SERVFAIL
        elif not any(known == name for known, _ in self.records):
            reply.header.rcode = RCODE.NXDOMAIN
        for rdata in () if self.failing else self.records.get((name, rdtype), ()):
            reply.add_answer(RR(name, question.qtype, rdata=rdata, ttl=0))
        assert self._transport is not None
        self._transport.sendto(reply.pack(), addr)
        self.queries += 1
        self._asked.set()

    async def asked(self, count: int) -> None:
        """Wait until `count` more questions were answered."""
        target = self.queries + count
        async with asyncio.timeout(BOUND):
            while self.queries < target:
                self._asked.clear()
                await self._asked.wait()

    def set(self, name: str, rdtype: str, *rdata: Any) -> None:
        self.records[(name, rdtype)] = list(rdata)


@pytest.fixture
async def dns_server() -> AsyncIterator[FakeDns]:
    loop = asyncio.get_running_loop()
    transport, server = await loop.create_datagram_endpoint(
        FakeDns, local_addr=("127.0.0.1", 0))
    server.port = transport.get_extra_info("sockname")[1]
    try:
        yield server
    finally:
        transport.close()


def _tasks_left() -> set[asyncio.Task[Any]]:
    return {task for task in asyncio.all_tasks() if task is not asyncio.current_task()}


async def _nothing_left_running() -> None:
    """After close(): none of the source's tasks, and gRPC's own (the status of each
    call the closed channel cancelled, which its poller thread delivers) end soon."""
    assert not {t for t in _tasks_left() if t.get_name().startswith("membership")}
    await eventually(lambda: not _tasks_left(), timeout=2.0)


@contextlib.asynccontextmanager
async def running(source: Membership | None) -> AsyncIterator[Membership]:
    """`source`, started; closed on the way out, and then no task of it is left."""
    assert source is not None
    try:
        await source.start()
        yield source
    finally:
        await source.close()
    await _nothing_left_running()


async def test_dns_records_added_and_removed_change_the_view(dns_server: FakeDns) -> None:
    name = "members.test."
    dns_server.set(name, "A", A("127.0.0.11"), A("127.0.0.12"))
    dns_server.set(name, "AAAA", AAAA("::1"))
    views = Views()
    url = f"dns://members.test?nameserver=127.0.0.1:{dns_server.port}"
    config = _config(membership=url, membership_interval=INTERVAL)
    # No port in the URL: every member has this sidecar's own port.
    async with running(membership_for(config, "127.0.0.11:9042", views)) as source:
        assert isinstance(source, DnsMembership)
        assert views.seen == [("127.0.0.11:9042", "127.0.0.12:9042", "[::1]:9042")]

        await dns_server.asked(6)  # three more lookups, nothing changed: no call
        assert len(views.seen) == 1

        dns_server.set(name, "A", A("127.0.0.11"), A("127.0.0.12"), A("127.0.0.13"))
        await views.until(lambda view: "127.0.0.13:9042" in view, timeout=SOON)
        dns_server.set(name, "A", A("127.0.0.11"))
        dns_server.set(name, "AAAA")
        await views.equal("127.0.0.11:9042", timeout=SOON)
    assert views.seen[1:] == [
        ("127.0.0.11:9042", "127.0.0.12:9042", "127.0.0.13:9042", "[::1]:9042"),
        ("127.0.0.11:9042",),
    ]


async def test_dns_failure_keeps_the_last_view_and_nxdomain_empties_it(
        dns_server: FakeDns, caplog: pytest.LogCaptureFixture) -> None:
    name = "members.test."
    dns_server.set(name, "A", A("127.0.0.11"))
    views = Views()
    source = DnsMembership("members.test", port=9100, me="127.0.0.11:9100", on_change=views,
                           interval=INTERVAL, nameserver=("127.0.0.1", dns_server.port))
    async with running(source):
        assert views.seen == [("127.0.0.11:9100",)]
        with caplog.at_level(logging.WARNING, "coalesce.sidecar.membership"):
            dns_server.failing = True
            await dns_server.asked(3)
            assert views.seen == [("127.0.0.11:9100",)]
        assert caplog.text.count("DNS lookup of members.test failed") == 1  # said once

        dns_server.failing = False
        dns_server.records.clear()  # the name is gone: an empty ring
        await views.equal(timeout=SOON)
    assert views.seen == [("127.0.0.11:9100",), ()]


async def test_dns_srv_records_give_targets_and_ports(dns_server: FakeDns) -> None:
    srv = "_cql._tcp.members.test."
    dns_server.set(srv, "SRV", SRV(0, 0, 9101, "a.members.test."),
                   SRV(0, 0, 9102, "b.members.test."))
    dns_server.set("a.members.test.", "A", A("127.0.0.21"))
    dns_server.set("b.members.test.", "A", A("127.0.0.22"))
    dns_server.set("b.members.test.", "AAAA", AAAA("::1"))
    views = Views()
    url = f"dns://_cql._tcp.members.test?nameserver=127.0.0.1:{dns_server.port}"
    config = _config(membership=url, membership_interval=INTERVAL)
    async with running(membership_for(config, "127.0.0.21:9101", views)):
        assert views.last == ("127.0.0.21:9101", "127.0.0.22:9102", "[::1]:9102")
        dns_server.set(srv, "SRV", SRV(0, 0, 9101, "a.members.test."))
        await views.equal("127.0.0.21:9101", timeout=SOON)


async def test_dns_start_is_bounded_when_no_server_answers() -> None:
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # bound, never answers
    silent.bind(("127.0.0.1", 0))
    with silent:
        views = Views()
        source = DnsMembership("members.test", me="127.0.0.1:9042", on_change=views,
                               interval=INTERVAL, nameserver=silent.getsockname(),
                               lifetime=0.3, start_timeout=0.5)
        started = time.monotonic()
        async with running(source):
            assert time.monotonic() - started < 1.5
            assert views.seen == []


# -- etcd ---------------------------------------------------------------------------------


class EtcdServer:
    """One etcd on loopback ports with a temporary data dir, stopped on `stop`.

    Heartbeat and election timeouts are shortened so that its minimum lease TTL is 1 s
    (by default it is 2 s) and it is up in a fraction of a second.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = _free_port()
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        peer = f"http://127.0.0.1:{_free_port()}"
        client = f"http://127.0.0.1:{self.port}"
        with (self.directory / "etcd.log").open("ab") as log:
            self.process = subprocess.Popen(
                ["etcd", "--name", "test", "--data-dir", str(self.directory / "data"),
                 "--listen-client-urls", client, "--advertise-client-urls", client,
                 "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                 "--initial-cluster", f"test={peer}",
                 "--heartbeat-interval", "50", "--election-timeout", "500"],
                stdout=log, stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + BOUND
        while not self._healthy():  # no event to wait on: its health endpoint, bounded
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                log_text = (self.directory / "etcd.log").read_text(errors="replace")
                raise RuntimeError(f"etcd did not start:\n{log_text[-2000:]}")
            time.sleep(0.05)

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health",
                                        timeout=0.5) as reply:
                return b'"true"' in reply.read()
        except OSError:
            return False

    def signal(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGCONT)  # in case a test left it stopped
        process.terminate()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


def _etcd_server(directory: Path) -> Iterator[EtcdServer]:
    if shutil.which("etcd") is None:
        pytest.skip("no etcd binary: apt-get install etcd-server (Debian) to run the etcd "
                    "membership tests")
    pytest.importorskip("aetcd", reason="aetcd is not installed (coalesce[ring])")
    server = EtcdServer(directory)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdServer]:
    """One etcd for the module's tests; each test uses a prefix of its own."""
    yield from _etcd_server(tmp_path_factory.mktemp("etcd"))


@pytest.fixture
def own_etcd(tmp_path: Path) -> Iterator[EtcdServer]:
    """An etcd for one test, which may stop it."""
    yield from _etcd_server(tmp_path)


@pytest.fixture
def prefix(request: pytest.FixtureRequest) -> str:
    return f"/test/{request.node.name}/"


@pytest.fixture
async def members(etcd: EtcdServer, prefix: str) -> AsyncIterator[
        Callable[..., Any]]:
    """Start `EtcdMembership` instances named by their port; all closed after the test."""
    made: list[Membership] = []

    async def start(port: int, *, etcd_port: int | None = None) -> tuple[Membership, Views]:
        views = Views()
        url = f"etcd://127.0.0.1:{etcd_port or etcd.port}{prefix}"
        source = membership_for(_config(membership=url, lease_ttl=TTL),
                                f"127.0.0.1:{port}", views)
        assert isinstance(source, EtcdMembership)
        made.append(source)
        await source.start()
        return source, views

    try:
        yield start
    finally:
        for source in made:
            await source.close()
    await _nothing_left_running()


def _name(port: int) -> str:
    return f"127.0.0.1:{port}"


async def test_etcd_members_see_each_other_and_a_newcomer_at_once(
        members: Callable[..., Any]) -> None:
    _, a_views = await members(9001)
    assert a_views.seen == [(_name(9001),)]  # start() returned with the first view
    _, b_views = await members(9002)
    assert b_views.seen == [(_name(9001), _name(9002))]
    await a_views.equal(_name(9001), _name(9002), timeout=2.0)
    _, c_views = await members(9003)
    everyone = (_name(9001), _name(9002), _name(9003))
    assert c_views.last == everyone
    for views in (a_views, b_views):
        await views.equal(*everyone, timeout=2.0)


async def test_etcd_member_that_closes_leaves_the_others_at_once(
        members: Callable[..., Any]) -> None:
    _, a_views = await members(9001)
    b, b_views = await members(9002)
    await a_views.equal(_name(9001), _name(9002))
    closed = time.monotonic()
    await b.close()  # revokes its lease
    assert await a_views.equal(_name(9001), timeout=1.0) - closed < 1.0
    assert len(b_views.seen) == 1  # nothing after close


_MEMBER_PROCESS = """
import asyncio, sys
from coalesce.sidecar.membership import EtcdMembership

async def main():
    port, prefix, me, ttl = int(sys.argv[1]), sys.argv[2], sys.argv[3], float(sys.argv[4])
    source = EtcdMembership("127.0.0.1", port, me=me, on_change=lambda names: None,
                            prefix=prefix, lease_ttl=ttl)
    await source.start()
    print("registered" if source.registered else "not registered", flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


async def test_etcd_member_killed_leaves_when_its_lease_expires(
        members: Callable[..., Any], etcd: EtcdServer, prefix: str) -> None:
    _, a_views = await members(9001)
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _MEMBER_PROCESS, str(etcd.port), prefix, _name(9009), str(TTL),
        stdout=asyncio.subprocess.PIPE)
    try:
        assert process.stdout is not None
        async with asyncio.timeout(BOUND):
            assert await process.stdout.readline() == b"registered\n"
        await a_views.equal(_name(9001), _name(9009), timeout=2.0)
        process.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        assert await a_views.equal(_name(9001), timeout=TTL + 1.0) - killed <= TTL + 1.0
    finally:
        if process.returncode is None:
            process.kill()
        async with asyncio.timeout(BOUND):
            await process.wait()


class Cuttable:
    """A TCP forwarder to a server that can be cut like a partitioned network.

    Cut, it forwards nothing either way and answers nothing (connections stay open,
    as through a dead link); healed, it drops every connection it held, so clients
    reconnect, and forwards again.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.cut = False
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        try:
            if self.cut:
                await reader.read()  # hold it, answer nothing
                return
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
            self._writers.add(up_writer)
            await asyncio.gather(self._pump(reader, up_writer), self._pump(up_reader, writer))
        except OSError:
            pass
        finally:
            writer.close()
            self._tasks.discard(task)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                if not self.cut:
                    writer.write(data)
                    await writer.drain()
        writer.close()

    def heal(self) -> None:
        self.cut = False
        for writer in self._writers:
            writer.close()
        self._writers.clear()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        self.heal()  # every connection closed: their handlers finish
        async with asyncio.timeout(BOUND):
            await asyncio.gather(*self._tasks, return_exceptions=True)


async def test_etcd_member_cut_off_leaves_its_own_view_first_then_comes_back(
        members: Callable[..., Any], etcd: EtcdServer) -> None:
    link = Cuttable(etcd.port)
    await link.start()
    try:
        a, a_views = await members(9001, etcd_port=link.port)  # a talks through the link
        _, b_views = await members(9002)
        both = (_name(9001), _name(9002))
        await a_views.equal(*both)
        await b_views.equal(*both)

        link.cut = True
        cut_at = time.monotonic()
        a_left_itself = await a_views.equal(_name(9002), timeout=TTL + 0.5)
        b_saw_a_leave = await b_views.equal(_name(9002), timeout=TTL + 1.5)
        assert a_left_itself - cut_at <= TTL
        assert b_saw_a_leave - cut_at <= TTL + 1.0
        assert isinstance(a, EtcdMembership) and not a.registered
        # a stopped claiming its ranges before the others took them over.
        assert a_left_itself <= b_saw_a_leave

        link.heal()
        await a_views.equal(*both, timeout=5.0)
        await b_views.equal(*both, timeout=2.0)
        assert a.registered
        await a.close()  # while its link is up: it revokes
        await b_views.equal(_name(9002), timeout=1.0)
    finally:
        await link.close()


async def test_etcd_stopped_takes_members_out_and_back_when_it_resumes(
        own_etcd: EtcdServer) -> None:
    views = Views()
    source = EtcdMembership("127.0.0.1", own_etcd.port, me=_name(9001), on_change=views,
                            prefix="/ring/", lease_ttl=TTL)
    async with running(source):
        assert views.seen == [(_name(9001),)]
        own_etcd.signal(signal.SIGSTOP)
        stopped = time.monotonic()
        try:
            assert await views.equal(timeout=TTL + 0.5) - stopped <= TTL
        finally:
            own_etcd.signal(signal.SIGCONT)
        await views.equal(_name(9001), timeout=5.0)
        assert source.registered


async def test_etcd_start_is_bounded_when_etcd_is_unreachable() -> None:
    port = _free_port()  # nothing listens there
    views = Views()
    source = EtcdMembership("127.0.0.1", port, me=_name(9001), on_change=views,
                            lease_ttl=TTL, start_timeout=0.5)
    started = time.monotonic()
    async with running(source):
        assert time.monotonic() - started < 1.5
        assert views.seen == []
        assert not source.registered
