"""Server processes for a benchmark: the emulator and sidecars, started through the CLI.

Each server is ``python -m coalesce emulator|sidecar ...`` on free loopback ports, in
its own session (so a Ctrl-C at the terminal reaches the benchmark only, which then
stops its servers in order), with its output in a temporary file (a chatty server
never blocks on a pipe, and its last lines explain a failed start). Servers are read
from outside only: their ``/metrics`` endpoints and ``/proc/<pid>``, so the
benchmark sees what an operator sees and keeps working whatever their internals
become.

`ServerGroup` owns the processes it starts. Leaving it (``async with``), normally or
by an exception or a cancellation, stops every one: SIGTERM, then SIGKILL after
``stop_timeout``. Should the loop itself be torn down first (a second Ctrl-C), an
``atexit`` hook kills whatever is left, so no server outlives the benchmark.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from prometheus_client.parser import text_string_to_metric_families

__all__ = ["Metrics", "ServerGroup", "ServerProcess", "ServerStartError", "free_ports"]

Metrics = dict[tuple[str, tuple[tuple[str, str], ...]], float]
"""One scrape: (sample name, sorted labels) -> value."""


class ServerStartError(RuntimeError):
    """A server exited or did not become ready in time; the message has its last lines.

    `address_in_use`: it could not bind its port (taken since `free_ports` chose it);
    starting it again on other ports may well work.
    """

    def __init__(self, message: str, *, address_in_use: bool = False) -> None:
        super().__init__(message)
        self.address_in_use = address_in_use


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def free_ports(n: int) -> list[int]:
    """`n` distinct loopback ports nothing listens on now (all bound at once, then freed).

    Chosen below the kernel's ephemeral range when there is room: a port from that
    range, once freed, may become the local end of any outgoing connection (ours
    included) before the server that was meant to bind it does.
    """
    low, _ = _ephemeral_range()
    candidates: list[int] = []
    if low - 10_000 >= 4 * n:
        candidates = random.sample(range(10_000, low), min(low - 10_000, 64 * n))
    socks: list[socket.socket] = []
    try:
        for port in [*candidates, *[0] * n]:
            if len(socks) == n:
                break
            sock = socket.socket()
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                sock.close()
                continue
            socks.append(sock)
        return [int(sock.getsockname()[1]) for sock in socks]
    finally:
        for sock in socks:
            sock.close()


@dataclass(eq=False)
class ServerProcess:
    """One running server: where it listens, where its metrics are, its output."""

    name: str
    port: int
    metrics_port: int
    popen: subprocess.Popen[bytes] = field(repr=False)
    log: IO[bytes] = field(repr=False)

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def tail(self, lines: int = 20) -> str:
        """The last `lines` lines the server printed."""
        self.log.flush()
        self.log.seek(0)
        text = self.log.read().decode(errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def cpu_seconds(self) -> float | None:
        """User + system CPU of the server's live threads (ns resolution); None off Linux."""
        total = 0
        tasks = Path(f"/proc/{self.pid}/task")
        if not tasks.is_dir():
            return None
        for stat in tasks.glob("*/schedstat"):
            with contextlib.suppress(OSError, ValueError, IndexError):
                total += int(stat.read_text().split()[0])
        return total / 1e9

    def scrape(self, timeout: float = 5.0) -> Metrics:
        """Every sample of ``/metrics`` (blocking: call it in a thread)."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=timeout) as reply:
            text = reply.read().decode()
        return {
            (sample.name, tuple(sorted(sample.labels.items()))): float(sample.value)
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }


class ServerGroup:
    """The servers of one benchmark run; use as ``async with``. Single event loop.

    `start` launches a process (it returns at once); `ready` waits, bounded, until
    it listens. Leaving the block stops every process still running.
    """

    def __init__(self, *, start_timeout: float = 15.0, stop_timeout: float = 5.0) -> None:
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self._servers: list[ServerProcess] = []

    async def __aenter__(self) -> ServerGroup:
        atexit.register(self.kill_all)
        return self

    async def __aexit__(self, *exc: object) -> None:
        try:
            await self.stop(*self._servers)
        finally:
            self.kill_all()
            atexit.unregister(self.kill_all)

    def start(self, name: str, command: Sequence[str], *, port: int,
              metrics_port: int) -> ServerProcess:
        """Run ``python -m coalesce COMMAND...``, listening on `port` (not waited for)."""
        # Closed by `_reap`, when the process is gone: it outlives this call.
        log = tempfile.TemporaryFile(prefix=f"coalesce-{name}-")  # noqa: SIM115
        try:
            popen = subprocess.Popen(
                [sys.executable, "-m", "coalesce", *command],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        except BaseException:
            log.close()
            raise
        server = ServerProcess(name, port, metrics_port, popen, log)
        self._servers.append(server)
        return server

    async def ready(self, server: ServerProcess) -> None:
        """Return once `server` takes connections on its port and its ``/metrics``;
        raise `ServerStartError` if it exits first or ``start_timeout`` passes."""
        deadline = time.monotonic() + self.start_timeout
        for port in (server.port, server.metrics_port):
            while True:
                if server.popen.poll() is not None:
                    tail = server.tail()
                    raise ServerStartError(
                        f"{server.name} exited with status {server.popen.returncode} "
                        f"before listening on {port}:\n{tail}",
                        address_in_use="address already in use" in tail.lower())
                if time.monotonic() > deadline:
                    raise ServerStartError(
                        f"{server.name} not listening on {port} after "
                        f"{self.start_timeout:g}s:\n{server.tail()}")
                try:
                    _, writer = await asyncio.wait_for(
                        asyncio.open_connection("127.0.0.1", port), 1.0)
                except (OSError, TimeoutError):
                    await asyncio.sleep(0.05)
                    continue
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
                break

    async def stop(self, *servers: ServerProcess) -> None:
        """SIGTERM each of `servers`, wait for all (``stop_timeout``), SIGKILL the rest."""
        running = [s for s in servers if s.popen.poll() is None]
        for server in running:
            with contextlib.suppress(ProcessLookupError):
                server.popen.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.stop_timeout
        for server in running:
            with contextlib.suppress(subprocess.TimeoutExpired):
                await asyncio.to_thread(server.popen.wait, max(0.0, deadline - time.monotonic()))
        for server in servers:
            self._reap(server)

    def kill_all(self) -> None:
        """SIGKILL every server still running and wait for it (never blocks for long)."""
        for server in list(self._servers):
            self._reap(server)

    def _reap(self, server: ServerProcess) -> None:
        if server.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(server.popen.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                server.popen.wait(2)
        if server in self._servers:
            self._servers.remove(server)
            server.log.close()
