"""Real drivers against a ring of real sidecar processes.

An emulator (in a thread of the test process) behind three ``coalesce sidecar``
processes started with ``--peers``; cassandra-driver, acsylla and the Node.js driver
connect to the ring as to a cluster. Where each request arrived is read from the
members' ``/metrics`` only, as an operator would see it; the owner of each partition is
computed by `SidecarRing` from the same member names and ``--vnodes``.

Two layouts of the same ring:

- ``addresses``: each member on its own loopback address (127.0.0.2, .3, .4), all on
  one port, as pods are. Every driver routes by token here;
- ``ports``: all members on 127.0.0.1, one port each. Only a driver reading
  ``system.peers_v2`` (its ``native_port``) tells them apart: cassandra-driver does;
  the cpp-driver under acsylla and the Node.js driver read ``system.peers``, take every
  peer for the contact point itself and send everything there, which then forwards
  each read to its owner.

The share of reads reaching a non-owner per driver and replication factor is measured
by ``benchmarks/ring_drivers.py``; here only what must hold is asserted.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import acsylla
import pytest
from cassandra.cluster import (
    EXEC_PROFILE_DEFAULT,
    Cluster,
    ExecutionProfile,
    ResponseFuture,
    Session,
)
from cassandra.concurrent import execute_concurrent_with_args
from cassandra.policies import (
    LoadBalancingPolicy,
    RoundRobinPolicy,
    TokenAwarePolicy,
    WhiteListRoundRobinPolicy,
)
from prometheus_client.parser import text_string_to_metric_families

from coalesce.emulator import EmulatorThread
from coalesce.sidecar.advertised import host_id_for
from coalesce.sidecar.members import SidecarRing, member_name

pytestmark = pytest.mark.timeout(60)

MEMBERS = 3
VNODES = 64
KEYS = random.Random(20261201).sample(range(-(2**31), 2**31), 300)
READY_WITHIN = 20.0  # seconds for a sidecar process to start and become ready
BOUND = 10.0  # the longest any other single wait may take before the test fails
READ = "SELECT k, v FROM {}.kv WHERE k = ?"
_PORTS = random.Random()

NODE = shutil.which("node")
NODE_DIR = Path(__file__).resolve().parent.parent / "node"
needs_node = pytest.mark.skipif(
    NODE is None or not (NODE_DIR / "node_modules" / "cassandra-driver").is_dir(),
    reason="needs node and `npm ci --prefix tests/node`",
)


def _int(key: int) -> bytes:
    return key.to_bytes(4, "big", signed=True)


# -- what a member's /metrics says ----------------------------------------------------------


@dataclass(frozen=True)
class Counts:
    """The counters of one member these tests read, at one moment.

    `executes` counts EXECUTE frames from drivers and from other members alike; the
    ring's ``for_member`` counter says how many came from members (hop-marked), so
    `from_drivers` is what drivers sent this member. `to_owner` counts merged reads
    this member sent to their owner (a read reaching a non-owner), `fallback` those of
    them it served itself when the owner did not answer.
    """

    executes: float = 0.0
    merged: float = 0.0
    to_owner: float = 0.0
    fallback: float = 0.0
    for_member: float = 0.0
    inflight: float = 0.0

    def __sub__(self, other: Counts) -> Counts:
        return Counts(*(getattr(self, f.name) - getattr(other, f.name) for f in fields(self)))

    @property
    def from_drivers(self) -> float:
        return self.executes - self.for_member


_SAMPLES = {
    ("coalesce_sidecar_frames_total", "opcode", "EXECUTE"): "executes",
    ("coalesce_sidecar_requests_total", "path", "merged"): "merged",
    ("coalesce_sidecar_ring_reads_total", "way", "to_owner"): "to_owner",
    ("coalesce_sidecar_ring_reads_total", "way", "fallback"): "fallback",
    ("coalesce_sidecar_ring_reads_total", "way", "for_member"): "for_member",
    ("coalesce_inflight_keys", "group", "sidecar"): "inflight",
}


def _scrape(port: int) -> Counts:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=BOUND) as reply:
        text = reply.read().decode()
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            for (name, label, value), attr in _SAMPLES.items():
                if sample.name == name and sample.labels.get(label) == value:
                    values[attr] = sample.value
    assert "inflight" in values and "for_member" in values, "a metric was renamed"
    return Counts(**values)


# -- the sidecar processes -------------------------------------------------------------------


@dataclass
class Member:
    """One ``coalesce sidecar`` process of the ring."""

    host: str
    port: int
    metrics_port: int
    proc: subprocess.Popen[str]
    output: collections.deque[str] = field(default_factory=lambda: collections.deque(maxlen=40))

    @property
    def name(self) -> str:
        return member_name(self.host, self.port)

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def counts(self) -> Counts:
        return _scrape(self.metrics_port)

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(
                    f"http://127.0.0.1:{self.metrics_port}/readyz", timeout=1) as reply:
                return reply.status == 200
        except (urllib.error.URLError, OSError):
            return False


@dataclass
class SidecarRingProcs:
    """The members, the ring they compute, and driver clusters pointed at them."""

    emulator: EmulatorThread
    members: list[Member]
    ring: SidecarRing
    clusters: list[Cluster] = field(default_factory=list)

    def owner(self, key: int) -> int:
        """Index of the member owning int partition `key`."""
        owner = self.ring.owner_of(_int(key))
        assert owner is not None
        return next(i for i, m in enumerate(self.members) if m.name == owner.name)

    def index_of(self, host: str, port: int) -> int:
        name = member_name(host, port)
        return next(i for i, m in enumerate(self.members) if m.name == name)

    def counts(self) -> list[Counts]:
        """Every member's counters; a dead member's read as all zero."""
        return [m.counts() if m.alive else Counts() for m in self.members]

    def session(self, policy: LoadBalancingPolicy | None = None, contact: int = 0,
                pools: int | None = None, **kwargs: Any) -> Session:
        """A cassandra-driver session whose one contact point is member `contact`,
        once it has a pool to every member (to `pools` members, if the policy ignores
        some).

        `Cluster.connect` returns before every pool is open, and a statement prepared
        then is not prepared on the members still opening theirs (``Session.
        prepare_on_all_hosts`` skips them): their first EXECUTEs would be answered
        UNPREPARED and sent again, which the tests count as extra arrivals.
        """
        member = self.members[contact]
        profile = ExecutionProfile(
            load_balancing_policy=policy or TokenAwarePolicy(RoundRobinPolicy()),
            request_timeout=kwargs.pop("request_timeout", BOUND),
        )
        cluster = Cluster([member.host], port=member.port, protocol_version=4,
                          execution_profiles={EXEC_PROFILE_DEFAULT: profile}, **kwargs)
        self.clusters.append(cluster)
        session = cluster.connect()
        wanted = len(self.members) if pools is None else pools
        _eventually(lambda: len(session.get_pool_state()) == wanted)
        return session

    def kill(self, index: int) -> None:
        member = self.members[index]
        member.proc.send_signal(signal.SIGKILL)
        member.proc.wait(BOUND)


def _ports(n: int, hosts: tuple[str, ...] = ("127.0.0.1",)) -> list[int]:
    """`n` distinct ports free on every one of `hosts`.

    Below the kernel's ephemeral range, so that no outgoing connection (of a driver, of
    a sidecar starting next to it) can take one before its sidecar listens on it.
    """
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    chosen: list[int] = []
    with contextlib.ExitStack() as held:
        for port in _PORTS.sample(range(10_000, low), min(200, low - 10_000)):
            try:
                for host in hosts:
                    sock = held.enter_context(socket.socket())
                    sock.bind((host, port))
            except OSError:
                continue
            chosen.append(port)
            if len(chosen) == n:
                return chosen
    raise RuntimeError(f"not {n} free ports on {hosts}")


def _loopback_aliases() -> bool:
    try:
        with socket.socket() as sock:
            sock.bind(("127.0.0.2", 0))
    except OSError:
        return False
    return True


def _addresses(layout: str) -> tuple[list[tuple[str, int]], list[int]]:
    """Where the members listen for CQL, and their metrics ports (on 127.0.0.1)."""
    if layout == "ports":
        ports = _ports(2 * MEMBERS)
        return [("127.0.0.1", p) for p in ports[:MEMBERS]], ports[MEMBERS:]
    if not _loopback_aliases():
        pytest.skip("127.0.0.2 cannot be bound here (needs Linux's whole 127/8 loopback)")
    hosts = tuple(f"127.0.0.{i + 2}" for i in range(MEMBERS))
    port = _ports(1, hosts)[0]
    return [(host, port) for host in hosts], _ports(MEMBERS)


def _drain(member: Member) -> None:
    assert member.proc.stdout is not None
    for line in member.proc.stdout:
        member.output.append(line.rstrip())


@contextlib.contextmanager
def _sidecar_ring(emulator: EmulatorThread, layout: str,
                  *flags: str) -> Iterator[SidecarRingProcs]:
    """Start `MEMBERS` sidecar processes in front of `emulator`, wait until each is
    ready; on the way out shut down the drivers, check that no live member has a read
    in flight, and stop every process (SIGTERM, then SIGKILL)."""
    addresses, metrics_ports = _addresses(layout)
    peers = ",".join(f"{host}:{port}" for host, port in addresses)
    members: list[Member] = []
    threads: list[threading.Thread] = []
    procs = SidecarRingProcs(emulator, members, SidecarRing(
        member_name(*addresses[0]), [member_name(h, p) for h, p in addresses], vnodes=VNODES))
    try:
        for (host, port), metrics in zip(addresses, metrics_ports, strict=True):
            proc = subprocess.Popen(
                [sys.executable, "-m", "coalesce", "sidecar",
                 "--upstream", f"{emulator.host}:{emulator.port}", "--listen", f"{host}:{port}",
                 "--peers", peers, "--vnodes", str(VNODES), "--metrics", f"127.0.0.1:{metrics}",
                 "--reconnect-delay", "50ms", "--reconnect-max-delay", "500ms", *flags],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            member = Member(host, port, metrics, proc)
            members.append(member)
            thread = threading.Thread(target=_drain, args=(member,), daemon=True)
            thread.start()
            threads.append(thread)
        deadline = time.monotonic() + READY_WITHIN
        for member in members:
            while not member.ready():
                assert member.alive, f"{member.name} exited:\n" + "\n".join(member.output)
                assert time.monotonic() < deadline, (
                    f"{member.name} not ready after {READY_WITHIN}s:\n" + "\n".join(member.output))
                time.sleep(0.02)
        yield procs
        for cluster in procs.clusters:
            cluster.shutdown()
        live = [m for m in members if m.alive]
        _eventually(lambda: all(m.counts().inflight == 0 for m in live))
    finally:
        for cluster in procs.clusters:  # again if the test failed: shutdown is idempotent
            cluster.shutdown()
        for member in members:
            if member.alive:
                member.proc.terminate()
        for member in members:
            try:
                member.proc.wait(BOUND)
            except subprocess.TimeoutExpired:
                member.proc.kill()
                member.proc.wait()
        for thread in threads:
            thread.join(BOUND)


def _eventually(predicate: Callable[[], object], timeout: float = BOUND) -> None:
    """Poll observable state (another process's metrics) until it holds; fail after
    `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "the state never came"
        time.sleep(0.02)


# -- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ring_emulator() -> Iterator[EmulatorThread]:
    """The emulator every ring of the module reads from, with keyspaces ``rf1``
    (replication factor 1) and ``rf3`` (3), each with a table ``kv (k int, v text)``."""
    with EmulatorThread(read_latency=0.0, per_row=0.0, write_latency=0.0) as emu:
        cluster = Cluster([emu.host], port=emu.port, protocol_version=4)
        try:
            session = cluster.connect()
            for rf in (1, 3):
                session.execute(f"CREATE KEYSPACE rf{rf} WITH replication = "
                                f"{{'class': 'SimpleStrategy', 'replication_factor': {rf}}}")
                session.execute(f"CREATE TABLE rf{rf}.kv (k int PRIMARY KEY, v text)")
        finally:
            cluster.shutdown()
        yield emu


@pytest.fixture(scope="module")
def ring(ring_emulator: EmulatorThread) -> Iterator[SidecarRingProcs]:
    """The ring on distinct addresses: every driver can route by token."""
    with _sidecar_ring(ring_emulator, "addresses") as ring:
        yield ring


@pytest.fixture(scope="module")
def ports_ring(ring_emulator: EmulatorThread) -> Iterator[SidecarRingProcs]:
    """The ring on one address, distinct ports."""
    with _sidecar_ring(ring_emulator, "ports") as ring:
        yield ring


@pytest.fixture(params=["addresses", "ports"])
def any_ring(request: pytest.FixtureRequest) -> SidecarRingProcs:
    """The ring in each layout: `ring`, then `ports_ring`."""
    name = "ring" if request.param == "addresses" else "ports_ring"
    ring: SidecarRingProcs = request.getfixturevalue(name)
    return ring


def _owned(ring: SidecarRingProcs, keys: list[int]) -> list[int]:
    """How many of `keys` each member owns."""
    owned = [0] * len(ring.members)
    for key in keys:
        owned[ring.owner(key)] += 1
    return owned


def _deltas(ring: SidecarRingProcs, before: list[Counts]) -> list[Counts]:
    return [after - start for after, start in zip(ring.counts(), before, strict=True)]


# -- the tests ---------------------------------------------------------------------------------


def test_each_member_shows_cassandra_driver_the_k_sidecars_and_tokens_covering_the_ring_once(
    any_ring: SidecarRingProcs,
) -> None:
    ring = any_ring
    expected = {(m.host, m.port) for m in ring.members}
    for contact, member in enumerate(ring.members):
        session = ring.session(contact=contact)
        cluster = session.cluster
        hosts = cluster.metadata.all_hosts()
        assert {(h.endpoint.address, h.endpoint.port) for h in hosts} == expected
        assert all(h.is_up for h in hosts)
        token_map = cluster.metadata.token_map
        assert len(token_map.ring) == MEMBERS * VNODES  # a token has exactly one owner
        for host in hosts:
            index = ring.index_of(host.endpoint.address, host.endpoint.port)
            assert host.host_id == host_id_for(host.endpoint.address, host.endpoint.port)
            own = ring.ring.member(ring.members[index].name)
            assert own is not None
            tokens = {t.value for t, owner in token_map.token_to_host_owner.items()
                      if owner is host}
            assert tokens == set(own.tokens)
        # And asked directly, this member lists the others in both peers tables.
        here = next(h for h in hosts if (h.endpoint.address, h.endpoint.port)
                    == (member.host, member.port))
        v2 = session.execute("SELECT native_address, native_port, tokens FROM system.peers_v2",
                             host=here).all()
        assert sorted((r.native_address, r.native_port) for r in v2) == sorted(
            expected - {(member.host, member.port)})
        v1 = session.execute("SELECT rpc_address, tokens FROM system.peers", host=here).all()
        assert len(v1) == MEMBERS - 1
        assert {frozenset(r.tokens) for r in v1} == {frozenset(r.tokens) for r in v2}
        cluster.shutdown()


def test_cassandra_driver_token_aware_sends_each_partition_to_its_owner_only(
    any_ring: SidecarRingProcs,
) -> None:
    ring = any_ring
    # RF=1: one replica, so the policy's shuffle_replicas (False in cassandra-driver,
    # True in scylla-driver) cannot matter.
    session = ring.session(TokenAwarePolicy(RoundRobinPolicy()))
    cluster = session.cluster
    prepared = session.prepare(READ.format("rf1"))
    for key in KEYS:
        routing_key = prepared.bind((key,)).routing_key
        assert routing_key == _int(key)
        replicas = cluster.metadata.get_replicas("rf1", routing_key)
        assert [ring.index_of(h.endpoint.address, h.endpoint.port) for h in replicas] == [
            ring.owner(key)]
    before = ring.counts()
    results = execute_concurrent_with_args(session, prepared, [(k,) for k in KEYS],
                                           concurrency=32, raise_on_first_error=True)
    assert all(ok for ok, _ in results)
    deltas = _deltas(ring, before)
    assert [d.from_drivers for d in deltas] == _owned(ring, KEYS)
    assert [d.merged for d in deltas] == _owned(ring, KEYS)
    assert all(d.to_owner == d.fallback == d.for_member == 0 for d in deltas)  # nothing crossed


async def test_acsylla_routes_each_partition_to_its_owner_only(ring: SidecarRingProcs) -> None:
    contact = ring.members[0]
    cluster = acsylla.create_cluster(
        [contact.host], port=contact.port, log_level="error", connect_timeout=5,
        request_timeout=BOUND,
    )
    session = await cluster.create_session()
    try:
        prepared = await session.create_prepared(READ.format("rf1"))
        before = ring.counts()
        await _acsylla_reads(session, prepared, KEYS)
        deltas = _deltas(ring, before)
    finally:
        await session.close()
    assert [d.from_drivers for d in deltas] == _owned(ring, KEYS)
    assert all(d.to_owner == d.fallback == d.for_member == 0 for d in deltas)


async def _acsylla_reads(session: Any, prepared: Any, keys: list[int]) -> None:
    for at in range(0, len(keys), 32):
        statements = []
        for key in keys[at:at + 32]:
            statement = prepared.bind()
            statement.bind_list([key])
            statements.append(statement)
        await asyncio.gather(*(session.execute(s) for s in statements))


def _node_replicas(ring: SidecarRingProcs, keyspace: str, keys: list[int],
                   execute: bool) -> dict[str, Any]:
    assert NODE is not None
    contact = ring.members[0]
    argv = [NODE, str(NODE_DIR / "replicas.js"), contact.host, str(contact.port), keyspace,
            "kv", *(["--execute"] if execute else [])]
    done = subprocess.run(argv, input=" ".join(map(str, keys)), capture_output=True, text=True,
                          timeout=30, check=False)
    assert done.returncode == 0, done.stderr
    report: dict[str, Any] = json.loads(done.stdout)
    return report


@needs_node
def test_node_driver_replicas_are_the_ring_owners_and_its_reads_arrive_there(
    ring: SidecarRingProcs,
) -> None:
    before = ring.counts()
    report = _node_replicas(ring, "rf1", KEYS, execute=True)
    deltas = _deltas(ring, before)
    assert sorted(report["hosts"]) == sorted(f"{m.host}:{m.port}" for m in ring.members)
    for key in KEYS:
        assert report["replicas"][str(key)] == [
            "{0.host}:{0.port}".format(ring.members[ring.owner(key)])]
    assert report["executed"] == len(KEYS)
    assert [d.from_drivers for d in deltas] == _owned(ring, KEYS)
    assert all(d.to_owner == d.fallback == d.for_member == 0 for d in deltas)


@pytest.mark.parametrize("driver", ["acsylla", pytest.param("node", marks=needs_node)])
async def test_a_driver_reading_only_system_peers_sees_one_member_per_address_which_forwards(
    ports_ring: SidecarRingProcs, driver: str,
) -> None:
    """The cpp-driver logs 'system.peers on 127.0.0.1 contains a line with rpc_address
    for itself ... Ignoring this entry' for every other member; the Node.js driver
    maps them all onto the contact point. Either way the contact point gets every read
    and the ring merges each at its owner."""
    ring = ports_ring
    contact = ring.members[0]
    keys = KEYS[:100]
    before = ring.counts()
    if driver == "acsylla":
        cluster = acsylla.create_cluster([contact.host], port=contact.port, log_level="error",
                                         connect_timeout=5, request_timeout=BOUND)
        session = await cluster.create_session()
        try:
            prepared = await session.create_prepared(READ.format("rf1"))
            await _acsylla_reads(session, prepared, keys)
        finally:
            await session.close()
    else:
        report = await asyncio.to_thread(_node_replicas, ring, "rf1", keys, True)
        assert report["hosts"] == [f"{contact.host}:{contact.port}"]
    deltas = _deltas(ring, before)
    owned = _owned(ring, keys)
    assert [d.from_drivers for d in deltas] == [len(keys), 0, 0]
    assert deltas[0].to_owner == len(keys) - owned[0]
    assert [d.for_member >= n for d, n in zip(deltas[1:], owned[1:], strict=True)] == [True] * 2


def test_a_herd_spread_over_three_replicas_costs_one_upstream_read(
    ring: SidecarRingProcs,
) -> None:
    """RF=3 with shuffled replicas: the herd lands on every member; each non-owner sends
    its flight to the owner, which merges them with its own."""
    session = ring.session(TokenAwarePolicy(RoundRobinPolicy(), shuffle_replicas=True))
    session.execute("INSERT INTO rf3.kv (k, v) VALUES (%s, %s)", (KEYS[0], "herd"))
    prepared = session.prepare(READ.format("rf3"))
    owner = ring.owner(KEYS[0])
    emu = ring.emulator
    selects = emu.statements["select"]
    before = ring.counts()
    hold = emu.call(emu.emulator.hold_reads)
    herd = 300
    futures: list[ResponseFuture] = []
    try:
        futures = [session.execute_async(prepared, (KEYS[0],)) for _ in range(herd)]

        def all_arrived_and_joined() -> bool:
            deltas = _deltas(ring, before)
            others = [d for i, d in enumerate(deltas) if i != owner]
            return (sum(d.from_drivers for d in deltas) >= herd
                    and deltas[owner].for_member == sum(d.to_owner for d in others))

        _eventually(all_arrived_and_joined)
        assert emu.call(len, hold) == 1
    finally:
        emu.call(hold.release)
    rows = [f.result().all() for f in futures]  # each within the request timeout
    assert all([(r.k, r.v) for r in result] == [(KEYS[0], "herd")] for result in rows)
    assert emu.statements["select"] - selects == 1
    deltas = _deltas(ring, before)
    assert all(d.from_drivers > 0 for d in deltas)  # the driver spread it over the replicas
    assert [d.to_owner for i, d in enumerate(deltas) if i != owner] == [1, 1]  # one flight each
    assert deltas[owner].to_owner == 0 and all(d.fallback == 0 for d in deltas)


def test_a_member_killed_mid_read_costs_no_hung_request_and_leaves_no_flight_behind(
    ring_emulator: EmulatorThread,
) -> None:
    """SIGKILL a member while reads are in flight at it, both from a driver and from
    other members; the static peer list keeps it in everyone's view, so the members
    keep trying it and serve its partitions themselves once it does not answer."""
    peer_timeout = 0.5
    with _sidecar_ring(ring_emulator, "addresses", "--peer-timeout", f"{peer_timeout}s") as ring:
        # Token-aware, and round-robin: the second sends most of the victim's partitions
        # to the other members, which forward them to the victim.
        sessions = [ring.session(TokenAwarePolicy(RoundRobinPolicy()), request_timeout=5.0),
                    ring.session(RoundRobinPolicy(), request_timeout=5.0)]
        victim = 2
        theirs = [k for k in KEYS if ring.owner(k) == victim][:30]
        keys = theirs + [k for k in KEYS if ring.owner(k) != victim][:30]
        insert = sessions[0].prepare("INSERT INTO rf1.kv (k, v) VALUES (?, ?)")
        execute_concurrent_with_args(sessions[0], insert, [(k, f"v{k}") for k in keys],
                                     raise_on_first_error=True)
        prepared = [s.prepare(READ.format("rf1")) for s in sessions]

        def send_all() -> list[tuple[int, ResponseFuture]]:
            return [(k, s.execute_async(p, (k,)))
                    for s, p in zip(sessions, prepared, strict=True) for k in keys]

        def check(futures: list[tuple[int, ResponseFuture]]) -> None:
            for key, future in futures:  # each within the driver's request timeout
                assert [(r.k, r.v) for r in future.result()] == [(key, f"v{key}")]

        check(send_all())  # every connection open, every member taught the statement
        emu = ring.emulator
        start = ring.counts()
        hold = emu.call(emu.emulator.hold_reads)
        try:
            in_flight = send_all()
            _eventually(lambda: _deltas(ring, start)[victim].for_member >= 1
                        and sum(d.from_drivers for d in _deltas(ring, start)) >= len(in_flight))
            ring.kill(victim)
        finally:
            emu.call(hold.release)
        started = time.monotonic()
        check(in_flight)  # retried by the driver, or served by the member that forwarded
        assert time.monotonic() - started < peer_timeout + 2.0
        live = [i for i, m in enumerate(ring.members) if m.alive]
        assert sum(ring.members[i].counts().fallback - start[i].fallback for i in live) >= 1
        before = ring.counts()
        for _ in range(3):  # the victim stays in the ring: its partitions cost no wait
            started = time.monotonic()
            check(send_all())
            assert time.monotonic() - started < peer_timeout + 2.0
        assert sum(d.from_drivers for d in _deltas(ring, before)) == 3 * 2 * len(keys)
        _eventually(lambda: all(ring.members[i].counts().inflight == 0 for i in live))


def test_a_hung_member_delays_reads_forwarded_to_it_by_about_twice_the_peer_timeout(
    ring_emulator: EmulatorThread,
) -> None:
    """SIGSTOP, not SIGKILL: the member's sockets stay open and its kernel still
    accepts connections, as for a paused container or a partition that drops packets.
    Its silence is noticed within ``peer_timeout`` and a ping left unanswered for another
    ``peer_timeout`` closes the connection: the read is then served where it landed."""
    peer_timeout, request_timeout = 0.3, 3.0
    with _sidecar_ring(ring_emulator, "addresses", "--peer-timeout", f"{peer_timeout}s",
                       "--request-timeout", f"{request_timeout}s") as ring:
        session = ring.session(WhiteListRoundRobinPolicy([ring.members[0].host]), pools=1)
        prepared = session.prepare(READ.format("rf1"))
        hung = 2
        theirs = [k for k in KEYS if ring.owner(k) == hung][:3]
        session.execute(prepared, (theirs[0],))  # member 0 now has a connection to it
        ring.members[hung].proc.send_signal(signal.SIGSTOP)
        try:
            for key in theirs[1:]:  # two flights, each forwarded to the hung owner
                started = time.monotonic()
                session.execute(prepared, (key,))
                assert time.monotonic() - started < peer_timeout + 1.0
        finally:
            ring.members[hung].proc.send_signal(signal.SIGCONT)
