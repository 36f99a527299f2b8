"""The servers a benchmark runs against, each its own process, started through its CLI.

Nothing here imports the sidecar: it is started as ``python -m coalesce sidecar`` and
read through its ``/metrics`` endpoint only, so a rewrite of its internals keeps the
benchmarks working. Every helper is a context manager that stops its process on exit.
"""

from __future__ import annotations

import collections
import contextlib
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "Server",
    "cpu_seconds",
    "cpu_ticks_seconds",
    "emulator",
    "floor",
    "free_port",
    "haproxy",
    "metric_sum",
    "ring_member",
    "sidecar",
    "socat",
    "tree_cpu_seconds",
]

_FLOOR = Path(__file__).with_name("floor_server.py")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Server:
    """A running server: its port, its process id, and the last lines it printed."""

    name: str
    port: int
    pid: int
    metrics_port: int | None = None
    output: collections.deque[str] = field(default_factory=lambda: collections.deque(maxlen=50))


def _drain(proc: subprocess.Popen[str], into: collections.deque[str]) -> None:
    # Keeps reading after the ready line so a chatty server never blocks on a full pipe.
    assert proc.stdout is not None
    for line in proc.stdout:
        into.append(line.rstrip())


def _wait_port(port: int, proc: subprocess.Popen[str] | subprocess.Popen[bytes],
               host: str = "127.0.0.1") -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"exited with {proc.returncode} before listening on {port}")
        with contextlib.suppress(OSError), socket.create_connection((host, port), 1):
            return
        time.sleep(0.02)
    raise RuntimeError(f"nothing listening on {port} after 15s")


def _stop(proc: subprocess.Popen[str] | subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextlib.contextmanager
def _python(name: str, argv: list[str], port: int,
            metrics_port: int | None = None, host: str = "127.0.0.1") -> Iterator[Server]:
    """Run `python argv...`; yield once something listens on `host`:`port`."""
    proc = subprocess.Popen([sys.executable, *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    server = Server(name, port, proc.pid, metrics_port)
    thread = threading.Thread(target=_drain, args=(proc, server.output), daemon=True)
    thread.start()
    try:
        try:
            _wait_port(port, proc, host)
        except RuntimeError as exc:
            raise RuntimeError(f"{name}: {exc}\n" + "\n".join(server.output)) from None
        yield server
    finally:
        _stop(proc)
        thread.join(5)


def emulator(read_latency: str) -> contextlib.AbstractContextManager[Server]:
    """`coalesce emulator` with `read_latency` per read, free writes and rows, metrics."""
    port, metrics = free_port(), free_port()
    return _python(
        f"emulator({read_latency})",
        ["-m", "coalesce", "emulator", "--listen", f"127.0.0.1:{port}",
         "--read-latency", read_latency, "--write-latency", "0", "--per-row", "0",
         "--metrics", f"127.0.0.1:{metrics}"],
        port, metrics,
    )


def sidecar(upstream: int, uvloop: bool) -> contextlib.AbstractContextManager[Server]:
    """`coalesce sidecar` in front of 127.0.0.1:`upstream`, with /metrics on."""
    port, metrics = free_port(), free_port()
    argv = ["-m", "coalesce", "sidecar", "--listen", f"127.0.0.1:{port}",
            "--upstream", f"127.0.0.1:{upstream}", "--metrics", f"127.0.0.1:{metrics}"]
    if uvloop:
        argv.append("--uvloop")
    return _python("sidecar", argv, port, metrics)


def ring_member(upstream: int, listen: tuple[str, int], peers: list[tuple[str, int]],
                vnodes: int, *flags: str) -> contextlib.AbstractContextManager[Server]:
    """`coalesce sidecar` listening on `listen`, one member of the ring of `peers`
    (every member's address, this one included), with /metrics on."""
    host, port = listen
    metrics = free_port()
    argv = ["-m", "coalesce", "sidecar", "--listen", f"{host}:{port}",
            "--upstream", f"127.0.0.1:{upstream}", "--metrics", f"127.0.0.1:{metrics}",
            "--peers", ",".join(f"{h}:{p}" for h, p in peers), "--vnodes", str(vnodes),
            *flags]
    return _python(f"sidecar {host}:{port}", argv, port, metrics, host)


def floor(delay: str, uvloop: bool) -> contextlib.AbstractContextManager[Server]:
    """benchmarks/floor_server.py answering each batch of reads after `delay`."""
    port = free_port()
    argv = [str(_FLOOR), "--listen", f"127.0.0.1:{port}", "--delay", delay]
    if uvloop:
        argv.append("--uvloop")
    return _python("floor", argv, port)


@contextlib.contextmanager
def socat(upstream: int) -> Iterator[Server | None]:
    """A socat TCP relay (a process per connection, Nagle off); None if not installed."""
    if shutil.which("socat") is None:
        yield None
        return
    port = free_port()
    proc = subprocess.Popen(
        ["socat", f"TCP-LISTEN:{port},fork,reuseaddr,bind=127.0.0.1,nodelay",
         f"TCP:127.0.0.1:{upstream},nodelay"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        _wait_port(port, proc)
        yield Server("socat", port, proc.pid)
    finally:
        _stop(proc)


_HAPROXY = """\
global
    nbthread 1
    maxconn 4096
defaults
    mode tcp
    timeout connect 5s
    timeout client 10m
    timeout server 10m
frontend cql
    bind 127.0.0.1:{port}
    default_backend scylla
backend scylla
    server emulator 127.0.0.1:{upstream}
"""


@contextlib.contextmanager
def haproxy(upstream: int) -> Iterator[Server | None]:
    """A single-threaded HAProxy in TCP mode; None if not installed."""
    binary = shutil.which("haproxy") or ("/usr/sbin/haproxy"
                                         if os.path.exists("/usr/sbin/haproxy") else None)
    if binary is None:
        yield None
        return
    port = free_port()
    with tempfile.NamedTemporaryFile("w", suffix=".cfg", delete=False) as cfg:
        cfg.write(_HAPROXY.format(port=port, upstream=upstream))
    proc = subprocess.Popen([binary, "-db", "-f", cfg.name],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_port(port, proc)
        yield Server("haproxy", port, proc.pid)
    finally:
        _stop(proc)
        os.unlink(cfg.name)


def cpu_ticks_seconds(pid: int) -> float:
    """User + system CPU time process `pid` has used so far, all threads, dead ones too.

    From /proc/<pid>/stat, so counted in clock ticks (10 ms on this kernel).
    """
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process `pid`'s live threads, in nanosecond resolution.

    The sum of each thread's run time in /proc/<pid>/task/*/schedstat: the same quantity
    as `cpu_ticks_seconds` without the 10 ms ticks, which at 10,000 waiters would be a
    step of 1 us per waiter. A thread that exits in between is lost; the benchmark keeps
    the tick count next to it as a check.
    """
    total = 0
    for stat in Path(f"/proc/{pid}/task").glob("*/schedstat"):
        with contextlib.suppress(OSError):
            total += int(stat.read_text().split()[0])
    return total / 1e9


def tree_cpu_seconds(pid: int) -> float:
    """`cpu_seconds` of `pid` and of its live descendants (socat forks per connection)."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            parents.setdefault(ppid, []).append(int(stat.parent.name))
    total, todo = 0.0, [pid]
    while todo:
        current = todo.pop()
        total += cpu_seconds(current)
        todo.extend(parents.get(current, []))
    return total


def metric_sum(port: int, name: str, labels: str = "") -> float | None:
    """The sum of every sample of `name` (whose labels contain `labels`) on /metrics.

    None when the family is absent, so a renamed metric shows as missing, not as 0.
    """
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    pattern = re.compile(rf"^{re.escape(name)}(\{{[^}}]*\}})? ([0-9.e+-]+)$", re.M)
    total, seen = 0.0, False
    for match in pattern.finditer(text):
        if labels in (match.group(1) or ""):
            total += float(match.group(2))
            seen = True
    return total if seen else None


def rss_kib(pid: int) -> int | None:
    """VmRSS of `pid` in KiB from /proc/<pid>/status; None once the process is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None
