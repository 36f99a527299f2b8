"""Shared pytest fixtures for anything that needs a CQL server.

Registered from tests/conftest.py with `pytest_plugins = ["tests.fixtures_emulator"]`.

Fixtures:
- `emulator`: an in-loop `Emulator` (zero latency) for async clients such as
  acsylla or a raw socket; function-scoped.
- `emulator_thread`: an `EmulatorThread` (zero latency) for blocking clients
  (cassandra-driver's sync API, cqlsh); module-scoped, so tests sharing it
  must use their own keyspaces.
- `cql_target`: where tests marked `scylla` send CQL. Parametrised: always
  the emulator, plus the real cluster named by SCYLLA_HOSTS (comma-separated
  `host[:port]`) when that variable is set -- that parameter is marked
  `scylla` and skipped otherwise.
- `unique_keyspace`: a fresh keyspace name per test (drop it yourself, or
  let the emulator go away).
"""

from __future__ import annotations

import itertools
import os
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import pytest

from coalesce.emulator import Emulator, EmulatorThread

__all__ = [
    "CqlTarget",
    "cql_target",
    "emulator",
    "emulator_thread",
    "scylla_hosts",
    "unique_keyspace",
]

_DEFAULT_PORT = 9042
_keyspace_counter = itertools.count()


@dataclass(frozen=True)
class CqlTarget:
    """Contact points of a CQL cluster; `emulator` is set when it is the emulator."""

    hosts: tuple[tuple[str, int], ...]
    emulator: EmulatorThread | None = None

    @property
    def host(self) -> str:
        return self.hosts[0][0]

    @property
    def port(self) -> int:
        return self.hosts[0][1]

    @property
    def is_emulator(self) -> bool:
        return self.emulator is not None


def scylla_hosts() -> tuple[tuple[str, int], ...]:
    """SCYLLA_HOSTS parsed into (host, port) pairs; empty when unset."""
    raw = os.environ.get("SCYLLA_HOSTS", "").strip()
    hosts: list[tuple[str, int]] = []
    for item in filter(None, (part.strip() for part in raw.split(","))):
        host, sep, port = item.rpartition(":")
        if sep and port.isdigit() and not host.endswith(":"):
            hosts.append((host.strip("[]"), int(port)))
        else:
            hosts.append((item, _DEFAULT_PORT))
    return tuple(hosts)


@pytest.fixture
async def emulator() -> AsyncIterator[Emulator]:
    """A zero-latency emulator on the test's own event loop."""
    async with Emulator(read_latency=0.0, per_row=0.0) as emu:
        yield emu


@pytest.fixture(scope="module")
def emulator_thread() -> Iterator[EmulatorThread]:
    """A zero-latency emulator on a background thread, shared by a test module."""
    with EmulatorThread(read_latency=0.0, per_row=0.0) as emu:
        yield emu


@pytest.fixture(
    scope="module",
    params=["emulator", pytest.param("scylla", marks=pytest.mark.scylla)],
)
def cql_target(request: pytest.FixtureRequest) -> Iterator[CqlTarget]:
    """The emulator, or (second parameter) the real cluster from SCYLLA_HOSTS."""
    if request.param == "scylla":
        hosts = scylla_hosts()
        if not hosts:
            pytest.skip("SCYLLA_HOSTS is not set")
        yield CqlTarget(hosts)
        return
    with EmulatorThread(read_latency=0.0, per_row=0.0) as emu:
        yield CqlTarget(((emu.host, emu.port),), emu)


@pytest.fixture
def unique_keyspace() -> str:
    """A keyspace name no other test in this process uses."""
    return f"coalesce_test_{os.getpid()}_{next(_keyspace_counter)}"
