"""`coalesce bench herd --target sidecar`: a herd through K sidecar processes.

One emulator process, K sidecar processes in front of it, and this process sending
the herd over raw pipelined connections (`coalesce.bench.wire`): ``callers`` reads of
``channels`` hot channels (caller i reads channel i % channels), each one EXECUTE of
a prepared ``SELECT ... WHERE channel_id = ?``. Four scenarios, in one run:

- ``one sidecar``: every caller through one sidecar; the baseline of the ratios;
- ``ring, token-aware``: the K sidecars as a ring (``--peers``), each caller sent to
  the member owning its channel, as a token-aware driver would, from the tokens each
  member advertises in ``system.local``;
- ``ring, round-robin``: the same ring, the callers of each channel dealt over all K
  members in turn, so most reads reach a member that does not own them;
- ``independent``: K sidecars that know nothing of each other, callers dealt as in
  round-robin.

The emulator's read latency is the in-flight window. Upstream reads are the
difference of the emulator's ``select`` counter around each herd; forwards, fallbacks
and requests come from each sidecar's ``/metrics``; latency is send to answer as
the client sees it. A ring holds its promise when its upstream reads stay close to
one sidecar's (goal: at most 1.2x); independent sidecars cost about K times as many.
Before each herd every connection reads every channel once, so pools, prepared
statements and connections between members are warm.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import functools
import math
import random
import struct
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from coalesce.bench.herd import HerdConfig, HerdResult, _percentile
from coalesce.bench.processes import (
    Metrics,
    ServerGroup,
    ServerProcess,
    ServerStartError,
    free_ports,
)
from coalesce.bench.wire import MAX_STREAMS, CqlError, HerdConnection
from coalesce.cql import Execute, Opcode, QueryParameters, encode_frame
from coalesce.cql.token import murmur3_token

__all__ = [
    "INDEPENDENT",
    "ONE_SIDECAR",
    "RING_GOAL",
    "RING_ROUND_ROBIN",
    "RING_TOKEN_AWARE",
    "SidecarHerdConfig",
    "SidecarHerdResult",
    "format_goals",
    "format_table",
    "run_sidecar_herd",
]

ONE_SIDECAR: Final = "one sidecar"
RING_TOKEN_AWARE: Final = "ring, token-aware"
RING_ROUND_ROBIN: Final = "ring, round-robin"
INDEPENDENT: Final = "independent"
RING_GOAL: Final = 1.2
"""A ring's upstream reads, at most this times one sidecar's."""

KEYSPACE: Final = "coalesce_bench"
_SCHEMA = (
    f"CREATE KEYSPACE IF NOT EXISTS {KEYSPACE} WITH replication = "
    "{'class': 'SimpleStrategy', 'replication_factor': 1}",
    f"CREATE TABLE IF NOT EXISTS {KEYSPACE}.channel_messages (channel_id bigint,"
    " message_id bigint, author_id bigint, content text,"
    " PRIMARY KEY (channel_id, message_id)) WITH CLUSTERING ORDER BY (message_id DESC)",
)
_INSERT = (f"INSERT INTO {KEYSPACE}.channel_messages (channel_id, message_id, author_id,"
           " content) VALUES (?, ?, ?, ?)")
_SELECT = f"SELECT * FROM {KEYSPACE}.channel_messages WHERE channel_id = ? LIMIT 20"
_MESSAGES_PER_CHANNEL = 20
_BIGINT = struct.Struct(">q")


@dataclass
class SidecarHerdConfig:
    """A herd (callers, latency = the emulator's read latency, channels, spread, seed)
    through `sidecars` sidecar processes; ``connections`` client connections to each
    (more when a connection would need more than 32,767 streams)."""

    herd: HerdConfig = field(default_factory=HerdConfig)
    sidecars: int = 3
    shards: int = 4
    vnodes: int = 256
    connections: int = 16
    uvloop: bool = False

    def __post_init__(self) -> None:
        if self.sidecars < 2:
            raise ValueError(f"a ring needs at least 2 sidecars, got {self.sidecars}")
        if self.herd.channels > MAX_STREAMS:
            raise ValueError(f"at most {MAX_STREAMS:,} channels, got {self.herd.channels:,}")


@dataclass
class SidecarHerdResult(HerdResult):
    """A `HerdResult` (``cpu_us_per_caller`` is the sidecars' CPU) with the ring's
    counts, summed over its sidecars: reads sent to their owner (``to_owner``), served
    by a member after its owner failed (``fallbacks``), served for another member
    (``for_member``); ``ratio``, the upstream reads over one sidecar's; ``sidecars``,
    how many got callers (a member may own none of a few channels); ``per_sidecar``,
    each one's requests by path and ring reads by way."""

    sidecars: int = 1
    ratio: float | None = None
    to_owner: int = 0
    fallbacks: int = 0
    for_member: int = 0
    first_error: str | None = None
    per_sidecar: list[dict[str, float]] = field(default_factory=list, repr=False)

    @property
    def forwarded_share(self) -> float:
        """Reads a member sent to their owner, per caller."""
        return self.to_owner / self.callers if self.callers else 0.0

    def summary(self) -> dict[str, Any]:
        data = super().summary()
        data["forwarded_share"] = round(self.forwarded_share, 6)
        return data


Route = Callable[[int, int], int]
"""(channel, the caller's rank among that channel's callers) -> sidecar index."""


async def run_sidecar_herd(
    config: SidecarHerdConfig,
    *,
    progress: Callable[[str, int, int], None] | None = None,
) -> list[SidecarHerdResult]:
    """Run the four scenarios (module docstring) and return their results in the order
    one sidecar, ring token-aware, ring round-robin, independent.

    Every process started is stopped before this returns or raises, cancellation
    included. Raises `ServerStartError` if a server does not start, `CqlError` if a
    setup request fails, `TimeoutError` if a herd is not answered in time.
    """
    k = config.sidecars
    results: dict[str, SidecarHerdResult] = {}
    async with ServerGroup() as group:
        emulator = await _start_emulator(group, config)
        await _load(emulator, config.herd.channels)

        alone = await _start_sidecars(group, emulator, config, ring=False)
        async with _clients(alone, config) as conns:
            results[ONE_SIDECAR] = await _scenario(
                ONE_SIDECAR, lambda c, j: 0, conns, alone, emulator, config, progress)
            results[INDEPENDENT] = await _scenario(
                f"{INDEPENDENT} x{k}", lambda c, j: j % k, conns, alone, emulator, config,
                progress)
        await group.stop(*alone)

        ring = await _start_sidecars(group, emulator, config, ring=True)
        async with _clients(ring, config) as conns:
            owners = await _owners(conns, config.herd.channels)
            results[RING_TOKEN_AWARE] = await _scenario(
                f"{RING_TOKEN_AWARE} x{k}", lambda c, j: owners[c], conns, ring, emulator,
                config, progress)
            results[RING_ROUND_ROBIN] = await _scenario(
                f"{RING_ROUND_ROBIN} x{k}", lambda c, j: j % k, conns, ring, emulator,
                config, progress)
        await group.stop(*ring)
    ordered = [results[name] for name in
               (ONE_SIDECAR, RING_TOKEN_AWARE, RING_ROUND_ROBIN, INDEPENDENT)]
    baseline = ordered[0].upstream_reads
    for result in ordered:
        result.ratio = result.upstream_reads / baseline if baseline else None
    return ordered


# -- the servers ------------------------------------------------------------------------


_START_ATTEMPTS = 3


async def _start_emulator(group: ServerGroup, config: SidecarHerdConfig) -> ServerProcess:
    attempt = 1
    while True:
        port, metrics = free_ports(2)
        emulator = group.start("emulator", [
            "emulator", "--listen", f"127.0.0.1:{port}", "--metrics", f"127.0.0.1:{metrics}",
            "--shards", str(config.shards),
            "--read-latency", f"{round(config.herd.latency * 1e9)}ns",
            "--write-latency", "0s", "--per-row", "0s",
        ], port=port, metrics_port=metrics)
        try:
            await group.ready(emulator)
        except ServerStartError as exc:
            await group.stop(emulator)
            if not exc.address_in_use or attempt == _START_ATTEMPTS:
                raise
            attempt += 1
            continue
        return emulator


async def _start_sidecars(group: ServerGroup, emulator: ServerProcess,
                          config: SidecarHerdConfig, *, ring: bool) -> list[ServerProcess]:
    """`config.sidecars` sidecars in front of `emulator`: a ring of them or independent.

    All of them again, on new ports, if one finds its port taken (a ring's members
    are told each other's ports before they start)."""
    attempt = 1
    while True:
        try:
            return await _try_start_sidecars(group, emulator, config, ring=ring)
        except ServerStartError as exc:
            if not exc.address_in_use or attempt == _START_ATTEMPTS:
                raise
            attempt += 1


async def _try_start_sidecars(group: ServerGroup, emulator: ServerProcess,
                              config: SidecarHerdConfig, *, ring: bool) -> list[ServerProcess]:
    ports = free_ports(2 * config.sidecars)
    listen, metrics = ports[::2], ports[1::2]
    peers = ",".join(f"127.0.0.1:{p}" for p in listen)
    kind = "ring" if ring else "sidecar"
    servers = []
    for i, (port, metrics_port) in enumerate(zip(listen, metrics, strict=True)):
        argv = ["sidecar", "--listen", f"127.0.0.1:{port}", "--upstream", emulator.address,
                "--metrics", f"127.0.0.1:{metrics_port}", "--drain-timeout", "2s",
                "--log-level", "warning"]
        if ring:
            argv += ["--peers", peers, "--vnodes", str(config.vnodes)]
        if config.uvloop:
            argv.append("--uvloop")
        servers.append(group.start(f"{kind}-{i}", argv, port=port, metrics_port=metrics_port))
    try:
        for server in servers:
            await group.ready(server)
    except ServerStartError:
        await group.stop(*servers)
        raise
    if ring:  # a static ring is whole at start; wait for it all the same, bounded
        deadline = time.monotonic() + group.start_timeout
        while True:
            scrapes = await _scrape_all(servers)
            members = [_value(s, "coalesce_sidecar_ring_members") for s in scrapes]
            if all(m == config.sidecars for m in members):
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"ring members seen: {members}, want {config.sidecars}")
            await asyncio.sleep(0.05)
    return servers


async def _load(emulator: ServerProcess, channels: int) -> None:
    """The schema and `_MESSAGES_PER_CHANNEL` messages per channel, written directly."""
    conn = await HerdConnection.connect("127.0.0.1", emulator.port)
    try:
        for ddl in _SCHEMA:
            await conn.query(ddl)
        insert = await conn.prepare(_INSERT)
        bodies = [
            Execute(insert, QueryParameters(1, [
                _BIGINT.pack(channel), _BIGINT.pack(message), _BIGINT.pack(1),
                f"message {message}".encode()])).encode()
            for channel in range(channels) for message in range(_MESSAGES_PER_CHANNEL)
        ]
        for start in range(0, len(bodies), MAX_STREAMS):
            batch = bodies[start:start + MAX_STREAMS]
            streams = list(range(1, len(batch) + 1))
            frames = [encode_frame(Opcode.EXECUTE, body, stream=stream)
                      for stream, body in zip(streams, batch, strict=True)]
            conn.reset()
            await _answered([conn], len(batch), functools.partial(conn.send, streams, frames),
                            timeout=60)
            if conn.errors:
                raise CqlError(f"writing the channels' messages: {conn.first_error}")
    finally:
        conn.close()


# -- the clients -----------------------------------------------------------------------------


@dataclass
class _Sidecar:
    """The herd's connections to one sidecar and the encoded read of each channel."""

    conns: list[HerdConnection]
    reads: list[bytes]  # channel -> EXECUTE body

    def frame(self, channel: int, stream: int) -> bytes:
        return encode_frame(Opcode.EXECUTE, self.reads[channel], stream=stream)


@contextlib.asynccontextmanager
async def _clients(servers: Sequence[ServerProcess], config: SidecarHerdConfig
                   ) -> AsyncIterator[list[_Sidecar]]:
    per_sidecar = max(config.connections, math.ceil(config.herd.callers / MAX_STREAMS))
    opened: list[HerdConnection] = []
    try:
        sidecars = []
        for server in servers:
            conns = []
            for _ in range(per_sidecar):
                conn = await HerdConnection.connect("127.0.0.1", server.port)
                opened.append(conn)
                conns.append(conn)
            query_id = await conns[0].prepare(_SELECT)
            reads = [Execute(query_id, QueryParameters(1, [_BIGINT.pack(channel)])).encode()
                     for channel in range(config.herd.channels)]
            sidecars.append(_Sidecar(conns, reads))
        yield sidecars
    finally:
        for conn in opened:
            conn.close()


async def _owners(sidecars: list[_Sidecar], channels: int) -> list[int]:
    """The index of the member owning each channel, from the tokens each advertises in
    its ``system.local``: a token belongs to the smallest advertised token at or after
    it, wrapping around, as a token-aware driver reads the ring."""
    points: list[tuple[int, int]] = []
    for index, sidecar in enumerate(sidecars):
        (tokens,) = await sidecar.conns[0].column("SELECT tokens FROM system.local")
        if not isinstance(tokens, set | frozenset) or not tokens:
            raise CqlError(f"member {index} advertises no tokens: {tokens!r}")
        points += [(int(str(t)), index) for t in tokens]
    points.sort()
    positions = [t for t, _ in points]
    owners = []
    for channel in range(channels):
        at = bisect.bisect_left(positions, murmur3_token(_BIGINT.pack(channel)))
        owners.append(points[at % len(points)][1])
    return owners


# -- one scenario ------------------------------------------------------------------------------


async def _scenario(
    name: str,
    route: Route,
    sidecars: list[_Sidecar],
    servers: list[ServerProcess],
    emulator: ServerProcess,
    config: SidecarHerdConfig,
    progress: Callable[[str, int, int], None] | None,
) -> SidecarHerdResult:
    herd = config.herd
    conns = [conn for sidecar in sidecars for conn in sidecar.conns]
    # Warm-up: every sidecar reads every channel (so a member reaches every other
    # member), every connection at least once.
    for conn in conns:
        conn.reset()
    warm_reads = sum(max(herd.channels, len(s.conns)) for s in sidecars)

    def warm() -> None:
        for sidecar in sidecars:
            width = len(sidecar.conns)
            for i, conn in enumerate(sidecar.conns):
                reads = range(i, max(herd.channels, width), width)
                conn.send([n // width + 1 for n in reads],
                          [sidecar.frame(n % herd.channels, n // width + 1) for n in reads])

    await _answered(conns, warm_reads, warm, timeout=60)
    _check_errors(name + " (warm-up)", conns)

    # Who sends what: caller i reads channel i % channels, through sidecar
    # route(channel, rank) on its connections in turn, at its seeded arrival time.
    arrivals = random.Random(herd.seed)
    counts = [0] * len(sidecars)
    plan: list[tuple[float, HerdConnection, int, bytes]] = []
    for i in range(herd.callers):
        channel, rank = i % herd.channels, i // herd.channels
        s = route(channel, rank)
        sidecar, n = sidecars[s], counts[s]
        counts[s] += 1
        conn, stream = sidecar.conns[n % len(sidecar.conns)], n // len(sidecar.conns) + 1
        plan.append((arrivals.uniform(0, herd.spread), conn, stream,
                     sidecar.frame(channel, stream)))
    plan.sort(key=lambda item: item[0])

    for conn in conns:
        conn.reset()
    reads_before, sidecars_before = await _emulator_reads(emulator), await _scrape_all(servers)
    cpu_before = [server.cpu_seconds() for server in servers]
    sender = _Sender(plan)
    started = time.perf_counter()
    try:
        await _answered(conns, herd.callers, sender.start,
                        timeout=30 + herd.spread + herd.callers * herd.latency,
                        progress=None if progress is None else lambda done: progress(
                            name, done, herd.callers))
    finally:
        sender.cancel()
    wall = time.perf_counter() - started
    cpu_after = [server.cpu_seconds() for server in servers]
    reads_after, sidecars_after = await _emulator_reads(emulator), await _scrape_all(servers)

    per_sidecar = [_delta(before, after) for before, after
                   in zip(sidecars_before, sidecars_after, strict=True)]
    latencies = sorted(lat / 1e6 for conn in conns for lat in conn.latencies_ns)
    cpu = sum((a or 0.0) - (b or 0.0) for a, b in zip(cpu_after, cpu_before, strict=True))
    errors = sum(conn.errors for conn in conns)
    return SidecarHerdResult(
        mode=name,
        target=f"{len(servers)} sidecar processes -> emulator",
        callers=herd.callers,
        upstream_reads=int(reads_after - reads_before),
        errors=errors,
        wall_seconds=wall,
        cpu_us_per_caller=cpu / herd.callers * 1e6,
        p50_ms=_percentile(latencies, 0.50),
        p99_ms=_percentile(latencies, 0.99),
        max_ms=latencies[-1] if latencies else 0.0,
        latencies_ms=latencies,
        sidecars=sum(1 for c in counts if c),
        to_owner=int(sum(d["to_owner"] for d in per_sidecar)),
        fallbacks=int(sum(d["fallback"] for d in per_sidecar)),
        for_member=int(sum(d["for_member"] for d in per_sidecar)),
        first_error=next((c.first_error for c in conns if c.first_error), None),
        per_sidecar=per_sidecar,
    )


class _Sender:
    """Sends a plan's requests at their arrival times, each connection's due requests in
    one write (all of them at once when every arrival time is 0)."""

    def __init__(self, plan: list[tuple[float, HerdConnection, int, bytes]]) -> None:
        self._plan = plan
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._send_due(0.0, time.perf_counter())

    def _send_due(self, at: float, origin: float) -> None:
        plan, due = self._plan, 0
        batches: dict[HerdConnection, tuple[list[int], list[bytes]]] = {}
        while due < len(plan) and plan[due][0] <= at:
            _, conn, stream, frame = plan[due]
            streams, frames = batches.setdefault(conn, ([], []))
            streams.append(stream)
            frames.append(frame)
            due += 1
        for conn, (streams, frames) in batches.items():
            conn.send(streams, frames)
        self._plan = plan[due:]
        if self._plan and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._rest(origin))

    async def _rest(self, origin: float) -> None:
        while self._plan:
            await asyncio.sleep(max(0.0, self._plan[0][0] - (time.perf_counter() - origin)))
            self._send_due(time.perf_counter() - origin, origin)

    def cancel(self) -> None:
        if self._task is not None:
            self._task.cancel()


async def _answered(conns: list[HerdConnection], total: int, send: Callable[[], None], *,
                    timeout: float, progress: Callable[[int], None] | None = None) -> None:
    """Call `send`, then wait until `conns` have `total` answers between them (counted
    since their `reset`); `TimeoutError` past `timeout`, `CqlError` if one is lost."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()

    def on_answer() -> None:
        if not done.done() and sum(c.answered for c in conns) >= total:
            done.set_result(None)

    for conn in conns:
        conn.on_answer = on_answer
    lost = [conn.lost for conn in conns]
    try:
        send()
        deadline = loop.time() + timeout
        while not done.done():
            remaining = deadline - loop.time()
            if remaining <= 0:
                answered = sum(c.answered for c in conns)
                raise TimeoutError(f"{answered:,} of {total:,} answers after {timeout:g}s")
            await asyncio.wait([done, *lost], timeout=min(0.2, remaining),
                               return_when=asyncio.FIRST_COMPLETED)
            if any(f.done() for f in lost) and not done.done():
                raise CqlError("a connection to a sidecar was lost during the herd")
            if progress is not None:
                progress(sum(c.answered for c in conns))
    finally:
        for conn in conns:
            conn.on_answer = None
        if not done.done():
            done.cancel()


def _check_errors(name: str, conns: list[HerdConnection]) -> None:
    errors = sum(conn.errors for conn in conns)
    if errors:
        first = next(c.first_error for c in conns if c.first_error)
        raise CqlError(f"{name}: {errors} reads answered with an error, first: {first}")


# -- the counters ------------------------------------------------------------------------------


async def _scrape_all(servers: Sequence[ServerProcess]) -> list[Metrics]:
    return list(await asyncio.gather(*(asyncio.to_thread(s.scrape) for s in servers)))


async def _emulator_reads(emulator: ServerProcess) -> float:
    scrape = await asyncio.to_thread(emulator.scrape)
    return _value(scrape, "coalesce_emulator_statements_total", kind="select")


def _value(scrape: Metrics, name: str, **labels: str) -> float:
    """The sample `name` with exactly `labels`; `KeyError` (naming it) if absent, so a
    renamed metric fails the run instead of counting as 0."""
    key = (name, tuple(sorted(labels.items())))
    if key not in scrape:
        wanted = name + ("{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}"
                         if labels else "")
        raise KeyError(f"metric {wanted} not found")
    return scrape[key]


def _delta(before: Metrics, after: Metrics) -> dict[str, float]:
    """One sidecar's requests by path and ring reads by way during a herd."""
    out = {}
    for way in ("to_owner", "fallback", "for_member"):
        out[way] = (_value(after, "coalesce_sidecar_ring_reads_total", way=way)
                    - _value(before, "coalesce_sidecar_ring_reads_total", way=way))
    for path in ("merged", "forwarded", "local"):
        out[path] = (_value(after, "coalesce_sidecar_requests_total", path=path)
                     - _value(before, "coalesce_sidecar_requests_total", path=path))
    return out


# -- reporting ----------------------------------------------------------------------------------


def format_table(results: list[SidecarHerdResult]) -> str:
    header = ("scenario", "sidecars used", "callers", "upstream reads", "vs one", "forwarded",
              "fallbacks", "errors", "p50 ms", "p99 ms", "wall s", "sidecar CPU us/caller")
    rows = [header] + [
        (r.mode, str(r.sidecars), f"{r.callers:,}", f"{r.upstream_reads:,}",
         "-" if r.ratio is None else f"{r.ratio:.2f}x",
         f"{r.to_owner:,} ({r.forwarded_share:.1%})", f"{r.fallbacks:,}", f"{r.errors:,}",
         f"{r.p50_ms:.1f}", f"{r.p99_ms:.1f}", f"{r.wall_seconds:.2f}",
         f"{r.cpu_us_per_caller:.1f}")
        for r in results
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.rjust(w) if i else cell.ljust(w)
                       for i, (cell, w) in enumerate(zip(row, widths, strict=True)))
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_goals(results: list[SidecarHerdResult], sidecars: int) -> str:
    """One line per scenario saying how its ratio compares with the issue's goal."""
    lines = []
    for r in results[1:]:
        if r.ratio is None:
            lines.append(f"{r.mode}: no ratio (one sidecar read nothing upstream)")
        elif r.mode.startswith("ring"):
            verdict = "met" if r.ratio <= RING_GOAL else "NOT met"
            lines.append(f"{r.mode}: {r.ratio:.2f}x one sidecar's upstream reads "
                         f"(goal <= {RING_GOAL:g}x): {verdict}")
        else:
            lines.append(f"{r.mode}: {r.ratio:.2f}x one sidecar's upstream reads "
                         f"(expected about {sidecars}x)")
    errors = [r for r in results if r.errors]
    for r in errors:
        lines.append(f"{r.mode}: {r.errors:,} reads failed, first: {r.first_error}")
    return "\n".join(lines)

