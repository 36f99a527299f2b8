"""Where real drivers send reads in a ring of sidecars: to each partition's owner, or not.

    python benchmarks/ring_drivers.py [--members 3] [--keys 1000] [--layout addresses]
                                      [--json PATH]

An emulator and ``--members`` sidecars, each its own process started through its
command line (``coalesce sidecar --peers ...``) and observed through its ``/metrics``
only. Each driver reads ``--keys`` different partitions once each (prepared SELECT by
partition key, 32 in flight), from a keyspace with replication factor 1 and one with
3 (SimpleStrategy). The sidecars never rewrite replication, so at RF=3 a token-aware
driver may pick any of the three replicas it computes from the tokens the members
advertise; only the first of them is the partition's owner, the member that merges
its reads. A read reaching another member is sent on to the owner (one hop): it still
merges there, for one more round trip. Per member, from /metrics:

  requests   EXECUTE frames from drivers: ``coalesce_sidecar_frames_total{EXECUTE}``
             minus the reads other members sent it (``ring_reads{for_member}``);
  forwarded  reads it did not own and sent on (``ring_reads{to_owner}``); every read
             is of a different partition, so a read is a flight.

Drivers: cassandra-driver (or scylla-driver, whichever is installed) with
``TokenAwarePolicy(RoundRobinPolicy(), shuffle_replicas=False|True)`` and, as the
baseline, plain ``RoundRobinPolicy``; acsylla (the cpp-driver: token-aware by default)
with replicas shuffled (its default) and not; the Node.js cassandra-driver with its
default policy, through ``tests/node/replicas.js`` (skipped without ``node`` and ``npm ci
--prefix tests/node``).

``--layout addresses`` (default) puts every member on its own loopback address
(127.0.0.2, ...) and one port, as pods are; ``ports`` puts them all on 127.0.0.1, one
port each, where only drivers reading ``system.peers_v2`` tell the members apart.
The table goes to stdout and, with the drivers' versions, to ``--json`` (default
benchmarks/out/ring_drivers.json). The shares are properties of the drivers' policies,
not of this machine; only ``requests`` is exact, the shuffled shares vary by run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import random
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import _procs  # benchmarks/_procs.py: this script runs as `python benchmarks/ring_drivers.py`

from coalesce.cql import (
    Consistency,
    FrameDecoder,
    Opcode,
    Query,
    QueryParameters,
    Startup,
    encode_frame,
)

_OUT = Path(__file__).with_name("out") / "ring_drivers.json"
_NODE_DIR = Path(__file__).resolve().parent.parent / "tests" / "node"
_READ = "SELECT k FROM {}.kv WHERE k = ?"
_CONCURRENCY = 32


@dataclass(frozen=True)
class Row:
    driver: str
    policy: str
    rf: int
    requests: int
    forwarded: int
    per_session: tuple[float, ...]
    """The share at the owner in each session (client) separately."""

    @property
    def at_owner(self) -> float:
        return 1 - self.forwarded / self.requests if self.requests else 0.0


# -- the ring ------------------------------------------------------------------------------


def _addresses(layout: str, members: int) -> list[tuple[str, int]]:
    if layout == "ports":
        return [("127.0.0.1", _procs.free_port()) for _ in range(members)]
    hosts = [f"127.0.0.{i + 2}" for i in range(members)]
    for _ in range(50):
        port = _procs.free_port()
        with contextlib.ExitStack() as held:
            try:
                for host in hosts:
                    held.enter_context(socket.socket()).bind((host, port))
            except OSError:
                continue
        return [(host, port) for host in hosts]
    raise SystemExit(f"no port free on all of {hosts} (needs Linux's whole 127/8 loopback)")


def _warm(host: str, port: int) -> None:
    """Read ``system.local`` through a fresh member before any driver connects.

    A member fills the data center, rack and version columns of its ``system.peers``
    rows from Scylla's ``system.local`` once it has read it; before that a driver's
    first ``system.peers`` may find them null and drop every peer.
    """
    with socket.create_connection((host, port), timeout=10) as sock:
        decoder = FrameDecoder()
        for opcode, body in ((Opcode.STARTUP, Startup({"CQL_VERSION": "3.0.0"}).encode()),
                             (Opcode.QUERY, Query("SELECT * FROM system.local",
                                                  QueryParameters(Consistency.ONE)).encode())):
            sock.sendall(encode_frame(opcode, body, stream=1))
            while True:
                data = sock.recv(65536)
                if not data:
                    raise SystemExit(f"{host}:{port} closed the connection")
                if list(decoder.feed(data)):
                    break


@contextlib.contextmanager
def _ring(members: int, layout: str, vnodes: int) -> Iterator[list[_procs.Server]]:
    with contextlib.ExitStack() as stack:
        emulator = stack.enter_context(_procs.emulator("0"))
        _schema(emulator.port)
        peers = _addresses(layout, members)
        servers = [stack.enter_context(_procs.ring_member(emulator.port, address, peers,
                                                          vnodes))
                   for address in peers]
        for (host, port), server in zip(peers, servers, strict=True):
            _wait_ready(server)
            _warm(host, port)
        yield servers


def _wait_ready(server: _procs.Server) -> None:
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + 20
    while True:
        with contextlib.suppress(urllib.error.URLError, OSError), urllib.request.urlopen(
                f"http://127.0.0.1:{server.metrics_port}/readyz", timeout=1) as reply:
            if reply.status == 200:
                return
        if time.monotonic() > deadline:
            raise SystemExit(f"{server.name} not ready:\n" + "\n".join(server.output))
        time.sleep(0.05)


def _schema(port: int) -> None:
    from cassandra.cluster import EXEC_PROFILE_DEFAULT, Cluster, ExecutionProfile
    from cassandra.policies import RoundRobinPolicy

    profile = ExecutionProfile(load_balancing_policy=RoundRobinPolicy())
    cluster = Cluster(["127.0.0.1"], port=port, protocol_version=4,
                      execution_profiles={EXEC_PROFILE_DEFAULT: profile})
    try:
        session = cluster.connect()
        for rf in (1, 3):
            session.execute(f"CREATE KEYSPACE rf{rf} WITH replication = "
                            f"{{'class': 'SimpleStrategy', 'replication_factor': {rf}}}")
            session.execute(f"CREATE TABLE rf{rf}.kv (k int PRIMARY KEY, v text)")
    finally:
        cluster.shutdown()


def _counts(server: _procs.Server) -> tuple[float, float]:
    """(requests from drivers, reads sent on to their owner) so far."""
    port = server.metrics_port
    assert port is not None

    def value(name: str, labels: str) -> float:
        found = _procs.metric_sum(port, name, labels)
        if found is None:
            raise SystemExit(f"{server.name}: no {name}{{{labels}}} on /metrics")
        return found

    # An opcode appears on /metrics once a frame of it came.
    executes = _procs.metric_sum(port, "coalesce_sidecar_frames_total", 'opcode="EXECUTE"') or 0.0
    for_member = value("coalesce_sidecar_ring_reads_total", 'way="for_member"')
    return executes - for_member, value("coalesce_sidecar_ring_reads_total", 'way="to_owner"')


def _measure(servers: list[_procs.Server], run: Callable[[], None]) -> tuple[int, int]:
    before = [_counts(s) for s in servers]
    run()
    after = [_counts(s) for s in servers]
    requests = sum(a[0] - b[0] for a, b in zip(after, before, strict=True))
    forwarded = sum(a[1] - b[1] for a, b in zip(after, before, strict=True))
    return round(requests), round(forwarded)


# -- the drivers -----------------------------------------------------------------------------


def _cassandra(contact: tuple[str, int], members: int, policy: Any, keyspace: str,
               keys: list[int]) -> Callable[[], None]:
    """Connect (once every member has a pool: a statement prepared before would be
    re-prepared on the late ones, which counts as extra requests); the returned
    function does the reads."""
    from cassandra.cluster import EXEC_PROFILE_DEFAULT, Cluster, ExecutionProfile
    from cassandra.concurrent import execute_concurrent_with_args

    profile = ExecutionProfile(load_balancing_policy=policy, request_timeout=20)
    cluster = Cluster([contact[0]], port=contact[1], protocol_version=4,
                      execution_profiles={EXEC_PROFILE_DEFAULT: profile})
    session = cluster.connect()
    deadline = time.monotonic() + 10
    while len(session.get_pool_state()) < members and time.monotonic() < deadline:
        time.sleep(0.02)
    prepared = session.prepare(_READ.format(keyspace))

    def run() -> None:
        try:
            execute_concurrent_with_args(session, prepared, [(k,) for k in keys],
                                         concurrency=_CONCURRENCY, raise_on_first_error=True)
        finally:
            cluster.shutdown()

    return run


def _acsylla(contact: tuple[str, int], shuffle: bool, keyspace: str, keys: list[int]) -> None:
    import acsylla

    async def main() -> None:
        cluster = acsylla.create_cluster([contact[0]], port=contact[1], log_level="error",
                                         token_aware_routing_shuffle_replicas=shuffle,
                                         connect_timeout=5, request_timeout=20)
        session = await cluster.create_session()
        try:
            prepared = await session.create_prepared(_READ.format(keyspace))
            for at in range(0, len(keys), _CONCURRENCY):
                statements = []
                for key in keys[at:at + _CONCURRENCY]:
                    statement = prepared.bind()
                    statement.bind_list([key])
                    statements.append(statement)
                await asyncio.gather(*(session.execute(s) for s in statements))
        finally:
            await session.close()

    asyncio.run(main())


def _node(contact: tuple[str, int], keyspace: str, keys: list[int]) -> None:
    node = shutil.which("node")
    assert node is not None
    done = subprocess.run(
        [node, str(_NODE_DIR / "replicas.js"), contact[0], str(contact[1]), keyspace, "kv",
         "--execute"],
        input=" ".join(map(str, keys)), capture_output=True, text=True, timeout=120,
        check=False)
    if done.returncode != 0:
        raise SystemExit(f"tests/node/replicas.js failed:\n{done.stderr}")


def _versions() -> dict[str, str]:
    found: dict[str, str] = {}
    for package in ("cassandra-driver", "scylla-driver", "acsylla"):
        with contextlib.suppress(PackageNotFoundError):
            found[package] = version(package)
    package_json = _NODE_DIR / "node_modules" / "cassandra-driver" / "package.json"
    if package_json.is_file():
        found["cassandra-driver (Node.js)"] = json.loads(package_json.read_text())["version"]
    return found


def _python_driver() -> str:
    try:
        version("scylla-driver")
    except PackageNotFoundError:
        return "cassandra-driver"
    return "scylla-driver"


def run(members: int, keys: int, layout: str, vnodes: int, seed: int,
        sessions: int) -> list[Row]:
    from cassandra.policies import RoundRobinPolicy, TokenAwarePolicy

    rng = random.Random(seed)
    python_driver = _python_driver()
    has_node = (shutil.which("node") is not None
                and (_NODE_DIR / "node_modules" / "cassandra-driver").is_dir())
    rows: list[Row] = []
    with _ring(members, layout, vnodes) as servers:
        contact = ("127.0.0.1" if layout == "ports" else "127.0.0.2", servers[0].port)
        for rf in (1, 3):
            keyspace = f"rf{rf}"
            plans: list[tuple[str, str, Callable[[str, list[int]], Callable[[], None]]]] = [
                (python_driver, "TokenAwarePolicy(RoundRobinPolicy(), shuffle_replicas=False)",
                 lambda ks, k: _cassandra(contact, members,
                                          TokenAwarePolicy(RoundRobinPolicy(), False), ks, k)),
                (python_driver, "TokenAwarePolicy(RoundRobinPolicy(), shuffle_replicas=True)",
                 lambda ks, k: _cassandra(contact, members,
                                          TokenAwarePolicy(RoundRobinPolicy(), True), ks, k)),
                (python_driver, "RoundRobinPolicy() (not token-aware)",
                 lambda ks, k: _cassandra(contact, members, RoundRobinPolicy(), ks, k)),
                ("acsylla", "token-aware, shuffle_replicas=True (default)",
                 lambda ks, k: lambda: _acsylla(contact, True, ks, k)),
                ("acsylla", "token-aware, shuffle_replicas=False",
                 lambda ks, k: lambda: _acsylla(contact, False, ks, k)),
            ]
            if has_node:
                plans.append(("Node.js cassandra-driver", "default (token-aware)",
                              lambda ks, k: lambda: _node(contact, ks, k)))
            for driver, policy, prepare in plans:
                runs = [_measure(servers, prepare(keyspace, rng.sample(
                    range(-(2**31), 2**31), keys // sessions))) for _ in range(sessions)]
                requests = sum(r for r, _ in runs)
                forwarded = sum(f for _, f in runs)
                rows.append(Row(driver, policy, rf, requests, forwarded,
                                tuple(round(1 - f / r, 3) for r, f in runs)))
    return rows


def _table(rows: list[Row]) -> str:
    lines = [f"{'driver':<26}{'policy':<64}{'RF':>3}{'requests':>10}{'at owner':>10}"
             f"{'forwarded':>11}  at owner per session"]
    for row in rows:
        each = " ".join(f"{share:.0%}" for share in row.per_session)
        lines.append(f"{row.driver:<26}{row.policy:<64}{row.rf:>3}{row.requests:>10}"
                     f"{row.at_owner:>10.1%}{1 - row.at_owner:>11.1%}  {each}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--members", type=int, default=3, help="sidecars in the ring")
    parser.add_argument("--keys", type=int, default=1200,
                        help="partitions read, once each, per driver and RF")
    parser.add_argument("--sessions", type=int, default=4,
                        help="clients the keys are split over, one after the other (the "
                             "cpp-driver without shuffling picks one replica per client)")
    parser.add_argument("--layout", choices=["addresses", "ports"], default="addresses")
    parser.add_argument("--vnodes", type=int, default=256, help="ring positions per member")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", type=Path, default=_OUT)
    args = parser.parse_args(argv)
    started = time.monotonic()
    rows = run(args.members, args.keys, args.layout, args.vnodes, args.seed, args.sessions)
    print(_table(rows))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({
        "when": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "members": args.members, "keys": args.keys, "sessions": args.sessions,
        "layout": args.layout,
        "vnodes": args.vnodes, "versions": _versions(),
        "seconds": round(time.monotonic() - started, 1),
        "rows": [{**asdict(r), "at_owner": round(r.at_owner, 4)} for r in rows],
    }, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
