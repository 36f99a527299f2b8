"""Sidecar test fixtures: an emulator behind a sidecar, in the test's loop or in threads.

Both kinds check on the way out that the sidecar's single-flight table is empty and
that no merged read is still running: whatever a test did, nothing is left behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeVar

import pytest
from cassandra.cluster import EXEC_PROFILE_DEFAULT, Cluster, ExecutionProfile
from cassandra.policies import RoundRobinPolicy, TokenAwarePolicy

from coalesce.emulator import Emulator, EmulatorThread
from coalesce.sidecar import Sidecar, SidecarConfig
from coalesce.sidecar.flights import Flights

T = TypeVar("T")

CALL_TIMEOUT = 30.0
BOUND = 10.0  # the longest any single wait in these tests may take before it fails


async def eventually(predicate: Callable[[], object], timeout: float = BOUND) -> None:
    """Give the loop turns until `predicate()` holds; fail after `timeout` seconds.

    A wait on observable state (a flight started, a connection noticed it was
    dropped), never a fixed delay: it returns on the first turn the state is there.
    """
    async with asyncio.timeout(timeout):
        while not predicate():  # noqa: ASYNC110 -- the state has no event to wait on
            await asyncio.sleep(0)


def _settled(group: Flights) -> bool:
    return not len(group) and not group.running and not group.settled


class SidecarThread:
    """A `Sidecar` on its own event loop in a background thread (for blocking drivers)."""

    def __init__(self, config: SidecarConfig, *, uvloop: bool = False) -> None:
        self.config = config
        if uvloop:
            import uvloop as _uvloop

            self.loop: asyncio.AbstractEventLoop = _uvloop.new_event_loop()
        else:
            self.loop = asyncio.new_event_loop()
        self.sidecar = Sidecar(config)
        self._thread = threading.Thread(target=self.loop.run_forever, name="sidecar",
                                        daemon=True)

    def start(self) -> None:
        self._thread.start()
        self.run(self.sidecar.start())

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = CALL_TIMEOUT) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, fn: Callable[..., T], *args: Any) -> T:
        async def invoke() -> T:
            return fn(*args)

        return self.run(invoke())

    @property
    def port(self) -> int:
        return self.sidecar.port

    def eventually(self, predicate: Callable[[], object]) -> None:
        """`eventually`, evaluated on the sidecar's loop."""
        self.run(eventually(predicate))

    def flights(self) -> tuple[int, int]:
        """(keys in the single-flight table, upstream calls running)."""
        group = self.sidecar.flights
        return self.call(lambda: (len(group), group.running))

    def close(self) -> None:
        if not self._thread.is_alive():
            return
        try:
            self.run(self.sidecar.stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(CALL_TIMEOUT)
            self.loop.close()


def sidecar_config(upstream: tuple[str, int], **overrides: Any) -> SidecarConfig:
    settings: dict[str, Any] = {
        "upstream": (upstream,),
        "listen": ("127.0.0.1", 0),
        "metrics": ("127.0.0.1", 0),
        "reconnect_delay": 0.02,
        "reconnect_max_delay": 0.2,
    }
    settings.update(overrides)
    return SidecarConfig(**settings)


@dataclass
class ThreadStack:
    """An `EmulatorThread` behind a `SidecarThread`, and driver clusters pointed at it."""

    emulator: EmulatorThread
    sidecar: SidecarThread
    clusters: list[Cluster] = field(default_factory=list)

    def cluster(self, *, negotiate: bool = False, **kwargs: Any) -> Cluster:
        """A cassandra-driver `Cluster` whose only contact point is the sidecar.

        Protocol v4 unless `negotiate`, which lets the driver find it out itself.
        """
        if not negotiate:
            kwargs.setdefault("protocol_version", 4)
        profile = ExecutionProfile(
            load_balancing_policy=TokenAwarePolicy(RoundRobinPolicy()),
            request_timeout=kwargs.pop("request_timeout", 20.0),
        )
        cluster = Cluster(
            ["127.0.0.1"], port=self.sidecar.port,
            execution_profiles={EXEC_PROFILE_DEFAULT: profile}, **kwargs,
        )
        self.clusters.append(cluster)
        return cluster

    def emulator_call(self, name: str) -> Any:
        return self.emulator.call(getattr(self.emulator.emulator, name))


@pytest.fixture
def thread_stack() -> Iterator[Callable[..., ThreadStack]]:
    """Make emulator+sidecar stacks on background threads; torn down and checked after."""
    made: list[ThreadStack] = []

    def make(
        *, emulator: dict[str, Any] | None = None, uvloop: bool = False, **config: Any
    ) -> ThreadStack:
        emu_kwargs = {"read_latency": 0.0, "per_row": 0.0, **(emulator or {})}
        emu = EmulatorThread(**emu_kwargs)
        emu.start()
        try:
            side = SidecarThread(sidecar_config((emu.host, emu.port), **config), uvloop=uvloop)
            side.start()
        except BaseException:
            emu.close()
            raise
        stack = ThreadStack(emu, side)
        made.append(stack)
        return stack

    yield make
    for stack in made:
        try:
            for cluster in stack.clusters:
                cluster.shutdown()
            # Drivers may close with their own background reads in flight: once the
            # sidecar has seen them go, nothing may be left.
            group = stack.sidecar.sidecar.flights
            with contextlib.suppress(TimeoutError):
                stack.sidecar.eventually(partial(_settled, group))
            assert stack.sidecar.flights() == (0, 0), "the sidecar left flights behind"
        finally:
            stack.sidecar.close()
            stack.emulator.close()


KS_KV: list[str] = [
    "CREATE KEYSPACE ks WITH replication = {'class': 'SimpleStrategy', 'replication_factor': 1}",
    "CREATE TABLE ks.kv (k int PRIMARY KEY, v text)",
    "INSERT INTO ks.kv (k, v) VALUES (1, 'one')",
]
"""Keyspace `ks`, table `kv` and its row k = 1: what most sidecar tests read."""


@dataclass
class LoopStack:
    """An `Emulator` behind a `Sidecar`, both in the test's event loop."""

    emulator: Emulator
    sidecar: Sidecar


MakeStack = Callable[..., Coroutine[Any, Any, LoopStack]]
"""The `loop_stack` fixture: makes an in-loop emulator+sidecar stack."""


@pytest.fixture
async def loop_stack() -> AsyncIterator[Callable[..., Coroutine[Any, Any, LoopStack]]]:
    """Make in-loop emulator+sidecar stacks; after the test the flight table is empty."""
    made: list[LoopStack] = []

    async def make(*, emulator: dict[str, Any] | None = None, **config: Any) -> LoopStack:
        emu_kwargs = {"read_latency": 0.0, "per_row": 0.0, **(emulator or {})}
        emu = Emulator(**emu_kwargs)
        await emu.start()
        side = Sidecar(sidecar_config((emu.host, emu.port), **config))
        try:
            await side.start()
        except BaseException:
            await emu.aclose()
            raise
        stack = LoopStack(emu, side)
        made.append(stack)
        return stack

    yield make
    for stack in made:
        try:
            # Let cancelled callers and failed flights finish unwinding.
            group = stack.sidecar.flights
            with contextlib.suppress(TimeoutError):
                await eventually(partial(_settled, group))
            assert len(stack.sidecar.flights) == 0, "the sidecar left keys in flight"
            assert stack.sidecar.flights.running == 0, "the sidecar left upstream calls running"
            assert stack.sidecar.flights.settled == 0, "the sidecar kept answers it no longer needs"
        finally:
            await stack.sidecar.stop()
            await stack.emulator.aclose()
